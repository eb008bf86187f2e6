"""The built-in entries of the op registry (``fxcondensa.rules.registry``), one module per family of ops.

Importing this package registers them; ``passes/analysis.py`` and ``passes/costs.py`` import it, so every
pass sees the same table. A new rule goes into the module of its family (or a new one imported here):
``layers`` (weights: conv, linear), ``channel_norms`` (BatchNorm, InstanceNorm, GroupNorm, PReLU), ``norms`` (LayerNorm / RMSNorm over the
channel dim), ``attention`` (matmul and attention; ``heads`` answers which channels are heads), ``swin``
(torchvision's Swin functions), ``elementwise`` (activations, clamps, pools, binary ops, softmax, pad),
``operands`` (parameters and buffer tables as operands of binary ops), ``shapes`` (reshapes, cat, split,
reductions, shape queries), ``indexing`` (getitem, slices, gathers), ``experts`` (mixture-of-experts weights and grouped matmuls). A family that knows a special case of
another family's op refines that op's entry (``registry.refine_rule``).
"""

from . import (
    attention,
    channel_norms,
    elementwise,
    embedding,
    experts,
    heads,
    indexing,
    layers,
    norms,
    operands,
    recurrent,
    shapes,
    swin,
)

__all__ = ["attention", "channel_norms", "elementwise", "embedding", "experts", "heads", "indexing", "layers", "norms", "operands", "recurrent",
           "shapes", "swin", "register_optional_rules"]


def register_optional_rules() -> None:
    """The built-in optional rules: those of ``rules/elementwise.py``, and torchvision's Swin functions once
    torchvision's Swin module is loaded (a model that calls them has imported it)."""
    elementwise.register_optional_rules()
    swin.register_swin_rules()
    experts.register_transformers_rules()

"""The built-in entries of the op registry (``fxcondensa.rules.registry``), one module per family of ops.

Importing this package registers them; ``passes/analysis.py`` and ``passes/costs.py`` import it, so every
pass sees the same table. A new rule goes into the module of its family (or a new one imported here):
``layers`` (weights: conv, linear, per-channel norms, PReLU), ``norms`` (LayerNorm / RMSNorm over the
channel dim), ``attention`` (matmul and attention), ``elementwise`` (activations, clamps, pools, binary ops,
softmax, pad), ``shapes`` (reshapes, cat, split, indexing, reductions, shape queries).
"""

from . import attention, elementwise, embedding, layers, norms, recurrent, shapes
from .attention import register_optional_rules

__all__ = ["attention", "elementwise", "embedding", "layers", "norms", "recurrent", "shapes", "register_optional_rules"]

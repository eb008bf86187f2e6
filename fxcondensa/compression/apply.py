"""``compress``: apply a scheme to a copy of a model and return the compressed, dense-shaped model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.graph import trace
from ..passes.layers import weight_layers
from ..schemes import LINEAR_CONV, check_scheme
from .owned import check_output, own_compressed

__all__ = ["compress", "density", "layer_densities"]


def compress(model: nn.Module, scheme: Any, example_inputs: Any = None, *,
             leaf_modules: Sequence[type[nn.Module]] = (), concrete_args: dict[str, Any] | None = None,
             capture: str = "auto", output: str = "auto") -> nn.Module:
    """Return a compressed copy of ``model``: same shapes, zeros where pruned, values rounded to storage dtypes.

    ``output`` says what comes back. ``"auto"`` (the default) and ``"module"``: a copy of ``model`` of its
    own class (its methods, such as ``generate`` or ``forward_features``, stay), whose tensors are the
    compressed ones; the annotated graph (masks, storage dtypes) is kept beside it
    (``fxcondensa.capture.records.compressed_graph``) for ``footprint``, ``save_compressed`` and ``thin``.
    ``"graph"``: that annotated ``GraphModule`` itself. Where the class cannot hold the captured tensors
    (a graph tensor with no place in the model), ``"auto"`` returns the graph, with the reason in
    ``graph_record(graph).reason``, and ``"module"`` raises ``ValueError``. Either way the state-dict keys
    equal the model's, so ``original.load_state_dict(compressed.state_dict())`` works. ``example_inputs``
    are needed by structured schemes (shapes drive the channel analysis); unstructured ones work without.
    ``leaf_modules``, ``concrete_args`` and ``capture`` are the capture options of ``fxcondensa.trace``
    (``capture="export"`` for a model torch.fx's symbolic tracing follows wrongly). The model is never modified.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import Prune
        >>> model = fxcondensa.models.LeNet5()
        >>> w = fxcondensa.compress(model, Prune(0.1))
        >>> type(w).__name__, round(fxcondensa.density(w), 2), round(fxcondensa.density(model), 2)
        ('LeNet5', 0.1, 1.0)
    """
    check_output("compress", output)
    check_scheme(scheme)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    with torch.no_grad():
        scheme.pi(gm)
        scheme.delta(gm)
    return own_compressed(model, gm, output=output)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Linear / Conv weights by parameter name; a captured graph's as its ops use them (an export capture
    keeps no ``nn.Linear`` modules, only their parameters)."""
    layers = weight_layers(model) if isinstance(model, fx.GraphModule) else {}
    layers.update((n, m) for n, m in model.named_modules()
                  if n not in layers and isinstance(m, LINEAR_CONV) and isinstance(getattr(m, "weight", None), torch.Tensor))
    return {f"{n}.weight": m.weight for n, m in layers.items()}


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Fraction of non-zero weights of each Linear / Conv layer, by parameter name."""
    return {n: float(w.count_nonzero()) / max(w.numel(), 1) for n, w in _weights(model).items()}


def density(model: nn.Module) -> float:
    """Fraction of non-zero weights over all Linear / Conv layers together (what Prune's density targets)."""
    ws = list(_weights(model).values())
    total = sum(w.numel() for w in ws)
    return sum(int(w.count_nonzero()) for w in ws) / total if total else 1.0



"""``thin``: compress a copy of the model with a scheme, then remove the pruned channels and check the result.

The verb does what a user asks for in one call (capture, compress, thin, check); the graph work is the
thinning pass's (``fxcondensa.passes.thin``), which knows nothing of schemes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.exported import capture_notes, graph_inputs, split_inputs
from ..capture.graph import trace
from ..capture.records import graph_record
from ..passes.analysis import analyze
from ..passes.thin import thin_graph
from ..schemes import check_scheme

__all__ = ["thin"]


def _example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The example inputs as the model takes them (tensor, tuple, or dict of keyword inputs)."""
    if example_inputs is not None:
        split_inputs(example_inputs)  # a bad container fails here, with the message saying what to pass
        return example_inputs
    if isinstance(model, fx.GraphModule):
        metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
        if metas and all(m is not None and hasattr(m, "shape") for m in metas):
            # Made where the model lives: a CUDA model gets CUDA inputs.
            device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
            return tuple(torch.randn(m.shape, dtype=m.dtype, device=device) if m.dtype.is_floating_point
                         else torch.zeros(m.shape, dtype=m.dtype, device=device) for m in metas)
    raise ValueError("thin needs example inputs to learn the tensor shapes, e.g. "
                     "thin(model, scheme, example_inputs=torch.randn(1, 3, 224, 224))")



def thin(
    model: nn.Module,
    scheme: Any = None,
    example_inputs: Any = None,
    *,
    check: bool = True,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
) -> fx.GraphModule:
    """Return a smaller ``GraphModule`` with pruned channels physically removed.

    With a ``scheme`` (e.g. ``StructurePrune(0.5)``) the model is compressed first; without one, the
    channels that are already zero across their whole group are removed (e.g. the output of L-C with a
    structured scheme). The model is never modified. ``check=True`` compares the thinned model with the
    compressed dense one on ``example_inputs`` (eval mode, rtol 1e-4, atol 1e-5) and raises
    ``ThinningCheckError`` naming the first node that differs. ``strict=True`` raises ``UnknownOpError`` at
    the first op the channel analysis has no rule for, instead of keeping its channels whole (see
    ``fxcondensa.register_rule``). ``leaf_modules``, ``concrete_args`` and ``capture`` are passed to ``trace``:
    a model torch.fx cannot trace symbolically is captured with ``torch.export`` (``capture="auto"``), and
    ``example_inputs`` may be a dict of keyword inputs (``{"input_ids": ids, "attention_mask": mask}``);
    the thinned module takes the inputs the model takes.

    What was removed, which channel groups were frozen and why, and the recipe are in
    ``fxcondensa.capture.records.thin_record(thinned)`` (a ``ThinRecord``).

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(1, 1, 28, 28))
        >>> small.conv1.out_channels < 20 and small.ip1.out_features < 500
        True
    """
    if scheme is not None:
        check_scheme(scheme)
    example = _example_inputs(model, example_inputs)
    compressed = trace(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    inputs = graph_inputs(compressed, example)  # the placeholder values, in graph order
    if strict:  # fail before spending time on the scheme
        analyze(compressed, strict=True)
    if scheme is not None:
        with torch.no_grad():
            scheme.pi(compressed)
            scheme.delta(compressed)
    # A scheme that prunes head_dim columns says so on the graph record; without a scheme the pass decides.
    columns = graph_record(compressed).head_dim_columns if scheme is not None else None
    thinned = thin_graph(compressed, inputs, check=check, strict=strict, columns=columns)
    for note in capture_notes(compressed):
        warnings.warn(f"thin: {type(model).__name__} was {note}", stacklevel=2)
    return thinned

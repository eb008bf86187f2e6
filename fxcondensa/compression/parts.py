"""``thin(..., modules=[...])``: thin the parts of a model that can be captured, keep the rest as the user's code.

A detector's post-processing (top-k, non-maximum suppression, thresholds) depends on the data and cannot be
captured; its backbone, feature pyramid and heads can. Each named submodule is captured on the inputs it
receives when the whole model runs on the example, compressed and thinned on its own, and put back in a copy
of the model; everything else (the transform, anchors, RoI pooling, post-processing) stays the model's own
code. A part's inputs and outputs keep every channel (they are its graph's inputs and outputs), so the parts
always fit together. The whole model is then checked: the thinned copy's outputs equal those of the same
model with the parts only compressed (zeros where pruned).

``modules="auto"`` finds the parts: the model itself if it can be captured, else each child that can be (a
child that cannot is searched the same way; a child without parameters stays as it is).

Example:
    >>> import torch, fxcondensa
    >>> from torch import nn
    >>> class Detector(nn.Module):  # a data-dependent end that no capture can follow
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    ...     def forward(self, x):
    ...         scores = self.body(x).flatten(1)
    ...         return scores[scores > 0]
    >>> small = fxcondensa.thin(Detector(), fxcondensa.schemes.StructurePrune(0.5), torch.randn(1, 3, 8, 8),
    ...                         modules=["body"])
    >>> type(small).__name__, small.body.get_submodule("0").out_channels
    ('Detector', 8)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..capture.exported import graph_inputs, split_inputs
from ..capture.graph import flatten_outputs, trace
from ..capture.modes import eval_mode
from ..capture.records import graph_record
from ..errors import ThinningCheckError, TraceError
from ..passes.precision import tolerance
from ..passes.thin import thin_graph

__all__ = ["thin_modules"]


def _check_names(model: nn.Module, modules: Sequence[str]) -> list[str]:
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules) or not modules:
        raise TypeError(f"thin: modules must be a non-empty list of submodule names (e.g. ['backbone', "
                        f"'rpn.head']) or 'auto', got {modules!r}")
    names = dict(model.named_modules())
    for m in modules:
        if m not in names or m == "":
            near = [n for n in names if n and n.split(".")[-1] == m.split(".")[-1]][:3]
            raise ValueError(f"thin: modules names {m!r}, which is not a submodule of {type(model).__name__}"
                             f"{f' (did you mean {near}?)' if near else ''}; pass names from model.named_modules()")
    for a in modules:
        for b in modules:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"thin: modules names both {a!r} and {b!r}, which is inside it; name one of them")
    return list(modules)


def _record_calls(model: nn.Module, names: Sequence[str], example_inputs: Any, *,
                  required: bool = True) -> dict[str, Any]:
    """The inputs each named submodule receives on the example, as thin's ``example_inputs``: a tuple of
    positional inputs, or a dict of keyword inputs where the call passes keywords."""
    calls: dict[str, Any] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in calls:
                return
            if not kwargs:
                calls[name] = tuple(args)
                return
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            calls[name] = dict(bound.arguments)
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in calls]
    if missing and required:
        raise ValueError(f"thin: modules {missing} were not called when {type(model).__name__} ran on the example "
                         "inputs; name submodules that its forward calls")
    return calls


def _call(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


def _capturable(model: nn.Module, example_inputs: Any, kw: dict[str, Any]) -> list[str]:
    """The largest submodules that capture: the model, else its children searched the same way."""
    found: list[str] = []

    def search(prefix: str, module: nn.Module, calls: dict[str, Any]) -> None:
        if prefix in calls:
            try:
                trace(module, calls[prefix], **kw)
            except (TraceError, ValueError, TypeError, RuntimeError):
                pass
            else:
                found.append(prefix)
                return
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()
                    if any(True for _ in c.parameters())]
        # A container that is never called itself (a ModuleDict) is searched through its children.
        called = _record_calls(model, [n for n, _ in children], example_inputs, required=False) if children else {}
        for name, child in children:
            search(name, child, called)

    try:
        trace(model, example_inputs, **kw)
        return [""]
    except TraceError:
        pass
    search("", model, {})
    if not found:
        raise TraceError(f"thin: no part of {type(model).__name__} could be captured; see trace(model, "
                         "example_inputs) for where the capture stops")
    return found


def thin_modules(model: nn.Module, scheme: Any, example_inputs: Any, modules: Sequence[str] | str, *,
                 check: bool = True, strict: bool = False, leaf_modules: Sequence[type[nn.Module]] = (),
                 concrete_args: dict[str, Any] | None = None, capture: str = "auto",
                 inplace: bool = False) -> nn.Module | None:
    """``model`` with each submodule of ``modules`` replaced by its thinned graph (see the module docstring);
    None where ``modules="auto"`` finds that the whole model captures (then ``thin`` thins it as usual)."""
    if example_inputs is None:
        raise ValueError("thin: modules=... needs example_inputs: each part is captured on the inputs it receives")
    kw = dict(leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    names = _capturable(model, example_inputs, kw) if modules == "auto" else _check_names(model, modules)
    if names == [""]:  # the whole model captures: the ordinary thin (the caller's)
        return None
    calls = _record_calls(model, names, example_inputs)
    work = model if inplace else copy.deepcopy(model)
    reference = copy.deepcopy(model) if check else None
    for name in names:
        compressed = trace(model.get_submodule(name), calls[name], **kw)
        inputs = graph_inputs(compressed, calls[name])
        if scheme is not None:
            with torch.no_grad():
                scheme.pi(compressed)
                scheme.delta(compressed)
        columns = graph_record(compressed).head_dim_columns if scheme is not None else None
        thinned = thin_graph(compressed, inputs, check=check, strict=strict, columns=columns)
        work.set_submodule(name, thinned, strict=True)
        if reference is not None:
            reference.set_submodule(name, compressed, strict=True)
    if reference is not None:
        _check_whole(reference, work, example_inputs, names)
    return work


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol) if a.is_floating_point() else torch.equal(a, b)


def _rows(outputs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Outputs with the same leading length side by side (a detector's boxes, labels and scores: one row per
    detection), rows sorted, column by column from the first."""
    tables: dict[int, list[torch.Tensor]] = {}
    for t in outputs:
        if t.dim() >= 1:
            tables.setdefault(t.shape[0], []).append(t.detach().reshape(t.shape[0], -1).double())
    out = {}
    for n, cols in tables.items():
        table = torch.cat(cols, 1)
        order = torch.arange(n)
        for c in reversed(range(table.shape[1])):  # a stable sort per column, the first column last
            order = order[torch.sort(table[order, c], stable=True).indices]
        out[n] = table[order]
    return out


def _same(reference: nn.Module, thinned: nn.Module, example_inputs: Any) -> tuple[bool, str]:
    with eval_mode(reference, thinned), torch.no_grad():
        expected = flatten_outputs(_call(reference, example_inputs))
        got = flatten_outputs(_call(thinned, example_inputs))
    floats = [t for t in expected if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    rtol, atol = tolerance(dtype)
    what = (f"output shapes {[tuple(t.shape) for t in got]} against {[tuple(t.shape) for t in expected]}, "
            f"{str(dtype).removeprefix('torch.')}, rtol={rtol}, atol={atol}")
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got, strict=True)):
        return False, what
    if all(_close(a, b, rtol, atol) for a, b in zip(expected, got, strict=True)):
        return True, what
    rows_e, rows_g = _rows(expected), _rows(got)
    return rows_e.keys() == rows_g.keys() and all(_close(rows_e[n], rows_g[n], rtol, atol) for n in rows_e), what


def _in_float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.float64)


def _check_whole(reference: nn.Module, thinned: nn.Module, example_inputs: Any, names: Sequence[str]) -> None:
    """The whole model, its own code between the parts included, against the model with compressed parts.

    Rows that differ only in order (detections of equal score, which a sort may list either way after a
    rounding-level change) are compared as sets. Where the model's dtype still differs, both run again in
    float64: removing zero channels changes the order of sums, and a detector's thresholds, top-k and
    non-maximum suppression turn that rounding into other detections; in float64 it vanishes, a wrong
    model does not."""
    same, what = _same(reference, thinned, example_inputs)
    if same:
        return
    wide = torch.utils._pytree.tree_map(
        lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, example_inputs)
    try:
        same, _ = _same(_in_float64(reference), _in_float64(thinned), wide)
    except Exception:  # a part that asserts its dtype (a torch.export capture) cannot run wider
        same = False
    if not same:
        raise ThinningCheckError(
            f"thin: with the parts {list(names)} thinned, {type(thinned).__name__}'s outputs differ from the model "
            f"with those parts compressed ({what}; float64 differs too); the code between the parts may read a "
            "channel count: thin fewer or smaller parts")

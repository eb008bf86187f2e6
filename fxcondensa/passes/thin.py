"""Network thinning: physically remove pruned channels and emit a smaller ``GraphModule``.

A channel can go when it is exactly zero wherever it enters a layer that sums over channels (see
``channels.py``). Removing it slices every parameter and buffer that carries it, updates the module
attributes that describe those sizes, rewrites literal sizes in ``view`` / ``reshape`` / ``split`` calls,
and recompiles. By construction the thinned model computes the same outputs as the compressed dense one;
``check=True`` verifies that on the example inputs and names the first node where they part.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import registry
from ..capture import capture_notes, capture_of, graph_inputs, split_inputs
from ..errors import ExampleInputError, ThinningCheckError
from ..graph import propagate_shapes, trace
from ..records import META, GroupRecord, ThinRecord, graph_record
from ..rules.shapes import channel_slice_rewrite
from ..schemes import check_scheme
from .analysis import analyze, balance_grouped, removable_channels
from .channels import ChanInfo, ChannelAnalysis, KeptView

__all__ = ["thin", "rethin", "apply_keep", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5


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


def _resolve(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr


def _set_tensor(gm: fx.GraphModule, names: list[str], value: torch.Tensor) -> None:
    """Replace a tensor under all its names by one new object, so that tied weights stay tied."""
    module, attr = _resolve(gm, names[0])
    old = getattr(module, attr)
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
        else value.contiguous()
    for name in names:
        module, attr = _resolve(gm, name)
        if isinstance(new, nn.Parameter):
            setattr(module, attr, new)
        else:
            module._buffers[attr] = new


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Canonical tensor name -> every name it is reachable by (tied parameters are sliced once, set everywhere)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        canonical = first.setdefault(id(t), name)
        names.setdefault(canonical, []).append(name)
    return names


def _kept(analysis: ChannelAnalysis, keep: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    return analysis.kept_indices(keep, atoms)


def _slice_tensors(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    _apply_slices(gm, _slice_plan(analysis, keep))


# One step of a slicing plan: (tensor path, dim, kept indices) for a plain slice, or (path, -1, (rows, cols))
# for a tied grouped conv, whose rows are its kept filters and cols the kept in-group inputs of each row.
SliceStep = tuple[str, int, Any]


def _slice_plan(analysis: ChannelAnalysis, keep: torch.Tensor) -> list[SliceStep]:
    """What to cut, as CPU indices: decided once from the analysis, applied on any device."""
    grouped_weights = {f"{g.module}.weight": g for g in analysis.grouped}
    plan: list[SliceStep] = []
    for s in analysis.slices:
        if s.path in grouped_weights and s.dim == 0:
            continue  # rows and in-group columns of a tied grouped conv are cut together below
        idx = _kept(analysis, keep, s.atoms)
        if idx.numel() != s.atoms.numel():
            plan.append((s.path, s.dim, idx))
    for path, gc in grouped_weights.items():
        k = analysis.kept(keep, gc.out_atoms).view(gc.groups, -1)
        if bool(k.all()):
            continue
        per = k.shape[1]
        rows = torch.nonzero(k.flatten()).flatten()  # group-major: the kept filters of each kept group in turn
        # Within a group, kept output k reads kept input k: the same local indices select the columns.
        cols = torch.stack([torch.nonzero(k[j]).flatten() for j in torch.nonzero(k.any(1)).flatten().tolist()])
        plan.append((path, -1, (rows, cols.repeat_interleave(cols.shape[1], 0), per)))
    return plan


def _apply_slices(gm: fx.GraphModule, plan: list[SliceStep]) -> None:
    """Cut the tensors of ``gm`` as planned; indices move to each tensor's device, nothing else does."""
    aliases = _aliases(gm)
    tensors: dict[str, torch.Tensor] = {}

    def current(path: str) -> torch.Tensor:
        if path not in tensors:
            module, attr = _resolve(gm, path)
            tensors[path] = getattr(module, attr).detach()
        return tensors[path]

    for path, dim, idx in plan:
        w = current(path)
        if dim >= 0:
            tensors[path] = w.index_select(dim, idx.to(w.device))
            continue
        rows, cols, per = idx
        out = w.index_select(0, rows.to(w.device))
        if w.shape[1] == per:  # depthwise-like: each filter's inputs are the kept ones of its group
            index = cols.to(w.device).view(*cols.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
            out = out.gather(1, index)
        tensors[path] = out
    for path, value in tensors.items():
        _set_tensor(gm, aliases.get(path, [path]), value)


def _copy_without_annotations(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of ``gm`` whose nodes carry no fxcondensa metadata: masks and channel infos describe the
    dense shapes, so they would be wrong on the thinned model, and copying them costs time."""
    saved = {n: n.meta.pop(META) for n in gm.graph.nodes if META in n.meta}
    # Share every tensor instead of cloning it: the sliced ones are replaced by new tensors, and the rest
    # only outlive ``gm`` (an internal copy of the user's model) in the thinned model.
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    try:
        return copy.deepcopy(gm, memo)
    finally:
        for n, meta in saved.items():
            n.meta[META] = meta


def _kept_count(analysis: ChannelAnalysis, keep: torch.Tensor, info: Any) -> int | None:
    return int(analysis.kept(keep, info.atoms).sum()) if isinstance(info, ChanInfo) else None


def _update_modules(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Make each module's size attributes agree with its new tensors (they are used by repr and export):
    a tied grouped conv gets its new group count here, the rest is each registry entry's ``resize``."""
    grouped = {g.module: g for g in analysis.grouped}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if node.target in grouped:
            g = grouped[node.target]
            m.groups = int(analysis.kept(keep, g.out_atoms).view(g.groups, -1).any(1).sum())
        rule = registry.rule_for(node, m)
        if rule is not None and rule.resize is not None:
            x = node.args[0] if node.args else None
            cin = _kept_count(analysis, keep, analysis.infos.get(x.name)) if isinstance(x, fx.Node) else None
            rule.resize(m, cin)


def _rewrite_ops(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Ops whose registry entry has a ``rewrite`` change form to stay exact over the kept channels."""
    view = KeptView(analysis, keep)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = registry.rule_for(node, gm.get_submodule(node.target) if node.op == "call_module" else None)
        if rule is not None and rule.rewrite is not None:
            rule.rewrite(gm, node, view)


def _rewrite_sizes(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Literal sizes in view/reshape/split calls that count channels must count the kept ones."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in dict.fromkeys(analysis.reshapes):
        node = nodes[name]
        info = analysis.infos.get(name)
        if node.target is operator.getitem or getattr(node.target, "overloadpacket", None) is torch.ops.aten.slice:
            channel_slice_rewrite(node, KeptView(analysis, keep))  # x[:, a:b]: bounds in kept channels
            continue
        if isinstance(info, list):  # split / chunk: sizes of the parts along the channel dim
            sizes = [_kept_count(analysis, keep, part) for part in info]
            x = node.args[0]
            dim = info[0].dim
            if node.op == "call_method":
                node.target = "split"
            else:
                node.target = torch.split
            node.args = (x, sizes, dim)
            node.kwargs = {}
            continue
        if not isinstance(info, ChanInfo):
            continue
        new = _kept_count(analysis, keep, info)
        args, kwargs = list(node.args), dict(node.kwargs)
        if "shape" in kwargs or "size" in kwargs:  # x.reshape(shape=(...)), x.view(size=(...))
            key = "shape" if "shape" in kwargs else "size"
            kwargs[key] = _with_size(kwargs[key], info.dim, new)
        elif len(args) == 2 and isinstance(args[1], (list, tuple)):  # x.view((b, c, -1)), torch.reshape(x, shape)
            args[1] = _with_size(args[1], info.dim, new)
        elif node.op == "call_method":  # x.view(b, c, -1)
            args[1:] = _with_size(args[1:], info.dim, new)
        node.args, node.kwargs = tuple(args), kwargs


_RESHAPES = {"view", "reshape", torch.reshape}


def _thinned_width(value: Any, analysis: ChannelAnalysis, keep: torch.Tensor) -> bool:
    """``value`` reads the width of a tracked dim that loses channels: ``t.shape[k]``, ``t.size()[k]`` or
    ``t.size(k)`` where ``k`` is ``t``'s channel dim."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and len(value.args) > 1:
        t, k = value.args[0], value.args[1]
    elif value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[1], int):
        q = value.args[0]
        if not isinstance(q, fx.Node) or not ((q.op == "call_function" and q.target is getattr and q.args[1] == "shape")
                                              or (q.op == "call_method" and q.target == "size" and len(q.args) == 1)):
            return False
        t, k = q.args[0], value.args[1]
    else:
        return False
    info = analysis.infos.get(t.name) if isinstance(t, fx.Node) else None
    shape = t.meta.get("tensor_meta") if isinstance(t, fx.Node) else None
    if not isinstance(info, ChanInfo) or not isinstance(k, int) or shape is None or not hasattr(shape, "shape"):
        return False
    return k % len(shape.shape) == info.dim and _kept_count(analysis, keep, info) < info.atoms.numel()


def _keep_untracked_sizes(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """A reshape of an untracked tensor (its shape does not change) sized by the width of one that thins
    (timm's EdgeNeXt: ``B, N, C = x.shape`` on the stream, then ``attn_out.reshape(B, N, C)``): that size
    becomes the dense literal, which is what the reshape had and still needs."""
    for node in gm.graph.nodes:
        if node.op not in ("call_method", "call_function") or node.target not in _RESHAPES:
            continue
        if isinstance(analysis.infos.get(node.name), ChanInfo):
            continue  # tracked: _rewrite_sizes gives it the kept count
        out = node.meta.get("tensor_meta")
        if out is None or not hasattr(out, "shape") or len(node.args) < 2:
            continue
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        sizes = list(node.args[1] if packed else node.args[1:])
        if len(sizes) != len(out.shape):
            continue
        new = [int(out.shape[k]) if _thinned_width(s, analysis, keep) else s for k, s in enumerate(sizes)]
        if new != sizes:
            node.args = (node.args[0], type(node.args[1])(new)) if packed else (node.args[0], *new)


def _with_size(shape: Any, dim: int, new: int) -> Any:
    """``shape`` with the channel count at ``dim`` replaced by the kept count (-1 is left alone).

    A computed size there is replaced too: it may read the width of another tensor (timm's attention does
    ``B, N, C = x.shape`` on the block input, then ``out.reshape(B, N, C)`` on the attention output, whose
    channels thin differently), and a channel count never depends on the input's shape, so the literal is
    exact for every input."""
    items = list(shape)
    if dim < len(items) and (isinstance(items[dim], fx.Node) or (isinstance(items[dim], int) and items[dim] != -1)):
        items[dim] = new
    return type(shape)(items) if isinstance(shape, tuple) else items


def _outputs_close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_outputs_close, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_close(a[k], b[k]) for k in a)
    return a == b


def _run(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Call ``gm`` on its placeholder values. A graph captured by torch.export takes the model's own
    (possibly keyword, nested) inputs; the interpreter feeds its placeholders directly."""
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        return fx.Interpreter(gm).run(*inputs)
    return gm(*inputs)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _first_divergence(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis,
                      keep: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> str:
    ref, new = _Recorder(compressed), _Recorder(thinned)
    ref.run(*inputs)
    new.run(*inputs)
    for node in compressed.graph.nodes:
        a, b = ref.values.get(node.name), new.values.get(node.name)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        info = analysis.infos.get(node.name)
        if isinstance(info, ChanInfo):
            a = a.index_select(info.dim, _kept(analysis, keep, info.atoms).to(a.device))
        if a.shape != b.shape:
            return f"node '{node.name}' ({node.op} {node.target}): shape {tuple(b.shape)}, expected {tuple(a.shape)}"
        if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            return (f"node '{node.name}' ({node.op} {node.target}): max abs difference "
                    f"{float((a - b).abs().max()):.3g}")
    return "the graph outputs"


def _as_float64(obj: Any) -> Any:
    """A float64 copy of a module, or float64 versions of the floating tensors in a tuple of inputs."""
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj).double()
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in obj)


def _check(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
           inputs: tuple[torch.Tensor, ...]) -> None:
    modes = [(m, m.training) for m in [*compressed.modules(), *thinned.modules()]]
    compressed.eval()
    thinned.eval()
    try:
        with torch.no_grad():
            try:
                expected = _run(compressed, inputs)
            except Exception as exc:  # shapes passed on fake tensors, but real arithmetic refuses the inputs
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs if isinstance(t, torch.Tensor))
                raise ExampleInputError(
                    f"the example inputs ({shapes}) do not run through {type(compressed).__name__}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Pass inputs of the shape, dtype and "
                    "device the model expects.") from exc
            if not _outputs_close(expected, _run(thinned, inputs)):
                # Removing zero channels changes the order of float32 sums; in a deep net with large
                # activations that rounding alone can exceed the tolerance. The same comparison in float64
                # tells rounding (it vanishes) from a wrong model (it does not).
                compressed, thinned, inputs = _as_float64(compressed), _as_float64(thinned), _as_float64(inputs)
                if _outputs_close(_run(compressed, inputs), _run(thinned, inputs)):
                    return
                where = _first_divergence(compressed, thinned, analysis, keep, inputs)
                raise ThinningCheckError(
                    f"the thinned model differs from the compressed model beyond rtol={RTOL}, atol={ATOL} (in float32 "
                    f"and in float64), first at "
                    f"{where}. This is a bug in fxcondensa's channel analysis: please report it with the model; "
                    "meanwhile make the module involved a leaf (thin(..., leaf_modules=[...])) to freeze it.")
    finally:
        for m, mode in modes:
            m.training = mode


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
    ``fxcondensa.records.thin_record(thinned)`` (a ``ThinRecord``).

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
    analysis = analyze(compressed, strict=strict)
    keep = balance_grouped(analysis, ~removable_channels(compressed, analysis))
    thinned = apply_keep(compressed, analysis, keep, inputs)
    if check:
        _check(compressed, thinned, analysis, keep, inputs)
    thinned.meta[META] = ThinRecord(
        # The recipe: which channels stayed (by channel id of the analysis, which is deterministic for an
        # architecture and input shapes). ``rethin`` rebuilds the same thinned graph from it.
        keep=keep.clone(),
        input_shapes=[list(t.shape) if isinstance(t, torch.Tensor) else [] for t in inputs],
        input_dtypes=[str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__
                      for t in inputs],
        groups=[GroupRecord(g.name, tuple(g.producers), int(g.channels.numel()), int(keep[g.channels].sum()),
                            "; ".join(g.frozen)) for g in analysis.groups],
        frozen=analysis.frozen_report(),
        target=graph_record(compressed).target,  # e.g. the FLOP target a scheme searched for, and what it reached
        rule_failures=len(analysis.rule_failures),
        capture=capture_of(compressed),
        notes=capture_notes(compressed),
    )
    for note in capture_notes(compressed):
        warnings.warn(f"thin: {type(model).__name__} was {note}", stacklevel=2)
    return thinned


def apply_keep(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
               inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A thinned copy of ``gm`` that keeps the channels marked in ``keep`` (one bool per channel id)."""
    thinned = _copy_without_annotations(gm)
    _slice_tensors(thinned, analysis, keep)
    _update_modules(thinned, analysis, keep)
    _keep_untracked_sizes(thinned, analysis, keep)
    _rewrite_sizes(thinned, analysis, keep)
    _rewrite_ops(thinned, analysis, keep)
    thinned.graph.lint()
    thinned.recompile()
    propagate_shapes(thinned, inputs, fake=True)
    return thinned


def rethin(model: nn.Module, keep: torch.Tensor, example_inputs: Any, *,
           leaf_modules: Sequence[type[nn.Module]] = (), concrete_args: dict[str, Any] | None = None,
           capture: str = "auto") -> fx.GraphModule:
    """Rebuild the thinned architecture of ``model`` from a recipe (``thin_record(thinned).keep``).

    The values are those of ``model`` sliced; load the thinned weights afterwards. Raises ``ValueError``
    when the recipe does not fit the architecture.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> x = torch.randn(1, 1, 28, 28)
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), x)
        >>> from fxcondensa.records import thin_record
        >>> again = rethin(fxcondensa.models.LeNet5(), thin_record(small).keep, x)
        >>> again.conv1.weight.shape == small.conv1.weight.shape
        True
    """
    split_inputs(example_inputs)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    inputs = graph_inputs(gm, example_inputs)
    analysis = analyze(gm)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (analysis.num_channels,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"the thinning recipe does not fit {type(model).__name__}: it needs a bool tensor of "
                         f"{analysis.num_channels} channels, got {got}")
    return apply_keep(gm, analysis, balance_grouped(analysis, keep), inputs)

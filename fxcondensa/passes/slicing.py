"""Slicing: build the thinned copy of a graph from a keep vector (one bool per channel id).

Every parameter and buffer that carries a channel is cut (indices decided on the CPU from the analysis,
applied on each tensor's device), module size attributes follow through each registry entry's ``resize``,
literal sizes that count channels are rewritten, and ops whose entry has a ``rewrite`` change form. ``thin``
uses it after choosing what to keep and checks the result; the latency model uses it to measure candidates.
"""

from __future__ import annotations

import contextvars
import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..capture.graph import propagate_shapes
from ..capture.records import META
from ..rules import registry
from ..rules.api import ChanInfo, ChannelAnalysis, KeptView, node_shape
from ..rules.indexing import channel_slice_rewrite
from .reference import mask_sliced

__all__ = ["apply_keep", "DEFER_CUTS"]

# Thinning in place (``inplace.py``) cuts the tensors itself, later, one at a time, releasing each dense one as
# its slice replaces it; meanwhile ``apply_keep`` hands it the plan and builds the rest of the copy around it.
DEFER_CUTS: contextvars.ContextVar[Callable[..., None] | None] = contextvars.ContextVar(
    "fxcondensa_defer_cuts", default=None)


def _resolve(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr


def _set_tensor(gm: fx.GraphModule, names: list[str], value: torch.Tensor) -> None:
    """Replace a tensor under all its names by one new object, so that tied weights stay tied."""
    module, attr = _resolve(gm, names[0])
    old = getattr(module, attr)
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
        else value.contiguous()
    put_tensor(gm, names, new)


def put_tensor(root: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Hold ``value`` under each of ``names`` in ``root``: as a parameter where it is one, else as a buffer."""
    for name in names:
        module, attr = _resolve(root, name)
        if isinstance(value, nn.Parameter):
            setattr(module, attr, value)
        else:
            module._buffers[attr] = value


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
        tensors[path] = _cut(current(path), dim, idx)
    for path, value in tensors.items():
        _set_tensor(gm, aliases.get(path, [path]), value)


def _cut(w: torch.Tensor, dim: int, idx: Any) -> torch.Tensor:
    """One step of a slicing plan applied to ``w``."""
    if dim >= 0:
        runs = _runs(idx) if dim > 0 else None
        if runs is not None:  # whole heads: a few blocks copied as they lie
            return torch.cat([w.narrow(dim, start, length) for start, length in runs], dim)
        if dim > 0 and _gathers_faster(w):
            return _gather(w, dim, idx)
        return w.index_select(dim, idx.to(w.device))
    rows, cols, per = idx
    out = w.index_select(0, rows.to(w.device))
    if w.shape[1] == per:  # depthwise-like: each filter's inputs are the kept ones of its group
        index = cols.to(w.device).view(*cols.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
        out = out.gather(1, index)
    return out


# Output elements gathered per block of rows: a block's source rows stay in cache while they are read.
_GATHER_BLOCK = 1 << 18


def _gathers_faster(w: torch.Tensor) -> bool:
    """Scattered indices along an inner dim of a 2-byte CPU tensor (bfloat16, float16): ``index_select``
    there copies element by element at about a fifth of its float32 speed, where ``gather`` blocked by rows
    runs two to three times faster (float32 and wider: no gain, ``index_select`` stays)."""
    return (w.device.type == "cpu" and w.element_size() <= 2 and w.dim() >= 2 and not w.requires_grad
            and _get_current_dispatch_mode() is None)


def _gather(w: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``w.index_select(dim, idx)`` (``dim > 0``) by ``gather`` into one new tensor, a block of rows at a time,
    on ``w``'s bits seen as integers: a float16 gather passes values through float and quiets a signalling
    NaN, an integer one copies every bit as ``index_select`` does."""
    bits = w.view(_BITS[w.element_size()])
    shape = list(w.shape)
    shape[dim] = idx.numel()
    out = torch.empty(shape, dtype=bits.dtype, device=w.device)
    if out.numel() == 0:
        return out.view(w.dtype)
    index = idx.to(w.device).view([-1 if d == dim else 1 for d in range(w.dim())])
    rows = max(1, _GATHER_BLOCK // (out.numel() // shape[0]))
    for start in range(0, shape[0], rows):
        part = bits[start:start + rows]
        torch.gather(part, dim, index.expand(*part.shape[:dim], idx.numel(), *part.shape[dim + 1:]),
                     out=out[start:start + rows])
    return out.view(w.dtype)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# Above this many runs of consecutive indices, one index_select beats copying each run.
_MAX_RUNS = 64


def _runs(idx: torch.Tensor) -> list[tuple[int, int]] | None:
    """``idx`` as (start, length) runs of consecutive indices, or None when there are many (or none).

    An index_select along an inner dim gathers element by element (in bfloat16 a hundred times slower than
    along the first dim); the columns of whole heads lie in a few runs, each copied as one block."""
    if idx.numel() == 0 or idx.device.type != "cpu" or _get_current_dispatch_mode() is not None:
        return None  # under a dispatch mode (fake tensors, a device emulation) the runs cannot be read: gather
    breaks = torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1
    if breaks.numel() >= _MAX_RUNS:
        return None
    bounds = [0, *breaks.tolist(), idx.numel()]
    starts = idx[bounds[:-1]].tolist()
    return [(start, bounds[k + 1] - bounds[k]) for k, start in enumerate(starts)]


def _cutter(gm: fx.GraphModule, plan: list[SliceStep]) -> Any:
    """``cut(name, mask)``: a mask of the tensor ``gm`` holds under ``name`` (any alias) cut as the plan cuts
    that tensor. A dim the mask only repeats (stride 0: the structured schemes' masks are one keep vector
    expanded) stays of size 1, uncut: the result broadcasts to the cut tensor, and a dense copy of the mask
    is never made (cutting it would cost as much as cutting the weight)."""
    canonical = {alias: path for path, names in _aliases(gm).items() for alias in names}
    steps: dict[str, list[SliceStep]] = {}
    for step in plan:
        steps.setdefault(step[0], []).append(step)

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        todo = steps.get(canonical.get(name, name), [])
        if all(dim >= 0 for _path, dim, _idx in todo):  # a tied grouped conv's step needs the whole mask
            t = t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]
        for _path, dim, idx in todo:
            if dim < 0 or t.shape[dim] != 1:
                t = _cut(t, dim, idx)
        return t
    return cut


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
        for rewrite in rule.rewrites() if rule is not None else ():
            rewrite(gm, node, view)


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
            if all(s == p.atoms.numel() for s, p in zip(sizes, info, strict=True)) or (
                    _is_chunk(node) and len(set(sizes)) == 1 and node_arg_int(node, 1, "chunks") == len(sizes)):
                # Nothing went, or a chunk into equal parts that stay equal: the op as written is still
                # exact, and the user's own forward (which calls it) can follow.
                continue
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


def _is_chunk(node: fx.Node) -> bool:
    target = getattr(node.target, "overloadpacket", node.target)
    return target in (torch.chunk, torch.ops.aten.chunk, "chunk")


def node_arg_int(node: fx.Node, pos: int, name: str) -> int | None:
    """An int argument given by position or keyword, else None."""
    value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    shape = node_shape(t)
    if not isinstance(info, ChanInfo) or not isinstance(k, int) or shape is None:
        return False
    return k % len(shape) == info.dim and _kept_count(analysis, keep, info) < info.atoms.numel()


def _keep_untracked_sizes(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """A reshape of an untracked tensor (its shape does not change) sized by the width of one that thins
    (timm's EdgeNeXt: ``B, N, C = x.shape`` on the stream, then ``attn_out.reshape(B, N, C)``): that size
    becomes the dense literal, which is what the reshape had and still needs."""
    for node in gm.graph.nodes:
        if node.op not in ("call_method", "call_function") or node.target not in _RESHAPES:
            continue
        if isinstance(analysis.infos.get(node.name), ChanInfo):
            continue  # tracked: _rewrite_sizes gives it the kept count
        out = node_shape(node)
        if out is None or len(node.args) < 2:
            continue
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        sizes = list(node.args[1] if packed else node.args[1:])
        if len(sizes) != len(out):
            continue
        new = [out[k] if _thinned_width(s, analysis, keep) else s for k, s in enumerate(sizes)]
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


def apply_keep(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
               inputs: tuple[torch.Tensor, ...], *, shapes: bool = True) -> fx.GraphModule:
    """A thinned copy of ``gm`` that keeps the channels marked in ``keep`` (one bool per channel id).

    ``shapes=False`` leaves the copy without shape metadata, for a caller that runs it on real inputs
    anyway and records the shapes there (``thin``'s check): shape propagation on meta tensors costs as
    much as a forward pass on a ResNet-50."""
    thinned = _copy_without_annotations(gm)
    plan = _slice_plan(analysis, keep)
    defer = DEFER_CUTS.get()
    if defer is not None:
        defer(gm, thinned, analysis, plan)
    else:
        _apply_slices(thinned, plan)
        # Masks kept beside the graph (``reference.py``): the cut tensors are masked now, and none is the user's.
        mask_sliced(gm, thinned, _cutter(gm, plan))
    _update_modules(thinned, analysis, keep)
    _keep_untracked_sizes(thinned, analysis, keep)
    _rewrite_sizes(thinned, analysis, keep)
    _rewrite_ops(thinned, analysis, keep)
    thinned.graph.lint()
    thinned.recompile()
    if shapes:
        propagate_shapes(thinned, inputs, fake=True)
    else:
        # The copied shapes are the dense ones (the rewrites above read them): never leave them behind.
        for node in thinned.graph.nodes:
            node.meta.pop("tensor_meta", None)
    return thinned

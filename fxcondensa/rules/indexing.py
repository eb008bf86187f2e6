"""Built-in rules for indexing: ``getitem`` (a split's parts, a module's tuple outputs, tensor slicing and
gathers), ATen's ``index`` and ``slice``. A slice of the channel dim keeps the channels inside its bounds,
which thinning rewrites to the kept counts.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .api import ChanInfo, RuleContext, node_arg, node_shape
from .registry import register_rule

aten = torch.ops.aten

_INT_ARITH = (operator.floordiv, operator.mul, operator.add, operator.sub)  # size arithmetic


def getitem_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``parts[k]`` of a split, ``attn(x, x, x)[0]`` of a module that returns a tuple (the channels its rule
    listed in ``ChannelAnalysis.tuple_outputs``: a MultiheadAttention's output, an LSTM's), or tensor indexing."""
    src, idx = node.args
    found = ctx.analysis.tuple_outputs.get(src.name) if isinstance(src, fx.Node) else None
    if found is not None:
        if idx not in found:  # e.g. the attention weights: unused (checked by the module's rule)
            return ctx.output(node, None, None)
        return ctx.output(node, *found[idx])
    whole = ctx.analysis.infos.get(src.name)
    if isinstance(whole, list):
        part = whole[idx] if isinstance(idx, int) else None
        name = src.name
        if part is None:
            return ctx.unsupported(node, "getitem with a non-integer index on a split")
        return ctx.output(node, part, lambda z, gm: z[name][idx])
    i = ctx.info(src)
    if i is None:
        return ctx.output(node, None, None)
    # Tensor indexing: only plain slices, ints and None on dims other than the channel dim, or one integer
    # index tensor on another dim with every other dim whole (``table[index]``).
    idx_t = idx if isinstance(idx, tuple) else (idx,)
    tensors = [p for p, k in enumerate(idx_t) if isinstance(k, fx.Node)]
    if len(tensors) == 1 and all(k == slice(None) for p, k in enumerate(idx_t) if p != tensors[0]):
        return _gather_rule(ctx, node, src, i, tensors[0], idx_t[tensors[0]])
    # One ``...`` (rotary embeddings' ``x[..., :half]``) is written out, so that the channel dim is counted.
    shape = node_shape(src)
    idx_t = _expand_ellipsis(idx_t, len(shape) if shape is not None else None)
    if idx_t is None or any(not (isinstance(k, (int, slice)) or k is None) for k in idx_t):
        return ctx.unsupported(node, "advanced tensor indexing")
    d_in, d_out = 0, 0
    new_dim = None
    part: slice | None = None
    for k in idx_t:
        if k is None:
            d_out += 1
            continue
        if d_in == i.dim:
            k = _resolved_slice(k)  # ``x[..., : x.shape[-1] // 2]``: the bound of the dense width
            if not (isinstance(k, slice) and k == slice(None)):
                if _channel_range(k, i.atoms.numel()) is None:
                    return ctx.unsupported(node, "indexing along the channel dim (other than a plain x[:, a:b])")
                part = k
            new_dim = d_out
        if isinstance(k, int):
            d_in += 1
        else:
            d_in += 1
            d_out += 1
    if new_dim is None:
        new_dim = i.dim - d_in + d_out
    if part is None:
        return ctx.passthrough(node, src, True, dim=new_dim)
    _channel_slice(ctx, node, src, i, new_dim, _channel_range(part, i.atoms.numel()))



register_rule(operator.getitem, channels=getitem_rule, zeros="custom", cost="none", name="getitem")

def _gather_rule(ctx: RuleContext, node: fx.Node, src: fx.Node, i: ChanInfo, dim: int, index: Any) -> None:
    """``x[:, ..., index]`` with one untracked integer index tensor on ``dim``, every other dim whole (Swin's
    relative position bias ``table[index]``, ``aten.index.Tensor``): the index dim is replaced by the index's
    dims, and each channel on another dim is gathered whole (a zero channel stays zero)."""
    shape = node_shape(index)
    meta = index.meta.get("tensor_meta") if isinstance(index, fx.Node) else None
    if ctx.info(index) is not None or shape is None or meta is None or meta.dtype.is_floating_point \
            or meta.dtype == torch.bool:
        return ctx.unsupported(node, "indexing with a tracked, boolean or unknown index tensor")
    if dim == i.dim:
        return ctx.unsupported(node, "indexing along the channel dim with an index tensor")
    ctx.passthrough(node, src, True, dim=i.dim if i.dim < dim else i.dim - 1 + len(shape))


def aten_index_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``aten.index.Tensor(x, indices)``: what torch.export makes of ``x[index]`` (see ``_gather_rule``)."""
    x, indices = node.args[0], node_arg(node, 1, "indices")
    i = ctx.info(x)
    if i is None:
        return ctx.output(node, None, None)
    given = [p for p, k in enumerate(indices or ()) if k is not None]
    if len(given) != 1:
        return ctx.unsupported(node, "indexing with more than one index tensor")
    _gather_rule(ctx, node, x, i, given[0], indices[given[0]])


register_rule(aten.index, channels=aten_index_rule, zeros="custom", cost="none", name="index (aten)")


def _expand_ellipsis(idx_t: tuple, ndim: int | None) -> tuple | None:
    """``x[..., :k]`` as the explicit ``x[:, :, :, :k]``; None for an index that cannot be written out (two
    ellipses, or an ellipsis without the tensor's shape)."""
    at = [p for p, k in enumerate(idx_t) if k is Ellipsis]
    if not at:
        return idx_t
    used = sum(1 for k in idx_t if k is not None and k is not Ellipsis)
    if len(at) > 1 or ndim is None or used > ndim:
        return None
    return idx_t[:at[0]] + (slice(None),) * (ndim - used) + idx_t[at[0] + 1:]


def _static_int(value: Any, depth: int = 0) -> int | None:
    """The value of integer arithmetic on sizes (``x.shape[-1] // 2``, ``x.size(3) - 1``) in the shapes the graph
    was captured with; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, fx.Node) or depth > 8 or value.op not in ("call_function", "call_method"):
        return None
    t, k = None, None
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2:
        t, k = value.args
    elif value.target is operator.getitem and isinstance(value.args[0], fx.Node):
        q = value.args[0]
        if (q.op == "call_function" and q.target is getattr and q.args[1] == "shape") or (
                q.op == "call_method" and q.target == "size" and len(q.args) == 1):
            t, k = q.args[0], value.args[1]
    elif value.op == "call_function" and value.target in _INT_ARITH and len(value.args) == 2:
        a, b = (_static_int(v, depth + 1) for v in value.args)
        if a is None or b is None or (value.target is operator.floordiv and b == 0):
            return None
        return value.target(a, b)
    shape = node_shape(t)
    if shape is None or not isinstance(k, int) or isinstance(k, bool) or not -len(shape) <= k < len(shape):
        return None
    return int(shape[k])


def _resolved_slice(k: Any) -> Any:
    """A slice whose bounds are computed from sizes, with their values (``_static_int``); anything else as is."""
    if not isinstance(k, slice) or not any(isinstance(b, fx.Node) for b in (k.start, k.stop, k.step)):
        return k
    values = [_static_int(b) if isinstance(b, fx.Node) else b for b in (k.start, k.stop, k.step)]
    return k if any(v is None and isinstance(b, fx.Node) for v, b in zip(values, (k.start, k.stop, k.step),
                                                                          strict=True)) else slice(*values)


def _channel_range(k: Any, width: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a plain slice of the channel dim (``x[:, :k]``, ``x[:, k:]``, step 1), None for
    anything else (a step, an index tensor, a computed bound)."""
    if not isinstance(k, slice) or k.step not in (None, 1):
        return None
    if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in (k.start, k.stop)):
        return None
    start, stop, _ = k.indices(width)
    return start, max(start, stop)


def _channel_slice(ctx: RuleContext, node: fx.Node, src: fx.Node, i: ChanInfo, dim: int,
                   bounds: tuple[int, int]) -> None:
    """A contiguous range of the channels (GhostNet's ``out[:, :c]``, DPN's split of a dense path): the
    output carries those atoms; thinning rewrites the bounds to count kept channels (``channel_slice_rewrite``,
    called by the thinning pass for the nodes listed with ``ctx.rewrite_sizes``, whichever entry wraps this
    rule)."""
    start, stop = bounds
    name = src.name
    ctx.rewrite_sizes(node)
    ctx.output(node, ChanInfo(dim, i.atoms[start:stop]), lambda z, gm: z[name][start:stop])


def _kept_bounds(view: Any, src: fx.Node, start: Any, stop: Any) -> tuple[int, int] | None:
    """The bounds of a channel slice of ``src`` counted in kept channels (the kept ones stay in order, so
    the kept channels of ``[start, stop)`` are again one contiguous range)."""
    kept, width = view.kept_indices(src), view.width(src)
    if kept is None or width is None or width == kept.numel():
        return None
    a, b, _ = slice(start, stop).indices(width)
    return int((kept < a).sum()), int((kept < max(a, b)).sum())


def channel_slice_rewrite(node: fx.Node, view: Any) -> None:
    """Rewrite the bounds of a channel slice (``x[:, a:b]`` or ``aten.slice``) to count kept channels."""
    if node.target is operator.getitem:
        _getitem_rewrite(node, view)
    elif getattr(node.target, "overloadpacket", node.target) is aten.slice:
        _aten_slice_rewrite(node, view)


def _getitem_rewrite(node: fx.Node, view: Any) -> None:
    src, idx = node.args
    i = view.info(src) if isinstance(src, fx.Node) else None
    if i is None:  # not a tracked tensor (a split's tuple, shape arithmetic)
        return
    shape = node_shape(src)
    expanded = _expand_ellipsis(idx if isinstance(idx, tuple) else (idx,), len(shape) if shape is not None else None)
    if expanded is None:
        return
    idx_t = list(expanded)
    d_in = 0
    for pos, k in enumerate(idx_t):
        if k is None:
            continue
        if d_in == i.dim:
            k = _resolved_slice(k)  # a computed bound becomes the literal kept count too
            if isinstance(k, slice) and k != slice(None) and _channel_range(k, i.atoms.numel()) is not None:
                bounds = _kept_bounds(view, src, k.start, k.stop)
                if bounds is not None:
                    idx_t[pos] = slice(*bounds)
                    node.args = (src, tuple(idx_t) if isinstance(idx, tuple) or len(idx_t) > 1 else idx_t[0])
            return
        d_in += 1


def aten_slice_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)``: what torch.export makes of ``x[:, a:b]``."""
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    if i is None or shape is None:
        return ctx.output(node, None, None)
    dim = node_arg(node, 1, "dim", 0) % len(shape)
    k = slice(node_arg(node, 2, "start"), node_arg(node, 3, "end"), node_arg(node, 4, "step", 1))
    if dim != i.dim:
        return ctx.passthrough(node, x, True)
    bounds = _channel_range(k, i.atoms.numel())
    if bounds is None:
        return ctx.unsupported(node, "a strided or computed slice of the channel dim")
    _channel_slice(ctx, node, x, i, i.dim, bounds)


def _aten_slice_rewrite(node: fx.Node, view: Any) -> None:
    x = node.args[0]
    i, shape = view.info(x), node_shape(x)
    if i is None or shape is None or node_arg(node, 1, "dim", 0) % len(shape) != i.dim:
        return
    bounds = _kept_bounds(view, x, node_arg(node, 2, "start"), node_arg(node, 3, "end"))
    if bounds is not None:
        node.args = (x, i.dim, bounds[0], bounds[1], 1)
        node.kwargs = {}


register_rule(aten.slice, channels=aten_slice_rule, zeros="custom", cost="none", name="slice (aten)")


def gather_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.gather(x, dim, index)`` along a dim other than the channel dim, with an index that spans every
    channel: output channel ``c`` reads channel ``c`` of ``x`` only, so channels pass through and a zero one
    stays zero. Thinning selects the kept channels of the index too (``gather_rewrite``)."""
    x, dim, index = node.args[0], node_arg(node, 1, "dim"), node_arg(node, 2, "index")
    i, shape, ishape = ctx.info(x), node_shape(x), node_shape(index)
    if i is None or shape is None or ishape is None or not isinstance(dim, int) or len(ishape) != len(shape) \
            or ctx.info(index) is not None:
        return ctx.unsupported(node, "gather by a tracked or shapeless index, or along a computed dim")
    if dim % len(shape) == i.dim:
        return ctx.unsupported(node, "gather along the channel dim")
    if ishape[i.dim] != shape[i.dim]:
        return ctx.unsupported(node, f"gather whose index spans {ishape[i.dim]} of {shape[i.dim]} channels")
    ctx.passthrough(node, x, True)


def gather_rewrite(gm: fx.GraphModule, node: fx.Node, view: Any) -> None:
    """The index of a thinned gather keeps the rows of the kept channels: ``index.index_select(c, kept)``."""
    x, index = node.args[0], node_arg(node, 2, "index")
    kept, info = view.kept_indices(x), view.info(x)
    if kept is None or kept.numel() == view.width(x) or not isinstance(index, fx.Node):
        return
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    name = f"_kept_{node.name}"
    gm.register_buffer(name, kept.to(device), persistent=False)
    with gm.graph.inserting_before(node):
        keep = gm.graph.get_attr(name)
        picked = gm.graph.call_function(torch.index_select, (index, info.dim, keep))
    if len(node.args) > 2:
        node.args = (*node.args[:2], picked, *node.args[3:])
    else:
        node.kwargs = {**node.kwargs, "index": picked}


register_rule(torch.gather, "gather", aten.gather, channels=gather_rule, zeros="custom", cost="none",
              rewrite=gather_rewrite, name="gather")

"""Built-in rules for ops that move channels without computing on them: reshapes, permutes, cat, split,
reductions over other dims, and shape queries (indexing: ``rules/indexing.py``).

Where the channel dim goes through a general reshape is shape arithmetic (``rules/reshape_map.py``). Ops
that hold literal sizes counting channels (``view``, ``reshape``, ``expand``, ``split``) are marked for the
thinning pass to rewrite.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import nn as fxnn
from .api import ChanInfo, KeptView, RuleContext, node_arg, node_shape
from .indexing import _INT_ARITH, _expand_ellipsis, _resolved_slice
from .registry import register_rule
from .reshape_map import reshape_index, reshape_target

aten = torch.ops.aten

def _cat(ctx: RuleContext, node: fx.Node, tensors: Any, dim: int) -> None:
    shape = node_shape(node)
    if shape is None or not isinstance(tensors, (list, tuple)):
        return ctx.unsupported(node, "cat without shape metadata")
    d = dim % len(shape)
    infos = [ctx.info(t) for t in tensors]
    if any(i is not None and i.dim != d for i in infos):
        # Concatenation along another dim (batch, tokens): the channels of all parts are one.
        tracked = [i for i in infos if i is not None]
        if len(tracked) != len(infos) or len({i.dim for i in tracked}) != 1:
            ctx.freeze_inputs(node, f"cat '{node.name}' joins tensors whose channels cannot be matched")
            return ctx.output(node, None, None)
        for i in tracked[1:]:
            ctx.unite(tracked[0].atoms, i.atoms)
        names = [t.name for t in tensors]
        return ctx.output(node, ChanInfo(tracked[0].dim, tracked[0].atoms),
                        lambda z, gm: torch.stack([z[n] for n in names]).all(0))
    parts, names = [], []
    for t, i in zip(tensors, infos, strict=True):
        if i is None:
            # An untracked part keeps its channels: give it atoms of its own that can never go.
            size = node_shape(t)[d]
            i = ChanInfo(d, ctx.new_channels(size, f"{node.name}.{getattr(t, 'name', 'part')}", "other"))
            ctx.freeze(i.atoms, f"cat '{node.name}' includes '{getattr(t, 'name', t)}', whose channels are not tracked")
            names.append(None)
        else:
            names.append(t.name)
        parts.append(i.atoms)
    sizes = [p.numel() for p in parts]

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return torch.cat([z[n] if n is not None else torch.zeros(s, dtype=torch.bool)
                          for n, s in zip(names, sizes, strict=True)])

    ctx.output(node, ChanInfo(d, torch.cat(parts)), rule)



def cat_rule(ctx: RuleContext, node: fx.Node) -> None:
    _cat(ctx, node, node_arg(node, 0, "tensors"), node_arg(node, 1, "dim", 0))


# rules/embedding.py refines cat with parameter parts (a class token).
register_rule(torch.cat, torch.concat, torch.concatenate, aten.cat, channels=cat_rule, zeros="custom",
              cost="none", name="cat")


def split_rule(ctx: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    i = ctx.info(x)
    shape, out = node_shape(x), node.meta.get("tensor_meta")
    if i is None or shape is None or not isinstance(out, (list, tuple)):
        return ctx.unsupported(node, "split without shape metadata")
    dim = node_arg(node, 2, "dim", 0) % len(shape)
    src = x.name
    if dim != i.dim:
        infos = [ChanInfo(i.dim, i.atoms) for _ in out]
        return ctx.output(node, infos, lambda z, gm: [z[src] for _ in infos])
    sizes = [m.shape[dim] for m in out]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    infos = [ChanInfo(dim, i.atoms[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]
    ctx.rewrite_sizes(node)
    ctx.output(node, infos, lambda z, gm: [z[src][bounds[k]:bounds[k + 1]] for k in range(len(sizes))])



register_rule(torch.split, torch.chunk, "split", "chunk", aten.split, aten.chunk, aten.split_with_sizes,
              channels=split_rule, zeros="custom", cost="none", name="split")


def tensor_split_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.tensor_split(x, sections_or_indices, dim)`` along a dim other than the channel dim: every part
    carries the channels. Along the channel dim its sections or indices would count channels: kept."""
    x = node.args[0]
    i = ctx.info(x)
    shape, out = node_shape(x), node.meta.get("tensor_meta")
    if i is None or shape is None or not isinstance(out, (list, tuple)):
        return ctx.unsupported(node, "tensor_split without shape metadata")
    if node_arg(node, 2, "dim", 0) % len(shape) == i.dim:
        return ctx.unsupported(node, "tensor_split of the channel dim")
    src = x.name
    infos = [ChanInfo(i.dim, i.atoms) for _ in out]
    ctx.output(node, infos, lambda z, gm: [z[src] for _ in infos])


register_rule(torch.tensor_split, "tensor_split", aten.tensor_split, channels=tensor_split_rule, zeros="custom",
              cost="none", name="tensor_split")


def stack_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.stack(tensors, dim)``: a new dim, the channels where they were (one further on when the new dim
    comes before them). The parts' channels are one, as in a cat along another dim; an untracked part that
    has them cannot be sliced with them."""
    tensors, shape = node_arg(node, 0, "tensors"), node_shape(node)
    if shape is None or not isinstance(tensors, (list, tuple)):
        return ctx.unsupported(node, "stack without shape metadata")
    new = node_arg(node, 1, "dim", 0) % len(shape)
    infos = [ctx.info(t) for t in tensors]
    tracked = [i for i in infos if i is not None]
    if len(tracked) != len(infos) or len({i.dim for i in tracked}) != 1:
        ctx.freeze_inputs(node, f"stack '{node.name}' joins tensors whose channels cannot be matched")
        return ctx.output(node, None, None)
    for i in tracked[1:]:
        ctx.unite(tracked[0].atoms, i.atoms)
    d = tracked[0].dim
    names = [t.name for t in tensors]
    ctx.output(node, ChanInfo(d + 1 if new <= d else d, tracked[0].atoms),
               lambda z, gm: torch.stack([z[n] for n in names]).all(0))


register_rule(torch.stack, aten.stack, channels=stack_rule, zeros="custom", cost="none", name="stack")


def no_value(ctx: RuleContext, node: fx.Node) -> None:
    """Checks that produce no tensor (``aten._assert_tensor_metadata`` of dtype and device, which
    torch.export records): nothing flows on. A check of the exact size would fail after thinning, so a
    size check on tracked channels freezes them."""
    if node_arg(node, 1, "size") is not None or node_arg(node, 2, "stride") is not None:
        return ctx.unsupported(node, "a check of the exact tensor size")
    ctx.output(node, None, None)


register_rule(aten._assert_tensor_metadata, channels=no_value, zeros="custom", cost="none",
              name="tensor metadata check")


def new_tensor_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.new_zeros(size)`` (``new_ones``, ``new_full``, ``new_empty``): a new tensor that takes only the
    dtype and device of ``x`` (Swin's shifted-window mask, as torch.export records it), so it carries none
    of ``x``'s channels. A size computed at run time may count them: that freezes them instead."""
    sizes = [*node.args[1:], node.kwargs.get("size")]  # x.new_zeros((a, b)) or, as a method, x.new_zeros(a, b)
    if any(isinstance(k, fx.Node) or (isinstance(k, (list, tuple)) and any(isinstance(j, fx.Node) for j in k))
           for k in sizes):
        return ctx.unsupported(node, f"{_reduction_name(node)} with a size computed at run time")
    ctx.output(node, None, None)


register_rule("new_zeros", "new_ones", "new_full", "new_empty", aten.new_zeros, aten.new_ones, aten.new_full,
              aten.new_empty, channels=new_tensor_rule, zeros="custom", cost="none", name="new tensor")


def reduce_rule(ctx: RuleContext, node: fx.Node) -> None:
    x, dim, keepdim = node.args[0], node_arg(node, 1, "dim"), node_arg(node, 2, "keepdim", False)
    i, shape = ctx.info(x), node_shape(x)
    if dim is None or shape is None:
        return ctx.unsupported(node, "a reduction over all dims")
    dims = [d % len(shape) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    if i.dim in dims:
        ctx.freeze(i.atoms, f"reduction '{node.name}' ({_reduction_name(node)}) runs over the channel dim")
        return ctx.output(node, None, None)
    new_dim = i.dim if keepdim else i.dim - sum(d < i.dim for d in dims)
    ctx.passthrough(node, x, True, dim=new_dim)


def _reduction_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def reduce_cost(c: Any) -> int:
    return c.in_numel


# rules/norms.py refines mean over the channels (it divides by the dense width).
register_rule(torch.mean, "mean", aten.mean, fxnn.mean_width, channels=reduce_rule, zeros="custom", cost=reduce_cost,
              kind="elementwise", name="mean")
register_rule(torch.sum, torch.amax, torch.amin, "sum", "amax", "amin", aten.sum,
              aten.amax, aten.amin, channels=reduce_rule, zeros="custom", cost=reduce_cost, kind="elementwise",
              name="reduction")


def norm_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.norm(p, dim, keepdim)``, ``torch.norm``, ``torch.linalg.vector_norm`` (ConvNeXt-V2's GRN): over
    other dims a per-channel value (zero stays zero for p > 0); over the channel dim a sum of ``|x|^p`` that
    exactly-zero channels do not change, so its input is an exit."""
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    vector = node.target in (torch.linalg.vector_norm, aten.linalg_vector_norm) or \
        getattr(node.target, "overloadpacket", None) is aten.linalg_vector_norm
    p = node_arg(node, 1, "ord" if vector else "p", 2)
    dim = node_arg(node, 2, "dim")
    keepdim = node_arg(node, 3, "keepdim", False)
    if i is None or shape is None:
        return ctx.output(node, None, None)
    if not isinstance(p, (int, float)) or p <= 0 or dim is None:
        return ctx.unsupported(node, f"a norm with p={p!r} over dims {dim!r}")
    dims = [d % len(shape) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    if i.dim in dims:
        ctx.exit(x)
        return ctx.output(node, None, None)
    ctx.passthrough(node, x, True, dim=i.dim if keepdim else i.dim - sum(d < i.dim for d in dims))


register_rule(torch.norm, torch.linalg.vector_norm, "norm", aten.linalg_vector_norm, aten.norm, channels=norm_rule,
              zeros="custom", cost=reduce_cost, kind="elementwise", name="norm")


def _moved(ctx: RuleContext, node: fx.Node) -> tuple[Any, Any, tuple | None, tuple | None]:
    x = node.args[0]
    return x, ctx.info(x), node_shape(x), node_shape(node)


def permute_rule(ctx: RuleContext, node: fx.Node) -> None:
    x, i, src, _ = _moved(ctx, node)
    perm = node_arg(node, 1, "dims")
    perm = list(node.args[1:]) if node.op == "call_method" and not isinstance(perm, (list, tuple)) else perm
    perm = [p % len(src) for p in perm]
    ctx.passthrough(node, x, True, dim=perm.index(i.dim))


def movedim_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.movedim(source, destination)`` permutes dims (ints or sequences of them), never mixes them: the
    channel dim moves to where a tensor with distinct sizes per dim shows its size."""
    x, i, src, _ = _moved(ctx, node)
    probe = torch.empty(tuple(range(2, len(src) + 2)), device="meta")
    moved = probe.movedim(node_arg(node, 1, "source"), node_arg(node, 2, "destination"))
    ctx.passthrough(node, x, True, dim=list(moved.shape).index(i.dim + 2))


def transpose_rule(ctx: RuleContext, node: fx.Node) -> None:
    x, i, src, _ = _moved(ctx, node)
    a, b = node_arg(node, 1, "dim0") % len(src), node_arg(node, 2, "dim1") % len(src)
    ctx.passthrough(node, x, True, dim=b if i.dim == a else a if i.dim == b else i.dim)


def t_rule(ctx: RuleContext, node: fx.Node) -> None:
    x, i, _, _ = _moved(ctx, node)
    ctx.passthrough(node, x, True, dim=1 - i.dim)


def _expand(ctx: RuleContext, node: fx.Node, literal: bool) -> None:
    x, i, src, dst = _moved(ctx, node)
    if literal:  # x.expand(b, c, h, w): a literal channel count must become the kept count
        ctx.rewrite_sizes(node)
    ctx.passthrough(node, x, True, dim=i.dim + len(dst) - len(src))


def expand_rule(ctx: RuleContext, node: fx.Node) -> None:
    _expand(ctx, node, True)


def expand_as_rule(ctx: RuleContext, node: fx.Node) -> None:
    _expand(ctx, node, False)


def _reshape(ctx: RuleContext, node: fx.Node, literal: bool) -> None:
    """Find where the channel dim went from the shapes: split both shapes into blocks of equal element
    counts, then look at the block that holds the channel dim. ``literal``: the call holds sizes that may
    count channels (view, reshape), which the thinning pass rewrites."""
    x, i, src, dst = _moved(ctx, node)
    if src is None or dst is None:
        return ctx.unsupported(node, "a reshape without shape metadata")
    found = reshape_target(src, dst, i.dim, i.atoms)
    if found is None:
        return ctx.unsupported(node, f"reshape {tuple(src)} -> {tuple(dst)} that mixes the channel dim")
    new_dim, atoms = found
    if literal:
        ctx.rewrite_sizes(node)
    name = x.name
    if atoms.numel() == i.atoms.numel() and torch.equal(atoms, i.atoms):
        return ctx.output(node, ChanInfo(new_dim, atoms), lambda z, gm: z[name])
    # Each output index carries one input index's atom: map zero flags the same way.
    index = reshape_index(src, dst, i.dim, new_dim)
    ctx.output(node, ChanInfo(new_dim, atoms), lambda z, gm: z[name][index])


def view_rule(ctx: RuleContext, node: fx.Node) -> None:
    _reshape(ctx, node, True)


def flatten_rule(ctx: RuleContext, node: fx.Node) -> None:
    _reshape(ctx, node, False)


def _rewrite_view(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    """A size of the tracked dim computed at run time (``B, N, C = x.shape`` then ``reshape(B, N, C)``) may
    count another tensor's channels (the stream's, not the heads'): make it the kept count."""
    kept, i = view.kept_count(node), view.info(node)
    # Even when this tensor keeps every channel: the size may count a stream that lost some.
    if kept is None or node.op not in ("call_method", "call_function"):
        return
    args = list(node.args)
    if node.op == "call_method" and len(args) > 2 or (len(args) == 2 and not isinstance(args[1], (list, tuple))):
        sizes, at = args[1:], None
    elif len(args) == 2:
        sizes, at = list(args[1]), 1
    else:
        return
    if i.dim < len(sizes) and isinstance(sizes[i.dim], fx.Node):
        sizes[i.dim] = kept
        if at is None:
            node.args = (args[0], *sizes)
        else:
            node.args = (args[0], type(args[1])(sizes))


register_rule(torch.permute, "permute", aten.permute, channels=permute_rule, zeros="custom", cost="none",
              name="permute")
register_rule(torch.transpose, torch.swapaxes, "transpose", "swapaxes", aten.transpose, channels=transpose_rule,
              zeros="custom", cost="none", name="transpose")
register_rule(torch.movedim, torch.moveaxis, "movedim", "moveaxis", aten.movedim, channels=movedim_rule,
              zeros="custom", cost="none", name="movedim")
register_rule(torch.t, "t", aten.t, channels=t_rule, zeros="custom", cost="none", name="t")
register_rule("expand", aten.expand, channels=expand_rule, zeros="custom", cost="none", name="expand")
register_rule("expand_as", aten.expand_as, channels=expand_as_rule, zeros="custom", cost="none", name="expand_as")
# rules/attention.py refines view / reshape with the split into heads.
register_rule(torch.reshape, "view", "reshape", aten.view, aten.reshape, aten._unsafe_view, channels=view_rule,
              zeros="custom", cost="none", rewrite=_rewrite_view, name="view")
register_rule(torch.flatten, torch.squeeze, torch.unsqueeze, "flatten", "squeeze", "unsqueeze",
              "unflatten", "view_as", "reshape_as", nn.Flatten, nn.Unflatten, aten.flatten, aten.squeeze,
              aten.unsqueeze, aten.unflatten, aten.view_as, aten.reshape_as, channels=flatten_rule, zeros="custom", cost="none",
              name="flatten")


# Size arguments of these calls are read again after thinning, so a channel count that only sizes them is
# harmless.
_SIZE_TAKERS = {"view", "reshape", "expand", "unflatten", torch.reshape, aten.view.default, aten.reshape.default,
                aten.expand.default}


def _sizes_a_reshape(user: fx.Node, value: fx.Node) -> bool:
    """True when ``value`` is only a size argument of a view / reshape / expand (never its tensor)."""
    return user.target in _SIZE_TAKERS and bool(user.args) and user.args[0] is not value


# Integer arithmetic on sizes: ``C // num_heads``, ``C * 3``.


def _arith_sizes_reshapes(user: fx.Node, depth: int = 0) -> bool:
    """True when ``user`` is integer arithmetic whose results (through more arithmetic) only size reshapes:
    timm's ``qkv.reshape(B, N, 3, H, C // H)`` with ``C`` the block input's width (XCiT, VOLO, Swin-V2-CR)."""
    if depth > 4 or user.op != "call_function" or user.target not in _INT_ARITH or not user.users:
        return False
    return all(_sizes_a_reshape(u, user) or _arith_sizes_reshapes(u, depth + 1) for u in user.users)


def shape_query(ctx: RuleContext, node: fx.Node) -> None:
    """``x.size(1)``, ``x.shape``, ``x.numel()``: harmless when the channel count only sizes a reshape (it
    is read again after thinning), wrong to thin when it is used as a number (``x / x.size(1)``)."""
    x = node.args[0]
    ctx.output(node, None, None)
    i, shape = ctx.info(x), node_shape(x)
    if i is None or shape is None:
        return
    what = node.target if node.op == "call_method" else node.args[1]
    if what not in _QUERIES:
        return ctx.unknown(node, f"attribute .{what} of a tensor")
    if what in ("size", "shape"):
        index = node_arg(node, 1, "dim") if node.op == "call_method" else None
        if index is not None:
            counted = [node] if index % len(shape) == i.dim else []
        else:  # the whole size: follow the items that pick the channel dim
            counted = []
            for user in node.users:
                if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                    if user.args[1] % len(shape) == i.dim:
                        counted.append(user)
                elif not _sizes_a_reshape(user, node):
                    counted.append(node)
    elif what in ("numel", "nelement"):
        counted = [node]
    else:  # dim, dtype, device: no channel count in them
        return
    for value in counted:
        for user in value.users:
            # Arithmetic that only sizes reshapes gets the dense width at thinning (``shape_query_rewrite``).
            # (a negative index is left out: the thinned copy has no shapes to resolve it against)
            derived = what in ("size", "shape") and _nonnegative_index(value) and _arith_sizes_reshapes(user)
            bound = what in ("size", "shape") and _bounds_a_channel_slice(user, value, x, i.dim)
            if not (_sizes_a_reshape(user, value) or derived or bound):
                ctx.freeze(i.atoms, f"the channel count of '{x.name}' is used as a number at node '{user.name}'")
                return


def _bounds_a_channel_slice(user: fx.Node, value: fx.Node, x: fx.Node, dim: int, depth: int = 0) -> bool:
    """True when ``value`` (the width of ``x``'s channel dim ``dim``, or integer arithmetic on it) is only a
    bound of slices of that dim of ``x`` itself: rotary embeddings' ``rotate_half`` (``x[..., : x.shape[-1] //
    2]``). The getitem rule reads the bound's dense value and thinning writes it as the literal count of kept
    channels below it (``_getitem_rewrite``), so after thinning the width is no longer used as a number."""
    if depth > 4 or user.op != "call_function":
        return False
    if user.target in _INT_ARITH:
        return bool(user.users) and all(_bounds_a_channel_slice(u, user, x, dim, depth + 1) for u in user.users)
    if user.target is not operator.getitem or user.args[0] is not x:
        return False
    idx, shape = user.args[1], node_shape(x)
    idx_t = _expand_ellipsis(idx if isinstance(idx, tuple) else (idx,), len(shape) if shape is not None else None)
    if idx_t is None:
        return False
    found, d_in = False, 0
    for k in idx_t:
        if k is value or (isinstance(k, slice) and k.step is value):
            return False
        if isinstance(k, slice) and value in (k.start, k.stop):
            if d_in != dim or _resolved_slice(k) is k:
                return False
            found = True
        d_in += k is not None
    return found


def _nonnegative_index(value: fx.Node) -> bool:
    """The dim read by ``x.size(k)`` or ``x.shape[k]`` is given as ``k >= 0``."""
    k = value.args[1] if len(value.args) > 1 else None
    return isinstance(k, int) and k >= 0


def shape_query_rewrite(gm: fx.GraphModule, node: fx.Node, view: Any) -> None:
    """Arithmetic on a thinned width that only sizes reshapes computes from the dense width.

    ``C // H`` is a head width, ``3 * C`` the width of a fused projection: sizes of tensors whose non-channel
    dims do not change when ``C``'s tensor thins. A reshape's channel dim is given its kept count by the
    thinning pass whatever its size argument holds, so every other dim needs its dense size, which the dense
    width gives. A width does not depend on the input's shape, so the constant is exact for every input."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return
    x = node.args[0]
    i, width, kept = view.info(x), view.width(x), view.kept_count(x)
    if i is None or kept == width:
        return
    if node.op == "call_method" and node.target == "size" and len(node.args) > 1:
        values = [node] if node.args[1] == i.dim else []
    elif (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
            node.op == "call_method" and node.target == "size"):
        values = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                  and u.args[1] == i.dim]
    else:
        return
    for value in values:
        for user in list(value.users):
            if _arith_sizes_reshapes(user):
                user.args = tuple(width if a is value else a for a in user.args)
            elif _sizes_a_reshape(user, value) and isinstance(user.args[0], fx.Node) and (
                    view.info(user.args[0]) is None or view.kept_count(user.args[0]) == view.width(user.args[0])):
                # A reshape of a tensor that keeps its width (XCiT's ``attn_out.reshape(B, N, C)`` with whole
                # heads) needs the dense size that ``C`` had.
                user.args = tuple(_dense_size(a, value, width) for a in user.args)


def _dense_size(arg: Any, value: fx.Node, width: int) -> Any:
    """``arg`` with ``value`` replaced by ``width``, inside a packed size list too."""
    if arg is value:
        return width
    if isinstance(arg, (list, tuple)):
        return type(arg)(width if a is value else a for a in arg)
    return arg


_QUERIES = {"size", "dim", "numel", "shape", "dtype", "device", "is_cuda", "ndimension", "nelement", "ndim"}
register_rule(getattr, "size", "dim", "numel", "nelement", "ndimension", channels=shape_query,
              zeros="custom", cost="none", rewrite=shape_query_rewrite, name="shape query")

# Ops that move or repeat channels in ways the analysis does not follow (a shuffle, a new stacked dim):
# known and costed, their channels kept.
register_rule(nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle,
              torch.narrow, "narrow", aten.pixel_shuffle, aten.pixel_unshuffle, aten.narrow,
              channels="freeze", cost="none", name="channel-moving op")


def repeat_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.repeat(B, 1, 1, 1)`` (XCiT's Fourier position encoding tiled over the batch): copies along other
    dims keep every channel a slice of its own; a copy along the channel dim would interleave them."""
    x = node.args[0]
    i, src = ctx.info(x), node_shape(x)
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    sizes = sizes or list(node.kwargs.get("repeats", []))
    if i is None or src is None or len(sizes) < len(src):
        return ctx.unsupported(node, "a repeat without shape metadata")
    dim = i.dim + len(sizes) - len(src)
    if sizes[dim] != 1:  # a literal 1 only: a computed count could be anything
        return ctx.unsupported(node, "a repeat along the channel dim")
    ctx.passthrough(node, x, True, dim=dim)


register_rule("repeat", aten.repeat, channels=repeat_rule, zeros="custom", cost="none", name="repeat")


def roll_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.roll(x, shifts, dims)`` (Swin's shifted windows): a roll over other dims moves whole
    channel slices around, a roll of the channel dim itself (or of the flattened tensor) does not keep them."""
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    dims = node_arg(node, 2, "dims")
    if i is None or shape is None:
        return ctx.output(node, None, None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or any(not isinstance(d, int) for d in dims) or i.dim in [d % len(shape) for d in dims]:
        return ctx.unsupported(node, "a roll of the channel dim (or of the flattened tensor)")
    ctx.passthrough(node, x, True)


register_rule(torch.roll, "roll", aten.roll, channels=roll_rule, zeros="custom", cost="none", name="roll")

"""Built-in rules for attention: the reshape into heads, products of two activations (matmul, bmm),
``F.scaled_dot_product_attention``, ``unbind`` of a fused q/k/v tensor, and ``nn.MultiheadAttention``.

Heads are channels. When a reshape splits the channel dim into ``(..., heads, head_dim)`` (``q.view(B, N,
H, D)``, a fused ``qkv.reshape(B, N, 3, H, D)``), the analysis tracks the heads dim: every index of a head
(its ``head_dim`` slots, and its q/k/v slots in a fused projection) becomes one channel, so a head goes as a
whole or stays. ``permute`` / ``transpose`` carry the heads dim along; ``q @ k.transpose(-2, -1)``, the
softmax over keys and ``attn @ v`` treat it as a batch dim (the products unite q's, k's and v's heads);
the reshape back to ``(B, N, H * D)`` hands each head's ``D`` columns to the out-projection. A head can go
when its value rows are zero (its output then is exactly zero), whatever its query and key rows hold.
Removing heads keeps ``head_dim``, so softmax scales do not change. Grouped-query attention
(``enable_gqa=True``) ties each key/value head to its group of query heads.

head_dim columns are the other way to cut a split: ``analyze(gm, head_dim=True)`` (``thin``'s second stage,
``StructurePrune(attention="head_dim" | "both")``) makes column ``j`` of every head one channel and tracks
the head_dim dim. In ``q @ k^T`` (matmul or SDPA) a q column and the same k column are summed over: united,
both exits, so a column goes when it is zero in q and k and no product changes. v's columns pass through
``attn @ v`` to the out-projection. Every head keeps the same columns, so reshapes stay rectangular (a fused
``reshape(B, N, 3, H, D)`` gives q, k and v one head_dim). The softmax keeps the dense scale: an SDPA call
that left ``scale`` to its default gets ``1 / sqrt(dense head_dim)``, ``ThinMultiheadAttention`` keeps its
``scale``, a literal ``q * 0.125`` is unchanged, and a scale computed from the width at run time
(``q.size(-1) ** -0.5``) freezes the columns with that reason.

Rotary embeddings (Hugging Face's Llama family) go in pairs of columns: ``q * cos + rotate_half(q) * sin``
ties column ``j`` to ``j + D/2`` (``rotate_half``'s slices and cat, whose literal or ``x.shape[-1] // 2``
bounds become kept counts), and the cos/sin tables, computed in forward from the ``inv_freq`` buffer
(``cat((freqs, freqs), -1)``), tie both to frequency ``j mod D/2``: the buffer is sliced with the kept pairs
(``rules/elementwise.py``'s ``track_buffer_table``). One ``inv_freq`` shared by every layer makes a pair of
all layers one channel. A rotary the rules cannot follow (interleaved pairs: strided slices, ``stack``,
``repeat_interleave``) keeps q's and k's columns whole, with the reason.

``nn.MultiheadAttention`` (a leaf module) is thinned per head the same way and replaced by
``fxcondensa.nn.ThinMultiheadAttention`` (same arithmetic, its own head count and widths).

Swin: timm's window attention is traced op by op; its relative position bias table, gathered by an integer
index buffer (``table[index].view(N, N, -1).permute(2, 0, 1)``), is added to the logits, so the table's
column follows its head (``rules/elementwise.py``'s ``track_parameter_chain``, ``rules/shapes.py``'s gather),
and the shifted-window mask's literal head count is rewritten. torchvision's ``shifted_window_attention`` is
one call with its own rule, in ``rules/swin.py`` (heads, or head_dim columns; Swin V2 keeps its heads: its
bias comes from an MLP and a per-head logit scale), and is replaced by ``fxcondensa.nn.window_attention``
with the dense scale.

The split into heads refines the reshape entry of ``rules/shapes.py`` (``refine_rule``): every other
reshape goes on to that entry unchanged, which also rewrites literal or computed sizes of the heads' merged
width to the kept count.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import nn as fxnn
from . import elementwise, shapes  # noqa: F401  (registered first: the view entry refined here is shapes')
from .api import ChanInfo, KeptView, RuleContext, host, node_arg, node_shape
from .api import tensor_at as _tensor
from .heads import attention_product
from .layers import computed_weight_matmul, fused_heads_zero, matmul_creates, matmul_linear, zero_rows
from .registry import CostCall, CostTerm, Scale, refine_rule, register_rule, rule_for
from .reshape_map import reshape_target

aten = torch.ops.aten

def _matmul_cost(c: CostCall) -> int:
    a = c.in_shapes[0] if c.in_shapes else None
    return c.out_numel * (a[-1] if a else 0)


def _addmm_cost(c: CostCall) -> tuple[CostTerm, ...]:
    """``addmm(bias, x, weight)``: the bias comes first, the MACs sum over the second argument's channels."""
    a = c.in_shapes[1] if len(c.in_shapes) > 1 else None
    return (CostTerm(c.out_numel * (a[-1] if a else 0), (Scale(c.node), Scale(c.arg(1, "mat1")))),)


def _baddbmm_cost(c: CostCall) -> tuple[CostTerm, ...]:
    a = c.in_shapes[1] if len(c.in_shapes) > 1 else None
    return (CostTerm(c.out_numel * (a[-1] if a else 0), (Scale(c.node), Scale(c.arg(1, "batch1"), "last"))),)


def _sdpa_cost(c: CostCall) -> tuple[CostTerm, ...]:
    """``q @ k^T`` over q's head_dim (the query's heads and columns), then ``attn @ v`` producing v's head_dim
    (the query's heads, the value's columns): head_dim pruning can leave v with another column count than
    q and k."""
    q_node, v_node = c.arg(0, "query"), c.arg(2, "value")
    q, k, v = c.shape_of(q_node), c.shape_of(c.arg(1, "key")), c.shape_of(v_node)
    v = v or q
    if not q or not k or len(q) < 2:
        return ()
    rows = math.prod(q[:-1]) * k[-2]
    return (CostTerm(rows * q[-1], (Scale(q_node),)),
            CostTerm(rows * v[-1], (Scale(q_node, "lead"), Scale(v_node, "last"))))


# ----------------------------------------------------------------------------------- reshape into heads

def _head_split(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> tuple[int, tuple[int, ...]] | None:
    """When ``dst`` only splits dim ``dim`` of ``src`` into two or more dims, (first split dim, split sizes)."""
    k = len(dst) - len(src) + 1
    if k < 2 or tuple(src[:dim]) != tuple(dst[:dim]) or tuple(src[dim + 1:]) != tuple(dst[dim + k:]):
        return None
    sizes = tuple(dst[dim:dim + k])
    return (dim, sizes) if math.prod(sizes) == src[dim] and all(s > 1 for s in sizes[-2:]) else None


def _single_head(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> bool:
    """``dst`` is ``src`` with a size-1 dim inserted just before dim ``dim`` (wider than 1): the view that gives
    the one key/value head of multi-query attention its heads dim, ``(B, T, d) -> (B, T, 1, d)``."""
    return (len(dst) == len(src) + 1 and src[dim] > 1 and tuple(dst[:dim]) == tuple(src[:dim])
            and dst[dim] == 1 and tuple(dst[dim + 1:]) == tuple(src[dim:]))


# How far (in layout ops: transpose, permute, reshape, expand, contiguous, ...) a single-head view may sit
# from the attention product it feeds.
_ATTENTION_REACH = 8


def _feeds_attention(ctx: RuleContext, node: fx.Node) -> bool:
    """Whether ``node``'s value reaches a matmul or scaled_dot_product_attention through layout ops only.

    A view that inserts a size-1 dim is a head split only when an attention consumes it; elsewhere (a
    broadcast, a norm's statistics) it stays an unsqueeze. The attention ops are ``head_channels``'s; layout ops
    are matched by their registry entry's kind."""
    frontier, seen = [node], {node}
    for _ in range(_ATTENTION_REACH):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                if attention_product(user):
                    return True
                rule = rule_for(user, ctx.modules.get(user.target) if user.op == "call_module" else None)
                if rule is None:
                    continue
                if rule.kind in ("shape", "elementwise") and rule.channels is not None:
                    nxt.append(user)
        frontier = nxt
    return False


def heads_view(ctx: RuleContext, node: fx.Node) -> bool:
    """A reshape that splits the channel dim into ``(..., heads, head_dim)``: one head is one channel (with
    ``head_dim=True``, column ``j`` of every head is). Every other reshape goes on to the view entry of
    ``rules/shapes.py`` (False)."""
    x = node.args[0]
    i, src, dst = ctx.info(x), node_shape(x), node_shape(node)
    if i is None or src is None or dst is None:
        return False
    if ctx.analysis.head_dim and _single_head(src, dst, i.dim) and _feeds_attention(ctx, node):
        # Multi-query attention: its one key/value head's columns pair with every query head's, as a split
        # into two or more heads would make them (below); without this they stayed plain channels, and the
        # value columns the scheme zeroed stayed in the thinned model.
        _split_head_dim(ctx, node, x, i, i.dim, (1, src[i.dim]))
        return True
    if reshape_target(src, dst, i.dim, i.atoms) is not None:
        return False
    found = _head_split(src, dst, i.dim)
    if found is None:
        return False
    first, sizes = found
    if ctx.analysis.head_dim:
        _split_head_dim(ctx, node, x, i, first, sizes)
        return True
    heads_at = len(sizes) - 2  # (..., heads, head_dim): the second to last split dim counts heads
    grid = i.atoms.view(sizes).movedim(heads_at, 0).reshape(sizes[heads_at], -1)
    for col in range(1, grid.shape[1]):  # one head, all its slots, is one channel
        ctx.unite(grid[:, 0], grid[:, col])
    ctx.rewrite_sizes(node)
    name, per = x.name, grid.shape[1]

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return z[name].view(sizes).movedim(heads_at, 0).reshape(-1, per).all(1)

    ctx.output(node, ChanInfo(first + heads_at, grid[:, 0].clone()), rule)
    return True


refine_rule(torch.reshape, "view", "reshape", aten.view, aten.reshape, aten._unsafe_view, channels=heads_view,
            name="split into heads")


def _split_head_dim(ctx: RuleContext, node: fx.Node, x: fx.Node, i: ChanInfo, first: int,
                    sizes: tuple[int, ...]) -> None:
    """The split into ``(..., heads, head_dim)`` with head_dim columns as channels: column ``j`` of every
    head (and of q, k and v in a fused projection, whose one reshape needs one head_dim) is one channel, so
    that every head keeps the same columns and the reshape stays rectangular. The tracked dim is head_dim."""
    d = sizes[-1]
    grid = i.atoms.view(sizes).reshape(-1, d)  # one row per (q/k/v slot, head)
    if grid.shape[0] > 1:
        ctx.unite(grid[0].repeat(grid.shape[0] - 1), grid[1:].flatten())
    ctx.rewrite_sizes(node)
    columns = grid[0].clone()
    ctx.analysis.head_dim_atoms.append(columns)
    name = x.name

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return z[name].view(sizes).reshape(-1, d).all(0)

    ctx.output(node, ChanInfo(first + len(sizes) - 1, columns), rule)


# ------------------------------------------------------------------------------------------------ unbind

def unbind_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``qkv.unbind(0)``: along a dim other than the channel dim, every part carries the channels."""
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    dim = node_arg(node, 1, "dim", 0)
    if i is None or shape is None or not isinstance(dim, int):
        return ctx.unsupported(node, "unbind without shape metadata")
    dim %= len(shape)
    if dim == i.dim:
        return ctx.unsupported(node, "unbind along the channel dim")
    part = ChanInfo(i.dim - (i.dim > dim), i.atoms)
    name, n = x.name, shape[dim]
    ctx.output(node, [part] * n, lambda z, gm: [z[name]] * n)


register_rule(torch.unbind, "unbind", aten.unbind, channels=unbind_rule, zeros="custom", cost="none",
              name="unbind")


# ------------------------------------------------------------------------------------------------ matmul

def matmul_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``a @ b`` with ``a: (..., n, k)`` and ``b: (..., k, m)``. Channels on a batch dim of both (attention
    heads) are united and carried; on the rows of ``a`` or the columns of ``b`` alone they are carried; on
    the contracted dim of both they are united and both operands are exits."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if matmul_linear(ctx, node, a, b):  # x @ W.T with a parameter W: a linear layer
        return None
    sa, sb, so = node_shape(a), node_shape(b), node_shape(node)
    ia, ib = ctx.info(a), ctx.info(b)
    if ia is None and ib is None:  # visited for the linear case only (the entry creates channels)
        return computed_weight_matmul(ctx, node, b)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        return ctx.unsupported(node, "matmul of vectors or without shape metadata")
    na, nb, no = len(sa), len(sb), len(so)
    da = None if ia is None else ia.dim + no - na  # in output coordinates
    db = None if ib is None else ib.dim + no - nb
    batch = no - 2
    names = (a.name if ia is not None else None, b.name if ib is not None else None)

    def operand_broadcast(s: tuple[int, ...], d: int) -> bool:
        k = d - (no - len(s))
        return k < 0 or s[k] == 1

    if ia is not None and ib is not None:
        if da == db and da < batch:  # heads: a batch dim of both
            ctx.unite(ia.atoms, ib.atoms)
            return ctx.output(node, ChanInfo(da, ia.atoms), lambda z, gm: z[names[0]] | z[names[1]])
        if ia.dim == na - 1 and ib.dim == nb - 2:  # the contracted dim
            ctx.unite(ia.atoms, ib.atoms)
            ctx.exit(a)
            ctx.exit(b)
            return ctx.output(node, None, None)
        ctx.freeze_inputs(node, f"matmul '{node.name}' combines channels on dims it cannot match")
        return ctx.output(node, None, None)
    tracked, name, other_shape = (ia, names[0], sb) if ia is not None else (ib, names[1], sa)
    d = da if ia is not None else db
    rows_of_a = ia is not None and ia.dim == na - 2
    cols_of_b = ib is not None and ib.dim == nb - 1
    if (d < batch and operand_broadcast(other_shape, d)) or rows_of_a or cols_of_b:
        return ctx.output(node, ChanInfo(d, tracked.atoms), lambda z, gm: z[name])
    ctx.freeze(tracked.atoms, f"matmul '{node.name}' contracts or broadcasts channels against an untracked operand")
    return ctx.output(node, None, None)


register_rule(torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm", "__matmul__", aten.matmul, aten.bmm,
              channels=matmul_rule, zeros="custom", cost=_matmul_cost, kind="matmul", creates=matmul_creates,
              name="matmul")
register_rule(torch.mm, "mm", aten.mm, channels="freeze", cost=_matmul_cost, kind="matmul", name="mm")
def addmm_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.addmm(bias, x, weight)`` with parameter ``bias`` (out,) and ``weight`` (in, out): a linear layer
    written the other way round (Hugging Face's ``Conv1D`` in GPT-2)."""
    bias, x, weight = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("mat2")
    wpath = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    bpath = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
    extra = {k: node_arg(node, j, k, 1) for j, k in ((3, "beta"), (4, "alpha"))}
    if wpath is None or bpath is None or ctx.param(wpath) is None or extra != {"beta": 1, "alpha": 1} \
            or ctx.param(bpath) is None or ctx.param(bpath).dim() != 1:
        return ctx.unsupported(node, "addmm with computed operands or scale factors")
    i = ctx.info(x)
    if i is not None and i.dim != 1:
        return ctx.unsupported(node, "addmm whose rows carry the channels")
    if i is not None:
        ctx.slice_param(wpath, 0, i.atoms, "consumer", node)
        ctx.exit(x)
    else:
        ctx.block(wpath, 0, node)
    out = ctx.new_channels(ctx.param(wpath).shape[1], wpath.rsplit(".", 1)[0] or node.name, "linear")
    ctx.slice_param(wpath, 1, out, "producer", node)
    ctx.slice_param(bpath, 0, out, "bias", node)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return zero_rows(_tensor(gm, wpath), 1) & host(_tensor(gm, bpath) == 0)

    ctx.output(node, ChanInfo(1, out), rule)


register_rule(torch.addmm, aten.addmm, channels=addmm_rule, zeros="custom", cost=_addmm_cost, kind="linear",
              creates=True, name="addmm")
register_rule(torch.baddbmm, torch.addbmm, aten.baddbmm, aten.addbmm, channels="freeze", cost=_baddbmm_cost, kind="matmul", name="addmm (batched)")


# -------------------------------------------------------------------------- scaled_dot_product_attention

def sdpa_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` with
    heads tracked on the same batch dim of q, k and v: whole heads (with grouped-query attention, whole
    key/value heads with their query groups)."""
    q, k, v = (node_arg(node, j, n) for j, n in enumerate(("query", "key", "value")))
    iq, ik, iv = ctx.info(q), ctx.info(k), ctx.info(v)
    shapes_ = [node_shape(t) for t in (q, k, v)]
    if any(s is None for s in shapes_) or any(i is None for i in (iq, ik, iv)):
        return ctx.unsupported(node, "scaled_dot_product_attention with untracked q, k or v")
    nd = len(shapes_[0])
    dims = {i.dim + nd - len(s) for i, s in zip((iq, ik, iv), shapes_, strict=True)}
    if dims == {nd - 1}:
        return _sdpa_head_dim(ctx, node, (q, k, v), (iq, ik, iv), nd)
    if len(dims) != 1 or dims.pop() >= nd - 2:
        return ctx.unsupported(node, "scaled_dot_product_attention with channels on the sequence or head_dim dims")
    mask = node_arg(node, 3, "attn_mask")
    ms = node_shape(mask) if isinstance(mask, fx.Node) else None
    if ms is not None:
        k_ = iq.dim - (nd - len(ms))
        if ctx.info(mask) is not None or (k_ >= 0 and ms[k_] != 1):
            return ctx.unsupported(node, "scaled_dot_product_attention with a per-head mask")
    ctx.unite(ik.atoms, iv.atoms)
    hq, hkv = iq.atoms.numel(), ik.atoms.numel()
    if hq == hkv:
        ctx.unite(iq.atoms, ik.atoms)
    elif node_arg(node, 7, "enable_gqa", False) and hq % hkv == 0:
        groups = iq.atoms.view(hkv, hq // hkv)
        for g in range(groups.shape[1]):
            ctx.unite(groups[:, g], ik.atoms)
    else:
        return ctx.unsupported(node, f"scaled_dot_product_attention with {hq} query and {hkv} key heads")
    vname, rep = v.name, hq // hkv
    ctx.output(node, ChanInfo(iq.dim, iq.atoms), lambda z, gm: z[vname].repeat_interleave(rep))


def _sdpa_head_dim(ctx: RuleContext, node: fx.Node, qkv: tuple[fx.Node, ...], infos: tuple[ChanInfo, ...],
                   nd: int) -> None:
    """SDPA with head_dim columns tracked on the last dim of q, k and v. A column of q pairs with the same
    column of k in ``q @ k^T``, which sums over them: they are one channel and both are exits (it goes when
    it is zero in q and k, which changes no product). v's columns pass to the output, each output row being
    a softmax-weighted sum of v's rows. The softmax scale is rewritten to the dense one (``_rewrite_sdpa``)."""
    (q, k, v), (iq, ik, iv) = qkv, infos
    mask = node_arg(node, 3, "attn_mask")
    if ctx.info(mask) is not None or iq.atoms.numel() != ik.atoms.numel():
        return ctx.unsupported(node, "scaled_dot_product_attention with a tracked mask or different q and k head_dim")
    ctx.unite(iq.atoms, ik.atoms)
    ctx.exit(q)
    ctx.exit(k)
    vname = v.name
    ctx.output(node, ChanInfo(nd - 1, iv.atoms), lambda z, gm: z[vname])


def _rewrite_sdpa(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    """Fewer head_dim columns must not change the softmax scale: a call that left ``scale`` to its default
    (``1 / sqrt(q.shape[-1])``, read at run time) gets the dense model's value. An explicit scale (Hugging
    Face passes ``scale=self.scaling``) is a number that thinning does not touch."""
    q = node_arg(node, 0, "query")
    i, shape = view.info(q), node_shape(q)
    if i is None or shape is None or i.dim != len(shape) - 1 or view.kept_count(q) == shape[-1]:
        return
    if node_arg(node, 6, "scale") is not None:
        return
    scale = fxnn.default_scale(shape[-1])
    if len(node.args) > 6:
        node.args = (*node.args[:6], scale, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "scale": scale}


register_rule(F.scaled_dot_product_attention, aten.scaled_dot_product_attention, channels=sdpa_rule,
              zeros="custom", cost=_sdpa_cost, kind="matmul", rewrite=_rewrite_sdpa,
              name="scaled_dot_product_attention")


# ---------------------------------------------------------------------------------- MultiheadAttention

def _mha_paths(target: str, m: nn.Module) -> tuple[str, str | None, str, str | None]:
    """In-projection weight and bias, out-projection weight and bias of an ``nn.MultiheadAttention`` or a
    ``ThinMultiheadAttention`` at ``target`` (a bias that is None has no path)."""
    if isinstance(m, fxnn.ThinMultiheadAttention):
        return (f"{target}.in_proj_weight", f"{target}.in_proj_bias" if m.in_proj_bias is not None else None,
                f"{target}.out_weight", f"{target}.out_bias" if m.out_bias is not None else None)
    return (f"{target}.in_proj_weight", f"{target}.in_proj_bias" if m.in_proj_bias is not None else None,
            f"{target}.out_proj.weight", f"{target}.out_proj.bias" if m.out_proj.bias is not None else None)


def mha_module(ctx: RuleContext, node: fx.Node) -> None:
    """Self-attention through ``nn.MultiheadAttention``: input columns of the in-projection follow the
    input's channels, heads are channels of their own (q, k, v rows and out-projection columns of one
    head), the out-projection rows are new channels. The attention weights must not be used. With
    ``head_dim=True`` the head_dim columns are the channels instead (``_mha_columns``); a
    ``ThinMultiheadAttention`` (heads thinned by the first stage) is thinned that way too."""
    m = ctx.module(node)
    thinned = isinstance(m, fxnn.ThinMultiheadAttention)
    q, k, v = (node_arg(node, j, n) for j, n in enumerate(("query", "key", "value")))
    x = q
    what = f"{'fxcondensa.nn.ThinMultiheadAttention' if thinned else 'nn.MultiheadAttention'} '{node.target}'"
    weights_used = any(not (u.op == "call_function" and u.target is operator.getitem
                            and (u.args[1] == 0 or (u.args[1] == 1 and not u.users))) for u in node.users)
    reason = None
    if thinned and not ctx.analysis.head_dim:
        reason = "has its heads thinned already"
    elif not (q is k is v):
        reason = "is not self-attention (query, key and value differ)"
    elif not getattr(m, "_qkv_same_embed_dim", True) or getattr(m, "bias_k", None) is not None \
            or getattr(m, "add_zero_attn", False):
        reason = "has separate k/v dims, bias_k/bias_v or add_zero_attn"
    elif weights_used:
        reason = "returns attention weights that are used"
    else:
        mask = node_arg(node, 5, "attn_mask")
        ms = node_shape(mask) if isinstance(mask, fx.Node) else None
        if ms is not None and len(ms) == 3:
            reason = "has a per-head attention mask"
        elif node_arg(node, 7, "is_causal", False):
            reason = "is called with is_causal=True"
    i = ctx.info(x)
    shape = node_shape(x)
    if i is not None and (shape is None or i.dim != len(shape) - 1):
        reason = reason or f"reads channels on dim {i.dim}"
    target = str(node.target)
    h = m.num_heads
    d = m.head_dim if thinned else m.embed_dim // h
    in_w, in_b, wpath, bpath = _mha_paths(target, m)
    if reason is not None:  # untracked output: whatever it is added to keeps its channels too
        if i is not None:
            ctx.freeze(i.atoms, f"{what} {reason}")
        return ctx.output(node, None, None)
    if ctx.analysis.head_dim:
        own, own_zero = _mha_columns(ctx, node, (in_w, in_b, wpath), h, d)
    else:
        own = ctx.new_channels(h, f"{target} (heads)", "linear")
        rows = own.repeat_interleave(d)
        ctx.slice_param(in_w, 0, rows.repeat(3), "producer", node)
        if in_b is not None:
            ctx.slice_param(in_b, 0, rows.repeat(3), "bias", node)
        ctx.slice_param(wpath, 1, rows, "consumer", node)

        def own_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            return fused_heads_zero(gm, in_w, in_b, wpath, h, d)

    out = ctx.new_channels(ctx.param(wpath).shape[0], target, "linear")  # after the heads: recipes keep ids
    if i is not None:
        ctx.slice_param(in_w, 1, i.atoms, "consumer", node)
        ctx.exit(x)
    else:
        ctx.block(in_w, 1, node)
    ctx.slice_param(wpath, 0, out, "producer", node)
    if bpath is not None:
        ctx.slice_param(bpath, 0, out, "bias", node)

    def out_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        zero = zero_rows(_tensor(gm, wpath), 0)
        return zero & host(_tensor(gm, bpath) == 0) if bpath is not None else zero

    # The node's own channels are its heads or head_dim columns (the tuple it returns carries no tensor dim
    # of them): the node is their exit, so one goes only when it adds nothing. ``output[0]`` carries the
    # out-projection's channels (see ``shapes.getitem_rule``).
    ctx.output(node, ChanInfo(0, own), own_zero)
    ctx.exit(node)
    ctx.analysis.tuple_outputs[node.name] = {0: (ChanInfo(len(shape) - 1, out), out_zero)}


def _mha_columns(ctx: RuleContext, node: fx.Node, paths: tuple[str, str | None, str], h: int,
                 d: int) -> tuple[torch.Tensor, Any]:
    """The head_dim columns of a MultiheadAttention as channels: column ``j`` is row ``j`` of every head of
    q, k and v (one fused reshape: one head_dim) and column ``j`` of every head in the out-projection.
    Removing it is exact when q or k is zero there (no product of ``q @ k^T`` changes) and v or the
    out-projection is zero there (the head's output there adds nothing). The thinned module keeps the
    dense softmax scale (``_rewrite_mha``)."""
    in_w, in_b, wpath = paths
    target = str(node.target)
    cols = ctx.new_channels(d, f"{target} (head_dim)", "linear")
    ctx.analysis.head_dim_atoms.append(cols)
    ctx.slice_param(in_w, 0, cols.repeat(3 * h), "producer", node)
    if in_b is not None:
        ctx.slice_param(in_b, 0, cols.repeat(3 * h), "bias", node)
    ctx.slice_param(wpath, 1, cols.repeat(h), "consumer", node)
    e = h * d

    def zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        w = _tensor(gm, in_w).detach()
        b = _tensor(gm, in_b).detach() if in_b is not None else None

        def part(s: int) -> torch.Tensor:  # per column: zero in every head of q (0), k (1) or v (2)
            found = zero_rows(w[s * e:(s + 1) * e].reshape(h, d, -1).transpose(0, 1).reshape(d, -1), 0)
            if b is not None:
                found &= zero_rows(b[s * e:(s + 1) * e].reshape(h, d).t(), 0)
            return found

        out = zero_rows(_tensor(gm, wpath).detach().reshape(-1, h, d).permute(2, 0, 1).reshape(d, -1), 0)
        return (part(0) | part(1)) & (part(2) | out)

    return cols, zero


def _rewrite_mha(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    m = gm.get_submodule(node.target)
    if isinstance(m, fxnn.ThinMultiheadAttention):  # already thin: head_dim columns may have gone (its scale stays)
        m.head_dim = m.in_proj_weight.shape[0] // (3 * m.num_heads)
        return
    d = m.head_dim
    heads = m.in_proj_weight.shape[0] // (3 * d)
    if view.analysis.head_dim:  # every head stays, with fewer columns and the dense softmax scale
        heads, d = m.num_heads, m.in_proj_weight.shape[0] // (3 * m.num_heads)
    if heads == m.num_heads and d == m.head_dim and m.in_proj_weight.shape[1] == m.embed_dim \
            and m.out_proj.weight.shape[0] == m.embed_dim:
        return
    new = fxnn.ThinMultiheadAttention(m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias,
                                      num_heads=heads, head_dim=d, scale=fxnn.default_scale(m.head_dim),
                                      batch_first=m.batch_first)
    new.train(m.training)
    owner, _, attr = str(node.target).rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, attr, new)


def _mha_cost(c: CostCall) -> tuple[CostTerm, ...]:
    """``tokens * (3 * inner * e_in + inner * e_out + 2 * seq * inner)``: the in-projection, the
    out-projection and the two attention products. The inner width (heads x head_dim, the in-projection's
    rows) scales all three, the input channels the in-projection, the output channels the out-projection."""
    m = c.module
    x_node = c.node.args[0] if c.node.args else None
    x = c.shape_of(x_node)
    if x is None or m is None:
        return ()
    tokens = math.prod(x[:-1])
    seq = x[1] if getattr(m, "batch_first", False) else x[0]
    if isinstance(m, fxnn.ThinMultiheadAttention):
        inner, e_in, e_out = m.num_heads * m.head_dim, m.in_proj_weight.shape[1], m.out_weight.shape[0]
    else:
        inner, e_in, e_out = m.embed_dim, m.in_proj_weight.shape[1], m.out_proj.weight.shape[0]
    rows = Scale(f"{c.node.target}.in_proj_weight", 0)
    out = next((u for u in c.node.users if u.target is operator.getitem and u.args[1] == 0), None)
    return (CostTerm(tokens * 3 * inner * e_in, (rows, Scale(x_node))),
            CostTerm(tokens * inner * e_out, (rows, Scale(out))),
            CostTerm(tokens * 2 * seq * inner, (rows,)))


register_rule(nn.MultiheadAttention, channels=mha_module, zeros="custom", cost=_mha_cost, kind="matmul",
              rewrite=_rewrite_mha, creates=True, name="multihead_attention")
register_rule(fxnn.ThinMultiheadAttention, channels=mha_module, zeros="custom", cost=_mha_cost, kind="matmul",
              rewrite=_rewrite_mha, creates=True, name="multihead_attention (thinned)")

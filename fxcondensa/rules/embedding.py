"""Built-in rules for embeddings: ``nn.Embedding`` width as channels, and parameters written into a stream
by concatenation (a ViT's class token, ``torch.cat([cls_token.expand(B, -1, -1), x], dim=1)``).

An embedding table's columns are the channels it creates; an output head tied to it (the same tensor as
``lm_head.weight``) slices the same columns, so the tied pair stays one tensor. A parameter concatenated
along the tokens dim with a tracked stream carries the stream's channels: it is sliced with them (and
zeroed with them by the structured schemes, like a bias).

That case refines the ``cat`` entry of ``rules/shapes.py`` (``refine_rule``); every other call goes on to
that entry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import shapes  # noqa: F401  (registered first: the cat entry refined here is shapes')
from .api import ChanInfo, RuleContext, node_arg, node_shape
from .api import tensor_at as _tensor
from .layers import zero_rows
from .registry import CostCall, refine_rule, register_rule, rule_for_key

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------- embedding

def embedding_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    ids = node.args[0]
    if ctx.info(ids) is not None:
        return ctx.unsupported(node, f"nn.Embedding '{node.target}' indexed by a tracked tensor")
    path = f"{node.target}.weight"
    out = ctx.new_channels(m.embedding_dim, str(node.target), "linear")
    ctx.slice_param(path, 1, out, "producer", node)
    shape = node_shape(node)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return zero_rows(_tensor(gm, path), 1)

    ctx.output(node, ChanInfo(len(shape) - 1 if shape else 1, out), rule)


def embedding_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.embedding(input, weight)`` and ``aten.embedding(weight, indices)`` (what ``torch.export``
    captures) with a parameter table."""
    aten_form = node.target is aten.embedding or getattr(node.target, "overloadpacket", None) is aten.embedding
    weight, ids = (node.args[0], node.args[1]) if aten_form else (node_arg(node, 1, "weight"), node.args[0])
    path = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    if path is None or ctx.param(path) is None:
        return ctx.unsupported(node, "embedding with a computed table")
    if ctx.info(ids) is not None:
        return ctx.unsupported(node, "embedding indexed by a tracked tensor")
    out = ctx.new_channels(ctx.param(path).shape[1], path.rsplit(".", 1)[0] or node.name, "linear")
    ctx.slice_param(path, 1, out, "producer", node)
    shape = node_shape(node)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return zero_rows(_tensor(gm, path), 1)

    ctx.output(node, ChanInfo(len(shape) - 1 if shape else 1, out), rule)


def _resize_embedding(m: nn.Module, cin: int | None) -> None:
    m.embedding_dim = m.weight.shape[1]


def _embedding_cost(c: CostCall) -> int:
    return 0  # a table lookup: no multiply-accumulates


register_rule(F.embedding, aten.embedding, channels=embedding_function, zeros="custom", cost=_embedding_cost,
              kind="other", creates=True, name="embedding (functional)")
register_rule(nn.Embedding, channels=embedding_module, zeros="custom", cost=_embedding_cost, kind="other",
              resize=_resize_embedding, creates=True, name="embedding")


# ------------------------------------------------------------------------------------- cat of parameters

def _is_aten_expand(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target is aten.expand or
                                           getattr(node.target, "overloadpacket", None) is aten.expand)


def _parameter_source(ctx: RuleContext, value: Any, d: int, nd: int) -> tuple[str, int] | None:
    """(path, dim) of the parameter a concatenated part reads, directly or through ``expand`` calls that
    leave the channel dim alone (``-1``); None for anything else."""
    node = value
    while isinstance(node, fx.Node) and (node.op == "call_method" and node.target == "expand" or _is_aten_expand(node)):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        src = node_shape(node.args[0])
        if src is None or d >= len(sizes):
            return None
        k = d - (len(sizes) - len(src))  # the channel dim in the expanded tensor's own dims
        if k < 0 or sizes[d] != -1:
            return None
        node, d, nd = node.args[0], k, len(src)
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    shape = node_shape(node)
    t = ctx.param(node.target)
    if shape is None or t is None or len(shape) != nd:
        return None
    return node.target, d


def parameter_cat(ctx: RuleContext, node: fx.Node) -> bool:
    """``cat`` of tracked tensors with parameters along another dim (a class token): the parameters carry
    the tracked channels. Every other cat goes on to the cat entry of ``rules/shapes.py`` (False)."""
    tensors, dim = node_arg(node, 0, "tensors"), node_arg(node, 1, "dim", 0)
    shape = node_shape(node)
    if shape is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return False
    infos = [ctx.info(t) for t in tensors]
    tracked = [i for i in infos if i is not None]
    d_cat = dim % len(shape)
    if not tracked or any(i.dim == d_cat for i in tracked) or len({i.dim for i in tracked}) != 1 \
            or all(i is not None for i in infos):
        return False
    d = tracked[0].dim
    sources = [None if i is not None else _parameter_source(ctx, t, d, len(shape)) for t, i in zip(tensors, infos, strict=True)]
    if any(i is None and s is None for i, s in zip(infos, sources, strict=True)):
        return False
    atoms = tracked[0].atoms
    for i in tracked[1:]:
        ctx.unite(atoms, i.atoms)
    parts: list[tuple[str, Any]] = []
    for t, i, s in zip(tensors, infos, sources, strict=True):
        if i is not None:
            parts.append(("tracked", t.name))
        else:
            ctx.slice_param(s[0], s[1], atoms, "norm", node)
            parts.append(("attr", s))

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        flags = [z[v] if kind == "tracked" else zero_rows(_tensor(gm, v[0]), v[1]) for kind, v in parts]
        return torch.stack(flags).all(0)

    ctx.output(node, ChanInfo(d, atoms), rule)
    return True


refine_rule(torch.cat, torch.concat, torch.concatenate, aten.cat, channels=parameter_cat,
            name="cat with parameter parts")

__all__ = ["embedding_module", "parameter_cat"]


# ----------------------------------------------------------------------------- select (torch.export form)

def select_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``aten.select(x, dim, index)`` (``x[:, 0]`` as ``torch.export`` captures it: the class token read by
    a classifier): along another dim the channels pass through."""
    x, dim = node.args[0], node_arg(node, 1, "dim")
    i, shape = ctx.info(x), node_shape(x)
    if i is None or shape is None or not isinstance(dim, int):
        return ctx.unsupported(node, "select without shape metadata")
    dim %= len(shape)
    if dim == i.dim:
        return ctx.unsupported(node, "select along the channel dim")
    ctx.passthrough(node, x, True, dim=i.dim - (i.dim > dim))


# Only where the shapes family has no entry for it yet (the torch.export frontend is being built there).
if rule_for_key(aten.select) is None and rule_for_key(torch.select) is None:
    register_rule(torch.select, aten.select, channels=select_rule, zeros="custom", cost="none", name="select")

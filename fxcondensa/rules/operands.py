"""Operands computed from parameters and buffers, met by a binary op (``x * scale``, ``q * cos``): which
channels they carry. A parameter read through views and casts (``gamma.view(1, -1, 1, 1)``), a parameter
resampled by a chain of ops (``track_parameter_chain``), and tables computed in forward from buffers, the
cos/sin tables of rotary embeddings (``track_buffer_table``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .api import ChanInfo, RuleContext, node_shape
from .api import tensor_at as _attr
from .layers import zero_rows
from .registry import creates, rule_for_key

aten = torch.ops.aten


_CHAIN_LIMIT = 64  # nodes: a parameter's resampling is a handful of ops; more is not what this rule is for


def _parameter_chain(ctx: RuleContext, x: fx.Node, user: fx.Node) -> list[fx.Node] | None:
    """The nodes ``x`` is computed from, in graph order, when they read parameters and buffers only (no graph
    input, no module call) and nothing outside them reads them except ``user`` and value-less checks
    (``aten._assert_tensor_metadata``); None otherwise."""
    found: dict[str, fx.Node] = {}
    stack = [x]
    while stack:
        n = stack.pop()
        if n.name in found:
            continue
        if n.op not in ("get_attr", "call_function", "call_method") or len(found) >= _CHAIN_LIMIT:
            return None
        rule = rule_for_key(n.target) if n.op != "get_attr" else None
        if creates(rule, n):  # a layer over parameters made its channels on the first visit
            return None
        found[n.name] = n
        stack.extend(n.all_input_nodes)
    checks: dict[str, fx.Node] = {}
    for n in found.values():
        for u in n.users:
            if u.name in found or u is user:
                continue
            if node_shape(u) is None and not u.users and rule_for_key(u.target) is not None:
                checks[u.name] = u  # a check that produces no value; revisited with the chain
                continue
            return None
    # A parameter read here and anywhere else would be sliced for one use and not the other.
    paths = {ctx.param_alias.get(n.target, n.target) for n in found.values() if n.op == "get_attr"}
    for n in x.graph.nodes:
        if n.op == "get_attr" and n.name not in found and ctx.param_alias.get(n.target, n.target) in paths:
            return None
    return [n for n in x.graph.nodes if n.name in found or n.name in checks]


def track_parameter_chain(ctx: RuleContext, user: fx.Node, x: fx.Node, dim: int, width: int) -> torch.Tensor | None:
    """Channels for an operand computed from parameters alone: a position embedding resampled in forward
    (``vision_transformer``'s and Qwen3-ViT's ``resample_abs_pos_embed``: slice, reshape, permute,
    interpolate, cat; Swin's relative position bias table gathered by an integer index buffer, viewed and
    permuted), added to tracked channels on ``dim`` of ``x``.

    Each parameter of the computation gets new channels on its one dim of size ``width``, and the nodes of
    the computation are visited again with their own rules, exactly as if the parameter were an activation:
    the parameter is sliced and zeroed with those channels, literal sizes in its reshapes are rewritten, and
    an op on the way that cannot follow the channels freezes them with its reason. Returns the atoms on
    ``x``'s ``dim``, or None (nothing recorded) when ``x`` is not such a computation."""
    chain = _parameter_chain(ctx, x, user)
    if chain is None:
        return None
    attrs = [n for n in chain if n.op == "get_attr"]
    seeds = []
    for n in attrs:
        t, shape = ctx.param(n.target), node_shape(n)
        if t is not None and not (t.is_floating_point() or t.is_complex()):
            # An integer buffer only indexes the others (Swin's relative position index gathering its bias
            # table's rows): it holds no channels and stays untracked; the indexing rule keeps them apart.
            continue
        dims = [k for k, size in enumerate(shape or ()) if size == width]
        if t is None or not t.is_floating_point() or len(dims) != 1:
            return None
        seeds.append((n, dims[0]))
    if not seeds:
        return None
    from ..capture.records import node_record  # the walker records each node's channels; revisited nodes too

    for n, k in seeds:
        atoms = ctx.new_channels(width, n.target, "other")
        ctx.slice_param(n.target, k, atoms, "norm", n)
        path = n.target
        ctx.output(n, ChanInfo(k, atoms), lambda z, gm, path=path, k=k: zero_rows(_attr(gm, path), k))
        node_record(n).chan = ctx.analysis.infos.get(n.name)
    # The walk is speculative: an op on the way that no rule knows keeps the parameter whole (the reason
    # below) instead of raising in strict mode, where the operand alone would not have raised either.
    strict, ctx.strict = ctx.strict, False
    try:
        for n in chain:
            if n.op != "get_attr":
                ctx.visit(n)
                node_record(n).chan = ctx.analysis.infos.get(n.name)
        i = ctx.info(x)
    except Exception:  # a rule that cannot follow the parameter: it stays whole (the reason below)
        i = None
    finally:
        ctx.strict = strict
    if i is None or i.dim != dim or i.atoms.numel() != width:
        # The computation did not carry the channels to ``dim``: what was seeded must stay whole.
        for n, _ in seeds:
            ctx.freeze(ctx.info(n).atoms, f"'{n.target}' is combined with channels by '{user.name}' through a "
                                          "computation that does not keep them apart")
        return None
    return i.atoms


# ------------------------------------------------------------------ tables computed from buffers (rotary)

_TABLE_LIMIT = 256  # nodes behind one operand: a rotary table is a dozen ops, its positions a few more


def track_buffer_table(ctx: RuleContext, user: fx.Node, x: fx.Node, dim: int,
                       width: int) -> tuple[torch.Tensor | None, str | None]:
    """Channels for an operand computed in forward from buffers, and possibly from graph inputs that do not
    vary along the channels: the cos/sin tables of rotary embeddings. Hugging Face's Llama computes
    ``freqs = positions[..., None] * inv_freq`` (or ``inv_freq[None, :, None] @ positions[:, None, :]``),
    ``emb = cat((freqs, freqs), -1)``, ``cos = emb.cos() * scaling`` once for every layer, and multiplies q and
    k (head_dim columns tracked) by it.

    The buffer (``inv_freq``: ``D / 2`` frequencies) is a producer of its own channels on its one dim of size
    ``width`` or ``width / 2``, and every node computed from it up to ``user`` is visited again with its own
    rule, exactly as if the buffer were an activation: the outer product carries them, ``cat((f, f), -1)``
    repeats them (column ``j`` and ``j + D/2`` read one frequency), cos and sin keep them, so that ``q * cos``
    unites column ``j`` of q with frequency ``j mod D/2``; ``rotate_half``'s slices and cat (their own rules)
    then tie ``j`` and ``j + D/2`` of q together, and thinning slices the buffer with the kept pairs. The
    nodes computed after ``user`` (the next layers' products) are visited later with the buffer's channels.

    The visit is speculative: when the computation does not bring exactly ``width`` channels to ``dim`` of
    ``x`` (an op that no rule follows, a strided slice), everything it recorded is undone and the reason is
    returned. Returns ``(atoms on x's dim, None)``, or ``(None, reason)``; the reason is None when ``x`` is
    not computed from buffers at all (a parameter, an activation, a layer in between)."""
    found = _table_sources(ctx, user, x, width)
    if not isinstance(found, tuple):
        return None, found
    seeds, later = found
    from ..capture.records import node_record  # the walker records each node's channels; revisited nodes too

    touched = [n for n, _ in seeds] + later
    chans = {n.name: node_record(n).chan for n in touched}
    with ctx.speculate() as attempt:
        frozen_before = len(ctx.analysis.frozen)
        for n, k in seeds:
            atoms = ctx.new_channels(node_shape(n)[k], n.target, "other")
            ctx.slice_param(n.target, k, atoms, "norm", n)
            path = n.target
            ctx.output(n, ChanInfo(k, atoms), lambda z, gm, path=path, k=k: zero_rows(_attr(gm, path), k))
            node_record(n).chan = ctx.analysis.infos.get(n.name)
        # An op on the way that no rule knows keeps the buffer whole (the reason below) instead of raising in
        # strict mode, where the operand alone would not have raised either.
        strict, ctx.strict = ctx.strict, False
        why = None
        try:
            for n in later:
                ctx.visit(n)
                node_record(n).chan = ctx.analysis.infos.get(n.name)
            i = ctx.info(x)
        except Exception as exc:  # a rule that cannot follow the buffer: undone below
            i, why = None, f"{type(exc).__name__}: {exc}"
        finally:
            ctx.strict = strict
        if i is not None and i.dim == dim and i.atoms.numel() == width:
            attempt.keep()
            return i.atoms, None
        reasons = [r for _, r in ctx.analysis.frozen[frozen_before:]]
        why = why or (reasons[0] if reasons else f"they do not reach dim {dim} of '{x.name}' one by one")
    for n in touched:
        node_record(n).chan = chans[n.name]
    names = ", ".join(f"'{n.target}'" for n, _ in seeds)
    return None, f"it is computed from the buffer {names} by ops that do not keep its channels apart: {why}"


def _table_sources(ctx: RuleContext, user: fx.Node, x: fx.Node,
                   width: int) -> tuple[list[tuple[fx.Node, int]], list[fx.Node]] | str | None:
    """For ``track_buffer_table``: the buffers ``x`` is computed from, each with the dim that would carry the
    channels, and the nodes computed from them before ``user`` (graph order), to visit again. A reason
    string when they cannot be tracked, None when ``x`` is not such a computation."""
    behind: dict[str, fx.Node] = {}
    stack = [x]
    while stack:
        n = stack.pop()
        if n.name in behind:
            continue
        # A tracked activation or a layer behind ``x``: not a table of constants (other rules' business).
        if len(behind) >= _TABLE_LIMIT or n.op == "call_module" or ctx.analysis.infos.get(n.name) is not None:
            return None
        if n.op in ("call_function", "call_method"):
            rule = rule_for_key(n.target)
            if creates(rule, n):
                return None
        behind[n.name] = n
        stack.extend(n.all_input_nodes)
    seeds: list[tuple[fx.Node, int]] = []
    for n in behind.values():
        if n.op != "get_attr" or n.target not in ctx.param_alias:
            continue  # a plain tensor attribute is not sliced: an untracked operand like a graph input
        t = ctx.param(n.target)
        if t is None or not t.is_floating_point():
            continue  # integer buffers (positions) carry no channels
        if isinstance(t, nn.Parameter):
            return None  # learned: ``track_parameter_chain``'s business
        dims = [k for k, s in enumerate(node_shape(n) or ()) if s > 1 and (s == width or 2 * s == width)]
        if len(dims) > 1:
            return f"buffer '{n.target}' has more than one dim that could carry them"
        if dims:
            seeds.append((n, dims[0]))
    if not seeds:
        return None
    # Every reader of the buffer must slice it alike: another get_attr, or a module called whole, would not.
    paths = {ctx.param_alias[n.target] for n, _ in seeds}
    names = [name for name, canonical in ctx.param_alias.items() if canonical in paths]
    seed_names = {n.name for n, _ in seeds}
    order, index = ctx.graph_order(user.graph)
    for n in order:
        if n.op == "get_attr" and n.name not in seed_names and ctx.param_alias.get(n.target) in paths:
            return f"'{n.target}' is read again at node '{n.name}'"
        if n.op == "call_module" and any(p.startswith(f"{n.target}.") for p in names):
            return f"module '{n.target}', which holds it, is called as a whole"
    # The nodes computed from the buffers before ``user``: visited once, with nothing tracked, so they
    # recorded nothing; visited again with the buffers' channels. Later ones are visited in their turn.
    marked, later = set(seed_names), []
    for n in order[min(index[s] for s, _ in seeds):index[user]]:
        if n.name not in marked and any(a.name in marked for a in n.all_input_nodes):
            marked.add(n.name)
            later.append(n)
    if x.name not in marked:
        return None
    for n in later:
        rule = rule_for_key(n.target) if n.op in ("call_function", "call_method") else None
        if n.op not in ("call_function", "call_method") or creates(rule, n):
            return f"'{n.name}' ({n.op} {n.target}) is a layer that reads it"
        for a in n.all_input_nodes:
            if a.name not in marked and ctx.analysis.infos.get(a.name) is not None:
                # visited with those channels already: what it recorded then stands
                return f"'{n.name}' combines it with channels tracked before"
    return seeds, later


_VIEWS = {"view", "reshape", torch.reshape, aten.view, aten.reshape, aten._unsafe_view}
_UNSQUEEZES = {"unsqueeze", torch.unsqueeze, aten.unsqueeze}
# Casts and copies keep the shape: a parameter read through them is still sliced where it is stored.
_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach",
          aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.detach, aten.alias, aten.type_as}


def _in(node: fx.Node, ops: set) -> bool:
    t = node.target
    try:
        return t in ops or getattr(t, "overloadpacket", None) in ops
    except TypeError:  # an unhashable target
        return False


def _view_sizes(node: fx.Node) -> list[Any]:
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    return list(rest or node.kwargs.get("shape", node.kwargs.get("size", [])))


def _param_view(ctx: RuleContext, x: fx.Node, dim: int, width: int) -> tuple[str, int] | None:
    """``(path, param_dim)`` when ``x`` is a parameter read through casts (``w.to(x.dtype)``), or a 1-D
    parameter laid out along ``dim`` by views and unsqueezes with every other size 1 (``gamma.view(1, -1, 1,
    1)``, ``scale.unsqueeze(-1).unsqueeze(-1)``): slicing the parameter then slices ``x``. None otherwise.
    A view must not hold the channel count as a literal (``-1`` is fine): it would not follow the slice."""
    node, reshaped = x, False
    while node.op != "get_attr":
        if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if _in(node, _VIEWS):
            if width in _view_sizes(node) and width != 1:
                return None
            reshaped = True
        elif _in(node, _UNSQUEEZES):
            reshaped = True
        elif not _in(node, _CASTS):
            return None
        node = node.args[0]
    param, shape = ctx.param(node.target), node_shape(x)
    if param is None or shape is None or dim >= len(shape) or shape[dim] != width:
        return None
    if not reshaped:
        return node.target, dim - (len(shape) - param.dim())
    if param.dim() != 1 or param.numel() != width or any(n != 1 for k, n in enumerate(shape) if k != dim):
        return None
    return node.target, 0

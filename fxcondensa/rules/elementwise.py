"""Built-in rules for ops that act on each channel separately: activations, clamps, pooling, dropout, casts,
softmax over another dim, and the binary ops (add, sub, mul, div) that unite the channels they combine.

For the single-input ones the registry's "elementwise" preset does the channel work; what differs is the
zero behaviour: "preserve" when ``f(0) == 0`` (ReLU, GELU, max pooling), "fill" when a zero channel may
become non-zero (sigmoid, exp), or a function of the call (a clamp keeps zeros only when 0 is in bounds).
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .api import ChanInfo, RuleContext, node_arg, node_shape
from .layers import zero_rows
from .registry import CostCall, register_rule, rule_for_key

aten = torch.ops.aten


def _bounds_hold_zero(low: Any, high: Any) -> bool:
    """True when clamping to [low, high] maps 0 to 0 (None means unbounded; a computed bound is unknown)."""
    ok_low = low is None or (isinstance(low, (int, float)) and low <= 0)
    ok_high = high is None or (isinstance(high, (int, float)) and high >= 0)
    return ok_low and ok_high


# -------------------------------------------------------------------------------- activations and casts

register_rule(
    nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.CELU, nn.SELU,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.softsign, F.celu, F.selu, F.tanhshrink,
    F.softshrink, F.hardshrink, F.tanh, F.relu_, F.elu_, F.leaky_relu_, F.celu_, F.selu_,
    torch.relu, torch.relu_, torch.tanh, torch.dropout, torch.clone, torch.neg, operator.neg, torch.abs,
    torch.sin, torch.sinh, torch.asin, torch.atan, torch.sign, torch.square, torch.erf, torch.trunc, torch.expm1,
    torch.log1p,
    torch.nn.functional.hardtanh_,
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
    "type", "detach", "neg", "abs", "requires_grad_", "square", "sign", "erf", "sin",
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.hardswish, aten.hardswish_, aten.tanh,
    aten.leaky_relu, aten.elu, aten.mish, aten.dropout, aten.clone, aten.neg, aten.abs, aten.contiguous,
    aten.alias, aten.detach, aten._to_copy, aten.to, aten.sin,
    cost="elementwise", zeros="preserve", name="zero-preserving elementwise",
)
register_rule(
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid,
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, F.logsigmoid, torch.cos, torch.cosh,
    torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.erfc,
    "sigmoid", "sigmoid_", "exp", "exp_", "log", "sqrt", "rsqrt", "reciprocal", "cos",
    aten.sigmoid, aten.hardsigmoid, aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.softplus, aten.cos,
    cost="elementwise", zeros="fill", name="elementwise (zero not preserved)",
)


def register_optional_rules() -> None:
    """Rules for functions of optional libraries, registered once the library is loaded.

    torchvision's stochastic depth (identity in eval mode, zero-preserving) is matched by identity like
    every other function; a model that calls it has imported torchvision, so looking in ``sys.modules``
    when an analysis starts finds it without making every ``import fxcondensa`` pay for torchvision.
    """
    module = sys.modules.get("torchvision.ops.stochastic_depth")
    fn = getattr(module, "stochastic_depth", None)
    if fn is not None and rule_for_key(fn) is None:
        register_rule(fn, cost="elementwise", zeros="preserve", name="stochastic_depth")


def _clamp_zeros(node: fx.Node) -> bool:
    t = node.target
    if t in (F.hardtanh, aten.hardtanh, aten.hardtanh.default):
        return _bounds_hold_zero(node_arg(node, 1, "min_val", -1.0), node_arg(node, 2, "max_val", 1.0))
    return _bounds_hold_zero(node_arg(node, 1, "min"), node_arg(node, 2, "max"))


def _hardtanh_module_zeros(node: fx.Node) -> bool:
    # nn.Hardtanh / ReLU6 keep their bounds on the module; the rule only sees the node, so the bounds are
    # read from the graph's owning module through the node's graph.
    m = node.graph.owning_module.get_submodule(node.target)
    return _bounds_hold_zero(m.min_val, m.max_val)


def _threshold_zeros(node: fx.Node) -> bool:
    # y = x where x > threshold else value: a zero stays zero when it is replaced by 0 or passes through.
    m = node.graph.owning_module.get_submodule(node.target)
    return m.value == 0 or m.threshold < 0


register_rule(torch.clamp, torch.clip, F.hardtanh, "clamp", "clamp_", "clip", "clip_", aten.clamp, aten.clip,
              aten.hardtanh, cost="elementwise", zeros=_clamp_zeros, name="clamp")
def _pow_zeros(node: fx.Node) -> bool:
    exponent = node_arg(node, 1, "exponent")
    return isinstance(exponent, (int, float)) and exponent > 0


register_rule(torch.pow, operator.pow, "pow", aten.pow, cost="elementwise", zeros=_pow_zeros, name="pow")
# Elementwise ops with more operands or per-channel weights the analysis does not slice yet: channels kept.
register_rule("masked_fill", "masked_fill_", F.prelu, channels="freeze", cost="elementwise",
              name="elementwise with extra operands")
register_rule(nn.Hardtanh, cost="elementwise", zeros=_hardtanh_module_zeros, name="hardtanh")  # ReLU6 too
register_rule(nn.Threshold, cost="elementwise", zeros=_threshold_zeros, name="threshold")


# ------------------------------------------------------------------------------------------------ pools

def pool(ctx: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    i = ctx.info(x)
    if i is not None and i.dim != 1:
        ctx.freeze(i.atoms, f"pooling '{node.name}' over a tensor whose channels are on dim {i.dim}")
        return ctx.output(node, None, None)
    ctx.passthrough(node, x, True)


def _kernel_numel(kernel: Any, dims: int) -> int:
    if isinstance(kernel, int):
        return kernel ** dims
    return math.prod(int(k) for k in kernel)


def _pool_cost(c: CostCall) -> int:
    dims = len(c.out_shape) - 2 if c.out_shape else 0
    kernel = c.module.kernel_size if c.module is not None else c.arg(1, "kernel_size", 1)
    return c.out_numel * _kernel_numel(kernel, dims)


def _adaptive_pool_cost(c: CostCall) -> int:
    return c.in_numel


register_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d,
              nn.LPPool2d, *((nn.LPPool3d,) if hasattr(nn, "LPPool3d") else ()),
              F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.lp_pool1d,
              F.lp_pool2d, torch.max_pool2d, torch.avg_pool1d,
              aten.max_pool2d, aten.avg_pool2d, aten.max_pool1d, aten.avg_pool1d,
              channels=pool, zeros="custom", cost=_pool_cost, kind="pool", name="pool")
register_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
              F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.adaptive_avg_pool1d,
              aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool2d,
              channels=pool, zeros="custom", cost=_adaptive_pool_cost, kind="pool", name="adaptive pool")
register_rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate,
              aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten._upsample_bicubic2d_aa,
              aten._upsample_bilinear2d_aa,
              channels=pool, zeros="custom", cost="elementwise", name="upsample")


# ------------------------------------------------------------------------------------------------ binary

def _unite_tracked(ctx: RuleContext, node: fx.Node, operands: Any, what: str) -> tuple[int, torch.Tensor] | None:
    """Unite the channels of the tracked operands of a broadcasting op, which must sit on one output dim:
    (that dim, the atoms), or None after recording why the node cannot be followed."""
    nd = len(node_shape(node))
    tracked = [(x, ctx.info(x)) for x in operands if ctx.info(x) is not None]
    if not tracked:
        ctx.unsupported(node, f"{what} on a split tuple")
        return None
    dims = {i.dim + nd - len(node_shape(x)) for x, i in tracked}
    if len(dims) != 1:
        ctx.freeze_inputs(node, f"{what} '{node.name}' combines channels on different dims")
        ctx.output(node, None, None)
        return None
    atoms = tracked[0][1].atoms
    for _, i in tracked[1:]:
        ctx.unite(atoms, i.atoms)
    return dims.pop(), atoms


def _binary(ctx: RuleContext, node: fx.Node, how: str) -> None:
    """``how`` is "add" (a channel is zero when zero in both operands), "mul" (in either), "div" (in the
    numerator) or "addcmul" (``input + value * t1 * t2``: zero in the input and in t1 or t2). Tracked
    operands' channels are united; a parameter operand that varies along the channel dim (or a view of a
    1-D parameter that puts it there, ``gamma.view(1, -1, 1, 1)``) is sliced with them; anything else that
    does freezes them."""
    out_shape = node_shape(node)
    if how == "addcmul":
        operands = [node_arg(node, 0, "input"), node_arg(node, 1, "tensor1"), node_arg(node, 2, "tensor2")]
    else:
        operands = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
    if out_shape is None:
        return ctx.unsupported(node, "elementwise op without shape metadata")
    nd = len(out_shape)
    united = _unite_tracked(ctx, node, operands, "elementwise op")
    if united is None:
        return None
    d, atoms = united
    # Untracked operands that vary along the channel dim must be sliced too: possible for parameters
    # and buffers read by get_attr, impossible otherwise.
    parts: list[tuple[str, Any]] = []
    for x in operands:
        if ctx.info(x) is not None:
            parts.append(("tracked", x.name))
            continue
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if isinstance(x, fx.Node) and shape is None:
            parts.append(("opaque", None))
            continue
        if shape is None:  # a Python scalar
            parts.append(("scalar", x))
            continue
        dx = d - (nd - len(shape))
        if dx < 0 or shape[dx] == 1:
            parts.append(("broadcast", x))
            continue
        if x.op == "get_attr":
            ctx.slice_param(x.target, dx, atoms, "norm", node)
            parts.append(("attr", (x.target, dx)))
            continue
        viewed = _param_view(ctx, x, dx, atoms.numel())
        if viewed is not None and viewed[1] >= 0:
            ctx.slice_param(viewed[0], viewed[1], atoms, "norm", node)
            parts.append(("attr", viewed))
            continue
        computed = track_parameter_chain(ctx, node, x, dx, atoms.numel())
        why = None
        if computed is None:
            computed, why = track_buffer_table(ctx, node, x, dx, atoms.numel())
        if computed is not None:
            ctx.unite(atoms, computed)
            parts.append(("tracked", x.name))
            continue
        ctx.freeze(atoms, f"elementwise op '{node.name}' combines channels with '{x.name}', which cannot be sliced"
                          + (f" ({why})" if why else ""))
        parts.append(("opaque", None))
    n = atoms.numel()

    def is_zero(kind: str, val: Any, z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        if kind == "tracked":
            return z[val]
        if kind == "scalar":
            return torch.full((n,), val == 0, dtype=torch.bool)
        if kind == "attr":
            owner, _, attr = val[0].rpartition(".")
            return zero_rows(getattr(gm.get_submodule(owner) if owner else gm, attr), val[1])
        return torch.zeros(n, dtype=torch.bool)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        if how == "addcmul":
            a, b, c = (is_zero(kind, val, z, gm) for kind, val in parts)
            return a & (b | c)
        a, b = (is_zero(kind, val, z, gm) for kind, val in parts)
        if how == "compare":
            return torch.zeros_like(a)
        if how == "mul":
            return a | b
        if how == "div":
            return a
        return a & b

    ctx.output(node, ChanInfo(d, atoms), rule)


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
        if rule is not None and rule.creates:  # a layer over parameters made its channels on the first visit
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


def _attr(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


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
            if rule is not None and rule.creates:
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
        if n.op not in ("call_function", "call_method") or (rule is not None and rule.creates):
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


def addcmul_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.addcmul(input, t1, t2, value=v)`` = ``input + v * t1 * t2`` (ConvNeXt-V2's GRN)."""
    _binary(ctx, node, "addcmul")


def add_rule(ctx: RuleContext, node: fx.Node) -> None:
    _binary(ctx, node, "add")


def mul_rule(ctx: RuleContext, node: fx.Node) -> None:
    _binary(ctx, node, "mul")


def div_rule(ctx: RuleContext, node: fx.Node) -> None:
    _binary(ctx, node, "div")


register_rule(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract,
              "add", "add_", "sub", "sub_", aten.add, aten.add_, aten.sub, aten.sub_,
              channels=add_rule, zeros="custom", cost="elementwise", name="add")
register_rule(torch.addcmul, "addcmul", aten.addcmul, channels=addcmul_rule, zeros="custom", cost="elementwise",
              name="addcmul")
register_rule(operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", aten.mul, aten.mul_,
              channels=mul_rule, zeros="custom", cost="elementwise", name="mul")
register_rule(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", aten.div,
              aten.div_, channels=div_rule, zeros="custom", cost="elementwise", name="div")


# ----------------------------------------------------------------------------------------------- softmax

def _softmax(ctx: RuleContext, node: fx.Node, dim: Any) -> None:
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    if i is None:
        return ctx.output(node, None, None)
    if shape is None or not isinstance(dim, int) or dim % len(shape) == i.dim:
        ctx.freeze(i.atoms, f"softmax at node '{node.name}' runs over the channel dim")
        return ctx.output(node, None, None)
    ctx.passthrough(node, x, False)


def softmax_module(ctx: RuleContext, node: fx.Node) -> None:
    _softmax(ctx, node, ctx.module(node).dim)


def softmax_call(ctx: RuleContext, node: fx.Node) -> None:
    _softmax(ctx, node, node_arg(node, 1, "dim"))


register_rule(nn.Softmax, nn.LogSoftmax, channels=softmax_module, zeros="custom", cost="elementwise", name="softmax")
register_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
              aten.softmax, aten._softmax, aten.log_softmax, channels=softmax_call, zeros="custom",
              cost="elementwise", name="softmax (functional)")


# ----------------------------------------------------------------------------------------------- padding

def pad_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``F.pad`` of the dims after the channel dim keeps channels; a non-zero fill value does not keep zeros."""
    x = node.args[0]
    pad, shape, i = node_arg(node, 1, "pad"), node_shape(x), ctx.info(x)
    value = node_arg(node, 3, "value", 0.0)
    if i is not None and shape is not None and _pad_spares(pad, len(shape), i.dim):
        return ctx.passthrough(node, x, value in (0, 0.0, None))
    return ctx.unsupported(node, "padding of the channel dim")


def _pad_spares(pad: Any, ndim: int, dim: int) -> bool:
    """``pad`` (pairs from the last dim backwards) leaves ``dim`` alone: it does not reach it, or gives it
    ``(0, 0)`` (Swin pads channels-last maps with ``(0, 0, left, right, top, bottom)``)."""
    if not isinstance(pad, (list, tuple)):
        return False
    k = ndim - 1 - dim
    return len(pad) // 2 <= k or (pad[2 * k] == 0 and pad[2 * k + 1] == 0)


register_rule(F.pad, aten.pad, channels=pad_rule, zeros="custom", cost="none", kind="shape", name="pad")


def constant_pad_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``aten.constant_pad_nd(x, pad, value)``: ``F.pad`` with the fill value third (torch.export's form)."""
    x = node.args[0]
    pad, shape, i = node_arg(node, 1, "pad"), node_shape(x), ctx.info(x)
    value = node_arg(node, 2, "value", 0)
    if i is not None and shape is not None and _pad_spares(pad, len(shape), i.dim):
        return ctx.passthrough(node, x, value in (0, 0.0, None))
    return ctx.unsupported(node, "padding of the channel dim")


register_rule(aten.constant_pad_nd, channels=constant_pad_rule, zeros="custom", cost="none", kind="shape",
              name="constant_pad_nd")


def where_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``torch.where(cond, a, b)``: per element, so channel ``c`` of the output comes from channel ``c`` of
    ``a`` or ``b`` (and of ``cond``): tracked operands are united; a channel is zero when it is zero in both
    ``a`` and ``b`` (a Python number counts as zero when it is 0). An untracked tensor that varies along the
    channel dim freezes them."""
    out_shape = node_shape(node)
    cond, a, b = node_arg(node, 0, "condition"), node_arg(node, 1, "input"), node_arg(node, 2, "other")
    if out_shape is None or a is None or b is None:
        return ctx.unsupported(node, "where without shape metadata, or its one-argument form")
    nd = len(out_shape)
    united = _unite_tracked(ctx, node, (cond, a, b), "where")
    if united is None:
        return None
    d, atoms = united
    values = []
    for x in (cond, a, b):
        if ctx.info(x) is not None:
            values.append(("tracked", x.name))
            continue
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if isinstance(x, fx.Node) and shape is not None:
            dx = d - (nd - len(shape))
            if dx >= 0 and shape[dx] != 1:
                ctx.freeze(atoms, f"where '{node.name}' combines channels with '{x.name}', which cannot be sliced")
        values.append(("scalar", x) if not isinstance(x, fx.Node) else ("other", None))
    n = atoms.numel()

    def zero(kind: str, val: Any, z: dict[str, Any]) -> torch.Tensor:
        if kind == "tracked":
            return z[val]
        return torch.full((n,), kind == "scalar" and val == 0, dtype=torch.bool)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return zero(*values[1], z) & zero(*values[2], z)

    ctx.output(node, ChanInfo(d, atoms), rule)


register_rule(torch.where, "where", aten.where, channels=where_rule, zeros="custom", cost="elementwise", name="where")

# Comparisons and tests give a bool per element: channels pass through (two tracked operands are united like
# an add); a zero channel may compare true, so zeros are not kept.
def compare_rule(ctx: RuleContext, node: fx.Node) -> None:
    _binary(ctx, node, "compare")


register_rule(operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le, torch.eq,
              torch.ne, "gt", "lt", "ge", "le", "eq", "ne", aten.gt, aten.lt, aten.ge, aten.le, aten.eq, aten.ne,
              channels=compare_rule, zeros="custom", cost="elementwise", name="comparison")
register_rule(torch.isinf, torch.isnan, torch.isfinite, torch.logical_not, "isinf", "isnan", "logical_not", aten.isinf,
              aten.isnan, aten.logical_not, cost="elementwise", zeros="fill", name="elementwise test")


def type_as_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.type_as(other)`` and ``aten.type_as`` (RoPE's ``cos.type_as(q)``): the output is ``x`` cast,
    so it carries ``x``'s channels; ``other`` gives only its dtype, so its channels are neither carried nor
    held."""
    ctx.passthrough(node, node.args[0], True)


register_rule("type_as", aten.type_as, channels=type_as_rule, zeros="custom", cost="none", kind="shape",
              name="type_as")

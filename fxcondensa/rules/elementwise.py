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
from .operands import _param_view, track_buffer_table, track_parameter_chain
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
    aten.dropout_, aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout, aten.alpha_dropout_,
    aten.feature_alpha_dropout, aten.feature_alpha_dropout_,
    aten.sinh, aten.asin, aten.atan, aten.sign, aten.square, aten.erf, aten.trunc, aten.expm1, aten.log1p,
    aten.softshrink, aten.hardshrink, aten.celu, aten.celu_, aten.selu, aten.selu_, aten.elu_, aten.leaky_relu_,
    aten.tanh_, aten.relu6,
    cost="elementwise", zeros="preserve", name="zero-preserving elementwise",
)
register_rule(
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid,
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, F.logsigmoid, torch.cos, torch.cosh,
    torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.erfc,
    "sigmoid", "sigmoid_", "exp", "exp_", "log", "sqrt", "rsqrt", "reciprocal", "cos",
    aten.sigmoid, aten.hardsigmoid, aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.softplus, aten.cos,
    aten.cosh, aten.reciprocal, aten.erfc, aten.sigmoid_, aten.exp_, aten.log_sigmoid,
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


register_rule(torch.clamp, torch.clip, F.hardtanh, "clamp", "clamp_", "clip", "clip_", aten.clamp, aten.clip, aten.clamp_, aten.clip_,
              aten.hardtanh, cost="elementwise", zeros=_clamp_zeros, name="clamp")
def _pow_zeros(node: fx.Node) -> bool:
    exponent = node_arg(node, 1, "exponent")
    return isinstance(exponent, (int, float)) and exponent > 0


register_rule(torch.pow, operator.pow, "pow", aten.pow, cost="elementwise", zeros=_pow_zeros, name="pow")
# Elementwise ops with more operands or per-channel weights the analysis does not slice yet: channels kept.
register_rule("masked_fill", "masked_fill_", F.prelu, aten.masked_fill, aten.masked_fill_, aten.prelu, channels="freeze", cost="elementwise",
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
              aten.max_pool2d, aten.avg_pool2d, aten.max_pool1d, aten.avg_pool1d, aten.max_pool3d, aten.avg_pool3d,
              channels=pool, zeros="custom", cost=_pool_cost, kind="pool", name="pool")
register_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
              F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.adaptive_avg_pool1d,
              aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool2d, aten.adaptive_avg_pool3d,
              aten.adaptive_max_pool1d, aten.adaptive_max_pool3d,
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
    d = dims.pop()
    width = node_shape(node)[d]
    # A tracked operand with one channel broadcast over many (Qwen2-MoE's shared-expert gate,
    # ``sigmoid(gate(x)) * expert(x)``) keeps its channel; the other operands keep theirs.
    for x, i in tracked:
        if i.atoms.numel() == 1 and width > 1:
            ctx.freeze(i.atoms, f"{what} '{node.name}' broadcasts the one channel of '{x.name}' over {width}")
    tracked = [(x, i) for x, i in tracked if not (i.atoms.numel() == 1 and width > 1)]
    if not tracked:  # only broadcast channels: the output's channels come from no tracked producer
        ctx.output(node, None, None)
        return None
    atoms = tracked[0][1].atoms
    for _, i in tracked[1:]:
        ctx.unite(atoms, i.atoms)
    return d, atoms


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
            return z[val].expand(n)  # a broadcast channel (one) counts for every channel
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


def pad_module(ctx: RuleContext, node: fx.Node) -> None:
    """``nn.ZeroPad2d`` and the other padding modules: ``F.pad`` with the module's amounts (which pad the
    trailing dims only) and its mode; reflection, replication and circular padding of a zero channel give zeros."""
    m, x = ctx.module(node), node.args[0]
    shape, i = node_shape(x), ctx.info(x)
    if i is not None and shape is not None and _pad_spares(tuple(m.padding), len(shape), i.dim):
        return ctx.passthrough(node, x, getattr(m, "value", 0) in (0, 0.0))
    return ctx.unsupported(node, "padding of the channel dim")


_PAD_MODULES = tuple(getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication",
                                                                 "Circular") for d in (1, 2, 3)
                     if hasattr(nn, f"{kind}Pad{d}d"))
register_rule(*_PAD_MODULES, channels=pad_module, zeros="custom", cost="none", kind="shape", name="pad (module)")


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
            return z[val].expand(n)  # a broadcast channel (one) counts for every channel
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
              aten.isnan, aten.isfinite, aten.logical_not, cost="elementwise", zeros="fill", name="elementwise test")


def type_as_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``x.type_as(other)`` and ``aten.type_as`` (RoPE's ``cos.type_as(q)``): the output is ``x`` cast,
    so it carries ``x``'s channels; ``other`` gives only its dtype, so its channels are neither carried nor
    held."""
    ctx.passthrough(node, node.args[0], True)


register_rule("type_as", aten.type_as, channels=type_as_rule, zeros="custom", cost="none", kind="shape",
              name="type_as")

"""The per-op rules of the channel analysis: how each module, function and method moves, unites, slices
or freezes channels, and how it propagates "this channel is exactly zero".

Ops are matched by identity (module types, function objects) or by method name, never by the text of a
node's name. An op not listed here freezes the channels that flow into it: never a guess, never a crash.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .annotate import META
from .channels import ChanInfo, ChannelAnalysis, GroupedConv, ZeroRule
from .reshape_map import reshape_index, reshape_target

__all__ = ["Analyzer"]

# the text of a node's name.

_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.CELU, nn.SELU,
)
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

_ZERO_PRESERVING_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.softsign, F.celu, F.selu,
    torch.relu, torch.tanh, torch.nn.functional.tanh, torch.relu_, torch.dropout, torch.clone,
    torch.nn.functional.relu_, torch.neg, operator.neg,
}
_NONZERO_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, F.logsigmoid}
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
_ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
    "type", "detach", "neg", "abs", "requires_grad_",
}
_NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp", "exp_"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_METHODS = {"mul", "mul_"}
_DIV_METHODS = {"div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SPLIT = {torch.split, torch.chunk, torch.tensor_split}
# Clamp-like ops keep a zero channel zero only when 0 lies within their bounds.
_CLAMP_FUNCS = {torch.clamp, torch.clip, F.hardtanh}
_CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_"}
_SHAPE_QUERIES = {"size", "dim", "numel", "shape", "dtype", "device", "is_cuda", "ndimension", "nelement"}
_RESHAPES = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
             torch.swapaxes, torch.movedim, torch.t}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "swapaxes",
                    "movedim", "unflatten", "expand", "expand_as", "view_as", "reshape_as", "t"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}


def _zero_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """True for each index along ``dim`` whose slice is all zeros (abs/amax: far faster than bool any)."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).abs().amax(1) == 0


_SIZE_TAKERS = {"view", "reshape", "expand", "unflatten", torch.reshape}


def _sizes_a_reshape(user: fx.Node, value: fx.Node) -> bool:
    """True when ``value`` is only a size argument of a view / reshape / expand (never its tensor)."""
    return user.target in _SIZE_TAKERS and bool(user.args) and user.args[0] is not value


def _bounds_hold_zero(low: Any, high: Any) -> bool:
    """True when clamping to [low, high] maps 0 to 0 (None means unbounded; a computed bound is unknown)."""
    ok_low = low is None or (isinstance(low, (int, float)) and low <= 0)
    ok_high = high is None or (isinstance(high, (int, float)) and high >= 0)
    return ok_low and ok_high


def _stochastic_depth() -> Any:
    """torchvision's stochastic depth (identity in eval mode, zero-preserving), matched by identity.

    Looked up only if torchvision is already imported: a model that calls it has imported it, and
    importing torchvision here would slow down every start of fxcondensa.
    """
    module = sys.modules.get("torchvision.ops.stochastic_depth")
    return getattr(module, "stochastic_depth", None)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class Analyzer:
    """Walks the graph once in topological order, filling a ``ChannelAnalysis``."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.a = ChannelAnalysis()
        self.modules = dict(gm.named_modules())
        self.param_alias = self._aliases()

    def _aliases(self) -> dict[str, str]:
        """Every name of a parameter/buffer -> its canonical (first) name, so tied weights slice once."""
        canonical: dict[int, str] = {}
        alias: dict[str, str] = {}
        for name, t in [*self.gm.named_parameters(remove_duplicate=False), *self.gm.named_buffers(remove_duplicate=False)]:
            alias[name] = canonical.setdefault(id(t), name)
        return alias

    # -- helpers --------------------------------------------------------------------------------------
    def info(self, x: Any) -> ChanInfo | None:
        if isinstance(x, fx.Node):
            i = self.a.infos.get(x.name)
            return i if isinstance(i, ChanInfo) else None
        return None

    def tracked_inputs(self, node: fx.Node) -> list[fx.Node]:
        # A split's tuple (a list of infos) counts: the getitem nodes that read it carry its channels.
        return [x for x in node.all_input_nodes if self.a.infos.get(x.name) is not None]

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for x in node.all_input_nodes:
            i = self.info(x)
            if i is not None:
                self.a.freeze(i.atoms, reason)
            elif isinstance(self.a.infos.get(x.name), list):  # a split's tuple reaching an unknown op
                for part in self.a.infos[x.name]:
                    if part is not None:
                        self.a.freeze(part.atoms, reason)

    def block(self, path: str, dim: int, node: fx.Node) -> None:
        self.a.block_slice(self.param_alias.get(path, path), dim,
                           f"'{path}' is shared with node '{node.name}', whose input channels cannot be sliced")

    def slice_param(self, path: str, dim: int, atoms: torch.Tensor, role: str, node: fx.Node) -> None:
        self.a.add_slice(self.param_alias.get(path, path), dim, atoms, role, node.name)

    def set(self, node: fx.Node, info: Any, rule: ZeroRule | None) -> None:
        self.a.infos[node.name] = info
        if rule is not None:
            self.a.rules[node.name] = rule

    def passthrough(self, node: fx.Node, src: fx.Node, zero_preserving: bool, dim: int | None = None) -> None:
        i = self.info(src)
        if i is None:
            return self.set(node, None, None)
        info = ChanInfo(i.dim if dim is None else dim, i.atoms)
        name = src.name
        if zero_preserving:
            self.set(node, info, lambda z, gm: z[name])
        else:
            self.set(node, info, lambda z, gm: torch.zeros_like(z[name]))

    # -- main loop ------------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except Exception as exc:  # never crash on an op we misjudged: freeze what flows into it
                self.freeze_inputs(node, f"analysis failed at node '{node.name}' ({type(exc).__name__}: {exc})")
                self.set(node, None, None)
            node.meta.setdefault(META, {})["chan"] = self.a.infos.get(node.name)
        self.a.finalize()
        return self.a

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            return self.set(node, None, None)
        if node.op == "output":
            self.freeze_inputs(node, f"reaches the graph output ('{node.name}')")
            return None
        if not self.tracked_inputs(node) and not self._creates_channels(node):
            # Nothing tracked flows in and nothing is produced: shape arithmetic, constants, ...
            return self.set(node, None, None)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            return self.visit_function(node)
        return self.visit_method(node)

    def _creates_channels(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], (*_CONV, *_CONV_T, nn.Linear))
        return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear)

    def unknown(self, node: fx.Node, what: str) -> None:
        self.freeze_inputs(node, f"{what} at node '{node.name}' is not known to the channel analysis")
        self.set(node, None, None)

    # -- modules --------------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, m: nn.Module) -> None:
        x = node.args[0] if node.args else None
        if isinstance(m, _CONV):
            return self.conv(node, x, f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                             m.groups, m.in_channels, m.out_channels, node.target)
        if isinstance(m, _CONV_T):
            return self.conv_transpose(node, x, m)
        if isinstance(m, nn.Linear):
            return self.linear(node, x, f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                               m.out_features)
        if isinstance(m, (*_BATCHNORM, *_INSTANCENORM)):
            return self.batchnorm(node, x, node.target, m)
        if isinstance(m, nn.GroupNorm):
            return self.groupnorm(node, x, node.target, m)
        if isinstance(m, nn.LayerNorm):
            return self.layernorm(node, x, len(m.normalized_shape), f"LayerNorm '{node.target}'")
        if isinstance(m, nn.PReLU):
            return self.prelu(node, x, m)
        if isinstance(m, nn.Hardtanh):  # ReLU6 too: zero-preserving only when 0 is within the bounds
            return self.passthrough(node, x, _bounds_hold_zero(m.min_val, m.max_val))
        if isinstance(m, _ZERO_PRESERVING_MODULES):
            return self.passthrough(node, x, True)
        if isinstance(m, _NONZERO_MODULES):
            return self.passthrough(node, x, False)
        if isinstance(m, _POOL_MODULES):
            return self.pool(node, x)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x)
        if isinstance(m, nn.Unflatten):
            return self.reshape(node, x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, m.dim)
        return self.unknown(node, f"leaf module '{node.target}' ({type(m).__name__})")

    # -- functions ------------------------------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> None:
        t = node.target
        x = node.args[0] if node.args else None
        if t in (F.conv1d, F.conv2d, F.conv3d):
            w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
            groups = _arg(node, 6, "groups", 1)
            if not (isinstance(w, fx.Node) and w.op == "get_attr") or groups != 1 or (
                    b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
                return self.unknown(node, "functional conv with computed weights or groups")
            wt = self.gm.get_parameter(w.target) if w.target in dict(self.gm.named_parameters()) else None
            if wt is None:
                return self.unknown(node, "functional conv with a non-parameter weight")
            return self.conv(node, x, w.target, b.target if b is not None else None, 1, wt.shape[1], wt.shape[0], None)
        if t is F.linear:
            w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
            if not (isinstance(w, fx.Node) and w.op == "get_attr") or (
                    b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
                return self.unknown(node, "functional linear with computed weights")
            out = self.gm.get_parameter(w.target).shape[0]
            return self.linear(node, x, w.target, b.target if b is not None else None, out)
        if t in _ZERO_PRESERVING_FUNCS or t is _stochastic_depth():
            return self.passthrough(node, x, True)
        if t in _CLAMP_FUNCS:
            low, high = (-1.0, 1.0) if t is F.hardtanh else (None, None)
            names = ("min_val", "max_val") if t is F.hardtanh else ("min", "max")
            return self.passthrough(node, x, _bounds_hold_zero(_arg(node, 1, names[0], low), _arg(node, 2, names[1], high)))
        if t in _NONZERO_FUNCS:
            return self.passthrough(node, x, False)
        if t in _POOL_FUNCS:
            return self.pool(node, x)
        if t in _ADD or t in _MUL or t in _DIV:
            return self.binary(node, t in _MUL, t in _DIV)
        if t in _CAT:
            return self.cat(node, _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0))
        if t in _SPLIT:
            return self.split(node)
        if t in _RESHAPES:
            return self.reshape(node, x)
        if t in _REDUCE:
            return self.reduce(node, x, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if t in _SOFTMAX:
            return self.softmax(node, x, _arg(node, 1, "dim"))
        if t is F.layer_norm:
            shape = _arg(node, 1, "normalized_shape")
            n = len(shape) if isinstance(shape, (list, tuple)) else 1
            return self.layernorm(node, x, n, "layer_norm")
        if t is operator.getitem:
            return self.getitem(node)
        if t is getattr and node.args[1] in _SHAPE_QUERIES:
            return self.shape_query(node, x)
        if t is F.pad:
            pad = _arg(node, 1, "pad")
            shape = _shape(x)
            i = self.info(x)
            value = _arg(node, 3, "value", 0.0)
            if i is not None and shape is not None and isinstance(pad, (list, tuple)) and len(pad) // 2 <= len(shape) - 1 - i.dim:
                return self.passthrough(node, x, value in (0, 0.0, None))
        return self.unknown(node, f"function {getattr(t, '__name__', t)}")

    def visit_method(self, node: fx.Node) -> None:
        t = node.target
        x = node.args[0]
        if t in _SHAPE_QUERIES:
            return self.shape_query(node, x)
        if t in _CLAMP_METHODS:
            return self.passthrough(node, x, _bounds_hold_zero(_arg(node, 1, "min"), _arg(node, 2, "max")))
        if t in _ZERO_PRESERVING_METHODS:
            return self.passthrough(node, x, True)
        if t in _NONZERO_METHODS:
            return self.passthrough(node, x, False)
        if t in _ADD_METHODS or t in _MUL_METHODS or t in _DIV_METHODS:
            return self.binary(node, t in _MUL_METHODS, t in _DIV_METHODS)
        if t in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if t in _REDUCE_METHODS:
            return self.reduce(node, x, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if t in ("split", "chunk", "tensor_split"):
            return self.split(node)
        if t in ("softmax", "log_softmax"):
            return self.softmax(node, x, _arg(node, 1, "dim"))
        return self.unknown(node, f"method .{t}()")

    # -- shape queries --------------------------------------------------------------------------------
    def shape_query(self, node: fx.Node, x: Any) -> None:
        """``x.size(1)``, ``x.shape``, ``x.numel()``: harmless when the channel count only sizes a reshape (it
        is read again after thinning), wrong to thin when it is used as a number (``x / x.size(1)``)."""
        self.set(node, None, None)
        i, shape = self.info(x), _shape(x)
        if i is None or shape is None:
            return
        what = node.target if node.op == "call_method" else node.args[1]
        if what in ("size", "shape"):
            index = _arg(node, 1, "dim") if node.op == "call_method" else None
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
                if not _sizes_a_reshape(user, value):
                    self.a.freeze(i.atoms, f"the channel count of '{x.name}' is used as a number at node '{user.name}'")
                    return

    # -- layer rules ----------------------------------------------------------------------------------
    def conv(self, node: fx.Node, x: Any, weight: str, bias: str | None, groups: int, cin: int, cout: int,
             module: str | None) -> None:
        i = self.info(x)
        if i is not None and i.dim != 1:
            self.a.freeze(i.atoms, f"conv '{node.name}' reads channels moved to dim {i.dim}")
            i = None
        if groups == 1:
            if i is not None:
                self.slice_param(weight, 1, i.atoms, "consumer", node)
                self.a.exits.append(x.name)
            else:
                self.block(weight, 1, node)
            out = self.a.new_atoms(cout, module or weight.rsplit(".", 1)[0] or node.name, "conv")
        elif cin // groups == cout // groups and module is not None:
            # Output channel k of group j reads only the inputs of group j: tie input k to output k, so
            # both go together; thinning then keeps equal counts per conv group.
            out = self.a.new_atoms(cout, module, "conv")
            if i is not None:
                self.a.unite(i.atoms, out)
                self.a.exits.append(x.name)
            else:
                self.a.freeze(out, f"grouped conv '{node.name}' reads untracked channels")
            self.a.grouped.append(GroupedConv(node.name, module, groups, out))
        else:
            out = self.a.new_atoms(cout, module or weight.rsplit(".", 1)[0] or node.name, "conv")
            reason = f"grouped conv '{node.name}' has {cin // groups} input and {cout // groups} output channels per group"
            self.a.freeze(out, reason)
            if i is not None:
                self.a.freeze(i.atoms, reason)
        self.slice_param(weight, 0, out, "producer", node)
        if bias is not None:
            self.slice_param(bias, 0, out, "bias", node)
        self.set(node, ChanInfo(1, out), self._producer_rule(weight, bias, 0))

    def conv_transpose(self, node: fx.Node, x: Any, m: nn.Module) -> None:
        i = self.info(x)
        w, b = f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None
        out = self.a.new_atoms(m.out_channels, node.target, "conv")
        if m.groups != 1:
            reason = f"grouped transposed conv '{node.name}' is not thinned"
            self.a.freeze(out, reason)
            if i is not None:
                self.a.freeze(i.atoms, reason)
        elif i is not None:
            if i.dim != 1:
                self.a.freeze(i.atoms, f"transposed conv '{node.name}' reads channels moved to dim {i.dim}")
            else:
                self.slice_param(w, 0, i.atoms, "consumer", node)
                self.a.exits.append(x.name)
        self.slice_param(w, 1, out, "producer", node)
        if b is not None:
            self.slice_param(b, 0, out, "bias", node)
        self.set(node, ChanInfo(1, out), self._producer_rule(w, b, 1))

    def linear(self, node: fx.Node, x: Any, weight: str, bias: str | None, cout: int) -> None:
        i = self.info(x)
        shape = _shape(x)
        if i is not None and shape is not None and i.dim != len(shape) - 1:
            # Linear mixes only the last dim: for the tracked dim it is a per-channel map.
            name = x.name
            return self.set(node, ChanInfo(i.dim, i.atoms),
                            lambda z, gm: z[name] & bool(bias is None or not gm.get_parameter(bias).detach().any()))
        if i is not None:
            self.slice_param(weight, 1, i.atoms, "consumer", node)
            self.a.exits.append(x.name)
        else:
            self.block(weight, 1, node)
        out = self.a.new_atoms(cout, str(node.target) if node.op == "call_module" else weight.rsplit(".", 1)[0] or node.name,
                               "linear")
        self.slice_param(weight, 0, out, "producer", node)
        if bias is not None:
            self.slice_param(bias, 0, out, "bias", node)
        oshape = _shape(node)
        self.set(node, ChanInfo(len(oshape) - 1 if oshape else 1, out), self._producer_rule(weight, bias, 0))

    def _producer_rule(self, weight: str, bias: str | None, dim: int) -> ZeroRule:

        def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            zero = _zero_rows(gm.get_parameter(weight).detach(), dim)
            if bias is not None:
                zero = zero & (gm.get_parameter(bias).detach() == 0)
            return zero

        return rule

    def batchnorm(self, node: fx.Node, x: Any, target: str, m: nn.Module) -> None:
        i = self.info(x)
        if i is None:
            return self.set(node, None, None)
        if i.dim != 1:
            self.a.freeze(i.atoms, f"norm '{node.name}' normalizes channels moved to dim {i.dim}")
            return self.set(node, None, None)
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n, None) is not None]
        for n in names:
            self.slice_param(f"{target}.{n}", 0, i.atoms, "norm", node)
        src = x.name

        def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            m = gm.get_submodule(target)
            gamma = m.weight.detach() if m.weight is not None else None
            beta = m.bias.detach() if m.bias is not None else None
            if gamma is not None and beta is not None and not isinstance(m, _INSTANCENORM):
                killed = (gamma == 0) & (beta == 0)
            else:
                killed = torch.zeros(i.atoms.numel(), dtype=torch.bool)
            if isinstance(m, _INSTANCENORM) or m.running_mean is None:
                shift = beta if beta is not None else torch.zeros(i.atoms.numel())
            else:  # eval mode: a zero input becomes beta - gamma * mean / sqrt(var + eps)
                g = gamma if gamma is not None else torch.ones_like(m.running_mean)
                shift = (beta if beta is not None else 0) - g * m.running_mean / torch.sqrt(m.running_var + m.eps)
            return killed | (z[src] & (shift == 0))

        self.set(node, ChanInfo(1, i.atoms), rule)

    def groupnorm(self, node: fx.Node, x: Any, target: str, m: nn.GroupNorm) -> None:
        i = self.info(x)
        if i is None:
            return self.set(node, None, None)
        if i.dim != 1:
            self.a.freeze(i.atoms, f"GroupNorm '{node.name}' normalizes channels moved to dim {i.dim}")
            return self.set(node, None, None)
        per = m.num_channels // m.num_groups
        grid = i.atoms.view(m.num_groups, per)
        for k in range(1, per):  # only whole GroupNorm groups can go: tie each group's channels
            self.a.unite(grid[:, 0], grid[:, k])
        if m.affine:
            self.slice_param(f"{target}.weight", 0, i.atoms, "norm", node)
            self.slice_param(f"{target}.bias", 0, i.atoms, "norm", node)

        def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            m = gm.get_submodule(target)
            if not m.affine:
                return torch.zeros(i.atoms.numel(), dtype=torch.bool)
            return (m.weight.detach() == 0) & (m.bias.detach() == 0)

        self.set(node, ChanInfo(1, i.atoms), rule)

    def prelu(self, node: fx.Node, x: Any, m: nn.PReLU) -> None:
        i = self.info(x)
        if i is not None and m.weight.numel() > 1:
            if i.dim != 1:
                self.a.freeze(i.atoms, f"PReLU '{node.name}' has per-channel slopes on dim 1")
                return self.set(node, None, None)
            self.slice_param(f"{node.target}.weight", 0, i.atoms, "consumer", node)
        self.passthrough(node, x, True)

    def layernorm(self, node: fx.Node, x: Any, ndims: int, what: str) -> None:
        i, shape = self.info(x), _shape(x)
        if i is None:
            return self.set(node, None, None)
        if shape is None or i.dim >= len(shape) - ndims:
            self.a.freeze(i.atoms, f"{what} at node '{node.name}' normalizes over the channel dim")
            return self.set(node, None, None)
        self.passthrough(node, x, False)

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> None:
        i, shape = self.info(x), _shape(x)
        if i is None:
            return self.set(node, None, None)
        if shape is None or not isinstance(dim, int) or dim % len(shape) == i.dim:
            self.a.freeze(i.atoms, f"softmax at node '{node.name}' runs over the channel dim")
            return self.set(node, None, None)
        self.passthrough(node, x, False)

    def pool(self, node: fx.Node, x: Any) -> None:
        i = self.info(x)
        if i is not None and i.dim != 1:
            self.a.freeze(i.atoms, f"pooling '{node.name}' over a tensor whose channels are on dim {i.dim}")
            return self.set(node, None, None)
        self.passthrough(node, x, True)

    # -- elementwise and structural -------------------------------------------------------------------
    def binary(self, node: fx.Node, is_mul: bool, is_div: bool) -> None:
        out_shape = _shape(node)
        operands = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
        if out_shape is None:
            return self.unknown(node, "elementwise op without shape metadata")
        nd = len(out_shape)
        tracked = [(x, self.info(x)) for x in operands if self.info(x) is not None]
        dims = {i.dim + nd - len(_shape(x)) for x, i in tracked}
        if len(dims) != 1:
            self.freeze_inputs(node, f"elementwise op '{node.name}' combines channels on different dims")
            return self.set(node, None, None)
        d = dims.pop()
        atoms = tracked[0][1].atoms
        for _, i in tracked[1:]:
            self.a.unite(atoms, i.atoms)
        # Untracked operands that vary along the channel dim must be sliced too: possible for parameters
        # and buffers read by get_attr, impossible otherwise.
        parts: list[tuple[str, Any]] = []
        for x in operands:
            if self.info(x) is not None:
                parts.append(("tracked", x.name))
                continue
            shape = _shape(x) if isinstance(x, fx.Node) else None
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
                self.slice_param(x.target, dx, atoms, "norm", node)
                parts.append(("attr", (x.target, dx)))
                continue
            self.a.freeze(atoms, f"elementwise op '{node.name}' combines channels with '{x.name}', which cannot be sliced")
            parts.append(("opaque", None))

        def is_zero(kind: str, val: Any, z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            n = atoms.numel()
            if kind == "tracked":
                return z[val]
            if kind == "scalar":
                return torch.full((n,), val == 0, dtype=torch.bool)
            if kind == "attr":
                owner, _, attr = val[0].rpartition(".")
                t = getattr(gm.get_submodule(owner) if owner else gm, attr)
                return _zero_rows(t.detach(), val[1])
            return torch.zeros(n, dtype=torch.bool)

        def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            a, b = (is_zero(kind, val, z, gm) for kind, val in parts)
            if is_mul:
                return a | b
            if is_div:
                return a
            return a & b

        self.set(node, ChanInfo(d, atoms), rule)

    def cat(self, node: fx.Node, tensors: Any, dim: int) -> None:
        shape = _shape(node)
        if shape is None or not isinstance(tensors, (list, tuple)):
            return self.unknown(node, "cat without shape metadata")
        d = dim % len(shape)
        infos = [self.info(t) for t in tensors]
        if any(i is not None and i.dim != d for i in infos):
            # Concatenation along another dim (batch, tokens): the channels of all parts are one.
            tracked = [i for i in infos if i is not None]
            if len(tracked) != len(infos) or len({i.dim for i in tracked}) != 1:
                self.freeze_inputs(node, f"cat '{node.name}' joins tensors whose channels cannot be matched")
                return self.set(node, None, None)
            for i in tracked[1:]:
                self.a.unite(tracked[0].atoms, i.atoms)
            names = [t.name for t in tensors]
            return self.set(node, ChanInfo(tracked[0].dim, tracked[0].atoms),
                            lambda z, gm: torch.stack([z[n] for n in names]).all(0))
        parts, names = [], []
        for t, i in zip(tensors, infos, strict=True):
            if i is None:
                # An untracked part keeps its channels: give it atoms of its own that can never go.
                size = _shape(t)[d]
                i = ChanInfo(d, self.a.new_atoms(size, f"{node.name}.{getattr(t, 'name', 'part')}", "other"))
                self.a.freeze(i.atoms, f"cat '{node.name}' includes '{getattr(t, 'name', t)}', whose channels are not tracked")
                names.append(None)
            else:
                names.append(t.name)
            parts.append(i.atoms)
        sizes = [p.numel() for p in parts]

        def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            return torch.cat([z[n] if n is not None else torch.zeros(s, dtype=torch.bool)
                              for n, s in zip(names, sizes, strict=True)])

        self.set(node, ChanInfo(d, torch.cat(parts)), rule)

    def split(self, node: fx.Node) -> None:
        x = node.args[0]
        i = self.info(x)
        shape, out = _shape(x), node.meta.get("tensor_meta")
        if i is None or shape is None or not isinstance(out, (list, tuple)):
            return self.unknown(node, "split without shape metadata")
        is_chunk = node.target in (torch.chunk, "chunk")
        dim = _arg(node, 2, "dim", 0) if node.target in (torch.split, torch.chunk, torch.tensor_split) else _arg(node, 2, "dim", 0)
        if node.op == "call_method":
            dim = _arg(node, 2, "dim", 0)
        dim %= len(shape)
        if node.target in (torch.tensor_split, "tensor_split"):
            return self.unknown(node, "tensor_split")
        src = x.name
        if dim != i.dim:
            infos = [ChanInfo(i.dim, i.atoms) for _ in out]
            return self.set(node, infos, lambda z, gm: [z[src] for _ in infos])
        sizes = [m.shape[dim] for m in out]
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        infos = [ChanInfo(dim, i.atoms[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]
        self.a.reshapes.append(node.name)
        node.meta.setdefault(META, {})["split_chunk"] = is_chunk
        self.set(node, infos, lambda z, gm: [z[src][bounds[k]:bounds[k + 1]] for k in range(len(sizes))])

    def getitem(self, node: fx.Node) -> None:
        src, idx = node.args
        whole = self.a.infos.get(src.name)
        if isinstance(whole, list):
            part = whole[idx] if isinstance(idx, int) else None
            name = src.name
            if part is None:
                return self.unknown(node, "getitem with a non-integer index on a split")
            return self.set(node, part, lambda z, gm: z[name][idx])
        i = self.info(src)
        if i is None:
            return self.set(node, None, None)
        # Tensor indexing: only plain slices, ints and None on dims other than the channel dim.
        idx_t = idx if isinstance(idx, tuple) else (idx,)
        if any(not (isinstance(k, (int, slice)) or k is None or k is Ellipsis) for k in idx_t) or Ellipsis in idx_t:
            return self.unknown(node, "advanced tensor indexing")
        d_in, d_out = 0, 0
        new_dim = None
        for k in idx_t:
            if k is None:
                d_out += 1
                continue
            if d_in == i.dim:
                if not (isinstance(k, slice) and k == slice(None)):
                    return self.unknown(node, "indexing along the channel dim")
                new_dim = d_out
            if isinstance(k, int):
                d_in += 1
            else:
                d_in += 1
                d_out += 1
        if new_dim is None:
            new_dim = i.dim - d_in + d_out
        self.passthrough(node, src, True, dim=new_dim)

    def reduce(self, node: fx.Node, x: Any, dim: Any, keepdim: bool) -> None:
        i, shape = self.info(x), _shape(x)
        if dim is None or shape is None:
            return self.unknown(node, "a reduction over all dims")
        dims = [d % len(shape) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if i.dim in dims:
            self.a.freeze(i.atoms, f"reduction '{node.name}' runs over the channel dim")
            return self.set(node, None, None)
        new_dim = i.dim if keepdim else i.dim - sum(d < i.dim for d in dims)
        self.passthrough(node, x, True, dim=new_dim)

    def reshape(self, node: fx.Node, x: Any) -> None:
        """view / reshape / flatten / permute / ...: find where the channel dim went, from the shapes."""
        i = self.info(x)
        src_shape, dst_shape = _shape(x), _shape(node)
        if src_shape is None or dst_shape is None:
            return self.unknown(node, "a reshape without shape metadata")
        t = node.target
        if t in ("permute", torch.permute):
            perm = _arg(node, 1, "dims")
            perm = list(node.args[1:]) if node.op == "call_method" and not isinstance(perm, (list, tuple)) else perm
            perm = [p % len(src_shape) for p in perm]
            return self.passthrough(node, x, True, dim=perm.index(i.dim))
        if t in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
            a, b = (_arg(node, 1, "dim0") % len(src_shape), _arg(node, 2, "dim1") % len(src_shape))
            d = b if i.dim == a else a if i.dim == b else i.dim
            return self.passthrough(node, x, True, dim=d)
        if t in ("expand", "expand_as"):
            if t == "expand":
                self.a.reshapes.append(node.name)
            return self.passthrough(node, x, True, dim=i.dim + len(dst_shape) - len(src_shape))
        if t in ("t", torch.t):
            return self.passthrough(node, x, True, dim=1 - i.dim)
        # General reshape: split both shapes into blocks of equal element counts, then look at the block
        # holding the channel dim.
        found = reshape_target(src_shape, dst_shape, i.dim, i.atoms)
        if found is None:
            return self.unknown(node, f"reshape {tuple(src_shape)} -> {tuple(dst_shape)} that mixes the channel dim")
        new_dim, atoms = found
        if t in ("view", "reshape", torch.reshape):  # literal sizes may count channels: thin rewrites them
            self.a.reshapes.append(node.name)
        name = x.name
        src_atoms = i.atoms
        if atoms.numel() == src_atoms.numel() and torch.equal(atoms, src_atoms):
            return self.set(node, ChanInfo(new_dim, atoms), lambda z, gm: z[name])
        # Each output index carries one input index's atom: map zero flags the same way.
        index = reshape_index(src_shape, dst_shape, i.dim, new_dim)
        self.set(node, ChanInfo(new_dim, atoms), lambda z, gm: z[name][index])

"""Built-in rules for layers with weights: convolutions (plain, grouped, transposed) and linear layers, also
written as a matmul by a weight.

Each entry holds the channel rule (which dims of which tensors carry which channels), the zero rule (when
the layer's output channel is exactly zero), the MAC cost, and for modules the attribute update that
follows thinning. Module, functional and ATen forms of one layer share one entry.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .api import ChanInfo, RuleContext, ZeroRule, host, node_arg, node_shape
from .api import tensor_at as _tensor
from .registry import CostCall, register_rule

aten = torch.ops.aten

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def zero_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """CPU bool per index along ``dim``: True where that slice is all zeros (computed where ``t`` lives).

    Example:
        >>> zero_rows(torch.tensor([[0.0, -0.0], [0.0, float("nan")]], dtype=torch.bfloat16), 0)
        tensor([ True, False])
    """
    t = t.detach()
    dim = dim % max(1, t.dim())
    others = [d for d in range(t.dim()) if d != dim]
    if not others:
        return host(t == 0)
    magnitude = _MAGNITUDE.get(t.dtype)
    if (magnitude is not None and (t.element_size() == 2 or dim > 0) and t.numel() > 0 and t.device.type == "cpu"
            and _get_current_dispatch_mode() is None):
        return host(_zero_by_bits(t, dim, others, *magnitude))
    # Reduced where the values lie: no transposed or absolute copy of a large weight. NaN is never zero.
    return host((t.amax(others) == 0) & (t.amin(others) == 0))


# A float is +-0 exactly where its bits other than the sign are 0 (NaN and inf have exponent bits set).
_MAGNITUDE = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
              torch.float32: (torch.int32, 0x7FFFFFFF)}
# Elements per slab of rows: the masked bits of a slab are a small scratch, never a copy of the weight.
_ZERO_SLAB = 1 << 18


def _zero_by_bits(t: torch.Tensor, dim: int, others: list[int], as_int: torch.dtype, magnitude: int) -> torch.Tensor:
    """``zero_rows`` on a CPU float tensor by its bits: the largest magnitude bits of a slice are 0 exactly where
    ``amax == 0 and amin == 0``; an integer reduction, slab by slab of rows, is several times faster than the
    two float ones in bfloat16 and float16 (which convert every element), and along an inner dim in float32."""
    bits = t.view(as_int)
    rows = max(1, _ZERO_SLAB // max(1, t.numel() // t.shape[0]))
    # One scratch for every slab's masked bits: a fresh block per slab (a thousand for a language model) would
    # leave the C allocator's heap fragmented, the process's resident memory growing with it.
    scratch = torch.empty(min(rows, t.shape[0]) * (t.numel() // t.shape[0]), dtype=as_int)
    parts: list[torch.Tensor] = []
    largest: torch.Tensor | None = None
    for start in range(0, t.shape[0], rows):
        part = bits.narrow(0, start, min(rows, t.shape[0] - start))
        slab = torch.bitwise_and(part, magnitude, out=scratch[:part.numel()].view(part.shape)).amax(others)
        if dim == 0:
            parts.append(slab)
        else:
            largest = slab if largest is None else torch.maximum(largest, slab, out=largest)
    found = torch.cat(parts) if dim == 0 else largest
    assert found is not None
    return found == 0


def fused_heads_zero(gm: fx.GraphModule, w_path: str, b_path: str | None, out_path: str, heads: int,
                     head_dim: int) -> torch.Tensor:
    """Bool per head of a fused (q, k, v) in-projection: True where the head adds nothing, its value rows
    (and value biases) or its out-projection columns all zero."""
    e = heads * head_dim
    zero_v = zero_rows(_tensor(gm, w_path)[2 * e:].detach().reshape(heads, -1), 0)
    if b_path is not None:
        zero_v &= zero_rows(_tensor(gm, b_path)[2 * e:].detach().view(heads, head_dim), 0)
    return zero_v | zero_rows(_tensor(gm, out_path).detach().t().reshape(heads, -1), 0)


def attr_path(value: Any) -> str | None:
    """The parameter path of a ``get_attr`` argument, None for anything else (computed tensors, None)."""
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


# ------------------------------------------------------------------------------------------- producers

def _producer_rule(weight: str, bias: str | None, dim: int) -> ZeroRule:
    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        zero = zero_rows(_tensor(gm, weight), dim)
        if bias is not None:
            zero = zero & host(_tensor(gm, bias) == 0)
        return zero

    return rule


def _conv(ctx: RuleContext, node: fx.Node, x: Any, weight: str, bias: str | None, groups: int, cin: int,
          cout: int, module: str | None) -> None:
    i = ctx.info(x)
    if i is not None and i.dim != 1:
        ctx.freeze(i.atoms, f"conv '{node.name}' reads channels moved to dim {i.dim}")
        i = None
    if groups == 1:
        if i is not None:
            ctx.slice_param(weight, 1, i.atoms, "consumer", node)
            ctx.exit(x)
        else:
            ctx.block(weight, 1, node)
        out = ctx.new_channels(cout, module or weight.rsplit(".", 1)[0] or node.name, "conv")
    elif cin // groups == cout // groups and module is not None:
        # Output channel k of group j reads only the inputs of group j: tie input k to output k, so
        # both go together; thinning then keeps equal counts per conv group.
        out = ctx.new_channels(cout, module, "conv")
        if i is not None:
            ctx.unite(i.atoms, out)
            ctx.exit(x)
        else:
            ctx.freeze(out, f"grouped conv '{node.name}' reads untracked channels")
        ctx.grouped_conv(node, module, groups, out)
    else:
        # Input and output counts per conv group differ (a depthwise multiplier, ResNeSt's radix groups): the
        # inputs are kept; output k of every conv group goes together, so all groups keep the same count and
        # none empties (the group count and the per-group input width stay what they are).
        out = ctx.new_channels(cout, module or weight.rsplit(".", 1)[0] or node.name, "conv")
        grid = out.view(groups, cout // groups)
        if groups > 1:
            ctx.unite(grid[:-1].flatten(), grid[1:].flatten())
        if i is not None:
            ctx.freeze(i.atoms, f"grouped conv '{node.name}' has {cin // groups} input and {cout // groups} output "
                                "channels per group: its input channels are kept")
        else:
            ctx.block(weight, 1, node)
    ctx.slice_param(weight, 0, out, "producer", node)
    if bias is not None:
        ctx.slice_param(bias, 0, out, "bias", node)
    ctx.output(node, ChanInfo(1, out), _producer_rule(weight, bias, 0))


def conv_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    _conv(ctx, node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
          m.groups, m.in_channels, m.out_channels, node.target)


def _functional_weights(ctx: RuleContext, node: fx.Node, what: str) -> tuple[str, str | None, nn.Parameter, int] | None:
    """``(weight path, bias path, weight, groups)`` of a functional conv or transposed conv (weight at 1, bias at
    2, groups at 6, as both take them) whose weight and bias are parameters; None once it has recorded why not
    (a computed weight keeps its channels with that reason, a non-parameter weight is unsupported)."""
    w, b = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
    groups = node_arg(node, 6, "groups", 1)
    wpath, bpath = attr_path(w), attr_path(b)
    if wpath is None or (b is not None and bpath is None):
        _computed_weight(ctx, node, w, what)
        return None
    wt = ctx.param(wpath)
    if not isinstance(wt, nn.Parameter) or not isinstance(groups, int):
        ctx.unsupported(node, f"functional {what} with a non-parameter weight or a computed group count")
        return None
    return wpath, bpath, wt, groups


def conv_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` and ``aten.conv2d`` (same layout)."""
    found = _functional_weights(ctx, node, "conv")
    if found is None:
        return None
    wpath, bpath, wt, groups = found
    # A grouped functional conv is tied like a module one; its weight's owner names it, and thinning
    # rewrites the group count in the call (``conv_function_rewrite``).
    owner = wpath.rsplit(".", 1)[0] if wpath.endswith(".weight") and "." in wpath else None
    if groups != 1 and owner is None:
        return ctx.unsupported(node, f"grouped functional conv with weight '{wpath}'")
    _conv(ctx, node, node.args[0], wpath, bpath, groups, wt.shape[1] * groups, wt.shape[0], owner)


def conv_function_rewrite(gm: fx.GraphModule, node: fx.Node, view: Any) -> None:
    """The group count of a thinned grouped functional conv: the conv groups that keep a channel."""
    groups = node_arg(node, 6, "groups", 1)
    kept, width = view.kept_indices(node), view.width(node)
    if not isinstance(groups, int) or groups == 1 or kept is None or width is None or kept.numel() == width:
        return
    new = int(torch.unique(kept // (width // groups)).numel())
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


def _conv_t(ctx: RuleContext, node: fx.Node, x: Any, weight: str, bias: str | None, groups: int, cin: int,
            cout: int, owner: str, module: str | None) -> None:
    """A transposed conv: its weight is ``(cin, cout // groups, *kernel)``, inputs on dim 0, outputs on dim 1.

    Depthwise (one input and one output per conv group, ``module`` names its weight's owner): input ``j``
    and output ``j`` go together, as for a depthwise conv, and the group count follows. Other grouped ones:
    weight column ``k`` makes output ``k`` of every conv group and a layer keeps one count per group, so
    output ``k`` of every group goes together, and so does input ``k`` (the group count stays)."""
    i = ctx.info(x)
    if i is not None and i.dim != 1:
        ctx.freeze(i.atoms, f"transposed conv '{node.name}' reads channels moved to dim {i.dim}")
        i = None
    out = ctx.new_channels(cout, owner, "conv")
    if groups > 1 and cin == cout == groups and module is not None:
        if i is not None:
            ctx.unite(i.atoms, out)
            ctx.exit(x)
        else:
            ctx.freeze(out, f"depthwise transposed conv '{node.name}' reads untracked channels")
        ctx.grouped_conv(node, module, groups, out)
        ctx.slice_param(weight, 0, out, "producer", node)  # row j is output j's whole filter
    else:
        if groups > 1:
            grid = out.view(groups, cout // groups)
            ctx.unite(grid[:-1].flatten(), grid[1:].flatten())
            if i is not None:
                igrid = i.atoms.view(groups, cin // groups)
                ctx.unite(igrid[:-1].flatten(), igrid[1:].flatten())
        if i is not None:
            ctx.slice_param(weight, 0, i.atoms, "consumer", node)
            ctx.exit(x)
        else:
            ctx.block(weight, 0, node)
        # Column k is output k of every conv group: the first group's atoms name it (all are one channel).
        ctx.slice_param(weight, 1, out[: cout // groups], "producer", node)
    if bias is not None:
        ctx.slice_param(bias, 0, out, "bias", node)
    ctx.output(node, ChanInfo(1, out), _conv_t_zero_rule(weight, bias, groups))


def _conv_t_zero_rule(weight: str, bias: str | None, groups: int) -> ZeroRule:
    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        w = _tensor(gm, weight).detach()
        # Output k of group j is zero when the rows of group j are zero in column k (and its bias is zero).
        per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).abs().amax(dim=(1, 3))
        zero = host(per_group.flatten() == 0)
        if bias is not None:
            zero = zero & host(_tensor(gm, bias) == 0)
        return zero

    return rule


def conv_transpose_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    _conv_t(ctx, node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
            m.groups, m.in_channels, m.out_channels, node.target, node.target)


def conv_transpose_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)`` and
    ``aten.conv_transpose2d`` (same layout) with parameter weights."""
    found = _functional_weights(ctx, node, "transposed conv")
    if found is None:
        return None
    wpath, bpath, wt, groups = found
    # A depthwise functional one is tied like a module one; thinning rewrites its group count in the call.
    owner = wpath.rsplit(".", 1)[0] if wpath.endswith(".weight") and "." in wpath else None
    _conv_t(ctx, node, node.args[0], wpath, bpath, groups, wt.shape[0], wt.shape[1] * groups, owner or node.name, owner)


# A bias assembled in forward from parameters: one (path, like) per concatenated part, where ``path`` is a
# 1-D parameter or buffer and ``like`` is True for ``zeros_like(path)`` (a part that is zero and follows
# the size of ``path``).
BiasParts = list[tuple[str, bool]]


def _bias_values(gm: fx.GraphModule, bias: str | BiasParts) -> torch.Tensor:
    """The bias vector as the linear sees it: a parameter, or the concatenation of its parts."""
    if isinstance(bias, str):
        return _tensor(gm, bias).detach()
    return torch.cat([torch.zeros_like(_tensor(gm, p)) if like else _tensor(gm, p).detach() for p, like in bias])


def _cat_bias_parts(ctx: RuleContext, b: Any, cout: int) -> BiasParts | None:
    """``cat((q_bias, k_bias, v_bias))`` (BEiT, EVA, Swin-V2; ``k_bias`` a zero buffer, or older timm's
    ``zeros_like(v_bias)``) of 1-D parameters or buffers along dim 0 filling ``cout``: its parts, else None."""
    if not (isinstance(b, fx.Node) and b.op == "call_function" and b.target in (torch.cat, aten.cat.default)):
        return None
    tensors, dim = node_arg(b, 0, "tensors"), node_arg(b, 1, "dim", 0)
    if dim not in (0, -1) or not isinstance(tensors, (list, tuple)):
        return None
    parts: BiasParts = []
    for t in tensors:
        like = isinstance(t, fx.Node) and t.op == "call_function" and t.target in (torch.zeros_like,
                                                                                    aten.zeros_like.default)
        path = attr_path(t.args[0] if like else t)
        value = ctx.param(path) if path is not None else None
        if value is None or value.dim() != 1 or (like and (len(t.args) > 1 or set(t.kwargs) - {"requires_grad", "pin_memory"})):
            return None  # a dtype, device or layout argument would make the part something else
        parts.append((path, like))
    # A zeros_like part is tied to the part it copies, which must be in the same bias.
    if any(like and (path, False) not in parts for path, like in parts):
        return None
    if sum(ctx.param(p).shape[0] for p, _ in parts) != cout:
        return None
    return parts


def _slice_bias(ctx: RuleContext, node: fx.Node, bias: str | BiasParts | None, out: torch.Tensor) -> None:
    """The bias follows the output rows: a parameter directly, a concatenation part by part. A
    ``zeros_like(p)`` part takes the size of ``p`` after thinning, so its rows are tied to ``p``'s rows."""
    if bias is None:
        return
    if isinstance(bias, str):
        return ctx.slice_param(bias, 0, out, "bias", node)
    offsets, start = {}, 0
    for path, like in bias:
        n = ctx.param(path).shape[0]
        if not like:
            offsets[path] = out[start:start + n]
            ctx.slice_param(path, 0, out[start:start + n], "bias", node)
        start += n
    start = 0
    for path, like in bias:
        n = ctx.param(path).shape[0]
        if like:
            ctx.unite(offsets[path], out[start:start + n])
        start += n


def _producer_rule_bias(weight: str, bias: str | BiasParts | None, dim: int) -> ZeroRule:
    if bias is None or isinstance(bias, str):
        return _producer_rule(weight, bias, dim)

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return zero_rows(_tensor(gm, weight), dim) & host(_bias_values(gm, bias) == 0)

    return rule


def _linear(ctx: RuleContext, node: fx.Node, x: Any, weight: str, bias: str | BiasParts | None, cout: int) -> None:
    i = ctx.info(x)
    shape = node_shape(x)
    if i is not None and shape is not None and i.dim != len(shape) - 1:
        # Linear mixes only the last dim: for the tracked dim it is a per-channel map.
        name = x.name

        def passthrough(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
            return z[name] & bool(bias is None or not bool(_bias_values(gm, bias).any()))

        return ctx.output(node, ChanInfo(i.dim, i.atoms), passthrough)
    if i is not None:
        ctx.slice_param(weight, 1, i.atoms, "consumer", node)
        ctx.exit(x)
    else:
        ctx.block(weight, 1, node)
    owner = str(node.target) if node.op == "call_module" else weight.rsplit(".", 1)[0] or node.name
    out = ctx.new_channels(cout, owner, "linear")
    ctx.slice_param(weight, 0, out, "producer", node)
    _slice_bias(ctx, node, bias, out)
    oshape = node_shape(node)
    ctx.output(node, ChanInfo(len(oshape) - 1 if oshape else 1, out), _producer_rule_bias(weight, bias, 0))


def linear_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    _linear(ctx, node, node.args[0], f"{node.target}.weight",
            f"{node.target}.bias" if m.bias is not None else None, m.out_features)


def linear_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.linear(x, weight, bias)`` and ``aten.linear`` with parameter weights."""
    w, b = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
    wpath, bpath = attr_path(w), attr_path(b)
    if wpath is None or ctx.param(wpath) is None:
        return _computed_weight(ctx, node, w, "linear")
    if b is not None and bpath is None:
        # A bias concatenated from parameters is sliced part by part; any other computed bias keeps the rows.
        parts = _cat_bias_parts(ctx, b, ctx.param(wpath).shape[0])
        if parts is None:
            return _linear_computed_bias(ctx, node, node.args[0], wpath, b)
        return _linear(ctx, node, node.args[0], wpath, parts, ctx.param(wpath).shape[0])
    _linear(ctx, node, node.args[0], wpath, bpath, ctx.param(wpath).shape[0])


def _linear_computed_bias(ctx: RuleContext, node: fx.Node, x: Any, weight: str, b: Any) -> None:
    """A linear whose bias is computed in forward (BEiT's, EVA's and Swin-V2's ``cat((q_bias, zeros,
    v_bias))``). The bias could not follow a slice of the output rows, so the output channels are new
    channels kept whole, with the reason. The input side is an ordinary linear: a pruned input channel is
    zero, its weight column multiplies zero, so removing the column is exact whatever the bias is; this keeps
    the residual stream that feeds the projection thinnable."""
    i = ctx.info(x)
    shape, oshape = node_shape(x), node_shape(node)
    reason = f"linear with a bias computed in forward ('{getattr(b, 'name', b)}'): its output channels are kept"
    if i is not None and shape is not None and i.dim == len(shape) - 1:
        ctx.slice_param(weight, 1, i.atoms, "consumer", node)
        ctx.exit(x)
    elif i is not None:
        ctx.freeze(i.atoms, reason)
    else:
        ctx.block(weight, 1, node)
    cout = ctx.param(weight).shape[0]
    out = ctx.new_channels(cout, weight.rsplit(".", 1)[0] or node.name, "linear")
    ctx.freeze(out, reason)
    ctx.output(node, ChanInfo(len(oshape) - 1 if oshape else 1, out), _never_zero(cout))


def _computed_weight(ctx: RuleContext, node: fx.Node, w: Any, what: str) -> None:
    """A conv or linear whose weight is computed in forward (weight standardisation, NFNet's
    ``ScaledStdConv2d``): its output channels are new channels kept whole, with the reason, so that the
    layers around it still know where channels come from and a report says why this group stays."""
    shape = node_shape(w) if isinstance(w, fx.Node) else None
    oshape = node_shape(node)
    if shape is None or oshape is None:
        return ctx.unsupported(node, f"functional {what} with a weight computed in forward")
    reason = (f"{what} '{node.name}' uses a weight computed in forward ('{getattr(w, 'name', w)}', e.g. weight "
              "standardisation): its channels are kept")
    ctx.freeze_inputs(node, reason)
    dim = len(oshape) - 1 if what == "linear" else 1
    # The output width, not the weight's rows: a transposed conv's weight holds its inputs on dim 0.
    out = ctx.new_channels(int(oshape[dim]), node.name, "linear" if what == "linear" else "conv")
    ctx.freeze(out, reason)
    ctx.output(node, ChanInfo(dim, out), _never_zero(out.numel()))


# ------------------------------------------------------------------------------- linear as a matmul

# The ways a 2-D weight is transposed in ``forward`` (``W.T``, ``W.t()``, ``W.transpose(0, 1)``, ``W.mT``,
# ``W.permute(1, 0)``; torch.export's ``aten.numpy_T``, ``aten.t``, ...).
_T_ATTRS = ("T", "mT")
_T_CALLS = (torch.t, aten.t.default, aten.numpy_T.default, aten.mT.default)
_TRANSPOSE_CALLS = (torch.transpose, torch.swapaxes, aten.transpose.int)
_PERMUTE_CALLS = (torch.permute, aten.permute.default)


def _transposed_input(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` transposes when it swaps the two dims of a 2-D tensor, else None."""
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if x is None or node.op not in ("call_function", "call_method"):
        return None
    target, rest = node.target, node.args[1:]
    if node.op == "call_function" and target is getattr:
        return x if rest and rest[0] in _T_ATTRS else None
    if (node.op == "call_method" and target in ("t", "numpy_T")) or (node.op == "call_function" and target in _T_CALLS):
        return x
    if (node.op == "call_method" and target in ("transpose", "swapaxes")) or target in _TRANSPOSE_CALLS:
        dims = (node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1"))
        return x if all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1} else None
    if (node.op == "call_method" and target == "permute") or target in _PERMUTE_CALLS:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return x if [d % 2 for d in dims if isinstance(d, int)] == [1, 0] and len(dims) == 2 else None
    return None


def weight_operand(ctx: RuleContext, b: Any) -> tuple[str, int, int] | None:
    """``(path, in_dim, out_dim)`` when the right operand of a matmul is a 2-D floating parameter or buffer
    (``x @ W``: inputs on dim 0) or its transpose (``x @ W.T``, the layout of ``nn.Linear``: inputs on dim 1)."""
    if not isinstance(b, fx.Node):
        return None
    src, dims = b, (0, 1)
    if b.op != "get_attr":
        src, dims = _transposed_input(b), (1, 0)
    path = attr_path(src)
    t = ctx.param(path) if path is not None else None
    if t is None or t.dim() != 2 or not t.is_floating_point():
        return None
    return path, dims[0], dims[1]


def matmul_linear(ctx: RuleContext, node: fx.Node, a: Any, b: Any) -> bool:
    """``x @ W.T`` (``+ b`` is the next op's business) or ``x @ W`` with a parameter ``W``: a linear layer
    written as a matmul (transformers' ``FalconLinear``). Its output columns are new channels made by ``W``'s
    rows (columns for ``x @ W``), its input columns read ``x``'s channels. Returns False, recording nothing,
    for any other matmul."""
    found = weight_operand(ctx, b)
    sa, so = node_shape(a), node_shape(node)
    if found is None or not isinstance(a, fx.Node) or a.op == "get_attr" or sa is None or not so:
        return False
    path, in_dim, out_dim = found
    i = ctx.info(a)
    if i is not None and i.dim != len(sa) - 1:
        return False  # channels on a row or batch dim: a per-channel map of those, the matmul rule's case
    if i is not None:
        ctx.slice_param(path, in_dim, i.atoms, "consumer", node)
        ctx.exit(a)
    else:
        ctx.block(path, in_dim, node)
    out = ctx.new_channels(int(ctx.param(path).shape[out_dim]), path.rsplit(".", 1)[0] or node.name, "linear")
    ctx.slice_param(path, out_dim, out, "producer", node)
    ctx.output(node, ChanInfo(len(so) - 1, out), _producer_rule(path, None, out_dim))
    return True


def _module_tensors_only(x: Any, limit: int = 64) -> list[fx.Node] | None:
    """The ``get_attr`` nodes ``x`` is computed from when it reads module tensors only (no graph input, no
    module call, within ``limit`` nodes), else None: a weight computed in forward, not an activation."""
    seen: set[str] = set()
    attrs: list[fx.Node] = []
    stack = [x] if isinstance(x, fx.Node) else []
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if len(seen) > limit or n.op in ("placeholder", "call_module"):
            return None
        if n.op == "get_attr":
            attrs.append(n)
        stack.extend(n.all_input_nodes)
    return attrs or None


def reads_parameter(ctx: RuleContext, x: Any) -> str | None:
    """The path of a parameter that ``x``, computed from module tensors only, reads; else None."""
    attrs = _module_tensors_only(x) or []
    return next((n.target for n in attrs if isinstance(ctx.param(n.target), nn.Parameter)), None)


def matmul_creates(node: fx.Node) -> bool:
    """Whether a matmul may make channels: its right operand is a weight or is computed from module tensors
    only (the rules above decide from the tensors themselves); a product of two activations does not."""
    a, b = node_arg(node, 0, "input"), node_arg(node, 1, "other")
    if not isinstance(b, fx.Node) or not isinstance(a, fx.Node) or a.op == "get_attr":
        return False
    return _module_tensors_only(b) is not None


def computed_weight_matmul(ctx: RuleContext, node: fx.Node, b: Any) -> None:
    """A matmul by an operand computed from parameters in forward (``x @ (W * s).T``): its output columns
    are new channels kept whole, with the reason, so that the model is never left whole without one."""
    so = node_shape(node)
    path = reads_parameter(ctx, b)
    if path is None or not so:
        return ctx.output(node, None, None)
    out = ctx.new_channels(int(so[-1]), node.name, "linear")
    ctx.freeze(out, f"matmul '{node.name}' multiplies by '{getattr(b, 'name', b)}', computed in forward from "
                    f"parameter '{path}': its output channels are kept")
    ctx.output(node, ChanInfo(len(so) - 1, out), _never_zero(out.numel()))


def _never_zero(n: int) -> ZeroRule:
    return lambda z, gm: torch.zeros(n, dtype=torch.bool)


def _conv_cost(c: CostCall) -> int:
    w = c.module.weight.shape if c.module is not None else c.shape_of(c.arg(1, "weight"))
    return c.out_numel * math.prod(w[1:]) if w else 0


def _conv_t_cost(c: CostCall) -> int:
    w = c.module.weight.shape if c.module is not None else c.shape_of(c.arg(1, "weight"))
    return c.in_numel * math.prod(w[1:]) if w else 0


def _linear_cost(c: CostCall) -> int:
    w = c.module.weight.shape if c.module is not None else c.shape_of(c.arg(1, "weight"))
    return c.out_numel * w[-1] if w else 0


def _resize_conv(m: nn.Module, cin: int | None) -> None:
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups


def _resize_conv_t(m: nn.Module, cin: int | None) -> None:
    m.in_channels = m.weight.shape[0]
    m.out_channels = m.weight.shape[1] * m.groups


def _resize_linear(m: nn.Module, cin: int | None) -> None:
    m.out_features, m.in_features = m.weight.shape


register_rule(*_CONV, channels=conv_module, zeros="custom", cost=_conv_cost, kind="conv", resize=_resize_conv,
              creates=True, name="conv")
register_rule(F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d, channels=conv_function,
              zeros="custom", cost=_conv_cost, kind="conv", rewrite=conv_function_rewrite, creates=True,
              name="conv (functional)")
register_rule(*_CONV_T, channels=conv_transpose_module, zeros="custom", cost=_conv_t_cost, kind="conv_transpose",
              resize=_resize_conv_t, creates=True, name="conv_transpose")
register_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, aten.conv_transpose1d, aten.conv_transpose2d,
              aten.conv_transpose3d, channels=conv_transpose_function, zeros="custom", cost=_conv_t_cost,
              kind="conv_transpose", rewrite=conv_function_rewrite, creates=True, name="conv_transpose (functional)")
register_rule(nn.Linear, channels=linear_module, zeros="custom", cost=_linear_cost, kind="linear",
              resize=_resize_linear, creates=True, name="linear")
register_rule(F.linear, aten.linear, channels=linear_function, zeros="custom", cost=_linear_cost, kind="linear",
              creates=True, name="linear (functional)")

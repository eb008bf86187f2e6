"""Built-in rules for per-channel norms and scales: BatchNorm, InstanceNorm, GroupNorm, LocalResponseNorm, PReLU.

Each keeps every channel apart (GroupNorm: within its group), so a channel is sliced out of its statistics
and affine parameters with the layer that produced it. Module, functional and ATen forms share one entry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .api import ChanInfo, RuleContext, host, node_arg
from .api import tensor_at as _tensor
from .layers import _BATCHNORM, _INSTANCENORM, attr_path
from .registry import CostCall, register_rule

aten = torch.ops.aten

def _batchnorm(ctx: RuleContext, node: fx.Node, x: Any, paths: dict[str, str | None], eps: float,
               instance: bool) -> None:
    """A per-channel norm in eval mode: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``paths`` names the tensors (weight, bias, running_mean, running_var; None when absent). A zero input
    channel stays zero when its shift ``bias - weight * mean / sqrt(var + eps)`` is zero; a channel whose
    weight and bias are both zero is zero whatever comes in (not for instance norm, which has no running
    statistics and normalises per sample).
    """
    i = ctx.info(x)
    if i is None:
        return ctx.output(node, None, None)
    if i.dim != 1:
        ctx.freeze(i.atoms, f"norm '{node.name}' normalizes channels moved to dim {i.dim}")
        return ctx.output(node, None, None)
    for path in paths.values():
        if path is not None:
            ctx.slice_param(path, 0, i.atoms, "norm", node)
    src, n = x.name, i.atoms.numel()

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        t = {k: (host(_tensor(gm, p)).float() if p is not None else None) for k, p in paths.items()}
        gamma, beta, mean, var = t["weight"], t["bias"], t["running_mean"], t["running_var"]
        killed = (gamma == 0) & (beta == 0) if gamma is not None and beta is not None and not instance \
            else torch.zeros(n, dtype=torch.bool)
        if instance or mean is None:
            shift = beta if beta is not None else torch.zeros(n)
        else:  # eval mode: a zero input becomes beta - gamma * mean / sqrt(var + eps)
            g = gamma if gamma is not None else torch.ones(n)
            shift = (beta if beta is not None else 0) - g * mean / torch.sqrt(var + eps)
        return killed | (z[src] & (shift == 0))

    ctx.output(node, ChanInfo(1, i.atoms), rule)


def batchnorm_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    paths = {k: (f"{node.target}.{k}" if getattr(m, k, None) is not None else None)
             for k in ("weight", "bias", "running_mean", "running_var")}
    # An instance norm that tracks running statistics normalises with them in eval mode, as batch norm does.
    _batchnorm(ctx, node, node.args[0], paths, m.eps, isinstance(m, _INSTANCENORM) and not m.track_running_stats)


def batchnorm_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` with tensors read
    from the module (timm's ``BatchNormAct2d`` and friends call it)."""
    names = ("running_mean", "running_var", "weight", "bias")
    values = {k: node_arg(node, 1 + j, k) for j, k in enumerate(names)}
    _functional_norm(ctx, node, values, node_arg(node, 7, "eps", 1e-5))


def batchnorm_aten(ctx: RuleContext, node: fx.Node) -> None:
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``."""
    names = ("weight", "bias", "running_mean", "running_var")
    values = {k: node_arg(node, 1 + j, k) for j, k in enumerate(names)}
    _functional_norm(ctx, node, values, node_arg(node, 7, "eps", 1e-5))


def _functional_norm(ctx: RuleContext, node: fx.Node, values: dict[str, Any], eps: Any, instance: bool = False) -> None:
    paths = {k: attr_path(v) for k, v in values.items()}
    if any(v is not None and paths[k] is None for k, v in values.items()) or not isinstance(eps, (int, float)):
        return ctx.unsupported(node, "batch_norm with computed statistics or affine terms")
    _batchnorm(ctx, node, node.args[0], paths, float(eps), instance)


def instancenorm_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)`` and
    ``aten.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn)``
    (what torch.export makes of ``nn.InstanceNorm2d``): per channel, like the module. With
    ``use_input_stats=False`` it normalises with the running statistics, as batch norm in eval mode does."""
    order = ("weight", "bias", "running_mean", "running_var") if node.target is aten.instance_norm.default \
        or node.target is aten.instance_norm else ("running_mean", "running_var", "weight", "bias")
    values = {k: node_arg(node, 1 + j, k) for j, k in enumerate(order)}
    use_input_stats = node_arg(node, 5, "use_input_stats", True)
    if not isinstance(use_input_stats, bool):
        return ctx.unsupported(node, "instance_norm with a computed use_input_stats")
    _functional_norm(ctx, node, values, node_arg(node, 7, "eps", 1e-5), instance=use_input_stats)


def groupnorm_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    x = node.args[0]
    i = ctx.info(x)
    if i is None:
        return ctx.output(node, None, None)
    if i.dim != 1:
        ctx.freeze(i.atoms, f"GroupNorm '{node.name}' normalizes channels moved to dim {i.dim}")
        return ctx.output(node, None, None)
    per = m.num_channels // m.num_groups
    grid = i.atoms.view(m.num_groups, per)
    for k in range(1, per):  # only whole GroupNorm groups can go: tie each group's channels
        ctx.unite(grid[:, 0], grid[:, k])
    target = node.target
    if m.affine:
        ctx.slice_param(f"{target}.weight", 0, i.atoms, "norm", node)
        ctx.slice_param(f"{target}.bias", 0, i.atoms, "norm", node)
    n = i.atoms.numel()

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        m = gm.get_submodule(target)
        if not m.affine:
            return torch.zeros(n, dtype=torch.bool)
        return host((m.weight == 0) & (m.bias == 0))

    ctx.output(node, ChanInfo(1, i.atoms), rule)


def groupnorm_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` and ``aten.group_norm`` (same layout; PoolFormer
    and timm's ``GroupNorm1`` call it): whole GroupNorm groups go together, like the module form, and
    thinning rewrites ``num_groups`` (``groupnorm_function_rewrite``)."""
    x = node.args[0]
    i = ctx.info(x)
    groups = node_arg(node, 1, "num_groups")
    w, b = node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
    wpath, bpath = attr_path(w), attr_path(b)
    if i is None:
        return ctx.output(node, None, None)
    if not isinstance(groups, int) or (w is not None and wpath is None) or (b is not None and bpath is None):
        return ctx.unsupported(node, "group_norm with a computed group count or affine terms")
    if i.dim != 1:
        ctx.freeze(i.atoms, f"group_norm '{node.name}' normalizes channels moved to dim {i.dim}")
        return ctx.output(node, None, None)
    per = i.atoms.numel() // groups
    grid = i.atoms.view(groups, per)
    for k in range(1, per):  # only whole GroupNorm groups can go: tie each group's channels
        ctx.unite(grid[:, 0], grid[:, k])
    for path in (wpath, bpath):
        if path is not None:
            ctx.slice_param(path, 0, i.atoms, "norm", node)
    n = i.atoms.numel()

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        if wpath is None or bpath is None:
            return torch.zeros(n, dtype=torch.bool)
        return host((_tensor(gm, wpath) == 0) & (_tensor(gm, bpath) == 0))

    ctx.output(node, ChanInfo(1, i.atoms), rule)


def groupnorm_function_rewrite(gm: fx.GraphModule, node: fx.Node, view: Any) -> None:
    groups = node_arg(node, 1, "num_groups")
    kept, width = view.kept_count(node), view.width(node)
    if not isinstance(groups, int) or kept is None or width is None or kept == width:
        return
    new = kept // (width // groups)
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new}


def prelu_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    x = node.args[0]
    i = ctx.info(x)
    if i is not None and m.weight.numel() > 1:
        if i.dim != 1:
            ctx.freeze(i.atoms, f"PReLU '{node.name}' has per-channel slopes on dim 1")
            return ctx.output(node, None, None)
        ctx.slice_param(f"{node.target}.weight", 0, i.atoms, "consumer", node)
    ctx.passthrough(node, x, True)


def norm_cost(c: CostCall) -> int:
    return c.out_numel


def _resize_batchnorm(m: nn.Module, cin: int | None) -> None:
    if cin is not None:
        m.num_features = cin


def _resize_groupnorm(m: nn.Module, cin: int | None) -> None:
    if cin is not None:
        per = m.num_channels // m.num_groups
        m.num_channels, m.num_groups = cin, cin // per


def _resize_prelu(m: nn.Module, cin: int | None) -> None:
    if m.weight.numel() > 1:
        m.num_parameters = m.weight.numel()


register_rule(*_BATCHNORM, *_INSTANCENORM, channels=batchnorm_module, zeros="custom", cost=norm_cost, kind="norm",
              resize=_resize_batchnorm, name="batch_norm")
register_rule(F.batch_norm, channels=batchnorm_function, zeros="custom", cost=norm_cost, kind="norm",
              name="batch_norm (functional)")
register_rule(aten.batch_norm, channels=batchnorm_aten, zeros="custom", cost=norm_cost, kind="norm",
              name="batch_norm (aten)")
register_rule(nn.GroupNorm, channels=groupnorm_module, zeros="custom", cost=norm_cost, kind="norm",
              resize=_resize_groupnorm, name="group_norm")
# Normalisations that mix neighbouring channels, or whose functional form the analysis does not slice yet:
# known (costed, never an unknown op in strict mode), channels kept.
register_rule(F.group_norm, aten.group_norm, channels=groupnorm_function, zeros="custom", cost=norm_cost, kind="norm",
              rewrite=groupnorm_function_rewrite, name="group_norm (functional)")
register_rule(F.instance_norm, aten.instance_norm, channels=instancenorm_function, zeros="custom", cost=norm_cost,
              kind="norm", name="instance_norm (functional)")
register_rule(nn.LocalResponseNorm, nn.CrossMapLRN2d, F.local_response_norm,
              channels="freeze", cost=norm_cost, kind="norm", name="norm over neighbouring channels")
register_rule(nn.PReLU, channels=prelu_module, zeros="custom", cost="elementwise", resize=_resize_prelu, name="prelu")

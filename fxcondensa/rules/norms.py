"""Built-in rules for normalisations over the channel dim itself: LayerNorm, RMSNorm, a mean over channels.

Over the kept channels such a norm computes the dense function only if it keeps dividing by the dense
width and the removed channels are exactly zero where they enter it: zeros add nothing to the sums, and
the variance's ``mean^2`` per missing channel is added back (``fxcondensa.nn``). So the norm's input is an
exit (a channel may go only where it is zero there), its weight and bias are sliced with the channels, and
thinning swaps in ``WidthLayerNorm`` / ``WidthRMSNorm`` (or the functional ``layer_norm_width``) wherever
channels were removed. A channel whose weight and bias are both zero is zero at the output. This is what
makes the residual streams of transformers prunable.

A norm over several trailing dims that include the channel dim is still frozen with a reason; a norm over
other dims passes channels through.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import nn as fxnn
from . import shapes  # noqa: F401  (registered first: the mean entry refined here is shapes')
from .api import ChanInfo, KeptView, RuleContext, host, node_arg, node_shape, tensor_at
from .channel_norms import norm_cost
from .registry import refine_rule, register_rule

aten = torch.ops.aten

_RMS_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_RMS_FUNCTIONS = (F.rms_norm, aten.rms_norm) if hasattr(F, "rms_norm") else ()


def _tensor(gm: fx.GraphModule, path: str | None) -> torch.Tensor | None:
    if path is None:
        return None
    return tensor_at(gm, path)


def _norm(ctx: RuleContext, node: fx.Node, x: Any, ndims: int, what: str, weight: str | None,
          bias: str | None) -> None:
    """The shared channel rule: ``weight`` / ``bias`` are parameter paths (None when absent)."""
    i, shape = ctx.info(x), node_shape(x)
    if i is None:
        return ctx.output(node, None, None)
    if shape is None:
        return ctx.unsupported(node, f"{what} without shape metadata")
    if i.dim < len(shape) - ndims:  # normalised over other dims: a per-channel function
        return ctx.passthrough(node, x, False)
    if ndims != 1:
        ctx.freeze(i.atoms, f"{what} at node '{node.name}' normalizes over {ndims} dims that include the channel dim")
        return ctx.output(node, None, None)
    # Over fewer channels the norm stays exact only if the removed ones are zero at its input.
    ctx.exit(x)
    for path in (weight, bias):
        if path is not None:
            ctx.slice_param(path, 0, i.atoms, "norm", node)
    n = i.atoms.numel()

    def rule(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        w, b = _tensor(gm, weight), _tensor(gm, bias)
        if w is None:
            return torch.zeros(n, dtype=torch.bool)
        killed = host(w == 0)
        return killed & host(b == 0) if b is not None else killed

    ctx.output(node, ChanInfo(i.dim, i.atoms), rule)


def _param_path(node: fx.Node, name: str, m: nn.Module) -> str | None:
    return f"{node.target}.{name}" if isinstance(getattr(m, name, None), torch.Tensor) else None


_OWN_FORWARD = {nn.LayerNorm: nn.LayerNorm.forward, **{c: c.forward for c in _RMS_MODULES}}


def layernorm_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    base = next((c for c in _OWN_FORWARD if isinstance(m, c)), None)
    if base is not None and type(m).forward is not _OWN_FORWARD[base]:
        # A subclass with a forward of its own (a channels-first LayerNorm2d made a leaf) normalises over
        # a dim this rule cannot know.
        return ctx.unsupported(node, f"{type(m).__name__} '{node.target}' (a {base.__name__} with its own forward)")
    ndims = len(m.normalized_shape) if hasattr(m, "normalized_shape") else 1
    _norm(ctx, node, node.args[0], ndims, f"{type(m).__name__} '{node.target}'", _param_path(node, "weight", m),
          _param_path(node, "bias", m))


def _attr(value: Any) -> str | None:
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _functional(ctx: RuleContext, node: fx.Node, weight: Any, bias: Any, what: str) -> None:
    shape = node_arg(node, 1, "normalized_shape")
    if isinstance(shape, fx.Node):  # computed at run time (x.shape[-2:]): how many dims it covers is unknown
        return ctx.unsupported(node, f"{what} with a computed normalized_shape")
    ndims = len(shape) if isinstance(shape, (list, tuple)) else 1
    if (weight is not None and _attr(weight) is None) or (bias is not None and _attr(bias) is None):
        i = ctx.info(node.args[0])
        xs = node_shape(node.args[0])
        if i is not None and xs is not None and i.dim < len(xs) - ndims:
            return ctx.passthrough(node, node.args[0], False)
        return ctx.unsupported(node, f"{what} with a computed weight or bias")
    _norm(ctx, node, node.args[0], ndims, what, _attr(weight), _attr(bias))


def layernorm_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` and ``aten.layer_norm`` (same layout)."""
    _functional(ctx, node, node_arg(node, 2, "weight"), node_arg(node, 3, "bias"), "layer_norm")


def rmsnorm_function(ctx: RuleContext, node: fx.Node) -> None:
    """``F.rms_norm(x, normalized_shape, weight, eps)``."""
    _functional(ctx, node, node_arg(node, 2, "weight"), None, "rms_norm")


# ------------------------------------------------------------------------------------------- rewrites

def _narrowed(view: KeptView, node: fx.Node) -> tuple[int, int] | None:
    """(kept, dense width) of the norm's input channels when channels were removed there, else None."""
    x = node.args[0]
    kept, width = view.kept_count(x), view.width(x)
    if kept is None or width is None or kept == width:
        return None
    return kept, width


def _swap(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    owner, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, attr, new)


def _rewrite_module(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    found = _narrowed(view, node)
    m = gm.get_submodule(node.target)
    if found is None or isinstance(m, (fxnn.WidthLayerNorm, fxnn.WidthRMSNorm)):
        return  # the thinned width norms keep their dense width already
    kept, width = found
    if isinstance(m, nn.LayerNorm):
        new: nn.Module = fxnn.WidthLayerNorm(kept, width=width, eps=m.eps, weight=m.weight, bias=m.bias)
    else:  # nn.RMSNorm: eps None means the input dtype's machine epsilon, as in torch
        eps = m.eps if m.eps is not None else float(torch.finfo(node.meta["tensor_meta"].dtype).eps)
        new = fxnn.WidthRMSNorm(kept, width=width, eps=eps, weight=m.weight)
    new.train(m.training)
    _swap(gm, node.target, new)


def _rewrite_layer_norm(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    found = _narrowed(view, node)
    if found is None or node.target is fxnn.layer_norm_width:  # already divides by its dense width
        return
    weight, bias = node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
    eps = node_arg(node, 4, "eps", 1e-5)
    node.target = fxnn.layer_norm_width
    node.args, node.kwargs = (node.args[0], found[1], weight, bias, float(eps), -1), {}


def _rewrite_rms_norm(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    found = _narrowed(view, node)
    if found is None or node.target is fxnn.rms_norm_width:
        return
    eps = node_arg(node, 3, "eps")
    if eps is None:
        eps = float(torch.finfo(node.meta["tensor_meta"].dtype).eps)
    node.target = fxnn.rms_norm_width
    node.args, node.kwargs = (node.args[0], found[1], node_arg(node, 2, "weight"), float(eps), -1), {}


register_rule(nn.LayerNorm, *_RMS_MODULES, fxnn.WidthLayerNorm, fxnn.WidthRMSNorm, channels=layernorm_module,
              zeros="custom", cost=norm_cost, kind="norm", rewrite=_rewrite_module, name="layer_norm")
register_rule(F.layer_norm, aten.layer_norm, fxnn.layer_norm_width, channels=layernorm_function, zeros="custom",
              cost=norm_cost, kind="norm", rewrite=_rewrite_layer_norm, name="layer_norm (functional)")
register_rule(*_RMS_FUNCTIONS, fxnn.rms_norm_width, channels=rmsnorm_function, zeros="custom", cost=norm_cost,
              kind="norm", rewrite=_rewrite_rms_norm, name="rms_norm (functional)")


# ------------------------------------------------------------------------------------ mean over channels

def mean_rule(ctx: RuleContext, node: fx.Node) -> bool:
    """``x.mean(-1, keepdim=True)`` over the channel dim (Llama's RMSNorm written out): exact over the kept
    channels when they are divided by the dense width and the removed ones are zero at its input. Every
    other mean goes on to the ``mean`` entry of ``rules/shapes.py`` (False)."""
    x, dim = node.args[0], node_arg(node, 1, "dim")
    i, shape = ctx.info(x), node_shape(x)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    # mean_width(x, dim, keepdim, width), written by an earlier thin, holds the dense width where mean has dtype
    dtype = None if node.target is fxnn.mean_width else node_arg(node, 3, "dtype")
    if i is None or shape is None or len(dims) != 1 or not isinstance(dims[0], int) \
            or dims[0] % len(shape) != i.dim or dtype is not None:
        return False
    ctx.exit(x)
    ctx.output(node, None, None)
    return True


def _rewrite_mean(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    x = node.args[0]
    i, dim = view.info(x), node_arg(node, 1, "dim")
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    shape = node_shape(x)
    if i is None or shape is None or len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % len(shape) != i.dim:
        return
    kept, width = view.kept_count(x), view.width(x)
    if kept == width or node.target is fxnn.mean_width:  # already divides by its dense width
        return
    node.op, node.target = "call_function", fxnn.mean_width  # also for the method form x.mean(...)
    node.args, node.kwargs = (x, dims[0], bool(node_arg(node, 2, "keepdim", False)), width), {}


refine_rule(torch.mean, "mean", aten.mean, fxnn.mean_width, channels=mean_rule, rewrite=_rewrite_mean,
            name="mean over channels")

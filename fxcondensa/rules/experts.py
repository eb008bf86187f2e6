"""Built-in rules for mixture-of-experts layers stored as one 3-D weight per projection.

transformers 5 keeps a layer's experts as ``gate_up_proj: (experts, 2 * hidden, d)`` and
``down_proj: (experts, d, hidden)`` and runs them as a grouped matmul: the tokens, sorted by expert, times
``weight.transpose(-2, -1)`` (or the weight itself when it is stored ``(experts, in, out)``), expert ``e``
on its own rows. torch.export records ``torch.ops.transformers.grouped_mm_fallback`` (float32) or
``torch.ops.aten._grouped_mm`` (bfloat16, ``F.grouped_mm``).

Such a matmul is a linear layer per expert that shares one width: its output column ``j`` is row ``j`` of
every expert's weight, so a channel here is that column of all experts, scored over all their rows and
removed from all of them at once (one width is what the 3-D layout can hold). The rows of the input are
tokens, never channels; its columns are the contracted channels, sliced on the weight's input dim.

Example: a grouped matmul is looked up as a linear layer (so unstructured schemes and the cost model
count it as one, and thinning slices every expert's weight):
    >>> import torch
    >>> from fxcondensa.rules.registry import rule_for_key
    >>> rule = rule_for_key(torch.ops.aten._grouped_mm)
    >>> rule.name, rule.kind
    ('grouped_mm (experts)', 'linear')
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx

from .. import nn as fxnn
from .api import ChanInfo, RuleContext, ZeroRule, node_arg, node_shape
from .api import tensor_at as _tensor
from .layers import attr_path, zero_rows
from .registry import CostCall, register_rule, rule_for_key

aten = torch.ops.aten

_TRANSPOSE_CALLS = (torch.transpose, torch.swapaxes, aten.transpose.int)


def _swaps_last_two(node: fx.Node) -> fx.Node | None:
    """The 3-D tensor ``node`` transposes when it swaps its last two dims (``w.transpose(-2, -1)``)."""
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if x is None:
        return None
    if not ((node.op == "call_method" and node.target in ("transpose", "swapaxes"))
            or (node.op == "call_function" and node.target in _TRANSPOSE_CALLS)):
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
            return x
        return x if node.op == "call_method" and node.target == "mT" else None
    dims = (node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1"))
    return x if all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2} else None


def expert_weight_operand(ctx: RuleContext, w: Any) -> tuple[str, int, int] | None:
    """``(path, in_dim, out_dim)`` of the expert weight a grouped matmul multiplies by: a 3-D floating
    parameter stored ``(experts, in, out)``, or its transpose (``(experts, out, in)``, transformers' layout)."""
    if not isinstance(w, fx.Node):
        return None
    src, dims = w, (1, 2)
    if w.op != "get_attr":
        src, dims = _swaps_last_two(w), (2, 1)
    path = attr_path(src)
    t = ctx.param(path) if path is not None else None
    if t is None or t.dim() != 3 or not t.is_floating_point():
        return None
    return path, dims[0], dims[1]


def _producer(path: str, out_dim: int) -> ZeroRule:
    # An output column is exactly zero when that row is zero in every expert.
    return lambda z, gm: zero_rows(_tensor(gm, path), out_dim)


def grouped_mm_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``grouped_mm(x, W, offs)``: ``x``'s columns are read by ``W``'s input dim, the output columns are new
    channels made by ``W``'s output rows, one set for all experts."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    w = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in ("weight", "mat2", "mat_b")
                                                      if k in node.kwargs), None)
    bias = node_arg(node, 3, "bias")
    found = expert_weight_operand(ctx, w)
    sx, so = node_shape(x), node_shape(node)
    if found is None or bias is not None or sx is None or not so or len(sx) != 2:
        for a in (x, w):
            if isinstance(a, fx.Node) and ctx.info(a) is not None:
                ctx.freeze(ctx.info(a).atoms, f"grouped matmul '{node.name}' multiplies by a computed or biased "
                                              "expert weight: its channels are kept")
        return ctx.output(node, None, None)
    path, in_dim, out_dim = found
    i = ctx.info(x)
    if i is not None and i.dim != 1:
        ctx.freeze(i.atoms, f"grouped matmul '{node.name}' reads channels on its token rows")
        i = None
    if i is not None:
        ctx.slice_param(path, in_dim, i.atoms, "consumer", node)
        ctx.exit(x)
    else:
        ctx.block(path, in_dim, node)
    out = ctx.new_channels(int(ctx.param(path).shape[out_dim]), path, "linear")
    ctx.slice_param(path, out_dim, out, "producer", node)
    ctx.output(node, ChanInfo(1, out), _producer(path, out_dim))


def _grouped_mm_cost(c: CostCall) -> int:
    # Each token row goes through one expert: a linear layer's MACs.
    a = c.in_shapes[0] if c.in_shapes else None
    return c.out_numel * (a[-1] if a else 0)


def _aligned(gm: fx.GraphModule, w: Any) -> bool:
    """Whether the (thinned) expert weight ``w`` reads has both matrix widths at multiples of 16 bytes."""
    src = w if isinstance(w, fx.Node) and w.op == "get_attr" else _swaps_last_two(w) if isinstance(w, fx.Node) else None
    path = attr_path(src) if src is not None else None
    try:
        t = gm.get_parameter(path) if path is not None else None
    except AttributeError:
        return False
    if t is None or t.dim() != 3:
        return False
    step = max(1, 16 // t.element_size())
    return t.shape[-1] % step == 0 and t.shape[-2] % step == 0


def _rewrite_aligned(gm: fx.GraphModule, node: fx.Node, view: Any) -> None:
    """The grouped-matmul kernel takes rows of a multiple of 16 bytes only: a thinned expert weight calls the
    padding form (``fxcondensa.nn.grouped_mm_aligned``), which is exact and costs nothing when aligned."""
    if node.target is fxnn.grouped_mm_aligned:
        return
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("mat_a"))
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("mat2", node.kwargs.get("mat_b"))
    offs = node_arg(node, 2, "offs")
    rest = {k: v for k, v in node.kwargs.items() if k not in ("input", "mat_a", "mat2", "mat_b", "offs")}
    if offs is None or len(node.args) > 3 or any(v is not None for v in rest.values()):
        return  # a bias or an output dtype: left to the kernel
    if _aligned(gm, w):
        return  # the kernel takes these widths: the op stays as written (and the user's forward can follow)
    node.target, node.args, node.kwargs = fxnn.grouped_mm_aligned, (x, w, offs), {}


_GROUPED = [aten._grouped_mm, fxnn.grouped_mm_aligned]
if hasattr(torch.nn.functional, "grouped_mm"):
    _GROUPED.append(torch.nn.functional.grouped_mm)
register_rule(*_GROUPED, channels=grouped_mm_rule, zeros="custom", cost=_grouped_mm_cost, kind="linear",
              rewrite=_rewrite_aligned, creates=True, name="grouped_mm (experts)")


def register_transformers_rules() -> None:
    """transformers' grouped matmul custom op, once transformers' MoE integration has registered it (a model
    with such experts has imported it)."""
    if "transformers.integrations.moe" not in sys.modules:
        return
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if op is not None and rule_for_key(op) is None:
        register_rule(op, channels=grouped_mm_rule, zeros="custom", cost=_grouped_mm_cost, kind="linear",
                      creates=True, name="grouped_mm_fallback (transformers experts)")


# The removed experts' logits at -inf (``ExpertPrune``): the expert stage of ``thin`` removes router rows,
# never the channel stage, which would leave the mask pointing at experts that moved.
register_rule(fxnn.mask_experts, channels="freeze", zeros="fill", cost="elementwise", name="mask_experts (removed experts)")

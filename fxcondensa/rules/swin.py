"""Built-in rules for torchvision's Swin functions: ``shifted_window_attention`` (one call: heads, or head_dim
columns) and ``_patch_merging_pad``, registered once torchvision's Swin module is loaded.

Swin V2 keeps its heads (its bias comes from an MLP and a per-head logit scale). Thinning replaces the call
with ``fxcondensa.nn.window_attention`` with the dense softmax scale.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.fx as fx

from .. import nn as fxnn
from .api import ChanInfo, KeptView, RuleContext, host, node_arg, node_shape
from .api import tensor_at as _tensor
from .layers import fused_heads_zero, zero_rows
from .registry import CostCall, register_rule, rule_for_key

__all__ = ["swin_attention_rule", "patch_merging_pad_rule", "register_swin_rules"]

def swin_attention_rule(ctx: RuleContext, node: fx.Node) -> None:
    """torchvision's ``shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias,
    window_size, num_heads, shift_size, ...)`` (a wrapped function: one node), and
    ``fxcondensa.nn.window_attention`` that thinning puts in its place (keyword arguments, an explicit
    ``head_dim``). Channels last: the input's channels are the qkv weight's columns (an exit), the
    projection's rows are new channels. Heads are channels (q, k, v rows, out-projection columns, the
    relative position bias table's column); the bias node carries them and is their exit: a head goes only
    when its value rows or out-projection columns are zero. With ``head_dim=True`` head_dim columns are the
    channels instead (``_swin_columns``). Thinning calls ``fxcondensa.nn.window_attention`` with the dense
    softmax scale."""
    x = node_arg(node, 0, "input")
    wq, wp = node_arg(node, 1, "qkv_weight"), node_arg(node, 2, "proj_weight")
    bias_node = node_arg(node, 3, "relative_position_bias")
    num_heads = node_arg(node, 5, "num_heads")
    bq, bp = node_arg(node, 9, "qkv_bias"), node_arg(node, 10, "proj_bias")
    paths = {k: (v.target if isinstance(v, fx.Node) and v.op == "get_attr" else None)
             for k, v in (("wq", wq), ("wp", wp), ("bq", bq), ("bp", bp))}
    i, shape = ctx.info(x), node_shape(x)
    table = _bias_table(ctx, bias_node)
    if paths["wq"] is None or paths["wp"] is None or (bq is not None and paths["bq"] is None) or \
            (bp is not None and paths["bp"] is None) or not isinstance(num_heads, int) or shape is None or \
            (i is not None and i.dim != len(shape) - 1):
        return ctx.unsupported(node, "shifted_window_attention with computed weights")
    wq_t = ctx.param(paths["wq"])
    d = wq_t.shape[0] // (3 * num_heads)
    target = paths["wp"].rsplit(".", 1)[0]
    if i is not None:
        ctx.slice_param(paths["wq"], 1, i.atoms, "consumer", node)
        ctx.exit(x)
    else:
        ctx.block(paths["wq"], 1, node)
    logit = node_arg(node, 11, "logit_scale")
    if ctx.analysis.head_dim:
        _swin_columns(ctx, node, wq, paths, num_heads, d, cosine=logit is not None)
    else:
        _swin_heads(ctx, node, paths, bias_node, table, logit, num_heads, d)
    out = ctx.new_channels(ctx.param(paths["wp"]).shape[0], target, "linear")  # after: recipes keep their ids
    ctx.slice_param(paths["wp"], 0, out, "producer", node)
    if paths["bp"] is not None:
        ctx.slice_param(paths["bp"], 0, out, "bias", node)
    wp_path, bp_path = paths["wp"], paths["bp"]

    def out_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        zero = zero_rows(_tensor(gm, wp_path), 0)
        return zero & host(_tensor(gm, bp_path) == 0) if bp_path is not None else zero

    ctx.output(node, ChanInfo(len(shape) - 1, out), out_zero)


def _swin_heads(ctx: RuleContext, node: fx.Node, paths: dict[str, str | None], bias_node: Any, table: str | None,
                logit: Any, num_heads: int, d: int) -> None:
    """The heads of a Swin window attention as channels; frozen when the relative position bias is computed
    (Swin V2's continuous position bias MLP) or a logit scale is given, neither sliced here."""
    heads = ctx.new_channels(num_heads, f"{paths['wq'].rsplit('.', 1)[0]} (heads)", "linear")
    rows = heads.repeat_interleave(d)
    ctx.slice_param(paths["wq"], 0, rows.repeat(3), "producer", node)
    if paths["bq"] is not None:
        ctx.slice_param(paths["bq"], 0, rows.repeat(3), "bias", node)
    ctx.slice_param(paths["wp"], 1, rows, "consumer", node)
    if table is None or logit is not None:
        return ctx.freeze(heads, f"shifted_window_attention '{node.name}' has a relative position bias or logit "
                                 "scale that is not a parameter table")
    ctx.slice_param(table, 1, heads, "consumer", node)
    wq_path, wp_path, bq_path = paths["wq"], paths["wp"], paths["bq"]

    def head_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        return fused_heads_zero(gm, wq_path, bq_path, wp_path, num_heads, d)

    # The bias node (visited before this one, untracked so far) carries the heads on dim 1.
    ctx.analysis.infos[bias_node.name] = ChanInfo(1, heads)
    ctx.analysis.rules[bias_node.name] = head_zero
    ctx.exit(bias_node)


def _swin_columns(ctx: RuleContext, node: fx.Node, wq: fx.Node, paths: dict[str, str | None], num_heads: int,
                  d: int, cosine: bool) -> None:
    """The head_dim columns of a Swin window attention as channels: column ``j`` is row ``j`` of every head of
    q, k and v (one fused reshape: one head_dim) and column ``j`` of every head of the projection. The heads,
    the relative position bias and Swin V2's logit scale stay. Removing a column is exact when the head's
    output has nothing there (v or the projection zero) and no logit changes: q or k zero there for
    ``q @ k^T``; for Swin V2's cosine attention both, since q and k are normalised over head_dim (a zero
    column adds nothing to a norm; a live one would). The key bias does not count there: V2 zeroes it."""
    cols = ctx.new_channels(d, f"{paths['wq'].rsplit('.', 1)[0]} (head_dim)", "linear")
    ctx.analysis.head_dim_atoms.append(cols)
    rows = cols.repeat(num_heads)
    ctx.slice_param(paths["wq"], 0, rows.repeat(3), "producer", node)
    if paths["bq"] is not None:
        ctx.slice_param(paths["bq"], 0, rows.repeat(3), "bias", node)
    ctx.slice_param(paths["wp"], 1, rows, "consumer", node)
    wq_path, bq_path, wp_path, e = paths["wq"], paths["bq"], paths["wp"], num_heads * d

    def column_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        w = _tensor(gm, wq_path).detach()
        b = _tensor(gm, bq_path).detach() if bq_path is not None else None

        def part(s: int, bias: bool = True) -> torch.Tensor:  # per column: zero in every head of q, k or v
            found = zero_rows(w[s * e:(s + 1) * e].reshape(num_heads, d, -1).transpose(0, 1).reshape(d, -1), 0)
            if b is not None and bias:
                found &= zero_rows(b[s * e:(s + 1) * e].reshape(num_heads, d).t(), 0)
            return found

        logits_kept = part(0) & part(1, bias=False) if cosine else part(0) | part(1)
        out = zero_rows(_tensor(gm, wp_path).detach().reshape(-1, num_heads, d).permute(2, 0, 1).reshape(d, -1), 0)
        return (logits_kept & (part(2) | out)).repeat(3 * num_heads)

    # No tensor of the graph carries the columns (they live inside the call); the qkv weight's rows do, so
    # that node is their exit: a column goes only when it adds nothing (zero rule above, one per row).
    ctx.analysis.infos[wq.name] = ChanInfo(0, rows.repeat(3))
    ctx.analysis.rules[wq.name] = column_zero
    ctx.exit(wq)


def _bias_table(ctx: RuleContext, bias: Any) -> str | None:
    """The parameter table behind ``_get_relative_position_bias(table, index, window_size)``, or None."""
    import sys

    module = sys.modules.get("torchvision.models.swin_transformer")
    if not (isinstance(bias, fx.Node) and bias.op == "call_function" and module is not None
            and bias.target is getattr(module, "_get_relative_position_bias", None)):
        return None
    table = bias.args[0]
    if not (isinstance(table, fx.Node) and table.op == "get_attr") or ctx.param(table.target) is None \
            or len(bias.users) != 1:
        return None
    return table.target


def _rewrite_swin_attention(gm: fx.GraphModule, node: fx.Node, view: KeptView) -> None:
    """Call ``fxcondensa.nn.window_attention`` with the kept head count and head_dim (one stage changes one
    of them: heads, or head_dim columns with ``analyze(gm, head_dim=True)``) and the dense softmax scale."""
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
    call = {k: (node.args[j] if j < len(node.args) else node.kwargs.get(k, _SWIN_DEFAULTS.get(k)))
            for j, k in enumerate(names)}
    heads, w = call["num_heads"], call["qkv_weight"]
    dense_rows = next((s.atoms.numel() for s in view.analysis.slices
                       if isinstance(w, fx.Node) and s.path == w.target and s.dim == 0), None)
    if dense_rows is None:  # the rule kept the call whole (computed weights): it runs as it is
        return
    if node.target is fxnn.window_attention:
        d, scale = node.kwargs["head_dim"], node.kwargs.get("scale")
        if scale is None:  # head_dim is still the dense one
            scale = fxnn.default_scale(d)
    else:  # torchvision's: q * (C // num_heads) ** -0.5, C the dense input width (in the shape metadata)
        d, scale = dense_rows // (3 * heads), fxnn.default_scale(node_shape(call["input"])[-1] // heads)
    rows = _tensor(gm, w.target).shape[0]  # sliced: 3 * kept heads * kept head_dim
    if view.analysis.head_dim:
        d = rows // (3 * heads)
    else:
        heads = rows // (3 * d)
    node.target = fxnn.window_attention
    node.args, node.kwargs = (), {**call, "num_heads": heads, "head_dim": d, "scale": scale}


_SWIN_DEFAULTS = {"attention_dropout": 0.0, "dropout": 0.0, "training": True}


def patch_merging_pad_rule(ctx: RuleContext, node: fx.Node) -> None:
    """torchvision's ``_patch_merging_pad(x)``: pads H and W, concatenates the four 2x2 phases on the
    channels (last dim): the channels repeat four times."""
    x = node.args[0]
    i, shape = ctx.info(x), node_shape(x)
    if i is None or shape is None or i.dim != len(shape) - 1:
        return ctx.unsupported(node, "_patch_merging_pad of channels not on the last dim")
    name = x.name
    ctx.output(node, ChanInfo(i.dim, i.atoms.repeat(4)), lambda z, gm: z[name].repeat(4))


def _swin_cost(c: CostCall) -> int:
    x, wq = c.in_shapes[0] if c.in_shapes else None, c.shape_of(c.arg(1, "qkv_weight"))
    wp = c.shape_of(c.arg(2, "proj_weight"))
    ws = c.arg(4, "window_size")
    if not x or not wq or not wp or not isinstance(ws, (list, tuple)):
        return 0
    tokens, n = math.prod(x[:-1]), ws[0] * ws[1]
    return tokens * (wq[0] * wq[1] + wp[0] * wp[1] + 2 * n * wp[1])


def register_swin_rules() -> None:
    """torchvision's Swin functions, once torchvision's Swin module is loaded (a model that calls them has
    imported it), and ``fxcondensa.nn.window_attention``."""
    if rule_for_key(fxnn.window_attention) is None:  # a thinned model thinned again (or its head_dim stage)
        register_rule(fxnn.window_attention, channels=swin_attention_rule, zeros="custom", cost=_swin_cost,
                      kind="matmul", rewrite=_rewrite_swin_attention, creates=True,
                      name="window_attention (thinned)")
    module = sys.modules.get("torchvision.models.swin_transformer")
    if module is None:
        return
    for fname, kwargs in (
        ("shifted_window_attention", dict(channels=swin_attention_rule, cost=_swin_cost, kind="matmul",
                                          rewrite=_rewrite_swin_attention, creates=True)),
        ("_patch_merging_pad", dict(channels=patch_merging_pad_rule, cost="none")),
    ):
        fn = getattr(module, fname, None)
        if fn is not None and rule_for_key(fn) is None:
            register_rule(fn, zeros="custom", name=fname, **kwargs)

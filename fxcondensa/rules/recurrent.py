"""Built-in rules for recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (multi-layer, bidirectional).

Input features are columns of ``weight_ih_l0`` (and ``weight_ih_l0_reverse``): they follow the input's
channels, and the input is an exit. Hidden units are channels: unit ``j`` owns row ``j`` of every gate block
of ``weight_ih_l{k}`` / ``weight_hh_l{k}`` and the biases, column ``j`` of ``weight_hh_l{k}``, and the columns
``d * hidden + j`` of the next layer's ``weight_ih``. One ``hidden_size`` serves every layer and direction, so
unit ``j`` is one channel across all of them.

A unit whose rows are all zero (every gate, every layer and direction, biases too) starts at zero and stays
zero: LSTM ``c = sigmoid(0) * c + sigmoid(0) * tanh(0) = c / 2``, GRU ``h = (1 - z) * tanh(0) + z * h``,
RNN ``h = tanh(0)``. Then nothing it feeds changes when it is removed. The layer node is that condition's
exit: a unit goes only when it is such a unit. An initial state passed by the caller, ``proj_size`` or a
packed sequence keep the layer whole, with a reason.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .api import ChanInfo, RuleContext, node_arg, node_shape
from .layers import zero_rows
from .registry import CostCall, register_rule

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _gates(m: nn.Module) -> int:
    return next(g for cls, g in _GATES.items() if isinstance(m, cls))


def _names(m: nn.Module) -> list[tuple[int, str]]:
    """(layer, suffix) for every layer and direction."""
    dirs = ["", "_reverse"] if m.bidirectional else [""]
    return [(k, f"l{k}{d}") for k in range(m.num_layers) for d in dirs]


def rnn_module(ctx: RuleContext, node: fx.Node) -> None:
    m = ctx.module(node)
    x = node.args[0]
    what = f"{type(m).__name__} '{node.target}'"
    i, shape = ctx.info(x), node_shape(x)
    hx = node_arg(node, 1, "hx")
    reason = None
    if shape is None:
        reason = "has no shape metadata (a packed sequence?)"
    elif hx is not None:
        reason = "is called with an initial state"
    elif getattr(m, "proj_size", 0):
        reason = "has proj_size"
    elif i is not None and i.dim != len(shape) - 1:
        reason = f"reads channels on dim {i.dim}"
    if reason is not None:  # its units are named as a frozen group, so that the report says why
        ctx.freeze(ctx.new_channels(m.hidden_size, str(node.target), "linear"), f"{what} {reason}")
        if i is not None:
            ctx.freeze(i.atoms, f"{what} {reason}")
        return ctx.output(node, None, None)
    target, g, h = str(node.target), _gates(m), m.hidden_size
    dirs = 2 if m.bidirectional else 1
    hid = ctx.new_channels(h, target, "linear")
    rows = hid.repeat(g)
    for k, suffix in _names(m):
        ctx.slice_param(f"{target}.weight_ih_{suffix}", 0, rows, "producer", node)
        ctx.slice_param(f"{target}.weight_hh_{suffix}", 0, rows, "producer", node)
        ctx.slice_param(f"{target}.weight_hh_{suffix}", 1, hid, "consumer", node)
        if m.bias:
            ctx.slice_param(f"{target}.bias_ih_{suffix}", 0, rows, "bias", node)
            ctx.slice_param(f"{target}.bias_hh_{suffix}", 0, rows, "bias", node)
        if k == 0:
            if i is not None:
                ctx.slice_param(f"{target}.weight_ih_{suffix}", 1, i.atoms, "consumer", node)
            else:
                ctx.block(f"{target}.weight_ih_{suffix}", 1, node)
        else:
            ctx.slice_param(f"{target}.weight_ih_{suffix}", 1, hid.repeat(dirs), "consumer", node)
    if i is not None:
        ctx.exit(x)
    names = _names(m)

    def unit_zero(z: dict[str, Any], gm: fx.GraphModule) -> torch.Tensor:
        mod = gm.get_submodule(target)
        zero = torch.ones(h, dtype=torch.bool)
        for _, suffix in names:
            tensors = [getattr(mod, f"weight_ih_{suffix}"), getattr(mod, f"weight_hh_{suffix}")]
            if mod.bias:
                tensors += [getattr(mod, f"bias_ih_{suffix}"), getattr(mod, f"bias_hh_{suffix}")]
            for t in tensors:
                t = t.detach()
                zero &= zero_rows(t.reshape(g, -1, *t.shape[1:]).movedim(0, 1).reshape(t.shape[0] // g, -1), 0)
        return zero

    # The node itself (a tuple) carries the hidden units and is their exit; its items are read by getitem.
    ctx.output(node, ChanInfo(0, hid), unit_zero)
    ctx.exit(node)
    nd = len(shape)
    out = (ChanInfo(nd - 1, hid.repeat(dirs)), lambda z, gm: unit_zero(z, gm).repeat(dirs))
    state = ChanInfo(2 if nd == 3 else 1, hid)
    if isinstance(m, nn.LSTM):
        final = ([state, state], lambda z, gm: [unit_zero(z, gm)] * 2)
    else:
        final = (state, unit_zero)
    ctx.analysis.tuple_outputs[node.name] = {0: out, 1: final}


def _resize_rnn(m: nn.Module, cin: int | None) -> None:
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    m.flatten_parameters()


def _rnn_cost(c: CostCall) -> int:
    m, x = c.module, (c.in_shapes[0] if c.in_shapes else None)
    if m is None or x is None:
        return 0
    steps = x[0] * x[1] if len(x) == 3 else x[0]
    per_step = sum(getattr(m, f"weight_ih_{s}").numel() + getattr(m, f"weight_hh_{s}").numel() for _, s in _names(m))
    return steps * per_step


register_rule(nn.LSTM, nn.GRU, nn.RNN, channels=rnn_module, zeros="custom", cost=_rnn_cost, kind="linear",
              resize=_resize_rnn, creates=True, name="recurrent")

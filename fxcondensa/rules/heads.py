"""Attention heads and head_dim columns as the structured schemes and the thinning pass see them.

The rules (``rules/attention.py``, ``rules/swin.py``) make heads, or with ``head_dim=True`` head_dim
columns, channels of the channel analysis; this module answers, for an analysis, which of its channels they
are. ``StructurePrune(attention=...)`` and ``thin``'s head_dim stage both read these answers.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .api import ChanInfo, node_arg, node_shape
from .registry import rule_for_key
from .swin import swin_attention_rule

__all__ = ["attention_product", "has_attention_products", "head_channels", "head_dim_channels"]

aten = torch.ops.aten

_HEAD_OPS = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
_MATMULS = (torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm", "__matmul__", aten.matmul, aten.bmm)


def attention_product(node: fx.Node) -> bool:
    """``scaled_dot_product_attention`` or a batched matmul (an ATen overload counts as its packet)."""
    op = getattr(node.target, "overloadpacket", node.target)
    return (node.op == "call_function" and op in _HEAD_OPS
            or node.op in ("call_function", "call_method") and op in _MATMULS)


def has_attention_products(gm: fx.GraphModule) -> bool:
    """Whether the graph multiplies anything the way attention does (``scaled_dot_product_attention`` or a
    batched matmul): where head_dim columns can be, even when no head was recognised (multi-query)."""
    return any(attention_product(node) for node in gm.graph.nodes)


def head_channels(gm: fx.GraphModule, analysis: Any) -> torch.Tensor:
    """Bool per channel of ``analysis``: True where the channel is an attention head (or heads tied to it),
    as recognised by the rules (``rules/attention.py``, ``rules/swin.py``): heads reaching ``scaled_dot_product_attention`` or a batched matmul,
    and the heads of ``nn.MultiheadAttention`` modules and of Swin's window attention calls."""
    heads = torch.zeros(analysis.num_channels, dtype=torch.bool)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        atoms = None
        info = analysis.infos.get(node.name)
        if attention_product(node):
            shape = node_shape(node)
            if isinstance(info, ChanInfo) and shape is not None and info.dim < len(shape) - 2:
                atoms = info.atoms
        elif node.op == "call_module" and isinstance(modules.get(node.target), nn.MultiheadAttention):
            path = f"{node.target}.in_proj_weight"
            atoms = next((s.atoms for s in analysis.slices if s.path == path and s.dim == 0), None)
        elif node.op == "call_function" and getattr(rule_for_key(node.target), "channels", None) is swin_attention_rule:
            w = node_arg(node, 1, "qkv_weight")  # Swin's window attention: its qkv rows are its heads
            path = w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None
            atoms = next((s.atoms for s in analysis.slices if s.path == path and s.dim == 0), None)
        if atoms is not None and atoms.numel():
            heads[analysis.channel_of[atoms]] = True
    return heads


def head_dim_channels(analysis: Any, into: Any = None) -> torch.Tensor:
    """Bool per channel of an analysis made with ``head_dim=True``: True where the channel is a head_dim
    column of some attention (shared by all its heads). With ``into`` (another analysis of the same graph; both
    number atoms alike), per channel of ``into``: True where it holds atoms of such columns.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.analysis import analyze
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = mha
        ...     def forward(self, x):
        ...         return self.attn(x, x, x, need_weights=False)[0]
        >>> gm = fxcondensa.trace(Block(), torch.randn(1, 3, 8))
        >>> int(head_dim_channels(analyze(gm, head_dim=True)).sum())  # 8 / 2 heads: 4 columns
        4
    """
    target = analysis if into is None else into
    found = torch.zeros(target.num_channels, dtype=torch.bool)
    for atoms in analysis.head_dim_atoms:
        if atoms.numel():
            found[target.channel_of[atoms]] = True
    return found

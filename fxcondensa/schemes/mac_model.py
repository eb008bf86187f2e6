"""MACs of a thinned model estimated from kept channels, without building it: what a MAC target
(``StructurePrune(target_flops=...)``) bisects over.

Each node's MACs come from its registry entry as cost terms (``fxcondensa.rules.registry.CostTerm``), each
a product over tensor dims; a term shrinks with the kept fraction of every tracked dim it names. The
attention entries say how their MACs split (projections, ``q @ k^T``, ``attn @ v``), so this module knows
no op by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ..passes.costs import node_cost_terms, profile_costs
from ..rules.api import ChanInfo, ChannelAnalysis, node_shape
from ..rules.registry import Scale

__all__ = ["MacModel"]

# One tensor dim a MAC term scales with: per analysis that tracks it, the channel id of each index along it.
_Axis = list[tuple[int, torch.Tensor]]


class MacModel:
    """MACs of a thinned model estimated from kept channels, without building it.

    Each node's dense MACs (from ``profile_costs``) split into the cost terms of its registry entry; a term
    scales with the kept fraction of every tracked dim it names: for a conv / linear its output channels and
    the input channels it sums over; for a matmul the contracted dim of its first operand where that dim is
    tracked (``q @ k^T`` over head_dim columns); for ``scaled_dot_product_attention`` the query's heads and
    columns for ``q @ k^T`` and the query's heads and the value's columns for ``attn @ v``; for a
    ``MultiheadAttention`` its heads and columns, times the input channels for the in-projection and the
    output channels for the out-projection.

    ``analyses`` are the channel analysis and, with head_dim pruning, the head_dim analysis of the same graph
    (``fraction`` takes one keep vector per analysis). A dim both analyses track (the q/k/v projection's
    rows: heads in one, columns in the other) keeps the indices both keep; dims tracked apart multiply.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.analysis import analyze
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> a = analyze(gm)
        >>> keep = torch.ones(a.num_channels, dtype=torch.bool)
        >>> MacModel(gm, [a]).fraction([keep])
        1.0
        >>> keep[a.groups[0].channels[:10]] = False  # half of conv1's filters: conv1, its ReLU and pool, conv2's input
        >>> round(MacModel(gm, [a]).fraction([keep]), 3)
        0.589
    """

    def __init__(self, gm: fx.GraphModule, analyses: Sequence[ChannelAnalysis]):
        self.analyses = list(analyses)
        self.terms: list[tuple[float, list[_Axis]]] = []
        nodes = {n.name: n for n in gm.graph.nodes}
        self.total = 0.0
        for cost in profile_costs(gm, count_nonzero=False):
            if not cost.macs:
                continue
            self.total += cost.macs
            node = nodes[cost.name]
            for term in node_cost_terms(gm, node)[1]:
                axes = [axis for scale in term.scales for axis in self._axes(node, scale)]
                self.terms.append((float(term.macs), [axis for axis in axes if axis]))

    def _axes(self, node: fx.Node, scale: Scale) -> list[_Axis]:
        """The tracked dims a cost term of ``node`` scales with, one axis per dim."""
        if isinstance(scale.value, str):  # a parameter's dim: the channels of the slices along it
            return [[(i, a.channel_of[s.atoms]) for i, a in enumerate(self.analyses) for s in a.slices
                     if s.path == scale.value and s.dim == scale.dims]]
        axes = self._tracked(scale.value, scale.dims)
        if scale.value is not node:
            # a grouped conv's input channels are its output channels (counted once)
            axes = {d: [(i, ch) for i, ch in axis if node.name not in {g.node for g in self.analyses[i].grouped}]
                    for d, axis in axes.items()}
        return list(axes.values())

    def _tracked(self, node: Any, dims: str | int) -> dict[int, _Axis]:
        """The tracked dims of ``node``'s output, by dim, in every analysis: ``dims`` "all", "last" (its last
        dim only) or "lead" (all but its last)."""
        axes: dict[int, _Axis] = {}
        shape = node_shape(node)
        ndim = len(shape) if shape is not None else None
        for i, a in enumerate(self.analyses):
            info = a.infos.get(getattr(node, "name", None))
            if not isinstance(info, ChanInfo) or not info.atoms.numel():
                continue
            dim = info.dim % ndim if ndim else info.dim
            last = ndim is not None and dim == ndim - 1
            if dims == "all" or (dims == "last" and last) or (dims == "lead" and not last):
                axes.setdefault(dim, []).append((i, a.channel_of[info.atoms]))
        return axes

    def fraction(self, keeps: Sequence[torch.Tensor]) -> float:
        """Estimated thinned MACs over dense MACs; ``keeps``: one bool per channel id of each analysis."""
        kept = 0.0
        for macs, axes in self.terms:
            f = macs
            for axis in axes:
                ks = [keeps[i][ch] for i, ch in axis]
                if all(k.shape == ks[0].shape for k in ks):  # an index stays where every analysis keeps it
                    both = ks[0]
                    for k in ks[1:]:
                        both = both & k
                    f *= float(both.double().mean())
                else:
                    for k in ks:
                        f *= float(k.double().mean())
            kept += f
        return kept / self.total if self.total else 1.0


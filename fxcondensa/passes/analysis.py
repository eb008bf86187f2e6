"""The channel analysis as a pass: ``analyze`` walks a graph with the registry's rules, and the results
are read by the schemes and the thinning pass (which channels are zero now, which can go, which must stay
for the thinned layers to run).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx

from .. import rules
from ..rules import registry
from ..rules.api import ChannelAnalysis
from .channels import ChannelWalker
from .reference import masked_view

__all__ = ["analyze", "zero_channels", "removable_channels", "keep_one_per_slice", "balance_grouped"]


def analyze(gm: fx.GraphModule, *, strict: bool = False, head_dim: bool = False) -> ChannelAnalysis:
    """Channel dependency analysis of a traced, shape-annotated ``GraphModule``.

    Writes each node's tracked channel dim (``ChanInfo`` or None) to ``node_record(node).chan`` and returns
    the ``ChannelAnalysis`` with groups, slices and frozen reasons. ``strict=True`` raises
    ``UnknownOpError`` at the first op without a rule, and ``RuleFailedError`` at the first whose rule raises,
    instead of freezing its group.
    ``head_dim=True`` makes each head_dim column of an attention (shared by all its heads) a channel instead
    of each head (``thin`` runs it as a second stage; see ``rules/attention.py``).

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.analysis import analyze
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> a = analyze(gm)
        >>> [(g.name, g.channels.numel(), g.frozen) for g in a.groups][:2]
        [('conv1', 20, []), ('conv2', 50, [])]
    """
    key = (_graph_key(gm), strict, registry.generation())
    cache = _HEAD_DIM_CACHE if head_dim else _CACHE  # a scheme asking for both keeps both
    cached = cache.get(gm)
    if cached is not None and cached[0] == key:
        return cached[1]
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("analyze needs shape metadata: trace the model with example inputs "
                         "(fxcondensa.trace(model, example_inputs))")
    rules.register_optional_rules()
    ctx = ChannelWalker(gm, strict=strict)
    ctx.analysis.head_dim = head_dim
    analysis = ctx.run()
    # Schemes and thin analyse the same graph in turn; the result depends on structure, shapes and the
    # registry only (zero rules read the weights when they run), so it is kept until one of them changes.
    cache[gm] = (key, analysis)
    return analysis


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HEAD_DIM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_key(gm: fx.GraphModule) -> tuple:
    return tuple((n.name, n.op, str(n.target), id(n.meta.get("tensor_meta"))) for n in gm.graph.nodes)


@torch.no_grad()
def zero_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, Any]:
    """For each tracked node, a CPU bool vector: True where that channel is identically zero (eval mode)."""
    zeros: dict[str, Any] = {}
    for node in gm.graph.nodes:
        rule = analysis.rules.get(node.name)
        if rule is not None:
            zeros[node.name] = rule(zeros, gm)
    return zeros


def removable_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> torch.Tensor:
    """Bool per channel (CPU): True where the channel is zero at every exit and its group is not frozen."""
    zeros = zero_channels(masked_view(gm), analysis)  # the compressed values, where masks are kept aside
    live = torch.zeros(analysis.num_channels, dtype=torch.bool)
    for name in analysis.exits:
        info = analysis.infos[name]
        live[analysis.channel_of[info.atoms[~zeros[name].to("cpu")]]] = True
    return ~live & ~analysis.frozen_channels()


def keep_one_per_slice(analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the best channel (by ``score``, else the first) of any sliced tensor dim that would keep none:
    a conv with no filters, or a cat part with no channels, cannot run."""
    keep = keep.clone()
    if not analysis.slices:
        return keep
    # Which slices keep nothing, counted for all at once (a loop over hundreds of slices costs more than
    # the rest of the selection); keep only grows, so the loop needs to look at those slices only.
    sizes = torch.tensor([s.atoms.numel() for s in analysis.slices])
    owner = torch.repeat_interleave(torch.arange(len(analysis.slices)), sizes)
    channels = analysis.channel_of[torch.cat([s.atoms for s in analysis.slices])]
    kept = torch.zeros(len(analysis.slices), dtype=torch.long).index_add_(0, owner, keep[channels].long())
    for k in torch.nonzero(kept == 0).flatten().tolist():
        ch = analysis.channel_of[analysis.slices[k].atoms]
        if ch.numel() and not bool(keep[ch].any()):
            keep[ch[int(torch.argmax(score[ch].nan_to_num(float("-inf"))))] if score is not None else ch[0]] = True
    return keep


def balance_grouped(analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Make ``keep`` feasible: one index in every sliced dim, and equal kept counts in the non-empty conv
    groups of each tied grouped conv (more channels kept, best ``score`` first). Keeping a removable
    channel never changes the outputs."""
    keep = keep_one_per_slice(analysis, keep, score)
    changed = True
    while changed:
        changed = False
        for gc in analysis.grouped:
            ch = analysis.channel_of[gc.out_atoms].view(gc.groups, -1)
            k = keep[ch]
            counts = k.sum(1)
            target = int(counts.max())
            for j in torch.nonzero((counts > 0) & (counts < target)).flatten().tolist():
                missing = ch[j][~k[j]]
                order = torch.argsort(score[missing], descending=True) if score is not None else torch.arange(len(missing))
                keep[missing[order[: target - int(counts[j])]]] = True
                changed = True
    return keep

"""Channel selection: which channels a structured scheme keeps, given one score per channel.

One global threshold over the candidates' scores keeps a density (Condensa's rule); groups may have
densities of their own; every group keeps at least one channel, ``align`` rounds kept counts, and tied
grouped convs keep equal counts per conv group. Shared by the structured schemes and the latency model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import functional as F
from .analysis import balance_grouped
from .channels import ChannelAnalysis

__all__ = ["select_channels"]


def select_channels(analysis: ChannelAnalysis, score: torch.Tensor, candidate: torch.Tensor, density: float,
                    own: Mapping[int, float], align: int | None) -> torch.Tensor:
    """Bool per channel: True keeps. Non-candidates are always kept.

    Global rule: one threshold over the candidates' scores keeps a ``density`` fraction (Condensa's rule).
    ``own`` maps group ids to densities of their own. Every group keeps at least one channel (``align``
    when given), ``align`` rounds each group's kept count up to a multiple of it, and tied grouped convs
    keep equal counts per conv group.
    """
    keep = ~candidate.clone()
    glob = candidate.clone()
    for g in own:
        glob[analysis.groups[g].channels] = False
    if glob.any():
        threshold = F.magnitude_threshold(score[glob], density)
        keep |= glob & (score >= threshold)
    for g, d in own.items():
        ch = analysis.groups[g].channels
        ch = ch[candidate[ch]]
        if ch.numel():
            k = F.keep_count(ch.numel(), d)
            keep[ch[torch.topk(score[ch], k).indices]] = True
    for group in analysis.groups:
        ch = group.channels[candidate[group.channels]]
        if not ch.numel():
            continue
        kept = int(keep[ch].sum()) + int((~candidate[group.channels]).sum())
        total = group.channels.numel()
        want = max(kept, 1)
        if align:
            want = min(total, max(align, -(-want // align) * align))
        extra = want - kept
        if extra > 0:
            dropped = ch[~keep[ch]]
            keep[dropped[torch.topk(score[dropped], min(extra, dropped.numel())).indices]] = True
    return balance_grouped(analysis, keep, score)

"""Kept channels at a density: one global threshold over the candidates' scores, given one score per channel.

One global threshold over the candidates' scores keeps a density (Condensa's rule); groups may have
densities of their own; every group keeps at least one channel, ``align`` rounds kept counts, and tied
grouped convs keep equal counts per conv group. Every strategy of ``selection.select`` (density, MAC target,
latency target) picks its channels with it.

``multiple`` (the structured schemes pass ``HW_MULTIPLE`` when no ``align`` is given) rounds the threshold's
kept count of every wide group to the *nearest* multiple, so that the total stays within half a multiple of
the density's count: CPU kernels (oneDNN's 8-channel blocks on AVX2, 16 on AVX-512) and GPU tensor cores
pad a channel count up to such a multiple, so 33 channels run like 40. Which groups round up and which
down follows ``memory_cost`` (activation elements per MAC of each channel, from shapes only): channels of
high-resolution, memory-bound layers cost more time than their MACs say, so those round down first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx

from .. import functional as F
from ..passes.analysis import balance_grouped, keep_one_per_slice
from ..passes.costs import profile_costs
from ..rules.api import ChanInfo, ChannelAnalysis

__all__ = ["select_channels", "memory_cost", "HW_MULTIPLE", "MULTIPLE_MIN_WIDTH"]

# The multiple the default selection rounds wide groups to: oneDNN's channel block on AVX2 and the
# smallest count fp16/bf16 tensor cores run unpadded.
HW_MULTIPLE = 8
# Groups narrower than this many multiples are left alone: there one multiple is too large a share of the
# layer (rounding moves a count by up to multiple - 1 channels), and small models keep their exact counts.
MULTIPLE_MIN_WIDTH = 8


def select_channels(analysis: ChannelAnalysis, score: torch.Tensor, candidate: torch.Tensor, density: float,
                    own: Mapping[int, float], align: int | None, *, multiple: int | None = None,
                    cost: torch.Tensor | None = None) -> torch.Tensor:
    """Bool per channel: True keeps. Non-candidates are always kept.

    Global rule: one threshold over the candidates' scores keeps a ``density`` fraction (Condensa's rule).
    ``own`` maps group ids to densities of their own. Every group keeps at least one channel (``align``
    when given), ``align`` rounds each group's kept count up to a multiple of it, and tied grouped convs
    keep equal counts per conv group. ``multiple`` (used only without ``align``) rounds the kept count of
    each wide global group to a nearest multiple, keeping the total within half a multiple of the
    threshold's; ``cost`` (``memory_cost``) says which groups round down first (see ``_round_to_multiples``).
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
    # A concatenated part (or a conv) that would keep no channel gets its best one back before the rounding
    # to ``align``, not after: added afterwards it would leave the group one channel off a multiple.
    keep = keep_one_per_slice(analysis, keep, score)
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
    if multiple and not align:
        keep = _round_to_multiples(analysis, keep, score, candidate, own, multiple, cost)
    return balance_grouped(analysis, keep, score)


def _round_to_multiples(analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor, candidate: torch.Tensor,
                        own: Mapping[int, float], multiple: int, cost: torch.Tensor | None) -> torch.Tensor:
    """Each eligible group's kept count ``k`` becomes ``floor(k)`` or ``floor(k) + multiple`` (multiples of
    ``multiple``; ``floor(k) + multiple`` capped at the group's width), within one multiple of ``k``.

    Eligible: a global group (no density of its own: those keep the count asked for) whose channels are all
    candidates, at least ``MULTIPLE_MIN_WIDTH`` multiples wide, keeping at least one multiple and a count
    that is not one already, and not tied to a grouped conv with several channels per conv group (those
    counts follow the conv groups). Every eligible group first rounds down (its lowest-scored kept channels
    go); then groups round back up (their best-scored dropped channels return), those that lost the most
    first, then lowest ``cost`` (activation elements per MAC: compute-bound layers before memory-bound
    ones), while that brings the total closer to the threshold's count. So each count moves to its nearest
    multiple unless the total needs otherwise, and the kept channels stay those the scores rank best.
    Rounding down removes a padded block's whole time; rounding up adds MACs the padded kernel already ran.
    """
    tied = torch.zeros(analysis.num_channels, dtype=torch.bool)
    for gc in analysis.grouped:
        if gc.out_atoms.numel() > gc.groups:  # several channels per conv group
            tied[analysis.channel_of[gc.out_atoms]] = True
    keep = keep.clone()
    rounded: list[tuple[int, float, int, torch.Tensor, int]] = []  # (-removed, cost, group id, channels, room)
    deficit = 0
    for group in analysis.groups:
        ch = group.channels
        total = ch.numel()
        k = int(keep[ch].sum())
        if (group.id in own or total < MULTIPLE_MIN_WIDTH * multiple or k < multiple or k % multiple == 0
                or not bool(candidate[ch].all()) or bool(tied[ch].any())):
            continue
        down = k % multiple
        kept = ch[keep[ch]]
        keep[kept[torch.topk(score[kept], down, largest=False).indices]] = False
        deficit += down
        c = float(cost[ch].mean()) if cost is not None else 0.0
        rounded.append((-down, c, group.id, ch, min(multiple, total - (k - down))))
    added = 0
    for *_, ch, room in sorted(rounded, key=lambda r: r[:3]):
        if abs(deficit - added - room) >= abs(deficit - added):
            continue  # rounding this group up would move the total away from the threshold's count
        dropped = ch[~keep[ch]]
        keep[dropped[torch.topk(score[dropped], room).indices]] = True
        added += room
    return keep


def memory_cost(gm: fx.GraphModule, analysis: ChannelAnalysis) -> torch.Tensor:
    """Per channel id: activation elements per MAC of the nodes that carry the channel (from shapes only).

    Each node with channel-carrying output adds its output elements per channel; each conv / linear / matmul
    adds its MACs per output channel to its output channels and per input channel to its input channels.
    High-resolution layers (stems, depthwise convs, norms and activations on large maps) score high: their
    time is memory traffic rather than MACs. Channels that no MAC touches get ``inf``.
    """
    n = analysis.num_channels
    elems, macs = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    nodes = {node.name: node for node in gm.graph.nodes}
    grouped = {gc.node for gc in analysis.grouped}
    for c in profile_costs(gm, count_nonzero=False):  # shapes and MACs only: no pass over the weights
        info = analysis.infos.get(c.name)
        out = info.atoms if isinstance(info, ChanInfo) and info.atoms.numel() else None
        if out is not None and c.output_shape:
            numel = float(torch.Size(c.output_shape).numel())
            elems.index_add_(0, analysis.channel_of[out], torch.full((out.numel(),), numel / out.numel(),
                                                                   dtype=torch.float64))
        if not c.macs:
            continue
        ins = None
        node = nodes.get(c.name)
        if c.kind in ("conv", "conv_transpose", "linear") and node is not None and node.name not in grouped and node.args:
            x = analysis.infos.get(getattr(node.args[0], "name", None))
            ins = x.atoms if isinstance(x, ChanInfo) and x.atoms.numel() else None
        for atoms in (out, ins):
            if atoms is not None:
                macs.index_add_(0, analysis.channel_of[atoms], torch.full((atoms.numel(),), c.macs / atoms.numel(),
                                                                        dtype=torch.float64))
    return torch.where(macs > 0, elems / macs.clamp(min=1e-12), torch.full((n,), float("inf"), dtype=torch.float64))

"""Channel selection: which channels a structured scheme keeps, for a density, a MAC target or a latency target.

``select(gm, channels, target)`` is the one entry point. ``channels`` holds, per channel analysis of the
graph (the channel analysis; with head_dim pruning also the head_dim analysis), one score per channel, which
channels are candidates and the groups' own densities; ``target`` says what to reach:

- ``Target(density=d)``: one global threshold keeps ``d`` of the candidates (``threshold.select_channels``);
- ``Target(flops=f)``: the largest global density whose thinned MACs stay within ``f`` of the dense MACs,
  by bisection over the density with ``MacModel``;
- ``Target(latency=t)``: the latency model's strategy (``latency_select.select_for_latency``): channels
  ranked by score per unit of measured latency, the thinned model timed until it lands on ``t``.

``align`` rounds kept counts up to a multiple (an int), or to the multiple a measured latency model predicts
fastest (``"auto"``); without it wide groups round to the nearest hardware multiple (``HW_MULTIPLE``).

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.passes.analysis import analyze
    >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    >>> a = analyze(gm)
    >>> scores = torch.rand(a.num_channels)
    >>> chosen = select(gm, [Channels(a, scores, torch.ones(a.num_channels, dtype=torch.bool))], Target(flops=0.5))
    >>> chosen.record.kind, chosen.record.reached <= 0.5
    ('flops', True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..capture.records import TargetRecord
from ..rules.api import ChannelAnalysis
from .latency_model import LatencyModel, placeholder_inputs
from .latency_select import auto_align, select_for_latency
from .mac_model import MacModel
from .threshold import HW_MULTIPLE, MULTIPLE_MIN_WIDTH, memory_cost, select_channels

__all__ = ["select", "Target", "Channels", "Selection", "select_channels", "memory_cost", "HW_MULTIPLE",
           "MULTIPLE_MIN_WIDTH"]


@dataclass(frozen=True)
class Target:
    """What to reach: exactly one of ``density`` (fraction of candidate channels kept), ``flops`` (fraction of
    the dense MACs) and ``latency`` (fraction of the dense latency, measured); ``align`` as the schemes take it
    (None, a positive int, or "auto")."""

    density: float | None = None
    flops: float | None = None
    latency: float | None = None
    align: int | str | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("density", self.density), ("flops", self.flops), ("latency", self.latency))
                 if v is not None}
        if len(given) != 1:
            raise ValueError(f"a selection Target takes exactly one of density, flops and latency, got {given or 'none'}")


@dataclass(frozen=True)
class Channels:
    """One analysis' channels as the selection sees them.

    ``score`` and ``candidate`` hold one entry per channel id (non-candidates are always kept); ``own`` maps
    group ids to densities of their own. ``power``: this analysis keeps ``density ** power`` (head_dim columns
    with ``attention="both"``: 0.5, the heads keeping the other factor); ``sqrt_groups`` maps group ids to a
    least fraction: each of those groups (the heads of one attention, with ``attention="both"``) keeps
    ``max(sqrt(density), least)``. ``hardware_multiples``: without an int ``align``, wide groups round to the
    nearest ``HW_MULTIPLE`` (``threshold.select_channels``' ``multiple``).
    """

    analysis: ChannelAnalysis
    score: torch.Tensor
    candidate: torch.Tensor
    own: Mapping[int, float] = field(default_factory=dict)
    power: float = 1.0
    sqrt_groups: Mapping[int, float] = field(default_factory=dict)
    hardware_multiples: bool = False


@dataclass
class Selection:
    """The kept channels, one bool vector per ``Channels`` given, and for a MAC or latency target what was
    reached (``graph_record(gm).target``, which the report shows)."""

    keeps: list[torch.Tensor]
    record: TargetRecord | None = None


def select(gm: fx.GraphModule, channels: Sequence[Channels], target: Target) -> Selection:
    """The channels to keep in each analysis of ``gm`` for ``target`` (see the module docstring)."""
    if not channels:
        raise ValueError("select needs the channels of at least one analysis, got none")
    first = channels[0]
    if target.latency is not None:
        if len(channels) > 1:
            raise ValueError(f"a latency target selects the channels of one analysis, got {len(channels)}: the "
                             "latency model has no timings of head_dim widths; give a MAC target instead")
        sel = select_for_latency(gm, first.analysis, first.score, first.candidate, first.own, target.latency,
                                 placeholder_inputs(gm), align=target.align)
        return Selection([sel.keep], sel.target_record())
    fixed = target.align if isinstance(target.align, int) else None
    rounding = [{"multiple": HW_MULTIPLE, "cost": memory_cost(gm, c.analysis)}
                if c.hardware_multiples and fixed is None else {} for c in channels]

    def pick(density: float) -> list[torch.Tensor]:
        """Kept channels of every analysis at one global density."""
        keeps = []
        for c, extra in zip(channels, rounding, strict=True):
            own = {**{g: max(density ** 0.5, least) for g, least in c.sqrt_groups.items()}, **c.own}
            keeps.append(select_channels(c.analysis, c.score, c.candidate, density ** c.power, own, fixed, **extra))
        return keeps

    if target.flops is not None:
        chosen = _search_flops(gm, [c.analysis for c in channels], pick, target.flops)
    else:
        chosen = Selection(pick(target.density))
    if target.align == "auto":
        # "auto" starts from the rounded counts and may round further up, where the device runs those faster
        model = LatencyModel.build(gm, first.analysis, placeholder_inputs(gm))
        chosen.keeps[0], _ = auto_align(model, first.analysis, chosen.keeps[0], first.score, first.candidate)
    return chosen


def _search_flops(gm: fx.GraphModule, analyses: Sequence[ChannelAnalysis],
                  pick: Callable[[float], list[torch.Tensor]], flops: float) -> Selection:
    """Largest global density whose thinned MACs stay within ``flops`` of the dense MACs.

    ``pick(density)`` gives the kept channels of every analysis at a density. The MAC fraction only grows
    with the density, so a bisection over it finds the threshold.
    """
    macs = MacModel(gm, analyses)
    lo, hi = 0.0, 1.0
    best = pick(1e-9)
    for _ in range(24):
        mid = (lo + hi) / 2
        keeps = pick(mid)
        if macs.fraction(keeps) <= flops:
            lo, best = mid, keeps
        else:
            hi = mid
    return Selection(best, TargetRecord("flops", flops, macs.fraction(best), lo))

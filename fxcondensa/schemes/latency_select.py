"""Latency-aware channel selection: the latency model's strategy of ``selection.select`` for a latency target.

``select_for_latency`` keeps the channels that matter most per unit of predicted latency (HALP, Shen et al.,
NeurIPS 2022: a channel's score over the latency its group saves per channel removed) until the predicted
latency is the target fraction of dense, then builds the thinned model (``apply_keep``), measures it against
the dense one (alternating runs) and corrects the internal target from what it measured, a few times, so that
the **measured** fraction lands within ``tolerance`` of the target. ``auto_align`` rounds each group's kept
count up to the multiple (1, 8, 16, 32) the model predicts runs fastest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..capture.records import TargetRecord
from ..measure.latency import Latency, compare_latency_copies
from ..passes.analysis import balance_grouped
from ..passes.slicing import apply_keep
from ..rules.api import ChannelAnalysis
from .latency_model import LatencyModel, LatencyWarning, Timer, validate_target_latency
from .threshold import select_channels

__all__ = ["LatencySelection", "select_for_latency", "auto_align", "ALIGN_CHOICES", "MEASURE_COPIES"]

ALIGN_CHOICES = (1, 8, 16, 32)

Measure = Callable[[fx.GraphModule, fx.GraphModule, tuple], tuple[Latency, Latency]]  # -> (dense, thinned)


def _candidates_of(analysis: ChannelAnalysis, candidate: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    out = []
    for g in analysis.groups:
        ch = g.channels[candidate[g.channels]]
        if ch.numel():
            out.append((g.id, ch))
    return out


def _group_costs(model: LatencyModel, analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor,
                 candidate: torch.Tensor, previous: dict[int, float]) -> dict[int, float]:
    """Latency saved per channel when a group drops a quarter of its kept candidates (the lowest scores),
    at the current ``keep``: what a channel of that group costs."""
    base = model.predict(keep)
    costs = dict(previous)
    for gid, ch in _candidates_of(analysis, candidate):
        kept = ch[keep[ch]]
        if kept.numel() <= 1:
            kept = ch  # measure the slope from the full group instead
            trial_base = keep.clone()
            trial_base[ch] = True
            ref = model.predict(trial_base)
        else:
            trial_base, ref = keep, base
        r = max(1, kept.numel() // 4)
        drop = kept[torch.topk(score[kept], r, largest=False).indices]
        trial = trial_base.clone()
        trial[drop] = False
        costs[gid] = max(0.0, (ref - model.predict(trial)) / r)
    return costs


def _values(analysis: ChannelAnalysis, score: torch.Tensor, costs: dict[int, float], total: float) -> torch.Tensor:
    """Score per unit of latency; a floor on the cost keeps free channels finite and ranked by score."""
    floor = max(total, 1e-12) * 1e-6
    value = score.clone().float()
    for g in analysis.groups:
        c = costs.get(g.id)
        if c is not None:
            value[g.channels] = score[g.channels].float() / max(c, floor)
    return value


def _floor(analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor, candidate: torch.Tensor,
           own: Mapping[int, float], min_density: float) -> torch.Tensor:
    """Every group (but those with a density of their own) keeps at least ``min_density`` of its candidates,
    best scores first."""
    if min_density <= 0:
        return keep
    keep = keep.clone()
    for gid, ch in _candidates_of(analysis, candidate):
        if gid in own:
            continue
        missing = math.ceil(min_density * ch.numel()) - int(keep[ch].sum())
        if missing > 0:
            dropped = ch[~keep[ch]]
            keep[dropped[torch.topk(score[dropped], min(missing, dropped.numel())).indices]] = True
    return keep


def _select(model: LatencyModel, analysis: ChannelAnalysis, value: torch.Tensor, candidate: torch.Tensor,
            own: Mapping[int, float], align: int | str | None, target: float, score: torch.Tensor,
            min_density: float) -> torch.Tensor:
    """Largest global density over ``value`` whose predicted latency fraction is at most ``target``."""
    fixed = align if isinstance(align, int) else None

    def pick(d: float) -> torch.Tensor:
        keep = select_channels(analysis, value, candidate, d, own, fixed)
        return _floor(analysis, keep, score, candidate, own, min_density)

    dense = model.predict(torch.ones(analysis.num_channels, dtype=torch.bool))
    lo, hi = 0.0, 1.0
    best = pick(1e-9)
    for _ in range(18):
        mid = (lo + hi) / 2
        keep = pick(mid)
        if model.predict(keep) <= target * dense:
            lo, best = mid, keep
        else:
            hi = mid
    if align != "auto":
        return best
    # Aligning only adds channels: step the density down until the aligned selection fits again (aligning
    # inside the bisection would cost a prediction per group and multiple at every step).
    aligned, _ = auto_align(model, analysis, best, score, candidate)
    d = lo
    for _ in range(12):
        if model.predict(aligned) <= target * dense or d <= 1e-6:
            break
        d *= 0.95
        aligned, _ = auto_align(model, analysis, pick(d), score, candidate)
    return aligned


def auto_align(model: LatencyModel, analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor,
               candidate: torch.Tensor, *, choices: Sequence[int] = ALIGN_CHOICES,
               margin: float = 0.01) -> tuple[torch.Tensor, dict[str, int]]:
    """Round each group's kept count up to the multiple in ``choices`` the latency model predicts fastest.

    Extra channels are the best-scored dropped ones. Predictions within ``margin`` (relative) of the fastest
    count as ties and the larger count wins (more channels for the same time). Returns the new keep vector
    and the chosen multiple per group name.
    """
    keep = keep.clone()
    chosen: dict[str, int] = {}
    for g in analysis.groups:
        ch = g.channels
        cand = ch[candidate[ch]]
        if not cand.numel() or bool(keep[cand].all()):
            continue
        k, total = int(keep[ch].sum()), ch.numel()
        dropped = cand[~keep[cand]]
        order = dropped[torch.argsort(score[dropped].nan_to_num(float("-inf")), descending=True)]
        options = []
        for a in choices:
            want = min(total, max(a, -(-k // a) * a))
            extra = min(want - k, order.numel())
            trial = keep.clone()
            trial[order[:extra]] = True
            options.append((model.predict(trial), k + extra, a, trial))
        fastest = min(o[0] for o in options)
        ms, _, a, trial = max((o for o in options if o[0] <= fastest * (1 + margin)), key=lambda o: o[1])
        keep = trial
        chosen[g.name] = a
    return balance_grouped(analysis, keep, score), chosen


@dataclass
class LatencySelection:
    """What ``select_for_latency`` chose and measured.

    ``measured`` is the thinned model's median over the dense model's median, timed alternately after
    selection; ``predicted`` the latency model's fraction for the same keep vector; ``history`` one entry
    per feedback step (internal target, predicted, measured, medians and spreads).
    """

    keep: torch.Tensor = field(repr=False)
    target: float
    predicted: float
    measured: float
    dense_ms: float
    thinned_ms: float
    tolerance: float
    history: list[dict[str, Any]] = field(default_factory=list)
    build_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    density: float = 1.0

    @property
    def met(self) -> bool:
        return abs(self.measured - self.target) <= self.tolerance

    def target_record(self) -> TargetRecord:
        """For ``graph_record(gm).target``: kind "latency", the target, the measured fraction, the kept
        fraction of candidate channels."""
        return TargetRecord("latency", self.target, self.measured, self.density)


def _next_target(history: list[dict[str, Any]], internal: float, target: float) -> float:
    """The internal (predicted) target for the next step. With two steps whose internal targets differ,
    interpolate (or extrapolate) linearly between the two whose measurements are nearest the target: the
    measured fraction grows with the internal target, near-linearly over a small range. Trusted steps are used
    when there are two; noisy ones still beat no slope at all. With one step, the model was off by
    measured/predicted: scale the internal target by target/measured."""
    good = [h for h in history if not h["noisy"]]
    last = good[-1] if good else history[-1]  # a noisy step is a poor guide when a trusted one exists
    guess = last["internal_target"] * target / last["measured"] if last["measured"] > 0 else internal
    pool = good if len(good) >= 2 else history
    if len(pool) >= 2:
        a, b = sorted(pool, key=lambda h: abs(h["measured"] - target))[:2]
        if abs(a["internal_target"] - b["internal_target"]) > 1e-6 and abs(a["measured"] - b["measured"]) > 1e-6:
            slope = (a["measured"] - b["measured"]) / (a["internal_target"] - b["internal_target"])
            if slope > 0:
                guess = a["internal_target"] + (target - a["measured"]) / slope
    # A flat or noisy slope extrapolates wildly: move at most by a factor of 1.5 from the last aim.
    guess = min(max(guess, history[-1]["internal_target"] / 1.5), history[-1]["internal_target"] * 1.5)
    return min(1.0, max(1e-3, guess))


MEASURE_COPIES = 3  # fresh copies of dense and thinned timed per feedback step (see _default_measure)


def _default_measure(warmup: int, repeat: int, copies: int = MEASURE_COPIES) -> Measure:
    """Dense and thinned timed alternately as ``copies`` fresh copies (``compare_latency_copies``: where a
    model lands in memory moves its latency by more than the tolerance), about ``repeat`` runs in all; the
    pair whose thinned/dense fraction is the median is returned. Measured: a selection trusting one copy's
    0.484 of resnet50's dense latency measured 0.561 afterwards, over five copies."""
    per_copy = max(3, -(-repeat // copies))

    def measure(dense: fx.GraphModule, thinned: fx.GraphModule, inputs: tuple) -> tuple[Latency, Latency]:
        runs = compare_latency_copies([dense, thinned], inputs, copies=copies, warmup=warmup, repeat=per_copy)
        pairs = sorted(zip(*runs, strict=True), key=lambda p: p[1].median_ms / p[0].median_ms if p[0].median_ms > 0
                       else 0.0)
        return pairs[(len(pairs) - 1) // 2]
    return measure


def select_for_latency(gm: fx.GraphModule, analysis: ChannelAnalysis, score: torch.Tensor,
                       candidate: torch.Tensor, own: Mapping[int, float], target: float, inputs: Any, *,
                       align: int | str | None = None, tolerance: float = 0.05, steps: int = 4,
                       model: LatencyModel | None = None, measure: Measure | None = None,
                       timer: Timer | None = None, cache: bool = True, warmup: int = 2,
                       repeat: int = 7, min_density: float = 0.2) -> LatencySelection:
    """Keep vector whose thinned model measures within ``tolerance`` of ``target`` x the dense latency.

    ``score`` / ``candidate`` / ``own`` are those of ``select_channels`` (one entry per channel id; groups
    with their own density keep it). ``inputs`` are the graph's placeholder values (``graph_inputs``).
    ``align``: None, an int (as ``select_channels``), or ``"auto"`` (``auto_align``).

    Each of the ``steps`` feedback steps thins ``gm`` with ``apply_keep``, measures dense and thinned
    alternately (``measure``, default ``compare_latency_copies`` with ``MEASURE_COPIES`` fresh copies of both, about
    ``repeat`` runs in all after ``warmup`` each, the median copy kept; a noisy measurement is repeated once) and moves the internal target from what it measured, until a trusted measurement lands
    within half the tolerance; otherwise the closest step is kept. Every group keeps at least ``min_density``
    of its candidate channels: ranked by score per unit of latency alone, the costliest group (a residual
    stream, summed into every block) would lose nearly all its channels, since normalized scores do not grow
    as a layer empties. Warns ``LatencyWarning`` when the spread of a measurement is wider than the tolerance,
    or when no step landed within it (the closest is returned, with what was measured).
    """
    target = validate_target_latency(target)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1) (e.g. 0.05), got {tolerance!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (feedback measurements) must be an int >= 1, got {steps!r}")
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0 <= min_density <= 1:
        raise ValueError(f"min_density must be a fraction in [0, 1], got {min_density!r}")
    if align is not None and align != "auto" and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be a positive int, 'auto' or None, got {align!r}")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model = model or LatencyModel.build(gm, analysis, inputs, timer=timer, cache=cache)
    measure = measure or _default_measure(warmup, repeat)
    full = torch.ones(analysis.num_channels, dtype=torch.bool)
    dense_pred = model.predict(full)
    internal = target
    best: tuple[tuple[bool, float], torch.Tensor, dict[str, Any]] | None = None
    history: list[dict[str, Any]] = []
    for _ in range(steps):
        costs = _group_costs(model, analysis, full, score, candidate, {})
        keep = _select(model, analysis, _values(analysis, score, costs, dense_pred), candidate, own, align,
                       internal, score, min_density)
        # HALP re-evaluates the costs where the selection landed: a channel costs less in a thinner model.
        costs = _group_costs(model, analysis, keep, score, candidate, costs)
        keep = _select(model, analysis, _values(analysis, score, costs, dense_pred), candidate, own, align,
                       internal, score, min_density)
        keep = balance_grouped(analysis, keep, score)
        predicted = model.predict(keep) / dense_pred
        thinned = apply_keep(gm, analysis, keep, inputs)
        for _attempt in range(2):  # a burst of load on the machine: measure once more before trusting it
            dense_lat, thin_lat = measure(gm, thinned, inputs)
            measured = thin_lat.median_ms / dense_lat.median_ms
            # relative spreads of a ratio add in quadrature
            spread = measured * math.hypot(dense_lat.iqr_ms / dense_lat.median_ms, thin_lat.iqr_ms / thin_lat.median_ms)
            if spread <= tolerance:
                break
        noisy = spread > tolerance
        step = {"internal_target": internal, "predicted": predicted, "measured": measured,
                "dense_ms": dense_lat.median_ms, "thinned_ms": thin_lat.median_ms,
                "dense_iqr_ms": dense_lat.iqr_ms, "thinned_iqr_ms": thin_lat.iqr_ms, "spread": spread,
                "noisy": noisy}
        history.append(step)
        if noisy:
            warnings.warn(
                f"latency timing is too noisy to meet target_latency={target} within +-{tolerance}: dense "
                f"{dense_lat.median_ms:.3f} ms (IQR {dense_lat.iqr_ms:.3f}), thinned {thin_lat.median_ms:.3f} ms "
                f"(IQR {thin_lat.iqr_ms:.3f}), measured fraction {measured:.3f} +- {spread:.3f}. Run on an idle "
                "machine, with fewer threads (torch.set_num_threads) or more repeats.", LatencyWarning,
                stacklevel=2)
        # A trusted measurement inside the band beats any other; otherwise the closest one wins, noisy or not
        # (a trusted step far off the target is no better than a noisy one near it).
        rank = (noisy or abs(measured - target) > tolerance, abs(measured - target))
        if best is None or rank < best[0]:
            best = (rank, keep, step)
        # Stop inside half the tolerance: a step that only just made it would land on the edge of the band
        # as often as not when measured again.
        if not noisy and abs(measured - target) <= tolerance / 2:
            break
        internal = _next_target(history, internal, target)
    assert best is not None
    _, keep, step = best
    measured = step["measured"]
    if abs(measured - target) > tolerance:
        warnings.warn(
            f"target_latency={target} not met within +-{tolerance} after {len(history)} measured step(s): "
            f"closest measured fraction {measured:.3f} (dense {step['dense_ms']:.3f} ms, thinned "
            f"{step['thinned_ms']:.3f} ms); steps: "
            + ", ".join(f"{h['measured']:.3f}" for h in history), LatencyWarning, stacklevel=2)
    cand = int(candidate.sum())
    density = float((keep & candidate).sum()) / cand if cand else 1.0
    return LatencySelection(keep=keep, target=target, predicted=step["predicted"], measured=measured,
                            dense_ms=step["dense_ms"], thinned_ms=step["thinned_ms"], tolerance=tolerance,
                            history=history, build_s=model.build_s, cache_hits=model.cache_hits,
                            cache_misses=model.cache_misses, density=density)

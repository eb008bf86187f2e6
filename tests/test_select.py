"""``schemes.selection.select``: the one channel selection behind the structured schemes (density, MAC target,
latency target), against the threshold rule and the MAC model it is built on."""

from __future__ import annotations

import pytest
import torch

import fxcondensa
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.costs import profile_costs
from fxcondensa.passes.slicing import apply_keep
from fxcondensa.schemes import channel_scores
from fxcondensa.schemes.selection import Channels, Target, select
from fxcondensa.schemes.threshold import HW_MULTIPLE, memory_cost, select_channels

X = torch.randn(1, 1, 28, 28)


def _setup():
    torch.manual_seed(0)
    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), X)
    a = analyze(gm)
    score = channel_scores(gm, a, "l2norm", True)
    return gm, a, score, ~a.frozen_channels() & ~torch.isnan(score)


@pytest.mark.parametrize("align", [None, 4])
def test_a_density_is_the_threshold_rule(align):
    gm, a, score, cand = _setup()
    chosen = select(gm, [Channels(a, score, cand, hardware_multiples=True)], Target(density=0.4, align=align))
    rounding = {} if align else {"multiple": HW_MULTIPLE, "cost": memory_cost(gm, a)}
    assert chosen.record is None
    assert torch.equal(chosen.keeps[0], select_channels(a, score, cand, 0.4, {}, align, **rounding))


def test_a_mac_target_is_met_and_recorded_as_measured_on_the_thinned_model():
    gm, a, score, cand = _setup()
    chosen = select(gm, [Channels(a, score, cand)], Target(flops=0.5))
    thinned = apply_keep(gm, a, chosen.keeps[0], (X,))
    macs = [sum(c.macs for c in profile_costs(m, X)) for m in (gm, thinned)]
    assert chosen.record.kind == "flops" and chosen.record.target == 0.5
    assert chosen.record.reached <= 0.5 and chosen.record.reached == pytest.approx(macs[1] / macs[0])


def test_target_takes_exactly_one_goal():
    with pytest.raises(ValueError, match=r"exactly one of density, flops and latency, got none"):
        Target()
    with pytest.raises(ValueError, match=r"exactly one of density, flops and latency, got \{'density': 0.5, 'flops': 0.5\}"):
        Target(density=0.5, flops=0.5)


def test_select_errors_say_what_to_give():
    gm, a, score, cand = _setup()
    with pytest.raises(ValueError, match="needs the channels of at least one analysis"):
        select(gm, [], Target(density=0.5))
    two = [Channels(a, score, cand)] * 2
    with pytest.raises(ValueError, match="a latency target selects the channels of one analysis, got 2.*give a MAC target"):
        select(gm, two, Target(latency=0.5))

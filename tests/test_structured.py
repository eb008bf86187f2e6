"""Structured-scheme options owned by structured.py: MAC targets, score normalisation, multi-producer scores."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.costs import profile_costs
from fxcondensa.schemes import StructurePrune, channel_scores


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return sum(c.macs for c in profile_costs(model, x))


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_target_flops_is_met_and_close(target):
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)
    small = fxcondensa.thin(model, StructurePrune(target_flops=target), x)
    reached = macs(small, x) / macs(model, x)
    assert reached <= target + 1e-6
    assert reached > target - 0.05  # the bisection gets close, it does not overshoot into a much smaller model
    assert thin_record(small).target.target == target


@pytest.mark.parametrize("kwargs", [{}, {"density": 0.5, "target_flops": 0.5}])
def test_exactly_one_of_density_and_target(kwargs):
    with pytest.raises(ValueError, match="exactly one of density"):
        StructurePrune(**kwargs)


@pytest.mark.parametrize("bad", [0, 1.5, float("nan")])
def test_bad_target_is_refused_with_its_value(bad):
    with pytest.raises(ValueError, match="target_flops"):
        StructurePrune(target_flops=bad)


class TwoScales(nn.Module):
    """Two parallel convs with weights of very different scales, both feeding one head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.b.weight.mul_(100)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_normalize_makes_layers_of_different_scales_comparable():
    torch.manual_seed(0)
    model, x = TwoScales(), torch.randn(1, 3, 4, 4)
    raw = fxcondensa.thin(model, StructurePrune(0.5, normalize=False), x)
    norm = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert raw.a.out_channels == 1 and raw.b.out_channels == 8  # Condensa's raw ranking empties the small layer
    assert 2 <= norm.a.out_channels <= 6 and 2 <= norm.b.out_channels <= 6


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.c1(x) + self.c2(x))


def test_a_channel_with_several_producers_scores_their_root_mean_square():
    torch.manual_seed(0)
    gm = fxcondensa.trace(Residual(), torch.randn(1, 3, 2, 2))
    a = analyze(gm)
    scores = channel_scores(gm, a, "l2norm", normalize=False)
    ch = a.channel_of[[s.atoms for s in a.slices if s.path == "c1.weight" and s.role == "producer"][0]]
    n1, n2 = gm.c1.weight.flatten(1).norm(dim=1), gm.c2.weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(scores[ch], ((n1**2 + n2**2) / 2).sqrt())

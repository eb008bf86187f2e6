"""The default selection rounds wide groups to hardware multiples (issue 14): nearest multiple, total kept count
within half a multiple of the density's, memory-bound groups round down first, exact thinning."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import fxcondensa
from fxcondensa.passes.analysis import analyze
from fxcondensa.schemes import StructurePrune, channel_scores
from fxcondensa.schemes.selection import HW_MULTIPLE, MULTIPLE_MIN_WIDTH, memory_cost, select_channels


class Wide(nn.Module):
    """A high-resolution stem and a low-resolution body, both wide enough to be rounded, and a narrow head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Conv2d(64, 96, 3, stride=4, padding=1)
        self.narrow = nn.Conv2d(96, 20, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.narrow(torch.relu(self.body(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def _setup(model: nn.Module, x: torch.Tensor):
    gm = fxcondensa.trace(model, x)
    analysis = analyze(gm)
    score = channel_scores(gm, analysis, "l2norm", True)
    candidate = ~analysis.frozen_channels() & ~torch.isnan(score)
    return gm, analysis, score, candidate


def _counts(analysis, keep) -> dict[str, int]:
    return {g.name: int(keep[g.channels].sum()) for g in analysis.groups}


def test_wide_groups_round_to_a_nearest_multiple_and_the_total_stays():
    torch.manual_seed(0)
    gm, analysis, score, candidate = _setup(Wide(), torch.randn(1, 3, 32, 32))
    cost = memory_cost(gm, analysis)
    for density in (0.3, 0.45, 0.5, 0.62, 0.8):
        plain = select_channels(analysis, score, candidate, density, {}, None)
        rounded = select_channels(analysis, score, candidate, density, {}, None, multiple=HW_MULTIPLE, cost=cost)
        before, after = _counts(analysis, plain), _counts(analysis, rounded)
        for name in ("stem", "body"):
            assert after[name] % HW_MULTIPLE == 0, (density, after)
            assert abs(after[name] - before[name]) < HW_MULTIPLE, (density, before, after)
        assert after["narrow"] == before["narrow"]  # 20 channels: under MULTIPLE_MIN_WIDTH multiples
        moved = sum(after.values()) - sum(before.values())
        assert abs(moved) <= HW_MULTIPLE // 2, (density, before, after)
        # Rounding only adds channels the threshold ranked next and drops those it ranked last.
        for g in analysis.groups:
            ch = g.channels
            kept = score[ch][rounded[ch]]
            if kept.numel() and (~rounded[ch]).any():
                assert kept.min() >= score[ch][~rounded[ch]].max()


def test_memory_bound_groups_round_down_first():
    torch.manual_seed(0)
    gm, analysis, score, candidate = _setup(Wide(), torch.randn(1, 3, 32, 32))
    cost = memory_cost(gm, analysis)
    stem = next(g for g in analysis.groups if g.name == "stem")
    body = next(g for g in analysis.groups if g.name == "body")
    # The stem runs at 32x32 and reads 3 input channels: far more activation elements per MAC than the body.
    assert float(cost[stem.channels].mean()) > 4 * float(cost[body.channels].mean())
    # Scores that make the threshold keep 36 stem and 44 body channels: both lose 4 to rounding down, one
    # of them must round back up to keep the total, and the tie goes to the compute-bound body.
    candidate = candidate.clone()
    candidate[[c for g in analysis.groups if g.name not in ("stem", "body") for c in g.channels.tolist()]] = False
    score = score.clone()
    score[stem.channels] = torch.cat([torch.linspace(0, 0.5, 28), torch.linspace(2, 3, 36)])
    score[body.channels] = torch.cat([torch.linspace(0, 0.5, 52), torch.linspace(2, 3, 44)])
    plain = select_channels(analysis, score, candidate, 0.5, {}, None)
    assert (int(plain[stem.channels].sum()), int(plain[body.channels].sum())) == (36, 44)
    rounded = select_channels(analysis, score, candidate, 0.5, {}, None, multiple=HW_MULTIPLE, cost=cost)
    assert (int(rounded[stem.channels].sum()), int(rounded[body.channels].sum())) == (32, 48)


def test_own_densities_and_explicit_align_are_not_rounded():
    torch.manual_seed(0)
    model, x = Wide(), torch.randn(1, 3, 32, 32)
    own = fxcondensa.thin(model, StructurePrune(0.5, layers={"stem": 0.3}), x)
    assert own.stem.out_channels == 19  # 30% of 64, as asked
    ceil = fxcondensa.thin(model, StructurePrune(0.5, align=16), x)
    assert ceil.stem.out_channels % 16 == 0 and ceil.body.out_channels % 16 == 0


def test_default_structure_prune_rounds_resnet18_and_thins_exactly():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)  # check=True: outputs equal to the masked model's
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % HW_MULTIPLE == 0 for w in widths), widths
    dense = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(dense) >= MULTIPLE_MIN_WIDTH * HW_MULTIPLE  # every resnet18 group is wide enough
    kept, total = sum(widths), sum(dense)
    assert abs(kept - 0.5 * total) <= 0.05 * total  # groups kept per layer: about half of each

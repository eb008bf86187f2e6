"""Channel criteria of the structured schemes (schemes/scores.py): row criteria, group L2, norm scales."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxcondensa
from fxcondensa.passes.analysis import analyze
from fxcondensa.schemes import StructurePrune, channel_scores


def conv_bn_conv() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([3.0, 0.5, 1.0, 2.0]))
        model[3].weight.copy_(torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1).expand(2, 4, 1, 1))
    return model.eval()


def scores(criteria: str) -> torch.Tensor:
    gm = fxcondensa.trace(conv_bn_conv(), torch.randn(1, 3, 4, 4))
    a = analyze(gm)
    return channel_scores(gm, a, criteria, normalize=False)[a.channel_of[a.slices[0].atoms]]


def test_row_criteria_read_only_the_producer_rows():
    s = scores("l2norm")
    torch.testing.assert_close(s, torch.tensor([3.0, 3.0, 12.0, 12.0]).sqrt())


def test_group_l2_reads_every_tensor_that_carries_the_channel():
    s = scores("group_l2")
    # mean over conv0 row (3 w^2), BN weight^2, BN bias^2 (zero here), conv3 column (2 v^2)
    rows, gamma, cols = torch.tensor([3.0, 3.0, 12.0, 12.0]), torch.tensor([9.0, 0.25, 1.0, 4.0]), torch.tensor([2.0, 2.0, 0.0, 2.0])
    torch.testing.assert_close(s, ((rows + gamma + 0 + cols) / 4).sqrt())
    assert s[2] < s[3]  # same producer rows: the channel nobody reads ranks lower


def test_bn_scale_ranks_by_the_norm_scale():
    s = scores("bn_scale")
    torch.testing.assert_close(s, torch.tensor([3.0, 0.5, 1.0, 2.0]))


def test_bn_scale_falls_back_to_the_producer_norm_without_a_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm = fxcondensa.trace(model, torch.randn(1, 3, 4, 4))
    a = analyze(gm)
    torch.testing.assert_close(channel_scores(gm, a, "bn_scale"), channel_scores(gm, a, "l2norm"), equal_nan=True)


def test_bn_or_l2norm_ranks_by_a_trained_batchnorm_scale():
    torch.testing.assert_close(scores("bn_or_l2norm"), scores("bn_scale"))


def test_bn_or_l2norm_uses_the_producer_rows_where_batchnorm_scales_are_all_equal():
    # A freshly initialised BatchNorm (all scales 1) ranks nothing: bn_scale would tie every channel.
    model = conv_bn_conv()
    with torch.no_grad():
        model[1].weight.fill_(1.0)
    gm = fxcondensa.trace(model, torch.randn(1, 3, 4, 4))
    a = analyze(gm)
    torch.testing.assert_close(channel_scores(gm, a, "bn_or_l2norm"), channel_scores(gm, a, "l2norm"), equal_nan=True)
    assert channel_scores(gm, a, "bn_scale", normalize=False)[a.channel_of[a.slices[0].atoms]].unique().numel() == 1


def test_bn_or_l2norm_ignores_layernorm_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([3.0, 0.5, 1.0, 2.0]))
    gm = fxcondensa.trace(model, torch.randn(2, 6))
    a = analyze(gm)
    torch.testing.assert_close(channel_scores(gm, a, "bn_or_l2norm"), channel_scores(gm, a, "l2norm"), equal_nan=True)


def test_bn_or_l2norm_is_bn_scale_on_a_trained_resnet():
    # Every ResNet-20 channel that can be pruned has a BatchNorm: the default ranks as "bn_scale" there
    # (the criterion measured against Torch-Pruning in BENCHMARKS.md).
    torch.manual_seed(0)
    model = fxcondensa.models.ResNet20()
    for m in model.modules():  # trained BN scales differ; untrained ones are all 1
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 2.0)
    gm = fxcondensa.trace(model.eval(), torch.randn(1, 1, 28, 28))
    a = analyze(gm)
    torch.testing.assert_close(channel_scores(gm, a, "bn_or_l2norm", normalize=True),
                               channel_scores(gm, a, "bn_scale", normalize=True), equal_nan=True)


def test_structure_prune_defaults_to_bn_or_l2norm_and_equals_l2norm_without_batchnorm():
    assert StructurePrune(0.5).criteria == "bn_or_l2norm"
    torch.manual_seed(0)
    model = fxcondensa.models.LeNet5().eval()
    x = torch.randn(1, 1, 28, 28)
    default = fxcondensa.compress(model, StructurePrune(0.3), x)
    rows = fxcondensa.compress(model, StructurePrune(0.3, criteria="l2norm"), x)
    for (name, p), q in zip(default.named_parameters(), rows.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("criteria", ["group_l2", "bn_scale", "bn_or_l2norm", "max"])
def test_every_criterion_thins_exactly(criteria):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():  # untrained BN scales are all 1: give them something to rank
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x, fresh = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    scheme = StructurePrune(0.5, criteria=criteria)
    small = fxcondensa.thin(model, scheme, x)
    with torch.no_grad():
        torch.testing.assert_close(small(fresh), fxcondensa.compress(model, scheme, x)(fresh), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) * 0.6


def test_unknown_criteria_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"criteria must be one of \['l2norm'.*'group_l2', 'bn_scale', 'bn_or_l2norm'\].*'taylorx'"):
        StructurePrune(0.5, criteria="taylorx")

"""Rules for what timm and Hugging Face models use, each on a hand-built pattern: the thinned model equals the
compressed dense one on a fresh input, the pattern's channels are actually removed, and the rule's group is
not frozen. Every pattern runs through both capture frontends (torch.fx symbolic tracing and torch.export),
whose graphs spell the same op differently (``x[:, :k]`` vs ``aten.slice``, ``F.conv2d`` vs ``aten.conv2d``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_channels import randomize
from torch import nn

from fxcondensa import thin, trace
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
SCHEME = StructurePrune(0.5, layers={"*": 0.5})  # every group loses channels, not just the weakest


class GhostSlice(nn.Module):
    """GhostNet / DPN: concatenate two paths, then keep channel ranges ``out[:, :k]`` and ``out[:, k:]``."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Conv2d(3, 8, 1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(10, 4, 1)
        self.side = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.primary(x)
        o = torch.relu(self.bn(torch.cat([y, self.cheap(y)], 1)))
        return self.head(o[:, :10]) + self.side(o[:, 12:])


class FunctionalGroupedConv(nn.Module):
    """A depthwise conv called functionally (what torch.export records for every conv)."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)  # its tensors, called the way timm's Conv2dSame does
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(F.conv2d(self.pw(x), self.dw.weight, self.dw.bias, 1, 1, 1, 8)))


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm (channels last): a norm over space, a mean over channels, and
    ``addcmul`` with 1-D parameters viewed along the channel dim."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.pw = nn.Linear(3, c)
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)
        self.out = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.pw(x.permute(0, 2, 3, 1)))
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        x = x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * n)
        return self.out(x)


class FunctionalGroupNorm(nn.Module):
    """PoolFormer / timm's ``GroupNorm1`` style: ``F.group_norm`` on a module's own affine tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.group_norm(self.a(x), 4, self.norm.weight, self.norm.bias, 1e-5)
        return self.b(torch.relu(y))


class LayerScaleShiftWindow(nn.Module):
    """EfficientFormer / Swin style: layer scales laid out by unsqueezes and casts, a padded and rolled map,
    and ``torch.where`` with a scalar (T5's clamp)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y * self.scale.unsqueeze(-1).unsqueeze(-1) + self.shift.to(y.dtype)
        y = torch.roll(F.pad(y, (1, 1, 1, 1)), shifts=(1, 1), dims=(2, 3))
        y = F.pad(y.permute(0, 2, 3, 1), (0, 0, 1, 0)).permute(0, 3, 1, 2)[:, :, 1:]  # Swin: channels last, (0, 0)
        y = torch.where(y > 0.1, y, 0.0)
        return self.b(y)


class GroupedMultiplier(nn.Module):
    """ResNeSt / FastViT: a grouped conv with 2 input and 4 output channels per conv group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.g(torch.relu(self.a(x))))))


PATTERNS = {"ghost_slice": (GhostSlice, "primary"), "functional_grouped_conv": (FunctionalGroupedConv, "pw"),
            "grn": (GRN, "pw"), "functional_group_norm": (FunctionalGroupNorm, "a"),
            "layer_scale_shift_window": (LayerScaleShiftWindow, "a"), "grouped_multiplier": (GroupedMultiplier, "g")}


def compressed(model: nn.Module, x: torch.Tensor, capture: str) -> nn.Module:
    """The compressed dense model, captured by the same frontend (``compress`` with a ``capture`` choice)."""
    gm = trace(model, x, capture=capture)
    with torch.no_grad():
        SCHEME.pi(gm)
        SCHEME.delta(gm)
    return gm.eval()


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_thins_exactly(name, capture):
    cls, group = PATTERNS[name]
    torch.manual_seed(0)
    model = randomize(cls())
    x = torch.randn(2, 3, 8, 8)
    fresh = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    thinned = thin(model, SCHEME, x, capture=capture)
    record = thin_record(thinned)
    assert record.capture == capture
    rec = next(g for g in record.groups if g.group == group)
    assert rec.frozen == "" and rec.kept < rec.channels, rec
    assert params(thinned) < params(model)
    with torch.no_grad():
        expected = compressed(model, x, capture)(fresh)
        torch.testing.assert_close(thinned(fresh), expected, rtol=RTOL, atol=ATOL)


def test_slice_with_a_step_over_channels_freezes_with_a_reason():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, ::2])

    model = randomize(Strided())
    thinned = thin(model, SCHEME, torch.randn(1, 3, 4, 4))
    rec = next(g for g in thin_record(thinned).groups if g.group == "a")
    assert rec.kept == rec.channels and "indexing along the channel dim" in rec.frozen


class StandardizedConv(nn.Module):
    """NFNet's ``ScaledStdConv2d`` in short: the conv weight is computed in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        w = self.a.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5) * self.gain
        return self.b(torch.relu(F.conv2d(x, w, self.a.bias)))


def test_computed_conv_weight_keeps_its_group_and_says_why_in_one_line():
    thinned = thin(randomize(StandardizedConv()), SCHEME, torch.randn(1, 3, 8, 8))
    record = thin_record(thinned)
    assert all(f.reason for f in record.frozen) and len(record.frozen) == len(record.groups)
    assert record.whole_reason.startswith("every channel group is frozen: conv 'conv2d' uses a weight computed in "
                                          "forward")


def test_grouped_multiplier_keeps_inputs_and_equal_outputs_per_group():
    thinned = thin(randomize(GroupedMultiplier()), SCHEME, torch.randn(1, 3, 8, 8))
    g = thinned.get_submodule("g")
    assert g.groups == 4 and g.in_channels == 8 and g.out_channels % 4 == 0 and g.out_channels < 16
    rec = next(r for r in thin_record(thinned).groups if r.group == "a")
    assert "2 input and 4 output channels per group: its input channels are kept" in rec.frozen


class SizeFromAnotherTensor(nn.Module):
    """timm's attention: ``B, N, C = x.shape`` on the block input, then ``y.reshape(B, N, C)`` on a tensor
    whose channels thin (the input's do not)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        B, N, C = x.shape
        y = torch.relu(self.a(x))
        return self.b(y.reshape(B, N, C))


def test_reshape_sized_by_another_tensors_width_gets_the_kept_count():
    """Regression: the computed size kept the dense width and the thinned reshape failed."""
    model = SizeFromAnotherTensor()
    x = torch.randn(1, 5, 8)
    thinned = thin(model, SCHEME, x, capture="fx")
    assert thinned.a.out_features < 8
    fresh = torch.randn(2, 5, 8)  # another batch size: the kept count is a constant, the batch is not
    with torch.no_grad():
        torch.testing.assert_close(thinned(fresh), compressed(model, x, "fx")(fresh), rtol=RTOL, atol=ATOL)


class UntrackedSizedByStream(nn.Module):
    """EdgeNeXt: an untracked tensor reshaped with ``B, N, C`` read from a stream that thins."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        s = torch.relu(self.a(x))
        B, N, C = s.shape
        untracked = (x * 2).reshape(B, N, C)
        return self.b(s) + untracked.sum(-1, keepdim=True)


def test_untracked_reshape_sized_by_a_thinned_stream_keeps_its_dense_size():
    """Regression: the reshape read the stream's kept width and the thinned model failed to run."""
    model = UntrackedSizedByStream()
    x = torch.randn(1, 5, 8)
    thinned = thin(model, SCHEME, x, capture="fx")
    assert thinned.a.out_features < 8
    with torch.no_grad():
        torch.testing.assert_close(thinned(x), compressed(model, x, "fx")(x), rtol=RTOL, atol=ATOL)

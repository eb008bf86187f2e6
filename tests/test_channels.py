"""Channel dependency analysis (``fxcondensa.passes.channels.analyze``) on one small model per pattern.

The pattern models live here (``PATTERNS``) and are reused by ``test_thin.py``, which checks each of them
end to end (thinned == compressed). Here we check the analysis itself: which producers are joined into
one group, which groups are frozen, and that the recorded reason names the cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxcondensa
from fxcondensa.capture.records import node_record
from fxcondensa.passes.analysis import analyze
from fxcondensa.rules.api import ChanInfo, ChannelAnalysis, Group

# --------------------------------------------------------------------------------------------------
# Pattern models: tiny, with small channel counts. ``randomize`` gives every norm layer random affine
# parameters and running statistics, so that "a zero channel stays zero" is never true by accident.


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


class ConvBNReLUConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.bn1(self.conv1(x))))


class Residual(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2, summed (or subtracted) with conv1's stream, then conv3."""

    def __init__(self, sub: bool = False):
        super().__init__()
        self.sub = sub
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        y = a - b if self.sub else a + b
        return self.conv3(F.relu(y))


class SqueezeExcite(nn.Module):
    """conv1 -> relu -> [avgpool -> 1x1 conv -> relu -> 1x1 conv -> sigmoid] * stream -> conv_out."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(self.pool(x)))))
        return self.conv_out(x * s)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.conv_c(torch.cat([F.relu(self.conv_a(x)), F.relu(self.conv_b(x))], dim=1))


class Split(nn.Module):
    """conv1 -> split [3, 5] (or chunk 2) along channels -> one conv per part -> add -> conv_out."""

    def __init__(self, chunk: bool = False):
        super().__init__()
        self.chunk = chunk
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        n_a, n_b = (4, 4) if chunk else (3, 5)
        self.conv_a = nn.Conv2d(n_a, 6, 1)
        self.conv_b = nn.Conv2d(n_b, 6, 1)
        self.conv_out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        a, b = x.chunk(2, dim=1) if self.chunk else torch.split(x, [3, 5], dim=1)
        return self.conv_out(F.relu(self.conv_a(a) + self.conv_b(b)))


class FlattenLinear(nn.Module):
    """conv (50 channels on 4x4) -> flatten -> Linear(800): the Linear sees channel x spatial."""

    def __init__(self, how: str = "flatten"):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 50, 3, padding=1)
        self.fc = nn.Linear(50 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:  # a literal size that counts channels: thinning must rewrite it
            x = x.reshape(-1, 800)
        return self.fc(x)


class ChannelsLast(nn.Module):
    """conv -> channels moved last (permute, or flatten + transpose) -> Linear over the channel dim."""

    def __init__(self, how: str = "permute"):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.permute(0, 2, 3, 1) if self.how == "permute" else x.flatten(2).transpose(1, 2)
        return self.fc(x)


class ReduceLinear(nn.Module):
    """conv -> mean (or sum with keepdim, then flatten) over spatial dims -> Linear."""

    def __init__(self, how: str = "mean"):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.mean(dim=(2, 3)) if self.how == "mean" else torch.sum(x, dim=(2, 3), keepdim=True).flatten(1)
        return self.fc(x)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = F.relu6(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.pw(x)


class Grouped(nn.Module):
    """ResNeXt-style grouped conv (4 in / 4 out per group), or unequal per group (4 in / 6 out)."""

    def __init__(self, unequal: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        cout = 12 if unequal else 8
        self.gconv = nn.Conv2d(8, cout, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(cout, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.gconv(F.relu(self.conv1(x)))))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.up(F.relu(self.conv1(x)))))


class Norms(nn.Module):
    """conv -> GroupNorm(4 groups of 2) -> conv -> InstanceNorm (affine or not) -> conv."""

    def __init__(self, affine: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=affine)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.inorm(self.conv2(x)))
        return self.conv3(x)


class LayerNormChannels(nn.Module):
    """LayerNorm over the channel dim (ConvNeXt-style, channels last): channels go when they are zero at its
    input, and the thinned norm keeps dividing by the original width."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.ln(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv3(F.relu(self.conv2(x)))


class LayerNormSpatial(nn.Module):
    """LayerNorm over (H, W): channels stay separable (conv2's group thins, conv1's group is not frozen)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm([4, 4])
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.ln(self.conv1(x))
        return self.conv3(F.relu(self.conv2(x)))


class SoftmaxChannels(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = torch.softmax(self.conv1(x), dim=self.dim)
        return self.conv3(F.relu(self.conv2(x)))


class Opaque(nn.Module):
    """A custom module kept as a leaf: the analysis cannot see inside it."""

    def forward(self, x):
        return x.flip(1) * 2.0


class Unknown(nn.Module):
    """conv1 -> an op the analysis does not know -> conv2 -> relu -> conv3 (conv2's group still thins)."""

    def __init__(self, how: str = "fft"):
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.opaque = Opaque()
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.conv1(x)
        if self.how == "fft":
            x = torch.fft.fft(x, dim=-1).real
        elif self.how == "leaf":
            x = self.opaque(x)
        else:  # a channel-mixing method: reversing the channels
            x = x.flip(1)
        return self.conv3(F.relu(self.conv2(x)))


class ToOutput(nn.Module):
    """conv1's channels reach the graph output directly; conv2's through a relu."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a = self.conv1(x)
        return a, self.conv3(F.relu(self.conv2(a)))


class StyleModules(nn.Module):
    """conv -> relu -> conv -> relu -> {avgpool -> flatten -> fc1, mean -> fc2} -> add: module calls."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6 * 2 * 2, 5)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc1(self.flatten(self.pool(x))) + self.fc2(self.flatten(self.gap(x)))


class StyleFunctional(nn.Module):
    """The same computation with functional calls on bare parameters."""

    def __init__(self):
        super().__init__()
        ref = StyleModules()
        self.w1, self.b1 = nn.Parameter(ref.conv1.weight.detach().clone()), nn.Parameter(ref.conv1.bias.detach().clone())
        self.w2, self.b2 = nn.Parameter(ref.conv2.weight.detach().clone()), nn.Parameter(ref.conv2.bias.detach().clone())
        self.fw1, self.fb1 = nn.Parameter(ref.fc1.weight.detach().clone()), nn.Parameter(ref.fc1.bias.detach().clone())
        self.fw2, self.fb2 = nn.Parameter(ref.fc2.weight.detach().clone()), nn.Parameter(ref.fc2.bias.detach().clone())

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, self.b2, padding=1))
        a = F.linear(torch.flatten(F.avg_pool2d(x, 2), 1), self.fw1, self.fb1)
        b = F.linear(torch.mean(x, dim=(2, 3)), self.fw2, self.fb2)
        return a + b


class StyleMethods(nn.Module):
    """The same computation with tensor methods where torch has them (relu, view, mean)."""

    def __init__(self):
        super().__init__()
        ref = StyleModules()
        self.conv1, self.conv2, self.fc1, self.fc2 = ref.conv1, ref.conv2, ref.fc1, ref.fc2

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        p = F.avg_pool2d(x, 2)
        return self.fc1(p.view(p.size(0), -1)) + self.fc2(x.mean((2, 3)))


class Shared(nn.Module):
    """One conv module called twice: its input and output channels are one set."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))
        return self.conv_out(x)


class TiedWeights(nn.Module):
    """conv3 shares conv2's weight (not its bias): their channels and conv1's are one set."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3.weight = self.conv2.weight
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.conv_out(x)


@dataclass(frozen=True)
class Pattern:
    """A pattern model: how to build it, its input shape (batch 2), and whether thinning must shrink it."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...] = (2, 3, 6, 6)
    shrinks: bool = True  # False: every prunable group is frozen by design
    leaf_modules: tuple[type[nn.Module], ...] = ()

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomize(self.build(), seed)

    def inputs(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = self.shape if batch is None else (batch, *self.shape[1:])
        return torch.randn(shape, generator=g)


PATTERNS: list[Pattern] = [
    Pattern("conv_bn_relu_conv", ConvBNReLUConv),
    Pattern("residual_add", Residual),
    Pattern("residual_sub", lambda: Residual(sub=True)),
    Pattern("squeeze_excite", SqueezeExcite),
    Pattern("cat", Concat),
    Pattern("split", Split),
    Pattern("chunk", lambda: Split(chunk=True)),
    Pattern("flatten_linear", FlattenLinear, shape=(2, 3, 4, 4)),
    Pattern("view_linear", lambda: FlattenLinear("view"), shape=(2, 3, 4, 4)),
    Pattern("reshape_literal_linear", lambda: FlattenLinear("reshape"), shape=(2, 3, 4, 4)),
    Pattern("permute_linear", ChannelsLast),
    Pattern("transpose_linear", lambda: ChannelsLast("transpose")),
    Pattern("mean_linear", ReduceLinear),
    Pattern("sum_linear", lambda: ReduceLinear("sum")),
    Pattern("depthwise", Depthwise),
    Pattern("grouped", Grouped),
    Pattern("grouped_unequal", lambda: Grouped(unequal=True)),
    Pattern("conv_transpose", Transposed),
    Pattern("groupnorm_instancenorm", Norms),
    Pattern("groupnorm_instancenorm_affine", lambda: Norms(affine=True)),
    Pattern("layernorm_channels", LayerNormChannels),
    Pattern("layernorm_spatial", LayerNormSpatial, shape=(2, 3, 4, 4)),
    Pattern("softmax_channels", SoftmaxChannels),
    Pattern("softmax_spatial", lambda: SoftmaxChannels(dim=3)),
    Pattern("unknown_fft", Unknown),
    Pattern("unknown_leaf", lambda: Unknown("leaf"), leaf_modules=(Opaque,)),
    Pattern("unknown_method", lambda: Unknown("flip")),
    Pattern("graph_output", ToOutput),
    Pattern("style_modules", StyleModules, shape=(2, 3, 4, 4)),
    Pattern("style_functional", StyleFunctional, shape=(2, 3, 4, 4)),
    Pattern("style_methods", StyleMethods, shape=(2, 3, 4, 4)),
    Pattern("shared_module", Shared),
    Pattern("tied_weights", TiedWeights),
]
PATTERN_BY_NAME = {p.name: p for p in PATTERNS}


# --------------------------------------------------------------------------------------------------
# Helpers


def run_analysis(name: str) -> tuple[fx.GraphModule, ChannelAnalysis]:
    p = PATTERN_BY_NAME[name]
    gm = fxcondensa.trace(p.model(), p.inputs(), leaf_modules=p.leaf_modules)
    return gm, analyze(gm)


def group_of(a: ChannelAnalysis, producer: str) -> Group:
    hits = [g for g in a.groups if producer in g.producers]
    assert len(hits) == 1, f"{producer} is a producer of {len(hits)} groups: {[g.producers for g in a.groups]}"
    return hits[0]


def joined(a: ChannelAnalysis, *producers: str) -> bool:
    return len({group_of(a, p).id for p in producers}) == 1


def reasons(g: Group) -> str:
    return "; ".join(g.frozen).lower()


def slice_of(a: ChannelAnalysis, path: str, dim: int) -> object:
    hits = [s for s in a.slices if s.path == path and s.dim == dim]
    assert len(hits) == 1, f"{len(hits)} slices for {path} dim {dim}: {[(s.path, s.dim) for s in a.slices]}"
    return hits[0]


def channel_ids(a: ChannelAnalysis, atoms: torch.Tensor) -> torch.Tensor:
    return a.channel_of[atoms]


def producer_channels(a: ChannelAnalysis, producer: str) -> torch.Tensor:
    """Channel id of each output channel of a module producer (its weight's producer slice)."""
    s = [s for s in a.slices if s.role == "producer" and s.path.rsplit(".", 1)[0] == producer]
    assert len(s) == 1, f"{producer}: {len(s)} producer slices"
    return a.channel_of[s[0].atoms]


# --------------------------------------------------------------------------------------------------
# Tests, one per pattern


def test_every_pattern_runs_and_the_analysis_never_crashes():
    for p in PATTERNS:
        model = p.model()
        gm = fxcondensa.trace(model, p.inputs(), leaf_modules=p.leaf_modules)
        with torch.no_grad():  # the traced graph computes what the model computes
            torch.testing.assert_close(gm.eval()(p.inputs()), model.eval()(p.inputs()))
        a = analyze(gm)
        assert a.groups, p.name
        # every node has its record; every group's channels are disjoint and cover all channels
        assert all(node_record(n, create=False) is not None for n in gm.graph.nodes), p.name
        covered = torch.cat([g.channels for g in a.groups]).sort().values
        assert torch.equal(covered, torch.arange(a.num_channels)), p.name


def test_lenet5_groups():
    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    a = analyze(gm)
    assert [(g.producers, g.channels.numel(), bool(g.frozen)) for g in a.groups] == [
        (["conv1"], 20, False), (["conv2"], 50, False), (["ip1"], 500, False), (["ip2"], 10, True)]
    assert "output" in reasons(group_of(a, "ip2"))


def test_conv_bn_relu_conv():
    _, a = run_analysis("conv_bn_relu_conv")
    g1 = group_of(a, "conv1")
    assert g1.producers == ["conv1"] and not g1.frozen
    assert {"conv1", "bn1", "conv2"} <= set(g1.layers)
    assert g1.channels.numel() == 8
    # BN's affine parameters and statistics are sliced with conv1's channels
    for n in ("weight", "bias", "running_mean", "running_var"):
        s = slice_of(a, f"bn1.{n}", 0)
        assert torch.equal(channel_ids(a, s.atoms), producer_channels(a, "conv1"))
    assert slice_of(a, "conv2.weight", 1).role == "consumer"
    assert torch.equal(channel_ids(a, slice_of(a, "conv2.weight", 1).atoms), producer_channels(a, "conv1"))
    assert not joined(a, "conv1", "conv2")
    assert "output" in reasons(group_of(a, "conv2"))


@pytest.mark.parametrize("name", ["residual_add", "residual_sub"])
def test_residual_joins_producers(name):
    _, a = run_analysis(name)
    assert joined(a, "conv1", "conv2")
    g = group_of(a, "conv1")
    assert not g.frozen and g.channels.numel() == 8
    # channel k of conv1 is channel k of conv2
    assert torch.equal(producer_channels(a, "conv1"), producer_channels(a, "conv2"))
    assert {"bn1", "bn2", "conv3"} <= set(g.layers)
    assert not joined(a, "conv1", "conv3")


def test_squeeze_excite_mul_joins_the_gate_with_the_stream():
    _, a = run_analysis("squeeze_excite")
    assert joined(a, "conv1", "se2")
    assert torch.equal(producer_channels(a, "conv1"), producer_channels(a, "se2"))
    assert not joined(a, "conv1", "se1")
    assert not group_of(a, "conv1").frozen and not group_of(a, "se1").frozen
    assert group_of(a, "se1").channels.numel() == 4


def test_cat_offsets():
    _, a = run_analysis("cat")
    assert not joined(a, "conv_a", "conv_b")
    s = slice_of(a, "conv_c.weight", 1)
    ids = channel_ids(a, s.atoms)
    assert ids.numel() == 10
    assert torch.equal(ids[:4], producer_channels(a, "conv_a"))
    assert torch.equal(ids[4:], producer_channels(a, "conv_b"))
    assert not group_of(a, "conv_a").frozen and not group_of(a, "conv_b").frozen


@pytest.mark.parametrize("name,sizes", [("split", (3, 5)), ("chunk", (4, 4))])
def test_split_and_chunk_offsets(name, sizes):
    gm, a = run_analysis(name)
    conv1 = producer_channels(a, "conv1")
    ida = channel_ids(a, slice_of(a, "conv_a.weight", 1).atoms)
    idb = channel_ids(a, slice_of(a, "conv_b.weight", 1).atoms)
    assert torch.equal(ida, conv1[: sizes[0]]) and torch.equal(idb, conv1[sizes[0]:])
    assert not group_of(a, "conv1").frozen
    assert joined(a, "conv_a", "conv_b")  # their outputs are added
    assert a.reshapes, "the split's literal sizes must be recorded for rewriting"


@pytest.mark.parametrize("name", ["flatten_linear", "view_linear", "reshape_literal_linear"])
def test_flatten_gives_channel_by_spatial_consumer(name):
    _, a = run_analysis(name)
    s = slice_of(a, "fc.weight", 1)
    assert s.role == "consumer" and s.atoms.numel() == 50 * 4 * 4
    ids = channel_ids(a, s.atoms).view(50, 16)
    conv = producer_channels(a, "conv")
    assert torch.equal(ids, conv[:, None].expand(50, 16)), "each channel owns 16 consecutive features"
    g = group_of(a, "conv")
    assert not g.frozen and "fc" in g.layers
    assert "output" in reasons(group_of(a, "fc"))


@pytest.mark.parametrize("name", ["permute_linear", "transpose_linear"])
def test_channels_moved_last_feed_a_linear(name):
    gm, a = run_analysis(name)
    s = slice_of(a, "fc.weight", 1)
    assert torch.equal(channel_ids(a, s.atoms), producer_channels(a, "conv"))
    assert not group_of(a, "conv").frozen
    x = gm.graph.find_nodes(op="call_module", target="fc")[0].args[0]
    info = node_record(x).chan
    assert isinstance(info, ChanInfo) and info.dim == len(x.meta["tensor_meta"].shape) - 1


@pytest.mark.parametrize("name", ["mean_linear", "sum_linear"])
def test_spatial_reduction_then_linear(name):
    _, a = run_analysis(name)
    s = slice_of(a, "fc.weight", 1)
    assert torch.equal(channel_ids(a, s.atoms), producer_channels(a, "conv"))
    assert not group_of(a, "conv").frozen


def test_reduction_over_channels_freezes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x).sum(1) * 2

    gm = fxcondensa.trace(M(), torch.randn(1, 3, 5, 5))
    g = group_of(analyze(gm), "conv")
    assert g.frozen and "channel dim" in reasons(g)


def test_depthwise_ties_input_and_output():
    _, a = run_analysis("depthwise")
    assert joined(a, "conv1", "dw")
    assert torch.equal(producer_channels(a, "conv1"), producer_channels(a, "dw"))
    assert not group_of(a, "conv1").frozen
    assert [(gc.module, gc.groups) for gc in a.grouped] == [("dw", 8)]
    assert not joined(a, "conv1", "pw")


def test_grouped_conv_ties_positions_and_is_recorded():
    _, a = run_analysis("grouped")
    assert joined(a, "conv1", "gconv")
    assert torch.equal(producer_channels(a, "conv1"), producer_channels(a, "gconv"))
    assert [(gc.module, gc.groups) for gc in a.grouped] == [("gconv", 2)]
    assert not group_of(a, "gconv").frozen


def test_grouped_conv_with_unequal_in_out_per_group_keeps_inputs_and_thins_outputs():
    # ResNeSt / FastViT: each output reads several inputs of its group. Its inputs stay (conv1 is frozen, with
    # the reason); its outputs go in equal numbers per group.
    _, a = run_analysis("grouped_unequal")
    g = group_of(a, "conv1")
    assert g.frozen and "per group" in reasons(g), g.frozen
    assert not group_of(a, "gconv").frozen


def test_conv_transpose_slices_dim0_as_consumer_and_dim1_as_producer():
    _, a = run_analysis("conv_transpose")
    cons = slice_of(a, "up.weight", 0)
    prod = slice_of(a, "up.weight", 1)
    assert cons.role == "consumer" and prod.role == "producer"
    assert torch.equal(channel_ids(a, cons.atoms), producer_channels(a, "conv1"))
    assert group_of(a, "up").channels.numel() == 6 and not group_of(a, "up").frozen
    assert not joined(a, "conv1", "up")


@pytest.mark.parametrize("name", ["groupnorm_instancenorm", "groupnorm_instancenorm_affine"])
def test_groupnorm_whole_groups_and_instancenorm(name):
    _, a = run_analysis(name)
    ids = producer_channels(a, "conv1").view(4, 2)
    # the two channels of each GroupNorm group are one channel; the four groups stay separate
    assert torch.equal(ids[:, 0], ids[:, 1]) and ids[:, 0].unique().numel() == 4
    assert group_of(a, "conv1").channels.numel() == 4 and not group_of(a, "conv1").frozen
    g2 = group_of(a, "conv2")
    assert g2.channels.numel() == 6 and not g2.frozen
    if name.endswith("affine"):
        assert slice_of(a, "inorm.weight", 0).role == "norm"


def test_layernorm_over_channels_and_over_other_dims_are_thinnable():
    _, a = run_analysis("layernorm_channels")
    assert not group_of(a, "conv1").frozen and not group_of(a, "conv2").frozen
    assert any(s.path == "ln.weight" for s in a.slices)  # the norm's affine terms go with the channels
    _, a = run_analysis("layernorm_spatial")
    assert not group_of(a, "conv1").frozen and not group_of(a, "conv2").frozen


def test_softmax_over_channels_freezes_but_not_over_other_dims():
    _, a = run_analysis("softmax_channels")
    g = group_of(a, "conv1")
    assert g.frozen and "softmax" in reasons(g)
    assert not group_of(a, "conv2").frozen
    _, a = run_analysis("softmax_spatial")
    assert not group_of(a, "conv1").frozen


@pytest.mark.parametrize("name,word", [("unknown_fft", "fft"), ("unknown_leaf", "opaque"),
                                       ("unknown_method", "flip")])
def test_unknown_op_freezes_and_never_crashes(name, word):
    _, a = run_analysis(name)
    g = group_of(a, "conv1")
    assert g.frozen and word in reasons(g) and "not known" in reasons(g), g.frozen
    assert not group_of(a, "conv2").frozen


def test_analysis_failure_inside_a_rule_freezes_instead_of_crashing():
    from fxcondensa.rules import registry

    def boom(ctx, node):
        raise RuntimeError("synthetic failure")

    original = registry.rule_for_key(nn.MaxPool2d)
    registry.register_rule(nn.MaxPool2d, channels=boom, zeros="custom", replace=True)
    try:
        gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        a = analyze(gm)
    finally:
        registry.register_rule(nn.MaxPool2d, channels=original.channels, zeros=original.zeros, cost=original.cost,
                               kind=original.kind, name=original.name, replace=True)
    g = group_of(a, "conv1")
    assert g.frozen and "synthetic failure" in reasons(g)
    assert len(a.rule_failures) == 2 and "synthetic failure" in a.rule_failures[0]  # pool1 and pool2


def test_group_reaching_the_graph_output_is_frozen():
    _, a = run_analysis("graph_output")
    g = group_of(a, "conv1")
    assert g.frozen and "output" in reasons(g)
    assert not group_of(a, "conv2").frozen
    assert "output" in reasons(group_of(a, "conv3"))


def test_graph_input_channels_are_never_sliced():
    _, a = run_analysis("conv_bn_relu_conv")
    assert all(not (s.path == "conv1.weight" and s.dim == 1) for s in a.slices)


def _signature(a: ChannelAnalysis) -> tuple:
    groups = [(g.channels.numel(), bool(g.frozen), len(g.producers)) for g in a.groups]
    slices = sorted((s.role, s.dim, s.atoms.numel(), int(channel_ids(a, s.atoms).unique().numel()))
                    for s in a.slices)
    return groups, slices, len(a.exits)


def test_module_functional_and_method_calls_give_the_same_groups():
    x = torch.randn(2, 3, 4, 4)
    sigs = []
    for cls in (StyleModules, StyleFunctional, StyleMethods):
        torch.manual_seed(0)
        model = cls().eval()
        gm = fxcondensa.trace(model, x)
        a = analyze(gm)
        sigs.append(_signature(a))
    assert sigs[0] == sigs[1] == sigs[2]
    groups = sigs[0][0]
    assert groups == [(8, False, 1), (6, False, 1), (5, True, 2)]  # fc1 and fc2 summed into the output


def test_shared_module_called_twice_is_one_set_of_channels():
    _, a = run_analysis("shared_module")
    assert joined(a, "conv1", "conv")
    assert len([s for s in a.slices if s.path == "conv.weight" and s.dim == 0]) == 1
    assert torch.equal(producer_channels(a, "conv"), producer_channels(a, "conv1"))
    assert not group_of(a, "conv").frozen
    assert not joined(a, "conv", "conv_out")


def test_tied_weights_are_sliced_once():
    _, a = run_analysis("tied_weights")
    assert not any(s.path.startswith("conv3.weight") for s in a.slices), "conv3.weight is conv2.weight"
    assert joined(a, "conv1", "conv2")
    assert torch.equal(producer_channels(a, "conv1"), producer_channels(a, "conv2"))
    assert torch.equal(channel_ids(a, slice_of(a, "conv3.bias", 0).atoms), producer_channels(a, "conv2"))
    assert not group_of(a, "conv1").frozen


def test_tied_linear_weights():
    from _models import Tied

    gm = fxcondensa.trace(Tied(6), torch.randn(2, 6))
    a = analyze(gm)
    assert len([s for s in a.slices if s.path == "a.weight" and s.dim == 0]) == 1
    g = group_of(a, "a")
    assert "b" in g.producers and g.frozen and "output" in reasons(g)


def test_analyze_without_shapes_is_a_clear_error():
    gm = fxcondensa.trace(ConvBNReLUConv())
    with pytest.raises(ValueError, match="example inputs"):
        analyze(gm)


def test_analysis_is_deterministic():
    for name in ("squeeze_excite", "cat", "tied_weights"):
        a1, a2 = run_analysis(name)[1], run_analysis(name)[1]
        assert _signature(a1) == _signature(a2)
        assert [g.producers for g in a1.groups] == [g.producers for g in a2.groups]
        assert torch.equal(a1.channel_of, a2.channel_of)


# --------------------------------------------------------------------------------------------------
# Regression tests for bugs these tests found (each constant says what was wrong)


class ClampMin(nn.Module):
    """conv1 -> x.clamp(min=0.1) -> conv2: clamp maps a zero channel to 0.1, so it cannot go."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(self.conv1(x).clamp(min=0.1))))


class ViewSameDim(nn.Module):
    """conv (8) -> x.view(x.size(0), 8, -1) -> mean -> Linear: a literal channel count at the same dim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.size(0), 8, -1).mean(2))


class ChannelCount(nn.Module):
    """The channel count read as a number (x.size(1)) scales the values: thinning changes it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = x * (1.0 / x.size(1))
        return self.conv3(F.relu(self.conv2(x)))


CLAMP_BUG = ("clamp/clip (methods) and hardtanh (F.hardtanh, nn.Hardtanh) are in the zero-preserving tables "
             "whatever their bounds: x.clamp(min=0.1) maps a zero channel to 0.1, yet it is called removable")
VIEW_BUG = ("a view/reshape/expand whose literal sizes count channels at the same dim (x.view(b, 8, -1), "
            "x.view(b, 8, 4, 4), torch.reshape(x, (-1, 8, 4, 4)), x.expand(b, 8, 4, 4)) is not recorded in "
            "ChannelAnalysis.reshapes (only recorded when the channel dim moves or changes size), so thin "
            "keeps the literal 8 and the thinned graph fails shape propagation")
COUNT_BUG = ("the channel count read as a number (x.size(1), x.shape[1], x.numel()) and used in arithmetic "
             "is not frozen: thinning changes the number and thin raises ThinningCheckError")


def test_clamp_with_a_positive_min_keeps_zero_channels():
    from fxcondensa.passes.analysis import removable_channels

    torch.manual_seed(0)
    model = ClampMin().eval()
    with torch.no_grad():
        model.conv1.weight[0] = 0
        model.conv1.bias[0] = 0
    gm = fxcondensa.trace(model, torch.randn(1, 3, 4, 4))
    a = analyze(gm)
    assert not removable_channels(gm, a)[producer_channels(a, "conv1")[0]]


def test_view_with_a_literal_channel_count_is_recorded_for_rewriting():
    gm = fxcondensa.trace(ViewSameDim(), torch.randn(2, 3, 4, 4))
    a = analyze(gm)
    views = [n.name for n in gm.graph.nodes if n.target == "view"]
    assert views and all(v in a.reshapes for v in views)


def test_channel_count_used_as_a_number_freezes():
    gm = fxcondensa.trace(ChannelCount(), torch.randn(2, 3, 4, 4))
    g = group_of(analyze(gm), "conv1")
    assert g.frozen


class _GLU(nn.Module):
    """``a, b = linear(x).chunk(2, -1)``; ``silu(a) * b`` pairs channel j of each half, so both halves keep as
    many channels and the chunk into two equal parts stays exact."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 32), nn.Linear(16, 4)

    def forward(self, x):
        a, b = self.lin(x).chunk(2, -1)
        return self.out(F.silu(a) * b)


def test_a_chunk_into_equal_parts_that_stay_equal_is_kept():
    from fxcondensa import thin
    from fxcondensa.capture.records import thin_record
    from fxcondensa.schemes import StructurePrune

    model, x = _GLU().eval(), torch.randn(3, 8)
    graph = thin(model, StructurePrune(0.5), x, output="graph")
    assert graph.lin.weight.shape[0] < 32
    assert any(n.target == "chunk" or "chunk" in str(n.target) for n in graph.graph.nodes), graph.code
    small = thin(model, StructurePrune(0.5), x)
    assert type(small) is _GLU and thin_record(small).returns == "module", thin_record(small).reason

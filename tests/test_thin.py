"""``fxcondensa.thin``: the thinned model equals the compressed dense model, and is smaller.

Every pattern model of ``test_channels.PATTERNS`` (and LeNet-5) is thinned with ``StructurePrune`` and
compared with ``compress`` on fresh random inputs (other values and another batch size than the example
inputs), in eval mode, within the contract's tolerances (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _models import state_hash
from test_channels import (
    CLAMP_BUG,
    COUNT_BUG,
    PATTERN_BY_NAME,
    PATTERNS,
    VIEW_BUG,
    ChannelCount,
    ClampMin,
    Pattern,
    ViewSameDim,
    randomize,
)
from torch import nn

import fxcondensa
from fxcondensa import ThinningCheckError, compress, thin
from fxcondensa.capture.records import thin_record
from fxcondensa.passes.costs import profile_costs
from fxcondensa.schemes import FilterPrune, NeuronPrune, Prune, StructurePrune

RTOL, ATOL = 1e-4, 1e-5

LENET = Pattern("lenet5", fxcondensa.models.LeNet5, shape=(2, 1, 28, 28))
ALL = [*PATTERNS, LENET]


def cases(patterns=ALL):
    return [pytest.param(p, id=p.name) for p in patterns]


# --------------------------------------------------------------------------------------------------
# helpers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_macs(model: nn.Module, x: torch.Tensor) -> int:
    return sum(c.macs for c in profile_costs(model, x))


def run(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_outputs(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, (getattr(b, "shape", b), a.shape)
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
    else:
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same_outputs(u, v)


def fresh_inputs(p: Pattern) -> list[torch.Tensor]:
    """Other values than the example inputs (seed 0), and another batch size."""
    return [p.inputs(seed=123), p.inputs(batch=5, seed=7), p.inputs(batch=1, seed=8) * 3]


def assert_attributes_match_tensors(gm: nn.Module) -> None:
    for name, m in gm.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            assert m.weight.shape[0] == m.in_channels, name
            assert m.weight.shape[1] * m.groups == m.out_channels, name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm and InstanceNorm
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t is None or t.shape == (m.num_features,), name
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name
            assert m.weight is None or m.weight.shape == (m.num_channels,), name
        elif isinstance(m, nn.LayerNorm):
            assert m.weight is None or tuple(m.weight.shape) == tuple(m.normalized_shape), name


def kept(gm: fx.GraphModule) -> dict[str, tuple[int, int, str]]:
    """Group name -> (channels, kept, frozen reason), from the thinned model's metadata."""
    return {g.group: (g.channels, g.kept, g.frozen) for g in thin_record(gm).groups}


class Wide(nn.Module):
    """Wider channel counts for align tests: conv(32) -> bn -> conv(24) -> mean -> fc(20) -> fc(5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 24, 3, padding=1)
        self.fc1 = nn.Linear(24, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


WIDE = Pattern("wide", Wide, shape=(2, 3, 5, 5))


# --------------------------------------------------------------------------------------------------
# equivalence and size, for every pattern


@pytest.mark.parametrize("p", cases())
def test_thinned_equals_compressed_and_is_smaller(p):
    model = p.model()
    before = state_hash(model)
    scheme = StructurePrune(0.5)
    x = p.inputs()
    thinned = thin(model, scheme, x, leaf_modules=p.leaf_modules, output="graph")
    compressed = compress(model, scheme, x) if not p.leaf_modules else None
    if compressed is None:  # compress has no leaf_modules: compress a model traced with them
        compressed = compress(fxcondensa.trace(model, x, leaf_modules=p.leaf_modules), scheme, x)
    assert state_hash(model) == before, "thin or compress modified the input model"
    assert isinstance(thinned, fx.GraphModule)
    for xi in fresh_inputs(p):
        assert_same_outputs(run(compressed, xi), run(thinned, xi))
    assert_attributes_match_tensors(thinned)
    if p.shrinks:
        assert n_params(thinned) < n_params(model)
        assert n_macs(thinned, x) < n_macs(model, x)
    else:
        assert n_params(thinned) == n_params(model)
        assert thin_record(thinned).frozen, "a pattern frozen by design reports its frozen groups"


@pytest.mark.parametrize("p", cases())
def test_thin_without_scheme_removes_the_zeros_of_a_compressed_model(p):
    model, x = p.model(), p.inputs()
    scheme = StructurePrune(0.5)
    direct = thin(model, scheme, x, leaf_modules=p.leaf_modules)
    compressed = compress(fxcondensa.trace(model, x, leaf_modules=p.leaf_modules), scheme, x)
    before = state_hash(compressed)
    again = thin(compressed, example_inputs=x)
    assert state_hash(compressed) == before
    assert n_params(again) == n_params(direct)
    assert_same_outputs(run(compressed, fresh_inputs(p)[1]), run(again, fresh_inputs(p)[1]))


def test_thin_without_scheme_on_a_dense_model_removes_nothing():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, example_inputs=x)
    assert n_params(thinned) == n_params(model)
    assert_same_outputs(run(model, x), run(thinned, x))


def test_thin_removes_hand_zeroed_channels_exactly():
    model, x = LENET.model(), LENET.inputs()
    with torch.no_grad():
        model.conv1.weight[[1, 4, 7]] = 0
        model.conv1.bias[[1, 4, 7]] = 0
        model.ip1.weight[10:110] = 0
        model.ip1.bias[10:110] = 0
    thinned = thin(model, example_inputs=x)
    assert thinned.conv1.out_channels == 17 and thinned.conv2.in_channels == 17
    assert thinned.ip1.out_features == 400 and thinned.ip2.in_features == 400
    assert thinned.ip1.in_features == 50 * 4 * 4
    assert_same_outputs(run(model, fresh_inputs(LENET)[1]), run(thinned, fresh_inputs(LENET)[1]))


def test_a_channel_zero_in_the_weights_but_not_the_bias_stays():
    model, x = LENET.model(), LENET.inputs()
    with torch.no_grad():
        model.conv1.weight[[1, 4]] = 0
        model.conv1.bias[1] = 0
        model.conv1.bias[4] = 0.5
    thinned = thin(model, example_inputs=x)
    assert thinned.conv1.out_channels == 19


def test_thin_of_a_graph_module_uses_its_shapes():
    gm = fxcondensa.trace(LENET.model(), LENET.inputs())
    thinned = thin(gm, StructurePrune(0.5))
    assert n_params(thinned) < n_params(gm)


@pytest.mark.parametrize("name", ["lenet5", "residual_add", "depthwise", "grouped", "conv_transpose"])
def test_thinned_modules_have_consistent_attributes(name):
    p = LENET if name == "lenet5" else PATTERN_BY_NAME[name]
    thinned = thin(p.model(), StructurePrune(0.3), p.inputs())
    assert_attributes_match_tensors(thinned)
    # re-tracing the thinned model from its own attributes works (repr and export read them)
    assert "Conv2d" in repr(thinned)
    assert_same_outputs(run(thinned, p.inputs(batch=3)), run(fxcondensa.trace(thinned, p.inputs()), p.inputs(batch=3)))


def test_grouped_conv_keeps_equal_counts_per_group():
    p = PATTERN_BY_NAME["grouped"]
    for d in (0.2, 0.5, 0.7):
        thinned = thin(p.model(), StructurePrune(d), p.inputs())
        g = thinned.gconv
        assert g.in_channels == g.out_channels == thinned.conv1.out_channels
        assert g.in_channels % g.groups == 0
        assert g.groups in (1, 2)


def test_depthwise_stays_depthwise():
    p = PATTERN_BY_NAME["depthwise"]
    thinned = thin(p.model(), StructurePrune(0.5), p.inputs())
    dw = thinned.dw
    assert dw.groups == dw.in_channels == dw.out_channels == thinned.conv1.out_channels < 8


# --------------------------------------------------------------------------------------------------
# scheme options


@pytest.mark.parametrize("p", [LENET, WIDE, PATTERN_BY_NAME["residual_add"], PATTERN_BY_NAME["depthwise"]],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("density", [0.3, 0.01])
def test_align_rounds_kept_counts(p, density):
    model, x = p.model(), p.inputs()
    thinned = thin(model, StructurePrune(density, align=8), x)
    groups = kept(thinned)
    for name, (channels, k, frozen) in groups.items():
        if not frozen:
            assert k % 8 == 0 or k == channels, (name, channels, k)
            assert k >= min(8, channels)
    assert_same_outputs(run(compress(model, StructurePrune(density, align=8), x), p.inputs(batch=3)),
                        run(thinned, p.inputs(batch=3)))
    if p is WIDE:
        assert thinned.conv1.out_channels % 8 == 0 and thinned.conv2.out_channels % 8 == 0
        assert thinned.conv1.out_channels < 32


@pytest.mark.parametrize("p", cases([LENET, WIDE, *PATTERNS]))
def test_every_group_keeps_a_channel_at_tiny_density(p):
    model, x = p.model(), p.inputs()
    thinned = thin(model, StructurePrune(0.01), x, leaf_modules=p.leaf_modules)
    for name, (channels, k, _) in kept(thinned).items():
        assert k >= 1, (name, channels, k)
    out = run(thinned, p.inputs(batch=3))
    assert all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))


def test_tiny_per_layer_density_keeps_one_channel_in_small_groups():
    thinned = thin(LENET.model(), StructurePrune(0.01, layers={"*": 0.01}), LENET.inputs())
    assert (thinned.conv1.out_channels, thinned.conv2.out_channels, thinned.ip1.out_features) == (1, 1, 5)


def test_tiny_global_density_keeps_few_channels():
    thinned = thin(LENET.model(), StructurePrune(0.01), LENET.inputs())
    kept_total = thinned.conv1.out_channels + thinned.conv2.out_channels + thinned.ip1.out_features
    assert kept_total <= round(0.01 * 570) + 3  # the global quota, plus at most one per group


def test_prune_bias_false_keeps_channels_with_a_bias():
    model, x = LENET.model(), LENET.inputs()
    scheme = StructurePrune(0.5, prune_bias=False)
    compressed = compress(model, scheme, x)
    zero_rows = (compressed.conv1.weight.flatten(1) == 0).all(1)
    assert zero_rows.any(), "the scheme must still zero some filters"
    assert (compressed.conv1.bias != 0).all()
    thinned = thin(model, scheme, x)
    assert n_params(thinned) == n_params(model)
    assert all(k == c for c, k, _ in kept(thinned).values())
    assert_same_outputs(run(compressed, fresh_inputs(LENET)[1]), run(thinned, fresh_inputs(LENET)[1]))


def test_prune_bias_false_still_thins_biasless_layers():
    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    p = Pattern("nobias", NoBias)
    model = p.model()
    thinned = thin(model, StructurePrune(0.5, prune_bias=False), p.inputs())
    assert thinned.conv1.out_channels < 8
    assert_same_outputs(run(compress(model, StructurePrune(0.5, prune_bias=False), p.inputs()), p.inputs(batch=4)),
                        run(thinned, p.inputs(batch=4)))


def test_per_layer_densities():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, StructurePrune(0.5, layers={"conv1": 0.25, "ip1": 0.1}), x)
    assert thinned.conv1.out_channels == 5
    assert thinned.ip1.out_features == 50
    assert thinned.conv2.out_channels < 50
    thinned = thin(model, StructurePrune(0.3, layers={"conv*": 0.5}), x)
    assert (thinned.conv1.out_channels, thinned.conv2.out_channels) == (10, 25)


def test_exclude_keeps_a_layer_and_its_group_whole():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, StructurePrune(0.3, exclude=["conv2"]), x)
    assert thinned.conv2.out_channels == 50 and thinned.ip1.in_features == 800
    assert thinned.conv1.out_channels < 20 and thinned.ip1.out_features < 500
    p = PATTERN_BY_NAME["residual_add"]
    thinned = thin(p.model(), StructurePrune(0.3, exclude="conv2"), p.inputs())
    assert thinned.conv1.out_channels == thinned.conv2.out_channels == 8  # conv2's group is conv1's


def test_bad_layer_patterns_name_the_pattern():
    with pytest.raises(ValueError, match="nosuch"):
        thin(LENET.model(), StructurePrune(0.5, layers={"nosuch": 0.5}), LENET.inputs())
    with pytest.raises(ValueError, match="nosuch"):
        thin(LENET.model(), StructurePrune(0.5, exclude=["nosuch"]), LENET.inputs())


def _custom_criteria(x, dims):
    return x.abs().amax(dim=dims)


@pytest.mark.parametrize("criteria", ["l2norm", "max", "min", "mean", "sum", _custom_criteria],
                         ids=["l2norm", "max", "min", "mean", "sum", "custom"])
@pytest.mark.parametrize("p", [LENET, PATTERN_BY_NAME["residual_add"], PATTERN_BY_NAME["squeeze_excite"]],
                         ids=lambda p: p.name)
def test_criteria_thinned_equals_compressed(p, criteria):
    model, x = p.model(), p.inputs()
    scheme = StructurePrune(0.5, criteria=criteria)
    thinned = thin(model, scheme, x)
    assert_same_outputs(run(compress(model, scheme, x), p.inputs(batch=3, seed=5)),
                        run(thinned, p.inputs(batch=3, seed=5)))
    assert n_params(thinned) < n_params(model)


class Rows(nn.Module):
    """fc1's four rows score differently under each criteria; fc2 reaches the output (frozen)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([
                [3.0, 0.0, 0.0, 0.0],   # l2 3.0  max 3  min 0    sum 3.0
                [1.0, 1.0, 1.0, 1.0],   # l2 2.0  max 1  min 1    sum 4.0
                [0.1, 0.1, 0.1, 0.1],   # l2 0.2  max .1 min .1   sum 0.4
                [2.0, 1.5, 0.0, 0.0],   # l2 2.5  max 2  min 0    sum 3.5
            ]))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("criteria,row", [("l2norm", 0), ("max", 0), ("min", 1), ("sum", 1), ("mean", 1),
                                          (lambda x, dims: -x.abs().sum(dim=dims), 2)],
                         ids=["l2norm", "max", "min", "sum", "mean", "custom"])
def test_criteria_choose_the_expected_channel(criteria, row):
    x = torch.randn(3, 4)
    thinned = thin(Rows(), StructurePrune(0.25, criteria=criteria), x)
    assert thinned.fc1.out_features == 1
    torch.testing.assert_close(thinned.fc1.weight[0], Rows().fc1.weight[row])


def test_neuron_prune_only_touches_linear_channels():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, NeuronPrune(0.3), x)
    assert (thinned.conv1.out_channels, thinned.conv2.out_channels) == (20, 50)
    assert thinned.ip1.out_features < 500
    assert_same_outputs(run(compress(model, NeuronPrune(0.3), x), x), run(thinned, x))


def test_filter_prune_only_touches_conv_channels():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, FilterPrune(0.3), x)
    assert thinned.conv1.out_channels < 20 and thinned.conv2.out_channels < 50
    assert thinned.ip1.out_features == 500
    assert thinned.ip1.in_features == thinned.conv2.out_channels * 16
    assert_same_outputs(run(compress(model, FilterPrune(0.3), x), x), run(thinned, x))


def test_unstructured_prune_rarely_frees_a_channel_but_stays_equal():
    model, x = LENET.model(), LENET.inputs()
    thinned = thin(model, Prune(0.02), x)
    assert_same_outputs(run(compress(model, Prune(0.02), x), fresh_inputs(LENET)[1]),
                        run(thinned, fresh_inputs(LENET)[1]))
    assert n_params(thinned) <= n_params(model)


def test_metadata_records_groups_and_frozen_reasons():
    thinned = thin(LENET.model(), StructurePrune(0.5), LENET.inputs())
    groups = kept(thinned)
    assert set(groups) == {"conv1", "conv2", "ip1", "ip2"}
    assert groups["conv1"][0] == 20 and groups["conv1"][1] == thinned.conv1.out_channels
    assert groups["ip1"][1] == thinned.ip1.out_features
    frozen = thin_record(thinned).frozen
    assert [f.group for f in frozen] == ["ip2"] and "output" in frozen[0].reason


# --------------------------------------------------------------------------------------------------
# the output check


def test_check_catches_a_wrongly_removed_channel(monkeypatch):
    from fxcondensa.passes import thin as thin_module

    real = thin_module.removable_channels

    def tampered(gm, analysis):
        removable = real(gm, analysis)
        # mark one live (non-zero) channel of conv1's group removable
        g = next(g for g in analysis.groups if "conv1" in g.producers)
        live = g.channels[~removable[g.channels]]
        removable = removable.clone()
        removable[live[0]] = True
        return removable

    monkeypatch.setattr(thin_module, "removable_channels", tampered)
    model = LENET.model()
    before = state_hash(model)
    with pytest.raises(ThinningCheckError, match=r"node '\w+'"):
        thin(model, StructurePrune(0.5), LENET.inputs())
    assert state_hash(model) == before
    # without the check the wrong model comes back: the check is what catches it
    wrong = thin(model, StructurePrune(0.5), LENET.inputs(), check=False)
    ref = run(compress(model, StructurePrune(0.5), LENET.inputs()), LENET.inputs())
    assert not torch.allclose(run(wrong, LENET.inputs()), ref, rtol=RTOL, atol=ATOL)


def test_check_names_the_first_diverging_node(monkeypatch):
    from fxcondensa.passes import thin as thin_module

    real = thin_module.removable_channels

    def tampered(gm, analysis):
        removable = real(gm, analysis).clone()
        g = next(g for g in analysis.groups if "ip1" in g.producers)
        removable[g.channels[~removable[g.channels]][0]] = True
        return removable

    monkeypatch.setattr(thin_module, "removable_channels", tampered)
    with pytest.raises(ThinningCheckError) as info:
        thin(LENET.model(), StructurePrune(0.5), LENET.inputs())
    assert "ip1" in str(info.value) or "relu_ip1" in str(info.value) or "ip2" in str(info.value)


# --------------------------------------------------------------------------------------------------
# errors


def test_missing_example_inputs():
    model = LENET.model()
    before = state_hash(model)
    with pytest.raises(ValueError, match="example_inputs"):
        thin(model, StructurePrune(0.5))
    assert state_hash(model) == before


@pytest.mark.parametrize("scheme", ["StructurePrune", 0.5, nn.Linear(2, 2), StructurePrune],
                         ids=["str", "float", "module", "class"])
def test_a_non_scheme_is_a_type_error(scheme):
    model = LENET.model()
    before = state_hash(model)
    with pytest.raises(TypeError, match="scheme"):
        thin(model, scheme, LENET.inputs())
    assert state_hash(model) == before


@pytest.mark.parametrize("cls", [StructurePrune, NeuronPrune, FilterPrune])
@pytest.mark.parametrize("density", [0, 0.0, -0.5, 1.5, float("nan")])
def test_invalid_density_names_the_value(cls, density):
    with pytest.raises(ValueError, match=str(density).replace(".", r"\.")):
        cls(density)


@pytest.mark.parametrize("density", ["0.5", True])
def test_density_of_the_wrong_type(density):
    with pytest.raises(TypeError, match="density"):
        StructurePrune(density)


@pytest.mark.parametrize("align", [0, -8, 2.5, "8", True])
def test_invalid_align_names_the_value(align):
    with pytest.raises(ValueError, match="align") as info:
        StructurePrune(0.5, align=align)
    assert repr(align) in str(info.value)


def test_invalid_criteria_and_layer_density():
    with pytest.raises(ValueError, match="nosuch"):
        StructurePrune(0.5, criteria="nosuch")
    with pytest.raises(TypeError, match="criteria"):
        StructurePrune(0.5, criteria=3)
    with pytest.raises(ValueError, match="2.0"):
        StructurePrune(0.5, layers={"conv1": 2.0})
    with pytest.raises(TypeError, match="prune_bias"):
        StructurePrune(0.5, prune_bias="no")


def test_wrong_example_inputs_are_a_clear_error():
    model = LENET.model()
    before = state_hash(model)
    with pytest.raises(fxcondensa.ExampleInputError):
        thin(model, StructurePrune(0.5), torch.randn(2, 3, 28, 28))
    assert state_hash(model) == before


# --------------------------------------------------------------------------------------------------
# export


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.parametrize("p", [LENET, *[PATTERN_BY_NAME[n] for n in
                                        ("residual_add", "cat", "depthwise", "reshape_literal_linear",
                                         "squeeze_excite", "groupnorm_instancenorm_affine")]],
                         ids=lambda p: p.name)
def test_torchscript_trace_of_a_thinned_model(p):
    thinned = thin(p.model(), StructurePrune(0.5), p.inputs()).eval()
    with torch.no_grad():
        scripted = torch.jit.trace(thinned, p.inputs())
    for xi in (p.inputs(seed=11), p.inputs(batch=4, seed=12)):
        assert_same_outputs(run(thinned, xi), scripted(xi))


def test_randomize_changes_bn_statistics():
    """The helper the equivalence tests rely on really gives non-trivial norm statistics."""
    m = randomize(PATTERN_BY_NAME["conv_bn_relu_conv"].build())
    assert (m.bn1.running_mean != 0).all() and (m.bn1.running_var != 1).all() and (m.bn1.bias != 0).all()


# --------------------------------------------------------------------------------------------------
# regression tests for bugs found here (fixed): each model must thin and equal the compressed model


def _act_model(act):
    """conv1 -> relu -> act -> conv2 -> relu -> conv3; ``act`` is a function or a module type."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.act = act() if isinstance(act, type) else None
            self.conv2 = nn.Conv2d(8, 6, 1)
            self.conv3 = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = self.act(x) if self.act is not None else act(x)
            return self.conv3(torch.relu(self.conv2(x)))

    return M


class _Hardtanh01(nn.Hardtanh):
    def __init__(self):
        super().__init__(0.1, 1.0)


BUG_CASES = [
    (CLAMP_BUG, "clamp_min", ClampMin),
    (CLAMP_BUG, "clip", _act_model(lambda x: x.clip(0.2, 1.0))),
    (CLAMP_BUG, "hardtanh_func", _act_model(lambda x: F.hardtanh(x, 0.1, 1.0))),
    (CLAMP_BUG, "hardtanh_module", _act_model(_Hardtanh01)),
    (VIEW_BUG, "view_size_literal", ViewSameDim),
    (VIEW_BUG, "view_same_shape", _act_model(lambda x: x.view(x.shape[0], 8, 4, 4))),
    (VIEW_BUG, "reshape_kwargs", _act_model(lambda x: x.reshape(shape=(x.size(0), 8, 16)).reshape(x.size(0), 8, 4, 4))),
    (VIEW_BUG, "torch_reshape", _act_model(lambda x: torch.reshape(x, (-1, 8, 4, 4)))),
    (VIEW_BUG, "expand_literal", _act_model(lambda x: x + x.mean((2, 3), keepdim=True).expand(x.size(0), 8, 4, 4))),
    (COUNT_BUG, "size_scale", ChannelCount),
    (COUNT_BUG, "shape_scale", _act_model(lambda x: x / x.shape[1])),
    (COUNT_BUG, "numel_scale", _act_model(lambda x: x / x.numel())),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=name) for _reason, name, b in BUG_CASES])
def test_known_bug_models_thin_and_match(build):
    p = Pattern("bug", build, shape=(2, 3, 4, 4))
    model, x = p.model(), p.inputs()
    thinned = thin(model, StructurePrune(0.5), x)
    compressed = compress(model, StructurePrune(0.5), x)
    for xi in fresh_inputs(p):
        assert_same_outputs(run(compressed, xi), run(thinned, xi))


def test_the_same_models_without_the_bug_thin_fine():
    """Controls for the known-bug models: the same graphs with a zero-preserving op / no literal thin fine."""
    for build in (_act_model(lambda x: x.clamp(min=0.0)), _act_model(lambda x: F.hardtanh(x, -1.0, 1.0)),
                  _act_model(lambda x: x.view(x.shape[0], -1, 4, 4)),
                  _act_model(lambda x: x + x.mean((2, 3), keepdim=True).expand(-1, -1, 4, 4))):
        p = Pattern("control", build, shape=(2, 3, 4, 4))
        model, x = p.model(), p.inputs()
        thinned = thin(model, StructurePrune(0.5), x)
        assert n_params(thinned) < n_params(model)
        assert_same_outputs(run(compress(model, StructurePrune(0.5), x), p.inputs(batch=3)),
                            run(thinned, p.inputs(batch=3)))

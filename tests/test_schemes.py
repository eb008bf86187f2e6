"""Schemes: each compared with a reference computed by hand, and each bad argument refused clearly."""

from __future__ import annotations

import math

import pytest
import torch
from _models import MLP, LeNet5, make_mlp, state_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa import functional as F
from fxcondensa.compression.apply import compress, density, layer_densities
from fxcondensa.measure.footprint import storage_dtypes
from fxcondensa.schemes import (
    BlockPrune,
    Compose,
    FilterPrune,
    NeuronPrune,
    Prune,
    Quantize,
    StructurePrune,
    is_scheme,
)

LENET_WEIGHTS = ["conv1.weight", "conv2.weight", "ip1.weight", "ip2.weight"]


def _lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5()


def _reference_prune(weights: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Condensa's global rule by hand: keep |w| >= the k-th largest |w| over all layers together."""
    everything = torch.cat([w.abs().reshape(-1) for w in weights])
    k = round(density * everything.numel())
    threshold = torch.sort(everything, descending=True).values[k - 1]
    return [w * (w.abs() >= threshold) for w in weights]


@pytest.mark.parametrize("d", [0.007, 0.05, 0.3])
def test_prune_global_threshold_matches_sort_reference(d):
    model = _lenet()
    w = compress(model, Prune(d))
    original = model.state_dict()
    expected = _reference_prune([original[n] for n in LENET_WEIGHTS], d)
    for name, ref in zip(LENET_WEIGHTS, expected, strict=True):
        assert torch.equal(w.state_dict()[name], ref), name
    for name in ["conv1.bias", "conv2.bias", "ip1.bias", "ip2.bias"]:  # Prune leaves biases alone
        assert torch.equal(w.state_dict()[name], original[name])
    assert sum(int(w.state_dict()[n].count_nonzero()) for n in LENET_WEIGHTS) == round(d * 430500)


def test_prune_threshold_is_global_not_per_layer():
    model = _lenet()
    with torch.no_grad():
        model.conv1.weight.add_(10.0)  # every conv1 weight now exceeds every other weight
    dens = layer_densities(compress(model, Prune(500 / 430500)))
    assert dens["conv1.weight"] == 1.0
    assert dens["ip1.weight"] == 0.0


def test_prune_per_layer_density_and_exclude():
    model = _lenet()
    w = compress(model, Prune(0.1, layers={"ip1": 0.5}, exclude=["ip2"]))
    dens = layer_densities(w)
    assert dens["ip1.weight"] == 0.5
    assert dens["ip2.weight"] == 1.0
    # the global 0.1 applies to conv1 and conv2 together, with their own threshold
    original = model.state_dict()
    expected = _reference_prune([original["conv1.weight"], original["conv2.weight"]], 0.1)
    assert torch.equal(w.state_dict()["conv1.weight"], expected[0])
    assert torch.equal(w.state_dict()["conv2.weight"], expected[1])


def test_prune_patterns_and_nocompress_marker():
    model = _lenet()
    dens = layer_densities(compress(model, Prune(0.2, exclude="conv*")))
    assert dens["conv1.weight"] == dens["conv2.weight"] == 1.0
    model.ip2.condensa_nocompress = True  # Condensa's opt-out attribute
    assert layer_densities(compress(model, Prune(0.2)))["ip2.weight"] == 1.0


def test_prune_pi_in_place_on_a_plain_module():
    model = _lenet()
    Prune(0.1).pi(model)  # Condensa's protocol: compress in place
    assert math.isclose(density(model), round(0.1 * 430500) / 430500)
    assert type(model) is LeNet5


@pytest.mark.parametrize("dtype", [fxcondensa.float16, fxcondensa.bfloat16, "bf16", "half"])
def test_quantize_values_representable_and_stable(dtype):
    model = _lenet()
    w = compress(model, Quantize(dtype))
    target = Quantize(dtype).dtype
    changed = 0
    for name, p in w.named_parameters():
        assert p.dtype == torch.float32  # storage dtype only: computation stays float32
        assert torch.equal(p.to(target).to(torch.float32), p), name
        changed += int((p != model.get_parameter(name)).sum())
    assert changed > 0
    again = compress(w, Quantize(dtype))
    assert state_hash(again) == state_hash(w)


def test_quantize_annotates_storage_dtype():
    w = compress(_lenet(), Quantize(torch.bfloat16, exclude=["ip2"]))
    dtypes = storage_dtypes(w)
    assert dtypes["ip1.weight"] == dtypes["conv1.bias"] == torch.bfloat16
    assert dtypes["ip2.weight"] == dtypes["ip2.bias"] == torch.float32


def _block_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


@settings(max_examples=10, deadline=None)
@given(d=st.floats(0.05, 1.0), block=st.sampled_from([(1, 1), (2, 2), (2, 4), (4, 8), (8, 8)]))
def test_block_prune_zeros_whole_blocks_and_keeps_fraction(d, block):
    model = _block_model()
    w = compress(model, BlockPrune(d, block))
    r, c = block
    kept = total = 0
    for name in ["0.weight", "2.weight"]:
        orig, new = model.state_dict()[name], w.state_dict()[name]
        rows, cols = orig.shape
        tiles_new = new.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3)
        tiles_old = orig.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3)
        zero = (tiles_new == 0).flatten(2).all(-1)
        same = (tiles_new == tiles_old).flatten(2).all(-1)
        assert bool((zero | same).all()), f"{name}: a block is partly pruned"
        kept += int((~zero).sum())
        total += zero.numel()
    assert kept == F.keep_count(total, d)


def test_block_prune_ranks_by_criteria():
    model = _block_model()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:2, :2] = 10.0  # the one block that must survive
    w = compress(model, BlockPrune(1 / 64, 2, criteria="max"))
    assert torch.equal(w.state_dict()["0.weight"], model[0].weight)
    assert int(w.state_dict()["2.weight"].count_nonzero()) == 0


class Recorder:
    """A custom scheme with only Condensa's pi/delta; it logs calls and the density it sees."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def pi(self, module):
        self.log.append(("pi", self.name, round(density(module), 4)))

    def delta(self, module):
        self.log.append(("delta", self.name))


def test_compose_order_pi_forward_delta_reverse_and_sees_previous_result():
    log: list = []
    compress(_lenet(), Compose([Recorder("a", log), Prune(0.1), Recorder("b", log)]))
    assert log == [("pi", "a", 1.0), ("pi", "b", 0.1), ("delta", "b"), ("delta", "a")]


def test_compose_prune_then_quantize_equals_steps():
    model = _lenet()
    both = compress(model, Compose([Prune(0.05), Quantize(torch.float16)]))
    stepwise = compress(compress(model, Prune(0.05)), Quantize(torch.float16))
    assert state_hash(both) == state_hash(stepwise)


class ClipNegative:
    """A user's scheme: zero the negative weights of every Linear layer."""

    def pi(self, module):
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    m.weight.clamp_(min=0)

    def delta(self, module):
        pass


def test_custom_scheme_with_compress_and_compose():
    model = make_mlp((8, 16, 4))
    assert is_scheme(ClipNegative()) and not is_scheme(object())
    w = compress(model, ClipNegative())
    assert bool((w.state_dict()["net.0.weight"] >= 0).all())
    assert bool((model.net[0].weight < 0).any())  # the input model is untouched
    w2 = compress(model, Compose([ClipNegative(), Prune(0.2), Quantize(torch.float16)]))
    weight = w2.state_dict()["net.0.weight"]
    assert bool((weight >= 0).all())
    assert torch.equal(weight.half().float(), weight)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), True, "0.5", None])
def test_bad_density_refused_with_value_in_message(bad):
    for make in (lambda: Prune(bad), lambda: BlockPrune(bad, 2), lambda: Prune(0.5, layers={"ip1": bad})):
        with pytest.raises((ValueError, TypeError)) as info:
            make()
        assert str(bad) in str(info.value)


@pytest.mark.parametrize("bad", [0, -2, (2,), (2, 0), 2.0, True, "2"])
def test_bad_block_size_refused(bad):
    with pytest.raises(ValueError) as info:
        BlockPrune(0.5, bad)
    assert repr(bad) in str(info.value)


def test_block_size_not_dividing_names_layer_and_size():
    with pytest.raises(ValueError) as info:
        compress(MLP((8, 16, 4)), BlockPrune(0.5, (3, 3)))
    assert "(3, 3)" in str(info.value) and "net.0" in str(info.value)


@pytest.mark.parametrize("bad", [torch.int8, torch.float32, "float8", "int4", 16])
def test_unknown_quantize_dtype(bad):
    with pytest.raises(ValueError) as info:
        Quantize(bad)
    assert repr(bad) in str(info.value)


def test_bad_criteria():
    with pytest.raises(ValueError, match="'median'"):
        BlockPrune(0.5, 2, criteria="median")


def test_bad_compose():
    with pytest.raises(ValueError, match="empty"):
        Compose([])
    with pytest.raises(TypeError) as info:
        Compose([Prune(0.5), "Quantize"])
    assert "'Quantize'" in str(info.value) and "item 1" in str(info.value)
    with pytest.raises(TypeError, match="Prune"):
        Compose(Prune(0.5))


@pytest.mark.parametrize("scheme", [Prune(0.5, exclude=["fc*"]), Prune(0.5, layers={"nothing": 0.5}),
                                    Quantize(torch.float16, exclude="conv3"), BlockPrune(0.5, 2, exclude=["zz"])])
def test_layer_pattern_matching_nothing(scheme):
    model = _lenet()
    before = state_hash(model)
    with pytest.raises(ValueError) as info:
        compress(model, scheme)
    pattern = (scheme.exclude or list(scheme.layers))[0]
    assert repr(pattern) in str(info.value)
    assert "ip1" in str(info.value)  # and it lists the names it could have matched
    assert state_hash(model) == before


def test_bad_layers_argument():
    with pytest.raises(TypeError, match="list"):
        Prune(0.5, layers=["ip1"])


def test_scheme_repr_shows_arguments():
    assert repr(Prune(0.1, exclude=["ip2"])) == "Prune(density=0.1, layers={}, exclude=['ip2'])"
    assert "Quantize(dtype=torch.float16" in repr(Compose([Quantize()]))


@pytest.mark.parametrize("scheme", [
    Prune(0.1, layers={"conv*": 0.5}, exclude=["ip2"]),
    Quantize(torch.bfloat16, exclude="ip1"),
    Quantize(),
    BlockPrune(0.5, (2, 4), criteria="max"),
    StructurePrune(0.3, align=8, prune_bias=False),
    FilterPrune(target_flops=0.5, normalize=False),
    NeuronPrune(0.2, layers={"ip1": 0.7}),
    Compose([Prune(0.02), Quantize(torch.float16)]),
])
def test_repr_rebuilds_an_equal_scheme(scheme):
    # The repr is the L-C checkpoint's resume key and what a user pastes back into a script.
    import fxcondensa.schemes as namespace

    rebuilt = eval(repr(scheme), {"torch": torch, **vars(namespace)})
    assert rebuilt == scheme and repr(rebuilt) == repr(scheme)
    assert type(scheme)(**scheme.config()) == scheme


def test_schemes_with_different_arguments_are_not_equal():
    assert Prune(0.1) != Prune(0.2) and Quantize(torch.float16) != Quantize(torch.bfloat16)
    assert StructurePrune(0.5) != FilterPrune(0.5) and Prune(0.1) != "Prune(0.1)"

"""Gradual: Zhu & Gupta's cubic schedule over copies of the user's scheme at intermediate densities."""

from __future__ import annotations

import pytest
import torch
from test_lc import run, tiny_model

import fxcondensa as condensa
from fxcondensa.opt import Gradual
from fxcondensa.opt.gradual import scaled_scheme
from fxcondensa.schemes import Compose, FilterPrune, NeuronPrune, Prune, Quantize, StructurePrune

SMALL = dict(iterations=60, pruning_steps=4, evaluations=2, l_batch_size=64, lr=0.05, device="cpu", progress=False)


def test_cubic_schedule():
    g = Gradual(iterations=100, pruning_steps=4, prune_fraction=0.6, evaluations=2)
    assert [g.fraction(j) for j in range(g.steps)] == pytest.approx(
        [1.0, 1 - (3 / 4) ** 3, 1 - (2 / 4) ** 3, 1 - (1 / 4) ** 3, 1.0, 1.0, 1.0])
    assert [len(g.step_lrs(j)) for j in range(g.steps)] == [0, 0, 20, 20, 20, 20, 20] and g.budget == 100
    assert [g.in_target(j) for j in range(g.steps)] == [True, False, False, False, True, True, True]


@pytest.mark.parametrize("scheme, attr, expected", [
    (Prune(0.2), "density", 0.6),
    (StructurePrune(0.4), "density", 0.7),
    (FilterPrune(0.4), "density", 0.7),
    (NeuronPrune(0.4), "density", 0.7),
    (StructurePrune(target_flops=0.5), "target_flops", 0.75),
])
def test_scaled_scheme_is_a_copy_with_half_the_sparsity(scheme, attr, expected):
    before = repr(scheme)
    half = scaled_scheme(scheme, 0.5)
    assert type(half) is type(scheme) and getattr(half, attr) == pytest.approx(expected)
    assert repr(scheme) == before  # the user's scheme is not modified
    assert scaled_scheme(scheme, 1.0) is scheme


def test_scaled_compose_and_per_layer_densities():
    scheme = Compose([Prune(0.2, layers={"0": 0.6}), Quantize(condensa.float16)])
    half = scaled_scheme(scheme, 0.5)
    assert half.schemes[0].density == pytest.approx(0.6) and half.schemes[0].layers == {"0": pytest.approx(0.8)}
    assert half.schemes[1] is scheme.schemes[1] and scheme.schemes[0].density == 0.2
    assert scaled_scheme(Quantize(condensa.float16), 0.5) is None


def test_density_follows_the_schedule_and_ends_at_the_target():
    result, stats = run(Gradual(**SMALL), Prune(0.05))
    g = Gradual(**SMALL)
    dens = [h["density"] for h in stats["history"]]
    for j, d in enumerate(dens[1:], start=1):  # Prune keeps a global fraction of the weights (biases count)
        assert d == pytest.approx(1 - 0.95 * g.fraction(j), abs=0.02)
    assert stats["density"] == pytest.approx(0.05, abs=1e-3) == condensa.density(result)
    assert stats["best_iteration"] in (0, 4, 5, 6)  # only iterations at the target can be returned


def test_structured_gradual_prunes_whole_neurons_and_beats_direct():
    model = tiny_model()
    result, stats = run(Gradual(**SMALL), StructurePrune(0.25), model)
    _, direct = run(condensa.opt.Direct(), StructurePrune(0.25), model)
    w = result.get_parameter("0.weight")
    rows = (w != 0).any(dim=1)
    assert rows.sum() == 16 and not w[~rows].any()
    assert stats["val_accuracy_after"] >= direct["val_accuracy_after"]


def test_scheme_without_a_density_is_refused():
    with pytest.raises(ValueError, match="Gradual needs a scheme with a density.*Quantize"):
        run(Gradual(**SMALL), Quantize(condensa.float16))


@pytest.mark.parametrize("kw, match", [
    (dict(pruning_steps=0), "pruning_steps must be an int >= 1"),
    (dict(prune_fraction=1.0), "prune_fraction must be a finite number in"),
    (dict(iterations=4, evaluations=3), "leaves 2 minibatches for 3"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        Gradual(**kw)


def test_user_scheme_and_model_are_untouched():
    scheme, model = StructurePrune(0.5), tiny_model()
    before = ({k: v.clone() for k, v in model.state_dict().items()}, repr(scheme))
    run(Gradual(**SMALL), scheme, model)
    assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items()) and repr(scheme) == before[1]

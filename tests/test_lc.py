"""The L-C optimizer: argument validation, the schedule, and that it beats direct compression."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxcondensa as condensa
from fxcondensa.opt import LC, Direct
from fxcondensa.opt import lc as lc_module
from fxcondensa.opt.training import as_batches, evaluate
from fxcondensa.schemes import Compose, Prune, Quantize

ARGS = dict(steps=4, l_batch_size=64, lr=0.05, lr_decay=0.98, momentum=0.9, sgd_iterations_per_l=40,
            sgd_iterations_first_l=80, mu_init=1e-2, mu_multiplier=2.0, mu_cap=1e4, val_batch_size=512)


def tiny_problem(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test): 16-d Gaussian inputs labelled by a random linear teacher over 4 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    return TensorDataset(x[:1536], y[:1536]), TensorDataset(x[1536:1792], y[1536:1792]), TensorDataset(x[1792:], y[1792:])


def tiny_model(seed: int = 0, batchnorm: bool = False, steps: int = 300) -> nn.Module:
    """A small MLP trained on ``tiny_problem``'s training set (a fresh copy each call)."""
    return copy.deepcopy(_trained(seed, batchnorm, steps))


@functools.cache
def _trained(seed: int, batchnorm: bool, steps: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(16, 64)] + ([nn.BatchNorm1d(64)] if batchnorm else []) + [nn.ReLU(), nn.Linear(64, 4)]
    model = nn.Sequential(*layers)
    x, y = tiny_problem(seed)[0].tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(opt, scheme, model=None, **kw):
    train, val, test = tiny_problem()
    c = condensa.Compressor(opt, scheme, model if model is not None else tiny_model(**kw), train, test, val,
                            nn.CrossEntropyLoss())
    return c.run(), c.statistics


@pytest.mark.parametrize("name, value", [
    ("steps", 0), ("steps", 2.5), ("steps", True), ("l_batch_size", 0), ("lr", 0.0), ("lr", -1.0),
    ("lr", math.nan), ("lr_decay", 0.0), ("lr_decay", 1.5), ("momentum", 1.0), ("momentum", -0.1),
    ("sgd_iterations_per_l", 0), ("sgd_iterations_first_l", -3), ("mu_init", 0.0), ("mu_multiplier", 0.9),
    ("mu_cap", 1e-9), ("val_batch_size", 0), ("lr_end", 0.0), ("weight_decay", -1e-4), ("seed", -1),
    ("bn_batches", -1), ("device", "not-a-device"), ("checkpoint", 3), ("progress", "yes"),
])
def test_invalid_arguments_are_named(name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        LC(**{**ARGS, name: value})


def test_tutorial_arguments_are_accepted_and_recorded():
    lc = LC(steps=2, l_batch_size=512, lr=0.02, lr_decay=0.98, momentum=0.95, sgd_iterations_per_l=2000,
            sgd_iterations_first_l=10000, mu_init=9.765625e-05, mu_multiplier=1.1, mu_cap=10000, val_batch_size=100)
    assert lc.config["sgd_iterations_first_l"] == 10000 and lc.config["device"] in ("cpu", "cuda")
    assert lc.mu_at(0) == 0.0 and lc.mu_at(1) == 9.765625e-05
    assert lc.mu_at(3) == pytest.approx(9.765625e-05 * 1.1**2)
    assert LC(**{**ARGS, "mu_cap": 0.03}).mu_at(10) == 0.03
    assert lc.lr_at(2) == pytest.approx(0.02 * 0.98**2)


def test_lc_beats_direct_and_keeps_the_density():
    model = tiny_model()
    direct, dstats = run(Direct(), Prune(0.05), model)
    result, stats = run(LC(**ARGS, device="cpu", progress=False), Prune(0.05), model)
    assert stats["val_accuracy_after"] > dstats["val_accuracy_after"] + 3
    assert stats["density"] == pytest.approx(0.05, abs=1e-3) == condensa.density(result)
    # Iteration 0 is direct compression.
    h0 = stats["history"][0]
    assert h0["l_loss"] is None and h0["mu"] == 0.0
    assert h0["val_accuracy"] == dstats["val_accuracy_after"]


def test_history_and_best_are_consistent():
    result, stats = run(LC(**ARGS, device="cpu", progress=False), Prune(0.05))
    history = stats["history"]
    assert [h["iteration"] for h in history] == list(range(ARGS["steps"]))
    for h in history:
        assert {"mu", "lr", "l_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "density",
                "elapsed"} <= set(h)
    assert [h["mu"] for h in history] == [0.0, 1e-2, 2e-2, 4e-2]
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert stats["best_iteration"] == best["iteration"]
    assert stats["val_accuracy_after"] == best["val_accuracy"]
    # The returned model is exactly the one evaluated at the best iteration.
    _, val, test = tiny_problem()
    loss, acc = evaluate(result, as_batches(test, 512), nn.CrossEntropyLoss())
    assert (loss, acc) == (pytest.approx(best["test_loss"], rel=1e-6), best["test_accuracy"])


def test_compose_with_quantize_and_annotations_of_the_result():
    scheme = Compose([Prune(0.1), Quantize(condensa.float16)])
    result, stats = run(LC(**{**ARGS, "steps": 2}, device="cpu", progress=False), scheme)
    anns = condensa.passes.annotate.annotations(result)
    assert {"0.weight", "2.weight"} <= set(anns)
    for name, ann in anns.items():
        p = result.get_parameter(name)
        assert torch.equal(p, p.half().float())  # representable in float16
        if ann.mask is not None:
            assert not p[~ann.mask].any()  # the masks describe the returned values
    assert stats["footprint_values_ratio"] > 10


def test_batchnorm_is_recalibrated_and_user_rng_untouched():
    model = tiny_model(batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result, _ = run(LC(**{**ARGS, "steps": 2}, device="cpu", progress=False), Prune(0.1), model)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bn = result.get_submodule("1")
    assert not torch.equal(bn.running_mean, model[1].running_mean)
    # Recomputed from training batches through the compressed first layer: close to the real batch mean.
    x = tiny_problem()[0].tensors[0]
    h = result.get_submodule("0")(x)
    assert torch.allclose(bn.running_mean, h.mean(0), atol=0.05)


def test_same_seed_same_result_other_seed_differs():
    model = tiny_model()
    small = {**ARGS, "steps": 2, "sgd_iterations_first_l": 20}
    a, _ = run(LC(**small, device="cpu", progress=False), Prune(0.1), model)
    b, _ = run(LC(**small, device="cpu", progress=False), Prune(0.1), model)
    c, _ = run(LC(**small, device="cpu", progress=False, seed=1), Prune(0.1), model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_lr_end_weight_decay_and_no_validation_set():
    train, _, test = tiny_problem()
    lc = LC(**{**ARGS, "steps": 2}, lr_end=0.001, weight_decay=1e-4, device="cpu", progress=False)
    c = condensa.Compressor(lc, Prune(0.2), tiny_model(), train, test, None, nn.CrossEntropyLoss())
    c.run()
    assert "val_accuracy_after" not in c.statistics and c.statistics["test_accuracy_after"] > 50


def test_progress_is_one_line_per_l_step_when_not_a_terminal(caplog, capsys):
    with caplog.at_level("INFO", logger="fxcondensa"):
        run(LC(**{**ARGS, "steps": 2, "sgd_iterations_first_l": 5}, device="cpu"), Prune(0.5))
    text = caplog.text
    assert "LC Iteration 1" in text and "Nested (theta) VAL" in text and "Saving model based on VAL" in text
    assert "L-step 1: 5 minibatches, mean loss" in text  # on by default at INFO
    assert "\r" not in capsys.readouterr().err  # no tqdm carriage returns in a log file


def test_progress_bar_on_a_terminal(caplog, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with caplog.at_level("INFO", logger="fxcondensa"):
        run(LC(**{**ARGS, "steps": 2, "sgd_iterations_first_l": 5}, device="cpu"), Prune(0.5))
    assert "L-step 1" in capsys.readouterr().err and "L-step 1: 5 minibatches" not in caplog.text


def test_defaults_choose_the_schedule_from_the_budget():
    lc = LC(steps=6, sgd_iterations_first_l=100, sgd_iterations_per_l=20, l_batch_size=64)
    # lr 0.05, not 0.02: the final fine-tune's cosine from 0.02 left LeNet-5 (MEM, 330 iterations) 1.5 points
    # under plain masked SGD at a constant 0.02.
    assert lc.lr == 0.05 and lc.momentum == 0.9 and lc.lr_decay == 1.0
    assert lc.automatic and lc.finetune_steps == 2 and lc.l_start == "projection" and lc.budget == 180
    pulls = [lc.pull(j) for j in range(1, lc.lc_steps + 1)]
    assert pulls[0] == pytest.approx(lc_module.PULL_FIRST) and pulls[-1] == pytest.approx(lc_module.PULL_LAST)
    mus = [lc.mu_at(j) for j in range(1, lc.lc_steps + 1)]
    assert all(b > a for a, b in zip(mus, mus[1:], strict=False))  # geometric growth of mu
    assert lc.mu_at(5) == 0.0 and lc.masked(4) and lc.masked(5) and not lc.masked(3)  # the last two fine-tune
    assert [len(lc.step_lrs(j)) for j in range(6)] == [0, 66, 12, 12, 45, 45]  # half the budget fine-tunes
    tail = lc.step_lrs(4) + lc.step_lrs(5)
    assert len(tail) == 90 and tail[0] == pytest.approx(lc.lr) and tail[-1] < 0.01 * lc.lr
    assert lc.config["mu_init"] == lc.mu_init and "finetune_steps" in lc.config


def test_every_argument_has_a_default_and_a_reaching_schedule():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the automatic schedule never warns
        lc = LC()
    assert sum(lc.pull(j) for j in range(1, lc.lc_steps + 1)) >= lc_module.PULL_ENOUGH


def test_explicit_schedule_that_cannot_reach_the_set_warns_with_the_fix():
    tutorial = dict(steps=2, l_batch_size=512, lr=0.02, lr_decay=0.98, momentum=0.95, sgd_iterations_per_l=2000,
                    sgd_iterations_first_l=10000, mu_init=9.765625e-05, mu_multiplier=1.1, mu_cap=10000,
                    val_batch_size=100)
    with pytest.warns(UserWarning, match=r"removes only about 0.38 e-folds.*Multiply mu_init by about 7.84"):
        lc = LC(**tutorial)
    assert lc.finetune_steps == 0 and lc.l_start == "w"  # explicit schedules run as Condensa's
    fixed = {**tutorial, "mu_init": 9.765625e-05 * 7.84}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LC(**fixed)


@pytest.mark.parametrize("kw, match", [
    (dict(mu_init=1e-3), "give all of mu_init, mu_multiplier and mu_cap, or none"),
    (dict(l_start="theta"), "l_start must be 'w'"),
    (dict(steps=3, finetune_steps=2), "finetune_steps=2 leaves no L-C iteration"),
])
def test_inconsistent_defaults_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        LC(**kw)


def test_lc_with_defaults_beats_direct_on_the_tiny_problem():
    model = tiny_model()
    _, d = run(Direct(), Prune(0.05), model)
    _, s = run(LC(steps=4, sgd_iterations_first_l=60, sgd_iterations_per_l=30, l_batch_size=64, device="cpu",
                  progress=False), Prune(0.05), model)
    assert s["val_accuracy_after"] > d["val_accuracy_after"] + 3 and s["density"] == pytest.approx(0.05, abs=1e-3)

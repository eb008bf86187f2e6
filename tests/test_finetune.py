"""FineTune: direct compression, then masked fine-tuning; the masks and storage dtypes of the scheme hold,
BatchNorm is recalibrated, and it is first-class (statistics, checkpoint/resume) like LC."""

from __future__ import annotations

import pytest
import torch
from _models import Crash
from _models import crashing_criterion as _crashing
from test_lc import run, tiny_model, tiny_problem
from torch import nn

import fxcondensa as condensa
from fxcondensa.opt import Direct, FineTune
from fxcondensa.passes.annotate import annotations
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

SMALL = dict(iterations=60, evaluations=3, l_batch_size=64, lr=0.05, device="cpu", progress=False)


def test_plan_splits_the_budget_and_decays_on_one_cosine():
    ft = FineTune(iterations=10, evaluations=3, lr=0.1)
    lrs = [ft.step_lrs(j) for j in range(ft.steps)]
    assert [len(x) for x in lrs] == [0, 4, 3, 3] and ft.budget == 10
    flat = [lr for x in lrs for lr in x]
    assert flat[0] == pytest.approx(0.1) and all(a > b for a, b in zip(flat, flat[1:], strict=False))
    assert flat[5] == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 10)).item()))


def test_warmup_rises_linearly_then_decays_on_one_cosine():
    ft = FineTune(iterations=10, evaluations=2, lr=0.1, warmup=0.2)
    flat = [lr for j in range(ft.steps) for lr in ft.step_lrs(j)]
    assert ft.warmup_iterations == 2 and len(flat) == 10
    assert flat[:3] == pytest.approx([0.05, 0.1, 0.1])  # lr / 2, lr, then the cosine from its peak
    assert flat[3:] == pytest.approx([0.05 * (1 + torch.cos(torch.tensor(torch.pi * i / 8)).item()) for i in range(1, 8)])
    assert FineTune(iterations=10).warmup == 0.0 and FineTune(iterations=10).step_lrs(1)[0] == pytest.approx(0.05)
    assert FineTune(iterations=1000, warmup=1e-6).warmup_iterations == 1  # a warm-up asked for is never empty


def test_masks_and_dtypes_are_those_of_direct_compression():
    scheme = Compose([Prune(0.1), Quantize(condensa.float16)])
    model = tiny_model()
    direct, _ = run(Direct(), scheme, model)
    tuned, stats = run(FineTune(**SMALL), scheme, model)
    for name, _ann in annotations(direct).items():
        a, b = direct.get_parameter(name), tuned.get_parameter(name)
        assert torch.equal(a == 0, b == 0), name  # the same zeros (the scheme's mask held)
        assert torch.equal(b, b.half().float())  # representable in the storage dtype
    assert stats["density"] == pytest.approx(0.1, abs=1e-3)
    assert not torch.equal(direct.get_parameter("0.weight"), tuned.get_parameter("0.weight"))


def test_fine_tuning_recovers_what_direct_compression_loses():
    model = tiny_model()
    _, d = run(Direct(), Prune(0.05), model)
    _, f = run(FineTune(**SMALL), Prune(0.05), model)
    assert f["val_accuracy_after"] > d["val_accuracy_after"] + 3
    assert [h["iteration"] for h in f["history"]] == [0, 1, 2, 3] and f["budget"] == 60
    assert f["history"][0]["val_accuracy"] == d["val_accuracy_after"]  # iteration 0 is direct compression


def test_structured_scheme_keeps_whole_channels_and_batchnorm_is_recalibrated():
    model = tiny_model(batchnorm=True)
    result, stats = run(FineTune(**SMALL), StructurePrune(0.5), model)
    w = result.get_parameter("0.weight")
    rows = (w != 0).any(dim=1)
    assert rows.sum() == 32 and not w[~rows].any()  # half the neurons, whole rows
    bn = result.get_submodule("1")
    x = tiny_problem()[0].tensors[0]
    h = result.get_submodule("0")(x)
    assert torch.allclose(bn.running_mean, h.mean(0), atol=0.05)  # statistics of the compressed layer


@pytest.mark.parametrize("make", [lambda ckpt: FineTune(**SMALL, checkpoint=ckpt),
                                  lambda ckpt: condensa.opt.Gradual(iterations=40, pruning_steps=3, evaluations=2,
                                                                    l_batch_size=64, device="cpu", progress=False,
                                                                    checkpoint=ckpt)],
                         ids=["FineTune", "Gradual"])
def test_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, make):
    train, val, test = tiny_problem()
    model = tiny_model(batchnorm=True)
    full = condensa.Compressor(make(None), Prune(0.1), model, train, test, val, nn.CrossEntropyLoss())
    expected = full.run()
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):  # calls: 2 baseline evaluations, 2 per evaluation, then the SGD steps
        condensa.Compressor(make(ckpt), Prune(0.1), model, train, test, val, _crashing(30)).run()
    assert torch.load(ckpt, weights_only=True)["next_iteration"] >= 1
    resumed = condensa.Compressor(make(ckpt), Prune(0.1), model, train, test, val, nn.CrossEntropyLoss())
    result = resumed.run()
    for (k, a), b in zip(expected.state_dict().items(), result.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in e.items() if k != "elapsed"} for e in h]  # noqa: E731
    assert strip(full.statistics["history"]) == strip(resumed.statistics["history"])


def test_a_checkpoint_written_before_warmup_existed_resumes_and_another_warmup_is_refused(tmp_path):
    """The bug: ``warmup`` joined the recorded configuration, so a checkpoint without it was refused as
    another run's."""
    train, val, test = tiny_problem()
    model = tiny_model(batchnorm=True)
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):
        condensa.Compressor(FineTune(**SMALL, checkpoint=ckpt), Prune(0.1), model, train, test, val,
                            _crashing(30)).run()
    state = torch.load(ckpt, weights_only=True)
    del state["key"]["warmup"]  # as an older version wrote it
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"warmup: checkpoint has 0.0, this run has 0.5"):
        condensa.Compressor(FineTune(**SMALL, warmup=0.5, checkpoint=ckpt), Prune(0.1), model, train, test, val,
                            nn.CrossEntropyLoss()).run()
    condensa.Compressor(FineTune(**SMALL, checkpoint=ckpt), Prune(0.1), model, train, test, val,
                        nn.CrossEntropyLoss()).run()


@pytest.mark.parametrize("kw, match", [
    (dict(iterations=0), "iterations must be an int >= 1, got 0"),
    (dict(evaluations=0), "evaluations must be an int >= 1"),
    (dict(iterations=3, evaluations=4), "evaluations=4 exceeds iterations=3"),
    (dict(lr=-1.0), "lr must be"),
    (dict(warmup=1.0), r"FineTune: warmup must be a finite number in \[0.0, 1.0\), got 1.0"),
    (dict(warmup=-0.1), "warmup must be a finite number"),
    (dict(autocast="float16"), "autocast must be None or 'bfloat16'"),
    (dict(tf32=1), "tf32 must be True or False"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FineTune(**kw)


def test_config_and_repr_record_every_argument():
    ft = FineTune(iterations=12, evaluations=2, device="cpu")
    assert ft.config["iterations"] == 12 and ft.config["autocast"] is None and ft.config["device"] == "cpu"
    assert repr(ft).startswith("FineTune(iterations=12, evaluations=2,")

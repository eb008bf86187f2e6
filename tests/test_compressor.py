"""Compressor: Condensa's call shape, statistics that agree with the library's own measures, and the input
model never touched."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_lc import ARGS, tiny_model, tiny_problem
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fxcondensa as condensa
from fxcondensa.opt.training import as_batches, evaluate
from fxcondensa.schemes import Compose, Prune, Quantize

CE = nn.CrossEntropyLoss()
MEM = Compose([Prune(0.05), Quantize(condensa.float16)])


def digest(model: nn.Module) -> str:
    """Hash of every parameter and buffer of ``model``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lc(**kw):
    return condensa.opt.LC(**{**ARGS, "steps": 2, **kw}, device="cpu", progress=False)


@pytest.mark.parametrize("make_opt", [condensa.opt.Direct, lc], ids=["Direct", "LC"])
def test_statistics_are_complete_and_consistent(make_opt):
    model = tiny_model(batchnorm=True)
    train, val, test = tiny_problem()
    fingerprint, training = digest(model), model.training
    compressor = condensa.Compressor(make_opt(), MEM, model, train, test, val, CE)
    assert compressor.statistics is None
    w = compressor.run()
    stats = compressor.statistics
    assert digest(model) == fingerprint and model.training == training  # the input model is untouched
    assert type(w) is type(model) and w is not model  # a compressed copy of the user's class
    for when in ("before", "after"):
        for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            assert isinstance(stats[f"{key}_{when}"], float)
        for kind in ("values", "stored"):
            assert stats[f"footprint_{kind}_{when}"] > 0
    assert stats["scheme"] == repr(MEM) and stats["elapsed_seconds"] > 0
    assert stats["optimizer_config"] == compressor.opt.config
    assert stats["density"] == condensa.density(w)
    assert stats["layer_densities"] == condensa.layer_densities(w)
    assert stats["footprint_values_before"] == condensa.footprint(model, "values")
    assert stats["footprint_values_after"] == condensa.footprint(w, "values")
    assert stats["footprint_stored_after"] == condensa.footprint(w, "stored")
    for kind in ("values", "stored"):
        ratio = stats[f"footprint_{kind}_before"] / stats[f"footprint_{kind}_after"]
        assert stats[f"footprint_{kind}_ratio"] == pytest.approx(ratio)
    assert stats["footprint_values_ratio"] > 5  # 5% of the weights kept, in half the bytes
    # Accuracies agree with a fresh evaluation of the returned and of the input model.
    batches = as_batches(test, 512)
    assert evaluate(w, batches, CE) == (pytest.approx(stats["test_loss_after"], rel=1e-6), stats["test_accuracy_after"])
    assert evaluate(model, batches, CE) == (pytest.approx(stats["test_loss_before"], rel=1e-6),
                                            stats["test_accuracy_before"])
    assert stats["test_accuracy_before"] > 85


class ItemDataset(Dataset):
    """A plain map-style dataset (not held as tensors): the DataLoader path."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_dataloaders_and_plain_datasets_give_the_same_numbers():
    model = tiny_model()
    train, val, test = tiny_problem()
    a = condensa.Compressor(condensa.opt.Direct(), Prune(0.1), model, train, test, val, CE)
    a.run()
    b = condensa.Compressor(condensa.opt.Direct(), Prune(0.1), model, DataLoader(train, batch_size=100),
                            DataLoader(test, batch_size=100), ItemDataset(val), CE)
    b.run()
    for key in ("val_accuracy_before", "val_accuracy_after", "test_accuracy_before", "test_accuracy_after"):
        assert a.statistics[key] == b.statistics[key]
    # L-C through DataLoaders trains too.
    c = condensa.Compressor(lc(), Prune(0.1), model, DataLoader(train, batch_size=64, shuffle=True),
                            ItemDataset(test), None, CE)
    c.run()
    assert c.statistics["test_accuracy_after"] >= a.statistics["test_accuracy_after"] - 5


@pytest.mark.parametrize("args, match", [
    (dict(opt="lc"), "opt must be an optimizer"),
    (dict(scheme=0.5), "scheme must be"),
    (dict(model="model"), "model must be a torch.nn.Module"),
    (dict(trainset=None), "trainset is required"),
    (dict(criterion="ce"), "criterion must be"),
])
def test_bad_arguments_are_named(args, match):
    train, val, test = tiny_problem()
    kw = dict(opt=condensa.opt.Direct(), scheme=Prune(0.1), model=tiny_model(), trainset=train, testset=test,
              valset=val, criterion=CE)
    with pytest.raises((TypeError, ValueError), match=match):
        condensa.Compressor(**{**kw, **args})


def test_bad_dataset_type_is_named():
    c = condensa.Compressor(condensa.opt.Direct(), Prune(0.1), tiny_model(), [1, 2, 3], None, None, CE)
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        c.run()


def test_statistics_are_a_typed_record_read_as_condensas_dict():
    train, val, test = tiny_problem()
    c = condensa.Compressor(lc(), MEM, tiny_model(), train, test, val, CE)
    c.run()
    s = c.statistics
    assert isinstance(s, condensa.opt.compressor.Statistics)
    assert s.density == s["density"] and s.footprint_values_ratio == s["footprint_values_ratio"]
    assert s["history"] is s.history and s["best_iteration"] == s.best_iteration
    assert s["elapsed_lc"] == s.optimizer_stats["elapsed_lc"] and s["budget"] == c.opt.budget
    lines = [f"{k}: {v}" for k, v in s.items()]  # the tutorial's loop
    assert lines[0] == "optimizer: LC" and any(x.startswith("footprint_values_ratio: ") for x in lines)
    assert "optimizer_stats" not in s and list(s) == list(s.to_dict()) and len(s) == len(lines)
    with pytest.raises(KeyError):
        s["no_such_statistic"]


def test_statistics_without_val_or_history_leave_those_keys_out():
    train, _, test = tiny_problem()
    c = condensa.Compressor(condensa.opt.Direct(), MEM, tiny_model(), train, test, None, CE)
    c.run()
    s = c.statistics
    assert "val_accuracy_after" not in s and s.val_accuracy_after is None and "history" not in s
    assert "test_accuracy_after" in s and s["footprint_stored_ratio"] == s.footprint_stored_ratio

"""Whole-module pickling (torch.save / torch.load, pickle) round-trips every GraphModule fxcondensa returns.

torch pickles a GraphModule as its generated code and rebuilds the graph by tracing that code again, which
drops the records and cannot retrace a torch.export capture (ATen operators, pytree inputs); fxcondensa's
GraphModules pickle their graph node by node instead (issues 10 and 11).
Whole-module files hold code: loading them needs ``weights_only=False``, the user's choice; fxcondensa's own
loaders stay ``weights_only``.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torchvision
from _models import bench_coverage
from torch import nn

import fxcondensa
from fxcondensa.models import LeNet5
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

X = torch.randn(2, 1, 28, 28)


def _returned(kind: str, tmp_path) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = LeNet5().eval()
    if kind == "trace":
        return fxcondensa.trace(model, X), X
    if kind == "compress":
        return fxcondensa.compress(model, Compose([Prune(0.1), Quantize(fxcondensa.float16)]), X, output="graph"), X
    if kind == "thin":
        return fxcondensa.thin(model, StructurePrune(0.5), X, output="graph"), X
    if kind == "load_thinned":
        fxcondensa.save_thinned(fxcondensa.thin(model, StructurePrune(0.5), X, output="graph"), tmp_path / "m.thin")
        return fxcondensa.load_thinned(tmp_path / "m.thin", LeNet5), X
    if kind == "thin resnet18":  # residual adds, BatchNorm buffers, rewritten sizes
        x = torch.randn(1, 3, 32, 32)
        return fxcondensa.thin(torchvision.models.resnet18().eval(), StructurePrune(0.5), x, output="graph"), x
    if kind == "trace with leaf_modules":
        return fxcondensa.trace(model, X, leaf_modules=[nn.Linear]), X
    raise AssertionError(kind)


KINDS = ["trace", "compress", "thin", "load_thinned", "thin resnet18", "trace with leaf_modules"]


@pytest.mark.parametrize("kind", KINDS)
def test_torch_save_and_load_round_trip(kind, tmp_path):
    gm, x = _returned(kind, tmp_path)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)  # a whole module is code: the user's explicit choice
    assert isinstance(again, torch.fx.GraphModule) and again.code == gm.code
    assert again.state_dict().keys() == gm.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), gm.state_dict().values(), strict=True))
    assert [m.training for m in again.modules()] == [m.training for m in gm.modules()]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), gm.eval()(x))


@pytest.mark.parametrize("kind", ["trace", "thin"])
def test_pickle_round_trip(kind, tmp_path):
    gm, x = _returned(kind, tmp_path)
    again = pickle.loads(pickle.dumps(gm))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), gm.eval()(x))


def test_a_reloaded_module_can_be_traced_and_thinned_again(tmp_path):
    gm, x = _returned("thin", tmp_path)
    again = pickle.loads(pickle.dumps(gm))
    smaller = fxcondensa.thin(again, StructurePrune(0.5), x)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in gm.parameters())


def test_the_thin_record_pickles(tmp_path):
    """What ``thin`` leaves in ``gm.meta`` pickles on its own (torch drops ``meta`` when it rebuilds a
    GraphModule, so it is checked here directly)."""
    from fxcondensa.files.recipe import thinning_record

    gm, _ = _returned("thin", tmp_path)
    rec = thinning_record(gm)
    again = pickle.loads(pickle.dumps(rec))
    assert (again.groups, again.frozen, again.input_shapes) == (rec.groups, rec.frozen, rec.input_shapes)
    assert torch.equal(again.keep, rec.keep)


def test_records_survive_whole_module_pickling(tmp_path):
    """torch rebuilds a GraphModule from its code and drops ``meta``; the records come back by node name."""
    from fxcondensa.capture.records import thin_record
    from fxcondensa.passes.annotate import annotations

    compressed, x = _returned("compress", tmp_path)
    again = pickle.loads(pickle.dumps(compressed))
    assert annotations(again).keys() == annotations(compressed).keys()
    assert fxcondensa.footprint(again, "stored") == fxcondensa.footprint(compressed, "stored")
    thinned, _ = _returned("thin resnet18", tmp_path)
    buf = io.BytesIO()
    torch.save(pickle.loads(pickle.dumps(thinned)), buf)  # twice: a reloaded module pickles its records too
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(thin_record(again).keep, thin_record(thinned).keep)
    assert thin_record(again).groups == thin_record(thinned).groups
    fxcondensa.save_thinned(again, tmp_path / "again.fxt")  # the recipe is there to write
    assert (tmp_path / "again.fxt").exists()


def test_an_export_captured_thinned_model_round_trips_whole():
    """A Hugging Face model is captured by torch.export: its thinned GraphModule (ATen operators, keyword
    inputs, a ModelOutput result) pickles whole and comes back with the same graph, outputs and recipe.
    torch's own pickling failed here (``_ModuleStackTracer.__init__() missing ... 'scope_root'``)."""
    from fxcondensa.capture.records import thin_record

    torch.manual_seed(0)
    model, x, fresh, _ = bench_coverage().build_hf("bert")
    thinned = fxcondensa.thin(model, StructurePrune(0.5), x, output="graph")
    assert thin_record(thinned).capture == "export"
    buf = io.BytesIO()
    torch.save(thinned, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.code == thinned.code and type(again).__name__ == type(thinned).__name__
    assert thin_record(again).capture == "export" and torch.equal(thin_record(again).keep, thin_record(thinned).keep)
    with torch.no_grad():
        got, want = again(**fresh), thinned(**fresh)
    assert type(got) is type(want) and torch.equal(got.logits, want.logits)
    twice = pickle.loads(pickle.dumps(again))  # a reloaded module pickles the same way
    with torch.no_grad():
        assert torch.equal(twice(**fresh).logits, want.logits)

"""Graphs captured by torch.export take any batch size and sequence length: a language model thinned on one
1x8 example runs at other shapes and equals the compressed model there. What the capture fixed or assumed
is named in the record (``input_constraints``) and checked on every call (``InputShapeError``)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from _models import bench_coverage
from torch import nn

import fxcondensa
from fxcondensa.capture import exported
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.records import graph_record, thin_record
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
SCHEME = StructurePrune(0.5)
SHAPES = [(2, 12), (3, 5), (1, 2), (4, 20)]


def tokens(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -1] = 0
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module", params=["gpt2-lm", "llama"])
def thinned_lm(request):
    torch.manual_seed(0)
    model, x, _, _ = bench_coverage().build_hf(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key-value cache turned off for the capture
        # The graph: what is tested here is how the capture generalises (the user's class takes any shape).
        return fxcondensa.thin(model, SCHEME, x, output="graph"), fxcondensa.compress(model, SCHEME, x)


def test_a_thinned_lm_equals_the_compressed_one_at_other_batch_sizes_and_lengths(thinned_lm):
    thinned, compressed = thinned_lm
    assert thin_record(thinned).capture == "export"
    for batch, length in SHAPES:
        x = tokens(batch, length, seed=batch * 100 + length)
        with torch.no_grad():
            got, ref = dict(thinned(**x)), dict(compressed(**x))
        assert got["logits"].shape == (batch, length, 128)
        for a, b in zip(flatten_outputs(got), flatten_outputs(ref), strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_what_the_capture_assumed_is_named_and_checked(thinned_lm):
    """Both models' code takes another branch for one token: the capture holds the branch for longer inputs,
    so one token is refused with the condition, not run through the wrong branch."""
    thinned, _ = thinned_lm
    assert "input_ids.shape[1] > 1" in thin_record(thinned).input_constraints
    with pytest.raises(fxcondensa.InputShapeError, match=r"inputs \(2x1, 2x1\) do not satisfy input_ids.shape\[1\] > 1"):
        thinned(**tokens(2, 1))


class _Rows(nn.Module):
    """A model torch.fx cannot trace (it branches on the input's rank), whose feature dim is fixed by its
    weights."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h if x.dim() == 2 else -h)


def test_a_dim_that_cannot_vary_is_named_and_refused():
    torch.manual_seed(0)
    small = fxcondensa.thin(_Rows(), SCHEME, torch.randn(1, 6), output="graph")
    assert thin_record(small).capture == "export"
    assert thin_record(small).input_constraints == ["x.shape[1] == 6"]
    assert small(torch.randn(5, 6)).shape == (5, 3)  # captured on one row, runs on five
    with pytest.raises(fxcondensa.InputShapeError, match=r"inputs \(5x7\) do not satisfy x.shape\[1\] == 6"):
        small(torch.randn(5, 7))
    again = pickle.loads(pickle.dumps(small))  # the check travels with the graph
    with pytest.raises(fxcondensa.InputShapeError, match="x.shape"):
        again(torch.randn(5, 7))


def test_a_failed_dynamic_capture_falls_back_to_the_example_shapes(monkeypatch):
    real = exported._export

    def static_only(model, args, kwargs, dynamic):
        if dynamic is not None:
            raise RuntimeError("no dynamic dims here")
        return real(model, args, kwargs, dynamic)

    monkeypatch.setattr(exported, "_export", static_only)
    gm = fxcondensa.trace(_Rows(), torch.randn(2, 6), capture="export")
    record = graph_record(gm)
    assert any("example's shapes only" in n and "no dynamic dims here" in n for n in record.notes)
    assert record.input_constraints == ["x.shape[0] == 2", "x.shape[1] == 6"]
    with pytest.raises(fxcondensa.InputShapeError, match=r"x.shape\[0\] == 2"):
        gm(torch.randn(3, 6))


def test_unreadable_guards_are_said_in_the_record(monkeypatch):
    def broken(ep, gm):
        raise AttributeError("no _guards_code")

    monkeypatch.setattr(exported, "export_guards", broken)
    gm = fxcondensa.trace(_Rows(), torch.randn(2, 6), capture="export")
    assert graph_record(gm).input_constraints == [
        "unknown: torch.export's guards could not be read (AttributeError: no _guards_code); the model checks "
        "no input shapes"]
    assert gm(torch.randn(3, 6)).shape == (3, 3)


class _RankBranch(nn.Module):
    """torch.fx cannot trace it (it branches on the input's rank), and a literal channel count (64) in its
    forward keeps the user's class from computing the same: ``thin`` returns the graph, captured by torch.export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        y = self.conv(x if x.dim() == 4 else x.unsqueeze(0)).relu()
        return self.head(y.view(y.shape[0], 64, -1).mean(-1))


def test_the_users_class_is_captured_with_the_example_shapes_only():
    """Its forward takes any shape: no capture with dynamic dims is paid for."""
    torch.manual_seed(0)
    model, x, _, _ = bench_coverage().build_hf("llama")
    before = exported.dynamic_capture_count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcondensa.thin(model, SCHEME, x)
    record = thin_record(small)
    assert record.returns == "module" and record.capture == "export" and record.input_constraints == []
    assert exported.dynamic_capture_count() == before
    with torch.no_grad():
        assert small(**tokens(3, 5)).logits.shape == (3, 5, 128)


def test_a_graph_that_comes_back_instead_of_the_users_class_takes_any_batch():
    torch.manual_seed(0)
    model, x = _RankBranch(), torch.randn(2, 3, 8, 8)
    before = exported.dynamic_capture_count()
    small = fxcondensa.thin(model, SCHEME, x)  # output="auto": the literal 64 sends the graph back
    record = thin_record(small)
    assert isinstance(small, torch.fx.GraphModule) and record.returns == "graph" and "64" in record.reason
    assert exported.dynamic_capture_count() == before + 1 and small.conv.weight.shape[0] < 64
    assert record.input_constraints == ["x.shape[1] == 3", "x.shape[2] == 8", "x.shape[3] == 8"]
    reference = fxcondensa.thin(model, SCHEME, x, output="graph")
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x5), reference(x5), rtol=RTOL, atol=ATOL)
        dense = fxcondensa.compress(model, SCHEME, x)
        torch.testing.assert_close(small(x5), dense(x5), rtol=RTOL, atol=ATOL)

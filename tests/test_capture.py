"""The torch.export capture frontend: ``trace(..., capture=...)``, keyword example inputs, structured outputs,
the fallback from symbolic tracing, and the one error when neither frontend can capture a model."""

from __future__ import annotations

import pytest
import torch
from _models import state_hash
from test_channels import randomize
from torch import nn

from fxcondensa import thin, trace
from fxcondensa.capture.exported import capture_of, graph_inputs
from fxcondensa.capture.records import thin_record
from fxcondensa.errors import TraceError
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


class ShapeBranch(nn.Module):
    """Branches on an input's shape and takes keyword inputs: symbolic tracing cannot follow it (the branch
    reads a proxy's size as a bool), torch.export can. Returns a dict."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, pixels, scale=None):
        y = torch.relu(self.bn(self.conv(pixels)))
        if y.shape[-1] > 4:  # a Python branch on a size
            y = y[..., ::2, ::2]
        out = self.head(y)
        if scale is not None:
            out = out * scale
        return {"logits": out.mean((2, 3)), "features": out}


class DataBranch(nn.Module):
    """Branches on a tensor's values: neither frontend can capture that without help."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_auto_falls_back_to_export_with_keyword_inputs_and_a_dict_output():
    model = randomize(ShapeBranch())
    before = state_hash(model)
    x = {"pixels": torch.randn(1, 3, 8, 8), "scale": torch.tensor(2.0)}
    fresh = {"pixels": torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)), "scale": torch.tensor(2.0)}
    with pytest.raises(TraceError, match="torch.fx could not trace ShapeBranch"):
        trace(model, x, capture="fx")
    thinned = thin(model, StructurePrune(0.5, layers={"*": 0.5}), x, output="graph")
    assert state_hash(model) == before, "the input model was modified"
    assert thin_record(thinned).capture == "export" and capture_of(thinned) == "export"
    assert thinned.conv.weight.shape[0] < 8
    got = thinned(**fresh)  # the thinned module takes the model's own inputs and returns its structure
    assert sorted(got) == ["features", "logits"]
    with torch.no_grad():
        dense = model.eval()(**fresh)
    assert got["logits"].shape == dense["logits"].shape and got["features"].shape == dense["features"].shape


def test_export_capture_on_request_equals_the_model():
    model = randomize(ShapeBranch())
    x = {"pixels": torch.randn(2, 3, 8, 8)}
    gm = trace(model, x, capture="export")
    assert capture_of(gm) == "export"
    with torch.no_grad():
        torch.testing.assert_close(gm(**x)["logits"], model.eval()(**x)["logits"], rtol=RTOL, atol=ATOL)
    gm.train()  # a plain GraphModule: mode switches do not raise (ep.module() refuses them)
    assert graph_inputs(gm, x)[0] is x["pixels"]


def test_export_capture_thins_exactly_against_the_compressed_model():
    model = randomize(ShapeBranch())
    x = {"pixels": torch.randn(1, 3, 8, 8)}
    fresh = {"pixels": torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    scheme = StructurePrune(0.5, layers={"*": 0.5})
    thinned = thin(model, scheme, x, capture="export")
    compressed = trace(model, x, capture="export")
    with torch.no_grad():
        scheme.pi(compressed)
        scheme.delta(compressed)
        torch.testing.assert_close(thinned(**fresh)["features"], compressed(**fresh)["features"], rtol=RTOL, atol=ATOL)


def test_fx_capture_accepts_keyword_inputs():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)))
    x = {"input": torch.randn(1, 3, 4, 4)}
    thinned = thin(model, StructurePrune(0.5), x)
    assert thin_record(thinned).capture == "fx"
    assert thinned.get_submodule("0").out_channels < 8


def test_neither_frontend_one_error_naming_both_and_the_line():
    model = DataBranch()
    before = state_hash(model)
    with pytest.raises(TraceError) as info:
        thin(model, StructurePrune(0.5), torch.randn(1, 4))
    text = str(info.value)
    assert "torch.fx could not trace DataBranch" in text
    assert "torch.export could not capture it either" in text
    assert "if x.sum() > 0" in text and "test_capture.py" in text
    assert "leaf_modules" in text and "adapter" in text
    assert state_hash(model) == before


def test_export_only_error_names_the_line():
    with pytest.raises(TraceError, match=r"torch.export could not capture DataBranch.*if x.sum\(\) > 0"):
        trace(DataBranch(), torch.randn(1, 4), capture="export")


def test_bad_capture_and_bad_inputs_say_what_to_pass():
    with pytest.raises(ValueError, match="capture must be one of"):
        trace(ShapeBranch(), torch.randn(1, 3, 8, 8), capture="dynamo")
    with pytest.raises(ValueError, match="capture='export' needs example inputs"):
        trace(ShapeBranch(), capture="export")
    with pytest.raises(TypeError, match="dict of keyword inputs"):
        trace(ShapeBranch(), {}, capture="export")


def test_keyword_inputs_need_string_keys():
    with pytest.raises(TypeError, match="need string keys"):
        trace(ShapeBranch(), {0: torch.randn(1, 3, 8, 8)})


def test_inputs_of_another_structure_than_the_capture_say_so():
    gm = trace(ShapeBranch(), {"pixels": torch.randn(1, 3, 8, 8)}, capture="export")
    with pytest.raises(ValueError, match="do not have the structure ShapeBranch was captured with"):
        graph_inputs(gm, {"pixels": torch.randn(1, 3, 8, 8), "scale": torch.tensor(1.0)})


def test_fx_keyword_inputs_name_a_missing_or_unknown_argument():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    gm = trace(Two(), capture="fx")
    with pytest.raises(ValueError, match="no example input for argument 'b'"):
        graph_inputs(gm, {"a": torch.randn(2)})
    with pytest.raises(ValueError, match="has no argument named 'c'"):
        graph_inputs(gm, {"a": torch.randn(2), "b": torch.randn(2), "c": torch.randn(2)})

"""Tiny Hugging Face transformers models thin exactly through the torch.export frontend: keyword inputs,
ModelOutput results, and a default-config causal LM (``use_cache=True``, turned off for the capture)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import bench_coverage, state_hash

from fxcondensa import thin, trace
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

_bench = bench_coverage()
build_hf = _bench.build_hf  # the zoo of bench/coverage.py: the same models and randomisation

RTOL, ATOL = 1e-4, 1e-5
SCHEME = StructurePrune(0.5)


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["bert", "gpt2-lm"])
def test_tiny_hf_model_thins_exactly_on_a_fresh_input(name):
    torch.manual_seed(0)
    model, x, fresh, _ = build_hf(name)
    before = state_hash(model)
    with pytest.warns(UserWarning, match="use_cache=False") if name == "gpt2-lm" else _nothing():
        thinned = thin(model, SCHEME, x, output="graph")  # the capture's graph (the own class: test_own_model)
    assert state_hash(model) == before, "the input model was modified"
    assert thin_record(thinned).capture == "export"
    assert params(thinned) < params(model)
    compressed = trace(model, x)
    with torch.no_grad():
        SCHEME.pi(compressed)
        SCHEME.delta(compressed)
        got, ref = thinned(**fresh), compressed(**fresh)
    assert type(got) is type(ref) and list(got.keys()) == list(ref.keys())  # a ModelOutput, same fields
    for a, b in zip(flatten_outputs(dict(got)), flatten_outputs(dict(ref)), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_report_takes_keyword_inputs_of_an_export_captured_model():
    import fxcondensa

    torch.manual_seed(0)
    model, x, _, _ = build_hf("bert")
    small = thin(model, SCHEME, x)
    rep = fxcondensa.report(model, small, x, latency=True, warmup=0, repeat=1)
    assert rep.totals["params_after"] == params(small) < rep.totals["params_before"] == params(model)
    assert rep.totals["macs_after"] < rep.totals["macs_before"]
    assert rep.totals["latency_after"]["batch_size"] == x["input_ids"].shape[0]
    assert rep.input_shapes == [tuple(t.shape) for t in x.values()]


@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "torchscript"])
def test_an_export_captured_model_exports_with_keyword_inputs(fmt, tmp_path):
    import fxcondensa
    from fxcondensa.files.export import StaticShapeWarning

    torch.manual_seed(0)
    model, x, _, _ = build_hf("bert")
    small = thin(model, SCHEME, x)
    # The exporter has reloaded the file and compared its outputs with the model's (at another batch size
    # too, for a dynamic file). torch.export and ONNX files of keyword inputs keep the example shapes and say
    # so; a TorchScript trace may bake the sizes the graph reads, and then says so too.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path = getattr(fxcondensa.files.export, fmt)(small, tmp_path / f"bert.{fmt}", x)
    static = [w for w in seen if issubclass(w.category, StaticShapeWarning) and "dynamic batch" in str(w.message)]
    assert static or fmt == "torchscript"
    assert path.exists() and path.stat().st_size > 0

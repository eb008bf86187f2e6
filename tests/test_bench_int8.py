"""bench/int8.py's pipeline on LeNet-5 (``python bench/int8.py --quick`` runs the real models, small), one timed
run per variant: the four variants exist, sizes fall, the tables render. No timing assertions."""

import importlib.util
from pathlib import Path

import pytest
import torch

import fxcondensa

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "int8.py"


@pytest.fixture(scope="module")
def int8_bench():
    spec = importlib.util.spec_from_file_location("bench_int8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lenet(name, quick):
    torch.manual_seed(0)
    images = lambda batch: torch.randn(batch, 1, 28, 28)  # noqa: E731
    return fxcondensa.models.LeNet5().eval(), images, "image 28x28"


def test_rows_and_tables(int8_bench, monkeypatch):
    monkeypatch.setattr(int8_bench, "build", _lenet)
    row = int8_bench.bench_model("lenet", density=0.5, mode="dynamic", batches=[1, 2], quick=True, latency=True,
                                 warmup=0, repeat=1, log=lambda *a: None)
    v = row["variants"]
    assert set(v) == set(int8_bench.VARIANTS)
    assert v["thinned fp32"]["params"] < v["dense fp32"]["params"] == v["dense int8"]["params"]
    assert v["thinned int8"]["param_bytes"] < v["thinned fp32"]["param_bytes"] < v["dense fp32"]["param_bytes"]
    assert v["dense int8"]["param_bytes"] < v["dense fp32"]["param_bytes"]
    assert row["int8_weights"] > 0 and 0 < row["int8_error_thinned"] < 0.1
    assert set(row["latency"]) == {"1", "2"} and all(row["latency"]["2"][k] > 0 for k in int8_bench.VARIANTS)
    assert "thinned int8" in int8_bench.size_table([row]) and "load avg" in int8_bench.latency_table([row], 2)

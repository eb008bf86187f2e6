"""bench/speedup.py's core on LeNet-5 with tiny repeat counts: the row fields exist, the FLOP ratio is > 1.

No timing assertions (tests never time anything); the numbers are recorded by the benchmark itself.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

import fxcondensa.latency

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speedup.py"

FIELDS = {"model", "density", "align", "batch", "resolution", "input", "device", "amp", "channels_last",
          "compile", "threads", "dense_ms", "thinned_ms", "speedup", "dense_macs", "thinned_macs", "flop_ratio",
          "efficiency", "params_dense", "params_thinned", "tp_ms", "tp_flop_ratio", "ours_over_tp", "goal"}


@pytest.fixture(scope="module")
def speedup():
    spec = importlib.util.spec_from_file_location("bench_speedup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lenet5_rows(speedup):
    rows = speedup.bench_model("lenet5", [0.5], batches=[1, 8], warmup=0, repeat=1, torch_pruning=False,
                               layers=True, log=lambda *a: None)
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert set(r) >= FIELDS
        assert r["density"] == 0.3  # LeNet-5 runs the tutorial's FLOP scheme whatever the densities
        assert r["flop_ratio"] > 1 and r["params_thinned"] < r["params_dense"]
        assert r["thinned_macs"] < r["dense_macs"]
        assert math.isclose(r["efficiency"], r["speedup"] / r["flop_ratio"])
        assert r["resolution"] == [28, 28] and r["input"] == [r["batch"], 1, 28, 28]
    assert rows[0]["goal"] is None and (rows[1]["goal"] == "met" or rows[1]["goal"].startswith("missed"))
    assert {n["node"] for n in rows[1]["layers"]["nodes"]} >= {"conv1", "conv2", "ip1"}
    json.dumps(rows)  # the JSON the script writes


def test_cli_writes_json(speedup, tmp_path):
    out = tmp_path / "speedup.json"
    speedup.main(["--models", "lenet5", "--quick", "--no-torch-pruning", "--align", "0", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"command", "date", "machine", "torch", "rows"} <= set(result)
    assert [r["align"] for r in result["rows"]] == [None, None, 8, 8]
    assert all(r["flop_ratio"] > 1 for r in result["rows"])


def test_copies_time_fresh_copies_and_take_median_ratios(speedup, monkeypatch):
    """--copies K: every contender is prepared K times (fresh copies), each set timed in its own alternating
    run, and the row's ours/tp is the median of the K per-copy ratios, not a ratio of pooled times."""
    import torch

    from fxcondensa.latency import Latency

    prepared = []
    per_copy = iter([(10.0, 4.0, 5.0), (12.0, 6.0, 5.0), (11.0, 4.5, 5.0)])  # dense, thinned, tp medians

    def fake_compare(models, x, *, warmup, repeat):
        assert len({id(m) for m in models}) == len(models)
        return [Latency(ms, ms, ms, ms, ms, repeat, warmup, 1, x.shape[0], "cpu") for ms in next(per_copy)]

    def fake_prepare(m, *args):
        prepared.append(m)
        return torch.nn.Identity()  # a fresh object per copy

    monkeypatch.setattr(fxcondensa.latency, "compare_latency", fake_compare)
    runs = speedup.timed_copies({"dense": "D", "thinned": "T", "torch_pruning": "P"}, torch.zeros(2, 3), 3,
                                lambda m: fake_prepare(m), warmup=0, repeat=2)
    assert prepared == ["D", "T", "P"] * 3
    assert [lat.median_ms for lat in runs["thinned"]] == [4.0, 6.0, 4.5]
    assert speedup.median_latency(runs["thinned"]).median_ms == 4.5
    assert speedup.median_latency(runs["dense"][:2]).median_ms == 10.0  # even count: the lower middle copy


def test_copies_rows_record_per_copy_ratios(speedup):
    rows = speedup.bench_model("lenet5", [0.5], batches=[4], warmup=0, repeat=1, copies=3, torch_pruning=False,
                               log=lambda *a: None)
    (row,) = rows
    assert row["copies"] == 3 and len(row["speedup_copies"]) == 3
    assert row["speedup"] == sorted(row["speedup_copies"])[1]


def test_cli_rejects_zero_copies(speedup, capsys):
    with pytest.raises(SystemExit) as exc:
        speedup.main(["--models", "lenet5", "--copies", "0"])
    assert exc.value.code == 2
    assert "--copies 0: give 1 or more fresh copies to time" in capsys.readouterr().err


def test_copies_ours_over_tp_is_the_median_per_copy_ratio(speedup, monkeypatch):
    import copy

    # A stand-in for Torch-Pruning's matched model (the bench extra is not installed in CI): the dense model.
    monkeypatch.setattr(speedup, "tp", object())
    monkeypatch.setattr(speedup, "tp_match", lambda model, x, ratio, dense_macs, steps: (copy.deepcopy(model), 0.5, ratio))
    (row,) = speedup.bench_model("lenet5", [0.5], batches=[4], warmup=0, repeat=1, copies=3, log=lambda *a: None)
    assert len(row["ours_over_tp_copies"]) == 3
    assert row["ours_over_tp"] == sorted(row["ours_over_tp_copies"])[1]

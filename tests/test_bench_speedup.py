"""bench/speedup.py's core on LeNet-5 with tiny repeat counts: the row fields exist, the FLOP ratio is > 1.

No timing assertions (tests never time anything); the numbers are recorded by the benchmark itself.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

import fxcondensa.measure.latency

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

    from fxcondensa.measure.latency import Latency

    prepared = []
    per_copy = iter([(10.0, 4.0, 5.0), (12.0, 6.0, 5.0), (11.0, 4.5, 5.0)])  # dense, thinned, tp medians

    def fake_compare(models, x, *, warmup, repeat):
        assert len({id(m) for m in models}) == len(models)
        return [Latency(ms, ms, ms, ms, ms, repeat, warmup, 1, x.shape[0], "cpu") for ms in next(per_copy)]

    def fake_prepare(m, *args):
        prepared.append(m)
        return torch.nn.Identity()  # a fresh object per copy

    monkeypatch.setattr(fxcondensa.measure.latency, "compare_latency", fake_compare)
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


def test_machine_records_the_allocator_tuning(speedup, monkeypatch):
    """CPU timings depend on how the C allocator returns memory (BENCHMARKS.md): a run says how it was set."""
    for key in speedup.ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert speedup.machine("cpu")["allocator"] == "default"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert speedup.machine("cpu")["allocator"] == {"MALLOC_MMAP_THRESHOLD_": "1073741824"}


def test_control_times_a_second_copy_of_the_peer(speedup, monkeypatch):
    """--control: torch-pruning's model timed twice from separate fresh copies; the row's control_over_tp is
    the median of their per-copy ratios (the noise floor of ours_over_tp)."""
    import copy

    monkeypatch.setattr(speedup, "tp", object())
    monkeypatch.setattr(speedup, "tp_match", lambda model, x, ratio, dense_macs, steps: (copy.deepcopy(model), 0.5, ratio))
    timed: list[list[object]] = []
    original = fxcondensa.measure.latency.compare_latency

    def recording(models, *args, **kwargs):
        timed.append(list(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(fxcondensa.measure.latency, "compare_latency", recording)
    (row,) = speedup.bench_model("lenet5", [0.5], batches=[4], warmup=0, repeat=1, copies=3, control=True,
                                 log=lambda *a: None)
    assert all(len(models) == 4 and models[2] is not models[3] for models in timed)  # tp and control: 2 objects
    assert len(row["control_over_tp_copies"]) == 3 and len(row["control_over_tp_ci95"]) == 2
    assert row["control_over_tp"] == sorted(row["control_over_tp_copies"])[1]


@pytest.mark.parametrize("flags, message", [(["--throughput-only", "--latency-only"], "leave no rows"),
                                            (["--control", "--no-torch-pruning"], "cannot go with")])
def test_cli_rejects_contradicting_flags(speedup, capsys, flags, message):
    with pytest.raises(SystemExit):
        speedup.parse(flags)
    assert message in capsys.readouterr().err


def test_latency_only_runs_the_batch_one_rows(speedup, monkeypatch):
    seen = []
    monkeypatch.setattr(speedup, "bench_model", lambda name, densities, **kw: seen.append(kw["batches"]) or [])
    speedup.run(speedup.parse(["--models", "lenet5", "--latency-only", "--no-torch-pruning"]), log=lambda *a: None)
    assert seen == [[1]]


@pytest.mark.parametrize("batch, ours_over_tp, efficiency, expected", [
    (1, None, 0.5, None),                                       # no goal at batch 1 without a peer
    (1, 0.99, 0.5, "met"),                                      # issue 14: no slower than the peer, any batch
    (1, 1.02, 0.5, "missed: slower than torch-pruning (x1.020)"),
    (32, None, 0.97, "met"),                                    # issue 7: efficiency at the throughput batch
    (32, 0.98, 0.90, "missed: efficiency 0.90 < 0.95"),
])
def test_goal_by_batch(speedup, batch, ours_over_tp, efficiency, expected):
    row = {"model": "resnet18", "batch": batch, "speedup": 3.0, "efficiency": efficiency, "ours_over_tp": ours_over_tp}
    assert speedup.goal(row, 32) == expected
    if batch == 1:
        assert speedup.goal(row, 1) == expected  # --latency-only: batch 1 is also the largest batch


def test_median_ci_brackets_the_median_and_is_reproducible(speedup):
    values = [0.9, 1.1, 0.95, 1.02, 0.99, 1.2, 0.97, 1.01, 0.93, 1.05]
    lo, hi = speedup.median_ci(values)
    assert lo <= sorted(values)[4] <= sorted(values)[5] <= hi and lo < hi
    assert speedup.median_ci(values) == (lo, hi)
    assert speedup.median_ci([1.0] * 5) == (1.0, 1.0)

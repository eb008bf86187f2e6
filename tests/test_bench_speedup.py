"""bench/speedup.py's core on LeNet-5 with tiny repeat counts: the row fields exist, the FLOP ratio is > 1.

No timing assertions (tests never time anything); the numbers are recorded by the benchmark itself.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

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

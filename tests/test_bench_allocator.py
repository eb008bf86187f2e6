"""bench/allocator.py on a small model with tiny counts: the JSON has the A/A ratios, the fault count and the
allocator settings. No timing assertions (tests never time anything)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "allocator.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_allocator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_aa_ratios_faults_and_allocator(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    out = tmp_path / "a.json"
    load().main(["--model", "squeezenet1_0", "--batch", "1", "--size", "32", "--copies", "2", "--warmup", "0",
                 "--repeat", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["aa_ratio"]) == 2 and row["aa_median"] > 0 and len(row["aa_ci95"]) == 2
    assert row["minor_faults_per_forward"] >= 0
    assert row["allocator"] == {"MALLOC_TRIM_THRESHOLD_": "1073741824"}

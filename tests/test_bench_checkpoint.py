"""bench/checkpoint_scale.py's steps, in this process on a tiny shape: the checkpoint it writes is one that
thin_pretrained thins and stock from_pretrained loads. No timing assertions (tests never time anything)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "checkpoint_scale.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_checkpoint_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_thin_load_steps(tmp_path):
    bench = load()
    config = {**bench.SHAPES["quick"], "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
              "head_dim": 16, "vocab_size": 256}
    spec = {"config": config, "target": {"hidden_size": 48, "intermediate_size": 64},
            "src": str(tmp_path / "src"), "dst": str(tmp_path / "dst")}
    wrote = bench.write(spec)
    assert wrote["params"] > 0 and wrote["disk_mib"] > 0
    thinned = bench.thin(spec)
    assert thinned["units_checked"] == config["num_hidden_layers"] + 3
    loaded = bench.load(spec)
    assert loaded["finite"] and loaded["class"] == "LlamaForCausalLM"
    assert loaded["sizes"]["hidden_size"] == 48 and loaded["sizes"]["intermediate_size"] == 64
    assert "units checked" in bench.table([thinned]) and "error: boom" in bench.table([{"step": "x", "error": "boom"}])

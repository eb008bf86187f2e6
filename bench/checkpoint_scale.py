"""Thinning a Llama-3.1-8B-shaped checkpoint on disk with ``thin_pretrained``: wall time and peak memory.

Three steps, each in a FRESH PROCESS, one after the other:

1. ``write``: a bf16 checkpoint of the shape (random weights, norm weights in [0.5, 1.5]) written tensor by
   tensor with fxcondensa's own shard writer into a temporary directory (so the writer stays small; the
   random values are windows of one random pool, different for every tensor);
2. ``thin``: ``fxcondensa.thin_pretrained(src, dst, hidden_size=..., intermediate_size=...)`` with the
   layer-by-layer check on (the default);
3. ``load``: stock ``transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)`` and a
   forward pass on a few tokens.

Time is each step's wall time inside its process (imports excluded); peak RSS is the process's
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at its end (imports included). The temporary directory is
removed at the end, also on failure (``--keep`` keeps it).

Usage::

    python bench/checkpoint_scale.py --quick                  # a tiny shape: a smoke test (seconds)
    python bench/checkpoint_scale.py --layers 4               # the 8B widths, 4 layers (~3 GB on disk)
    python bench/checkpoint_scale.py                          # the full 8B shape (16 GB + 9 GB on disk)

Writes ``bench/results/checkpoint_scale.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 2**20

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B's sizes (its rope scaling left out: it does not change what is thinned)
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "tie_word_embeddings": False},
    "quick": {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False},
}
TARGETS = {"llama-3.1-8b": {"hidden_size": 3072, "intermediate_size": 9216},  # Minitron-4B's widths
           "quick": {"hidden_size": 192, "intermediate_size": 576}}
TOKENS = 8
POOL = 2**26  # random bf16 values every tensor takes a window of (128 MiB)


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB, 1)


def _folder_mib(folder: str) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / MiB, 1)


# ------------------------------------------------------------------------------------------- the steps

def write(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from fxcondensa.compression import checkpoint_layout as layout
    from fxcondensa.files.hf_checkpoint import write_checkpoint

    start = time.perf_counter()
    config = transformers.LlamaConfig(**spec["config"], dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL, generator=g) * 0.02).to(torch.bfloat16)

    def random(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        if name.endswith("norm.weight"):
            return (torch.rand(shape, generator=g) + 0.5).to(torch.bfloat16)
        out = torch.empty(n, dtype=torch.bfloat16)
        done, offset = 0, int(torch.randint(0, POOL, (1,), generator=g))
        while done < n:
            take = min(n - done, POOL - offset)
            out[done:done + take] = pool[offset:offset + take]
            done, offset = done + take, 0
        return out.reshape(shape)

    layers = spec["config"]["num_hidden_layers"]
    units = [["model.embed_tokens.weight"]]
    units += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    units.append(["model.norm.weight", "lm_head.weight"])
    specs = [{n: (shapes[n], torch.bfloat16) for n in u} for u in units]
    raw = config.to_dict()
    raw["architectures"] = ["LlamaForCausalLM"]
    assert set(layout.GLOBAL) <= set(shapes)
    write_checkpoint(spec["src"], raw, specs, lambda u: ((n, random(n, shapes[n])) for n in units[u]),
                     max_shard_bytes=4 * 2**30)
    return {"step": "write", "seconds": round(time.perf_counter() - start, 1), "peak_mib": _peak_mib(),
            "disk_mib": _folder_mib(spec["src"]), "params": sum(_numel(s) for s in shapes.values())}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def thin(spec: dict[str, Any]) -> dict[str, Any]:
    import fxcondensa

    start = time.perf_counter()
    result = fxcondensa.thin_pretrained(spec["src"], spec["dst"], **spec["target"])
    seconds = time.perf_counter() - start
    return {"step": "thin", "seconds": round(seconds, 1), "peak_mib": _peak_mib(),
            "disk_mib": _folder_mib(spec["dst"]), "units_checked": len(result.checked),
            "max_abs_diff": max(d for _, d in result.checked), "threads": __import__("torch").get_num_threads()}


def load(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dst"], dtype=torch.bfloat16).eval()
    loaded = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"step": "load", "seconds": round(time.perf_counter() - start, 1), "load_seconds": round(loaded, 1),
            "peak_mib": _peak_mib(), "class": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()), "logits": list(logits.shape),
            "finite": bool(torch.isfinite(logits).all()),
            "sizes": {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size",
                                                            "num_attention_heads", "num_key_value_heads")}}


STEPS = {"write": write, "thin": thin, "load": load}


# ------------------------------------------------------------------------------------------- driver

def run_fresh(step: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    wall = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--step", step, json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"step": step, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-3:]
        return {"step": step, "error": f"exit {done.returncode}: {' | '.join(tail)[:600]}"}
    row = json.loads(lines[-1])
    row["process_wall_seconds"] = round(time.perf_counter() - wall, 1)
    return row


def _notes(r: dict[str, Any]) -> str:
    if r["step"] == "thin":
        return f"{r['units_checked']} units checked, max abs diff {r['max_abs_diff']:.2g}"
    if r["step"] == "load":
        return f"{r['class']} {r['params'] / 1e6:.0f}M params, logits {r['logits']}, finite {r['finite']}"
    return f"{r['params'] / 1e6:.0f}M params"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["step", "time s (in process)", "process wall s", "peak RSS MiB", "on disk MiB", "notes"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['step']} | error: {r['error']}")
            continue
        notes = _notes(r)
        lines.append(" | ".join(str(v) for v in [r["step"], r["seconds"], r.get("process_wall_seconds", ""),
                                                 r["peak_mib"], r.get("disk_mib", ""), notes]))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--step":
        print(json.dumps(STEPS[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape: a smoke test")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's 32)")
    parser.add_argument("--workdir", default=None, help="where the temporary directory goes (default: the "
                                                        "system's temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/checkpoint_scale.json)")
    args = parser.parse_args()
    shape = "quick" if args.quick else "llama-3.1-8b"
    config = dict(SHAPES[shape])
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    out = Path(args.out or HERE / "results" / f"checkpoint_scale{'_quick' if args.quick else ''}.json")
    work = tempfile.mkdtemp(prefix="fxcondensa-checkpoint-", dir=args.workdir)
    spec = {"config": config, "target": TARGETS[shape], "src": os.path.join(work, "src"),
            "dst": os.path.join(work, "dst")}
    rows: list[dict[str, Any]] = []
    try:
        for step in STEPS:
            row = run_fresh(step, spec, args.timeout)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if "error" in row:
                break
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "shape": shape, "config": config, "target": TARGETS[shape], "steps": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print()
    print(table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

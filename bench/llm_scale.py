"""Thinning Llama-shaped language models at their real size: wall time and peak memory, against Torch-Pruning.

Each model is built from a ``LlamaConfig`` with random weights (norm weights randomised too), directly in its
dtype (bf16 or fp32), in a FRESH PROCESS per run, so that no run inherits another's heap. One run is one
contender on one model:

- ``thin``: ``fxcondensa.thin(model, StructurePrune(0.5), {"input_ids", "attention_mask"})`` (capture,
  compress, thin, check; the user's model is untouched);
- ``thin-inplace``: the same with ``inplace=True, output="auto"`` (the model object itself thinned), where this
  version of ``thin`` has it (skipped otherwise);
- ``torch-pruning``: Torch-Pruning's in-place pruning of the same model at the same ratio (magnitude
  importance; MLP channels, whole heads and the hidden size, as its LLM example does), with the key-value
  cache off (with it on, its graph building did not finish); no check of the result.

Contenders alternate (all contenders on a model, then again for the next repeat). Time is the call's wall
time; peak RSS is the process's high-water mark during the call (``/proc/self/clear_refs`` resets it after
the model is built); extra peak RSS is that peak minus the RSS after building the model, reported as a
multiple of the model's bytes (parameters and buffers).

``--profile`` runs one ``thin`` of the first model under cProfile (in a fresh process) and splits its time
into capture (torch.export), scheme (scores and masks) and the thinning pass (channel analysis, slicing,
check).

Usage::

    python bench/llm_scale.py --quick                 # a small model, one repeat: a smoke test
    python bench/llm_scale.py                         # the 2- and 4-layer hidden-2048 models, bf16 and fp32
    python bench/llm_scale.py --profile               # also where the time of one thin goes
    python bench/llm_scale.py --models 1B-llama3.2 --dtypes bfloat16   # Llama-3.2-1B's shape

Writes ``bench/results/llm_scale.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 2**20

# name -> LlamaConfig fields. "4L-2048" is the 307M-parameter model of the issue this bench answers.
MODELS: dict[str, dict[str, int]] = {
    "quick-2L-512": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 2,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8000},
    "2L-2048": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 2,
                "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "4L-2048": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4,
                "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    # Llama-3.2-1B's shape (its input embedding and output head are one tensor): 1.24B parameters.
    "1B-llama3.2": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": True},
}
CONTENDERS = ("thin", "thin-inplace", "torch-pruning")
RATIO = 0.5
SEQ = 16


# ------------------------------------------------------------------------------------------- one run

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(name: str, dtype_name: str) -> tuple[Any, dict[str, Any]]:
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    config = transformers.LlamaConfig(**MODELS[name])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy on the way
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):  # unit weights would hide wrong slices
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


def _torch_pruning(model: Any, inputs: dict[str, Any]) -> None:
    import torch_pruning as tp

    config = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = num_heads[m.v_proj] = config.num_key_value_heads
    # As Torch-Pruning's LLM example: MLP channels, whole heads and the hidden size, the output head kept whole.
    # With the key-value cache on, its dependency graph did not finish building in 15 minutes (a cache object
    # in the traced outputs), so it runs with the cache off, as thin's capture does.
    config.use_cache = False
    pruner = tp.pruner.BasePruner(
        model, example_inputs=inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=RATIO, ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=RATIO, output_transform=lambda out: out.logits,
        forward_fn=lambda m, x: m(**x))
    pruner.step()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import torch

    torch.manual_seed(0)
    model, inputs = build(spec["model"], spec["dtype"])
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params = sum(p.numel() for p in model.parameters())
    import gc

    gc.collect()
    rss_model = _status("VmRSS")
    exact_peak = _reset_peak()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec["contender"] == "torch-pruning":
            _torch_pruning(model, inputs)
            result = model
        else:
            import fxcondensa
            from fxcondensa.schemes import StructurePrune

            # In place, thin hands back the model object itself: the user's own class (output="auto").
            kwargs = {"inplace": True, "output": "auto"} if spec["contender"] == "thin-inplace" else {}
            result = fxcondensa.thin(model, StructurePrune(RATIO), inputs, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    if not exact_peak:  # the high-water mark of the whole process, model build included
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**spec, "seconds": round(seconds, 2), "params": params,
            "params_after": sum(p.numel() for p in result.parameters()), "model_mib": round(model_bytes / MiB, 1),
            "rss_model_mib": round(rss_model / MiB, 1), "peak_mib": round(peak / MiB, 1),
            "extra_peak_mib": round((peak - rss_model) / MiB, 1),
            "extra_peak_x_model": round((peak - rss_model) / model_bytes, 2), "peak_reset": exact_peak,
            "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- profile

# Top-level phases of one thin (file suffix, function): their cumulative times do not nest in one another. A
# scheme that only records masks is run through ``annotate`` (the lean path); otherwise through ``pi``/``delta``,
# which call ``annotate`` themselves: the larger of the two is the scheme's time.
PHASES = {
    "capture (torch.export)": [("capture/graph.py", "trace")],
    "thinning pass": [("passes/thin.py", "thin_graph")],
    "own class: build and check": [("compression/thinning.py", "_own")],
}
SCHEME = "scheme (scores, masks; its own channel analysis)"
SCHEME_CALLS = ([("schemes/base.py", "pi"), ("schemes/base.py", "delta")], [("schemes/structured.py", "annotate")])
# Parts of the thinning pass; what is left of it is its channel analysis (two stages: channels, head_dim). Its
# check runs there only when the graph is the result; the own class's check runs under "own class".
PASS_PARTS = {"slicing": [("passes/slicing.py", "apply_keep")]}
CHECKS = ([("passes/thin.py", "_check")], [("passes/own.py", "check_own")])


def _cumulative(stats: dict, functions: list[tuple[str, str]]) -> float:
    return sum(v[3] for (path, _line, name), v in stats.items()
               if any(path.endswith(suffix) and name == fn for suffix, fn in functions))


def profile(spec: dict[str, Any]) -> dict[str, Any]:
    import cProfile
    import pstats
    import warnings

    import fxcondensa
    from fxcondensa.schemes import StructurePrune

    model, inputs = build(spec["model"], spec["dtype"])
    prof = cProfile.Profile()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof.runcall(fxcondensa.thin, model, StructurePrune(RATIO), inputs)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    phases = {phase: round(_cumulative(stats, fns), 2) for phase, fns in PHASES.items()}
    phases[SCHEME] = round(max(_cumulative(stats, fns) for fns in SCHEME_CALLS), 2)
    phases["other"] = round(total - sum(phases.values()), 2)
    parts = {part: round(_cumulative(stats, fns), 2) for part, fns in PASS_PARTS.items()}
    parts["check"] = round(_cumulative(stats, CHECKS[0]) - _cumulative(stats, CHECKS[1]), 2)
    parts["channel analysis and the rest"] = round(phases["thinning pass"] - sum(parts.values()), 2)
    phases["thinning pass: " + ", ".join(f"{k} {v} s" for k, v in parts.items())] = phases["thinning pass"]
    top = sorted(stats.items(), key=lambda kv: -kv[1][3])
    hot = [f"{Path(p).name}:{n} {v[3]:.2f}s" for (p, _l, n), v in top if "fxcondensa" in p][:12]
    return {**spec, "seconds": round(total, 2), "phases": phases, "hot_fxcondensa_functions": hot}


# ------------------------------------------------------------------------------------------- driver

def run_fresh(mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, __file__, mode, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def _has_inplace() -> bool:
    import fxcondensa

    return "inplace" in inspect.signature(fxcondensa.thin).parameters


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "dtype", "contender", "rep", "params", "kept", "model MiB", "time s", "peak MiB",
            "extra peak MiB", "extra / model"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(" | ".join([r["model"], r["dtype"], r["contender"], str(r.get("repeat", 0)),
                                     f"error: {r['error']}"]))
            continue
        lines.append(" | ".join(str(v) for v in [
            r["model"], r["dtype"], r["contender"], r.get("repeat", 0), f"{r['params'] / 1e6:.0f}M",
            f"{r['params_after'] / r['params']:.2f}", r["model_mib"], r["seconds"], r["peak_mib"],
            r["extra_peak_mib"], r["extra_peak_x_model"]]))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--profile-worker"):
        spec = json.loads(sys.argv[2])
        print(json.dumps(worker(spec) if sys.argv[1] == "--worker" else profile(spec)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small model only, bf16, one repeat")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["2L-2048", "4L-2048"])
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also cProfile one thin of the last model (bf16)")
    parser.add_argument("--profile-only", action="store_true", help="only the profile (no timed runs)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", default=str(HERE / "results" / "llm_scale.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.dtypes, args.repeats = ["quick-2L-512"], ["bfloat16"], 1
    contenders = list(args.contenders)
    skipped = []
    if "thin-inplace" in contenders and not _has_inplace():
        contenders.remove("thin-inplace")
        skipped.append("thin-inplace: this version of thin has no inplace argument")
    if "torch-pruning" in contenders and not _has_torch_pruning():
        contenders.remove("torch-pruning")
        skipped.append("torch-pruning: not installed (pip install torch-pruning, the bench extra)")
    rows: list[dict[str, Any]] = []
    for name in [] if args.profile_only else args.models:
        for dtype in args.dtypes:
            for rep in range(args.repeats):
                order = contenders if rep % 2 == 0 else contenders[::-1]  # alternate who goes first
                for contender in order:
                    row = run_fresh("--worker", {"model": name, "dtype": dtype, "contender": contender},
                                    args.timeout)
                    row["repeat"] = rep
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    profiled = None
    if args.profile or args.profile_only:
        profiled = run_fresh("--profile-worker", {"model": args.models[-1], "dtype": "bfloat16"}, args.timeout)
    import torch

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "ratio": RATIO, "sequence": SEQ, "skipped": skipped, "runs": rows, "profile": profiled,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)  # atomic: a reader never sees half a file
    print()
    print(table(rows))
    for s in skipped:
        print("skipped:", s)
    if profiled is not None:
        print("\nwhere one thin's time goes:", json.dumps(profiled.get("phases", profiled), indent=1))
        for h in profiled.get("hot_fxcondensa_functions", []):
            print("  ", h)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""How much of a CPU forward is the C allocator? Page faults per forward and the spread between two copies of one
model (an A/A test), under whatever allocator settings the process was started with.

glibc's ``malloc`` returns large freed blocks to the kernel, so a forward can page-fault its activations in
afresh every time, and how often depends on what the process freed before. Run this twice, once as is and once
with the allocator told to keep freed memory, and compare (BENCHMARKS.md, "Latency-aware thinning"):

    python bench/allocator.py --model resnet50 --batch 16 --size 128 --copies 6
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python bench/allocator.py --model resnet50 --batch 16 --size 128 --copies 6

Each copy of the model is timed against a second fresh copy of the same model (``compare_latency_copies``,
alternating); ``aa_ratio`` per copy is how far two identical models read apart, the floor under any
ours-vs-theirs ratio measured the same way. Minor page faults come from ``getrusage`` over the timed runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
from pathlib import Path

import torch
import torchvision

from fxcondensa.measure.latency import compare_latency_copies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedup import ALLOCATOR_ENV, copy_ratios, machine, median_ci  # noqa: E402  (the bench's own helpers)

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model_name: str, batch: int, size: int, copies: int, warmup: int, repeat: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = compare_latency_copies([model, model], x, copies=copies, warmup=warmup, repeat=repeat)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    ratios = copy_ratios(a, b)
    return {"model": model_name, "input": [batch, 3, size, size], "copies": copies, "warmup": warmup,
            "repeat": repeat, "ms_a": [p.median_ms for p in a], "ms_b": [q.median_ms for q in b],
            "median_ms": statistics.median([p.median_ms for p in a + b]), "aa_ratio": ratios,
            "aa_median": statistics.median(ratios), "aa_ci95": median_ci(ratios) if copies > 1 else None,
            "minor_faults_per_forward": faults / (2 * copies * (warmup + repeat)),
            "allocator": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ} or "default"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision classification model (random weights)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/allocator_<model>.json)")
    args = p.parse_args(argv)
    if args.copies < 1:
        p.error(f"--copies {args.copies}: give 1 or more")
    torch.set_num_threads(args.threads)
    row = measure(args.model, args.batch, args.size, args.copies, args.warmup, args.repeat)
    print(f"{row['model']} {'x'.join(map(str, row['input']))}, allocator {row['allocator']}: median "
          f"{row['median_ms']:.1f} ms, {row['minor_faults_per_forward']:.0f} minor faults per forward, A/A "
          f"{row['aa_median']:.3f} (copies {min(row['aa_ratio']):.3f}-{max(row['aa_ratio']):.3f})")
    out = args.out or RESULTS / f"allocator_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": machine("cpu"),
                               "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                               "rows": [row]}, indent=1))
    os.replace(tmp, out)
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()

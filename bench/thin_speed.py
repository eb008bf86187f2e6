"""How long thinning takes: fxcondensa's ``thin`` vs torch-pruning's MagnitudePruner, same model, same run.

Ours: trace + channel analysis + StructurePrune(0.5) + slicing + the equivalence check (``check=True``),
and again without the check. Theirs (when ``torch-pruning`` is installed, the ``bench`` extra): dependency
graph + global magnitude pruning at ratio 0.5 + physical pruning of a copy. Runs alternate, medians of
``--repeat`` runs are reported, and the ratio is computed from the medians of the same run. Each timed call
starts after a full garbage collection (``gc.collect()``), so that no run pays for the collection the
imports left pending (half a second on the first call otherwise); every run's time is in the JSON.

    python bench/thin_speed.py                        # default models at 1x3x224x224
    python bench/thin_speed.py resnet50 --repeat 5
    python bench/thin_speed.py resnet50 --out resnet50.json   # default: bench/results/thin_speed.json
    python bench/thin_speed.py resnet50 --threads 1  # one thread (a shared machine); load average recorded

The machine's 1-minute load average before and after the runs goes into the JSON and the printout: on a
shared machine a load above the core count stretches every time here.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import fxcondensa
from fxcondensa.schemes import StructurePrune

try:
    import torch_pruning as tp
except ImportError:  # the bench extra is optional
    tp = None

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = ["resnet18", "resnet50", "densenet121", "mobilenet_v2", "vgg11_bn"]


def ours(model: torch.nn.Module, x: torch.Tensor, check: bool) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, parameters of the result)."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    thinned = fxcondensa.thin(model, StructurePrune(0.5), x, check=check, output="graph")
    return time.perf_counter() - start, time.process_time() - cpu, sum(p.numel() for p in thinned.parameters())


def theirs(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    work = copy.deepcopy(model)  # ours never mutates the model; give theirs the same starting point
    classifier = [m for m in work.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(work, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=0.5, ignored_layers=classifier)
    pruner.step()
    return time.perf_counter() - start, time.process_time() - cpu, sum(p.numel() for p in work.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "thin_speed.json", help="JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows, records = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        times: dict[str, list[float]] = {"ours": [], "ours_nocheck": [], "theirs": []}
        # Process CPU time too: on a shared machine it stretches far less than the wall time.
        cpu: dict[str, list[float]] = {"ours": [], "ours_nocheck": [], "theirs": []}
        params: dict[str, int] = {}
        for _ in range(args.repeat):  # alternate, so both see the same machine load
            t, c, params["ours"] = ours(model, x, check=True)
            times["ours"].append(t)
            cpu["ours"].append(c)
            t, c, _ = ours(model, x, check=False)
            times["ours_nocheck"].append(t)
            cpu["ours_nocheck"].append(c)
            if tp is not None:
                t, c, params["theirs"] = theirs(model, x)
                times["theirs"].append(t)
                cpu["theirs"].append(c)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items() if v}
        print(f"{name}: median process CPU seconds " + ", ".join(f"{k} {v:.2f}" for k, v in med_cpu.items()))
        rec = {"model": name, "input": list(x.shape), "repeat": args.repeat, "median_s": med, "runs_s": times,
               "median_cpu_s": med_cpu, "runs_cpu_s": cpu, "params": params,
               "params_dense": sum(p.numel() for p in model.parameters())}
        ratio = med["ours"] / med["theirs"] if "theirs" in med else None
        rec["ours_over_theirs"] = ratio
        records.append(rec)
        rows.append([name, f"{med['ours']:.2f}", f"{med['ours_nocheck']:.2f}",
                     f"{med['theirs']:.2f}" if "theirs" in med else "not installed",
                     f"{ratio:.2f}" if ratio else "-"])
    print(tabulate(rows, headers=["model", "fxcondensa thin (s)", "without check (s)", "torch-pruning (s)",
                                  "ours / theirs"], tablefmt="github"))
    RESULTS.mkdir(exist_ok=True)
    out = args.out
    load_after = os.getloadavg()[0]
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores")
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": torch.get_num_threads(),
                               "cores": os.cpu_count(), "load_average_1min": [load_before, load_after],
                               "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", None),
                               "rows": records}, indent=1))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()

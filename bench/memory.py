"""Memory of thinned models and of repeated compress / thin / export calls.

1. Independence: the thinned model shares no tensor storage with the original (checked by storage
   data_ptr), and its memory is its own size: process RSS grows by about its parameter + buffer bytes
   when it is made, and drops by the original's bytes when the original is deleted while the thinned
   model lives on.
2. No growth: N rounds of compress + thin + TorchScript export (+ save_thinned / load_thinned) in one
   process, with gc between rounds: RSS (/proc/self/status VmRSS) and Python-object memory (tracemalloc)
   after a warm-up stay flat.

Usage: ``python bench/memory.py [--rounds 50] [--model resnet18] [--size 64]``; prints a table and writes
``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
import torchvision

import fxcondensa
from fxcondensa.schemes import StructurePrune

MiB = 2**20


def rss() -> int:
    """Resident set size in bytes, from /proc (Linux); ru_maxrss is a peak, not the current size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


try:  # glibc keeps freed heap pages; malloc_trim hands them back so that RSS shows what is live
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def settle() -> int:
    gc.collect()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return rss()


def live_graph_modules() -> int:
    return sum(1 for o in gc.get_objects() if torch.fx.GraphModule in type(o).__mro__)


def tensor_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}


def independence(name: str, size: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = getattr(torchvision.models, name)().eval()
    # One warm-up round so that allocator pools and lazily imported code do not count as the model's.
    fxcondensa.thin(getattr(torchvision.models, name)().eval(), StructurePrune(0.5), x)
    base = settle()
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    after_thin = settle()
    shared = len(storages(model) & storages(small))
    dense_bytes, thin_bytes = tensor_bytes(model), tensor_bytes(small)
    del model
    after_del = settle()
    with torch.no_grad():
        small(x)  # the thinned model still works on its own
    return {
        "model": name, "input": [1, 3, size, size],
        "shared_storages": shared,
        "dense_tensor_bytes": dense_bytes, "thinned_tensor_bytes": thin_bytes,
        "rss_growth_from_thin": after_thin - base,
        "rss_drop_deleting_original": after_thin - after_del,
    }


def repeated(rounds: int, folder: str) -> dict:
    x = torch.randn(1, 1, 28, 28)
    model = fxcondensa.models.LeNet5().eval()
    scheme = StructurePrune(0.3)
    tracemalloc.start()
    samples = []
    t0 = time.perf_counter()
    for i in range(rounds):
        compressed = fxcondensa.compress(model, scheme, x)
        small = fxcondensa.thin(model, scheme, x)
        fxcondensa.files.export.torchscript(small, os.path.join(folder, "m.pt"), x, overwrite=True)
        fxcondensa.save_thinned(small, os.path.join(folder, "m.thin"), overwrite=True)
        fxcondensa.load_thinned(os.path.join(folder, "m.thin"), model)
        del compressed, small
        r = settle()
        samples.append({"round": i + 1, "rss": r, "py": tracemalloc.get_traced_memory()[0]})
    seconds = time.perf_counter() - t0
    tracemalloc.stop()
    alive = live_graph_modules()
    warm = samples[min(9, rounds - 1)]
    last = samples[-1]
    return {
        "rounds": rounds, "model": "LeNet5", "seconds": seconds,
        "calls": "compress + thin + export.torchscript + save_thinned + load_thinned",
        "rss_after_round_1": samples[0]["rss"], "rss_after_warmup": warm["rss"], "rss_after_last": last["rss"],
        "rss_growth_after_warmup": last["rss"] - warm["rss"],
        "py_after_warmup": warm["py"], "py_after_last": last["py"], "py_growth_after_warmup": last["py"] - warm["py"],
        "warmup_rounds": warm["round"],
        "graph_modules_alive_after": alive,
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    ind = independence(args.model, args.size)
    with tempfile.TemporaryDirectory() as folder:
        rep = repeated(args.rounds, folder)

    rows = [
        ("storages shared with the original", f"{ind['shared_storages']}"),
        (f"{args.model} dense parameters + buffers", f"{ind['dense_tensor_bytes'] / MiB:.2f} MiB"),
        (f"{args.model} thinned parameters + buffers", f"{ind['thinned_tensor_bytes'] / MiB:.2f} MiB"),
        ("RSS growth from thin() (gc'd)", f"{ind['rss_growth_from_thin'] / MiB:.2f} MiB"),
        ("RSS drop on deleting the original", f"{ind['rss_drop_deleting_original'] / MiB:.2f} MiB"),
        (f"RSS after round 1 / {rep['warmup_rounds']} / {rep['rounds']}",
         f"{rep['rss_after_round_1'] / MiB:.1f} / {rep['rss_after_warmup'] / MiB:.1f} / {rep['rss_after_last'] / MiB:.1f} MiB"),
        (f"RSS growth, rounds {rep['warmup_rounds']}..{rep['rounds']}", f"{rep['rss_growth_after_warmup'] / MiB:+.2f} MiB"),
        (f"Python objects (tracemalloc) growth, rounds {rep['warmup_rounds']}..{rep['rounds']}",
         f"{rep['py_growth_after_warmup'] / 1024:+.1f} KiB"),
        ("GraphModules still alive after the rounds", f"{rep['graph_modules_alive_after']}"),
        (f"time for {rep['rounds']} rounds", f"{rep['seconds']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "independence": ind,
        "repeated": rep,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

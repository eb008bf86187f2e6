"""A whole L-C run of fxcondensa against Condensa's own LC (PyPI ``condensa``), in the same process.

Same model (the cached LeNet-5 baseline of ``examples/lenet5.py``, else one trained here), same data
(Fashion-MNIST 54000/6000/10000), same scheme, same hyper-parameters and iteration budget. Condensa
gets the data the way its tutorial gives it (torchvision datasets through DataLoaders) and, as a second
variant, through DataLoaders over the same tensors fxcondensa holds; its ``util.cnn_statistics`` fails
on current PyTorch, so both get the same statistics function (loss, top-1) written here. Condensa's
default also evaluates the whole training set after every iteration; that is switched off
(``disable_train_stats``) so that both do the same work. The runs alternate: fxcondensa, Condensa,
fxcondensa, ... (``--repeat``), and the table shows median seconds and the final test accuracy.

Usage:
    python bench/lc_vs_condensa.py [--steps 4] [--first 200] [--per 100] [--repeat 1] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
import traceback

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxcondensa as condensa_fx
from fxcondensa.data import as_tensors, load_dataset, split_train_val
from fxcondensa.opt.training import as_batches, evaluate
from fxcondensa.schemes import Compose, Prune, Quantize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))


def load_condensa():
    """Condensa's modules, or the reason they cannot be used here (one line)."""
    try:
        condensa = importlib.import_module("condensa")
        importlib.import_module("condensa.opt")
        importlib.import_module("condensa.schemes")
        return condensa, None
    except Exception as exc:  # any import failure is the answer we report
        return None, f"`import condensa` failed: {type(exc).__name__}: {exc} (install it: pip install condensa)"


def loader_stats(model: nn.Module, criterion, loader) -> tuple[float, dict]:
    """Condensa's statistics-function signature: (loss, {"top1": accuracy %}) over a DataLoader.

    Condensa hands over theta quantized in place to float16 modules; a float32 copy is evaluated then.
    """
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            total += float(criterion(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return total / n, {"top1": 100.0 * correct / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--first", type=int, default=200, help="SGD iterations of the first L step")
    p.add_argument("--per", type=int, default=100, help="SGD iterations of later L steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--density", type=float, default=0.007)
    p.add_argument("--no-quantize", action="store_true", help="Prune(density) alone instead of MEM")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for Condensa's torchvision loaders")
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    full = load_dataset("fashion-mnist", train=True, root=args.data_root)
    testset = load_dataset("fashion-mnist", train=False, root=args.data_root)
    trainset, valset = split_train_val(full, 6000, seed=0)
    lenet5_demo = importlib.import_module("lenet5")
    model, how = lenet5_demo.baseline(trainset, torch.device("cpu"), 2, os.path.join(ROOT, "runs"))
    crit = nn.CrossEntropyLoss()
    base_test = evaluate(model, as_batches(testset, 1000), crit)[1]
    hyper = dict(lr=0.02, lr_decay=0.98, momentum=0.95, mu_init=1e-3, mu_multiplier=2.0, mu_cap=1e4)
    scheme_desc = (f"Prune({args.density})" if args.no_quantize
                   else f"MEM = Compose([Prune({args.density}), Quantize(float16)])")

    def fx_scheme():
        if args.no_quantize:
            return Prune(args.density)
        return Compose([Prune(args.density), Quantize(condensa_fx.float16)])

    def condensa_scheme():
        S = condensa.schemes
        if args.no_quantize:
            return S.Prune(args.density)
        return S.Compose([S.Prune(args.density), S.Quantize(condensa.float16)])

    def run_fx() -> tuple[float, float]:
        lc = condensa_fx.opt.LC(steps=args.steps, l_batch_size=args.batch, sgd_iterations_first_l=args.first,
                                sgd_iterations_per_l=args.per, val_batch_size=1000, device="cpu", progress=False,
                                **hyper)
        t = time.perf_counter()
        c = condensa_fx.Compressor(lc, fx_scheme(), model, trainset, testset, valset, crit)
        c.run()
        return time.perf_counter() - t, c.statistics["test_accuracy_after"]

    condensa, why = load_condensa()
    tensors = {k: as_tensors(d) for k, d in (("train", trainset), ("val", valset), ("test", testset))}

    def run_condensa(variant: str) -> tuple[float, float]:
        if variant == "torchvision":
            mk = lambda d, b, s: DataLoader(d, batch_size=b, shuffle=s, num_workers=args.workers)  # noqa: E731
            train, val, test = mk(trainset, args.batch, True), mk(valset, 1000, False), mk(testset, 1000, False)
        else:
            mk = lambda k, b, s: DataLoader(TensorDataset(*tensors[k]), batch_size=b, shuffle=s)  # noqa: E731
            train, val, test = mk("train", args.batch, True), mk("val", 1000, False), mk("test", 1000, False)
        lc = condensa.opt.LC(steps=args.steps, l_optimizer=condensa.opt.lc.SGD,
                             l_optimizer_params={"momentum": hyper["momentum"]}, lr=hyper["lr"],
                             lr_decay=hyper["lr_decay"], mb_iterations_per_l=args.per,
                             mb_iterations_first_l=args.first, mu_init=hyper["mu_init"],
                             mu_multiplier=hyper["mu_multiplier"], mu_cap=hyper["mu_cap"],
                             debugging_flags={"custom_model_statistics": loader_stats, "disable_train_stats": True})
        t = time.perf_counter()
        # Condensa's Compressor compresses the model it is given in place: hand it a copy.
        c = condensa.Compressor(lc, condensa_scheme(), copy.deepcopy(model), train, test, val, crit)
        w = c.run()
        elapsed = time.perf_counter() - t
        return elapsed, loader_stats(w, crit, DataLoader(TensorDataset(*tensors["test"]), batch_size=1000))[1]["top1"]

    runs: dict[str, list[tuple[float, float]]] = {"fxcondensa": []}
    errors: dict[str, str] = {}
    variants = ["torchvision", "tensors"]
    for _ in range(args.repeat):
        runs["fxcondensa"].append(run_fx())
        for v in variants:
            key = f"condensa ({v} DataLoader)"
            if condensa is None or key in errors:
                continue
            try:
                runs.setdefault(key, []).append(run_condensa(v))
            except Exception as exc:  # report exactly why Condensa could not run
                errors[key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    fx_s = statistics.median(t for t, _ in runs["fxcondensa"])
    rows = []
    for key, rs in runs.items():
        if not rs:
            continue
        s = statistics.median(t for t, _ in rs)
        acc = rs[-1][1]
        rows.append([key, f"{s:.1f}", f"{s / fx_s:.2f}x", f"{acc:.2f}"])
    print(f"LeNet-5 / Fashion-MNIST, {scheme_desc}, steps={args.steps}, first L={args.first}, per L={args.per}, "
          f"batch={args.batch}; baseline test accuracy {base_test:.2f}% ({how})")
    print(tabulate(rows, headers=["implementation", "seconds (median)", "time / fxcondensa", "test accuracy % after"]))
    if why:
        print(f"Condensa not run: {why}")
    for key, e in errors.items():
        print(f"{key} failed: {e}")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", "lc_vs_condensa.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "hyper": hyper, "machine": machine, "baseline_test_accuracy": base_test,
                   "runs": runs, "condensa_unavailable": why, "errors": errors}, f, indent=1)
    print(f"written: {out}")


if __name__ == "__main__":
    main()

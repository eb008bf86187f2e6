"""Compression quality at equal training budget (issue 13): every optimizer gets the same SGD minibatches.

LeNet-5 (MEM = Prune(0.007) + float16, FLOP = StructurePrune(0.3)) at each ``--budgets`` (SGD iterations of
batch 128): Direct, FineTune, Gradual, LC with the tutorial's schedule (its mu_init, mu_multiplier, lr,
momentum, its 5:1 ratio of first to later L steps, 7 iterations) and LC with the defaults for everything
but the budget (two splits of it: 7 steps at 5:1, and 4 steps), Distill, and the plain baseline: the
scheme's one-shot projection then masked SGD (constant lr 0.02, momentum 0.9, zeros re-applied after each
step), ``--lenet-seeds`` seeds each. ResNet-20 (1x28x28, BatchNorm, residuals) at half its MACs, ``--resnet-budget`` iterations,
``--seeds`` seeds: the same optimizers with StructurePrune(target_flops=0.5), thinned; and the channel
choice alone: ``thin(model, StructurePrune(target_flops=0.5))`` vs Torch-Pruning's MagnitudePruner (global
L2, its ratio bisected to the same MACs), both fine-tuned by one identical plain loop.

Data: a fixed Fashion-MNIST subset (8000 train, 1000 val from the training split; 2000 test), one thread.
Baselines are trained here (cached under ``runs/quality``). The table is printed; every row goes to
``--out`` (JSON, rewritten atomically after each row). MACs of both sides are counted by Torch-Pruning's
``count_ops_and_params`` (one counter for both).

Usage:
    python bench/quality.py                                  # everything (about 40 CPU minutes)
    python bench/quality.py --parts lenet5 --budgets 330     # one part
    python bench/quality.py --criteria l1norm                # another channel criterion (any the schemes take)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fxcondensa as condensa
from fxcondensa.data import load_dataset
from fxcondensa.files.fileio import save_atomic
from fxcondensa.models import LeNet5, ResNet20
from fxcondensa.opt.training import as_batches, evaluate
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CE = nn.CrossEntropyLoss()
BATCH = 128


def subsets(root: str | None) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train 8000, val 1000, test 2000), fixed by seed 0."""
    full = load_dataset("fashion-mnist", train=True, root=root)
    test = load_dataset("fashion-mnist", train=False, root=root)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    tperm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0)).tolist()
    # Decoded once into tensors (the same values): item-by-item decoding of the images would take longer
    # than the training itself.
    return (_tensors(Subset(full, perm[:8000])), _tensors(Subset(full, perm[8000:9000])),
            _tensors(Subset(test, tperm[:2000])))


def _tensors(subset: Subset) -> TensorDataset:
    xs, ys = zip(*(subset[i] for i in range(len(subset))), strict=True)
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


def plain_train(model: nn.Module, train: Any, steps: int, lr: float, seed: int, *, weight_decay: float = 5e-4,
                cosine: bool = True) -> nn.Module:
    """SGD (momentum 0.9), the rate decayed to 0 (cosine or linear): baselines, and the identical fine-tune
    given to our thinned model and to Torch-Pruning's."""
    torch.manual_seed(seed)
    batches = as_batches(train, BATCH)
    stream = batches.shuffled(torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if cosine:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    for _ in range(steps):
        x, y = next(stream)
        loss = CE(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def baseline(name: str, make: Any, train: Any, epochs: int, lr: float, cosine: bool) -> nn.Module:
    path = os.path.join(ROOT, "runs", "quality", f"{name}-{epochs}ep.pth")
    model = make()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    model = make()
    plain_train(model, train, epochs * (len(train) // BATCH), lr, 0, cosine=cosine)
    save_atomic(model.state_dict(), path, make_dirs=True, overwrite=True)
    return model


def optimizers(budget: int, seed: int, names: list[str]) -> dict[str, Any]:
    """Every optimizer at ``budget`` SGD minibatches of 128 (LC: steps 7, first L step 5x the later ones)."""
    per = budget // 10
    first = budget - 5 * per
    # bn_batches=8: BatchNorm statistics from 1024 images before each evaluation (ResNet; LeNet has none).
    every = dict(l_batch_size=BATCH, seed=seed, device="cpu", progress=False, bn_batches=8)
    made = {
        "Direct": lambda: condensa.opt.Direct(),
        "FineTune": lambda: condensa.opt.FineTune(iterations=budget, **every),
        "Gradual": lambda: condensa.opt.Gradual(iterations=budget, **every),
        "LC tutorial": lambda: condensa.opt.LC(steps=7, lr=0.02, lr_decay=0.98, momentum=0.95,
                                               sgd_iterations_per_l=per, sgd_iterations_first_l=first,
                                               mu_init=9.765625e-05, mu_multiplier=1.1, mu_cap=10000,
                                               val_batch_size=1000, **every),
        "LC defaults": lambda: condensa.opt.LC(steps=7, sgd_iterations_first_l=first, sgd_iterations_per_l=per,
                                               **every),
        # Another split of the same budget: 4 steps (3 L steps), the later ones 2/11 of it each (210:60:60 at
        # 330). The first L step takes the rest, so the L steps add up to the budget.
        "LC defaults 4 steps": lambda: condensa.opt.LC(steps=4, sgd_iterations_first_l=budget - 2 * (budget * 2 // 11),
                                                       sgd_iterations_per_l=budget * 2 // 11, **every),
        "Distill": lambda: condensa.opt.Distill(iterations=budget, **every),
    }
    return {k: made[k]() for k in names}


def masked_sgd(model: nn.Module, scheme: Any, train: Any, budget: int, seed: int, x: torch.Tensor) -> nn.Module:
    """The plain baseline: the scheme's one-shot magnitude projection, then SGD (constant lr 0.02, momentum
    0.9) on the task loss with the zeros re-applied after every step, projected once more at the end."""
    net = condensa.compress(model, scheme, x)
    masks = {n: p != 0 for n, p in net.named_parameters() if bool((p == 0).any())}
    torch.manual_seed(seed)
    stream = as_batches(train, BATCH).shuffled(torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    net.train()
    for _ in range(budget):
        xb, yb = next(stream)
        loss = CE(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
    return condensa.compress(net.eval(), scheme, x)  # the zeros kept; MEM's float16 rounding applied


def tp_count(model: nn.Module, x: torch.Tensor) -> int:
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model, x)[0])


def tp_prune_to(model: nn.Module, x: torch.Tensor, target_macs: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (global L2, classifier left alone), ratio bisected to ``target_macs``."""
    import torch_pruning as tp

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        work = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(work, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           global_pruning=True, pruning_ratio=mid, ignored_layers=[work.fc])
        pruner.step()
        m = tp_count(work, x)
        if best is None or abs(m - target_macs) < abs(best[1] - target_macs):
            best = (work, m)
        if abs(m - target_macs) / target_macs < 0.005:
            break
        lo, hi = (mid, hi) if m > target_macs else (lo, mid)
    assert best is not None
    return best[0].eval(), best[1]


class Rows:
    def __init__(self, out: str, meta: dict[str, Any]):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        shown = {k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()}
        print("  " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        tmp = self.out + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({**self.meta, "rows": self.rows}, f, indent=1, default=str)
        os.replace(tmp, self.out)


def compress_row(rows: Rows, opt_name: str, opt: Any, sch: Any, net: nn.Module, data: tuple, **extra: Any) -> Any:
    train, val, test = data
    # Iterations are chosen on validation; the test set is evaluated once, on the result (cheaper, and the
    # same number: the result is the model evaluated at its best iteration).
    c = condensa.Compressor(opt, sch, net, train, None, val, CE)
    start = time.perf_counter()
    w = c.run()
    s = c.statistics
    test_b = as_batches(test, 500)
    rows.add(**extra, optimizer=opt_name, test_accuracy=evaluate(w, test_b, CE)[1],
             val_accuracy=s["val_accuracy_after"], baseline_test=evaluate(net, test_b, CE)[1],
             budget=getattr(opt, "budget", 0), density=s["density"], seconds=time.perf_counter() - start)
    return w


def criteria_kw(args: argparse.Namespace) -> dict[str, Any]:
    """``--criteria`` when given; otherwise nothing, so the scheme's default is what is measured."""
    return {} if args.criteria is None else {"criteria": args.criteria}


def lenet_part(rows: Rows, data: tuple, args: argparse.Namespace) -> None:
    model = baseline("lenet5", LeNet5, data[0], 10, 0.05, cosine=False)  # 620 SGD steps
    schemes = {"MEM": Compose([Prune(0.007), Quantize(condensa.float16)]),
               "FLOP": StructurePrune(0.3, **criteria_kw(args))}
    x = as_batches(data[0], 2).first(2)
    test_b = as_batches(data[2], 500)
    for budget in args.budgets:
        for sname, scheme in schemes.items():
            if sname not in args.schemes:
                continue
            for seed in (range(args.lenet_seeds) if args.lenet_seed is None else [args.lenet_seed]):
                if "masked SGD" in args.optimizers:
                    start = time.perf_counter()
                    w = masked_sgd(model, scheme, data[0], budget, seed, x)
                    rows.add(model="lenet5", scheme=sname, iterations=budget, seed=seed,
                             optimizer="masked SGD (baseline)", test_accuracy=evaluate(w, test_b, CE)[1],
                             seconds=time.perf_counter() - start)
                names = [n for n in args.optimizers if n != "masked SGD"]
                for name, opt in optimizers(budget, seed, names).items():
                    if name == "Direct" and (budget != args.budgets[0] or seed):
                        continue
                    compress_row(rows, name, opt, scheme, model, data, model="lenet5", scheme=sname, seed=seed,
                                 iterations=budget if name != "Direct" else 0)


def resnet_part(rows: Rows, data: tuple, args: argparse.Namespace) -> None:
    train, val, test = data
    model = baseline("resnet20", ResNet20, train, 3, 0.05, cosine=True)
    test_b = as_batches(test, 500)
    x = as_batches(test, 2).first(2)
    dense = tp_count(model, x)
    base = evaluate(model, test_b, CE)[1]
    scheme = StructurePrune(target_flops=0.5, **criteria_kw(args))
    rows.add(model="resnet20", scheme="dense", optimizer="baseline", test_accuracy=base, macs=dense, seed=0)
    budget = args.resnet_budget
    for seed in (range(args.seeds) if args.seed is None else [args.seed]):
        # The channel choice alone: ours thinned vs Torch-Pruning's, one identical plain fine-tune.
        ours = condensa.thin(model, scheme, x, output="graph")
        ours_macs = tp_count(ours, x)
        before = evaluate(ours, test_b, CE)[1]
        tuned = plain_train(copy.deepcopy(ours), train, budget, 0.01, seed, weight_decay=0.0)
        rows.add(model="resnet20", scheme="target_flops=0.5", optimizer=f"ours {scheme.criteria} + plain fine-tune",
                 seed=seed, iterations=budget, test_accuracy=evaluate(tuned, test_b, CE)[1], before_tuning=before,
                 macs=ours_macs, mac_fraction=ours_macs / dense)
        peer, peer_macs = tp_prune_to(model, x, ours_macs)
        before = evaluate(peer, test_b, CE)[1]
        tuned = plain_train(copy.deepcopy(peer), train, budget, 0.01, seed, weight_decay=0.0)
        rows.add(model="resnet20", scheme="target_flops=0.5", optimizer="torch-pruning L2 + plain fine-tune",
                 seed=seed, iterations=budget, test_accuracy=evaluate(tuned, test_b, CE)[1], before_tuning=before,
                 macs=peer_macs, mac_fraction=peer_macs / dense)
        # Our optimizers at the same budget, then thinned.
        for name, opt in optimizers(budget, seed, args.resnet_optimizers).items():
            if name == "Direct" and seed:
                continue
            w = compress_row(rows, name, opt, scheme, model, data, model="resnet20", scheme="target_flops=0.5",
                             seed=seed, iterations=budget if name != "Direct" else 0)
            small = condensa.thin(w.eval(), example_inputs=x, output="graph")
            lat = condensa.measure_latency(small, as_batches(test, BATCH).first(BATCH), warmup=1, repeat=3) \
                if seed == 0 else None
            m = tp_count(small, x)
            rows.add(model="resnet20", scheme="target_flops=0.5", optimizer=f"{name}, thinned", seed=seed,
                     iterations=budget if name != "Direct" else 0,
                     test_accuracy=evaluate(small, test_b, CE)[1], macs=m, mac_fraction=m / dense,
                     batch128_ms=None if lat is None else lat.median_ms)


def summary(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if "test_accuracy" in r:
            key = (r["model"], r["scheme"], r.get("iterations", ""), r["optimizer"])
            groups.setdefault(key, []).append(r["test_accuracy"])
    table = [[*k, f"{sum(v) / len(v):.2f}", len(v), " / ".join(f"{a:.1f}" for a in v)] for k, v in groups.items()]
    return tabulate(table, headers=["model", "scheme", "iterations", "optimizer", "test % (mean)", "runs", "each"])


def dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that several jobs computed alike (the baseline, Direct) once: equal but for their seconds."""
    seen, kept = set(), []
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def run_jobs(args: argparse.Namespace, argv: list[str], rows: Rows, data: tuple, start: float) -> int:
    """The same rows, each LeNet budget x scheme and each ResNet seed in a subprocess of this script."""
    import subprocess

    base = [a for a in argv if a != "--jobs"]
    for name, make, epochs, cos in (("lenet5", LeNet5, 10, False), ("resnet20", ResNet20, 3, True)):
        if name in args.parts:  # trained (and cached) once, before the jobs read it
            baseline(name, make, data[0], epochs, 0.05, cosine=cos)
    jobs = []
    if "lenet5" in args.parts:
        jobs += [["--parts", "lenet5", "--budgets", str(b), "--schemes", s] for b in args.budgets for s in args.schemes]
    if "resnet20" in args.parts:
        jobs += [["--parts", "resnet20", "--seed", str(seed)] for seed in range(args.seeds)]
    procs = []
    for i, job in enumerate(jobs):
        out = f"{args.out}.job{i}"
        procs.append((out, subprocess.Popen([sys.executable, __file__, *base, *job, "--out", out])))
    failed = [out for out, proc in procs if proc.wait() != 0]
    for out, _ in procs:
        if os.path.exists(out):
            with open(out) as f:
                rows.rows.extend(json.load(f)["rows"])
            os.remove(out)
    rows.rows = dedupe(rows.rows)
    rows.meta["jobs"] = [" ".join(j) for j in jobs]
    rows.add(model="all", scheme="", optimizer="(end of run)", seconds=time.perf_counter() - start)
    print("\n" + summary(rows.rows))
    print(f"\nrows: {args.out}; {time.perf_counter() - start:.0f} s" + (f"; FAILED jobs: {failed}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["lenet5", "resnet20"], choices=["lenet5", "resnet20"])
    p.add_argument("--budgets", nargs="+", type=int, default=[330, 2200], help="LeNet-5 SGD iterations")
    p.add_argument("--schemes", nargs="+", default=["MEM", "FLOP"], choices=["MEM", "FLOP"])
    choices = ["Direct", "FineTune", "Gradual", "LC tutorial", "LC defaults", "LC defaults 4 steps", "Distill",
               "masked SGD"]
    p.add_argument("--optimizers", nargs="+", default=choices, choices=choices)
    p.add_argument("--lenet-seeds", type=int, default=3, help="seeds of each LeNet-5 row")
    p.add_argument("--lenet-seed", type=int, default=None,
                   help="only this LeNet-5 seed (to add a seed to rows measured before)")
    p.add_argument("--resnet-budget", type=int, default=120, help="ResNet-20 fine-tune SGD iterations")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=None, help="only this ResNet seed (what --jobs gives each job)")
    p.add_argument("--resnet-optimizers", nargs="+", default=["Direct", "FineTune", "Gradual", "LC defaults"],
                   help="optimizers of the ResNet part (LC's tutorial schedule is left out: it is a LeNet row)")
    p.add_argument("--jobs", action="store_true", help="run each LeNet budget x scheme and each ResNet seed in its "
                   "own process, then merge the rows (wall time on a machine with idle cores)")
    p.add_argument("--criteria", default=None, help="channel criterion of StructurePrune (default: the scheme's own, "
                   f"{StructurePrune(0.5).criteria})")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = subsets(args.data_root)
    meta = {"command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "criteria": StructurePrune(0.5, **criteria_kw(args)).criteria}
    rows = Rows(args.out, meta)
    start = time.perf_counter()
    if args.jobs:
        return run_jobs(args, argv if argv is not None else sys.argv[1:], rows, data, start)
    if "lenet5" in args.parts:
        lenet_part(rows, data, args)
    if "resnet20" in args.parts:
        resnet_part(rows, data, args)
    print("\n" + summary(rows.rows))
    print(f"\nrows: {args.out}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

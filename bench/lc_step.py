"""An L-step iteration of fxcondensa's L-C against a plain SGD step: same model, same batches.

The L-step iteration is the real code path (``fxcondensa.opt.lc``: forward, backward, the penalty's
gradient and the momentum update as ``torch._foreach_*``); the plain step is ``torch.optim.SGD(foreach=True,
momentum, nesterov)``. Blocks of each alternate (so a busy machine slows both alike); the table shows the
median milliseconds per iteration and the ratio. Goal: at most 1.1x.

Usage:
    python bench/lc_step.py [--device cpu] [--iters 20] [--rounds 7] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import TensorDataset

from fxcondensa.models import LeNet5
from fxcondensa.opt import LC
from fxcondensa.opt.lc import _Run
from fxcondensa.opt.training import as_batches
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

HERE = os.path.dirname(os.path.abspath(__file__))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(name: str, model: nn.Module, scheme, batch: int, iters: int, rounds: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch * 8, 1, 28, 28, generator=g), torch.randint(0, 10, (batch * 8,), generator=g))
    train = as_batches(data, batch, device)
    criterion = nn.CrossEntropyLoss()
    lc = LC(steps=2, l_batch_size=batch, lr=0.01, lr_decay=0.98, momentum=0.95, sgd_iterations_per_l=iters,
            sgd_iterations_first_l=iters, mu_init=1e-3, mu_multiplier=1.1, mu_cap=1e4, val_batch_size=batch,
            device=device, progress=False)
    run = _Run(lc, model, scheme, train, None, None, criterion, train.first(2).cpu())
    run._c_step(0, 0.0, [])
    from fxcondensa.passes.annotate import annotations

    run.names = list(annotations(run.c))
    lam = [torch.randn_like(t) * 1e-3 for t in run._params(run.c)]

    plain = run.w  # the same traced model, trained by plain SGD in the other blocks
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.95, nesterov=True, foreach=True)

    def plain_block() -> None:
        stream = train.shuffled(torch.Generator().manual_seed(1))
        plain.train()
        for _ in range(iters):
            x, y = next(stream)
            loss = criterion(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def lc_block() -> None:
        run._l_step(2, 1e-3, lam)

    # Wall time, and the process's CPU time: on a shared machine the second is not inflated by the time
    # this process spends waiting for a core.
    times: dict[str, list[float]] = {"sgd": [], "lc": [], "sgd_cpu": [], "lc_cpu": []}
    for block in (plain_block, lc_block):  # warm-up
        block()
    for _ in range(rounds):
        for key, block in (("sgd", plain_block), ("lc", lc_block)):
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            block()
            sync(device)
            times[key].append((time.perf_counter() - t) / iters * 1000)
            times[key + "_cpu"].append((time.process_time() - c) / iters * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "batch": batch, "compressed_params": len(run.names), "sgd_ms": med["sgd"],
            "lc_ms": med["lc"], "ratio": med["lc"] / med["sgd"], "sgd_cpu_ms": med["sgd_cpu"],
            "lc_cpu_ms": med["lc_cpu"], "ratio_cpu": med["lc_cpu"] / med["sgd_cpu"],
            "all_ms": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=20, help="iterations per timed block")
    p.add_argument("--rounds", type=int, default=7, help="alternating blocks of each kind")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = [
        ("LeNet-5, MEM = Prune(0.007)+Quantize(fp16)", LeNet5(), Compose([Prune(0.007), Quantize(torch.float16)])),
        ("LeNet-5, FLOP = StructurePrune(0.3)", LeNet5(), StructurePrune(0.3)),
        ("MLP 784-300-100-10, Prune(0.05)", mlp(), Prune(0.05)),
    ]
    results = [bench_case(n, m, s, args.batch, args.iters, args.rounds, device) for n, m, s in cases]
    print(tabulate([[r["case"], r["batch"], f"{r['sgd_ms']:.2f}", f"{r['lc_ms']:.2f}", f"{r['ratio']:.3f}x",
                     f"{r['sgd_cpu_ms']:.2f}", f"{r['lc_cpu_ms']:.2f}", f"{r['ratio_cpu']:.3f}x"] for r in results],
                   headers=["model / scheme", "batch", "SGD ms", "L-step ms", "ratio (goal <= 1.1x)",
                            "SGD cpu ms", "L-step cpu ms", "cpu ratio"]))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", f"lc_step_{device.type}.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=1)
    print(f"written: {out}")


if __name__ == "__main__":
    main()

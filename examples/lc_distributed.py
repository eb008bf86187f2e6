"""Distributed L-C: prune LeNet-5 with the L step under DistributedDataParallel, one process per CPU core or GPU.

Launch (one machine, 2 processes; gloo on CPU, nccl with one GPU per process)::

    torchrun --nproc_per_node=2 examples/lc_distributed.py --data synthetic --steps 3

On several machines, the same script with torchrun's multi-node arguments (``--nnodes``, ``--node_rank``,
``--master_addr``, ``--master_port``): fxcondensa reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT itself. ``--l-batch-size`` is the *global* batch: each of the N processes trains on
``l_batch_size / N`` samples of it per SGD step. Rank 0 alone evaluates, logs, shows progress and writes
the checkpoint (``--checkpoint``; run the same command again to resume); every rank returns the same
compressed model. Run without torchrun (``python examples/lc_distributed.py ...``) for one process.

``--data fashion-mnist`` uses a local Fashion-MNIST copy (see ``fxcondensa.data.load_dataset``); the
default ``auto`` falls back to a synthetic 10-class problem of 28x28 images when none is found.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxcondensa as condensa
from fxcondensa.models import LeNet5
from fxcondensa.schemes import Prune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["auto", "fashion-mnist", "synthetic"], default="auto")
    p.add_argument("--data-root", default=None, help="folder holding Fashion-MNIST (else the usual places)")
    p.add_argument("--density", type=float, default=0.05, help="fraction of weights kept by Prune")
    p.add_argument("--steps", type=int, default=3, help="L-C iterations, iteration 0 included")
    p.add_argument("--l-batch-size", type=int, default=128, help="global batch, split evenly across ranks")
    p.add_argument("--sgd-first", type=int, default=100, help="SGD iterations of the first L step")
    p.add_argument("--sgd-per-l", type=int, default=50, help="SGD iterations of later L steps")
    p.add_argument("--baseline-steps", type=int, default=300, help="SGD steps training the dense baseline")
    p.add_argument("--checkpoint", default=None, help="L-C checkpoint path (written by rank 0; resumes)")
    p.add_argument("--out", default=None, help="save the compressed model's state_dict here (rank 0)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    return p.parse_args(argv)


def load_data(kind: str, root: str | None) -> tuple[TensorDataset | object, ...]:
    if kind in ("auto", "fashion-mnist"):
        from fxcondensa.data import load_dataset, split_train_val

        try:
            full = load_dataset("fashion-mnist", train=True, root=root, download=False)
            test = load_dataset("fashion-mnist", train=False, root=root, download=False)
            train, val = split_train_val(full, 6000, seed=0)
            return "Fashion-MNIST", train, val, test
        except FileNotFoundError:
            if kind == "fashion-mnist":
                raise
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    prototypes = torch.randn(10, 1, 28, 28, generator=g)  # one noisy template image per class
    y = torch.randint(0, 10, (6000,), generator=g)
    x = 0.5 * prototypes[y] + torch.randn(6000, 1, 28, 28, generator=g)
    return ("synthetic", TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:5000], y[4000:5000]),
            TensorDataset(x[5000:], y[5000:]))


def baseline(train, steps: int, device: torch.device) -> nn.Module:
    """A quickly trained dense LeNet-5 (the same seed on every rank; L-C starts from rank 0's anyway)."""
    torch.manual_seed(0)
    model = LeNet5().to(device)
    data = condensa.opt.training.as_batches(train, 128, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stream = data.shuffled(torch.Generator().manual_seed(0))
    for _ in range(steps):
        x, y = next(stream)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    lc = condensa.opt.LC(steps=args.steps, l_batch_size=args.l_batch_size, lr=0.02, lr_decay=0.98, momentum=0.95,
                         sgd_iterations_per_l=args.sgd_per_l, sgd_iterations_first_l=args.sgd_first,
                         mu_init=1e-3, mu_multiplier=2.0, mu_cap=1e4, val_batch_size=1000,
                         checkpoint=args.checkpoint, seed=0)
    device = lc.resolved_device  # cuda:LOCAL_RANK under torchrun on GPUs, else cpu
    name, train, val, test = load_data(args.data, args.data_root)
    t0 = time.perf_counter()
    model = baseline(train, args.baseline_steps, device)
    if rank == 0:
        print(f"{name} data, {world} process(es), global batch {args.l_batch_size} "
              f"({args.l_batch_size // max(world, 1)} per process), device {device}", flush=True)
    compressor = condensa.Compressor(lc, Prune(args.density), model, train, test, val, nn.CrossEntropyLoss())
    w = compressor.run()
    s = compressor.statistics
    if rank == 0:
        print(f"test accuracy {s['test_accuracy_before']:.2f}% dense -> {s['test_accuracy_after']:.2f}% at density "
              f"{s['density']:.3f} (best L-C iteration {s['best_iteration']}), {time.perf_counter() - t0:.1f} s")
        if args.out:
            torch.save(w.state_dict(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Distributed L-C on 2 CPU processes (gloo, loopback only) against a single-process run.

The test starts this file twice as a script with the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT), so the library initialises the process group itself,
exactly as under ``torchrun --nproc_per_node=2``. Each rank runs, in one process:

1. ``full``: an uninterrupted L-C run (process group initialised by fxcondensa from the environment);
2. ``cut``: the same run, stopped on every rank when iteration 2 begins its checks (the checkpoint then
   holds iterations 0-1), in a process group the script initialised itself;
3. ``resumed``: the same arguments again, which resumes from rank 0's checkpoint;
4. ``bn``: a BatchNorm model (each rank normalises with its own half-batch, so it is compared between
   ranks only, not with one process).

Tolerance against the single-process run: the only difference is float32 summation order. One process
averages the 64 per-sample gradients in one reduction; two ranks each average 32 and gloo sums the two
halves before DDP divides by 2. Those roundings differ by about 1e-7 relative per step and grow slowly over
the 60 SGD steps; ``RTOL``/``ATOL`` below are about 100x the difference observed, far below any change an
actual bug (a wrong batch split, a missing all-reduce, a different C step) makes, which is of the order
of the weights themselves. Between ranks, and between an interrupted-and-resumed run and an uninterrupted
one, the results must be bitwise equal.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxcondensa as condensa
from fxcondensa.opt import LC
from fxcondensa.schemes import Prune

RTOL, ATOL = 1e-4, 1e-5
STEPS = 4
WORLD = 2


def problem() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    return TensorDataset(x[:768], y[:768]), TensorDataset(x[768:896], y[768:896]), TensorDataset(x[896:], y[896:])


def model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [nn.ReLU(), nn.Linear(32, 4)]
    net = nn.Sequential(*layers)
    x, y = problem()[0].tensors
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for i in range(60):
        idx = torch.arange(i * 64, i * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def compress(checkpoint: str | None, batchnorm: bool = False) -> tuple[nn.Module, dict]:
    lc = LC(steps=STEPS, l_batch_size=64, lr=0.05, lr_decay=0.98, momentum=0.9, sgd_iterations_per_l=15,
            sgd_iterations_first_l=20, mu_init=1e-2, mu_multiplier=2.0, mu_cap=1e4, val_batch_size=128,
            device="cpu", seed=3, checkpoint=checkpoint, progress=False)
    train, val, test = problem()
    c = condensa.Compressor(lc, Prune(0.3), model(batchnorm), train, test, val, nn.CrossEntropyLoss())
    result = c.run()
    return result, c.statistics


def _summary(result: nn.Module, stats: dict) -> dict:
    return {"state": {k: v.detach().clone() for k, v in result.state_dict().items()},
            "history": stats["history"], "best_iteration": stats["best_iteration"],
            "val_accuracy_after": stats["val_accuracy_after"]}


class _Cut(Exception):
    pass


def _worker(folder: str, port2: int) -> None:
    """One rank (run as a script by the test)."""
    import torch.distributed as dist

    from fxcondensa.opt import lc as lc_module

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out: dict = {}
    # 1. fxcondensa initialises the group from torchrun's variables, and destroys it afterwards.
    out["full"] = _summary(*compress(os.path.join(folder, f"full_{rank}.ckpt")))
    assert not dist.is_initialized()
    # 2-3. A group the caller initialised (left alone by fxcondensa); a run cut at iteration 2, then resumed.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port2}", rank=rank, world_size=WORLD)
    agree = lc_module._Run._agree

    def cut(self, j, lam):
        if j == 2:
            raise _Cut
        return agree(self, j, lam)

    lc_module._Run._agree = cut
    try:
        compress(os.path.join(folder, f"cut_{rank}.ckpt"))
        raise AssertionError("the run was not cut")
    except _Cut:
        pass
    finally:
        lc_module._Run._agree = agree
    ckpt = torch.load(os.path.join(folder, "cut_0.ckpt"), weights_only=True) if rank == 0 else None
    out["cut_next_iteration"] = None if ckpt is None else ckpt["next_iteration"]
    out["resumed"] = _summary(*compress(os.path.join(folder, f"cut_{rank}.ckpt")))
    out["bn"] = _summary(*compress(None, batchnorm=True))
    dist.destroy_process_group()
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: str) -> None:
    port, port2 = _free_port(), _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), folder, str(port2)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-4000:]}"


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        if tol:
            torch.testing.assert_close(a["state"][k], b["state"][k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a["state"][k], b["state"][k]), k


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lc_dist"))
    _launch(folder)
    return folder, [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_matches_single_process(ranks, tmp_path):
    _, (r0, _r1) = ranks
    torch.set_num_threads(1)
    single = _summary(*compress(str(tmp_path / "single.ckpt")))
    _assert_same(r0["full"], single, rtol=RTOL, atol=ATOL)
    # Same pruned set: every zero of the one-process result is a zero of the distributed one.
    for k, v in single["state"].items():
        assert torch.equal(v == 0, r0["full"]["state"][k] == 0), k
    assert r0["full"]["best_iteration"] == single["best_iteration"]
    assert len(r0["full"]["history"]) == len(single["history"]) == STEPS
    for a, b in zip(r0["full"]["history"], single["history"], strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        if b["l_loss"] is not None:  # the mean over the global batches, all-reduced
            assert a["l_loss"] == pytest.approx(b["l_loss"], rel=1e-4)


def test_every_rank_returns_the_same_model_and_statistics(ranks):
    _, (r0, r1) = ranks
    for run in ("full", "resumed", "bn"):
        _assert_same(r0[run], r1[run])
        assert r0[run]["history"] == r1[run]["history"]  # rank 0's numbers, broadcast
        assert r0[run]["best_iteration"] == r1[run]["best_iteration"]


def test_only_rank_0_writes_checkpoints(ranks):
    folder, _ = ranks
    assert os.path.exists(os.path.join(folder, "full_0.ckpt"))
    assert os.path.exists(os.path.join(folder, "cut_0.ckpt"))
    assert not os.path.exists(os.path.join(folder, "full_1.ckpt"))
    assert not os.path.exists(os.path.join(folder, "cut_1.ckpt"))
    state = torch.load(os.path.join(folder, "full_0.ckpt"), weights_only=True)
    assert state["world_size"] == WORLD and state["next_iteration"] == STEPS


def test_resume_from_rank_0_checkpoint_equals_uninterrupted(ranks):
    _, (r0, r1) = ranks
    assert r0["cut_next_iteration"] == 2  # iterations 0 and 1 done when the run was cut
    _assert_same(r0["resumed"], r0["full"])
    history = [{k: v for k, v in e.items() if k != "elapsed"} for e in r0["resumed"]["history"]]
    assert history == [{k: v for k, v in e.items() if k != "elapsed"} for e in r0["full"]["history"]]


@pytest.mark.parametrize("loader", [False, True])
def test_ranks_split_each_global_batch_like_distributed_sampler(loader):
    from fxcondensa.opt.training import LoaderBatches, TensorBatches

    x, y = torch.arange(100.0).unsqueeze(1), torch.arange(100)
    if loader:  # a dataset that is not held as tensors goes through a DataLoader with a batch sampler
        def make():
            return LoaderBatches(None, "cpu", dataset=[(x[i], y[i]) for i in range(100)], batch_size=12)
    else:
        def make():
            return TensorBatches(x, y, batch_size=12)
    one = make().shuffled(torch.Generator().manual_seed(5))
    shards = [make().shuffled(torch.Generator().manual_seed(5), rank=r, world_size=3) for r in range(3)]
    for _ in range(20):  # past an epoch boundary (8 global batches per epoch)
        _, whole = next(one)
        parts = [next(s)[1] for s in shards]
        assert [len(p) for p in parts] == [4, 4, 4]
        for r, part in enumerate(parts):  # DistributedSampler's strided split of the global batch
            assert torch.equal(part, whole[r::3])


def test_batch_not_divisible_by_ranks_is_refused(monkeypatch):
    lc = LC(steps=1, l_batch_size=63, lr=0.05, lr_decay=0.98, momentum=0.9, sgd_iterations_per_l=1,
            sgd_iterations_first_l=1, mu_init=1e-2, mu_multiplier=2.0, mu_cap=1e4, val_batch_size=128, device="cpu")
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr("torch.distributed.get_rank", lambda *a, **k: 0)
    monkeypatch.setattr("torch.distributed.get_backend", lambda *a, **k: "gloo")
    train, val, _ = problem()
    with pytest.raises(ValueError, match="l_batch_size is the global batch.*63 is not a multiple of the 2 ranks"):
        lc.compress(copy.deepcopy(model()), Prune(0.3), condensa.opt.training.as_batches(train, 63), None, None,
                    nn.CrossEntropyLoss(), train.tensors[0][:2])


def test_incomplete_torchrun_environment_is_refused(monkeypatch):
    from fxcondensa.opt.distributed import process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT are not set; launch with torchrun"), \
            process_group(torch.device("cpu")):
        pass


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))

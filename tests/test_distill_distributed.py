"""Distill with its teacher sharded by FSDP2 on 2 CPU processes (gloo, loopback only) against one process.

The test starts this file twice as a script with the variables torchrun sets (as tests/test_lc_distributed.py
does), each rank runs ``Distill(shard_teacher=True)``: the student trains under DistributedDataParallel, the
teacher is split across the two ranks by ``fully_shard`` and gathered layer by layer in its forward. The
gathered teacher computes exactly what the whole one does, so the only difference from one process is the
float32 summation order of the averaged gradients (see tests/test_lc_distributed.py for the tolerance).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxcondensa as condensa
from fxcondensa.opt import Distill
from fxcondensa.opt import distill as distill_module
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
WORLD = 2


def problem() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    return TensorDataset(x, (x @ torch.randn(16, 4, generator=g)).argmax(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def run() -> dict:
    kd = Distill(iterations=12, evaluations=2, l_batch_size=64, lr=0.05, temperature=2.0, device="cpu", seed=1,
                 shard_teacher=True, progress=False)
    data = problem()
    result = condensa.Compressor(kd, StructurePrune(0.5), model(), data, data, data, nn.CrossEntropyLoss()).run()
    return {k: v.detach().clone() for k, v in result.state_dict().items()}


def _worker(folder: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen: dict = {}
    real = distill_module.shard

    def spy(module: nn.Module) -> bool:
        done = real(module)
        seen["sharded"] = done
        seen["local_rows"] = {n: tuple(p.to_local().shape) for n, p in module.named_parameters()}
        return done

    distill_module.shard = spy
    state = run()
    torch.save({"state": state, **seen}, os.path.join(folder, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("distill_dist"))
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), folder], env=env,
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
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_each_rank_holds_half_of_the_teacher(ranks):
    dense = dict(model().named_parameters())
    for r in ranks:
        assert r["sharded"] is True
        for name, shape in r["local_rows"].items():
            full = dense[name.replace("_", ".", 1)] if name not in dense else dense[name]
            assert shape[0] == (full.shape[0] + WORLD - 1) // WORLD, name


def test_sharded_teacher_matches_one_process(ranks):
    torch.set_num_threads(1)
    single = run()  # one process: shard_teacher does nothing
    for r in ranks:
        assert r["state"].keys() == single.keys()
        for k, v in single.items():
            torch.testing.assert_close(r["state"][k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
            assert torch.equal(v == 0, r["state"][k] == 0), k
    for k in single:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k


def test_shard_teacher_must_be_a_bool():
    with pytest.raises(TypeError, match="Distill: shard_teacher must be True or False, got 'yes'"):
        Distill(shard_teacher="yes")


if __name__ == "__main__":
    _worker(sys.argv[1])

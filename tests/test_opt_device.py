"""Device placement of the optimizers' own tensors, checked on a CPU-only machine with fake CUDA tensors.

``FakeTensorMode(allow_non_fake_inputs=True)`` makes tensors that claim ``device="cuda"`` without a GPU;
it raises on most CPU/CUDA mixes, but not inside ``torch._foreach_*`` kernels, which the L step is made
of. ``SameDevice`` closes that gap: it sees every ATen call and raises when the tensor arguments of one
call live on different devices (0-d CPU tensors excepted, as torch allows them). Backward does not run on
fake CUDA tensors without a driver, so the L step is tested from its update (gradients given) on.
"""

from __future__ import annotations

import pytest
import torch
from test_lc import tiny_model, tiny_problem
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxcondensa as condensa
from fxcondensa.opt import distributed as dist_lc
from fxcondensa.opt.engine import _Run, keep_masks, l_update, multiplier_update
from fxcondensa.opt.training import as_batches

CUDA = torch.device("cuda")


class SameDevice(TorchDispatchMode):
    """Raise on any ATen call whose tensor arguments are on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs or {}))
                   if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


def fake_cuda():
    """(fake mode, device check) to enter together: inside, torch.randn(..., device=CUDA) is a fake CUDA tensor."""
    return FakeTensorMode(allow_non_fake_inputs=True), SameDevice()


def test_the_device_check_catches_a_foreach_mix():
    fake, check = fake_cuda()
    with fake, check:
        a = torch.randn(3, device=CUDA)
        with pytest.raises(AssertionError, match="mixes devices"):
            torch._foreach_mul_([a], [torch.ones(3)])  # a CPU mask on CUDA weights


@pytest.mark.parametrize("masked", [False, True])
def test_l_update_stays_on_the_weights_device(masked):
    fake, check = fake_cuda()
    with fake, check:
        params = [torch.randn(8, 4, device=CUDA), torch.randn(8, device=CUDA), torch.randn(3, 8, device=CUDA)]
        grads = [torch.randn_like(p) for p in params]
        velocity = [torch.zeros_like(p) for p in params]
        theta = [torch.randn(8, 4, device=CUDA), torch.randn(3, 8, device=CUDA)]
        lam = [torch.zeros_like(t) for t in theta]
        masks = keep_masks(theta) if masked else []
        assert all(m.device.type == "cuda" and m.dtype == torch.float32 for m in masks)
        l_update(params, grads, velocity, [0, 2], theta, lam, masks, mu=0.0 if masked else 0.1, lr=0.01,
                 momentum=0.9, weight_decay=1e-4)
        multiplier_update(lam, theta, [params[0], params[2]], 0.1)
        assert {t.device.type for t in params + velocity + lam} == {"cuda"}


class _Threshold:
    """A scheme fake tensors can run (no data-dependent control flow): zero entries under 0.1 in magnitude."""

    @torch.no_grad()
    def pi(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.mul_((p.abs() > 0.1).to(p.dtype))

    def delta(self, module: nn.Module) -> None:
        pass


@pytest.mark.parametrize("opt", ["lc", "finetune"])
def test_c_step_and_restart_on_fake_cuda_weights(opt):
    train, _, _ = tiny_problem()
    x = train.tensors[0]
    plan = (condensa.opt.LC(steps=3, sgd_iterations_first_l=2, sgd_iterations_per_l=2, device="cpu")
            if opt == "lc" else condensa.opt.FineTune(iterations=4, evaluations=2, device="cpu"))
    run = _Run(plan, tiny_model(batchnorm=True), _Threshold(), as_batches(train, 64), None, None,
               nn.CrossEntropyLoss(), x[:2])
    run._c_step(0, 0.0, [])  # iteration 0 on the CPU: which parameters are compressed
    run.names = ["0.weight", "3.weight"]
    fake, check = fake_cuda()
    with fake:
        run.w, run.c, run.device = run.w.to(CUDA), run.c.to(CUDA), CUDA
        with check:
            lam = [torch.zeros_like(t) for t in run._params(run.c)]
            run._c_step(1, 0.5, lam)
            run._sync_rest_to_w()  # what a masked or restarted L step does first
            masks = keep_masks(run._params(run.c))
            multiplier_update(lam, run._params(run.c), run._params(run.w), 0.5)
    assert {t.device.type for t in [*run.w.state_dict().values(), *run.c.state_dict().values(), *lam, *masks]} \
        == {"cuda"}


def test_flattened_broadcast_is_one_call_per_device_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr("torch.distributed.broadcast", lambda t, src: calls.append((t.dtype, t.numel())))
    tensors = [torch.ones(3), torch.ones(2, 2), torch.zeros((), dtype=torch.int64), torch.ones(1),
               torch.zeros(4, dtype=torch.int64)]
    dist_lc.broadcast_tensors(tensors)
    assert calls == [(torch.float32, 8), (torch.int64, 5)]


def test_unflatten_puts_each_slice_back():
    bucket = [torch.zeros(2, 2), torch.zeros(3)]
    dist_lc.unflatten_into(torch.arange(7.0), bucket)
    assert torch.equal(bucket[0], torch.tensor([[0.0, 1.0], [2.0, 3.0]])) and torch.equal(bucket[1], torch.tensor([4.0, 5, 6]))


def test_flattened_buckets_on_fake_cuda_stay_on_their_device(monkeypatch):
    monkeypatch.setattr("torch.distributed.broadcast", lambda t, src: None)
    fake, check = fake_cuda()
    with fake, check:
        tensors = [torch.ones(3, device=CUDA), torch.ones(2, device=CUDA), torch.ones(2)]
        buckets = dist_lc.flat_buckets(tensors)
        assert [[t.device.type for t in b] for b in buckets] == [["cuda", "cuda"], ["cpu"]]
        dist_lc.broadcast_tensors(tensors)


class CopyFlags(TorchDispatchMode):
    """Record the ``non_blocking`` flag of every device copy."""

    def __init__(self):
        super().__init__()
        self.flags: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.flags.append(bool((kwargs or {}).get("non_blocking", False)))
        return func(*args, **(kwargs or {}))


def test_batches_from_pageable_memory_are_copied_blocking():
    """Regression (issue 15): ``non_blocking=True`` was passed for every batch; from pageable memory the
    copy is synchronous anyway, and the flag only hides where the time goes."""
    from fxcondensa.opt.training import LoaderBatches

    fake, flags = FakeTensorMode(allow_non_fake_inputs=True), CopyFlags()
    batches = LoaderBatches(None, "cpu", dataset=None)
    batches.device = CUDA
    with fake, flags:
        x, y = batches._move((torch.randn(4, 16), torch.zeros(4, dtype=torch.int64)))
    assert x.device.type == y.device.type == "cuda" and flags.flags == [False, False]


@pytest.mark.parametrize("pinned", [False, True])
def test_non_blocking_only_from_pinned_memory(monkeypatch, pinned):
    from fxcondensa.opt import training

    seen = []
    t = torch.ones(2)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: pinned)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: seen.append(non_blocking) or self)
    training._to(t, CUDA)
    assert seen == [pinned]


def test_loader_batches_prefetch_one_batch_on_cuda(monkeypatch):
    from fxcondensa.opt.training import LoaderBatches

    moved: list[int] = []
    batches = LoaderBatches(None, "cpu", dataset=None)
    batches.device = CUDA  # only the order of copies is checked: _move is replaced
    monkeypatch.setattr(batches, "_move", lambda b: moved.append(b) or b)
    stream = batches._moved(iter([1, 2, 3]))
    assert next(stream) == 1 and moved == [1, 2]  # batch 2's copy is issued before batch 1 is used
    assert list(stream) == [2, 3] and moved == [1, 2, 3]


# -- on a real GPU (tests/conftest.py skips these where torch.cuda.is_available() is False) ------------------

def _images(n: int = 256):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


class _Items(torch.utils.data.Dataset):
    """A plain map-style dataset: goes through a DataLoader (pinned, one batch prefetched) on CUDA."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


@pytest.mark.cuda
def test_two_lc_iterations_with_structureprune_on_cuda():
    data = _images()
    lc = condensa.opt.LC(steps=3, l_batch_size=64, sgd_iterations_first_l=6, sgd_iterations_per_l=4,
                         val_batch_size=128, device="cuda", progress=False, autocast="bfloat16", tf32=True)
    c = condensa.Compressor(lc, condensa.schemes.StructurePrune(0.5), condensa.models.LeNet5(), _Items(data), data,
                            data, nn.CrossEntropyLoss())
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    w = c.run()
    s = c.statistics
    assert torch.backends.cuda.matmul.allow_tf32 == tf32_before  # TF32 only inside the L step
    assert {t.device.type for t in w.state_dict().values()} == {"cuda"}
    assert [h["iteration"] for h in s["history"]] == [0, 1, 2] and all(h["l_loss"] is None or h["l_loss"] > 0
                                                                       for h in s["history"])
    assert s["optimizer_config"]["autocast"] == "bfloat16" and s["optimizer_config"]["tf32"] is True
    x = data.tensors[0][:8].cuda()
    small = condensa.thin(w.eval(), example_inputs=x)  # checks small == w on x
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in w.parameters())


@pytest.mark.cuda
def test_finetune_on_cuda_keeps_the_masks():
    data = _images()
    scheme = condensa.schemes.Compose([condensa.schemes.Prune(0.1), condensa.schemes.Quantize(condensa.float16)])
    model = condensa.models.LeNet5()
    direct = condensa.compress(model, scheme, data.tensors[0][:2])
    ft = condensa.opt.FineTune(iterations=8, evaluations=2, l_batch_size=64, device="cuda", progress=False)
    w = condensa.Compressor(ft, scheme, model, data, data, None, nn.CrossEntropyLoss()).run()
    for name, p in direct.named_parameters():
        q = w.get_parameter(name)
        assert q.device.type == "cuda"
        if name.endswith("weight"):
            assert torch.equal(p == 0, q.cpu() == 0) and torch.equal(q, q.half().float())

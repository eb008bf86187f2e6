"""Distributed L-C under ``torchrun``: find the process group, and the few collectives the L-C loop needs.

A run is distributed when a process group of more than one rank is already initialised, or when
``torchrun`` (single- or multi-node) has set ``WORLD_SIZE > 1`` with ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``: then the group is initialised from those variables (``gloo`` on
CPU, ``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``) and destroyed when the call that created it
returns. Without either, nothing here runs and no process group is needed.

How the work is split (see ``LC``): every rank draws the same global batch of ``l_batch_size`` samples
from the same per-iteration seed, and keeps every ``world_size``-th sample starting at its rank (the
split ``DistributedSampler`` makes); DistributedDataParallel averages the gradients, which is the
gradient of the global batch's mean loss. The C step and the multiplier update run on every rank on
identical inputs and are checked to agree bit for bit; rank 0 alone evaluates, logs and checkpoints,
and the other ranks receive its results.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Group", "process_group", "world_size_from_env", "local_device", "broadcast_object",
           "broadcast_tensors", "flat_buckets", "unflatten_into", "check_identical", "quiet_followers"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """The default process group as L-C uses it."""

    rank: int
    world_size: int
    backend: str
    device: torch.device  # where object collectives stage their bytes (the rank's GPU under nccl)

    @property
    def lead(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """The number of ranks the launcher asked for: the live group's size, else ``WORLD_SIZE`` (1 if unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_device(device: torch.device) -> torch.device:
    """Under a multi-rank launch, ``cuda`` without an index means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and world_size_from_env() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Group | None]:
    """The live default group (initialised from torchrun's variables if need be), or None for one process."""
    if not dist.is_available() or world_size_from_env() <= 1:
        yield None
        return
    owned = False
    if not dist.is_initialized():
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a distributed run, but "
                               f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch "
                               "with torchrun (which sets them), or unset WORLD_SIZE for a single process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
        owned = True
    try:
        backend = str(dist.get_backend())
        staging = device if (backend == "nccl" and device.type == "cuda") else torch.device("cpu")
        yield Group(dist.get_rank(), dist.get_world_size(), backend, staging)
    finally:
        if owned:
            dist.destroy_process_group()


def broadcast_object(group: Group, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small plain data: metrics, history entries, a checkpoint's state)."""
    box = [obj if group.lead else None]
    dist.broadcast_object_list(box, src=0, device=group.device)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's, in place (same order and shapes on every rank).

    One broadcast per (device, dtype): the tensors are flattened into one buffer (made on their device),
    not sent one by one (a model's BatchNorm buffers are dozens of tiny tensors; each call has a latency).
    """
    for bucket in flat_buckets(tensors):
        if len(bucket) == 1:
            dist.broadcast(bucket[0], src=0)
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=0)
        unflatten_into(flat, bucket)


def flat_buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), in first-seen order (the same on every rank)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, bucket: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into the tensors of ``bucket``, in place."""
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of a tensor's exact bits (a plain and a position-weighted sum)."""
    t = t.detach().contiguous().reshape(-1)
    if t.is_floating_point() or t.is_complex():
        t = t.view(_BITS[t.element_size()])
    bits = t.to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65_521 + 1
    return torch.stack([bits.sum(), (bits * weights).sum()])  # int64 arithmetic wraps the same on every rank


@torch.no_grad()
def check_identical(group: Group, named: Sequence[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise on every rank if any tensor differs in a single bit between ranks (one small all-reduce)."""
    if not named:
        return
    prints = torch.stack([_fingerprint(t) for _, t in named]).to(group.device)
    both = torch.cat([prints, -prints])  # max of both halves: the largest and (negated) smallest value
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[:len(named)], -both[len(named):]
    differ = [name for (name, _), same in zip(named, (high == low).all(dim=1).tolist(), strict=True) if not same]
    if differ:
        raise RuntimeError(f"distributed L-C: {what} differs between ranks in {', '.join(differ)}. Every rank "
                           "must compute the same C step: use the same model, scheme, data and fxcondensa "
                           "version on every rank, and a scheme whose pi is deterministic")


class _DropBelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_followers(group: Group | None, name: str = "fxcondensa") -> Iterator[None]:
    """On ranks other than 0, silence the library's logger below ERROR: rank 0 speaks for the run."""
    if group is None or group.lead:
        yield
        return
    logger, quiet = logging.getLogger(name), _DropBelowError()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)

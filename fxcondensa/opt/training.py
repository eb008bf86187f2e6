"""Batches, evaluation and BatchNorm recalibration shared by the optimizers and the Compressor.

Small datasets (MNIST-sized ones and ``TensorDataset`` s) are held as two tensors on the device and
batched by indexing: no DataLoader, no workers, no per-item Python. Anything else goes through a
``DataLoader`` (the user's own, when one is given, used as it is). On CUDA, the loaders made here pin
their batches, copies are asynchronous (``non_blocking``) only from pinned memory, and the next batch's
copy is issued before the current batch is handed out (one batch of prefetch).

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from fxcondensa.opt.training import as_batches, evaluate
    >>> data = as_batches(TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))), batch_size=4)
    >>> [len(y) for _, y in data.ordered()]
    [4, 4, 2]
    >>> loss, accuracy = evaluate(torch.nn.Linear(4, 3), data, torch.nn.CrossEntropyLoss())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset, TensorDataset

from ..capture.graph import logits_of
from ..capture.modes import eval_mode

__all__ = [
    "Batches",
    "TensorBatches",
    "LoaderBatches",
    "as_batches",
    "evaluate",
    "recalibrate_bn",
    "has_batchnorm",
    "logits_of",
]

Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """A source of ``(inputs, targets)`` batches on one device."""

    device: torch.device

    def __len__(self) -> int:  # number of samples
        raise NotImplementedError

    def ordered(self) -> Iterator[Batch]:
        """Every sample once, in order (evaluation)."""
        raise NotImplementedError

    def shuffled(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """An endless stream of training batches; the order depends only on ``generator``.

        With ``world_size > 1`` (distributed L-C), every rank draws the same global batches and keeps
        the samples ``rank, rank + world_size, ...`` of each (``DistributedSampler``'s split).
        """
        raise NotImplementedError

    def first(self, n: int) -> torch.Tensor:
        """The inputs of the first ``n`` samples: example inputs for tracing."""
        x, _ = next(iter(self.ordered()))
        return x[:n]


class TensorBatches(Batches):
    """Samples held as two tensors on the device; batches are index gathers."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, device: Any = None):
        if len(inputs) != len(targets):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}")
        if len(inputs) == 0:
            raise ValueError("the dataset is empty; give at least one sample")
        self.device = torch.device(device) if device is not None else inputs.device
        self.inputs = inputs.to(self.device)
        self.targets = targets.to(self.device)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return len(self.inputs)

    def ordered(self) -> Iterator[Batch]:
        for i in range(0, len(self), self.batch_size):
            yield self.inputs[i:i + self.batch_size], self.targets[i:i + self.batch_size]

    def shuffled(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        n, b = len(self), _global_batch(self.batch_size, len(self), world_size)
        while True:
            # The permutation is drawn on the CPU generator (device generators differ across devices);
            # the incomplete last batch of each epoch is dropped so every step sees a full batch.
            perm = torch.randperm(n, generator=generator).to(self.device)
            for i in range(0, n - b + 1, b):
                idx = perm[i:i + b] if world_size == 1 else perm[i + rank:i + b:world_size]
                yield self.inputs[idx], self.targets[idx]


class LoaderBatches(Batches):
    """A DataLoader's batches moved to the device. A user's loader is used as given (its own order)."""

    def __init__(self, loader: DataLoader | None, device: Any, dataset: Dataset | None = None,
                 batch_size: int = 256):
        self.loader, self.dataset, self.batch_size = loader, dataset, int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.loader.dataset if self.loader is not None else self.dataset)  # type: ignore[arg-type]

    @property
    def _pin(self) -> bool:
        """Pin the loaders made here when batches go to a GPU (page-locked memory: asynchronous copies)."""
        return self.device.type == "cuda"

    def _move(self, batch: Any) -> Batch:
        return _to(batch[0], self.device), _to(batch[1], self.device)

    def _moved(self, loader: Any) -> Iterator[Batch]:
        """The loader's batches on the device. On CUDA, batch i+1's copy is issued before batch i is yielded,
        so it overlaps the step that uses batch i (asynchronous when the loader pins its memory)."""
        if self.device.type != "cuda":
            for batch in loader:
                yield self._move(batch)
            return
        ahead: Batch | None = None
        for batch in loader:
            moved = self._move(batch)
            if ahead is not None:
                yield ahead
            ahead = moved
        if ahead is not None:
            yield ahead

    def ordered(self) -> Iterator[Batch]:
        loader = self.loader or DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,  # type: ignore[arg-type]
                                           pin_memory=self._pin)
        yield from self._moved(loader)

    def shuffled(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        if self.loader is not None:
            # Its sampler draws from the global RNG, which the caller seeds. Under distributed L-C a
            # user's loader is used as given on each rank: it should hold that rank's share (e.g. a
            # DistributedSampler, whose epoch is advanced here) and its batches are that rank's part.
            loader = self.loader
        elif world_size > 1:
            # The one-process loader below, each of its batches cut into per-rank parts: the same samplers
            # drawing from the same generator, so the ranks together see the same global batches.
            b = _global_batch(self.batch_size, len(self.dataset), world_size)  # type: ignore[arg-type]
            batches = BatchSampler(RandomSampler(self.dataset, generator=generator), b, drop_last=True)  # type: ignore[arg-type]
            loader = DataLoader(self.dataset, batch_sampler=_ShardedBatches(batches, rank, world_size),  # type: ignore[arg-type]
                                generator=generator, pin_memory=self._pin)
        else:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,  # type: ignore[arg-type]
                                drop_last=len(self.dataset) >= self.batch_size, generator=generator,  # type: ignore[arg-type]
                                pin_memory=self._pin)
        epoch = 0
        while True:
            empty = True
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if world_size > 1 and callable(set_epoch):
                set_epoch(int(torch.randint(2**31 - 1, (), generator=generator)) + epoch)
            epoch += 1
            for batch in self._moved(loader):
                empty = False
                yield batch
            if empty:
                raise ValueError("the training data yielded no batch; give a non-empty dataset")


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; asynchronous only from pinned memory (from pageable memory ``non_blocking`` buys
    nothing and leaves the copy's source unprotected)."""
    return t.to(device, non_blocking=t.device.type == "cpu" and device.type == "cuda" and t.is_pinned())


def _global_batch(batch_size: int, n: int, world_size: int) -> int:
    """The global batch: ``batch_size`` (at most ``n``), a multiple of ``world_size`` so ranks share it evenly."""
    b = min(batch_size, n)
    b -= b % world_size
    if b == 0:
        raise ValueError(f"the training set has {n} samples, too few for a batch of at least one sample on each "
                         f"of {world_size} ranks")
    return b


class _ShardedBatches(Sampler[list[int]]):
    """This rank's part (every ``world_size``-th index from ``rank``) of each batch of ``batches``."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank::self.world_size]


def _tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dataset as (inputs, targets) tensors when that is cheap and exact, else None."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        if isinstance(dataset, TensorDataset):
            return dataset.tensors[0], dataset.tensors[1]
        idx = _subset_indices(dataset)
        return base.tensors[0][idx], base.tensors[1][idx]
    from ..data import _as_tensors_fast  # MNIST-like datasets with a ToTensor/Normalize transform

    return _as_tensors_fast(dataset)


def _subset_indices(dataset: Dataset) -> torch.Tensor:
    indices: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        own = torch.as_tensor(dataset.indices, dtype=torch.int64)
        indices = own if indices is None else own[indices]
        dataset = dataset.dataset
    assert indices is not None
    return indices


def as_batches(data: Any, batch_size: int, device: Any = None) -> Batches:
    """Wrap a dataset or DataLoader as :class:`Batches` on ``device`` (CPU when None).

    MNIST-like datasets (as :func:`fxcondensa.data.load_dataset` returns, and Subsets of them) and
    TensorDatasets are held as tensors on the device; a DataLoader is used as given (its batch size);
    any other dataset is read through a DataLoader of ``batch_size`` without workers.
    """
    if isinstance(data, Batches):
        return data
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(data, DataLoader):
        return LoaderBatches(data, device)
    if isinstance(data, Dataset):
        tensors = _tensors_of(data)
        if tensors is not None:
            return TensorBatches(tensors[0], tensors[1], batch_size, device)
        return LoaderBatches(None, device, dataset=data, batch_size=batch_size)
    raise TypeError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}; "
                    "wrap tensors as torch.utils.data.TensorDataset(inputs, targets)")


def _predictions(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Predicted classes: over the last dim where the targets are the logits less their last dim (a causal LM's
    (batch, tokens, vocab) against (batch, tokens)), else over dim 1 (a classifier, a segmentation map)."""
    logits = logits_of(out)
    if logits.dim() == y.dim() + 1 and logits.shape[:-1] == y.shape:
        return logits.argmax(dim=-1)
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, criterion: Callable[..., torch.Tensor]) -> tuple[float, float]:
    """``(mean loss, top-1 accuracy in percent)`` of ``model`` in eval mode over every sample.

    The model's training flag is restored afterwards. The loss is weighted by batch size, so it is the
    mean over samples for a criterion with ``reduction="mean"``.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.device)
    n = predicted = 0
    with eval_mode(model):
        for x, y in batches.ordered():
            out = model(x)
            # Sums stay on the device: one synchronisation at the end, not one per batch.
            loss_sum += criterion(out, y).double() * len(y)
            correct += (_predictions(out, y) == y).sum()
            n += len(y)
            predicted += y.numel()  # a token (or pixel) is one prediction
    if n == 0:
        raise ValueError("evaluation data is empty")
    return float(loss_sum) / n, 100.0 * float(correct) / predicted


_BN = nn.modules.batchnorm._BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, stream: Iterator[Batch], n_batches: int) -> None:
    """Recompute BatchNorm running statistics from ``n_batches`` batches of ``stream``.

    Compression moves the activations, so the running statistics recorded for the dense weights are
    wrong for the compressed ones. Only the BN layers run in train mode (dropout stays off); their
    momentum is set to None (a plain average over the batches) and restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or n_batches <= 0:
        return
    momenta = [m.momentum for m in bns]
    with eval_mode(model):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for _, (x, _y) in zip(range(n_batches), stream, strict=False):
                model(x)
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum

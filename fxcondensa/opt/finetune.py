"""``FineTune``: compress once, then fine-tune under the scheme's masks (prune + fine-tune, the baseline).

The compressed weights restart from the projection ``Pi(w)`` and keep its zeros after every SGD update; the
learning rate decays to zero on one cosine over the whole budget (after a linear warm-up over its first
``warmup`` share, when given). The budget is cut into ``evaluations``
iterations: after each, the weights are projected again (which rounds them to the storage dtypes and, since
their zeros are held, keeps the masks), BatchNorm statistics are recalibrated and the result evaluated; the
best on validation is returned. Checkpoints, progress and torchrun work as for ``LC`` (one shared loop).
"""

from __future__ import annotations

import os
from typing import Any

from .base import Trained, check_float, check_int, warmup_cosine

__all__ = ["FineTune"]


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts, the larger ones first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


class FineTune(Trained):
    """Direct compression followed by masked fine-tuning, first-class like ``LC``.

    Args:
        iterations: SGD minibatches in all (the budget). evaluations: how many times the result is projected,
            evaluated (and checkpointed) along the way; the best evaluation is returned.
        lr: the peak of the cosine (0.05: a cosine from 0.02 moves the weights about half as far as a constant
            0.02, and lost 1.5 points to plain masked SGD at that constant rate on LeNet-5, 330 iterations).
        warmup: the share of the budget (in [0, 1)) over which the rate rises linearly to ``lr`` before the
            cosine (0: none; the cosine starts at ``lr``).
        l_batch_size, momentum (Nesterov form, as LC), weight_decay, val_batch_size, device, seed,
        checkpoint, progress, bn_batches, autocast, tf32: as for :class:`fxcondensa.opt.LC`.

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import Prune
        >>> data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
        >>> ft = condensa.opt.FineTune(iterations=6, evaluations=2, l_batch_size=64, device="cpu")
        >>> c = condensa.Compressor(ft, Prune(0.1), condensa.models.LeNet5(), data, data, data,
        ...                         torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> len(c.statistics["history"]), round(c.statistics["density"], 2), c.statistics["budget"]
        (3, 0.1, 6)
    """

    _HYPER = ("iterations", "evaluations", "l_batch_size", "lr", "warmup", "momentum", "weight_decay",
              "val_batch_size", "seed", "bn_batches")

    def __init__(self, iterations: int = 1000, *, evaluations: int = 4, l_batch_size: int = 128, lr: float = 0.05,
                 warmup: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0, val_batch_size: int = 256, device: Any = None,
                 seed: int = 0, checkpoint: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 bn_batches: int = 20, autocast: str | None = None, tf32: bool = False):
        self.iterations = check_int("FineTune", "iterations", iterations, 1)
        self.evaluations = check_int("FineTune", "evaluations", evaluations, 1)
        if self.evaluations > self.iterations:
            raise ValueError(f"FineTune: evaluations={evaluations} exceeds iterations={iterations}; each evaluation "
                             "follows at least one SGD minibatch, so use evaluations <= iterations")
        self._common(l_batch_size=l_batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     val_batch_size=val_batch_size, device=device, seed=seed, checkpoint=checkpoint,
                     progress=progress, bn_batches=bn_batches, autocast=autocast, tf32=tf32)
        name = type(self).__name__
        self.warmup = check_float(name, "warmup", warmup, 0.0, 1.0, high_open=True)
        self.steps = 1 + self.evaluations
        self._sizes = [0] + split(self.iterations, self.evaluations)

    @property
    def warmup_iterations(self) -> int:
        """Minibatches of the linear warm-up: the ``warmup`` share of the budget, rounded (at least one when
        ``warmup`` is above 0)."""
        return max(1, round(self.warmup * self.iterations)) if self.warmup else 0

    def step_lrs(self, j: int) -> list[float]:
        start, warm = sum(self._sizes[:j]), self.warmup_iterations
        return [warmup_cosine(self.lr, start + i, self.iterations, warm) for i in range(self._sizes[j])]

    def opening(self, j: int, mu: float, lrs: list[float]) -> list[str]:
        if j == 0:
            return ["FineTune: direct compression first (evaluation 0, no training)"]
        start = sum(self._sizes[:j])
        shape = "warm-up, then cosine" if start < self.warmup_iterations else "cosine"
        return [f"FineTune evaluation {j} of {self.evaluations}: minibatches {start + 1}-"
                f"{start + len(lrs)} of {self.iterations} under the masks, lr {lrs[0]:.5f} ({shape})"]

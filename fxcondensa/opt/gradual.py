"""``Gradual``: gradual magnitude pruning with Zhu & Gupta's cubic schedule (2017), then masked fine-tuning.

Iteration ``j = 1 .. pruning_steps`` projects the weights with the user's scheme made less severe: its
sparsity (``1 - density``; for ``target_flops`` schemes, the MACs removed) is the target's times
``1 - (1 - j / pruning_steps)**3``, so most is removed early, while the network still has the capacity to
recover, and little near the end. Between two pruning steps the weights train under the last step's zeros.
The remaining iterations fine-tune at the target, as :class:`FineTune` does; only iterations at the target
(and iteration 0, direct compression) can be returned. The learning rate decays on one cosine over the run.

The intermediate schemes are copies of the user's with other values of the attributes ``density``,
``target_flops`` and ``layers`` (per-layer densities); ``Compose`` is scaled item by item, and a scheme
without any of them (``Quantize``) is applied unchanged at every step.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch.fx as fx
from torch import nn

from .base import Trained, check_float, check_int, cosine
from .finetune import split
from .training import Batches

__all__ = ["Gradual", "scaled_scheme"]


def _less(value: float, fraction: float) -> float:
    return 1.0 - (1.0 - value) * fraction


def scaled_scheme(scheme: Any, fraction: float) -> Any:
    """A copy of ``scheme`` removing ``fraction`` of what it removes (1: the scheme itself); None if nothing in
    it has a density to scale.

    Example:
        >>> from fxcondensa.schemes import Compose, Prune, Quantize
        >>> half = scaled_scheme(Compose([Prune(0.2), Quantize()]), 0.5)
        >>> round(half.schemes[0].density, 6), type(half.schemes[1]).__name__
        (0.6, 'Quantize')
    """
    if fraction >= 1.0:
        return scheme
    items = getattr(scheme, "schemes", None)
    if isinstance(items, list):
        parts = [scaled_scheme(s, fraction) for s in items]
        if all(p is None for p in parts):
            return None
        out = copy.copy(scheme)
        out.schemes = [s if p is None else p for s, p in zip(items, parts, strict=True)]
        return out
    out, found = copy.copy(scheme), False
    for attr in ("density", "target_flops"):
        value = getattr(scheme, attr, None)
        if isinstance(value, float):
            setattr(out, attr, _less(value, fraction))
            found = True
    layers = getattr(scheme, "layers", None)
    if isinstance(layers, dict) and layers:
        out.layers = {k: _less(v, fraction) for k, v in layers.items()}
        found = True
    return out if found else None


class Gradual(Trained):
    """Gradual pruning (Zhu & Gupta's cubic schedule), for unstructured and structured schemes.

    Args:
        iterations: SGD minibatches in all (the budget). pruning_steps: how many times the sparsity rises.
        prune_fraction: share of the budget spent between the first and the last pruning step; the rest
            fine-tunes at the target in ``evaluations`` iterations.
        l_batch_size, lr, momentum, weight_decay, val_batch_size, device, seed, checkpoint, progress,
        bn_batches, autocast, tf32: as for :class:`fxcondensa.opt.LC`.

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import StructurePrune
        >>> data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
        >>> g = condensa.opt.Gradual(iterations=8, pruning_steps=3, evaluations=1, l_batch_size=64, device="cpu")
        >>> c = condensa.Compressor(g, StructurePrune(0.5), condensa.models.LeNet5(), data, data, data,
        ...                         torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> [h["iteration"] for h in c.statistics["history"]], c.statistics["budget"]
        ([0, 1, 2, 3, 4], 8)
    """

    _HYPER = ("iterations", "pruning_steps", "prune_fraction", "evaluations", "l_batch_size", "lr", "momentum",
              "weight_decay", "val_batch_size", "seed", "bn_batches")

    def __init__(self, iterations: int = 1000, *, pruning_steps: int = 8, prune_fraction: float = 0.5,
                 evaluations: int = 2, l_batch_size: int = 128, lr: float = 0.02, momentum: float = 0.9,
                 weight_decay: float = 0.0, val_batch_size: int = 256, device: Any = None, seed: int = 0,
                 checkpoint: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 bn_batches: int = 20, autocast: str | None = None, tf32: bool = False):
        self.iterations = check_int("Gradual", "iterations", iterations, 1)
        self.pruning_steps = check_int("Gradual", "pruning_steps", pruning_steps, 1)
        self.prune_fraction = check_float("Gradual", "prune_fraction", prune_fraction, 0.0, 1.0, high_open=True)
        self.evaluations = check_int("Gradual", "evaluations", evaluations, 1)
        self._common(l_batch_size=l_batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     val_batch_size=val_batch_size, device=device, seed=seed, checkpoint=checkpoint,
                     progress=progress, bn_batches=bn_batches, autocast=autocast, tf32=tf32)
        pruning = round(self.iterations * self.prune_fraction) if self.pruning_steps > 1 else 0
        tuning = self.iterations - pruning
        if tuning < self.evaluations:
            raise ValueError(f"Gradual: iterations={iterations} with prune_fraction={prune_fraction} leaves "
                             f"{tuning} minibatches for {evaluations} fine-tuning evaluations; lower prune_fraction "
                             "or evaluations, or raise iterations")
        # Iteration 1 prunes the trained model without training first; iterations 2 .. pruning_steps train
        # under the previous step's zeros, then prune further.
        self._sizes = [0, 0] + split(pruning, self.pruning_steps - 1) + split(tuning, self.evaluations)
        self.steps = len(self._sizes)

    def fraction(self, j: int) -> float:
        """Share of the target's sparsity reached after iteration j's C step (Zhu & Gupta's cubic)."""
        if j == 0 or j >= self.pruning_steps:
            return 1.0
        return 1.0 - (1.0 - j / self.pruning_steps) ** 3

    def scheme_at(self, scheme: Any, j: int) -> Any:
        scaled = scaled_scheme(scheme, self.fraction(j))
        return scheme if scaled is None else scaled

    def in_target(self, j: int) -> bool:
        return j == 0 or j >= self.pruning_steps

    def step_lrs(self, j: int) -> list[float]:
        start = sum(self._sizes[:j])
        return [cosine(self.lr, start + i, self.iterations) for i in range(self._sizes[j])]

    def opening(self, j: int, mu: float, lrs: list[float]) -> list[str]:
        if j == 0:
            return ["Gradual: direct compression to the target first (iteration 0, no training)"]
        train = f"{len(lrs)} minibatches under the last step's zeros (lr {lrs[0]:.5f}), then " if lrs else ""
        if j <= self.pruning_steps:
            return [f"Gradual pruning step {j} of {self.pruning_steps}: {train}pruning to "
                    f"{self.fraction(j):.0%} of the target sparsity"]
        return [f"Gradual fine-tuning {j - self.pruning_steps} of {self.evaluations} at the target: {len(lrs)} "
                f"minibatches under the masks, lr {lrs[0]:.5f}"]

    def compress(self, model: nn.Module, scheme: Any, train: Batches, val: Batches | None, test: Batches | None,
                 criterion: Any, example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
        """As :meth:`fxcondensa.opt.LC.compress`; the scheme must have a density (or target_flops) to scale."""
        if scaled_scheme(scheme, 0.5) is None:
            raise ValueError(f"Gradual needs a scheme with a density, target_flops or per-layer densities to raise "
                             f"step by step; {scheme!r} has none. Use FineTune or LC for it")
        return super().compress(model, scheme, train, val, test, criterion, example_inputs)

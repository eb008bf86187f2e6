"""What the trained optimizers (``LC``, ``FineTune``, ``Gradual``) share: argument checks, the device, the
run configuration, and the *plan* protocol the training loop (``fxcondensa.opt.lc._Run``) follows.

A plan says, for iteration ``j`` of ``steps``: how many SGD minibatches its L step runs and at which
learning rates (:meth:`Trained.step_lrs`), its penalty ``mu`` (0: no penalty), whether the L step is a
*masked* one (the compressed weights restart from the last projection and keep its zeros) or an L-C one
(the penalty pulls them toward it), which scheme the C step projects with (:meth:`Trained.scheme_at`:
the user's, or an intermediate one for gradual pruning), and whether the projection is in the user's
compressed set (:meth:`Trained.in_target`: only those iterations can be returned).

Example:
    >>> from fxcondensa.opt import FineTune
    >>> ft = FineTune(iterations=10, evaluations=2, lr=0.1)
    >>> ft.steps, [len(ft.step_lrs(j)) for j in range(ft.steps)]
    (3, [0, 5, 5])
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import distributed as dist_lc
from .engine import _Run
from .training import Batches

__all__ = ["Trained", "check_int", "check_float"]


def check_int(owner: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_float(owner: str, name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{owner}: {name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


class Trained:
    """Base of the optimizers that train: common arguments and the plan protocol (see the module doc)."""

    steps: int
    _HYPER: tuple[str, ...] = ()

    def _common(self, *, l_batch_size: int, lr: float, momentum: float, weight_decay: float, val_batch_size: int,
                device: Any, seed: int, checkpoint: Any, progress: Any, bn_batches: int, autocast: Any,
                tf32: bool) -> None:
        name = type(self).__name__
        self.l_batch_size = check_int(name, "l_batch_size", l_batch_size, 1)
        self.lr = check_float(name, "lr", lr, 0.0, low_open=True)
        self.momentum = check_float(name, "momentum", momentum, 0.0, 1.0, high_open=True)
        self.weight_decay = check_float(name, "weight_decay", weight_decay, 0.0)
        self.val_batch_size = check_int(name, "val_batch_size", val_batch_size, 1)
        self.seed = check_int(name, "seed", seed, 0)
        self.bn_batches = check_int(name, "bn_batches", bn_batches, 0)
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"{name}: checkpoint must be a file path (str or os.PathLike) or None, got {checkpoint!r}")
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"{name}: progress must be True, False or None (automatic), got {progress!r}")
        self.progress = progress
        if autocast not in (None, "bfloat16", torch.bfloat16):
            raise ValueError(f"{name}: autocast must be None or 'bfloat16' (bf16 autocast of the L step's forward "
                             f"on CUDA), got {autocast!r}")
        self.autocast = None if autocast is None else "bfloat16"
        if not isinstance(tf32, bool):
            raise TypeError(f"{name}: tf32 must be True or False, got {tf32!r}")
        self.tf32 = tf32
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"{name}: device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{name}: device {device!r} asked for CUDA, which is not available here; use device='cpu'")

    # -- configuration ------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Every argument, as plain values: recorded in ``Compressor.statistics`` and in checkpoints."""
        cfg = {k: getattr(self, k) for k in self._HYPER}
        cfg.update(autocast=self.autocast, tf32=self.tf32, device=str(self.resolved_device),
                   checkpoint=self.checkpoint)
        return cfg

    @property
    def defaults(self) -> dict[str, Any]:
        """The default of every argument that has one: a checkpoint written before an argument existed ran
        with its default, so resuming it still matches."""
        sig = inspect.signature(type(self).__init__)
        return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}

    @property
    def resolved_device(self) -> torch.device:
        """The device to train on; under a multi-rank torchrun launch, ``cuda`` means ``cuda:LOCAL_RANK``."""
        if self.device is not None:
            return dist_lc.local_device(self.device)
        return dist_lc.local_device(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._HYPER) + ")"

    # -- the plan ---------------------------------------------------------------------------------------------
    def step_lrs(self, j: int) -> list[float]:
        """The learning rate of each SGD minibatch of iteration j's L step (empty: no L step)."""
        raise NotImplementedError

    def mu_at(self, j: int) -> float:
        return 0.0

    def masked(self, j: int) -> bool:
        """True: iteration j's L step restarts from the projection and keeps its zeros (no penalty)."""
        return True

    def restart(self, j: int) -> bool:
        """True: iteration j's L step starts from the projection theta rather than from w."""
        return self.masked(j)

    def scheme_at(self, scheme: Any, j: int) -> Any:
        return scheme

    def in_target(self, j: int) -> bool:
        return True

    # -- the log: each optimizer in its own words (LC keeps Condensa's L-C words) -------------------------------
    #: Templates of the log lines the shared loop writes, filled by :meth:`say`; a subclass replaces the ones
    #: it names differently (``LC``: Condensa's "L-step", "Nested (theta)", ...).
    WORDS: dict[str, str] = {
        "config": "{name} configuration [{config}]",
        "step": "{name} iteration {j}",
        "evaluation": "{name} iteration {j} {key}: loss {loss:.5f}, top1 {acc:.2f}%",
        "best": "{name}: iteration {j} is the best so far (by {basis})",
        "resume": "Resuming {name} from {path} at iteration {j}",
        "untracked": "{name} keeps compressed only the parameters compressed at iteration 0",
        "baseline": "uncompressed model {key}: loss {loss:.5f}, top1 {acc:.2f}%",
    }

    def say(self, event: str, **fields: Any) -> str:
        """The log line of ``event`` in this optimizer's words (``name`` is filled in).

        Example:
            >>> from fxcondensa.opt import FineTune
            >>> FineTune(iterations=10).say("step", j=2)
            'FineTune iteration 2'
        """
        return self.WORDS[event].format(name=type(self).__name__, **fields)

    def opening(self, j: int, mu: float, lrs: list[float]) -> list[str]:
        """The lines that open iteration j: what it is about to do, in this optimizer's words."""
        if j == 0:
            return [f"{type(self).__name__} iteration 0: direct compression, no training"]
        lr = f", lr {lrs[0]:.5f}" if lrs else ""
        return [f"{type(self).__name__} iteration {j} of {self.steps - 1}: {len(lrs)} minibatches under the masks{lr}"]

    def l_loss(self, model: nn.Module, x: Any, y: Any, criterion: Any) -> torch.Tensor:
        """The loss of one L-step minibatch: ``criterion(model(x), y)``, the forward under bf16 autocast when
        asked. ``Distill`` replaces it with its distillation loss; every other step of the loop is shared."""
        device = self.resolved_device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast is not None):
            out = model(x)
        return criterion(out.float() if self.autocast else out, y)

    @property
    def budget(self) -> int:
        """SGD minibatches of the whole run."""
        return sum(len(self.step_lrs(j)) for j in range(self.steps))

    # -- running ----------------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, scheme: Any, train: Batches, val: Batches | None, test: Batches | None,
                 criterion: Any, example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
        """Run on a copy of ``model``; return ``(the best compressed iteration, statistics)``.

        Under torchrun (a live process group, or one initialisable from ``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``) the run is distributed over the ranks; every rank must call this
        with the same arguments, and every rank returns the same result.
        """
        with dist_lc.process_group(self.resolved_device) as group:
            if group is not None and self.l_batch_size % group.world_size:
                raise ValueError(f"{type(self).__name__}: l_batch_size is the global batch, split evenly across "
                                 f"ranks; {self.l_batch_size} is not a multiple of the {group.world_size} ranks")
            with dist_lc.quiet_followers(group):
                run = _Run(self, model, scheme, train, val, test, criterion, example_inputs, group)
                return run.execute()


def cosine(lr: float, i: int, n: int) -> float:
    """Cosine decay from ``lr`` at step 0 toward 0 at step n."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * i / n))


def warmup_cosine(lr: float, i: int, n: int, warm: int) -> float:
    """Step ``i`` of ``n``: a linear rise to ``lr`` over the first ``warm`` steps (``lr / warm`` at step 0),
    then one cosine from ``lr`` toward 0 over the remaining ``n - warm``; ``warm = 0`` is :func:`cosine`.

    Example:
        >>> [round(warmup_cosine(1.0, i, 6, 2), 2) for i in range(6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    if i < warm:
        return lr * (i + 1) / warm
    return cosine(lr, i - warm, n - warm)

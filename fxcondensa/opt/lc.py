"""``LC``: the learning-compression optimizer (augmented Lagrangian), Condensa's ``condensa.opt.LC``.

The algorithm (Carreira-Perpinan's L-C, as Condensa runs it; the loop is ``fxcondensa.opt.engine``), over the compressed parameters ``w``:

- iteration 0 is direct compression: ``theta = Pi(w)``, no training, ``mu = 0``;
- iteration ``j >= 1``: an L step, SGD with momentum (reset each L step) on
  ``loss(w) + mu/2 ||w - Delta(theta) - lambda/mu||^2`` for ``sgd_iterations_first_l`` (j = 1) or
  ``sgd_iterations_per_l`` minibatches; a C step ``theta = Pi(w - lambda/mu)`` through the scheme; the
  multipliers ``lambda <- lambda - mu (w - Delta(theta))``;
- ``mu`` is ``mu_init`` at iteration 1, then multiplied by ``mu_multiplier`` up to ``mu_cap``; the learning
  rate of iteration j is ``lr * lr_decay**j`` (and decays geometrically to ``lr_end`` within the L step when
  ``lr_end`` is given);
- the last ``finetune_steps`` iterations (0 unless the schedule is automatic) are masked fine-tuning of
  ``Delta(theta)``: the weights restart from the projection and keep its zeros, with the learning rate
  decayed to zero on a cosine.

Defaults: every argument has one. Left to ``None``, ``lr`` is 0.05 (at 0.02 the final fine-tune, a cosine
from 0.02, moved the weights too little: 1.5 points under plain masked SGD at a constant 0.02 on LeNet-5,
99.3% pruned, 330 iterations), ``lr_decay`` 1, ``momentum`` 0.9, and the mu schedule is chosen from the
budget (``steps``, ``sgd_iterations_first_l``, ``sgd_iterations_per_l``): the penalty's pull over an L step,
``mu * sum(lr) / (1 - momentum)`` (how many e-folds of ``w - theta`` it removes on its own), grows
geometrically from 0.25 in the first L step to 4 in the last L-C one, so ``w`` reaches the compressed set
whatever the budget, and one final iteration fine-tunes ``Delta(theta)``.
An explicit schedule is used as given; if its total pull is under 3 (``w`` would end more than 5% of
the way from the compressed set) a warning says which argument to raise.

``Delta(theta)`` is evaluated after each C step, its BatchNorm statistics first recalibrated on training
batches; the result is the one with the best validation accuracy (ties: lower loss).

Distributed (``torchrun --nproc_per_node=N``, single- or multi-node): the L step runs under
DistributedDataParallel. ``l_batch_size`` is the *global* batch: every rank draws the same global batch
and trains on its ``l_batch_size / N`` samples (DistributedSampler's strided split; ``l_batch_size`` must
be a multiple of N), and the averaged gradient is the global batch's. BatchNorm layers use each rank's
own batch statistics during the L step (DDP's default), and their running statistics follow rank 0.
Every rank runs the same C step and multiplier update on identical inputs, checked bit for bit after each
iteration; rank 0 alone evaluates, logs, shows progress and writes checkpoints, and at the end broadcasts
the best state, so every rank returns the same model and statistics. See ``fxcondensa.opt.distributed``.

Memory: besides the trained model ``w`` (with its SGD momentum), only ``theta`` (held by a second
GraphModule, on which ``scheme.pi`` runs) and ``lambda`` for the compressed parameters, plus the best
state seen. The penalty gradient and the multiplier update are ``torch._foreach_*`` over those lists.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from .base import Trained, check_float, check_int, cosine
from .engine import _Run
from .finetune import split

__all__ = ["LC"]

_ = _Run  # the loop, importable from here as before (tests patch it, bench/lc_step.py runs it)

# The automatic schedule: pull of the penalty over the first and the last L-C step (e-folds of w - theta).
PULL_FIRST, PULL_LAST = 0.25, 4.0
# Below this total pull an explicit schedule leaves w more than e^-3 = 5% of the way from theta.
PULL_ENOUGH = 3.0
AUTO_LR, AUTO_MOMENTUM = 0.05, 0.9
# The automatic schedule's share of the budget for the final masked fine-tune of Delta(theta).
FT_SHARE = 0.5


class LC(Trained):
    """The L-C optimizer with Condensa's arguments (``condensa.opt.LC`` in the tutorial), each with a default.

    Args:
        steps: L-C iterations, iteration 0 (direct compression) included.
        l_batch_size: minibatch size of the L step. val_batch_size: batch size for evaluation.
        lr, lr_decay: learning rate of iteration j is ``lr * lr_decay**j``. lr_end: if given, the rate
            decays geometrically within each L step down to ``lr_end``.
        momentum: SGD momentum (Condensa's Nesterov form), reset at each L step. weight_decay: L2 on all weights.
        sgd_iterations_first_l, sgd_iterations_per_l: minibatches of the first and of later L steps.
        mu_init, mu_multiplier, mu_cap: the penalty schedule (None: chosen from the budget, see the module).
        finetune_steps: final iterations spent fine-tuning ``Delta(theta)`` under its masks (None: with the
            automatic schedule 2, or 1 when steps is 3; else 0).
        finetune_fraction: share of the budget those iterations get (None: half with the automatic schedule;
            otherwise each gets ``sgd_iterations_per_l``).
        l_start: ``"w"`` (each L step continues from w, Condensa's L-C) or ``"projection"`` (from theta, the
            default of the automatic schedule: every SGD step then improves a compressed model).
        device: where to train (default: cuda when available, else cpu).
        seed: the run's randomness (batch order, dropout) derives from it alone.
        checkpoint: a file path; the state is saved atomically after every L-C iteration and a run with the
            same arguments resumes from it, ending exactly as an uninterrupted run would.
        progress: progress of each L step (default: on when the ``fxcondensa`` logger is at INFO): a tqdm
            bar on a terminal, one log line per L step otherwise.
        bn_batches: training batches used to recalibrate BatchNorm statistics before each evaluation.
        autocast: ``"bfloat16"`` runs the L step's forward under bf16 autocast (CUDA; weights stay fp32).
        tf32: TF32 matmuls/convolutions in the L step on CUDA (evaluation and C steps stay full fp32).

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import Prune
        >>> data = TensorDataset(torch.randn(512, 1, 28, 28), torch.randint(0, 10, (512,)))
        >>> lc = condensa.opt.LC(steps=3, l_batch_size=64, sgd_iterations_per_l=5, sgd_iterations_first_l=10,
        ...                      val_batch_size=256, device="cpu")
        >>> c = condensa.Compressor(lc, Prune(0.1), condensa.models.LeNet5(), data, data, data,
        ...                         torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> len(c.statistics["history"]), round(c.statistics["density"], 2), lc.finetune_steps
        (3, 0.1, 1)
    """

    _HYPER = ("steps", "l_batch_size", "lr", "lr_decay", "momentum", "sgd_iterations_per_l",
              "sgd_iterations_first_l", "mu_init", "mu_multiplier", "mu_cap", "val_batch_size", "lr_end",
              "weight_decay", "finetune_steps", "finetune_fraction", "l_start", "seed", "bn_batches")

    def __init__(self, steps: int = 8, l_batch_size: int = 128, lr: float | None = None,
                 lr_decay: float | None = None, momentum: float | None = None, sgd_iterations_per_l: int = 200,
                 sgd_iterations_first_l: int = 400, mu_init: float | None = None,
                 mu_multiplier: float | None = None, mu_cap: float | None = None, val_batch_size: int = 256,
                 lr_end: float | None = None, weight_decay: float = 0.0, *, finetune_steps: int | None = None,
                 device: Any = None, seed: int = 0, checkpoint: str | os.PathLike[str] | None = None,
                 progress: bool | None = None, bn_batches: int = 20, autocast: str | None = None,
                 tf32: bool = False, l_start: str | None = None, finetune_fraction: float | None = None):
        self.steps = check_int("LC", "steps", steps, 1)
        self._common(l_batch_size=l_batch_size, lr=AUTO_LR if lr is None else lr,
                     momentum=AUTO_MOMENTUM if momentum is None else momentum, weight_decay=weight_decay,
                     val_batch_size=val_batch_size, device=device, seed=seed, checkpoint=checkpoint,
                     progress=progress, bn_batches=bn_batches, autocast=autocast, tf32=tf32)
        self.lr_decay = 1.0 if lr_decay is None else check_float("LC", "lr_decay", lr_decay, 0.0, 1.0, low_open=True)
        self.sgd_iterations_per_l = check_int("LC", "sgd_iterations_per_l", sgd_iterations_per_l, 1)
        self.sgd_iterations_first_l = check_int("LC", "sgd_iterations_first_l", sgd_iterations_first_l, 1)
        self.lr_end = None if lr_end is None else check_float("LC", "lr_end", lr_end, 0.0, low_open=True)
        auto = mu_init is None and mu_multiplier is None and mu_cap is None
        if finetune_steps is None:  # two evaluations of the fine-tune when there is room: the best is kept
            finetune_steps = (2 if self.steps >= 4 else 1 if self.steps == 3 else 0) if auto else 0
        self.finetune_steps = check_int("LC", "finetune_steps", finetune_steps, 0)
        if self.finetune_steps > max(self.steps - 2, 0):
            raise ValueError(f"LC: finetune_steps={finetune_steps} leaves no L-C iteration among steps={steps} "
                             "(iteration 0 is direct compression); use finetune_steps <= steps - 2 or more steps")
        self.automatic = auto
        if finetune_fraction is None and auto and self.finetune_steps:
            finetune_fraction = FT_SHARE
        self.finetune_fraction = None if finetune_fraction is None else check_float(
            "LC", "finetune_fraction", finetune_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self._sizes = self._plan_sizes()
        if l_start is None:
            l_start = "projection" if auto else "w"
        if l_start not in ("w", "projection"):
            raise ValueError(f"LC: l_start must be 'w' (each L step continues from w, Condensa's L-C) or "
                             f"'projection' (from theta), got {l_start!r}")
        self.l_start = l_start
        if auto:
            mu_init, mu_multiplier, mu_cap = self._auto_mu()
        elif mu_init is None or mu_multiplier is None or mu_cap is None:
            raise ValueError(f"LC: give all of mu_init, mu_multiplier and mu_cap, or none (an automatic schedule); "
                             f"got mu_init={mu_init!r}, mu_multiplier={mu_multiplier!r}, mu_cap={mu_cap!r}")
        self.mu_init = check_float("LC", "mu_init", mu_init, 0.0, low_open=True)
        self.mu_multiplier = check_float("LC", "mu_multiplier", mu_multiplier, 1.0)
        self.mu_cap = check_float("LC", "mu_cap", mu_cap, self.mu_init)
        if not auto:
            self._check_reach()

    # -- the schedule -----------------------------------------------------------------------------------------
    @property
    def lc_steps(self) -> int:
        """L-C iterations with an L step and a penalty (iterations 1 .. steps - 1 - finetune_steps)."""
        return max(self.steps - 1 - self.finetune_steps, 0)

    def _plan_sizes(self) -> list[int]:
        """SGD minibatches of each iteration. With a ``finetune_fraction``, the budget the arguments give
        (``first + (steps - 2) * per``) is re-cut: that share goes to the final fine-tune, the L-C steps
        share the rest in the proportions of their arguments."""
        sizes = [0] + [self.sgd_iterations_first_l if j == 1 else self.sgd_iterations_per_l
                       for j in range(1, self.steps)]
        if self.finetune_fraction is None or not self.finetune_steps:
            return sizes
        total = sum(sizes)
        tune = min(max(round(total * self.finetune_fraction), self.finetune_steps), total - self.lc_steps)
        lc = sizes[1:1 + self.lc_steps]
        scale = (total - tune) / sum(lc)
        scaled = [max(1, int(n * scale)) for n in lc]
        scaled[0] += total - tune - sum(scaled)  # rounding left-overs go to the first L step
        return [0] + scaled + split(tune, self.finetune_steps)

    def _n(self, j: int) -> int:
        return self._sizes[j] if j < len(self._sizes) else self.sgd_iterations_per_l

    def pull(self, j: int) -> float:
        """How many e-folds of ``w - theta`` the penalty alone removes in iteration j's L step."""
        if j == 0 or self.masked(j):
            return 0.0
        return self.mu_at(j) * sum(self.step_lrs(j)) / (1.0 - self.momentum)

    def _auto_mu(self) -> tuple[float, float, float]:
        n = self.lc_steps
        sums = [sum(self.step_lrs(j)) / (1.0 - self.momentum) for j in range(1, n + 1)]
        if n == 0:
            return 1.0, 1.0, 1.0
        first = PULL_FIRST / sums[0] if n > 1 else PULL_LAST / sums[0]
        last = PULL_LAST / sums[-1]
        mult = max((last / first) ** (1.0 / (n - 1)), 1.0) if n > 1 else 1.0
        return first, mult, max(last, first)

    def _check_reach(self) -> None:
        total = sum(self.pull(j) for j in range(1, self.lc_steps + 1))
        if self.lc_steps and total < PULL_ENOUGH:
            need = PULL_ENOUGH / max(total, 1e-300)
            warnings.warn(
                f"LC: this schedule cannot bring the weights to the compressed set within its budget: the penalty "
                f"mu*(w - theta) removes only about {total:.2g} e-folds of the distance (it leaves "
                f"{100 * math.exp(-total):.0f}%; {PULL_ENOUGH:g} or more leaves under 5%), so the result is close to "
                f"direct compression. Multiply mu_init by about {need:.3g} (mu_init={self.mu_init * need:.3g}), "
                "raise mu_multiplier or the SGD iterations, or leave mu_init, mu_multiplier and mu_cap unset for "
                "a schedule chosen from the budget.", UserWarning, stacklevel=3)

    # Condensa's log lines: the L-C words (w, theta, mu, L step) are this optimizer's own.
    WORDS = {
        **Trained.WORDS,
        "config": "LC ENGINE CONFIG [{config}]",
        "step": "L-step {j}",
        "evaluation": "Nested (theta) {key}\tloss={loss:.5f}, top1:{acc:.2f}",
        "best": "Saving model based on {basis}",
        "resume": "Resuming L-C from {path} at iteration {j}",
        "untracked": "L-C constrains only the parameters compressed at iteration 0",
        "baseline": "w {key}\tloss={loss:.5f}, top1:{acc:.2f}",
    }

    def opening(self, j: int, mu: float, lrs: list[float]) -> list[str]:
        lines = [f"LC Iteration {j}:\tmu={mu:.5f}, lr={lrs[0] if lrs else 0.0:.5f}"]
        return (lines + ["Skipping first L-step"]) if j == 0 else lines

    def mu_at(self, iteration: int) -> float:
        """mu of iteration j: 0 at j = 0 (direct compression), then mu_init * mu_multiplier**(j-1), capped."""
        if iteration == 0 or self.masked(iteration):
            return 0.0
        return min(self.mu_init * self.mu_multiplier ** (iteration - 1), self.mu_cap)

    def lr_at(self, iteration: int) -> float:
        return self.lr * self.lr_decay ** iteration

    def masked(self, j: int) -> bool:
        return self.finetune_steps > 0 and j > self.lc_steps

    def restart(self, j: int) -> bool:
        return self.masked(j) or (j > 0 and self.l_start == "projection")

    def step_lrs(self, j: int) -> list[float]:
        n = self._n(j)
        if self.masked(j):  # the final fine-tune: one cosine over all its iterations
            before = sum(self._n(i) for i in range(self.lc_steps + 1, j))
            total = before + sum(self._n(i) for i in range(j, self.steps))
            return [cosine(self.lr_at(self.lc_steps + 1), before + i, total) for i in range(n)]
        lr = self.lr_at(j)
        decay = (self.lr_end / lr) ** (1.0 / n) if self.lr_end is not None and n else 1.0
        return [lr * decay ** i for i in range(n)]

"""``LC``: the learning-compression optimizer (augmented Lagrangian), Condensa's ``condensa.opt.LC``.

The algorithm (Carreira-Perpinan's L-C, as Condensa runs it), over the compressed parameters ``w``:

- iteration 0 is direct compression: ``theta = Pi(w)``, no training, ``mu = 0``;
- iteration ``j >= 1``: an L step, SGD with momentum (reset each L step) on
  ``loss(w) + mu/2 ||w - Delta(theta) - lambda/mu||^2`` for ``sgd_iterations_first_l`` (j = 1) or
  ``sgd_iterations_per_l`` minibatches; a C step ``theta = Pi(w - lambda/mu)`` through the scheme; the
  multipliers ``lambda <- lambda - mu (w - Delta(theta))``;
- ``mu`` is ``mu_init`` at iteration 1, then multiplied by ``mu_multiplier`` up to ``mu_cap``; the learning
  rate of iteration j is ``lr * lr_decay**j`` (and decays geometrically to ``lr_end`` within the L step when
  ``lr_end`` is given).

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

import copy
import logging
import math
import os
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from ..compression import density
from ..graph import as_input_tuple, trace
from ..passes.annotate import META, annotations
from ..training import Batches, evaluate, recalibrate_bn
from . import distributed as dist_lc
from .checkpoint import FORMAT, VERSION, config_mismatch, load_checkpoint, model_fingerprint, save_atomic

__all__ = ["LC"]

logger = logging.getLogger("fxcondensa")


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"LC: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _float(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"LC: {name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def _seed(seed: int, iteration: int, salt: int) -> int:
    """A separate RNG seed per (run seed, iteration, purpose): an iteration's randomness depends on nothing
    else, which is what makes a resumed run equal to an uninterrupted one."""
    return (seed * 1_000_003 + iteration * 8 + salt) % (2**63)


class LC:
    """The L-C optimizer with Condensa's arguments (``condensa.opt.LC`` in the tutorial).

    Args:
        steps: L-C iterations, iteration 0 (direct compression) included.
        l_batch_size: minibatch size of the L step. val_batch_size: batch size for evaluation.
        lr, lr_decay: learning rate of iteration j is ``lr * lr_decay**j``. lr_end: if given, the rate
            decays geometrically within each L step down to ``lr_end``.
        momentum: SGD momentum (Condensa's Nesterov form), reset at each L step. weight_decay: L2 on all weights.
        sgd_iterations_first_l, sgd_iterations_per_l: minibatches of the first and of later L steps.
        mu_init, mu_multiplier, mu_cap: the penalty schedule.
        device: where to train (default: cuda when available, else cpu).
        seed: the run's randomness (batch order, dropout) derives from it alone.
        checkpoint: a file path; the state is saved atomically after every L-C iteration and a run with the
            same arguments resumes from it, ending exactly as an uninterrupted run would.
        progress: a tqdm bar per L step (default: on when the ``fxcondensa`` logger is at INFO).
        bn_batches: training batches used to recalibrate BatchNorm statistics before each evaluation.

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import Prune
        >>> data = TensorDataset(torch.randn(512, 1, 28, 28), torch.randint(0, 10, (512,)))
        >>> lc = condensa.opt.LC(steps=3, l_batch_size=64, lr=0.01, lr_decay=0.98, momentum=0.9,
        ...                      sgd_iterations_per_l=5, sgd_iterations_first_l=10, mu_init=1e-3,
        ...                      mu_multiplier=1.1, mu_cap=1e4, val_batch_size=256, device="cpu")
        >>> c = condensa.Compressor(lc, Prune(0.1), condensa.models.LeNet5(), data, data, data,
        ...                         torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> len(c.statistics["history"]), round(c.statistics["density"], 2)
        (3, 0.1)
    """

    def __init__(self, steps: int, l_batch_size: int, lr: float, lr_decay: float, momentum: float,
                 sgd_iterations_per_l: int, sgd_iterations_first_l: int, mu_init: float, mu_multiplier: float,
                 mu_cap: float, val_batch_size: int, lr_end: float | None = None, weight_decay: float = 0.0,
                 device: Any = None, seed: int = 0, checkpoint: str | os.PathLike[str] | None = None,
                 progress: bool | None = None, bn_batches: int = 20):
        self.steps = _int("steps", steps, 1)
        self.l_batch_size = _int("l_batch_size", l_batch_size, 1)
        self.lr = _float("lr", lr, 0.0, low_open=True)
        self.lr_decay = _float("lr_decay", lr_decay, 0.0, 1.0, low_open=True)
        self.momentum = _float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.sgd_iterations_per_l = _int("sgd_iterations_per_l", sgd_iterations_per_l, 1)
        self.sgd_iterations_first_l = _int("sgd_iterations_first_l", sgd_iterations_first_l, 1)
        self.mu_init = _float("mu_init", mu_init, 0.0, low_open=True)
        self.mu_multiplier = _float("mu_multiplier", mu_multiplier, 1.0)
        self.mu_cap = _float("mu_cap", mu_cap, self.mu_init)
        self.val_batch_size = _int("val_batch_size", val_batch_size, 1)
        self.lr_end = None if lr_end is None else _float("lr_end", lr_end, 0.0, low_open=True)
        self.weight_decay = _float("weight_decay", weight_decay, 0.0)
        self.seed = _int("seed", seed, 0)
        self.bn_batches = _int("bn_batches", bn_batches, 0)
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"LC: checkpoint must be a file path (str or os.PathLike) or None, got {checkpoint!r}")
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"LC: progress must be True, False or None (automatic), got {progress!r}")
        self.progress = progress
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"LC: device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"LC: device {device!r} asked for CUDA, which is not available here; use device='cpu'")

    # -- configuration ------------------------------------------------------------------------------------
    _HYPER = ("steps", "l_batch_size", "lr", "lr_decay", "momentum", "sgd_iterations_per_l",
              "sgd_iterations_first_l", "mu_init", "mu_multiplier", "mu_cap", "val_batch_size", "lr_end",
              "weight_decay", "seed", "bn_batches")

    @property
    def config(self) -> dict[str, Any]:
        """Every argument, as plain values: recorded in ``Compressor.statistics`` and in checkpoints."""
        cfg = {k: getattr(self, k) for k in self._HYPER}
        cfg.update(device=str(self.resolved_device), checkpoint=self.checkpoint)
        return cfg

    @property
    def resolved_device(self) -> torch.device:
        """The device to train on; under a multi-rank torchrun launch, ``cuda`` means ``cuda:LOCAL_RANK``."""
        if self.device is not None:
            return dist_lc.local_device(self.device)
        return dist_lc.local_device(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    def __repr__(self) -> str:
        return "LC(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._HYPER) + ")"

    def mu_at(self, iteration: int) -> float:
        """mu of iteration j: 0 at j = 0 (direct compression), then mu_init * mu_multiplier**(j-1), capped."""
        return 0.0 if iteration == 0 else min(self.mu_init * self.mu_multiplier ** (iteration - 1), self.mu_cap)

    def lr_at(self, iteration: int) -> float:
        return self.lr * self.lr_decay ** iteration

    # -- the algorithm --------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, scheme: Any, train: Batches, val: Batches | None, test: Batches | None,
                 criterion: Any, example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
        """Run L-C on a copy of ``model``; return ``(Delta(theta) of the best iteration, statistics)``.

        Under torchrun (a live process group, or one initialisable from ``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``) the run is distributed over the ranks; every rank must call this
        with the same arguments, and every rank returns the same result.
        """
        with dist_lc.process_group(self.resolved_device) as group:
            if group is not None and self.l_batch_size % group.world_size:
                raise ValueError(f"LC: l_batch_size is the global batch, split evenly across ranks; "
                                 f"{self.l_batch_size} is not a multiple of the {group.world_size} ranks")
            with dist_lc.quiet_followers(group):
                run = _Run(self, model, scheme, train, val, test, criterion, example_inputs, group)
                return run.execute()


class _Run:
    """The state of one L-C run: w (trained), theta (held by the GraphModule ``c``), lambda, mu, history."""

    def __init__(self, lc: LC, model: nn.Module, scheme: Any, train: Batches, val: Batches | None,
                 test: Batches | None, criterion: Any, example_inputs: Any, group: dist_lc.Group | None = None):
        self.lc, self.scheme, self.criterion = lc, scheme, criterion
        self.group = group
        self.lead = group is None or group.lead  # the rank that evaluates, logs and checkpoints
        self.ddp: nn.Module | None = None
        self.train_data, self.val_data, self.test_data = train, val, test
        self.device = lc.resolved_device
        self.fingerprint = model_fingerprint(model) if lc.checkpoint else ""
        self.w = trace(model, example_inputs).to(self.device)
        inputs = tuple(t.to(self.device) for t in as_input_tuple(example_inputs))
        self.inputs = inputs
        self.c = trace(self.w, inputs)  # a second copy, with shape metadata, on which scheme.pi runs
        # Fresh metadata before every C step: annotations merge with earlier ones, and a C step must not
        # inherit the previous iteration's masks. (Top-level assignment: deepcopy shares nested meta dicts.)
        self.pristine = [copy.deepcopy(n.meta.get(META)) for n in self.c.graph.nodes]
        self.names: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.elapsed_before = 0.0
        self.warned = False

    # -- small helpers ---------------------------------------------------------------------------------------
    def _reset_meta(self) -> None:
        for node, meta in zip(self.c.graph.nodes, self.pristine, strict=True):
            if meta is None:
                node.meta.pop(META, None)
            else:
                node.meta[META] = copy.deepcopy(meta)

    def _project(self) -> None:
        """theta = Delta(Pi(current values of c)), annotations rebuilt from scratch."""
        self._reset_meta()
        self.scheme.pi(self.c)
        self.scheme.delta(self.c)

    def _params(self, gm: nn.Module) -> list[torch.Tensor]:
        return [gm.get_parameter(n) for n in self.names]

    def _progress(self) -> bool:
        if not self.lead:
            return False
        p = self.lc.progress
        return logger.isEnabledFor(logging.INFO) if p is None else p

    @torch.no_grad()
    def _sync_rest(self) -> None:
        """Non-compressed parameters and buffers of c follow w (as in Condensa, where theta starts as w)."""
        compressed = set(self.names)
        w_params = dict(self.w.named_parameters())
        for name, p in self.c.named_parameters():
            if name not in compressed:
                p.copy_(w_params[name])
        w_buffers = dict(self.w.named_buffers())
        for name, b in self.c.named_buffers():
            b.copy_(w_buffers[name])

    # -- distributed helpers ---------------------------------------------------------------------------------
    def _model(self) -> nn.Module:
        """The module the L step runs: w itself, or w under DistributedDataParallel (built once per run)."""
        if self.group is None:
            return self.w
        if self.ddp is None:
            # DDP must be told about parameters a forward leaves unused, and that costs a graph walk per
            # step: probe once (eval mode, no statistics updated) and ask for it only when needed.
            params = [p for p in self.w.parameters() if p.requires_grad]
            was_training = self.w.training
            self.w.eval()
            try:
                out = [t for t in tree_leaves(self.w(*self.inputs))
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                grads = torch.autograd.grad(sum(t.sum() for t in out), params, allow_unused=True) if out else []
            finally:
                self.w.train(was_training)
            unused = not out or any(g is None for g in grads)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.w, device_ids=ids, find_unused_parameters=unused)
        return self.ddp

    @torch.no_grad()
    def _agree(self, j: int, lam: list[torch.Tensor]) -> None:
        """Check that every rank holds the same w, theta and lambda after iteration j (one small all-reduce)."""
        if self.group is None:
            return
        named = [(f"w.{k}", v) for k, v in self.w.state_dict().items()]
        named += [(f"theta.{n}", t) for n, t in zip(self.names, self._params(self.c), strict=True)]
        named += [(f"lambda.{n}", t) for n, t in zip(self.names, lam, strict=True)]
        dist_lc.check_identical(self.group, named, f"the state after L-C iteration {j}")

    # -- one iteration -----------------------------------------------------------------------------------------
    def _l_step(self, j: int, mu: float, lr: float, lam: list[torch.Tensor]) -> float:
        lc = self.lc
        n_iter = lc.sgd_iterations_first_l if j == 1 else lc.sgd_iterations_per_l
        params = [p for p in self.w.parameters() if p.requires_grad]
        index = {id(p): i for i, p in enumerate(params)}
        w_c = self._params(self.w)
        theta = self._params(self.c)
        pos = [index.get(id(p)) for p in w_c]
        keep = [i for i, k in enumerate(pos) if k is not None]  # compressed and trainable
        w_c, theta, lam = [w_c[i] for i in keep], [theta[i] for i in keep], [lam[i] for i in keep]
        pos = [pos[i] for i in keep]
        velocity = [torch.zeros_like(p) for p in params]  # momentum reset at each L step
        decay = (lc.lr_end / lr) ** (1.0 / n_iter) if lc.lr_end is not None else 1.0
        m, wd = lc.momentum, lc.weight_decay
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        gen = torch.Generator().manual_seed(_seed(lc.seed, j, 0))
        model = self._model()
        if self.group is None:
            stream = self.train_data.shuffled(gen)
        else:  # the same global batches on every rank, each keeping its share; dropout differs per rank
            stream = self.train_data.shuffled(gen, rank=self.group.rank, world_size=self.group.world_size)
            torch.manual_seed(_seed(lc.seed * 65_537 + self.group.rank + 1, j, 3))
        self.w.train()
        bar = tqdm(total=n_iter, desc=f"L-step {j}", ascii=True, leave=False, disable=not self._progress())
        for _ in range(n_iter):
            x, y = next(stream)
            loss = self.criterion(model(x), y)  # under DDP, backward averages the gradients over ranks
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                grads = [p.grad for p in params]
                if any(g is None for g in grads):  # parameters the forward did not use this time
                    for p, g in zip(params, grads, strict=True):
                        if g is None:
                            p.grad = torch.zeros_like(p)
                    grads = [p.grad for p in params]
                g_c = [grads[k] for k in pos]
                # The penalty's gradient, mu (w - theta) - lambda, added in three vectorised passes.
                torch._foreach_add_(g_c, w_c, alpha=mu)
                torch._foreach_sub_(g_c, theta, alpha=mu)
                torch._foreach_sub_(g_c, lam)
                if wd:
                    torch._foreach_add_(grads, params, alpha=wd)
                if m:  # Condensa's SGD: v = m v - lr g; w += m v - lr g (Nesterov form)
                    torch._foreach_mul_(velocity, m)
                    torch._foreach_add_(velocity, grads, alpha=-lr)
                    torch._foreach_add_(params, velocity, alpha=m)
                torch._foreach_add_(params, grads, alpha=-lr)
                loss_sum += loss.detach()
            lr *= decay
            bar.update()
        bar.close()
        for p in params:
            p.grad = None
        if self.group is not None:
            # The mean loss over the global batches; BatchNorm running statistics follow rank 0 (as DDP's
            # broadcast_buffers does at each forward), so the C step sees the same w on every rank.
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.group.world_size
            dist_lc.broadcast_tensors(list(self.w.buffers()))
        return float(loss_sum) / n_iter

    @torch.no_grad()
    def _c_step(self, j: int, mu: float, lam: list[torch.Tensor]) -> None:
        theta = self._params(self.c)
        if j > 0:  # theta <- w - lambda / mu, then projected; at j = 0, c already holds w
            torch._foreach_copy_(theta, self._params(self.w))
            torch._foreach_add_(theta, lam, alpha=-1.0 / mu)
            self._sync_rest()
        self._project()
        if j > 0 and not self.warned:
            extra = [n for n in annotations(self.c) if n not in set(self.names)]
            if extra:  # the L step trains these without a penalty; say so rather than stay silent
                self.warned = True
                logger.warning("[fxcondensa] iteration %d: the scheme now also compresses %s, which iteration 0 "
                               "left alone; L-C constrains only the parameters compressed at iteration 0",
                               j, ", ".join(extra))
        if j > 0:  # lambda <- lambda - mu (w - theta), with the projected theta
            theta = self._params(self.c)
            torch._foreach_add_(lam, theta, alpha=mu)
            torch._foreach_sub_(lam, self._params(self.w), alpha=mu)

    def _evaluate(self, j: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(_seed(self.lc.seed, j, 1))
        recalibrate_bn(self.c, self.train_data.shuffled(gen), self.lc.bn_batches)
        metrics: dict[str, float] = {}
        for key, data in (("val", self.val_data), ("test", self.test_data)):
            if data is not None:
                loss, acc = evaluate(self.c, data, self.criterion)
                metrics[f"{key}_loss"], metrics[f"{key}_accuracy"] = loss, acc
                logger.info("[fxcondensa] Nested (theta) %s\tloss=%.5f, top1:%.2f", key.upper(), loss, acc)
        return metrics

    def _is_better(self, metrics: dict[str, float]) -> bool:
        if self.best is None:
            return True
        for key in ("val", "test"):  # validation decides; without it, test (as Condensa); else the latest
            if f"{key}_accuracy" in metrics:
                a, b = metrics[f"{key}_accuracy"], self.best[f"{key}_accuracy"]
                return a > b or (a == b and metrics[f"{key}_loss"] < self.best[f"{key}_loss"])
        return True

    @torch.no_grad()
    def _keep_best(self, j: int, metrics: dict[str, float]) -> None:
        state = self.c.state_dict()
        if self.best_state is None:
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
        else:  # reuse the storage: no new allocation per improvement
            for k, v in state.items():
                self.best_state[k].copy_(v)
        self.best = {"iteration": j, **metrics}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.lc.config.items() if k not in ("device", "checkpoint")}
        cfg["scheme"] = repr(self.scheme)
        cfg["model_sha256"] = self.fingerprint
        return cfg

    def _save(self, next_j: int, lam: list[torch.Tensor], elapsed: float) -> None:
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        state = {
            "format": FORMAT, "version": VERSION, "key": self._resume_key(),
            "next_iteration": next_j, "names": list(self.names), "elapsed": elapsed,
            "w": {k: cpu(v) for k, v in self.w.state_dict().items()},
            "theta": {n: cpu(t) for n, t in zip(self.names, self._params(self.c), strict=True)},
            "lambda": {n: cpu(t) for n, t in zip(self.names, lam, strict=True)},
            "history": self.history,
            "best": None if self.best is None else dict(self.best),
            "best_state": None if self.best_state is None else {k: cpu(v) for k, v in self.best_state.items()},
            "world_size": 1 if self.group is None else self.group.world_size,
        }
        save_atomic(state, self.lc.checkpoint)  # type: ignore[arg-type]

    @torch.no_grad()
    def _restore(self, state: dict[str, Any]) -> tuple[int, list[torch.Tensor]]:
        path = self.lc.checkpoint
        diff = config_mismatch(state["key"], self._resume_key())
        if diff:
            raise ValueError(f"L-C checkpoint {path!r} belongs to another run:\n  " + "\n  ".join(diff)
                             + "\nResume with the same model, scheme and LC arguments, or pass another "
                             "checkpoint path (or delete the file) to start over.")
        self.names = list(state["names"])
        self.w.load_state_dict(state["w"])
        for t, saved in zip(self._params(self.c), (state["theta"][n] for n in self.names), strict=True):
            t.copy_(saved)
        lam = [state["lambda"][n].to(self.device) for n in self.names]
        self.history = list(state["history"])
        self.best = state["best"]
        if state.get("best_state") is not None:
            self.best_state = {k: v.to(self.device) for k, v in state["best_state"].items()}
        self.elapsed_before = float(state["elapsed"])
        logger.info("[fxcondensa] Resuming L-C from %s at iteration %d", path, state["next_iteration"])
        ranks, saved_ranks = 1 if self.group is None else self.group.world_size, int(state.get("world_size", 1))
        if ranks != saved_ranks:
            logger.warning("[fxcondensa] the checkpoint was written by a run on %d process(es), this one runs on "
                           "%d: the rest of the run differs from an uninterrupted one in float reduction order "
                           "(and dropout masks), not in its hyper-parameters", saved_ranks, ranks)
        return int(state["next_iteration"]), lam

    def _load_resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None. Distributed: rank 0 reads it and sends it to the others
        (their file system may not have it); a file rank 0 refuses stops every rank with the same error."""
        path = self.lc.checkpoint
        if self.group is None:
            return load_checkpoint(path) if path and os.path.exists(path) else None
        reply: tuple[str, Any] = ("none", None)
        if self.lead and path and os.path.exists(path):
            try:
                state = load_checkpoint(path)
                # The followers never read best_state (rank 0 broadcasts the final best at the end).
                reply = ("state", {k: v for k, v in state.items() if k != "best_state"})
            except Exception as exc:  # sent to the other ranks, then raised here too
                reply = ("error", f"{type(exc).__name__}: {exc}")
                dist_lc.broadcast_object(self.group, reply)
                raise
        kind, payload = dist_lc.broadcast_object(self.group, reply)
        if kind == "error":
            raise RuntimeError(f"distributed L-C: rank 0 could not resume from its checkpoint: {payload}")
        if kind == "state" and self.lead:
            return state
        return payload

    # -- the loop --------------------------------------------------------------------------------------------
    def execute(self) -> tuple[fx.GraphModule, dict[str, Any]]:
        lc = self.lc
        start = time.perf_counter()
        logger.info("[fxcondensa] LC ENGINE CONFIG [%s]", ", ".join(f"{k}={v!r}" for k, v in lc.config.items()))
        first, lam = 0, None
        if self.group is not None:  # every rank starts from rank 0's model (and names its checkpoint the same)
            with torch.no_grad():
                dist_lc.broadcast_tensors(list(self.w.state_dict().values()) + list(self.c.state_dict().values()))
            self.fingerprint = dist_lc.broadcast_object(self.group, self.fingerprint)
        resume = self._load_resume_state() if lc.checkpoint else None
        if resume is not None:
            first, lam = self._restore(resume)
        for j in range(first, lc.steps):
            mu, lr = lc.mu_at(j), lc.lr_at(j)
            logger.info("[fxcondensa] LC Iteration %d:\tmu=%.5f, lr=%.5f", j, mu, lr)
            # The iteration's own seeds, in a forked RNG: the user's global RNG state is left as it was.
            devices = []
            if self.device.type == "cuda":
                devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                torch.manual_seed(_seed(lc.seed, j, 2))
                if j == 0:
                    logger.info("[fxcondensa] Skipping first L-step")
                    l_loss = None
                    self._c_step(0, 0.0, [])
                    self.names = list(annotations(self.c)) or [n for n, p in self.c.named_parameters()
                                                                if p.is_floating_point()]
                    lam = [torch.zeros_like(t) for t in self._params(self.c)]
                else:
                    assert lam is not None
                    l_loss = self._l_step(j, mu, lr, lam)
                    self._c_step(j, mu, lam)
                self._agree(j, lam)
                metrics = self._evaluate(j) if self.lead else {}
            elapsed = self.elapsed_before + time.perf_counter() - start
            entry: dict[str, Any] | None = None
            better = False
            if self.lead:
                entry = {"iteration": j, "mu": mu, "lr": lr, "l_loss": l_loss, **metrics,
                         "density": density(self.c), "elapsed": elapsed}
                better = self._is_better(metrics)
            if self.group is not None:  # the followers wait here for rank 0's evaluation
                entry, better, metrics = dist_lc.broadcast_object(self.group, (entry, better, metrics))
            assert entry is not None
            self.history.append(entry)
            if better:
                basis = "VAL" if "val_accuracy" in metrics else "TEST" if "test_accuracy" in metrics else "most recent"
                logger.info("[fxcondensa] Saving model based on %s", basis)
                if self.lead:
                    self._keep_best(j, metrics)
                else:  # rank 0 holds the best state and sends it at the end
                    self.best = {"iteration": j, **metrics}
            if lc.checkpoint and self.lead:
                self._save(j + 1, lam, elapsed)  # type: ignore[arg-type]
        return self._finish(start)

    @torch.no_grad()
    def _finish(self, start: float) -> tuple[fx.GraphModule, dict[str, Any]]:
        assert self.best is not None
        if self.lead:
            assert self.best_state is not None
            self.c.load_state_dict(self.best_state)
        if self.group is not None:  # every rank returns rank 0's best (BN statistics recalibrated there)
            dist_lc.broadcast_tensors(list(self.c.state_dict().values()))
            if not self.lead:
                self.best_state = {k: v.detach().clone() for k, v in self.c.state_dict().items()}
        assert self.best_state is not None
        # Rebuild the annotations (masks, dtypes) of the best theta: Pi is a projection, so projecting a
        # point of the compressed set leaves it where it is; any scheme for which that fails keeps its values.
        values = [t.clone() for t in self._params(self.c)]
        self._project()
        moved = [n for n, a, b in zip(self.names, values, self._params(self.c), strict=True) if not torch.equal(a, b)]
        if moved:
            logger.warning("[fxcondensa] re-applying the scheme to the best iteration changed %s; keeping the "
                           "evaluated values (the scheme's pi is not idempotent)", ", ".join(moved))
            self.c.load_state_dict(self.best_state)
        metrics = {k: v for k, v in self.best.items() if k != "iteration"}
        stats = {
            "best_iteration": self.best["iteration"],
            "history": self.history,
            "elapsed_lc": self.elapsed_before + time.perf_counter() - start,
            "result_metrics": metrics,
        }
        return self.c, stats

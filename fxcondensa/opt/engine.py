"""The training loop shared by ``LC``, ``FineTune`` and ``Gradual``: L steps, C steps, evaluation, the best
iteration, checkpoints and torchrun, following the optimizer's plan (see ``fxcondensa.opt.base``).

Iteration 0 is direct compression (``theta = Pi(w)``, no training). Iteration ``j >= 1``:

- an L step of ``len(plan.step_lrs(j))`` SGD minibatches (Condensa's Nesterov-form momentum, reset at each
  L step). An L-C step (``plan.masked(j)`` False) adds the penalty ``mu/2 ||w - theta - lambda/mu||^2``; a
  masked step first sets the compressed weights to ``theta`` and keeps its zeros after every update (the
  storage dtypes are applied again by the next projection);
- a C step: ``theta = Pi(w - lambda/mu)`` and ``lambda <- lambda - mu (w - theta)`` after an L-C step,
  ``theta = Pi_j(w)`` with the plan's scheme of that iteration after a masked one;
- ``theta`` is evaluated (BatchNorm statistics first recalibrated on training batches); among the
  iterations whose projection is in the user's compressed set, the best on validation is returned.

Masks are the zeros of ``theta``: what any scheme (also a user's own with only ``pi``/``delta``) leaves
exactly zero stays zero.

Distributed (``torchrun``): the L step runs under DistributedDataParallel without per-step buffer
broadcasts (BatchNorm uses each rank's batch statistics; rank 0's running statistics are sent once after
the L step, in one flattened broadcast per dtype); see ``fxcondensa.opt.distributed``.

Devices: everything the loop creates is made on ``self.device`` on purpose, except the batch-order
generator (a CPU ``torch.Generator``: device generators differ across devices and the order must not).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from ..capture.graph import as_input_tuple, trace
from ..capture.modes import eval_mode
from ..capture.records import META
from ..compression.apply import density
from ..passes.annotate import annotations
from . import distributed as dist_lc
from .checkpoint import FORMAT, VERSION, config_mismatch, load_checkpoint, model_fingerprint, save_atomic
from .training import Batches, evaluate, recalibrate_bn

__all__: list[str] = []

logger = logging.getLogger("fxcondensa")


def _seed(seed: int, iteration: int, salt: int) -> int:
    """A separate RNG seed per (run seed, iteration, purpose): an iteration's randomness depends on nothing
    else, which is what makes a resumed run equal to an uninterrupted one."""
    return (seed * 1_000_003 + iteration * 8 + salt) % (2**63)


class _Run:
    """The state of one L-C run: w (trained), theta (held by the GraphModule ``c``), lambda, mu, history."""

    def __init__(self, lc: Any, model: nn.Module, scheme: Any, train: Batches, val: Batches | None,
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
        self.l_seconds = 0.0  # time in L steps (the part autocast and TF32 speed up)

    # -- small helpers ---------------------------------------------------------------------------------------
    def _reset_meta(self) -> None:
        for node, meta in zip(self.c.graph.nodes, self.pristine, strict=True):
            if meta is None:
                node.meta.pop(META, None)
            else:
                node.meta[META] = copy.deepcopy(meta)

    def _project(self, scheme: Any = None) -> None:
        """theta = Delta(Pi(current values of c)), annotations rebuilt from scratch."""
        scheme = self.scheme if scheme is None else scheme
        self._reset_meta()
        scheme.pi(self.c)
        scheme.delta(self.c)

    def _params(self, gm: nn.Module) -> list[torch.Tensor]:
        return [gm.get_parameter(n) for n in self.names]

    def _progress(self) -> bool:
        if not self.lead:
            return False
        p = self.lc.progress
        return logger.isEnabledFor(logging.INFO) if p is None else p

    def _bar(self) -> bool:
        """A live tqdm bar only on a terminal: written to a file, its carriage returns pile up by thousands."""
        return self._progress() and sys.stderr.isatty()

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
            with eval_mode(self.w):
                out = [t for t in tree_leaves(self.w(*self.inputs))
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                grads = torch.autograd.grad(sum(t.sum() for t in out), params, allow_unused=True) if out else []
            unused = not out or any(g is None for g in grads)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers=False: BatchNorm trains on each rank's batch statistics, and rank 0's running
            # statistics are sent once after the L step (_l_step), not before every forward.
            self.ddp = DistributedDataParallel(self.w, device_ids=ids, find_unused_parameters=unused,
                                               broadcast_buffers=False)
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
    def _l_step(self, j: int, mu: float, lam: list[torch.Tensor]) -> torch.Tensor | None:
        """Iteration j's L step; returns its mean loss as a 0-d tensor on the device (no synchronisation)."""
        lc = self.lc
        lrs = lc.step_lrs(j)
        if not lrs:
            return None
        start = time.perf_counter()
        masked = lc.masked(j)
        params = [p for p in self.w.parameters() if p.requires_grad]
        index = {id(p): i for i, p in enumerate(params)}
        w_c = self._params(self.w)
        theta = self._params(self.c)
        pos = [index.get(id(p)) for p in w_c]
        keep = [i for i, k in enumerate(pos) if k is not None]  # compressed and trainable
        w_c, theta, lam = [w_c[i] for i in keep], [theta[i] for i in keep], [lam[i] for i in keep]
        pos = [pos[i] for i in keep]
        masks: list[torch.Tensor] = []
        if masked or lc.restart(j):  # restart from the projection (masked: and keep its zeros)
            with torch.no_grad():
                torch._foreach_copy_(w_c, theta)
                masks = keep_masks(theta) if masked else []
                self._sync_rest_to_w()
        velocity = [torch.zeros_like(p) for p in params]  # momentum reset at each L step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        gen = torch.Generator(device="cpu").manual_seed(_seed(lc.seed, j, 0))
        model = self._model()
        if self.group is None:
            stream = self.train_data.shuffled(gen)
        else:  # the same global batches on every rank, each keeping its share; dropout differs per rank
            stream = self.train_data.shuffled(gen, rank=self.group.rank, world_size=self.group.world_size)
            torch.manual_seed(_seed(lc.seed * 65_537 + self.group.rank + 1, j, 3))
        self.w.train()
        bar = tqdm(total=len(lrs), desc=lc.say("step", j=j), ascii=True, leave=False, disable=not self._bar())
        with _precision(self.device, lc.tf32):
            for lr in lrs:
                x, y = next(stream)
                loss = lc.l_loss(model, x, y, self.criterion)  # under DDP, backward averages
                for p in params:
                    p.grad = None
                loss.backward()
                with torch.no_grad():
                    l_update(params, _grads(params), velocity, pos, theta, lam, masks, mu=0.0 if masked else mu,
                             lr=lr, momentum=lc.momentum, weight_decay=lc.weight_decay)
                    loss_sum += loss.detach()
                bar.update()
        bar.close()
        for p in params:
            p.grad = None
        if self.group is not None:
            # The mean loss over the global batches; BatchNorm running statistics follow rank 0 (one flattened
            # broadcast per dtype), so the C step sees the same w on every rank.
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.group.world_size
            dist_lc.broadcast_tensors(list(self.w.buffers()))
        mean = loss_sum / len(lrs)
        self.l_seconds += time.perf_counter() - start
        if self._progress() and not self._bar():  # one plain line per L step instead of a bar
            logger.info("[fxcondensa] %s: %d minibatches, mean loss %.4f, %.1f s", lc.say("step", j=j), len(lrs),
                        float(mean), time.perf_counter() - start)
        return mean

    @torch.no_grad()
    def _sync_rest_to_w(self) -> None:
        """Before a masked L step w restarts from c: its non-compressed parameters too (they may have been
        changed by the projection, e.g. a BatchNorm shift zeroed with its channel)."""
        w_params = dict(self.w.named_parameters())
        for name, p in self.c.named_parameters():
            w_params[name].copy_(p)

    @torch.no_grad()
    def _c_step(self, j: int, mu: float, lam: list[torch.Tensor]) -> None:
        theta = self._params(self.c)
        plain = j == 0 or self.lc.masked(j) or not mu
        if j > 0:  # theta <- w - lambda / mu (w after a masked L step), then projected; at j = 0, c holds w
            torch._foreach_copy_(theta, self._params(self.w))
            if not plain:
                torch._foreach_add_(theta, lam, alpha=-1.0 / mu)
            self._sync_rest()
        self._project(self.lc.scheme_at(self.scheme, j))
        if j > 0 and not self.warned:
            extra = [n for n in annotations(self.c) if n not in set(self.names)]
            if extra:  # the L step trains these without a penalty; say so rather than stay silent
                self.warned = True
                logger.warning("[fxcondensa] iteration %d: the scheme now also compresses %s, which iteration 0 "
                               "left alone; %s", j, ", ".join(extra), self.lc.say("untracked"))
        if j > 0 and not plain:  # lambda <- lambda - mu (w - theta), with the projected theta
            multiplier_update(lam, self._params(self.c), self._params(self.w), mu)

    def _evaluate(self, j: int) -> dict[str, float]:
        gen = torch.Generator(device="cpu").manual_seed(_seed(self.lc.seed, j, 1))
        recalibrate_bn(self.c, self.train_data.shuffled(gen), self.lc.bn_batches)
        metrics: dict[str, float] = {}
        for key, data in (("val", self.val_data), ("test", self.test_data)):
            if data is not None:
                loss, acc = evaluate(self.c, data, self.criterion)
                metrics[f"{key}_loss"], metrics[f"{key}_accuracy"] = loss, acc
                logger.info("[fxcondensa] %s", self.lc.say("evaluation", j=j, key=key.upper(), loss=loss, acc=acc))
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
        diff = config_mismatch(state["key"], self._resume_key(), self.lc.defaults)
        if diff:
            raise ValueError(f"L-C checkpoint {path!r} belongs to another run:\n  " + "\n  ".join(diff)
                             + "\nResume with the same model, scheme and LC arguments, or pass another "
                             "checkpoint path (or delete the file) to start over.")
        self.names = list(state["names"])
        self.w.load_state_dict(state["w"])
        self._sync_rest()  # c's parameters that are not compressed follow w, as after every C step
        for t, saved in zip(self._params(self.c), (state["theta"][n] for n in self.names), strict=True):
            t.copy_(saved)
        lam = [state["lambda"][n].to(self.device) for n in self.names]
        self.history = list(state["history"])
        self.best = state["best"]
        if state.get("best_state") is not None:
            self.best_state = {k: v.to(self.device) for k, v in state["best_state"].items()}
        self.elapsed_before = float(state["elapsed"])
        logger.info("[fxcondensa] %s", self.lc.say("resume", path=path, j=state["next_iteration"]))
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
        # Each optimizer writes its own words (lc.say, lc.opening): LC Condensa's, the others theirs.
        logger.info("[fxcondensa] %s", lc.say("config", config=", ".join(f"{k}={v!r}" for k, v in lc.config.items())))
        first, lam = 0, None
        if self.group is not None:  # every rank starts from rank 0's model (and names its checkpoint the same)
            with torch.no_grad():
                dist_lc.broadcast_tensors(list(self.w.state_dict().values()) + list(self.c.state_dict().values()))
            self.fingerprint = dist_lc.broadcast_object(self.group, self.fingerprint)
        resume = self._load_resume_state() if lc.checkpoint else None
        if resume is not None:
            first, lam = self._restore(resume)
        for j in range(first, lc.steps):
            mu, lrs = lc.mu_at(j), lc.step_lrs(j)
            lr = lrs[0] if lrs else 0.0
            for line in lc.opening(j, mu, lrs):
                logger.info("[fxcondensa] %s", line)
            # The iteration's own seeds, in a forked RNG: the user's global RNG state is left as it was.
            devices = []
            if self.device.type == "cuda":
                devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                torch.manual_seed(_seed(lc.seed, j, 2))
                if j == 0:
                    l_loss = None
                    self._c_step(0, 0.0, [])
                    self.names = list(annotations(self.c)) or [n for n, p in self.c.named_parameters()
                                                                if p.is_floating_point()]
                    lam = [torch.zeros_like(t) for t in self._params(self.c)]
                else:
                    assert lam is not None
                    mean = self._l_step(j, mu, lam)
                    l_loss = None if mean is None else float(mean)
                    self._c_step(j, mu, lam)
                self._agree(j, lam)
                # An iteration that cannot be returned (Gradual below its target) is not evaluated.
                metrics = self._evaluate(j) if self.lead and lc.in_target(j) else {}
            elapsed = self.elapsed_before + time.perf_counter() - start
            entry: dict[str, Any] | None = None
            better = False
            if self.lead:
                entry = {"iteration": j, "mu": mu, "lr": lr, "l_loss": l_loss, **metrics,
                         "density": density(self.c), "elapsed": elapsed}
                better = lc.in_target(j) and self._is_better(metrics)
            if self.group is not None:  # the followers wait here for rank 0's evaluation
                entry, better, metrics = dist_lc.broadcast_object(self.group, (entry, better, metrics))
            assert entry is not None
            self.history.append(entry)
            if better:
                basis = "VAL" if "val_accuracy" in metrics else "TEST" if "test_accuracy" in metrics else "most recent"
                logger.info("[fxcondensa] %s", lc.say("best", j=j, basis=basis))
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
            "elapsed_l_steps": self.l_seconds,
            "budget": self.lc.budget,
            "result_metrics": metrics,
        }
        return self.c, stats


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients, zeros (on each parameter's device) for parameters this forward did not use."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


@torch.no_grad()
def keep_masks(theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """1 where ``theta`` is non-zero, 0 where the projection zeroed it, in theta's dtype and on its device."""
    return [(t != 0).to(dtype=t.dtype, device=t.device) for t in theta]


@torch.no_grad()
def l_update(params: list[torch.Tensor], grads: list[torch.Tensor], velocity: list[torch.Tensor], pos: list[int],
             theta: list[torch.Tensor], lam: list[torch.Tensor], masks: list[torch.Tensor], *, mu: float, lr: float,
             momentum: float, weight_decay: float) -> None:
    """One L-step update after backward, in place: the penalty's gradient ``mu (w - theta) - lambda`` added
    to the compressed parameters ``params[pos[i]]`` (when ``mu``), the SGD step, then the masks (when given)."""
    w_c = [params[k] for k in pos]
    if mu:  # three vectorised passes
        g_c = [grads[k] for k in pos]
        torch._foreach_add_(g_c, w_c, alpha=mu)
        torch._foreach_sub_(g_c, theta, alpha=mu)
        torch._foreach_sub_(g_c, lam)
    sgd_update(params, grads, velocity, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if masks:
        torch._foreach_mul_(w_c, masks)


@torch.no_grad()
def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], velocity: list[torch.Tensor], *, lr: float,
               momentum: float, weight_decay: float) -> None:
    """Condensa's SGD, in place: ``v = m v - lr g; w += m v - lr g`` (Nesterov form), L2 ``weight_decay``.

    Only Python scalars meet the tensors, so everything stays on the tensors' own device.
    """
    if weight_decay:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    if momentum:
        torch._foreach_mul_(velocity, momentum)
        torch._foreach_add_(velocity, grads, alpha=-lr)
        torch._foreach_add_(params, velocity, alpha=momentum)
    torch._foreach_add_(params, grads, alpha=-lr)


@torch.no_grad()
def multiplier_update(lam: list[torch.Tensor], theta: list[torch.Tensor], w: list[torch.Tensor], mu: float) -> None:
    """``lambda <- lambda - mu (w - theta)``, in place."""
    torch._foreach_add_(lam, theta, alpha=mu)
    torch._foreach_sub_(lam, w, alpha=mu)


class _precision:
    """TF32 matmuls and convolutions during the L step on CUDA when asked (restored afterwards): they round
    inputs to 10 mantissa bits, harmless for SGD's noisy updates; evaluation and C steps keep full fp32."""

    def __init__(self, device: torch.device, tf32: bool):
        self.on = tf32 and device.type == "cuda"

    def __enter__(self) -> None:
        if self.on:
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

"""``Distill``: compress once, then recover by knowledge distillation from the dense model.

The plan is ``FineTune``'s (masked SGD from the projection, a warm-up then one cosine over the budget,
``evaluations`` projections evaluated along the way, the best returned); only the loss of a minibatch differs. The teacher is
the dense model the run starts from, captured the same way as the student, in eval mode, without gradients
and optionally in a lower precision. The loss of a minibatch is::

    T^2 * KL(softmax(teacher / T) || softmax(student / T))       (averaged over samples, or tokens)
    + task_weight * criterion(student output, targets)
    + hidden_weight * mean over ``hidden`` of ||s - t||^2 / ||t||^2  (intermediate states, by node name)

Outputs are logits over classes (a classifier's ``(batch, classes)``) or over a vocabulary (a causal LM's
``(batch, tokens, vocab)``; a Hugging Face ``ModelOutput`` gives its ``.logits``); ``dim`` names the class
dimension (the last by default). Checkpoints, progress and torchrun work as for ``FineTune`` (the teacher is
rebuilt from the model on resume; it holds no state of its own).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture.graph import as_input_tuple, logits_of, trace
from ..capture.tap import tap
from . import distributed as dist_lc
from .base import check_float
from .finetune import FineTune

__all__ = ["Distill", "kd_loss", "shard"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Hinton's distillation loss: ``T^2 KL(p_teacher || p_student)`` at temperature ``T``, summed over the
    class dimension ``dim`` and averaged over every other position (samples, or tokens of a sequence).
    Computed in float32 whatever the logits' dtype.

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> round(kd_loss(s, t).item(), 4), kd_loss(t, t).item()
        (1.5232, 0.0)
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Distill: the student's logits have shape {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)}; both must come from the same model (the dense one before "
                         "compression), with the same inputs")
    log_s = F.log_softmax(student.float() / temperature, dim=dim)
    log_t = F.log_softmax(teacher.float() / temperature, dim=dim)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim)
    return kl.mean() * temperature**2


def _hidden_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the teacher's energy: layers of different scales weigh alike."""
    t = teacher.float()
    return (student.float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=torch.finfo(torch.float32).tiny)


class _Recorder:
    """Keeps the latest value of each tapped node, by the name the user gave."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def observers(self, names: Sequence[str]) -> dict[str, Any]:
        return {name: (lambda v, name=name: self.values.__setitem__(name, v)) for name in names}


def _tap(gm: fx.GraphModule, names: Sequence[str], owner: str) -> tuple[fx.GraphModule, _Recorder]:
    """A module running ``gm``'s graph on ``gm``'s own parameters that also records the nodes ``names``."""
    recorder = _Recorder()
    try:
        return tap(gm, recorder.observers(names), owner), recorder
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{owner}: ", f"{owner}: hidden=", 1)) from None


def shard(module: nn.Module) -> bool:
    """Shard ``module``'s parameters across the live process group with FSDP2, in place: every submodule that
    owns parameters directly gets its own unit (gathered only while it runs), the root keeps the rest (a
    graph's own attributes). Returns False (nothing done) without a process group of several ranks.

    Example:
        >>> import torch
        >>> shard(torch.nn.Linear(2, 2))  # one process: nothing to shard across
        False
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import fully_shard

    leaves = [m for name, m in module.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    for m in reversed(leaves):  # innermost first: a unit manages the parameters no inner unit took
        fully_shard(m)
    fully_shard(module)
    return True


class Distill(FineTune):
    """Direct compression followed by masked distillation from the dense model, first-class like ``FineTune``.

    Args:
        iterations: SGD minibatches in all (the budget). evaluations: how many times the result is projected,
            evaluated (and checkpointed) along the way; the best evaluation is returned.
        temperature: of the softmax on both sides of the KL term (> 0; the term is scaled by its square).
        task_weight: weight of the task loss ``criterion(student output, targets)`` added to the KL term
            (0: distillation only; the targets are then not read).
        hidden: names of intermediate values matched between student and teacher (node names of the captured
            graph, or names of the modules it calls); hidden_weight: the weight of their relative squared
            error. Not under torchrun (the tapped forward would bypass DistributedDataParallel).
        teacher_dtype: ``None`` (the model's precision), ``"bfloat16"`` or ``"float16"``: the teacher is
            captured in that precision (half its memory; its logits are read in float32).
        dim: the class dimension of the logits (-1: a classifier's ``(batch, classes)`` and a causal LM's
            ``(batch, tokens, vocab)``).
        shard_teacher: under torchrun with several ranks, shard the teacher's parameters across the ranks with
            FSDP2 (``torch.distributed.fsdp.fully_shard``, each layer that owns parameters, then the rest): each
            rank keeps ``1/world_size`` of the teacher and gathers one layer at a time during its forward, whose
            outputs are those of the whole teacher. No effect in one process. (The student is not sharded: it
            trains under DistributedDataParallel, as FineTune's.)
        lr, warmup: the peak learning rate and the share of the budget over which it rises linearly to it before
            the cosine (as for ``FineTune``, whose defaults are 0.05 and 0). Distillation's defaults are larger,
            0.15 after a warm-up over the first 10%: the KL term's gradient, ``p_student - p_teacher``, is far
            smaller than a task loss's ``p_student - onehot`` once the student is near its teacher, so it takes
            a larger rate to move as far; the warm-up keeps the first steps, where the freshly compressed
            student is furthest from the teacher, from overshooting (on a small Llama, without it 0.2 gained
            less and 0.4 diverged). With ``task_weight`` > 0 the task loss's larger gradient may want ``lr``
            nearer 0.05 (0.2 with ``task_weight=0.5`` diverged on that Llama).
        l_batch_size, momentum, weight_decay, val_batch_size, device, seed, checkpoint, progress,
        bn_batches, autocast, tf32: as for :class:`fxcondensa.opt.FineTune`.

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import Prune
        >>> data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
        >>> kd = condensa.opt.Distill(iterations=6, evaluations=2, l_batch_size=64, temperature=2.0, device="cpu")
        >>> c = condensa.Compressor(kd, Prune(0.1), condensa.models.LeNet5(), data, data, data,
        ...                         torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> len(c.statistics["history"]), round(c.statistics["density"], 2), c.statistics["budget"]
        (3, 0.1, 6)
    """

    _HYPER = (*FineTune._HYPER, "temperature", "task_weight", "hidden", "hidden_weight", "teacher_dtype", "dim",
              "shard_teacher")

    def __init__(self, iterations: int = 1000, *, temperature: float = 1.0, task_weight: float = 0.0,
                 hidden: Sequence[str] | str = (), hidden_weight: float = 1.0, teacher_dtype: Any = None,
                 dim: int = -1, shard_teacher: bool = False, evaluations: int = 4, l_batch_size: int = 128,
                 lr: float = 0.15, warmup: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 val_batch_size: int = 256, device: Any = None, seed: int = 0,
                 checkpoint: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 bn_batches: int = 20, autocast: str | None = None, tf32: bool = False):
        super().__init__(iterations, evaluations=evaluations, l_batch_size=l_batch_size, lr=lr, warmup=warmup,
                         momentum=momentum, weight_decay=weight_decay, val_batch_size=val_batch_size, device=device,
                         seed=seed, checkpoint=checkpoint, progress=progress, bn_batches=bn_batches,
                         autocast=autocast, tf32=tf32)
        self.temperature = check_float("Distill", "temperature", temperature, 0.0, low_open=True)
        self.task_weight = check_float("Distill", "task_weight", task_weight, 0.0)
        self.hidden_weight = check_float("Distill", "hidden_weight", hidden_weight, 0.0)
        names = [hidden] if isinstance(hidden, str) else hidden
        if not isinstance(names, Sequence) or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"Distill: hidden must be a node name or a list of node names of the captured model "
                            f"(e.g. ['add_3', 'add_7']), got {hidden!r}")
        self.hidden = list(names)
        if isinstance(teacher_dtype, torch.dtype):
            teacher_dtype = str(teacher_dtype).removeprefix("torch.")
        if teacher_dtype is not None and teacher_dtype not in _DTYPES:
            raise ValueError(f"Distill: teacher_dtype must be None (the model's own precision), 'bfloat16' or "
                             f"'float16', got {teacher_dtype!r}")
        self.teacher_dtype = teacher_dtype
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"Distill: dim must be an int, the class dimension of the logits (-1 for a classifier's "
                            f"(batch, classes) or an LM's (batch, tokens, vocab)), got {dim!r}")
        self.dim = dim
        if not isinstance(shard_teacher, bool):
            raise TypeError(f"Distill: shard_teacher must be True or False, got {shard_teacher!r}")
        self.shard_teacher = shard_teacher
        self._sharded = False
        self._teacher: nn.Module | None = None
        self._taps: dict[int, tuple[nn.Module, _Recorder]] = {}

    def compress(self, model: nn.Module, scheme: Any, train: Any, val: Any, test: Any, criterion: Any,
                 example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
        """As :meth:`FineTune.compress`, the dense ``model`` also serving as the teacher."""
        if self.hidden and self.hidden_weight and dist_lc.world_size_from_env() > 1:
            raise ValueError("Distill: hidden-state matching (hidden=...) does not run under torchrun with several "
                             "processes; drop hidden (or set hidden_weight=0) for a distributed run")
        self._teacher = self._build_teacher(model, example_inputs)
        try:
            return super().compress(model, scheme, train, val, test, criterion, example_inputs)
        finally:
            self._teacher, self._taps, self._sharded = None, {}, False

    def _build_teacher(self, model: nn.Module, example_inputs: Any) -> nn.Module:
        dtype = _DTYPES.get(self.teacher_dtype or "")
        source, inputs = model, example_inputs
        if dtype is not None:  # captured in its precision: a capture bakes dtypes into its graph
            source = copy.deepcopy(model).to(dtype)
            inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in as_input_tuple(example_inputs))
        teacher = trace(source, inputs).to(self.resolved_device).eval()
        teacher.requires_grad_(False)
        if self.hidden and self.hidden_weight:
            teacher, recorder = _tap(teacher, self.hidden, "Distill")
            self._taps[id(teacher)] = (teacher, recorder)
        return teacher

    def _student(self, model: nn.Module) -> tuple[nn.Module, _Recorder | None]:
        if not (self.hidden and self.hidden_weight):
            return model, None
        if id(model) not in self._taps:
            self._taps[id(model)] = _tap(model, self.hidden, "Distill")  # type: ignore[arg-type]
        return self._taps[id(model)]

    def l_loss(self, model: nn.Module, x: Any, y: Any, criterion: Any) -> torch.Tensor:
        """The distillation loss of one minibatch (see the module doc)."""
        assert self._teacher is not None, "Distill.l_loss runs inside Distill.compress"
        device = self.resolved_device
        dtype = _DTYPES.get(self.teacher_dtype or "")
        if self.shard_teacher and not self._sharded:
            # Here, not when the teacher is built: the process group exists only inside the run.
            self._sharded = shard(self._teacher)
        with torch.no_grad():
            tx = x.to(dtype) if dtype is not None and x.is_floating_point() else x
            t_out = self._teacher(tx)
        student, recorder = self._student(model)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast is not None):
            out = student(x)
        loss = kd_loss(logits_of(out, "Distill"), logits_of(t_out, "Distill").detach(), self.temperature, self.dim)
        if self.task_weight:
            loss = loss + self.task_weight * criterion(out.float() if self.autocast else out, y)
        if recorder is not None:
            t_rec = self._taps[id(self._teacher)][1]
            hidden = [_hidden_loss(recorder.values[n], t_rec.values[n]) for n in self.hidden]
            loss = loss + self.hidden_weight * sum(hidden) / len(hidden)
            recorder.values.clear()
            t_rec.values.clear()
        return loss

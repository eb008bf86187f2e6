"""Calibration-aware channel scores for the structured schemes: ranked by what the channels carry on real inputs.

Two criteria read calibration batches (``StructurePrune(..., criteria=..., calibration=batches)``):

- ``"activation"`` (forward only; the Wanda-sp / FLAP / Minitron family): every input column ``j`` of a linear
  layer or convolution scores ``mean |x_j| * ||W[:, j]||``, the mean absolute activation entering it over the
  calibration tokens (or pixels) times the norm of the weight column that reads it. A channel's score is the
  root mean square of its columns' scores over every layer that reads it, so a residual-stream channel is
  judged by all the q/k/v, gate/up and output projections it feeds, an MLP neuron by its down-projection
  column, a head (or a grouped-query key/value group) by its out-projection columns. With ``normalize`` (the
  default) each layer's column scores are divided by their mean first. A channel no linear layer or
  convolution reads (query/key columns inside ``q @ k^T``) keeps its weight score.
- ``"taylor"`` (forward and backward: a backward pass per batch, about three times the cost of
  ``"activation"``): first-order Taylor importance, ``sum |w * dL/dw|`` over every parameter entry the
  channel owns (producer rows, biases, norm scales, consumer columns), the gradient summed over the batches.
  The loss ``L`` is ``Calibration(loss=...)``'s when given; else the output's ``.loss`` (a Hugging Face model
  given ``labels``); else, for a causal LM's ``(batch, tokens, vocab)`` logits of integer token inputs,
  next-token cross-entropy on the calibration tokens; else cross-entropy against the model's own
  predictions. Scores are not normalised (they estimate loss changes, comparable across layers as they are).

Statistics are gathered on the captured graph (``passes.tap``), batch by batch: memory stays that of one
batch (plus, for ``"taylor"``, one gradient per parameter). The model runs in eval mode, its parameters are
left as they were (no ``.grad`` is written).

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> batches = [torch.randn(4, 8) for _ in range(3)]
    >>> w = fxcondensa.compress(model, StructurePrune(0.5, criteria="activation", calibration=batches),
    ...                         torch.randn(4, 8))
    >>> int((w.get_parameter("0.weight").abs().sum(1) > 0).sum())
    8
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture.graph import logits_of
from ..capture.records import graph_record
from ..capture.tap import tap
from ..rules.api import ChannelAnalysis, host

__all__ = ["Calibration", "CALIBRATED_CRITERIA", "measure", "calibrated_scores"]

CALIBRATED_CRITERIA = ("activation", "taylor")

_HOW = ("pass calibration= a DataLoader, a list of input tensors (or of tuples of positional inputs), or a list "
        "of keyword-input dicts, shaped like the example inputs")


class Calibration:
    """Calibration batches: a ``DataLoader`` (its batches: a tensor, a tuple of inputs optionally followed by
    targets, or a dict of keyword inputs), a list of input tensors, of tuples of positional inputs, or of
    keyword-input dicts. ``loss`` (a callable of the model's output and the batch's targets, or None)
    replaces the ``"taylor"`` criterion's default loss.

    Its repr names the data without printing it (a list: its length and a digest of its tensors), so a
    scheme's repr stays short and a checkpoint's resume key notices other calibration data.

    Example:
        >>> import torch
        >>> Calibration([torch.zeros(2, 3)] * 4)
        Calibration(batches=4, digest='7f8456a3c010')
    """

    def __init__(self, data: Any, *, loss: Callable[..., torch.Tensor] | None = None):
        if isinstance(data, Calibration):
            data, loss = data.data, loss or data.loss
        if isinstance(data, (torch.Tensor, dict, str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(f"calibration must be a DataLoader or a list of batches, got {type(data).__name__}; "
                            f"{_HOW} (a single tensor: [x])")
        if isinstance(data, Sequence) and len(data) == 0:
            raise ValueError(f"calibration is an empty list; {_HOW}")
        if loss is not None and not callable(loss):
            raise TypeError(f"Calibration: loss must be a callable(output, targets) returning a scalar, or None, "
                            f"got {loss!r}")
        self.data, self.loss = data, loss

    def __repr__(self) -> str:
        loss = "" if self.loss is None else f", loss={getattr(self.loss, '__qualname__', type(self.loss).__name__)}"
        if isinstance(self.data, Sequence):
            return f"Calibration(batches={len(self.data)}, digest={self._digest()!r}{loss})"
        return f"Calibration({type(self.data).__name__}{loss})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))

    def _digest(self) -> str:
        h = hashlib.sha256()
        for batch in self.data:
            for t in _tensors(batch):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:12]

    def batches(self, gm: fx.GraphModule, owner: str) -> Iterator[tuple[tuple, dict[str, Any], Any]]:
        """``(positional inputs, keyword inputs, targets or None)`` per batch, on the model's device, checked
        against the shapes and dtypes the model was captured with."""
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        exact = graph_record(gm).capture == "export"  # specialised to the example shapes
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        empty = True
        for i, batch in enumerate(self.data):
            empty = False
            targets = None
            if isinstance(batch, dict):
                args, kwargs = (), dict(batch)
            else:
                args = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
                kwargs = {}
                if len(args) == len(places) + 1:  # a loader's (inputs, targets)
                    args, targets = args[:-1], args[-1]
            _check(i, args, kwargs, places, exact, owner)
            move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
            yield tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}, move(targets)
        if empty:
            raise ValueError(f"{owner}: calibration yielded no batch (an empty DataLoader?); {_HOW}")


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return []


def _check(i: int, args: tuple, kwargs: dict[str, Any], places: list[fx.Node], exact: bool, owner: str) -> None:
    """Raise a ValueError naming batch ``i`` when its inputs do not match the captured ones."""
    if args and kwargs:
        raise ValueError(f"{owner}: calibration batch {i} mixes positional and keyword inputs; {_HOW}")
    named = {p.name: p for p in places}
    pairs = list(kwargs.items()) if kwargs else [(f"input {k}", a) for k, a in enumerate(args)]
    if not kwargs and len(args) != len(places):
        raise ValueError(f"{owner}: calibration batch {i} has {len(args)} inputs, the model takes {len(places)} "
                         f"(optionally followed by targets); {_HOW}")
    for k, (name, value) in enumerate(pairs):
        place = named.get(name) if kwargs else places[k]
        if kwargs and place is None:
            continue  # an optional keyword the capture dropped: the model's call decides
        meta = place.meta.get("tensor_meta") if place is not None else None
        if not isinstance(value, torch.Tensor) or meta is None or not hasattr(meta, "shape"):
            continue
        want, got = tuple(meta.shape), tuple(value.shape)
        same = got == want if exact else (len(got) == len(want) and got[1:] == want[1:])
        if not same or value.dtype != meta.dtype:
            rule = "exactly" if exact else "in every dim but the batch"
            raise ValueError(f"{owner}: calibration batch {i}, {name}: shape {got} and dtype {value.dtype}, but the "
                             f"model was captured with shape {want} and dtype {meta.dtype}; batches must match "
                             f"those {rule} (and the dtype); {_HOW}")


# --------------------------------------------------------------------------------------------- statistics

_LINEAR = ("linear",)
_CONV = ("conv1d", "conv2d", "conv3d", "convolution", "_convolution")


def _weight_reader(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, int] | None:
    """``(weight path, input node, channel dim of the input)`` when ``node`` is a linear layer or convolution
    reading a weight of ``gm`` through its columns, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = "linear" if isinstance(module, torch.nn.Linear) else \
            "conv" if isinstance(module, torch.nn.modules.conv._ConvNd) else None
        x = node.args[0] if node.args else None
        if kind is None or not isinstance(x, fx.Node):
            return None
        return f"{node.target}.weight", x, (-1 if kind == "linear" else 1)
    if node.op != "call_function" or len(node.args) < 2:
        return None
    target = getattr(node.target, "overloadpacket", node.target)
    name = getattr(target, "__name__", "")
    x, w = node.args[0], node.args[1]
    if name not in _LINEAR + _CONV or not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    return str(w.target), x, (-1 if name in _LINEAR else 1)


class _MeanAbs:
    """Running mean of ``|x|`` along one dim (over every other dim and every batch)."""

    def __init__(self, dim: int):
        self.dim, self.total, self.count = dim, None, 0

    def __call__(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        a = x.detach().abs().float().movedim(self.dim, -1)
        s = a.reshape(-1, a.shape[-1]).sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += a.numel() // a.shape[-1]

    @property
    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / max(self.count, 1)


def measure(gm: fx.GraphModule, criteria: str, calibration: Calibration, owner: str) -> dict[str, torch.Tensor]:
    """Per weight, what the criterion reads from the calibration batches: ``"activation"``: for each linear or
    convolution weight, the mean ``|x|`` of each input column; ``"taylor"``: for every parameter, ``|w * g|``
    with ``g`` the loss gradient summed over the batches."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if criteria == "activation":
                return _activation_stats(gm, calibration, owner)
        with torch.enable_grad():
            return _taylor_stats(gm, calibration, owner)
    finally:
        gm.train(was_training)


def _activation_stats(gm: fx.GraphModule, calibration: Calibration, owner: str) -> dict[str, torch.Tensor]:
    stats: dict[tuple[str, int], _MeanAbs] = {}  # (input node, channel dim) -> its running mean |x|
    readers: list[tuple[str, tuple[str, int]]] = []  # (weight path, the input it reads)
    for node in gm.graph.nodes:
        found = _weight_reader(gm, node)
        if found is not None:
            path, x, dim = found
            stats.setdefault((x.name, dim), _MeanAbs(dim))
            readers.append((path, (x.name, dim)))
    by_node: dict[str, list[_MeanAbs]] = {}
    for (name, _dim), s in stats.items():
        by_node.setdefault(name, []).append(s)
    observers = {name: (lambda v, fns=fns: [f(v) for f in fns]) for name, fns in by_node.items()}
    tapped = tap(gm, observers, owner)
    for args, kwargs, _ in calibration.batches(gm, owner):
        tapped(*args, **kwargs)
    out: dict[str, torch.Tensor] = {}
    for path, key in readers:
        mean = stats[key].mean
        if mean is not None:
            out[path] = out[path] + mean if path in out else mean  # a weight read twice: both inputs count
    return out


def default_loss(out: Any, args: tuple, kwargs: dict[str, Any], targets: Any) -> torch.Tensor:
    """The ``"taylor"`` criterion's loss without ``Calibration(loss=...)`` (see the module doc)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = logits_of(out, "StructurePrune(criteria='taylor')")
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if (logits.dim() == 3 and isinstance(tokens, torch.Tensor) and not tokens.is_floating_point()
            and tokens.shape == logits.shape[:2]):  # a causal LM: predict token t+1 from tokens up to t
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    if isinstance(targets, torch.Tensor):
        return F.cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits.float(), logits.detach().argmax(1))


def _taylor_stats(gm: fx.GraphModule, calibration: Calibration, owner: str) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in gm.named_parameters() if p.is_floating_point()}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    try:
        for p in params.values():
            p.requires_grad_(True)
        names, tensors = list(params), list(params.values())
        for args, kwargs, targets in calibration.batches(gm, owner):
            out = gm(*args, **kwargs)
            loss = (calibration.loss(out, targets) if calibration.loss is not None
                    else default_loss(out, args, kwargs, targets))
            for name, g in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True), strict=True):
                if g is not None:
                    grads[name] = grads[name] + g if name in grads else g.detach()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {n: (params[n].detach() * g).abs().float() for n, g in grads.items()}


# ----------------------------------------------------------------------------------------------- scores

def calibrated_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, criteria: str, stats: dict[str, torch.Tensor],
                      normalize: bool, fallback: torch.Tensor) -> torch.Tensor:
    """One score per channel of ``analysis`` from ``measure``'s statistics; ``fallback`` (the weight scores)
    where the statistics say nothing about a channel; NaN where ``fallback`` is NaN (no producers)."""
    n = analysis.num_channels
    params = dict(gm.named_parameters())
    acc, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for s in analysis.slices:
        if s.path not in params or s.path not in stats:
            continue
        if criteria == "activation":
            if s.role != "consumer":
                continue
            w = params[s.path].detach().float()
            cols = w.movedim(s.dim, 0).reshape(w.shape[s.dim], -1).norm(dim=1)
            act = stats[s.path].to(cols.device)
            if act.shape != cols.shape:  # a grouped convolution reads a slice of its input per group
                continue
            r = host(cols * act).double()
            if normalize:
                r = r / r.mean().clamp(min=torch.finfo(torch.float32).tiny)
            r = r.pow(2)
        else:
            imp = stats[s.path]
            r = host(imp.movedim(s.dim, 0).reshape(imp.shape[s.dim], -1).sum(1)).double()
        ch = analysis.channel_of[s.atoms]
        acc.index_add_(0, ch, r)
        count.index_add_(0, ch, torch.ones(len(ch), dtype=torch.float64))
    score = (acc / count.clamp(min=1)).sqrt() if criteria == "activation" else acc
    score = torch.where(count > 0, score.float(), fallback.float())
    return torch.where(torch.isnan(fallback), fallback, score)

"""Channel scores for the structured schemes: how much each channel of the channel analysis matters.

A channel's score aggregates every producer row that creates it (all the convs summed into one residual
stream, the squeeze-excitation conv multiplied into it, ...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import functional as F
from ..rules.api import ChannelAnalysis, host

__all__ = ["channel_scores", "check_criteria", "row_norms", "CHANNEL_CRITERIA"]

# Names a structured scheme takes as ``criteria``. The row criteria score each producer row (Condensa's);
# "group_l2" scores a channel over every tensor that carries it (producer rows, biases, norm affines and the
# consumer columns that read it, as Torch-Pruning's group magnitude does); "bn_scale" by the magnitude of the
# norm scales in its group (network slimming), falling back to "l2norm" where a channel has no norm;
# "bn_or_l2norm" (StructurePrune's default) like "bn_scale" but from BatchNorm scales only, and only those
# that differ (a freshly initialised BatchNorm's are all 1 and rank nothing): everywhere else "l2norm", so a
# network without BatchNorm (LeNet-5, transformers) is ranked exactly as by Condensa's "l2norm".
ROW_CRITERIA = ("l2norm", "sum", "mean", "max", "min")
CHANNEL_CRITERIA = (*ROW_CRITERIA, "group_l2", "bn_scale", "bn_or_l2norm")
_SLICE_CRITERIA = ("group_l2", "bn_scale", "bn_or_l2norm")


def _tensor(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


# Rows read per step when scoring a large tensor: its float32 copy is made a slab at a time, never whole.
_ROW_STEP_ELEMENTS = 1 << 22


def row_scores(w: torch.Tensor, dim: int, row_score: Any) -> torch.Tensor:
    """``row_score`` of the rows of ``w`` along ``dim`` (row ``j``: everything at index ``j`` of ``dim``),
    in float32. A large tensor is read in slabs of rows, so that a bfloat16 embedding does not need a float32
    copy of itself (each row is reduced exactly as when the tensor is read whole).

    Example:
        >>> row_scores(torch.ones(2, 3, dtype=torch.bfloat16), 1, lambda r: r.sum(1))
        tensor([2., 2., 2.])
    """
    w = w.detach()
    count = w.shape[dim]
    step = max(1, _ROW_STEP_ELEMENTS // max(1, w.numel() // max(1, count)))
    parts = []
    for start in range(0, count, step):
        part = w.narrow(dim, start, min(step, count - start)).float()
        # Contiguous rows: each row is summed in one order, whatever the slab.
        parts.append(row_score(part.movedim(dim, 0).reshape(part.shape[dim], -1).contiguous()))
        del part
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def row_norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The L2 norm of every row of ``w`` along ``dim`` in float32, as ``row_scores`` with the ``"l2norm"`` row
    score computes it but faster: slabs of ``w``'s first dim are squared in place in float32 and reduced where
    they lie, without the transposed copy a column needs there (columns add up their slabs' sums).

    Example:
        >>> row_norms(torch.tensor([[3.0, 0.0], [4.0, 1.0]], dtype=torch.bfloat16), 1)
        tensor([5., 1.])
    """
    w = w.detach()
    if w.dim() == 0:
        return w.float().abs().reshape(1)
    count = w.shape[0]
    step = max(1, _ROW_STEP_ELEMENTS // max(1, w.numel() // max(1, count)))
    others = [d for d in range(w.dim()) if d != dim]
    parts: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    for start in range(0, count, step):
        part = w.narrow(0, start, min(step, count - start)).float()
        # .float() of a float32 tensor is the tensor itself, the user's: squared into a new one.
        part = part * part if w.dtype == torch.float32 else part.mul_(part)
        if dim == 0:
            parts.append(part.reshape(part.shape[0], -1).sum(1))
        else:
            sums = part.sum(others) if others else part
            total = sums if total is None else total.add_(sums)
        del part
    squares = (torch.cat(parts) if len(parts) > 1 else parts[0]) if dim == 0 else total
    assert squares is not None
    return squares.sqrt_()


def check_criteria(criteria: Any) -> None:
    """Raise a clear error unless ``criteria`` is a channel criteria name or a callable(x, dims)."""
    if isinstance(criteria, str):
        if criteria not in CHANNEL_CRITERIA:
            raise ValueError(f"criteria must be one of {list(CHANNEL_CRITERIA)} or a callable(x, dims), got {criteria!r}")
        return
    F.resolve_criteria(criteria)


def channel_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, criteria: Any = "l2norm",
                   normalize: bool = False) -> torch.Tensor:
    """One score per channel from the rows of all its producers (NaN for channels without producers).

    Each producer row is scored by ``criteria`` (for a conv: the filter; for a linear: the neuron's
    weights). A channel with one producer gets exactly that score, Condensa's rule. A channel with several
    (a residual stream, a squeeze-excitation product) gets their root mean square (``l2norm``), mean
    (``sum``, ``mean``), maximum or minimum, so that streams with many producers are not ranked above the
    rest just for having more rows. ``normalize=True`` first divides each producer's row scores by their
    mean, making layers of different weight scales comparable under one global threshold (useful for
    untrained models and where BatchNorm makes the scale of conv weights arbitrary).
    """
    if criteria in _SLICE_CRITERIA:
        return _slice_scores(gm, analysis, criteria, normalize)
    n = analysis.num_channels
    # Read one producer at a time, as it is scored: a float32 copy of every bfloat16 weight at once would be
    # twice the model's bytes.
    rows_of = ((analysis.channel_of[s.atoms], s.path, s.dim) for s in analysis.slices if s.role == "producer")
    # Rows are scored where the weights live (a GPU does the big reductions); the per-channel accumulation
    # runs on the CPU, where the channel ids are.
    check_criteria(criteria)
    if isinstance(criteria, str):
        row_score = {
            "l2norm": lambda r: r.pow(2).sum(1).sqrt(),
            "sum": lambda r: r.abs().sum(1),
            "mean": lambda r: r.abs().mean(1),
            "max": lambda r: r.abs().amax(1),
            "min": lambda r: r.abs().amin(1),
        }[criteria]
    else:
        fn = F.resolve_criteria(criteria)

        def row_score(r: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.as_tensor(fn(row, (0,)), dtype=torch.float32, device=r.device) for row in r])

    reduce, init = {"max": ("amax", float("-inf")), "min": ("amin", float("inf"))}.get(criteria, ("sum", 0.0))
    acc = torch.full((n,), init)
    producers = torch.zeros(n)
    for ch, path, dim in rows_of:  # a parameter, or a buffer a module computes its weight from (csatv2)
        t = _tensor(gm, path)
        r = host(row_norms(t, dim) if criteria == "l2norm" else row_scores(t, dim, row_score)).float()
        if normalize:
            r = r / r.mean().clamp(min=torch.finfo(torch.float32).tiny)
        acc.scatter_reduce_(0, ch, r.pow(2) if criteria == "l2norm" else r, reduce=reduce)
        producers.index_add_(0, ch, torch.ones(len(ch)))
    if reduce == "sum":
        acc = acc / producers.clamp(min=1)
        if criteria == "l2norm":
            acc = acc.sqrt()
    return torch.where(producers > 0, acc, torch.full_like(acc, float("nan")))


def _slice_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, criteria: str, normalize: bool) -> torch.Tensor:
    """Scores from several tensors per channel: each tensor dim that carries channels gives every channel
    the squared norm of its slice (divided by that tensor's mean when ``normalize``), and a channel's score
    is the root of the mean over its tensors. Channels without producers are NaN, as for the row criteria."""
    n = analysis.num_channels
    params = dict(gm.named_parameters())
    total, count, producers = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for s in analysis.slices:
        ch = analysis.channel_of[s.atoms]
        if s.role == "producer":
            producers.index_add_(0, ch, torch.ones(len(ch)))
        if s.path not in params:  # buffers (running statistics) say nothing about importance
            continue
        if criteria != "group_l2" and not (s.role == "norm" and s.path.endswith("weight") and params[s.path].dim() == 1):
            continue
        w = params[s.path].detach().float()
        if criteria == "bn_or_l2norm" and not _informative_bn_scale(gm, s.path, w):
            continue
        ss = host(w.movedim(s.dim, 0).reshape(w.shape[s.dim], -1).pow(2).sum(1)).float()
        if normalize:
            ss = ss / ss.mean().clamp(min=torch.finfo(torch.float32).tiny)
        total.index_add_(0, ch, ss)
        count.index_add_(0, ch, torch.ones(len(ch)))
    score = (total / count.clamp(min=1)).sqrt()
    if criteria != "group_l2":  # channels without a (usable) norm scale: their producers' L2 norm
        score = torch.where(count > 0, score, channel_scores(gm, analysis, "l2norm", normalize))
    return torch.where(producers > 0, score, torch.full_like(score, float("nan")))


def _informative_bn_scale(gm: fx.GraphModule, path: str, scale: torch.Tensor) -> bool:
    """True for the scale of a BatchNorm module whose entries are not all equal. A BatchNorm scale
    multiplies a channel normalised over the batch, so its magnitude is the channel's output scale (network
    slimming); a LayerNorm or GroupNorm scale normalises across channels and says less, and equal scales
    (an untrained BatchNorm) rank every channel alike, so both leave the choice to the producer rows."""
    owner = path.rpartition(".")[0]
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and bool(scale.amax() > scale.amin())

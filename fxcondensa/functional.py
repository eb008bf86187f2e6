"""Pure tensor math behind the schemes: thresholds, block scores, dtype round trips.

Nothing here knows about graphs or modules, so each function can be tested on plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CRITERIA",
    "resolve_criteria",
    "l2norm",
    "max",
    "min",
    "mean",
    "sum",
    "keep_count",
    "magnitude_threshold",
    "top_mask",
    "block_scores",
    "round_trip",
]

Criteria = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


# Criteria reduce |x| over the given dims. They are named like Condensa's (condensa.functional.l2norm, ...).
def l2norm(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.float().pow(2).sum(dim=tuple(dims)).sqrt()


def max(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:  # noqa: A001 - Condensa's name
    return x.float().abs().amax(dim=tuple(dims))


def min(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:  # noqa: A001 - Condensa's name
    return x.float().abs().amin(dim=tuple(dims))


def mean(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.float().abs().mean(dim=tuple(dims))


def sum(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:  # noqa: A001 - Condensa's name
    return x.float().abs().sum(dim=tuple(dims))


CRITERIA: dict[str, Criteria] = {"l2norm": l2norm, "max": max, "min": min, "mean": mean, "sum": sum}


def resolve_criteria(criteria: str | Criteria) -> Criteria:
    """A criteria name ('l2norm', 'max', 'min', 'mean', 'sum') or a callable(x, dims) -> scores."""
    if isinstance(criteria, str):
        try:
            return CRITERIA[criteria]
        except KeyError:
            raise ValueError(f"criteria must be one of {sorted(CRITERIA)} or a callable(x, dims), got {criteria!r}") from None
    if callable(criteria):
        return criteria
    raise TypeError(f"criteria must be a name in {sorted(CRITERIA)} or a callable(x, dims), got {type(criteria).__name__}")


def keep_count(n: int, density: float) -> int:
    """How many of ``n`` elements a density keeps: rounded, and never zero for n > 0."""
    return 0 if n == 0 else builtins_max(1, builtins_min(n, int(round(density * n))))


def magnitude_threshold(scores: torch.Tensor, density: float) -> float:
    """The score that the ``density`` fraction of ``scores`` reaches or exceeds (Condensa's global rule)."""
    flat = scores.reshape(-1).float()
    k = keep_count(flat.numel(), density)
    # kthvalue counts from the smallest: the k-th largest is the (n - k + 1)-th smallest.
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def top_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask that keeps exactly ``keep_count(n, density)`` highest scores (ties by position)."""
    flat = scores.reshape(-1)
    k = keep_count(flat.numel(), density)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.float(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def block_scores(weight: torch.Tensor, block: tuple[int, int], criteria: Criteria) -> torch.Tensor:
    """Score each (rows x cols) block of a 2-D weight; the result has shape (R / rows, C / cols)."""
    r, c = block
    rows, cols = weight.shape
    tiles = weight.reshape(rows // r, r, cols // c, c)
    return criteria(tiles, (1, 3))


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the nearest value of ``dtype``, kept in x's own dtype."""
    return x.to(dtype).to(x.dtype)


# The criteria above shadow the builtins on purpose (Condensa's names); keep the real ones at hand.
import builtins as _builtins  # noqa: E402

builtins_max = _builtins.max
builtins_min = _builtins.min

"""Modules in eval mode for a while, every submodule's training flag restored afterwards.

Tracing, checking, timing, evaluating and recalibrating all run a user's model in eval mode without
leaving a trace on it: a model handed in half in training mode (a frozen BatchNorm in a training model)
comes back exactly so, which ``model.train(was_training)`` would not give.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` (and all their submodules) in eval mode; restore each submodule's own flag on exit.

    Inside the block a caller may switch some submodules back to training (BatchNorm recalibration):
    those flags are restored too.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training, net[0].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modes = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode

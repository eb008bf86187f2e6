"""``Direct``: compress once with the scheme, no training (Condensa's ``condensa.opt.Direct``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch.fx as fx
from torch import nn

from ..compression.apply import compress
from .training import Batches

__all__ = ["Direct"]

logger = logging.getLogger("fxcondensa")


class Direct:
    """Direct compression: the result is ``Pi(w)``, the scheme applied to the trained weights.

    Example:
        >>> import torch, fxcondensa as condensa
        >>> from torch.utils.data import TensorDataset
        >>> from fxcondensa.schemes import Prune
        >>> data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
        >>> c = condensa.Compressor(condensa.opt.Direct(), Prune(0.1), condensa.models.LeNet5(),
        ...                         data, data, data, torch.nn.CrossEntropyLoss())
        >>> w = c.run()
        >>> round(c.statistics["density"], 2)
        0.1
    """

    @property
    def config(self) -> dict[str, Any]:
        """The hyper-parameters (none): recorded in ``Compressor.statistics``."""
        return {}

    def compress(self, model: nn.Module, scheme: Any, train: Batches, val: Batches | None,
                 test: Batches | None, criterion: Any, example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
        """Return ``(compressed copy of model, statistics)``; the data is not used."""
        start = time.perf_counter()
        result = compress(model, scheme, example_inputs, output="graph")  # the Compressor returns the own class
        elapsed = time.perf_counter() - start
        logger.info("[fxcondensa] Direct: %r applied once, no training (%.2f s)", scheme, elapsed)
        return result, {"elapsed_optimizer": elapsed}

    def __repr__(self) -> str:
        return "Direct()"

"""Optimizers: how a Compressor turns a trained model into a compressed one (Condensa's ``condensa.opt``).

- :class:`Direct`: compress once, no training.
- :class:`LC`: the learning-compression (augmented-Lagrangian) optimizer, which retrains the weights toward
  the compressed set and recovers the accuracy that direct compression loses.

Both implement ``compress(model, scheme, train, val, test, criterion, example_inputs) -> (model, statistics)``
on :class:`fxcondensa.training.Batches`; :class:`fxcondensa.Compressor` builds those from datasets.
"""

from .direct import Direct
from .lc import LC

__all__ = ["Direct", "LC"]

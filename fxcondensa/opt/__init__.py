"""Optimizers: how a Compressor turns a trained model into a compressed one (Condensa's ``condensa.opt``).

- :class:`Direct`: compress once, no training.
- :class:`FineTune`: compress once, then fine-tune under the scheme's masks (the usual baseline).
- :class:`Distill`: compress once, then recover by distillation from the dense model (KL to its outputs).
- :class:`Gradual`: gradual magnitude pruning, Zhu & Gupta's cubic schedule, then masked fine-tuning.
- :class:`LC`: the learning-compression (augmented-Lagrangian) optimizer, which retrains the weights toward
  the compressed set; with its defaults it ends with a masked fine-tune of the compressed weights.

All implement ``compress(model, scheme, train, val, test, criterion, example_inputs) -> (model, statistics)``
on :class:`fxcondensa.opt.training.Batches`; :class:`fxcondensa.Compressor` builds those from datasets. The
trained ones share one loop (``fxcondensa.opt.engine``): statistics, progress, checkpoint/resume, torchrun.
"""

from .direct import Direct
from .distill import Distill
from .finetune import FineTune
from .gradual import Gradual
from .lc import LC

__all__ = ["Direct", "Distill", "FineTune", "Gradual", "LC"]

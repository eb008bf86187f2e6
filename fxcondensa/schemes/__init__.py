"""Compression schemes with Condensa's names and arguments.

A scheme is a pass over a traced ``GraphModule``: ``annotate(gm)`` reads the current weights and records,
per parameter, a keep-mask and/or a storage dtype in node records (see ``passes/annotate.py``). Condensa's
protocol is kept on top of it: ``pi(module)`` compresses in place, ``delta(module)`` decompresses. Any object
with ``pi`` and ``delta`` works as a custom scheme wherever a scheme is expected. The unstructured schemes
live in ``base.py``; the structured ones, which act on channel groups of the channel analysis, in
``structured.py``.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import Compose, Prune, Quantize
    >>> MEM = Compose([Prune(0.007), Quantize(fxcondensa.float16)])
    >>> w = fxcondensa.compress(fxcondensa.models.LeNet5(), MEM)
    >>> round(fxcondensa.density(w), 3)
    0.007
"""

from .base import (
    LINEAR_CONV,
    BlockPrune,
    Compose,
    Prune,
    Quantize,
    Scheme,
    check_scheme,
    is_scheme,
    validate_density,
)
from .experts import ExpertPrune
from .scores import channel_scores
from .selection import select_channels
from .structured import FilterPrune, NeuronPrune, StructurePrune

__all__ = [
    "Scheme",
    "Prune",
    "Quantize",
    "BlockPrune",
    "Compose",
    "NeuronPrune",
    "FilterPrune",
    "StructurePrune",
    "ExpertPrune",
    "is_scheme",
    "check_scheme",
    "validate_density",
    "channel_scores",
    "select_channels",
    "LINEAR_CONV",
]

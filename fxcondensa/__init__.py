"""fxcondensa: programmable compression and network thinning for PyTorch, on torch.fx.

The API follows NVIDIA Condensa's (``Compressor``, ``opt``, ``schemes``, ``float16``), so its tutorial runs
after ``import fxcondensa as condensa``; ``thin`` adds what Condensa never shipped: pruned channels
physically removed from the graph.
"""

import torch

from . import export, functional, models, opt, schemes
from .compression import compress, density, layer_densities
from .compressor import Compressor
from .errors import (
    ExampleInputError,
    FileFormatError,
    FxCondensaError,
    ThinningCheckError,
    TraceError,
    UnknownOpError,
)
from .footprint import footprint
from .graph import trace
from .int8 import quantize_int8
from .latency import measure_latency
from .passes.thin import thin
from .recipe import load_thinned, save_thinned
from .registry import register_rule, unregister_rule
from .report import Report, report
from .serialize import load_compressed, save_compressed

float16 = torch.float16
bfloat16 = torch.bfloat16
float32 = torch.float32

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "ExampleInputError",
    "FileFormatError",
    "FxCondensaError",
    "Report",
    "ThinningCheckError",
    "TraceError",
    "UnknownOpError",
    "bfloat16",
    "compress",
    "density",
    "export",
    "float16",
    "float32",
    "footprint",
    "functional",
    "layer_densities",
    "load_compressed",
    "load_thinned",
    "measure_latency",
    "models",
    "opt",
    "quantize_int8",
    "register_rule",
    "report",
    "save_compressed",
    "save_thinned",
    "schemes",
    "thin",
    "trace",
    "unregister_rule",
]

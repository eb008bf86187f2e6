"""fxcondensa: programmable compression and network thinning for PyTorch, on torch.fx.

The API follows NVIDIA Condensa's (``Compressor``, ``opt``, ``schemes``, ``float16``), so its tutorial runs
after ``import fxcondensa as condensa``; ``thin`` adds what Condensa never shipped: pruned channels
physically removed from the graph.
"""

import torch

from . import functional, models, opt, schemes
from .capture.graph import trace
from .capture.records import thin_record
from .compression.apply import compress, density, layer_densities
from .compression.checkpoint import thin_pretrained
from .compression.int8 import quantize_int8
from .compression.thinning import thin
from .errors import (
    ExampleInputError,
    FileFormatError,
    FxCondensaError,
    InputShapeError,
    RuleFailedError,
    ThinningCheckError,
    TraceError,
    UnknownOpError,
)
from .files import export
from .files.recipe import load_thinned, save_thinned
from .files.serialize import load_compressed, save_compressed
from .measure.footprint import footprint
from .measure.latency import measure_latency
from .measure.report import Report, report
from .opt.compressor import Compressor
from .rules.registry import register_rule, unregister_rule

float16 = torch.float16
bfloat16 = torch.bfloat16
float32 = torch.float32

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "ExampleInputError",
    "FileFormatError",
    "FxCondensaError",
    "InputShapeError",
    "Report",
    "RuleFailedError",
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
    "thin_pretrained",
    "thin_record",
    "trace",
    "unregister_rule",
]

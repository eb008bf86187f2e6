"""Exceptions a user of fxcondensa can meet. Each names what went wrong, where, and what to do."""

from __future__ import annotations

__all__ = [
    "FxCondensaError",
    "TraceError",
    "ExampleInputError",
    "ThinningCheckError",
    "FileFormatError",
    "UnknownOpError",
    "InputShapeError",
    "RuleFailedError",
]


class FxCondensaError(Exception):
    """Base class of every error raised by fxcondensa itself."""


class TraceError(FxCondensaError, RuntimeError):
    """torch.fx could not trace the model (dynamic control flow, unsupported Python, ...)."""


class ExampleInputError(FxCondensaError, ValueError):
    """The example inputs do not run through the model (wrong shape, dtype or device)."""


class ThinningCheckError(FxCondensaError, AssertionError):
    """The thinned model's outputs differ from the compressed dense model's."""


class FileFormatError(FxCondensaError, ValueError):
    """A file given to a loader is not a valid fxcondensa file (truncated, foreign or crafted)."""


class UnknownOpError(FxCondensaError, ValueError):
    """``strict=True``: the channel analysis met an op it has no rule for."""


class RuleFailedError(FxCondensaError, RuntimeError):
    """``strict=True``: the op has a rule, and that rule raised on this call (a form it does not handle)."""


class InputShapeError(FxCondensaError, ValueError):
    """The inputs break a shape constraint of a model captured by torch.export (a fixed size, a range)."""

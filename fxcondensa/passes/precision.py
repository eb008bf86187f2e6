"""Precision for the thinning check: which dtype a graph computes in, what tolerance fits it, and how to run
the graph again in a wider float type without copying its weights.

Removing zero channels changes the order of floating sums, so the thinned model equals the compressed one
only up to rounding. How much rounding depends on the dtype the model computes in:

==========  =======  =======  ===========================================================
dtype       rtol     atol     why
==========  =======  =======  ===========================================================
float64     1e-4     1e-5     as float32 (the tolerance of every test and of the re-check)
float32     1e-4     1e-5     the guarantee of ``thin``: unchanged
float16     1e-3     1e-5     about 2 units in the last place (2**-10 each)
bfloat16    1.6e-2   1e-5     about 2 units in the last place (2**-7 each)
==========  =======  =======  ===========================================================

(float16 and bfloat16 are the tolerances ``torch.testing.assert_close`` uses for one op in those dtypes.)
Where the comparison in the model's dtype fails, the check runs both graphs again in float32 (for a float16
or bfloat16 model) and then in float64, with the float32 tolerance: rounding vanishes there, a wrong model
does not; the check passes when any one of these comparisons agrees. (For a float16 or bfloat16 model the
wider comparisons run first and the model's own dtype last: at a language model's width its rounding
exceeds its tolerance almost always, so its reference run is made only where the wider ones do not settle
the check; the verdict is the same in either order.) That re-run is ``run_in``: an interpreter that widens every floating weight, input and constant
as it is read, and every cast or tensor creation the graph states in a narrower float dtype (a graph
captured by ``torch.export`` holds them as literals, with ``_assert_tensor_metadata`` nodes that insist on
the captured dtype; those asserts are skipped). No widened copy of the model is ever made: one weight at a
time is widened, while the node that reads it runs.

Example:
    >>> import torch, fxcondensa
    >>> x = (torch.randn(1, 1, 28, 28, dtype=torch.bfloat16),)
    >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5().to(torch.bfloat16), x)
    >>> compute_dtype(gm, x), tolerance(torch.bfloat16), run_in(gm, x, torch.float64).dtype
    (torch.bfloat16, (0.016, 1e-05), torch.float64)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.overrides import TorchFunctionMode

from .lean_reads import METADATA_OPS, lean_call
from .reference import MaskedInterpreter

__all__ = ["TOLERANCES", "tolerance", "compute_dtype", "wider_dtypes", "run_in", "WidenedInterpreter",
           "WidensCalls", "widened_calls"]

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-4, 1e-5),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a model that computes in ``dtype`` (float32's for other dtypes)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def compute_dtype(gm: nn.Module, inputs: tuple[Any, ...]) -> torch.dtype:
    """The narrowest floating dtype among the floating parameters, buffers and inputs of ``gm`` (float32 when
    there is none): the precision its arithmetic is rounded to."""
    dtypes = {t.dtype for t in [*gm.parameters(), *gm.buffers(), *inputs]
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def wider_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The dtypes the check re-runs in after ``dtype`` failed: float32 for a narrower model, then float64."""
    return [d for d in (torch.float32, torch.float64) if torch.finfo(d).bits > torch.finfo(dtype).bits]


# Ops where a dtype argument reinterprets bits (a view as another dtype) or asks about a dtype (finfo): widening
# it would change what they mean, not their precision.
_KEEP_DTYPE = {"view", "finfo", "iinfo"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).split(".")[0]


class WidenedInterpreter(MaskedInterpreter):
    """Run a graph in a wider float dtype without copying it: floating weights, inputs and constants are cast
    to ``dtype`` as the node that reads them runs (a weight's widened copy lives while that node runs, never
    the whole model's), narrower float dtypes named in the graph's arguments (casts, tensor creations)
    become ``dtype``, and dtype assertions of a torch.export capture are skipped. Masks kept beside the
    graph (``reference.py``) are applied first. A node calling a ``WidensCalls`` (a module's own forward,
    not a graph) runs under ``widened_calls``: its ops widen what they read the same way."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype):
        super().__init__(gm)
        self.dtype = dtype
        self._raw = False
        self._rows = False
        # A large linear's weight is read a block of rows at a time (lean_reads.py), each block used at once
        # and dropped: one widened buffer per block shape, refilled, instead of a fresh block per read. Fresh
        # blocks left the C allocator's heap fragmented on some runs, the process holding about the model's
        # bytes of freed float64 blocks at the end of the run.
        self._blocks: dict[tuple[int, ...], torch.Tensor] = {}

    def _widen(self, value: Any) -> Any:
        def one(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and _narrower(v.dtype, self.dtype):
                return v.to(self.dtype)
            if isinstance(v, torch.dtype) and v.is_floating_point and _narrower(v, self.dtype):
                return self.dtype
            return v
        return map_aggregate(value, one)

    def prepare(self, value: Any) -> Any:
        value = super().prepare(value)
        return value if self._raw else self._widen(value)

    def cast(self, value: torch.Tensor) -> torch.Tensor:
        if not (self._rows and value.is_floating_point() and _narrower(value.dtype, self.dtype)):
            return self._widen(value)
        key = tuple(value.shape)
        block = self._blocks.get(key)
        if block is None or block.device != value.device:
            block = self._blocks[key] = torch.empty(key, dtype=self.dtype, device=value.device)
        return block.copy_(value)

    def read(self, t: torch.Tensor, index: Any) -> torch.Tensor:
        # A slice of rows is a linear's block (used before the next read); rows gathered by index are an
        # embedding's output, which stays: only the former share a buffer.
        self._rows = isinstance(index, slice)
        try:
            return super().read(t, index)
        finally:
            self._rows = False

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._widen(super().placeholder(target, args, kwargs))

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("call_function", "call_method"):
            name = _op_name(n)
            if name == "_assert_tensor_metadata":
                return None  # it asserts the captured dtype, which is now widened
            if name in _KEEP_DTYPE:  # masked, never widened: the dtype argument means what it says
                self._raw = True
                try:
                    return super().run_node(n)
                finally:
                    self._raw = False
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(target, WidensCalls):
            with widened_calls(self.dtype, target.exact):
                return super().call_function(target, args, kwargs)
        return super().call_function(target, args, kwargs)


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype != than and torch.finfo(dtype).bits <= torch.finfo(than).bits


def run_in(gm: fx.GraphModule, inputs: tuple[Any, ...], dtype: torch.dtype) -> Any:
    """``gm``'s outputs for its placeholder values ``inputs``, computed in ``dtype`` (see the module text)."""
    return WidenedInterpreter(gm, dtype).run(*inputs)


class WidensCalls:
    """A graph's call into eager code (a user's own forward): the re-check in a wider dtype runs it under
    ``widened_calls``. ``exact`` maps ``id`` of a tensor that holds a rounded value (a norm weight with a
    factor folded in) to its unrounded value, which the widened run reads instead: that rounding is the
    model's dtype's, as a reordered sum is."""

    exact: dict[int, torch.Tensor] = {}


# Tensor methods that convert to a named narrower dtype without a dtype argument.
_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


class widened_calls(TorchFunctionMode):
    """Run eager code (a module's forward) in ``dtype``, as ``WidenedInterpreter`` runs a graph: every torch
    function widens the floating tensors it reads (one op's copy at a time, never the model's) and the
    narrower float dtypes named in its arguments; attribute reads (``.shape``, ``.dtype``) and dtype-meaning
    ops (a view as another dtype) pass unchanged.

    Example:
        >>> lin = torch.nn.Linear(2, 2).to(torch.bfloat16)
        >>> with widened_calls(torch.float64):
        ...     lin(torch.ones(1, 2, dtype=torch.bfloat16)).dtype
        torch.float64
    """

    def __init__(self, dtype: torch.dtype, exact: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.dtype, self.exact = dtype, exact or {}

    def _widen(self, value: Any) -> Any:
        def one(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                exact = self.exact.get(id(v))
                if exact is not None:
                    return exact.to(self.dtype)
                return v.to(self.dtype) if _narrower(v.dtype, self.dtype) else v
            if isinstance(v, torch.dtype) and v.is_floating_point and _narrower(v, self.dtype):
                return self.dtype
            return v
        return map_aggregate(value, one)

    def _read(self, t: torch.Tensor, index: Any) -> torch.Tensor:
        exact = self.exact.get(id(t))
        return self._widen((t if exact is None else exact).detach()[index])

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in METADATA_OPS or name in _KEEP_DTYPE:  # widening a weight to read its shape would copy it
            return func(*args, **kwargs)
        if name in _CASTS and _narrower(_CASTS[name], self.dtype) and args and isinstance(args[0], torch.Tensor):
            return self._widen(args[0]).to(self.dtype)
        # A large linear's weight and an embedding are read a part at a time (``lean_reads``).
        out = lean_call(func, args, kwargs, self._read, self._widen)
        if out is not NotImplemented:
            return out
        return func(*self._widen(args), **self._widen(kwargs))

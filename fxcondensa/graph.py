"""Tracing: an ``nn.Module`` becomes a ``GraphModule`` whose nodes carry shape and dtype metadata.

The user's model is never touched: we trace a deep copy, and shape propagation runs in eval mode under
``no_grad`` so that BatchNorm running statistics of the copy do not move either.
"""

from __future__ import annotations

import copy
import linecache
import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import ExampleInputError, TraceError

__all__ = ["trace", "as_input_tuple", "flatten_outputs", "DEFAULT_LEAF_MODULES"]

# Modules whose forward torch.fx cannot trace (data-dependent checks inside), kept as opaque calls.
# The channel analysis freezes the channels that flow through them.
DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is inside, so that a failure can name it."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module]]):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self._inside: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._inside.append(name or "<root>")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._inside[-1]
            raise
        finally:
            self._inside.pop()


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs: one tensor, or a tuple/list of tensors, becomes a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. torch.randn(1, 3, 224, 224)"
    )


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """A model's result (tensor, tuple, list, dict) as a flat list of tensors, in a stable order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for k in sorted(result) for t in flatten_outputs(result[k])]
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in flatten_outputs(r)]
    return []


def _user_frame(tb) -> str:
    """The innermost frame of the traceback outside torch itself: the user's line that failed."""
    where = "unknown location"
    for frame in traceback.extract_tb(tb):
        if not os.path.abspath(frame.filename).startswith((_TORCH_DIR, _OWN_DIR)):
            code = frame.line or linecache.getline(frame.filename, frame.lineno or 0).strip()
            where = f'{frame.filename}:{frame.lineno}, in {frame.name}: "{code}"'
    return where


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace a copy of ``model`` to a ``GraphModule``; with example inputs, annotate shapes.

    Every node then has ``node.meta["tensor_meta"]`` (shape, dtype, ...) as written by
    ``torch.fx.passes.shape_prop.ShapeProp``. The state-dict keys of the result equal the model's.

    Example:
        >>> import torch, fxcondensa
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.name == "conv1"]
        [(1, 20, 24, 24)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)
    if isinstance(work, fx.GraphModule) and not leaf_modules and concrete_args is None:
        gm = work
    else:
        tracer = _Tracer(tuple(DEFAULT_LEAF_MODULES) + tuple(leaf_modules))
        try:
            graph = tracer.trace(work, concrete_args=concrete_args)
        except Exception as exc:  # any failure inside the user's forward: report where it happened
            module = tracer.failed_in or "<root>"
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} (inside module '{module}', at "
                f"{_user_frame(exc.__traceback__)}): {type(exc).__name__}: {exc}. "
                "Make the module that holds this code a leaf (trace(..., leaf_modules=[ThatModule])), "
                "or fix the arguments that drive the control flow with concrete_args={...}."
            ) from exc
        gm = fx.GraphModule(work, graph, class_name=type(model).__name__)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs, fake=True)
    return gm


class _ShapeProp(fx.Interpreter):
    """Shape propagation (as torch.fx's ShapeProp) that reports the failing node in one clear line."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0]
            raise ExampleInputError(f"node '{n.name}' ({n.op} {n.target}) failed: {type(exc).__name__}: {first_line}") from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


class _MetaShapeProp(_ShapeProp):
    """Shape propagation on the meta device: parameters are viewed as meta tensors per call, no data moves."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        state = {k: v.to("meta") for k, v in [*module.named_parameters(), *module.named_buffers()]}
        return functional_call(module, state, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any, *, fake: bool = False) -> Any:
    """Run shape propagation in eval mode without gradients; returns the model's outputs.

    With ``fake=True`` the pass runs on meta (or else fake) tensors: shapes and dtypes only, no arithmetic,
    a fraction of a real forward's cost on large inputs; it falls back to a real run for any op neither can
    handle. The returned outputs are then meta / fake too. Training flags are restored afterwards.
    """
    inputs = as_input_tuple(example_inputs)
    modes = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad():
            # Meta and fake tensors do not check that inputs and weights share a dtype and a device: let a
            # real run refuse a mismatch, with the real error.
            params = list(gm.parameters())
            dtypes = {p.dtype for p in params if p.is_floating_point()}
            devices = {p.device for p in params}
            for t in inputs:
                if isinstance(t, torch.Tensor) and (
                        (t.is_floating_point() and dtypes and t.dtype not in dtypes) or (devices and t.device not in devices)):
                    fake = False
            if fake:
                # Meta tensors first (cheapest: meta kernels only), then fake tensors (slower, but they
                # handle ops that create real tensors on the way); a real run decides what both refuse.
                try:
                    metas = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
                    return _MetaShapeProp(gm).run(*metas)
                except Exception:
                    pass
                try:
                    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
                        return _ShapeProp(gm).run(*fakes)
                except Exception:
                    pass
            return _ShapeProp(gm).run(*inputs)
    except ExampleInputError as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                           else type(t).__name__ for t in inputs)
        raise ExampleInputError(
            f"the example inputs ({shapes}) do not run through {gm.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}. Pass inputs of the shape, dtype and device the model expects."
        ) from exc
    finally:
        for name, m in gm.named_modules():
            m.training = modes[name]

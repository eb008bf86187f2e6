"""Tracing: an ``nn.Module`` becomes a ``GraphModule`` whose nodes carry shape and dtype metadata.

The user's model is never touched: we trace a deep copy, and shape propagation runs in eval mode under
``no_grad`` so that BatchNorm running statistics of the copy do not move either.
"""

from __future__ import annotations

import glob
import inspect
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental import symbolic_shapes
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import ExampleInputError, TraceError
from .exported import capture_of, export_capture, graph_inputs, split_inputs, user_frame
from .guards import check_input_shapes
from .modes import eval_mode
from .records import RecordedGraphModule, graph_record, work_copy
from .sharing import copy_model

__all__ = ["trace", "as_input_tuple", "flatten_outputs", "logits_of", "DEFAULT_LEAF_MODULES"]

# Modules whose forward torch.fx cannot trace (data-dependent checks inside), kept as opaque calls.
# The channel analysis freezes the channels that flow through them.
DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)



# The modules whose frames torch leaves out of a node's stack trace, as listed in
# ``torch.fx.experimental.symbolic_shapes.uninteresting_files`` (with the files of ``torch._higher_order_ops``,
# dynamo's own list and generated code, "<string>").
_UNINTERESTING_MODULES = (
    "torch.fx.experimental.symbolic_shapes", "torch.export._trace", "torch.fx.experimental.recording",
    "torch.fx.experimental.sym_node", "torch.fx.interpreter", "torch.fx._symbolic_trace", "torch", "torch._compile",
    "torch._dynamo.eval_frame", "torch._inductor.sizevars", "torch._library.custom_ops", "torch._library.fake_impl",
    "torch._subclasses.meta_utils", "torch._subclasses.fake_tensor", "torch._logging._internal",
    "torch._logging.structured",
)
_uninteresting_cache: dict[tuple[str, ...], frozenset[str]] = {}


def _loaded_uninteresting_files() -> frozenset[str]:
    """The files of ``uninteresting_files`` among the modules loaded now (computed once per loaded set)."""
    loaded = tuple(n for n in (*_UNINTERESTING_MODULES, "torch._higher_order_ops", "torch._dynamo.guards")
                   if n in sys.modules)
    files = _uninteresting_cache.get(loaded)
    if files is None:
        found = {inspect.getfile(sys.modules[n]) for n in loaded if n in _UNINTERESTING_MODULES} | {"<string>"}
        if "torch._higher_order_ops" in sys.modules:
            hop_dir = os.path.dirname(sys.modules["torch._higher_order_ops"].__file__ or "")
            found |= set(glob.glob(os.path.join(hop_dir, "*.py")))
        if "torch._dynamo.guards" in sys.modules:
            found |= set(sys.modules["torch._dynamo.guards"].uninteresting_files())
        files = _uninteresting_cache[loaded] = frozenset(found)
    return files


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is inside, so that a failure can name it.

    A ``GraphModule`` remembers the class of the tracer that made it, and unpickling (``torch.load`` of a
    whole module, ``pickle.loads``, ``copy`` through ``__reduce__``) rebuilds its graph by instantiating that
    class with no arguments: every argument therefore has a default. Unpickling retraces the generated code
    with every submodule a leaf, so the leaf types do not matter there.
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()):
        super().__init__()
        # Source lines on every node, so that strict thinning can say where an unknown op was called.
        self.record_stack_traces = True
        self.leaf_types = tuple(leaf_modules)
        self._inside: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def _filter_traceback_frames(self, user_stack_summary: traceback.StackSummary) -> traceback.StackSummary:
        """torch's filter (the frames from the first ``forward`` on, less those of torch's generic modules),
        without its first-use cost: torch names those modules by importing torch.export, dynamo and
        inductor, a second of imports in a process that never uses them. A frame on the stack comes from a
        module already loaded, so the loaded ones among them filter the same frames."""
        if self._record_forward_stack_traces_only or symbolic_shapes.uninteresting_files.cache_info().currsize:
            return super()._filter_traceback_frames(user_stack_summary)
        frames = list(user_stack_summary)
        first = next((i for i, frame in enumerate(frames) if frame.name == "forward"), None)
        skip = _loaded_uninteresting_files()
        kept = [frame for frame in frames[first:] if frame.filename not in skip] if first is not None else []
        return traceback.StackSummary.from_list(kept)

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
    return user_frame(tb)


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
) -> fx.GraphModule:
    """Capture a copy of ``model`` as a ``GraphModule``; with example inputs, annotate shapes.

    ``capture`` picks the frontend: ``"fx"`` (torch.fx symbolic tracing: module calls stay visible,
    any input shape), ``"export"`` (``torch.export``, non-strict, specialised to the example inputs, see
    ``fxcondensa.capture.exported``), or ``"auto"`` (symbolic tracing, and ``torch.export`` when that fails).
    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (``{"input_ids": ids, "attention_mask": mask}``); the graph takes the inputs the model takes.
    ``fxcondensa.capture.exported.capture_of(gm)`` says which frontend made it.

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
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if example_inputs is not None:
        split_inputs(example_inputs)  # a bad container fails here, before any tracing
    if isinstance(model, fx.GraphModule) and not leaf_modules and concrete_args is None:
        gm = copy_model(model)  # already captured (by either frontend): keep its graph
    elif capture == "export":
        gm = _export(model, example_inputs, None)
    else:
        try:
            gm = _fx_trace(model, leaf_modules, concrete_args)
        except TraceError as exc:
            if capture == "fx" or example_inputs is None:
                raise
            gm = _export(model, example_inputs, exc)
        else:
            if example_inputs is not None and capture == "auto":
                try:
                    propagate_shapes(gm, example_inputs, fake=True)
                except ExampleInputError as exc:
                    # The symbolic trace baked a value that the real inputs contradict (a size read from a
                    # default argument, a branch taken on a proxy): torch.export runs the real Python.
                    try:
                        gm = export_capture(model, *split_inputs(example_inputs))
                    except Exception:
                        raise exc from None
                else:
                    return gm
    if example_inputs is not None and not (capture_of(gm) == "export" and _shapes_from_capture(gm, example_inputs)):
        propagate_shapes(gm, example_inputs, fake=True)
    return gm


CAPTURES = ("auto", "fx", "export")


def _concrete(value: Any) -> bool:
    """No symbolic size anywhere in ``value`` (a node's ``val``)."""
    leaves: list[Any] = []
    map_aggregate(value, lambda v: leaves.append(v) or v)
    for v in leaves:
        if isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in (*v.shape, *v.stride())):
            return False
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
    return True


def _shapes_from_capture(gm: fx.GraphModule, example_inputs: Any) -> bool:
    """Record what shape propagation would, from a torch.export capture's own ``val`` of each node, where that
    capture fixed the example's shapes (``exported.example_shapes``): torch.export already ran every op on
    fake tensors of those shapes, so a second run on meta tensors would only repeat it. False, with nothing
    recorded, where a node has no such value, a size is symbolic or the placeholders differ from the inputs."""
    try:
        inputs = graph_inputs(gm, example_inputs)
    except ValueError:
        return False
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(inputs) != len(placeholders):
        return False
    for node, x in zip(placeholders, inputs, strict=True):
        v = node.meta.get("val")
        if not _concrete(v) or isinstance(x, torch.Tensor) != isinstance(v, torch.Tensor) or (isinstance(x, torch.Tensor) and (
                tuple(v.shape) != tuple(x.shape) or v.dtype != x.dtype or v.device != x.device)):
            return False
    values: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            value = map_arg(node.args[0], lambda a: values[a])
        elif node.op == "call_function" and node.target is check_input_shapes:
            value = None
        elif "val" in node.meta:
            value = node.meta["val"]
        else:
            return False
        if not _concrete(value):
            return False
        values[node] = value
    for node, value in values.items():
        _record_metadata(node, value)
        if node.op == "get_attr":  # the attribute itself, as the interpreter fetches it (a Parameter)
            owner, _, attr = str(node.target).rpartition(".")
            node.meta["type"] = type(getattr(gm.get_submodule(owner) if owner else gm, attr))
        else:
            node.meta["type"] = torch.Tensor if isinstance(value, torch.Tensor) else type(value)
    return True


def _fx_trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]],
              concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    with work_copy():  # the records beside a compressed model stay with it
        work = copy_model(model)
    tracer = _Tracer(tuple(DEFAULT_LEAF_MODULES) + tuple(leaf_modules))
    try:
        graph = tracer.trace(work, concrete_args=concrete_args)
    except Exception as exc:  # any failure inside the user's forward: report where it happened
        module = tracer.failed_in
        inside = f"module '{module}'" if module and module != "<root>" else f"{type(model).__name__}.forward"
        error = TraceError(
            f"torch.fx could not trace {type(model).__name__} (inside {inside}, at "
            f"{_user_frame(exc.__traceback__)}): {type(exc).__name__}: {_first_line(exc)}. "
            "Make the module that holds this code a leaf (trace(..., leaf_modules=[ThatModule])), "
            "or fix the arguments that drive the control flow with concrete_args={...}."
        )
        # The failed trace's frames hold this copy of the model (each forward frame its module): kept by the
        # error, the copy would live on beside torch.export's while that capture runs (a second dense copy of
        # the weights, as large as the model). The message above already names the user's line.
        exc.__traceback__ = None
        del work, tracer
        raise error from exc
    gm = RecordedGraphModule(work, graph, class_name=type(model).__name__)
    graph_record(gm).capture = "fx"
    return gm


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [""])[0])[:300]


def _export(model: nn.Module, example_inputs: Any, fx_error: TraceError | None) -> fx.GraphModule:
    """Capture with torch.export; on failure one ``TraceError`` names both frontends' failures."""
    if example_inputs is None:
        raise ValueError("capture='export' needs example inputs: torch.export specialises the graph to them; "
                         "pass e.g. trace(model, torch.randn(1, 3, 224, 224), capture='export')")
    args, kwargs = split_inputs(example_inputs)
    try:
        return export_capture(model, args, kwargs)
    except Exception as exc:
        export_part = (f"torch.export could not capture it either (at {user_frame(exc.__traceback__)}): "
                       f"{type(exc).__name__}: {_first_line(exc)}")
        if fx_error is None:
            raise TraceError(
                f"torch.export could not capture {type(model).__name__} (at {user_frame(exc.__traceback__)}): "
                f"{type(exc).__name__}: {_first_line(exc)}. Try capture='fx' (symbolic tracing), or wrap the "
                "code at that line in a module with a plain tensor forward (an adapter).") from exc
        fx_part = str(fx_error).split(". Make the module")[0]
        raise TraceError(
            f"{fx_part}; and {export_part}. The model is unchanged. What to do: make the module holding the "
            "first line a leaf (leaf_modules=[ThatModule]) or fix the branch inputs with concrete_args={...} "
            "for torch.fx; or give torch.export inputs the model runs on, or wrap the offending code in a module "
            "with a plain tensor forward (an adapter)."
        ) from exc


class _ShapeProp(fx.Interpreter):
    """Shape propagation (as torch.fx's ShapeProp) that reports the failing node in one clear line."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0]
            raise ExampleInputError(f"node '{n.name}' ({n.op} {n.target}) failed: {type(exc).__name__}: {first_line}") from exc
        _record_metadata(n, result)
        n.meta["type"] = type(result)
        return result


# torch's extraction tests three memory formats per tensor (a tenth of a millisecond); a network has few
# distinct (shape, stride, dtype) triples, so plain tensors share one extraction per triple.
_METADATA: dict[Any, Any] = {}


def _record_metadata(node: fx.Node, value: Any) -> None:
    """Store the shape metadata of the tensors in ``value`` (a tensor or a structure of them) on ``node``."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _tensor_metadata(obj)
        return obj

    meta = map_aggregate(value, extract)
    if found:
        node.meta["tensor_meta"] = meta


def _tensor_metadata(t: torch.Tensor) -> Any:
    if type(t) not in (torch.Tensor, FakeTensor) or t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    key = (tuple(t.shape), t.stride(), t.dtype, t.requires_grad)
    meta = _METADATA.get(key)
    if meta is None:
        meta = _extract_tensor_metadata(t)
        if len(_METADATA) < 4096:  # bounded: a long session traces many shapes
            _METADATA[key] = meta
    return meta._replace(qparams={})  # a fresh object per node: its qparams dict is mutable


class _MetaShapeProp(_ShapeProp):
    """Shape propagation on the meta device: parameters are viewed as meta tensors per call, no data moves.

    Many meta kernels are written in Python (batch norm, relu: milliseconds a call, more than the real op on
    a small input), and a network repeats its layers with the same configuration and input shapes (the
    blocks of a ResNet stage). A built-in layer's meta output is a function of its configuration, its
    tensors' metadata and its inputs' metadata only, so each distinct call of one runs once and the others
    get fresh meta tensors of the recorded shape, strides and dtype.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._memo: dict[Any, Any] = {}

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        # A torch.export graph reads its weights with get_attr and calls ATen ops on them: the meta view of each
        # (metadata only, no copy) keeps the whole run on the meta device.
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.device.type != "meta" and type(value) in (torch.Tensor, nn.Parameter):
            return value.detach().to("meta").requires_grad_(value.requires_grad)
        return value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # The capture's device, written into the graph (``x.to("cpu")``, ``arange(..., device=cpu)``), is the
        # meta device here: a move off it would need data that meta tensors do not have.
        args, kwargs = map_aggregate((args, kwargs), lambda v: _META if isinstance(v, torch.device) else v)
        return super().call_function(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        key = _call_key(module, args, kwargs)
        if key is not None and key in self._memo:
            return _from_template(self._memo[key])
        state = {k: v.to("meta") for k, v in [*module.named_parameters(), *module.named_buffers()]}
        out = functional_call(module, state, args, kwargs)
        if key is not None:
            template = _template(out)
            if template is not _NO_TEMPLATE:
                self._memo[key] = template
        return out


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)
_META = torch.device("meta")
_NO_TEMPLATE = object()
_NN_MODULES = "torch.nn.modules."


def _value_key(value: Any) -> Any:
    """A hashable description of an argument or a module tensor, as far as meta kernels can see it; None
    when the value is something else (an arbitrary object), whose effect cannot be vouched for."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter):
            return None
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device.type, value.storage_offset(),
                value.requires_grad)
    if isinstance(value, (tuple, list)):
        items = tuple(_value_key(v) for v in value)
        return None if any(i is None for i in items) else (type(value).__name__, items)
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)  # the type too: True and 1 hash alike
    return None


def _call_key(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """The memo key of a call of a built-in leaf layer on meta inputs, or None when it must run: a layer
    defined outside ``torch.nn`` (its forward may read anything), one with children, a hook, or an
    attribute that is not a plain value."""
    if not type(module).__module__.startswith(_NN_MODULES) or module._modules or _global_hooks():
        return None
    items: list[Any] = [type(module)]
    for name, value in module.__dict__.items():
        if name in ("_parameters", "_buffers"):
            tensors = []
            for k, t in value.items():
                tensors.append((k, None if t is None else _value_key(t)))
                if t is not None and tensors[-1][1] is None:
                    return None
            items.append((name, tuple(tensors)))
        elif name == "_non_persistent_buffers_set":
            items.append((name, tuple(sorted(value))))
        elif isinstance(value, (dict, set)):
            if value:  # hooks (or bookkeeping we do not know): run the layer
                return None
        else:
            key = _value_key(value)
            if key is None:
                return None
            items.append((name, key))
    call = _value_key((tuple(args), tuple(sorted(kwargs.items()))))
    return None if call is None else (tuple(items), call)


def _global_hooks() -> bool:
    """Whether a global module hook is installed (it runs on every call, so no call may be skipped)."""
    from torch.nn.modules import module as nn_module

    return any(getattr(nn_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
        "_global_forward_hooks_always_called"))


def _template(out: Any) -> Any:
    """What to rebuild a meta output from (shape, stride and dtype of each tensor), or ``_NO_TEMPLATE``."""
    if isinstance(out, torch.Tensor):
        if type(out) is not torch.Tensor or out.device.type != "meta" or out.storage_offset() != 0:
            return _NO_TEMPLATE
        return ("tensor", tuple(out.shape), out.stride(), out.dtype, out.requires_grad)
    if type(out) in (tuple, list):
        items = [_template(o) for o in out]
        return _NO_TEMPLATE if any(i is _NO_TEMPLATE for i in items) else ("seq", type(out), items)
    return ("plain", out) if isinstance(out, _PLAIN) else _NO_TEMPLATE


def _from_template(template: Any) -> Any:
    if template[0] == "tensor":
        _, shape, stride, dtype, requires_grad = template
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta").requires_grad_(requires_grad)
    if template[0] == "seq":
        return template[1](_from_template(t) for t in template[2])
    return template[1]


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any, *, fake: bool = False) -> Any:
    """Run shape propagation in eval mode without gradients; returns the model's outputs.

    With ``fake=True`` the pass runs on meta (or else fake) tensors: shapes and dtypes only, no arithmetic,
    a fraction of a real forward's cost on large inputs; it falls back to a real run for any op neither can
    handle. The returned outputs are then meta / fake too. Training flags are restored afterwards.
    """
    try:
        inputs = graph_inputs(gm, example_inputs)
    except ValueError as exc:
        raise ExampleInputError(str(exc)) from exc
    try:
        with eval_mode(gm), torch.no_grad():
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


def logits_of(out: Any, owner: str = "evaluate") -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or the ``.logits`` of a Hugging Face ``ModelOutput``.

    Example:
        >>> import torch
        >>> logits_of(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{owner}: the model returned {type(out).__name__}, which is neither a tensor of logits "
                        "nor an output with a .logits tensor; wrap the model so that it returns its logits")
    return logits

"""The second capture frontend: ``torch.export``, for models that torch.fx's symbolic tracing cannot follow.

Symbolic tracing runs ``forward`` on proxies, so Python that branches on shapes or dtypes, iterates over a
proxy, or calls through ``*args/**kwargs`` wrappers stops it (Hugging Face models, some timm models).
``torch.export.export(model, args, kwargs, strict=False)`` runs the real Python on fake tensors instead and
records the ATen ops that ran, with every branch the example inputs took.
The result here is a plain ``fx.GraphModule`` whose nodes are ``get_attr`` (parameters, under their usual
names) and ``call_function`` of ATen ops (``aten.conv2d``, ``aten.linear``, ``aten.layer_norm``, ...), the
ops the registry's ATen keys cover.

What such a graph is, compared with a symbolically traced one:

- It takes the model's own inputs, positional and keyword (``gm(input_ids=..., attention_mask=...)``),
  and returns the model's output structure (a ``ModelOutput``, dict, tuple): its code flattens and
  unflattens them with the specs kept in ``gm._in_spec`` / ``gm._out_spec``.
- It is captured in eval mode and stays so: dropout is off and BatchNorm uses its running statistics
  whatever ``train()`` / ``eval()`` say afterwards (the ops are baked into the graph).
- It takes any batch size, and any sequence length for token inputs (2-D integer or boolean tensors) and
  3-D float inputs: those dims are captured dynamic (``torch.export.Dim.AUTO``, with size-oblivious reasoning
  so that an example batch of 1 stays dynamic). A dim the model's code ties to a size stays fixed; images
  keep their height and width. What the inputs must satisfy (fixed dims, ranges, conditions the code
  assumed, e.g. more than one token) is checked on every call and listed in the record's
  ``input_constraints`` (``fxcondensa.capture.guards``). Where a dynamic capture fails, the example's shapes
  are captured instead, and a note says why.
- Models that return a key-value cache (``config.use_cache``, GPT-2, Llama) are captured with the cache turned
  off (``config.use_cache = False``, unless the caller passes ``use_cache`` explicitly): a cache object is not
  a tensor structure the graph can return. A model that can generate has it turned off before the capture;
  another is captured again without it when the first capture fails. The captured model returns everything
  else; ``capture_notes(gm)`` says so and ``thin`` warns.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxcondensa.capture.exported import export_capture, capture_of
    >>> class Branchy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 3)
    ...     def forward(self, x, *, scale=None):
    ...         y = self.fc(x)
    ...         return {"y": y * scale if scale is not None else y}
    >>> gm = export_capture(Branchy(), (torch.randn(2, 4),), {"scale": torch.tensor(2.0)})
    >>> capture_of(gm), sorted(gm(torch.randn(5, 4), scale=torch.tensor(2.0)))  # any batch size
    ('export', ['y'])
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import linecache
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .guards import export_guards, insert_guard_node
from .records import META, GraphRecord, RecordedGraphModule, ThinRecord, graph_record, work_copy
from .repeated import Stack, find_stacks, stitch, truncated
from .repeated import enabled as repeated_enabled
from .sharing import copy_model

__all__ = ["split_inputs", "export_capture", "capture_of", "capture_notes", "graph_inputs",
           "call_with", "user_frame", "example_shapes", "dynamic_capture_count"]

_EXAMPLE_SHAPES: contextvars.ContextVar[bool] = contextvars.ContextVar("fxcondensa_example_shapes", default=False)
# How many captures asked torch.export for dynamic dims (tests observe that a path skips them without timing).
_DYNAMIC_CAPTURES = [0]


@contextlib.contextmanager
def example_shapes() -> Iterator[None]:
    """Captures made inside fix every dim to the example's size instead of capturing the batch and sequence
    dims dynamic: three to four times cheaper for a language model, for a caller that will not return the
    graph (``thin`` giving back the user's own class, whose forward takes any shape).

    Example:
        >>> import torch
        >>> with example_shapes():
        ...     gm = export_capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
        >>> graph_record(gm).input_constraints
        ['input.shape[0] == 2', 'input.shape[1] == 4']
    """
    token = _EXAMPLE_SHAPES.set(True)
    try:
        yield
    finally:
        _EXAMPLE_SHAPES.reset(token)


def dynamic_capture_count() -> int:
    """How many ``torch.export`` calls with dynamic dims this process has made."""
    return _DYNAMIC_CAPTURES[0]


# With a trailing separator: torchvision's files must not pass for torch's ("/torch" prefixes "/torchvision").
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs as ``(args, kwargs)``: a tensor, a tuple/list of positional inputs, or a dict of
    keyword inputs (``{"input_ids": ids, "attention_mask": mask}``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) and example_inputs:
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"keyword example inputs need string keys (argument names of forward), got {bad[0]!r}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a non-empty tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}; pass e.g. torch.randn(1, 3, 224, 224) or "
        "{'input_ids': ids, 'attention_mask': mask}")


def user_frame(tb: Any) -> str:
    """The innermost frame of a traceback outside torch and fxcondensa: the user's line that failed."""
    where = "unknown location"
    for frame in traceback.extract_tb(tb):
        path = os.path.abspath(frame.filename)
        # "<string>", "<eval_with_key>.N": code torch generated, never a line the user can look up.
        if not path.startswith((_TORCH_DIR, _OWN_DIR)) and not frame.filename.startswith("<"):
            code = frame.line or linecache.getline(frame.filename, frame.lineno or 0).strip()
            where = f'{frame.filename}:{frame.lineno}, in {frame.name}: "{code}"'
    return where


def _disable_cache(model: nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Turn off a Hugging Face style key-value cache on the (copied) model: the cache object it would
    return is no tensor structure. Returns what was changed, for the record."""
    config = getattr(model, "config", None)
    if "use_cache" in kwargs or not getattr(config, "use_cache", False):
        return []
    config.use_cache = False
    for sub in model.modules():  # sub-models (an encoder inside a seq2seq model) keep their own config
        sub_config = getattr(sub, "config", None)
        if getattr(sub_config, "use_cache", False):
            sub_config.use_cache = False
    return ["captured with config.use_cache=False: the captured model returns no key-value cache"]


def _safe(ask: Any) -> bool:
    try:
        return bool(ask())
    except Exception:
        return False


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``dynamic_shapes`` for torch.export: dim 0 of every input is the batch; dim 1 of a 2-D integer or
    boolean input (token ids, masks) and of a 3-D float input (embeddings) is the sequence. ``Dim.AUTO``:
    torch.export keeps a dim fixed where the model's code ties it to a size. None where the inputs cannot
    be bound to the forward's parameters by name."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dims = {0: torch.export.Dim.AUTO}
        if (t.dim() == 2 and not t.is_floating_point() and not t.is_complex()) or (t.dim() == 3 and t.is_floating_point()):
            dims[1] = torch.export.Dim.AUTO
        return dims

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(model.forward).parameters.values()
           if p.name in bound):
        return None  # torch.export names *args / **kwargs differently: leave the shapes static
    return {k: pytree.tree_map(one, v) for k, v in bound.items()}


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Any) -> Any:
    # Size-oblivious reasoning: a batch of 1 in the example stays a batch of any size in the graph (torch.export
    # otherwise fixes every dim whose example size is 0 or 1).
    from torch.fx.experimental import _config

    with torch.no_grad(), _config.patch(backed_size_oblivious=True):
        return torch.export.export(model, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic)


def _export_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], notes: list[str]) -> Any:
    """torch.export with dynamic batch and sequence dims, or with the example's shapes where that fails
    (then a note says why)."""
    dynamic = None if _EXAMPLE_SHAPES.get() else _dynamic_shapes(model, args, kwargs)
    if dynamic is not None:
        _DYNAMIC_CAPTURES[0] += 1
        try:
            return _export(model, args, kwargs, dynamic)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        ep = _export(model, args, kwargs, None)
        notes.append(f"captured with the example's shapes only (a capture with dynamic batch and sequence dims "
                     f"failed: {reason})")
        return ep
    return _export(model, args, kwargs, None)


def export_capture(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Capture a copy of ``model`` with ``torch.export`` (non-strict, eval mode, dynamic batch and sequence
    dims; the example's shapes inside ``example_shapes()``) as a plain ``fx.GraphModule`` that takes the model's inputs and returns its output structure.

    Raises whatever ``torch.export`` raises; ``fxcondensa.trace`` turns that into a ``TraceError``.
    """
    kwargs = dict(kwargs or {})
    with work_copy():  # the records beside a compressed model stay with it
        work = copy_model(model).eval()
    # A model that generates (a Hugging Face causal or seq2seq LM) returns its key-value cache: turn it off
    # before the capture rather than after a failed one, which costs as much as a capture.
    can_generate = getattr(work, "can_generate", None)
    notes: list[str] = _disable_cache(work, kwargs) if callable(can_generate) and _safe(can_generate) else []
    # Inside ``repeated_once()`` a stack of identical blocks is traced two blocks deep and copied
    # (``capture/repeated.py``); where the short capture or the copy fails, the model is captured whole.
    stacks = find_stacks(work) if repeated_enabled() else []
    if stacks:
        short_notes = list(notes)
        try:
            with truncated(stacks):
                ep = _export_model(work, args, kwargs, short_notes)
        except Exception:
            ep = None
        gm = _module_of(ep, model, short_notes, stacks) if ep is not None else None
        if gm is not None:
            return gm
    return _module_of(_export_model(work, args, kwargs, notes), model, notes, [])


def _export_model(work: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], notes: list[str]) -> Any:
    """torch.export of ``work``; once more without a key-value cache where the first capture fails and the model
    has one to turn off (a cache object in the output, GPT-2 and Llama with use_cache=True, is no tensor
    structure); anything else fails as it did."""
    try:
        return _export_dynamic(work, args, kwargs, notes)
    except Exception:
        off = _disable_cache(work, kwargs)
        if not off:
            raise
        notes[:] = off
        return _export_dynamic(work, args, kwargs, notes)


def _module_of(ep: Any, model: nn.Module, notes: list[str], stacks: list[Stack]) -> fx.GraphModule | None:
    """The plain ``GraphModule`` of an ExportedProgram, each stack's blocks written in; None where a stack
    cannot be copied."""
    source = ep.module()
    try:
        guards, unread = export_guards(ep, source), None
    except Exception as exc:  # torch's private guard helpers changed: run unguarded, and say so
        guards, unread = (), f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    # ep.module() is a special GraphModule subclass that refuses train()/eval() and cannot be pickled;
    # a plain GraphModule over the same graph and submodules does both.
    graph = copy.deepcopy(source.graph)
    for node in list(graph.nodes):
        # torch's input guard module cannot be pickled: the same guards are checked by ``check_input_shapes``.
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)
    repeated = []
    for stack in stacks:
        try:
            if stitch(graph, stack, source) is not None:
                return None
        except Exception:  # a graph this copy does not know: the model is captured whole
            return None
        repeated.append(f"{stack.path}: {len(stack.blocks)} blocks, 2 traced")
    gm = RecordedGraphModule(source, graph, class_name=type(model).__name__)
    gm._in_spec = getattr(source, "_in_spec", None)
    gm._out_spec = getattr(source, "_out_spec", None)
    insert_guard_node(gm, guards)
    record = graph_record(gm)
    record.capture, record.notes, record.repeated = "export", list(notes), repeated
    record.input_constraints = [shown for _, shown in guards]
    if unread is not None:
        record.input_constraints.append(f"unknown: torch.export's guards could not be read ({unread}); the "
                                        "model checks no input shapes")
    return gm


def capture_of(gm: Any) -> str:
    """``"export"`` for a graph captured by ``export_capture``, ``"fx"`` otherwise."""
    rec = _record(gm)
    return rec.capture if rec is not None else "fx"


def capture_notes(gm: Any) -> list[str]:
    """What the capture changed about the model (e.g. the key-value cache turned off), one line each."""
    rec = _record(gm)
    return list(getattr(rec, "notes", [])) if rec is not None else []


def _record(gm: Any) -> GraphRecord | ThinRecord | None:
    meta = getattr(gm, "meta", None)
    rec = meta.get(META) if isinstance(meta, dict) else None
    return rec if isinstance(rec, (GraphRecord, ThinRecord)) else None


def graph_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple[Any, ...]:
    """The values of ``gm``'s placeholders, in graph order, for example inputs given as the model takes
    them (a tensor, positional inputs, or a dict of keyword inputs); what ``fx.Interpreter.run`` needs."""
    args, kwargs = split_inputs(example_inputs)
    spec = getattr(gm, "_in_spec", None)
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen) and spec is not None:
        flat, got = pytree.tree_flatten((args, kwargs))
        if got != spec and not kwargs and len(args) == spec.num_leaves:
            return tuple(args)  # already the flat placeholder values (what thin rebuilds from shape metadata)
        if got != spec:
            raise ValueError(
                f"the inputs do not have the structure {type(gm).__name__} was captured with: expected "
                f"{_spec_text(spec)}, got {_spec_text(got)}; pass the same positional and keyword inputs")
        return tuple(flat)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not kwargs:
        return tuple(args)
    values = []
    for k, node in enumerate(placeholders):
        name = node.target.lstrip("*")
        if k < len(args):
            values.append(args[k])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # the forward's default
            values.append(node.args[0])
        else:
            raise ValueError(f"no example input for argument '{name}' of {type(gm).__name__}: pass it "
                             f"positionally or as {{'{name}': ...}}")
    unknown = sorted(set(kwargs) - {n.target.lstrip("*") for n in placeholders[len(args):]})
    if unknown:
        raise ValueError(f"{type(gm).__name__} has no argument named {unknown[0]!r} (it takes "
                         f"{[n.target for n in placeholders]}); fix the keys of the example inputs")
    return tuple(values)


def _spec_text(spec: Any) -> str:
    try:
        args, kwargs = pytree.tree_unflatten(["t"] * spec.num_leaves, spec)
        return f"{len(args)} positional and keywords {sorted(kwargs)}"
    except Exception:
        return str(spec)


def call_with(module: Any, example_inputs: Any) -> Any:
    """Call ``module`` with example inputs in the form the model takes them (tensor, tuple or dict)."""
    args, kwargs = split_inputs(example_inputs)
    return module(*args, **kwargs)

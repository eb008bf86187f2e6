"""Typed records that passes leave on graph nodes and on the modules they return.

Every pass reads and writes these through the accessors below instead of free dicts, so that a field has
one name and one type wherever it is used:

- ``NodeRecord`` (``node.meta["fxcondensa"]``): the parameter annotations a scheme made on the node (masks,
  storage dtypes), and the channel dim the analysis tracked through it.
- ``GraphRecord`` (``gm.meta["fxcondensa"]`` of a compressed graph): what a scheme searched for (a MAC
  target and what it reached).
- ``ThinRecord`` (``gm.meta["fxcondensa"]`` of a thinned graph): the recipe (kept channel ids and the input
  shapes they were found for), every channel group with its kept count, the frozen groups with their
  reasons, how the graph was captured, and how many times the analysis fell back to freezing a group
  because a rule raised.

This module is the bottom layer: it imports nothing from the rest of the package but ``codegen``.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.5), torch.randn(1, 1, 28, 28))
    >>> rec = thin_record(small)
    >>> rec.groups[0].group, rec.groups[0].channels, rec.rule_failures
    ('conv1', 20, 0)
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .codegen import hoist_module_paths

__all__ = [
    "META",
    "ParamAnnotation",
    "NodeRecord",
    "TargetRecord",
    "GraphRecord",
    "GroupRecord",
    "FrozenGroup",
    "ThinRecord",
    "node_record",
    "graph_record",
    "thin_record",
    "set_thin_record",
    "compressed_graph",
    "set_compressed_graph",
    "work_copy",
    "RecordedGraphModule",
]

META = "fxcondensa"


@dataclass
class ParamAnnotation:
    """What a scheme decided for one parameter: ``mask`` (bool, True keeps) and/or storage ``dtype``."""

    mask: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    def merged(self, mask: torch.Tensor | None, dtype: torch.dtype | None) -> ParamAnnotation:
        """A later scheme narrows the mask (logical and) and overrides the dtype.

        Masks may live on different devices (one scheme built it next to CUDA weights, another on the
        CPU): the result lives where the earlier mask does.
        """
        if mask is not None and self.mask is not None:
            mask = self.mask & mask.to(self.mask.device)
        return ParamAnnotation(mask if mask is not None else self.mask, dtype if dtype is not None else self.dtype)


@dataclass
class NodeRecord:
    """What the passes know about one node.

    ``params`` maps an attribute path relative to the node's target ("weight", "0.bias", or "" for a
    ``get_attr`` node) to its annotation; ``chan`` is the channel dim the analysis tracked through the node
    (a ``ChanInfo``, a list of them for a split, or None).
    """

    params: dict[str, ParamAnnotation] = field(default_factory=dict)
    chan: Any = None


@dataclass(frozen=True)
class TargetRecord:
    """A budget a scheme searched for: ``kind`` ("flops"), the ``target`` fraction of the dense cost, the
    fraction it ``reached`` and the global ``density`` that reached it."""

    kind: str
    target: float
    reached: float
    density: float


@dataclass
class GraphRecord:
    """What capture and schemes leave on a graph: how it was captured ("fx" or "export") and what the capture
    changed about the model (one line each, e.g. a key-value cache turned off), the budget a scheme
    searched for, whether a scheme prunes head_dim columns (thinning then runs its column stage), and what the
    inputs' shapes must satisfy (a torch.export capture: ``fxcondensa.capture.guards``; none for torch.fx)."""

    capture: str = "fx"
    notes: list[str] = field(default_factory=list)
    target: TargetRecord | None = None
    head_dim_columns: bool = False
    input_constraints: list[str] = field(default_factory=list)
    # Stacks of identical blocks captured two blocks deep and copied (``capture/repeated.py``), one line each.
    repeated: list[str] = field(default_factory=list)
    # What ``compress`` returned: "module" (a copy of the user's class sharing this graph's tensors) or
    # "graph" (this graph), and for a graph returned where the user's class was asked for, why.
    returns: str = "graph"
    reason: str = ""


@dataclass(frozen=True)
class GroupRecord:
    """One channel group after thinning: its name, producers, channel count, kept count and why it is
    frozen (empty when it is not)."""

    group: str
    producers: tuple[str, ...]
    channels: int
    kept: int
    frozen: str = ""


@dataclass(frozen=True)
class FrozenGroup:
    """A group kept whole, with the layers it spans and the reasons."""

    group: str
    layers: tuple[str, ...]
    reason: str


@dataclass
class ThinRecord:
    """What ``thin`` leaves on the thinned module (``thin_record(thinned)``).

    ``keep`` (one bool per channel id of the analysis, deterministic for an architecture and input shapes)
    with ``input_shapes`` / ``input_dtypes`` is the recipe that ``save_thinned`` writes and ``rethin``
    replays. ``rule_failures`` counts the nodes where an op rule raised and the analysis froze the channels
    flowing in instead (``thin(..., strict=True)`` raises there); ``capture`` says how the graph was made and
    ``notes`` what that capture changed (e.g. a key-value cache turned off). ``input_constraints`` names
    what the thinned model requires of its inputs' shapes, one condition per line (``"pixel_values.shape[2]
    == 224"``: a dim that cannot vary; ``"input_ids.shape[1] > 1"``), checked on every call; empty for a
    graph that takes any shape (torch.fx captures; see ``fxcondensa.capture.guards``).
    """

    keep: torch.Tensor = field(repr=False)
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    groups: list[GroupRecord] = field(default_factory=list)
    frozen: list[FrozenGroup] = field(default_factory=list)
    target: TargetRecord | None = None
    rule_failures: int = 0
    capture: str = "fx"
    notes: list[str] = field(default_factory=list)  # what the capture changed about the model
    # What thin returned: "module" (the user's class, thinned) or "graph" (a GraphModule), and for a graph
    # returned where the user's class was asked for ("auto"), why the user's class could not follow.
    returns: str = "graph"
    reason: str = ""
    input_names: list[str] = field(default_factory=list)  # the inputs by name, to call the user's class
    input_constraints: list[str] = field(default_factory=list)
    # Whole experts removed (``ExpertPrune``): router weight path -> the experts kept, in their dense numbering.
    experts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def whole_reason(self) -> str | None:
        """One line saying why nothing was removed, or None when some channel went."""
        if self.experts or not self.groups or any(g.kept < g.channels for g in self.groups):
            return None
        reasons = list(dict.fromkeys(f.reason for f in self.frozen))
        if not reasons:
            return "no channel was zero across its whole group (nothing pruned, or pruned unstructured)"
        if len(self.frozen) == len(self.groups):
            return f"every channel group is frozen: {reasons[0]}" + (f" (and {len(reasons) - 1} more reasons)"
                                                                     if len(reasons) > 1 else "")
        return "the groups that could be thinned had no channel that is zero across the whole group"


def node_record(node: fx.Node, *, create: bool = True) -> NodeRecord | None:
    """The node's record, created empty on first use (``create=False``: None when there is none)."""
    rec = node.meta.get(META)
    if not isinstance(rec, NodeRecord):
        if not create:
            return None
        rec = NodeRecord()
        node.meta[META] = rec
    return rec


def graph_record(gm: fx.GraphModule) -> GraphRecord:
    """The compressed graph's record, created empty on first use."""
    rec = gm.meta.get(META)
    if not isinstance(rec, GraphRecord):
        rec = GraphRecord()
        gm.meta[META] = rec
    return rec


def thin_record(gm: Any) -> ThinRecord | None:
    """The record ``thin`` left on ``gm`` (a thinned ``GraphModule``, or the user's own class returned by
    ``thin``), or None when ``gm`` is not a thinned module."""
    meta = getattr(gm, "meta", None)
    rec = meta.get(META) if isinstance(meta, dict) else None
    if rec is None and isinstance(gm, torch.nn.Module):
        rec = _beside(gm).record
    return rec if isinstance(rec, ThinRecord) else None


# What fxcondensa keeps beside a model of the user's own class (its thin record, the compressed graph
# behind it) lives in one entry of the model's ``__dict__``: a plain object, not a submodule or a tensor, so
# ``state_dict``, ``parameters()`` and the class's own methods never see it, while ``copy.deepcopy`` and
# pickling (``torch.save`` of the whole model) carry it with the model.
_KEY = "_fxcondensa_beside"

# Set while fxcondensa copies a model for its own work (a capture): the copy is not the user's, and carrying
# the graph beside it (masks included) would only cost memory.
_WORK_COPY: contextvars.ContextVar[bool] = contextvars.ContextVar("fxcondensa_work_copy", default=False)


class _Beside:
    """The records beside a model. A deep copy copies the graph with the same memo as the model, so the
    copies share their tensors as the originals do; a pickle holds both once (pickle's own memo)."""

    def __init__(self, graph: fx.GraphModule | None = None, record: ThinRecord | None = None):
        self.graph, self.record = graph, record

    def __deepcopy__(self, memo: dict[int, Any]) -> _Beside:
        if _WORK_COPY.get():
            return _Beside()
        return _Beside(copy.deepcopy(self.graph, memo), copy.deepcopy(self.record, memo))


def _beside(model: torch.nn.Module, *, create: bool = False) -> _Beside:
    found = model.__dict__.get(_KEY)
    if not isinstance(found, _Beside):
        found = _Beside()
        if create:
            model.__dict__[_KEY] = found
    return found


@contextlib.contextmanager
def work_copy() -> Iterator[None]:
    """Deep copies made inside leave the records beside a model behind (a capture's working copy).

    Example:
        >>> import copy, fxcondensa
        >>> from fxcondensa.schemes import Prune
        >>> small = fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.1))
        >>> with work_copy():
        ...     bare = copy.deepcopy(small)
        >>> compressed_graph(bare) is None, compressed_graph(copy.deepcopy(small)) is not None
        (True, True)
    """
    token = _WORK_COPY.set(True)
    try:
        yield
    finally:
        _WORK_COPY.reset(token)


def set_thin_record(model: torch.nn.Module, record: ThinRecord) -> None:
    """Attach ``record`` to a thinned model of the user's own class (``thin_record`` reads it back)."""
    if isinstance(model, fx.GraphModule):
        model.meta[META] = record
    else:
        beside = _beside(model, create=True)
        beside.record, beside.graph = record, None  # a thinned model: no compressed graph is behind it


def compressed_graph(model: Any) -> fx.GraphModule | None:
    """The annotated graph of a compressed model: ``model`` itself when it is a ``GraphModule``, the graph
    ``compress`` kept beside a compressed model of the user's own class (it travels with ``copy.deepcopy``
    and pickling), else None.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import Prune
        >>> small = fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.1))
        >>> isinstance(small, fxcondensa.models.LeNet5), isinstance(compressed_graph(small), torch.fx.GraphModule)
        (True, True)
    """
    if isinstance(model, fx.GraphModule):
        return model
    return _beside(model).graph if isinstance(model, torch.nn.Module) else None


def set_compressed_graph(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Keep ``gm`` (the annotated graph whose tensors ``model`` shares) beside ``model``."""
    beside = _beside(model, create=True)
    beside.graph, beside.record = gm, None


class RecordedGraphModule(fx.GraphModule):
    """The ``GraphModule`` that ``trace`` (and so ``compress`` and ``thin``) returns: one whose graph and
    records survive whole-module pickling.

    ``torch.save(gm)`` of a plain GraphModule stores its generated code and rebuilds the graph by tracing that
    code again. That drops ``gm.meta`` and every node's metadata (a reloaded compressed model would forget its
    storage dtypes and masks, a thinned one its recipe), and it cannot retrace every graph: a torch.export
    capture holds ATen operators, which do not pickle, and pytree input handling that symbolic tracing cannot
    follow, and a thinned graph may call fxcondensa's own width-preserving functions, which a retrace would
    trace into. This class pickles the graph itself instead, node by node (ATen operators by name), with the
    records beside it, and rebuilds exactly that graph when the module is loaded.

    Example:
        >>> import pickle, torch, fxcondensa
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> again = pickle.loads(pickle.dumps(gm))
        >>> [n.name for n in again.graph.nodes] == [n.name for n in gm.graph.nodes], type(again).__name__
        (True, 'LeNet5')
    """

    def recompile(self) -> Any:
        """torch.fx's recompile, with each submodule container looked up once per forward
        (``codegen.hoist_module_paths``); a transformer the user registered runs first."""
        hoist = hoist_module_paths(self.graph)
        with self.graph.on_generate_code(lambda prev: (lambda body: hoist(prev(body) if prev else body))):
            return super().recompile()

    def __reduce__(self) -> tuple[Any, ...]:
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "_code", "meta")}
        nodes = [(n.op, n.name, _encode(n.target), _encode(n.args), _encode(n.kwargs), n.type)
                 for n in self.graph.nodes]
        records = {n.name: n.meta[META] for n in self.graph.nodes if isinstance(n.meta.get(META), NodeRecord)}
        return (_rebuild_from_graph, (body, nodes, self.graph._codegen, self.meta.get(META), records,
                                      type(self).__name__))


@dataclass(frozen=True)
class _NodeRef:
    """A node named in another node's arguments, while pickled."""

    name: str


@dataclass(frozen=True)
class _OperatorRef:
    """A ``torch.ops`` operator (overload, packet or higher-order op), pickled by its name."""

    namespace: str
    name: str
    overload: str | None


@dataclass(frozen=True)
class _FunctionRef:
    """A function made by a factory (``F.max_pool2d`` is ``boolean_dispatch``'s local ``fn``), pickled by the
    module attribute it is published as: pickle looks a function up by its qualified name, which for such a
    function names the factory's local scope, not anything importable."""

    module: str
    name: str


def _published_name(fn: Any) -> _FunctionRef | None:
    """The module attribute a factory-made function is published as, when it is exactly that object."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    if not (module and name and "<locals>" in getattr(fn, "__qualname__", "")):
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return _FunctionRef(module, name) if found is fn else None


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return _NodeRef(value.name)
    if isinstance(value, torch._ops.OpOverload):
        return _OperatorRef(value.namespace, value._schema.name.split("::")[-1], value._overloadname)
    if isinstance(value, torch._ops.OpOverloadPacket):
        return _OperatorRef(value._qualified_op_name.split("::")[0], value._qualified_op_name.split("::")[1], None)
    if isinstance(value, torch._ops.HigherOrderOperator):
        return _OperatorRef("higher_order", value.name(), None)
    if callable(value) and not isinstance(value, type):
        ref = _published_name(value)
        if ref is not None:
            return ref
    if isinstance(value, (tuple, list)):
        items = [_encode(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # named tuples by field
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_encode(value.start), _encode(value.stop), _encode(value.step))
    return value


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, _NodeRef):
        return env[value.name]
    if isinstance(value, _OperatorRef):
        op = getattr(getattr(torch.ops, value.namespace), value.name)
        return op if value.overload is None else getattr(op, value.overload)
    if isinstance(value, _FunctionRef):
        return getattr(importlib.import_module(value.module), value.name)
    if isinstance(value, (tuple, list)):
        items = [_decode(v, env) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _decode(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_decode(value.start, env), _decode(value.stop, env), _decode(value.step, env))
    return value


def _rebuild_from_graph(body: dict[str, Any], nodes: list[tuple], codegen: Any, graph_rec: Any,
                        records: dict[str, NodeRecord], name: str) -> fx.GraphModule:
    graph = fx.Graph()
    graph._codegen = codegen  # pytree in/out handling of a torch.export capture, plain otherwise
    env: dict[str, fx.Node] = {}
    for op, node_name, target, args, kwargs, type_expr in nodes:
        node = graph.create_node(op, _decode(target, env), _decode(args, env), _decode(kwargs, env), name=node_name,
                                 type_expr=type_expr)
        env[node_name] = node
        if node_name in records:
            node.meta[META] = records[node_name]
    root = torch.nn.Module()
    root.__dict__.update(body)
    gm = RecordedGraphModule(root, graph, class_name=name)
    for key, value in body.items():  # what the graph does not reference (input/output specs, flags)
        if key not in gm.__dict__:
            gm.__dict__[key] = value
    if graph_rec is not None:
        gm.meta[META] = graph_rec
    return gm

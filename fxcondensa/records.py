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

This module is the bottom layer: it imports nothing from the rest of the package.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.5), torch.randn(1, 1, 28, 28))
    >>> rec = thin_record(small)
    >>> rec.groups[0].group, rec.groups[0].channels, rec.rule_failures
    ('conv1', 20, 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

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
    changed about the model (one line each, e.g. a key-value cache turned off), and the budget a scheme
    searched for."""

    capture: str = "fx"
    notes: list[str] = field(default_factory=list)
    target: TargetRecord | None = None


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
    ``notes`` what that capture changed (e.g. a key-value cache turned off).
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

    @property
    def whole_reason(self) -> str | None:
        """One line saying why nothing was removed, or None when some channel went."""
        if not self.groups or any(g.kept < g.channels for g in self.groups):
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
    """The record ``thin`` left on ``gm``, or None when ``gm`` is not a thinned module."""
    meta = getattr(gm, "meta", None)
    rec = meta.get(META) if isinstance(meta, dict) else None
    return rec if isinstance(rec, ThinRecord) else None


class RecordedGraphModule(fx.GraphModule):
    """The ``GraphModule`` that ``trace`` (and so ``compress`` and ``thin``) returns: one whose records
    survive whole-module pickling.

    ``torch.save(gm)`` stores a GraphModule as its generated code and rebuilds the graph by tracing that code
    again, which drops ``gm.meta`` and every node's metadata: a reloaded compressed model would forget its
    storage dtypes and masks, a thinned one its recipe. This class pickles the records beside the code and puts
    them back, by node name (retracing the generated code keeps the names), when the module is loaded.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        nodes = {n.name: n.meta[META] for n in self.graph.nodes if isinstance(n.meta.get(META), NodeRecord)}
        return (_rebuild_with_records, (rebuild, args, self.meta.get(META), nodes, type(self).__name__))


def _rebuild_with_records(rebuild: Any, args: tuple, graph_rec: Any, nodes: dict[str, NodeRecord],
                          name: str = "GraphModule") -> fx.GraphModule:
    gm = rebuild(*args)
    # The rebuilt module is a plain GraphModule (its class made per instance): give it a per-instance class
    # derived from this one, so that saving it again keeps the records, and regenerate its forward there.
    # torch recognises per-instance classes by a __qualname__ ending in "GraphModuleImpl" and skips them when it
    # makes the next one (on a deepcopy); any other qualname would stack two call wrappers that call each other
    # forever. The __name__ is the model's, as torch sets it (its own rebuild forgets it).
    gm.__class__ = type(name, (RecordedGraphModule,), {"__qualname__": "RecordedGraphModule.GraphModuleImpl"})
    gm.recompile()
    if graph_rec is not None:
        gm.meta[META] = graph_rec
    for node in gm.graph.nodes:
        if node.name in nodes:
            node.meta[META] = nodes[node.name]
    return gm

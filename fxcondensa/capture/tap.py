"""Observe intermediate values of a captured graph without changing it: ``tap`` returns a module that runs the
same graph on the same parameters (shared, not copied) and shows the value of each named node to a callback.

Distillation matches intermediate states through it and the calibration-aware channel scores gather their
statistics through it, batch by batch (a callback reduces each value as it goes, so nothing accumulates).
It works for both capture frontends: symbolic tracing keeps module calls as nodes, ``torch.export`` leaves
only operator nodes, and both have node names.

Example:
    >>> import torch, fxcondensa
    >>> gm = fxcondensa.trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.randn(2, 4))
    >>> seen = {}
    >>> tapped = tap(gm, {"_0": lambda v: seen.setdefault("linear", v.shape)}, "example")
    >>> torch.equal(tapped(torch.ones(2, 4)), gm(torch.ones(2, 4))), seen["linear"]
    (True, torch.Size([2, 3]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch.fx as fx

__all__ = ["tap", "node_for"]


class _Observer:
    """A graph node's target: shows the value to ``fn`` and returns it unchanged."""

    __name__ = "observe"  # fx names the node after its target

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, value: Any) -> Any:
        self.fn(value)
        return value


def node_for(graph: fx.Graph, name: str) -> fx.Node | None:
    """The node called ``name``, or the node calling the module of that qualified name (symbolic tracing)."""
    for node in graph.nodes:
        if node.name == name:
            return node
    for node in graph.nodes:
        if node.op == "call_module" and node.target == name:
            return node
    return None


def tap(gm: fx.GraphModule, observers: Mapping[str, Callable[[Any], Any]], owner: str) -> fx.GraphModule:
    """``gm`` with each node of ``observers`` (a node name, or a called module's qualified name) shown to its
    callback on every forward; parameters and submodules are ``gm``'s own (training the tap trains ``gm``)."""
    graph = copy.deepcopy(gm.graph)  # keeps the capture's input/output handling (pytree codegen)
    for name, fn in observers.items():
        node = node_for(graph, name)
        if node is None or node.op in ("output", "get_attr"):
            known = [n.name for n in graph.nodes if n.op in ("call_function", "call_module", "call_method")]
            raise ValueError(f"{owner}: {name!r} names no computed value of the captured model; give node names "
                             f"of fxcondensa.trace(model, example_inputs).graph (or names of modules it calls), "
                             f"e.g. {known[-6:-1]}")
        # an input is observed after the last input: every placeholder must come first
        where = [n for n in graph.nodes if n.op == "placeholder"][-1] if node.op == "placeholder" else node
        with graph.inserting_after(where):
            graph.call_function(_Observer(fn), (node,))
    graph.lint()
    return fx.GraphModule(gm, graph)

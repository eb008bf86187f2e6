"""Cost model: per-node MACs and parameter counts from shape metadata.

What is counted (one number per node, ``NodeCost.macs``, called MACs throughout):

- **conv** (1d/2d/3d, any ``groups``, module or ``F.conv*``): ``output elements x in_channels/groups x kernel
  elements``, i.e. multiply-accumulates; bias adds are not counted. LeNet-5's conv1 on 1x1x28x28:
  ``20*24*24 * 1*5*5 = 288000``.
- **conv-transpose**: ``input elements x out_channels/groups x kernel elements`` (each input pixel is
  scattered through the kernel).
- **linear** (module or ``F.linear``): ``output elements x in_features``.
- **matmul / mm / bmm / addmm / baddbmm / @**: ``output elements x the contracted dimension``.
- **norm** (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm): one per output element
  (an inference-time norm is one scale-and-shift per element; the statistics of Layer/Group norms are not
  counted separately).
- **pool**: max/avg/LP pooling ``output elements x kernel elements``; adaptive pooling ``input elements``.
- **elementwise** (activations, softmax, add/mul/sub/div, ...): one per output element.
- **shape** ops (view, reshape, flatten, cat, getitem, permute, dropout, identity, ...): zero.
- **reductions** (mean / sum / amax over some dims): one per input element.
- anything else (``kind == "other"``, e.g. an opaque leaf module or ``einsum``): zero; it is listed so that a
  reader sees what was not counted.

Each op's cost lives in its entry of the op registry (``fxcondensa.rules.registry``, built-in entries in
``fxcondensa.rules``), next to its channel rule; a rule registered by a user is counted here too.

Parameters are attributed to the node that uses them first: a ``call_module`` node gets its module's
parameters, a ``call_function`` node the parameters it reads through ``get_attr`` nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import rules
from ..capture.graph import trace
from ..rules import registry
from ..rules.registry import CostCall, CostTerm, Scale, node_shape
from .storage import count_nonzero as _count_nonzero

__all__ = ["NodeCost", "profile_costs", "node_cost", "node_cost_terms", "layer_name"]


@dataclass(frozen=True)
class NodeCost:
    """What one node of a traced graph computes and holds.

    ``layer`` is the module's qualified name for ``call_module`` nodes (what thinning keeps) and the node
    name otherwise; ``nonzero_params`` counts the non-zero values of ``params`` (density after pruning).
    """

    name: str
    layer: str
    op: str
    type: str
    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...] | None
    params: int
    nonzero_params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shapes"] = [list(s) for s in self.input_shapes]
        d["output_shape"] = None if self.output_shape is None else list(self.output_shape)
        return d


def node_cost(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int]:
    """(kind, MACs) of one node, from its registry entry; ("other", 0) for an op without one."""
    kind, terms = node_cost_terms(gm, node)
    return kind, sum(t.macs for t in terms)


def node_cost_terms(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple[CostTerm, ...]]:
    """(kind, MAC terms) of one node: its registry entry's cost, each part with the dims it scales with.

    An entry whose cost is one int scales with the node's output channels and, by its kind, with the
    channels its first input contributes (see ``CostTerm``).

    Example:
        >>> import torch, fxcondensa
        >>> gm = fxcondensa.trace(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3))
        >>> kind, terms = node_cost_terms(gm, list(gm.graph.nodes)[1])
        >>> kind, [(t.macs, [(s.value.name, s.dims) for s in t.scales]) for t in terms]
        ('linear', [(24, [('_0', 'all'), ('input_1', 'all')])])
    """
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    rule = registry.rule_for(node, module)
    if rule is None or rule.cost is None:
        return "other", ()
    call = CostCall(node, module, tuple(node_shape(a) for a in node.all_input_nodes), node_shape(node))
    cost = rule.cost(call)
    if isinstance(cost, (tuple, list)):
        return rule.kind, tuple(cost)
    scales = [Scale(node)]
    first = node.args[0] if node.args else None
    if rule.kind in ("conv", "conv_transpose", "linear"):
        scales.append(Scale(first))
    elif rule.kind == "matmul":
        scales.append(Scale(first, "last"))  # the contracted dim
    return rule.kind, (CostTerm(int(cost), tuple(scales)),)


def layer_name(node: fx.Node) -> str:
    """The name a report shows for a node: a module's qualified name, else the node's name."""
    return str(node.target) if node.op == "call_module" else node.name


def _type_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _graph_module(model: nn.Module, example_inputs: Any, **trace_options: Any) -> fx.GraphModule:
    """A GraphModule with shape metadata: traced from the model when example inputs are given."""
    if example_inputs is not None:
        return trace(model, example_inputs, **trace_options)
    if isinstance(model, fx.GraphModule) and any("tensor_meta" in n.meta for n in model.graph.nodes
                                                 if n.op == "placeholder"):
        return model
    raise ValueError(f"profiling {type(model).__name__} needs shapes: pass example_inputs "
                     "(e.g. torch.randn(1, 3, 224, 224)) or a GraphModule from fxcondensa.trace(model, inputs)")


def profile_costs(model: nn.Module, example_inputs: Any = None, *,
                  leaf_modules: Sequence[type[nn.Module]] = (), concrete_args: dict[str, Any] | None = None,
                  count_nonzero: bool = True) -> list[NodeCost]:
    """MACs and parameters of every computing node (not placeholders, get_attr or output), in graph order.

    ``count_nonzero=False`` skips counting the non-zero parameter values, a pass over every weight, for a
    caller that reads shapes and MACs only; ``nonzero_params`` is then -1.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.costs import profile_costs
        >>> costs = profile_costs(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> [(c.layer, c.macs, c.params) for c in costs if c.kind == "conv"]
        [('conv1', 288000, 520), ('conv2', 1600000, 25050)]
    """
    gm = _graph_module(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    rules.register_optional_rules()
    seen: set[int] = set()  # ids of parameters already attributed (shared modules count once)

    def take(params: Sequence[torch.Tensor]) -> tuple[int, int]:
        total = nonzero = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                # a quantized weight (torchao) counts its stored integers: it has no count_nonzero of its own
                nonzero += _count_nonzero(p) if count_nonzero else 0
        return total, nonzero

    costs: list[NodeCost] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        inputs = [a for a in node.all_input_nodes]
        ins = [node_shape(a) for a in inputs]
        out = node_shape(node)
        kind, macs = node_cost(gm, node)
        if node.op == "call_module":
            params = take(list(gm.get_submodule(node.target).parameters()))
        else:
            attrs = [_fetch(gm, a.target) for a in inputs if a.op == "get_attr"]
            params = take([t for t in attrs if isinstance(t, nn.Parameter)])
        costs.append(NodeCost(
            name=node.name, layer=layer_name(node), op=node.op, type=_type_name(gm, node), kind=kind,
            input_shapes=tuple(s for s in ins if s is not None), output_shape=out,
            params=params[0], nonzero_params=params[1] if count_nonzero else -1, macs=int(macs),
        ))
    return costs


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

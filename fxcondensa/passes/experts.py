"""Whole experts of mixture-of-experts layers: where the routers and their experts are in a captured graph,
and the thinning stage that removes the experts a scheme masked.

A mixture-of-experts layer scores ``E`` experts per token with a linear router (``E`` logits on the last
dim), keeps the top ``k`` (``topk`` of the logits or of their softmax) and sends each token to those experts.
The experts' tensors hold one slice per expert on their first dim (transformers' ``gate_up_proj: (E, 2h, d)``
run as a grouped matmul whose offsets count the tokens per expert, or indexed by expert id), and the
expert count is written into the graph where tokens are counted (``histc(ids, bins=E, max=E - 1)``).

Removing an expert is exact when the compressed model never routes to it: a scheme puts its router logit
at ``-inf`` (``fxcondensa.nn.mask_experts``, inserted after the router), not at zero, which would still be
routed to. The thinned layer then drops the expert's router row and its slice of every expert tensor, and
the expert ids it computes are the kept experts renumbered in order, which sorts, counts and indexes its
tokens as the compressed layer does (a removed expert has no tokens there).

Example (a router ranked by a top-k whose ids index per-expert weights):
    >>> import torch, fxcondensa
    >>> class MoE(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.router, self.w = torch.nn.Linear(8, 4), torch.nn.Parameter(torch.randn(4, 8, 8))
    ...     def forward(self, x):
    ...         p, ids = torch.topk(torch.softmax(self.router(x), -1), 1, dim=-1)
    ...         return torch.bmm(x[:, None], self.w[ids[:, 0]])[:, 0] * p
    >>> [(r.weight, r.num_experts, r.top_k, r.experts) for r in routers(fxcondensa.trace(MoE(), torch.randn(3, 8)))]
    [('router.weight', 4, 1, ['w'])]
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import nn as fxnn
from ..capture.graph import propagate_shapes

__all__ = ["Router", "routers", "mask_router", "thin_experts", "remove_experts"]

aten = torch.ops.aten

_TOPK = {torch.topk, aten.topk, "topk"}
# Ops between a router's logits and its top-k that keep one value per expert, in place on the last dim.
_ROW_WISE = {torch.softmax, torch.nn.functional.softmax, aten.softmax, aten._softmax, "softmax",
             torch.log_softmax, torch.nn.functional.log_softmax, aten.log_softmax, aten._log_softmax, "log_softmax",
             torch.sigmoid, torch.nn.functional.sigmoid, aten.sigmoid, "sigmoid",
             aten.to, aten._to_copy, "to", "float", "type", fxnn.mask_experts}
_LINEAR = {torch.nn.functional.linear, aten.linear}
_HISTC = {torch.histc, aten.histc, "histc"}
_ONE_HOT = {torch.nn.functional.one_hot, aten.one_hot}
_INDEX = {aten.index, operator.getitem}


def _key(node: fx.Node) -> Any:
    t = node.target
    return getattr(t, "overloadpacket", t)


def _is(node: Any, keys: set[Any]) -> bool:
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    try:
        return _key(node) in keys
    except TypeError:  # an unhashable target
        return False


def _grouped_keys() -> set[Any]:
    keys: set[Any] = {aten._grouped_mm, fxnn.grouped_mm_aligned}
    if hasattr(torch.nn.functional, "grouped_mm"):
        keys.add(torch.nn.functional.grouped_mm)
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if op is not None:
        keys.add(op)
    return keys


@dataclass
class Router:
    """One mixture-of-experts layer of a graph: its router's linear node (``logits``), the router's weight
    and bias paths, ``top_k``, the expert tensors (path, expert dim) and the nodes that hold the expert
    count as a literal (``counts``). ``mask`` is the ``mask_experts`` node a scheme inserted, if any."""

    logits: fx.Node
    weight: str
    bias: str | None
    num_experts: int
    top_k: int
    topk: fx.Node
    experts: list[str] = field(default_factory=list)
    counts: list[fx.Node] = field(default_factory=list)
    mask: fx.Node | None = None
    blocked: str = ""  # why its experts cannot be removed ("" where they can)


def _param(gm: fx.GraphModule, node: Any) -> str | None:
    """The parameter path a get_attr node reads, or that a transpose of its last two dims reads."""
    if isinstance(node, fx.Node) and node.op != "get_attr" and (
            (node.op == "call_method" and node.target in ("transpose", "mT", "swapaxes"))
            or _is(node, {torch.transpose, aten.transpose})):
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return node.target if t.is_floating_point() else None


def _router_linear(gm: fx.GraphModule, topk: fx.Node) -> tuple[fx.Node, str, str | None, fx.Node | None] | None:
    """(linear node, weight path, bias path, mask node) of the router whose logits ``topk`` ranks."""
    x, mask = topk.args[0] if topk.args else None, None
    for _ in range(8):
        if not isinstance(x, fx.Node):
            return None
        if x.op == "call_module" and isinstance(gm.get_submodule(x.target), nn.Linear):
            lin = gm.get_submodule(x.target)
            return x, f"{x.target}.weight", (f"{x.target}.bias" if lin.bias is not None else None), mask
        if _is(x, _LINEAR):
            w = _param(gm, x.args[1] if len(x.args) > 1 else x.kwargs.get("weight"))
            b = x.args[2] if len(x.args) > 2 else x.kwargs.get("bias")
            if w is None or gm.get_parameter(w).dim() != 2 or (b is not None and _param(gm, b) is None):
                return None
            return x, w, (_param(gm, b) if b is not None else None), mask
        if not _is(x, _ROW_WISE):
            return None
        if _is(x, {fxnn.mask_experts}):
            mask = x
        x = x.args[0] if x.args else None
    return None


def _topk_of(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """The nearest top-k whose result ``node`` is computed from, walking back along its inputs."""
    seen, queue = {node}, deque([node])
    while queue and len(seen) < limit:
        n = queue.popleft()
        for a in n.all_input_nodes:
            if _is(a, _TOPK):
                return a
            if a not in seen and a.op not in ("placeholder", "get_attr"):
                seen.add(a)
                queue.append(a)
    return None


def _last_dim(node: fx.Node) -> bool:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    shape = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    rank = len(shape.shape) if shape is not None and hasattr(shape, "shape") else None
    return isinstance(dim, int) and (dim == -1 or (rank is not None and dim == rank - 1))


def routers(gm: fx.GraphModule) -> list[Router]:
    """The mixture-of-experts layers of ``gm`` whose router is a linear layer ranked by a top-k, in graph
    order, each with the expert tensors and expert counts found for it."""
    found: dict[fx.Node, Router] = {}
    grouped = _grouped_keys()
    for node in gm.graph.nodes:
        if _is(node, _TOPK) and _last_dim(node):
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            lin = _router_linear(gm, node)
            if isinstance(k, int) and lin is not None:
                logits, weight, bias, mask = lin
                found[node] = Router(logits, weight, bias, int(gm.get_parameter(weight).shape[0]), k, node,
                                     mask=mask)
    if not found:
        return []
    for node in gm.graph.nodes:
        if _is(node, grouped):
            offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
            r = found.get(_topk_of(offs)) if isinstance(offs, fx.Node) else None
            if r is None:
                continue
            w = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in ("mat2", "weight", "mat_b")
                                                              if k in node.kwargs), None)
            path = _param(gm, w)
            if path is None or gm.get_parameter(path).dim() != 3 or gm.get_parameter(path).shape[0] != r.num_experts:
                r.blocked = f"grouped matmul '{node.name}' multiplies by a computed expert weight"
            elif path not in r.experts:
                r.experts.append(path)
        elif _is(node, _INDEX) and len(node.args) > 1:
            # ``bias[expert_ids]``: a tensor with one row per expert, picked by the routed ids
            path = _param(gm, node.args[0]) if isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" \
                else None
            idx = node.args[1]
            idx = idx[0] if isinstance(idx, (list, tuple)) and len(idx) == 1 else idx
            r = found.get(_topk_of(node)) if path is not None and isinstance(idx, fx.Node) else None
            if r is not None and gm.get_parameter(path).shape[0] == r.num_experts and path not in r.experts:
                r.experts.append(path)
        elif _is(node, _HISTC) or _is(node, _ONE_HOT):
            r = found.get(_topk_of(node))
            if r is not None:
                r.counts.append(node)
    return [r for r in found.values() if r.experts]


def _cut(gm: fx.GraphModule, path: str, index: torch.Tensor) -> None:
    """Keep the rows ``index`` of dim 0 of the tensor at ``path``, under every name it has (tied stays tied)."""
    owner, _, attr = path.rpartition(".")
    old = getattr(gm.get_submodule(owner) if owner else gm, attr)
    value = old.detach().index_select(0, index.to(old.device)).contiguous()
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if t is old:
            o, _, a = name.rpartition(".")
            m = gm.get_submodule(o) if o else gm
            if isinstance(new, nn.Parameter):
                setattr(m, a, new)
            else:
                m._buffers[a] = new


def _count(node: fx.Node, dense: int, kept: int) -> None:
    """A literal expert count in ``histc`` (bins, max) or ``one_hot`` (num_classes) rewritten for ``kept``."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if _is(node, _HISTC):  # histc(input, bins, min, max)
        slots = {1: ("bins", dense, kept), 3: ("max", dense - 1, kept - 1)}
    else:  # one_hot(ids, num_classes): E, or E + 1 with a slot for the dropped tokens
        slots = {1: ("num_classes", None, None)}
    for pos, (name, old, new) in slots.items():
        here = args if len(args) > pos else kwargs if name in kwargs else None
        key = pos if here is args else name
        if here is None:
            continue
        value = here[key]
        if old is None and isinstance(value, int) and value in (dense, dense + 1):
            here[key] = value - dense + kept
        elif isinstance(value, (int, float)) and value == old:
            here[key] = type(value)(new)
    node.args, node.kwargs = tuple(args), kwargs


def thin_experts(gm: fx.GraphModule, inputs: tuple[Any, ...] | None = None) -> dict[str, list[int]]:
    """Remove, in place, the experts ``gm``'s ``mask_experts`` nodes put at ``-inf``: the router rows, the
    experts' slices of every expert tensor, the literal expert counts; the mask nodes go. Returns the kept
    experts by router weight path. ``inputs`` given, shapes are propagated again where ``gm`` had them."""
    kept_by: dict[str, list[int]] = {}
    if not any(n.op == "call_function" and n.target is fxnn.mask_experts for n in gm.graph.nodes):
        return kept_by  # no scheme removed experts: nothing to look for
    for r in routers(gm):
        if r.mask is None:
            continue
        removed = set(r.mask.args[1])
        kept = [e for e in range(r.num_experts) if e not in removed]
        index = torch.tensor(kept, dtype=torch.long)
        for path in [r.weight, *([r.bias] if r.bias else []), *r.experts]:
            _cut(gm, path, index)
        for node in r.counts:
            _count(node, r.num_experts, len(kept))
        if r.logits.op == "call_module":
            gm.get_submodule(r.logits.target).out_features = len(kept)
        r.mask.replace_all_uses_with(r.mask.args[0])
        gm.graph.erase_node(r.mask)
        kept_by[r.weight] = kept
    if kept_by:
        gm.graph.lint()
        gm.recompile()
        if inputs is not None and any("tensor_meta" in n.meta for n in gm.graph.nodes):
            propagate_shapes(gm, inputs, fake=True)
    return kept_by


def mask_router(gm: fx.GraphModule, r: Router, removed: tuple[int, ...]) -> None:
    """Put the ``removed`` experts' router logits at -inf: a ``mask_experts`` node right after the router
    (or the one already there, updated). The caller recompiles ``gm``."""
    if r.mask is not None:
        r.mask.args = (r.mask.args[0], removed)
        return
    with gm.graph.inserting_after(r.logits):
        node = gm.graph.call_function(fxnn.mask_experts, (r.logits, removed))
    r.logits.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    for key in ("tensor_meta", "val", "nn_module_stack"):
        if key in r.logits.meta:
            node.meta[key] = r.logits.meta[key]
    r.mask = node


def remove_experts(gm: fx.GraphModule, kept: dict[str, list[int]], inputs: tuple[Any, ...] | None = None) -> None:
    """Remove, in place, all but the ``kept`` experts of each router named (weight path -> kept experts in
    the dense numbering, as ``thin_record(thinned).experts`` holds them): how a recipe is replayed."""
    found = {r.weight: r for r in routers(gm)}
    missing = sorted(set(kept) - set(found))
    if missing:
        raise ValueError(f"the recipe removes experts of routers {missing}, which this model does not have "
                         f"(its routers: {sorted(found) or 'none'})")
    for path, experts in kept.items():
        r = found[path]
        mask_router(gm, r, tuple(e for e in range(r.num_experts) if e not in set(experts)))
    gm.graph.lint()
    gm.recompile()
    thin_experts(gm, inputs)

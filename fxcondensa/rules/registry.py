"""The op registry: one entry per op family says how channels flow through it, how "this channel is exactly
zero" propagates, what it costs, and how a module's size attributes follow its sliced tensors.

Entries are matched by op identity, never by the text of a node's name:

- a module type (``nn.Conv2d``; a subclass uses its nearest registered base class),
- a function object (``torch.cat``, ``F.relu``, ``operator.add``, your own function called in ``forward``),
- a Tensor method, by name or as ``torch.Tensor.view``,
- an ATen overload (``torch.ops.aten.relu.default``) or packet (``torch.ops.aten.relu``, all its overloads):
  what ``torch.export`` produces, so the torch-level and ATen-level forms of an op share one entry.

Every pass reads this one table: the channel analysis (``passes/channels.py`` over ``rules/api.py``), the cost model
(``passes/costs.py``), the thinning pass (module attributes) and, through them, ``compress``, ``report`` and
``StructurePrune(target_flops=...)``. The built-in entries live in ``fxcondensa/rules/``; users add their own
with ``register_rule``.

Example: teach the analysis a custom per-channel scaling module that it would otherwise freeze
    >>> import torch, fxcondensa
    >>> from torch import nn
    >>> class ChannelScale(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.rand(c) + 0.5)
    ...     def forward(self, x):
    ...         return x * self.weight.view(1, -1, 1, 1)
    >>> rule = fxcondensa.register_rule(ChannelScale, channels="elementwise", zeros="preserve",
    ...                                 params={"weight": 0})
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelScale(8), nn.Conv2d(8, 4, 3))
    >>> x = torch.randn(1, 3, 16, 16)
    >>> small = fxcondensa.thin(model, fxcondensa.schemes.StructurePrune(0.5), x,
    ...                         leaf_modules=[ChannelScale])
    >>> small.get_submodule("1").weight.numel() < 8
    True
    >>> fxcondensa.unregister_rule(ChannelScale)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "OpRule",
    "CostCall",
    "CostTerm",
    "Scale",
    "register_rule",
    "refine_rule",
    "unrefine_rule",
    "Refinement",
    "unregister_rule",
    "rule_for",
    "rule_for_key",
    "creates",
    "registered_ops",
    "generation",
    "ZEROS",
    "node_shape",
]

ZEROS = ("preserve", "fill", "custom")


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The output shape shape propagation recorded on a node (None for non-tensors and constants).

    Example:
        >>> import torch, fxcondensa
        >>> gm = fxcondensa.trace(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3))
        >>> [node_shape(n) for n in gm.graph.nodes]
        [(4, 3), (4, 2), (4, 2)]
    """
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass(frozen=True)
class CostCall:
    """What a cost function sees of one call: the node, its module (``call_module`` nodes) and the shapes
    of its tensor inputs (graph order) and output."""

    node: fx.Node
    module: nn.Module | None
    in_shapes: tuple[tuple[int, ...] | None, ...]
    out_shape: tuple[int, ...] | None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """A call argument by position or keyword."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def shape_of(self, value: Any) -> tuple[int, ...] | None:
        return node_shape(value)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape) if self.out_shape is not None else 0

    @property
    def in_numel(self) -> int:
        first = self.in_shapes[0] if self.in_shapes else None
        return math.prod(first) if first is not None else 0


@dataclass(frozen=True)
class Scale:
    """A tensor dim a call's MACs are proportional to: when channels along it go, the MACs shrink with them.

    ``value`` is a graph node (the call itself or one of its inputs) with ``dims`` ``"all"`` (each of its
    tracked dims), ``"last"`` (its last dim only: the dim a matmul contracts) or ``"lead"`` (every tracked dim
    but the last); or the qualified name of a parameter with ``dims`` the int dim of it (the rows of an
    attention's fused in-projection: its heads and their columns).
    """

    value: Any
    dims: str | int = "all"


@dataclass(frozen=True)
class CostTerm:
    """Part of a call's MACs, a product over the ``scales`` dims (and over others that never lose channels).

    A cost function that returns an int gets one term, scaled by its output's channels and, for the kinds
    "conv", "conv_transpose" and "linear", its first input's channels ("matmul": that input's last dim);
    one whose MACs are a sum of products over different dims (attention: the projections, ``q @ k^T`` and
    ``attn @ v``) returns its terms, which is how ``StructurePrune(target_flops=...)`` counts a thinned
    attention without building it.
    """

    macs: int
    scales: tuple[Scale, ...]


ChannelFn = Callable[[Any, fx.Node], None]
CostFn = Callable[[CostCall], "int | tuple[CostTerm, ...]"]


@dataclass(frozen=True)
class OpRule:
    """One registry entry.

    - ``channels``: ``fn(ctx, node)`` that tells the analysis where the node's output channels come from
      (see ``fxcondensa.passes.channels.RuleContext``), or a preset: ``"elementwise"`` (the output carries
      the first tensor input's channels on the same dim; the ``params`` listed are sliced with them) or
      ``"freeze"`` (known, but channels must not be removed through it).
    - ``zeros``: for ``"elementwise"`` ops, ``"preserve"`` (a channel that is zero in stays zero out:
      ``f(0) == 0``), ``"fill"`` (it may become non-zero: sigmoid, exp, a norm), or ``fn(node) -> bool``
      deciding per call (clamp bounds). ``"custom"``: the channel function supplies its own zero rule.
    - ``cost``: ``fn(CostCall) -> MACs`` (an int, or ``CostTerm``s that say which dims each part scales with);
      ``kind`` labels the cost in reports ("conv", "linear", "matmul",
      "norm", "pool", "elementwise", "shape", "other").
    - ``params``: for module entries, parameter or buffer name -> the dim that carries the channels.
    - ``resize``: for module entries, ``fn(module, in_channels)`` that makes size attributes
      (``out_channels``, ``num_features``, ...) agree with the sliced tensors after thinning.
    - ``rewrite``: ``fn(gm, node, view)`` called by ``thin`` on the thinned copy, after its tensors are
      sliced, for ops that must change form to stay exact over fewer channels (a LayerNorm that keeps
      dividing by the original width, an attention with the original softmax scale). ``view`` is a
      ``fxcondensa.passes.channels.KeptView``: the kept indices and original width of any node's channels.
    - ``creates``: the op makes new channels (convs, linears): the analysis visits it even when no
      tracked channel flows in; or ``fn(node) -> bool`` deciding per call (a matmul by a weight is a linear
      layer, one of two activations is not).
    - ``refinements``: special cases other families add to this op (``refine_rule``), consulted first.
    """

    name: str
    channels: ChannelFn | str
    zeros: Callable[[fx.Node], bool] | str = "preserve"
    cost: CostFn | None = None
    kind: str = "other"
    params: Mapping[str, int] = field(default_factory=dict)
    resize: Callable[[nn.Module, int | None], None] | None = None
    rewrite: Callable[[fx.GraphModule, fx.Node, Any], None] | None = None
    creates: bool | Callable[[fx.Node], bool] = False
    refinements: tuple[Refinement, ...] = ()

    def rewrites(self) -> list[Callable[[fx.GraphModule, fx.Node, Any], None]]:
        """The entry's own rewrite, then its refinements' (what ``thin`` calls on a thinned node)."""
        return [f for f in (self.rewrite, *(r.rewrite for r in self.refinements)) if f is not None]


@dataclass(frozen=True)
class Refinement:
    """A special case of an op that another family knows (a reshape that splits attention heads, a ``cat``
    with a class-token parameter, a ``mean`` over the channels): ``channels(ctx, node)`` returns True when it
    recorded the node, False to leave it to the next refinement and then to the entry's own rule.
    ``rewrite`` (optional) is called by ``thin`` after the entry's own rewrite."""

    name: str
    channels: Callable[[Any, fx.Node], bool]
    rewrite: Callable[[fx.GraphModule, fx.Node, Any], None] | None = None


def creates(rule: OpRule | None, node: fx.Node) -> bool:
    """Whether ``rule`` makes new channels at ``node`` (see ``OpRule.creates``)."""
    if rule is None:
        return False
    return bool(rule.creates(node)) if callable(rule.creates) else bool(rule.creates)


_MODULES: dict[type, OpRule] = {}
_GENERATION = [0]  # bumped by every change, so that cached analyses made under older rules are redone
_CALLABLES: dict[Any, OpRule] = {}  # functions, builtins, ATen overloads and packets, by identity
_METHODS: dict[str, OpRule] = {}


def _cost_preset(cost: Any, what: str) -> tuple[CostFn | None, str]:
    if cost == "elementwise":
        return (lambda c: c.out_numel), "elementwise"
    if cost in ("none", None):
        return (lambda c: 0), "shape"
    if callable(cost):
        return cost, "other"
    raise ValueError(f"cost for {what} must be 'elementwise', 'none' or a function of a CostCall returning MACs, "
                     f"got {cost!r}")


def _key_name(op: Any) -> str:
    if isinstance(op, type):
        return op.__name__
    if isinstance(op, str):
        return f".{op}()"
    return getattr(op, "__name__", None) or str(op)


def _key_id(op: Any) -> str:
    """A unique, readable name of a registry key: module-qualified for classes and functions."""
    if isinstance(op, str):
        return f"Tensor.{op}"
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(op)
    qualname = getattr(op, "__qualname__", None) or _key_name(op)
    if "<locals>" in qualname:  # made by a factory (F.max_pool2d comes from boolean_dispatch): use its name
        qualname = _key_name(op)
    return f"{getattr(op, '__module__', None) or ''}.{qualname}"


def _method_name(op: Any) -> str | None:
    """``"view"`` for ``"view"`` and ``torch.Tensor.view``; None for anything that is not a Tensor method."""
    if isinstance(op, str):
        return op
    name = getattr(op, "__name__", None)
    if name and getattr(torch.Tensor, name, None) is op:
        return name
    return None


def _table(op: Any) -> tuple[dict, Any]:
    if isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"register_rule takes nn.Module subclasses, functions, Tensor method names or ATen ops; "
                            f"got the class {op.__name__}, which is not an nn.Module")
        return _MODULES, op
    method = _method_name(op)
    if method is not None:
        return _METHODS, method
    if callable(op) or isinstance(op, torch._ops.OpOverloadPacket):
        return _CALLABLES, op
    raise TypeError(f"register_rule cannot match {op!r} ({type(op).__name__}): pass a module class, a function, "
                    "a Tensor method name such as 'view', or an ATen op such as torch.ops.aten.relu.default")


def register_rule(
    *ops: Any,
    channels: ChannelFn | str = "elementwise",
    zeros: Callable[[fx.Node], bool] | str = "preserve",
    cost: CostFn | str | None = "elementwise",
    kind: str | None = None,
    params: Mapping[str, int] | None = None,
    resize: Callable[[nn.Module, int | None], None] | None = None,
    rewrite: Callable[[fx.GraphModule, fx.Node, Any], None] | None = None,
    creates: bool | Callable[[fx.Node], bool] = False,
    name: str | None = None,
    replace: bool = False,
) -> OpRule:
    """Register one rule for one or more ops (see ``OpRule`` for the fields) and return it.

    A module registered here is analysed wherever it is called, which for a module torch.fx would trace
    through means tracing it as a leaf: pass ``leaf_modules=[YourModule]`` to ``trace`` / ``compress`` /
    ``thin`` / ``report``. Registering an op that already has an entry raises unless ``replace=True``.

    Example:
        >>> import torch, fxcondensa
        >>> def swish_beta(x, beta=1.0):
        ...     return x * torch.sigmoid(beta * x)
        >>> r = fxcondensa.register_rule(swish_beta, channels="elementwise", zeros="preserve")
        >>> r.name, r.kind
        ('swish_beta', 'elementwise')
        >>> fxcondensa.unregister_rule(swish_beta)
    """
    if not ops:
        raise TypeError("register_rule needs at least one op: a module class, function, method name or ATen op")
    what = name or _key_name(ops[0])
    if isinstance(channels, str) and channels not in ("elementwise", "freeze"):
        raise ValueError(f"channels for {what} must be 'elementwise', 'freeze' or a function(ctx, node), got {channels!r}")
    if not (callable(channels) or isinstance(channels, str)):
        raise TypeError(f"channels for {what} must be a string preset or a function(ctx, node), got {channels!r}")
    if not (isinstance(creates, bool) or callable(creates)):
        raise TypeError(f"creates for {what} must be True, False or a function(node) -> bool, got {creates!r}")
    if isinstance(zeros, str) and zeros not in ZEROS:
        raise ValueError(f"zeros for {what} must be one of {ZEROS} or a function(node) -> bool, got {zeros!r}")
    params = dict(params or {})
    for pname, dim in params.items():
        if not isinstance(pname, str) or isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"params for {what} must map parameter names to the int dim that carries the channels, "
                            f"got {pname!r}: {dim!r}")
    if params and not all(isinstance(op, type) for op in ops):
        raise ValueError(f"params for {what} name attributes of a module: register module classes only")
    cost_fn, cost_kind = _cost_preset(cost, what)
    rule = OpRule(name=what, channels=channels, zeros=zeros, cost=cost_fn, kind=kind or cost_kind,
                  params=params, resize=resize, rewrite=rewrite, creates=creates)
    resolved = [_table(op) for op in ops]
    if not replace:
        for table, key in resolved:
            if key in table:
                raise ValueError(f"{_key_name(key)} already has a rule ('{table[key].name}'); pass replace=True to "
                                 "override it, or unregister_rule it first")
    for table, key in resolved:
        table[key] = rule
    _GENERATION[0] += 1
    return rule


def refine_rule(*ops: Any, channels: Callable[[Any, fx.Node], bool], name: str,
                rewrite: Callable[[fx.GraphModule, fx.Node, Any], None] | None = None) -> Refinement:
    """Add a special case to the entries of ``ops`` (each must have one; the whole entry is refined, for every
    op it serves), consulted before the entry's own rule and after the refinements added earlier: the op
    keeps one entry, in its family's module, and the family that knows the special case states it in its
    own module.

    Example:
        >>> import operator
        >>> def scaled_add(ctx, node):  # handles nothing: every add goes on to the add rule
        ...     return False
        >>> r = refine_rule(operator.add, channels=scaled_add, name="scaled add (example)")
        >>> [x.name for x in rule_for_key(operator.add).refinements][-1]
        'scaled add (example)'
        >>> unrefine_rule(r, operator.add)
    """
    refinement = Refinement(name, channels, rewrite)
    resolved = [_table(op) for op in ops]
    for (table, key), op in zip(resolved, ops, strict=True):
        if key not in table:
            raise KeyError(f"{_key_name(op)} has no rule to refine ('{name}'): register its entry first, in its "
                           "family's module")
    for old in {id(table[key]): table[key] for table, key in resolved}.values():
        _swap(old, replace(old, refinements=(*old.refinements, refinement)))
    return refinement


def _swap(old: OpRule, new: OpRule) -> None:
    """Every op of entry ``old`` gets ``new``: an entry shared by several ops stays one entry."""
    for table in (_MODULES, _CALLABLES, _METHODS):
        for key, rule in table.items():
            if rule is old:
                table[key] = new
    _GENERATION[0] += 1


def unrefine_rule(refinement: Refinement, *ops: Any) -> None:
    """Remove ``refinement`` (from ``refine_rule``) from the entries of ``ops``; an entry without it raises
    KeyError naming the op."""
    resolved = [_table(op) for op in ops]
    for (table, key), op in zip(resolved, ops, strict=True):
        if key not in table or refinement not in table[key].refinements:
            raise KeyError(f"{_key_name(op)} has no refinement '{refinement.name}'")
    for old in {id(table[key]): table[key] for table, key in resolved}.values():
        _swap(old, replace(old, refinements=tuple(r for r in old.refinements if r is not refinement)))


def unregister_rule(*ops: Any) -> None:
    """Remove the entries of ``ops`` (an op without an entry raises KeyError naming it)."""
    for op in ops:
        table, key = _table(op)
        if key not in table:
            raise KeyError(f"{_key_name(op)} has no registered rule")
        del table[key]
    _GENERATION[0] += 1


def generation() -> int:
    """A counter that changes whenever an entry is added or removed."""
    return _GENERATION[0]


def rule_for_key(op: Any) -> OpRule | None:
    """The entry for an op as a user names it (module class, function, method name, ATen op), or None."""
    if isinstance(op, type):
        for cls in op.__mro__:
            if cls in _MODULES:
                return _MODULES[cls]
        return None
    method = _method_name(op)
    if method is not None:
        return _METHODS.get(method)
    try:
        found = _CALLABLES.get(op)
    except TypeError:  # unhashable target
        return None
    if found is None and isinstance(op, torch._ops.OpOverload):
        found = _CALLABLES.get(op.overloadpacket)
    return found


def rule_for(node: fx.Node, module: nn.Module | None = None) -> OpRule | None:
    """The entry that matches a graph node (``module`` is the called module of a ``call_module`` node)."""
    if node.op == "call_module":
        return rule_for_key(type(module)) if module is not None else None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_function":
        return rule_for_key(node.target) if not isinstance(node.target, str) else None
    return None


def registered_ops() -> dict[str, list[str]]:
    """Rule name -> the ops it is registered for, for documentation and debugging."""
    out: dict[str, list[str]] = {}
    for table in (_MODULES, _CALLABLES, _METHODS):
        for key, rule in table.items():
            out.setdefault(rule.name, []).append(_key_id(key))
    return out


"""The user's own model, thinned: the thinned graph's tensors and module changes carried into a copy of the
model (or the model itself), so that its class, methods and forward stay.

``own_model`` compares the compressed graph with the thinned one node by node. Every edit must have a
module form (``rules/owners.py``): a literal size inside a module whose attributes follow its tensors, a
norm swapped or folded, a size the user's forward computes from its tensors. A literal the pass rewrote
anywhere else blocks: the user's forward would still compute with the dense size. The result is then
checked against the compressed model by the thinning pass's own check (``passes/thin.py``), running the
user's forward.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .. import nn as fxnn
from ..capture.exported import capture_notes, capture_of
from ..capture.records import work_copy
from ..errors import ThinningCheckError
from ..rules import owners
from ..rules.registry import node_shape
from .analysis import analyze
from .memo import remember
from .precision import WidensCalls
from .thin import _check

__all__ = ["Edit", "blocking_edits", "suspect_edits", "graph_edits", "own_model", "check_own", "install"]


@dataclass(frozen=True)
class Edit:
    """One node the thinning pass changed: where it sits (``owner``, the module path; "" for the model
    itself), what it was and is, and whether the user's forward can follow (``blocking`` says why not)."""

    node: str
    owner: str
    before: str
    after: str
    blocking: str = ""
    form: bool = False  # a norm with a module form (swapped or folded), not a size


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _text(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{target}{_args_text(node.args)}"


def _args_text(args: Any) -> str:
    return "(" + ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in args) + ")"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    return type(a) is type(b) and a == b


def _literals(before: Any, after: Any) -> list[tuple[Any, Any]]:
    """(dense, thinned) pairs of the literal sizes that changed; a computed size that became a literal
    counts as (the node, literal)."""
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)) and len(before) == len(after):
        return [p for a, b in zip(before, after, strict=True) for p in _literals(a, b)]
    if isinstance(before, slice) and isinstance(after, slice):
        return _literals((before.start, before.stop, before.step), (after.start, after.stop, after.step))
    return [] if _same(before, after) else [(before, after)]


def _module_chain(model: nn.Module, path: str) -> list[nn.Module]:
    """The module at ``path`` and its ancestors, innermost first."""
    parts = path.split(".") if path else []
    chain = [model]
    for p in parts:
        nxt = getattr(chain[-1], p, None)
        if not isinstance(nxt, nn.Module):
            break
        chain.append(nxt)
    return chain[::-1]


def graph_edits(model: nn.Module, compressed: fx.GraphModule, thinned: fx.GraphModule) -> list[Edit]:
    """The nodes of ``thinned`` that differ from ``compressed`` (same names), each with its owner module in
    ``model`` and, where the user's forward cannot follow, why."""
    exported = capture_of(compressed) == "export"
    dense = {n.name: n for n in compressed.graph.nodes}
    nodes = {n.name: n for n in thinned.graph.nodes}
    edits = []
    for node in thinned.graph.nodes:
        old = dense.get(node.name)
        if old is None or node.op in ("placeholder", "output", "get_attr"):
            continue
        owner = _owner(old)
        if node.op == "call_module":
            continue  # a swapped module (a width-preserving norm): carried over whole
        if node.target is old.target and _same(node.args, old.args) and _same(node.kwargs, old.kwargs):
            continue
        edit = Edit(node.name, owner, _text(old), _text(node))
        chain = _module_chain(model, owner)
        if node.target in _FORMS:
            blocking = "" if owners._width(chain[0]) is not None else "the norm has no weight to fold into"
            if node.target is fxnn.mean_width and not blocking and not any(
                    isinstance(getattr(chain[0], n, None), float) for n in ("variance_epsilon", "eps")):
                blocking = "a mean over the channels outside a norm"
            if node.target is fxnn.layer_norm_width and owners._layer_norm_dim(chain[0]) is None:
                blocking = f"a layer_norm inside {type(chain[0]).__name__}, which is no LayerNorm"
            edits.append(Edit(edit.node, owner, edit.before, edit.after, blocking, form=True))
            continue
        if _is_even_chunk(old, node):
            continue  # the forward's own chunk cuts the thinned tensor into the same equal parts
        if node.target is not old.target and not _is_split(old, node):
            edits.append(Edit(edit.node, owner, edit.before, edit.after,
                              f"the op is replaced ({edit.before} becomes {edit.after})"))
            continue
        pairs = _literals([*old.args, *old.kwargs.values()], [*node.args, *node.kwargs.values()])
        literal = [(a, b) for a, b in pairs if not isinstance(a, fx.Node)]
        if literal and not exported and not any(owners.has_attributes(m) for m in chain):
            a, b = literal[0]
            edits.append(Edit(edit.node, owner, edit.before, edit.after,
                              f"the literal size {a!r} in {edit.before} (thinned: {b!r})"))
            continue
        computed = _computed_mismatch(pairs, nodes)
        if computed and not any(owners.has_attributes(m) for m in chain):
            edits.append(Edit(edit.node, owner, edit.before, edit.after, computed))
            continue
        edits.append(edit)
    return edits


def _computed_mismatch(pairs: list[tuple[Any, Any]], nodes: dict[str, fx.Node]) -> str:
    """Why a size the forward computes from a tensor's shape (``B, N, C = x.shape``) cannot follow, where
    the pass wrote a literal in its place: the tensor's thinned width is not that literal (BEiT's and CoaT's
    attention reshape their output to the width of their input, which thins otherwise). "" where it
    follows or cannot be told."""
    for a, b in pairs:
        if not isinstance(a, fx.Node) or not isinstance(b, int) or isinstance(b, bool):
            continue
        width = _width_read(nodes.get(a.name))
        if width is not None and width != b:
            return (f"the size {a.name} read from a tensor's shape (thinned: {width}) where the thinned model "
                    f"needs {b}: the forward sizes one tensor by another that thins differently")
    return ""


def _width_read(node: fx.Node | None) -> int | None:
    """The value of ``node`` in the thinned graph where it reads one dim of a tensor's shape (``x.size(k)``,
    ``x.shape[k]``, ``aten.sym_size.int(x, k)``) and that tensor's shape is known, else None."""
    if node is None or not node.args:
        return None
    t, k = None, None
    if len(node.args) == 2 and ((node.op == "call_method" and node.target == "size")
                                or node.target is torch.ops.aten.sym_size.int):
        t, k = node.args
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        q = node.args[0]
        if isinstance(q, fx.Node) and ((q.op == "call_function" and q.target is getattr and q.args[1] == "shape")
                                       or (q.op == "call_method" and q.target == "size" and len(q.args) == 1)):
            t, k = q.args[0], node.args[1]
    # Shapes the pass propagated on the thinned graph only: a torch.export ``val`` may still be the dense one.
    shape = node_shape(t) if isinstance(t, fx.Node) and isinstance(k, int) else None
    if shape is None or not -len(shape) <= k < len(shape) or not isinstance(shape[k], int):
        return None
    return int(shape[k])


_FORMS = (fxnn.layer_norm_width, fxnn.rms_norm_width, fxnn.mean_width)


def _is_even_chunk(old: fx.Node, new: fx.Node) -> bool:
    """A ``chunk(x, n, dim)`` the pass wrote as a split into ``n`` equal sizes (ShuffleNetV2's channel halves):
    the user's forward chunks the thinned tensor into exactly those parts."""
    if "chunk" not in str(getattr(old.target, "__name__", old.target)) or new.target not in (torch.split, "split"):
        return False
    chunks = old.args[1] if len(old.args) > 1 else old.kwargs.get("chunks")
    dim = old.args[2] if len(old.args) > 2 else old.kwargs.get("dim", 0)
    sizes = new.args[1] if len(new.args) > 1 else new.kwargs.get("split_size_or_sections")
    new_dim = new.args[2] if len(new.args) > 2 else new.kwargs.get("dim", 0)
    return (isinstance(chunks, int) and isinstance(sizes, (list, tuple)) and len(sizes) == chunks
            and len(set(sizes)) == 1 and dim == new_dim)


def _is_split(old: fx.Node, new: fx.Node) -> bool:
    """The pass writes a split by sizes as ``torch.split``, whatever form it had (``aten.split``, a method)."""
    return new.target in (torch.split, "split") and "split" in str(getattr(old.target, "__name__", old.target))


def blocking_reason(model: nn.Module, edits: list[Edit]) -> str | None:
    """One line naming the first edit the user's forward cannot follow, or None."""
    for e in edits:
        if e.blocking:
            where = f"module '{e.owner}' ({type(model.get_submodule(e.owner)).__name__})" if e.owner \
                else f"{type(model).__name__}'s own forward"
            return f"{where} needs a graph rewrite at node '{e.node}': {e.blocking}"
    return None


def blocking_edits(edits: list[Edit]) -> list[tuple[str, str]]:
    """``(owner, why)`` of each module holding an edit the user's forward cannot follow, first edit first."""
    out: dict[str, str] = {}
    for e in edits:
        if e.blocking and e.owner not in out:
            out[e.owner] = f"node '{e.node}': {e.blocking}"
    return list(out.items())


def suspect_edits(edits: list[Edit]) -> list[tuple[str, str]]:
    """``(owner, why)`` of each submodule holding a size edit its forward was expected to follow through its
    attributes: where the own class then differs from the compressed model, these run as their graphs."""
    out: dict[str, str] = {}
    for e in edits:
        if not e.blocking and not e.form and e.owner and e.owner not in out:
            out[e.owner] = f"node '{e.node}': its forward computes {e.before} otherwise (thinned: {e.after})"
    return list(out.items())


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def own_model(model: nn.Module, compressed: fx.GraphModule, thinned: fx.GraphModule,
              edits: list[Edit]) -> nn.Module:
    """A copy of ``model`` carrying ``thinned``'s tensors and module changes. Tensors are shared with
    ``thinned``, not copied; tensors the graph does not hold (unused modules) are copied from ``model``."""
    new = _tensors(thinned)
    dense = _tensors(compressed)
    memo: dict[int, Any] = {}
    by_id: dict[int, list[str]] = {}
    for name, t in _tensors(model).items():
        by_id.setdefault(id(t), []).append(name)
    changed: set[str] = set()
    for names in by_id.values():
        found = next((n for n in names if n in new), None)
        if found is None:
            continue
        memo[id(_lookup(model, names[0]))] = new[found]
        if found not in dense or new[found] is not dense[found]:
            changed.update(n.rpartition(".")[0] for n in names)
    with work_copy():  # what was beside the model (a compressed graph) is not the thinned model's
        result = copy.deepcopy(model, memo)
    dense_modules = dict(compressed.named_modules())
    for path, m in thinned.named_modules():
        if not path or path not in dense_modules:
            continue
        if type(m) is not type(dense_modules[path]):  # swapped by the pass (a width-preserving norm, attention)
            _set_module(result, path, m)
            changed.add(path)
        elif path in changed:
            _copy_sizes(m, dense_modules[path], result.get_submodule(path))
    nodes = {n.name: n for n in thinned.graph.nodes}
    for e in edits:
        if e.blocking:
            continue
        node = nodes[e.node]
        if node.target in _CONVS and e.owner:  # a grouped conv of a torch.export capture: its group count
            conv = result.get_submodule(e.owner)
            if isinstance(conv, nn.modules.conv._ConvNd) and len(node.args) > 6 and isinstance(node.args[6], int):
                conv.groups = node.args[6]
        if node.target in _FORMS:
            width = node.args[1] if node.target is not fxnn.mean_width else node.args[3]
            owner = result.get_submodule(e.owner)
            form = owners.module_form(owner, node.target, int(width))
            if form is None:
                raise ValueError(f"no module form for {e.after} in module '{e.owner}'")
            if form is not owner:
                _set_module(result, e.owner, form)
            changed.add(e.owner)
    _follow(result, changed, _shapes(edits, nodes, {n.name: n for n in compressed.graph.nodes}))
    return result


def _shapes(edits: list[Edit], nodes: dict[str, fx.Node], dense: dict[str, fx.Node]
            ) -> dict[str, list[tuple[tuple[Any, ...], tuple[Any, ...]]]]:
    """Module path -> the (dense, thinned) sizes of the reshapes and views the pass rewrote inside it, and the
    (dense, thinned) index tuples of its rewritten slices."""
    out: dict[str, list[tuple[tuple[Any, ...], tuple[Any, ...]]]] = {}
    for e in edits:
        if e.blocking or e.form:
            continue
        old, new = dense[e.node], nodes[e.node]
        name = str(getattr(new.target, "__name__", new.target))
        if "reshape" in name or "view" in name or (new.target is operator.getitem and len(new.args) == 2
                                                    and isinstance(new.args[1], tuple)):
            # A slice's new bounds too (``x[:, :self.num_1x1_c]``): an attribute may hold them.
            out.setdefault(e.owner, []).append((_sizes(old.args[1:]), _sizes(new.args[1:])))
    return out


def _sizes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A reshape's sizes, whether given as one tuple or as separate arguments."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)


_CONVS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)
_SIZES = (int, float, bool, tuple)


def _copy_sizes(thinned: nn.Module, dense: nn.Module, target: nn.Module) -> None:
    """The size attributes the pass set on a module of a torch.fx capture (``groups`` of a depthwise conv,
    ``out_channels``, ...): plain values that changed, copied to the user's module."""
    for key, value in thinned.__dict__.items():
        if isinstance(value, _SIZES) and key in dense.__dict__ and dense.__dict__[key] != value:
            target.__dict__[key] = value


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, module)


def _follow(result: nn.Module, changed: set[str],
            shapes: dict[str, list[tuple[tuple[Any, ...], tuple[Any, ...]]]]) -> None:
    """Size attributes of every module whose tensors changed, then of its ancestors (an attention reads its
    projections' sizes), innermost first."""
    touched = set()
    for path in changed:
        parts = path.split(".") if path else []
        for k in range(len(parts), -1, -1):
            touched.add(".".join(parts[:k]))
    for path in sorted(touched, key=lambda p: -len(p.split(".")) if p else 0):
        try:
            m = result.get_submodule(path)
        except AttributeError:
            continue
        owners.follow_tensors(m, shapes.get(path, ()))
    owners.update_config(result)


def install(model: nn.Module, result: nn.Module) -> None:
    """Move ``result``'s tensors, attributes and swapped modules into ``model`` (same structure), so that
    the user's own object is the thinned model (``thin(..., inplace=True)``)."""
    for path, new in list(result.named_modules()):
        try:
            old = model.get_submodule(path)
        except AttributeError:
            continue
        if type(old) is not type(new):
            _set_module(model, path, new)
            continue
        for key, value in new.__dict__.items():
            if key != "_modules":
                old.__dict__[key] = value


class _OwnCall(WidensCalls):
    """Calls a module's own forward with a graph's placeholder values: the flat leaves of its ``(args, kwargs)``
    for a torch.export capture (``spec``), the positional inputs for a torch.fx one. The re-check in a wider
    dtype runs it widened (``precision.widened_calls``), reading folded norm weights unrounded (``exact``)."""

    __name__ = "call_model"  # torch.fx names the node after its target

    def __init__(self, spec: Any, kwargs: dict[str, Any], exact: dict[int, torch.Tensor]):
        self.spec, self.kwargs, self.exact = spec, kwargs, exact

    def __call__(self, module: nn.Module, *leaves: Any) -> Any:
        if self.spec is None:  # a torch.fx capture: the placeholders are the model's own arguments
            return module(*leaves)
        args, kwargs = pytree.tree_unflatten(list(leaves), self.spec)
        return module(*args, **kwargs, **self.kwargs)


def _call_graph(compressed: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """A graph with ``compressed``'s placeholders that calls ``module``'s own forward on them: what the
    thinning check runs in place of the thinned graph."""
    graph = fx.Graph()
    holders = [graph.placeholder(n.name, default_value=n.args[0]) if n.args else graph.placeholder(n.name)
               for n in compressed.graph.nodes if n.op == "placeholder"]
    root = nn.Module()
    root.model = module
    exact = {id(t): v for t in [*module.parameters(), *module.buffers()]
             if (v := owners.exact_value(t)) is not None}
    spec, extra = None, {}
    if isinstance(compressed.graph._codegen, fx.graph._PyTreeCodeGen):
        # A capture with the cache off (its notes say so) is compared with the model called the same way.
        extra = {"use_cache": False} if any("use_cache=False" in n for n in capture_notes(compressed)) else {}
        spec = compressed._in_spec
    # A function call, not a module call: the module's tensors are read op by op, never copied all at once.
    out = graph.call_function(_OwnCall(spec, extra, exact), (graph.get_attr("model"), *holders))
    graph.output(out)
    return fx.GraphModule(root, graph, class_name=type(module).__name__)


def check_own(compressed: fx.GraphModule, module: nn.Module, keep: torch.Tensor,
              inputs: tuple[Any, ...]) -> str | None:
    """Run ``module``'s own forward against ``compressed`` with the thinning check (``passes/thin.py``):
    None when they agree, else why not."""
    analysis = remember((id(compressed), "analysis"), lambda: analyze(compressed))
    try:
        # Where it differs is not reported (the message stops before it): no node-by-node re-run to find it.
        _check(compressed, _call_graph(compressed, module), analysis, keep[:analysis.num_channels], inputs,
               locate=False)
    except ThinningCheckError as exc:
        first = str(exc).split(", first at")[0].replace("the thinned model", "the model's own forward")
        return first
    except Exception as exc:  # the user's forward refuses the new sizes
        while exc.__cause__ is not None:  # the error the forward raised, not the check's wrappers around it
            exc = exc.__cause__
        return f"the model's own forward fails on the thinned modules: {type(exc).__name__}: " \
               f"{(str(exc).splitlines() or [''])[0][:300]}"
    return None

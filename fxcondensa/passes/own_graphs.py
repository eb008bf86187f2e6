"""Submodules of the user's own model run as their thinned graphs: what ``thin(..., output="auto")`` returns
when a few modules' forwards compute with a dense size that no attribute holds (``B, N, C = x.shape`` then
``reshape(B, N, C)`` in an attention whose heads thin apart from the residual stream; ``torch.split(x, 32)``
with a literal 32).

``carve`` cuts the part of the thinned graph that a module's call made (its nodes, by their
``nn_module_stack``) into a ``GraphModule`` that takes the module's own arguments: the module alone is traced
again with the same leaf modules, its nodes matched one to one, in order, with the whole graph's (same ops,
same targets relative to the module, same literals, the whole graph's inputs of the region found at the same
argument positions as the module's own placeholders), and the thinned nodes copied with their thinned
literals. Where anything fails to match, ``carve`` says why and the module stays as it was (the caller then
returns the graph). Only torch.fx captures: a torch.export graph has no module calls to cut at.

The carved module holds the thinned graph's tensors (shared, not copied) under the module's own attribute
paths, so the model's ``state_dict`` keys stay.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import operator
import re
import typing
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import PH

__all__ = ["carve", "CarveError", "ThinnedForward", "swap_blocking", "swapped_note"]


class CarveError(Exception):
    """Why a module's part of the thinned graph cannot be cut out as that module's own forward."""


_AT = "fxcondensa.swapped_at"
_PROXY = re.compile(r"Proxy\([^)]*\)")


class ThinnedForward(fx.GraphModule):
    """A submodule's thinned forward, in place of that submodule in the user's model. Copies (``deepcopy``)
    keep it; a pickle would carry its generated code, which loading would run: refused, with what to do."""

    def __reduce__(self) -> Any:
        at = self.meta.get(_AT, "?")
        raise TypeError(f"the thinned model's submodule '{at}' runs as its thinned graph (generated code), which "
                        "is not pickled: save the model with fxcondensa.save_thinned(model, path) and load it "
                        "with fxcondensa.load_thinned(path, dense_model), or save its state_dict")


class _SubTracer(fx.Tracer):
    """Traces one module with exactly the leaf modules the whole model's trace had (the modules its
    ``call_module`` nodes call, by identity: a module shared under two names is one leaf), so both traces
    inline the same code."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves


def _in(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any((v[0] if isinstance(v, tuple) else str(v)) == path for v in stack.values())


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Mark(tuple):
    """A container's shape among the flattened arguments (its type and length, or its keys)."""


def _leaves(node: fx.Node) -> list[Any]:
    """The node's arguments flattened, slices too (``x[:, :n]`` holds nodes inside a slice)."""
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, (list, tuple)):
            out.append(_Mark((type(x).__name__, len(x))))
            for e in x:
                walk(e)
        elif isinstance(x, dict):
            out.append(_Mark(("dict", *x)))
            for e in x.values():
                walk(e)
        elif isinstance(x, slice):
            out.append(_Mark(("slice",)))
            walk((x.start, x.stop, x.step))
        else:
            out.append(x)

    walk((node.args, node.kwargs))
    return out


def _signature(module: nn.Module) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The forward's parameter names in order, their defaults, and the arguments typed as a tuple of a fixed
    length (``size: Tuple[int, int]``), traced as a tuple of placeholders."""
    names, defaults, tuples = [], {}, {}
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise CarveError(f"its forward takes {p.kind.description} arguments ({p.name})")
        names.append(p.name)
        if p.default is not p.empty:
            defaults[p.name] = p.default
        elif typing.get_origin(p.annotation) is tuple and ... not in typing.get_args(p.annotation):
            tuples[p.name] = tuple(PH for _ in typing.get_args(p.annotation))
    return names, defaults, tuples


def _choices(defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Which defaults to trace with: all of them first, then with some given (a mask, a rotary embedding the
    caller passes; a flag the model's own forward takes as an input), fewest first. Only one choice can match
    the model's call node for node: a given argument adds its ops, or stands where the other trace has a
    literal."""
    nones = list(defaults)[:_MAX_GIVEN]
    out = []
    for picked in sorted(itertools.product((False, True), repeat=len(nones)), key=sum):
        given = {k for k, g in zip(nones, picked, strict=True) if g}
        out.append({k: v for k, v in defaults.items() if k not in given})
    return out


_MAX_GIVEN = 4


def _sub_trace(module: nn.Module, leaves: set[int], concrete: dict[str, Any]) -> fx.Graph:
    """The module traced alone, with ``concrete`` arguments fixed at those values."""
    before = set(module.__dict__)
    try:
        return _SubTracer(leaves).trace(module, concrete_args=concrete or None)
    except Exception as exc:
        raise CarveError(f"its forward does not trace alone: {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:120]}") from None
    finally:  # the tracer keeps tensor constants on the module it traces: the user's module stays as it was
        for key in set(module.__dict__) - before:
            del module.__dict__[key]


def _guards(graph: fx.Graph) -> tuple[set[fx.Node], set[fx.Node]]:
    """The checks torch.fx adds on arguments traced at a fixed value (``_assert_is_none(mask)``, ``k == 2``
    then ``torch._assert``: they read placeholders only, unlike the model's own asserts), and the
    placeholders that only they read (the fixed arguments)."""
    holders = {n for n in graph.nodes if n.op == "placeholder"}
    checks: set[fx.Node] = set()
    for n in graph.nodes:
        if (n.op == "call_function" and (n.target in _CHECKS or n.target is operator.eq) and n.all_input_nodes
                and all(a in holders or a in checks for a in n.all_input_nodes)):
            checks.add(n)
    checks = {n for n in checks if n.target in _CHECKS or (n.users and set(n.users) <= checks)}
    fixed = {n for n in holders if n.users and set(n.users) <= checks}
    return checks, fixed


_CHECKS = (torch.fx._symbolic_trace._assert_is_none, torch._assert)


def _same_target(whole: fx.Node, sub: fx.Node, user: nn.Module, module: nn.Module) -> bool:
    """Same op on the same thing: a called module or a read tensor is the same object in the user's model
    (the whole trace names it from the model, the module's own trace from the module)."""
    if whole.op != sub.op:
        return False
    if whole.op in ("call_module", "get_attr"):
        try:
            return _fetch(user, whole.target) is _fetch(module, sub.target)
        except AttributeError:  # a tensor constant the tracer lifted: at the root in both traces
            return sub.op == "get_attr" and not _has(module, sub.target)
    return whole.target == sub.target


def _has(root: nn.Module, target: str) -> bool:
    try:
        _fetch(root, target)
    except AttributeError:
        return False
    return True


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, _Mark) or isinstance(b, _Mark):
        return isinstance(a, _Mark) and isinstance(b, _Mark) and tuple(a) == tuple(b)
    if isinstance(a, str) and isinstance(b, str):  # a message naming a traced value (``Proxy(getattr_4)``)
        return _PROXY.sub("Proxy", a) == _PROXY.sub("Proxy", b)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def carve(user: nn.Module, path: str, compressed: fx.GraphModule, thinned: fx.GraphModule) -> fx.GraphModule:
    """The thinned forward of ``user``'s submodule at ``path`` as a ``GraphModule`` taking that module's own
    arguments; raises ``CarveError`` naming what did not match.

    Example:
        >>> import torch, fxcondensa
        >>> m = fxcondensa.models.LeNet5()
        >>> x = torch.randn(1, 1, 28, 28)
        >>> dense = fxcondensa.trace(m, x)
        >>> type(carve(m, "conv1", dense, dense)).__name__  # a leaf: no code of its own to cut
        Traceback (most recent call last):
        ...
        fxcondensa.passes.own_graphs.CarveError: 'conv1' is a leaf of the graph: there is nothing to cut
    """
    targets = {n.target for n in compressed.graph.nodes if n.op == "call_module"}
    if path in targets:
        raise CarveError(f"'{path}' is a leaf of the graph: there is nothing to cut")
    # A tensor of another module read inside this one was handed in as an argument (a block's mask given
    # to its attention): torch.fx reads it where it is used, but it is an input of the module.
    region = [n for n in compressed.graph.nodes if n.op not in ("placeholder", "output") and _in(n, path)
              and not (n.op == "get_attr" and not n.target.startswith(path + ".") and _has(user, n.target))]
    if not region:
        raise CarveError("no node of the graph was made by its forward")
    module = user.get_submodule(path)
    leaves = {id(m) for t in targets if _has(user, t) and isinstance(m := _fetch(user, t), nn.Module)}
    names, defaults, tuples = _signature(module)
    first: CarveError | None = None
    for concrete in _choices(defaults):
        concrete.update(tuples)
        try:
            return _match(user, module, thinned, compressed, path, region, _sub_trace(module, leaves, concrete),
                          names, concrete)
        except CarveError as exc:
            first = first or exc
    assert first is not None
    raise first


def _match(user: nn.Module, module: nn.Module, thinned: fx.GraphModule, compressed: fx.GraphModule, path: str, region: list[fx.Node],
           sub: fx.Graph, names: list[str], concrete: dict[str, Any]) -> fx.GraphModule:
    """The region matched node by node with the module's own trace ``sub``, then built."""
    holders = [n for n in sub.nodes if n.op == "placeholder"]
    if not isinstance(sub._codegen, fx.graph._PyTreeCodeGen) and len(holders) != len(names):
        raise CarveError("its traced forward does not take its own arguments one by one")
    guards, fixed = _guards(sub)
    body = [n for n in sub.nodes if n.op not in ("placeholder", "output") and n not in guards]
    if len(body) != len(region):
        raise CarveError(f"its forward traced alone makes {len(body)} nodes where the model's call made "
                         f"{len(region)} (a branch on an argument, or a module called twice)")
    # Whole-graph node -> the module trace's node, and the region's inputs -> the module's placeholders.
    match: dict[str, fx.Node] = {}
    outside: dict[str, fx.Node] = {}
    names_in = {n.name for n in region}
    for w, s in zip(region, body, strict=True):
        if not _same_target(w, s, user, module):
            raise CarveError(f"node '{w.name}' ({w.op} {w.target}) is {s.op} {s.target} when traced alone")
        wl, sl = _leaves(w), _leaves(s)
        if len(wl) != len(sl):
            raise CarveError(f"node '{w.name}' takes other arguments when traced alone")
        for a, b in zip(wl, sl, strict=True):
            if isinstance(a, fx.Node) != isinstance(b, fx.Node):
                raise CarveError(f"node '{w.name}' takes {a} where the module alone takes {b}")
            if not isinstance(a, fx.Node):
                if not _equal(a, b):
                    raise CarveError(f"node '{w.name}' takes {a!r} where the module alone takes {b!r}")
            elif a.name in names_in:
                if match.get(a.name) is not b:
                    raise CarveError(f"node '{w.name}' reads '{a.name}' where the module alone reads '{b.name}'")
            else:
                if b.op != "placeholder" or b in fixed or outside.setdefault(a.name, b) is not b:
                    raise CarveError(f"node '{w.name}' reads '{a.name}' from outside the module, which is "
                                     f"not one of its arguments")
        match[w.name] = s
    dense = {n.name for n in compressed.graph.nodes}
    return _build(module, thinned, path, sub, names, concrete, guards, match, outside, region, dense)


def _build(user_module: nn.Module, thinned: fx.GraphModule, path: str, sub: fx.Graph, names: list[str], concrete: dict[str, Any],
           guards: set[fx.Node], match: dict[str, fx.Node], outside: dict[str, fx.Node],
           region: list[fx.Node], dense: set[str]) -> fx.GraphModule:
    """The new graph: the module's placeholders (its own argument names), torch.fx's guards on the fixed
    ones, then the thinned graph's nodes of the region with their thinned arguments."""
    prefix = path + "."
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    holders_sub = [n for n in sub.nodes if n.op == "placeholder"]
    if isinstance(sub._codegen, fx.graph._PyTreeCodeGen):  # a tuple argument, taken apart by pytree
        graph._codegen = copy.deepcopy(sub._codegen)
        for h in holders_sub:
            env[h] = graph.node_copy(h)
    else:  # the forward's own names (torch.fx renames a fixed one ``mask_1``): keyword calls still work
        for h, name in zip(holders_sub, names, strict=True):
            env[h] = graph.placeholder(name, default_value=concrete.get(name, inspect.Signature.empty))
    for n in sub.nodes:
        if n in guards:
            env[n] = graph.node_copy(n, lambda a: env[a])
    region_names = {n.name for n in region}
    new: dict[str, fx.Node] = {}
    holders = {name: env[s] for name, s in outside.items()}
    root = nn.Module()
    places: list[tuple[str, str, str]] = []

    def arg(a: fx.Node) -> fx.Node:
        if a.name in new:
            return new[a.name]
        if a.name in holders:
            return holders[a.name]
        raise CarveError(f"the thinned graph's node '{a.name}' feeds the module from outside it")

    for n in thinned.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        # A node the thinning pass added (no dense counterpart) belongs to the module its stack names.
        if n.name not in region_names and (n.name in dense or not _in(n, path)):
            continue
        copied = graph.node_copy(n, arg)
        if n.op in ("get_attr", "call_module"):
            s = match.get(n.name)
            rel = s.target if s is not None else (n.target[len(prefix):] if n.target.startswith(prefix)
                                                  else "_thin_" + n.target.replace(".", "_"))
            copied.target = rel
            places.append((rel, n.target, n.op))
        new[n.name] = copied
    out = next(n for n in sub.nodes if n.op == "output")

    def result(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        w = next((k for k, v in match.items() if v is a), None)
        if w is None or w not in new:
            raise CarveError(f"its result '{a.name}' is no node of the thinned graph")
        return new[w]

    graph.output(fx.node.map_arg(out.args[0], result))
    # Modules first, outermost first: a tensor read inside a called module is that module's own.
    for rel, target, op in sorted(places, key=lambda p: (p[2] != "call_module", p[0].count("."))):
        _place(root, rel, thinned, target, op, user_module)
    gm = ThinnedForward(root, graph, class_name="ThinnedForward")
    for name, m in root.named_modules():  # torch.fx copies every tensor as a persistent buffer
        if m._non_persistent_buffers_set:
            gm.get_submodule(name)._non_persistent_buffers_set |= m._non_persistent_buffers_set
    gm.meta[_AT] = path
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _persistent(module: nn.Module, rel: str) -> bool:
    """Whether ``rel`` is a buffer of the user's ``module`` that its ``state_dict`` holds."""
    owner_path, _, attr = rel.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return False
    return attr in owner._buffers and attr not in owner._non_persistent_buffers_set


def _place(root: nn.Module, rel: str, thinned: fx.GraphModule, target: str, op: str, module: nn.Module) -> None:
    """Put the thinned graph's module or tensor at ``target`` into ``root`` at ``rel``: a buffer stays a
    buffer (it moves with ``.to()`` and is in the ``state_dict``)."""
    owner_path, _, attr = target.rpartition(".")
    owner = thinned.get_submodule(owner_path) if owner_path else thinned
    value = getattr(owner, attr)
    *parts, last = rel.split(".")
    at = root
    for p in parts:
        if not hasattr(at, p):
            at.add_module(p, nn.Module())
        at = getattr(at, p)
    if hasattr(at, last):
        return
    if isinstance(value, nn.Module):
        at.add_module(last, value)
    elif isinstance(value, nn.Parameter):
        at.register_parameter(last, value)
    elif isinstance(value, torch.Tensor):
        # A plain tensor attribute (the user's ``self.temperature``) becomes a buffer left out of the state_dict.
        at.register_buffer(last, value, persistent=_persistent(module, rel))
    else:
        setattr(at, last, value)


def swap_blocking(result: nn.Module, user: nn.Module, compressed: fx.GraphModule, thinned: fx.GraphModule,
                  blocking: list[tuple[str, str]]) -> list[tuple[str, str]] | str:
    """Replace in ``result`` (the user's class, thinned) each module that blocks (``(path, why)`` pairs, the
    owners of the edits its forward cannot follow) by its carved thinned graph, or by the carved graph of
    the nearest ancestor that can be cut. Returns the ``(path, why)`` of the modules swapped, or a line
    saying which could not be cut and why (``result`` is then half swapped: drop it).

    A module no graph holds (``""``: the model's own forward) cannot be swapped."""
    done: list[tuple[str, str]] = []
    for path, why in blocking:
        if any(path == p or path.startswith(p + ".") for p, _ in done):
            continue  # inside a module already swapped
        parts = path.split(".") if path else []
        errors = []
        for k in range(len(parts), 0, -1):
            at = ".".join(parts[:k])
            try:
                gm = carve(user, at, compressed, thinned)
            except CarveError as exc:
                errors.append(f"'{at}': {exc}")
                continue
            _keep_unused(gm, result.get_submodule(at))
            owner, _, attr = at.rpartition(".")
            setattr(result.get_submodule(owner) if owner else result, attr, gm)
            done = [(p, w) for p, w in done if not p.startswith(at + ".")] + [(at, why)]
            break
        else:
            where = f"module '{path}'" if path else "the model's own forward"
            return f"{where} cannot run as its thinned graph ({'; '.join(errors) or 'no module holds it'})"
    return done


def _keep_unused(gm: fx.GraphModule, module: nn.Module) -> None:
    """The module's submodules and tensors its forward does not read, kept beside the graph so that the
    model's ``state_dict`` keys stay the same."""
    gm.training = module.training
    for name, child in module.named_children():
        if name not in gm._modules:
            gm.add_module(name, child)
    for name, p in module._parameters.items():
        if name not in gm._parameters and not hasattr(gm, name):
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers and not hasattr(gm, name):
            gm.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)


def swapped_note(user: nn.Module, swapped: list[tuple[str, str]]) -> str:
    """The record's line for a model that came back with submodules as graphs: how many, and the first with
    why, e.g. ``2 submodules as graphs (first: 'blocks.0.attn' (Attention): ...)``."""
    path, why = swapped[0]
    noun = "submodule as a graph" if len(swapped) == 1 else "submodules as graphs"
    return f"{len(swapped)} {noun} (first: '{path}' ({type(user.get_submodule(path)).__name__}): {why})"

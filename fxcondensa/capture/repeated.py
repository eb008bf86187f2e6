"""Capture a stack of identical blocks (a language model's decoder layers) by tracing two of them.

``torch.export`` runs every op of every block on fake tensors, so its time grows with depth although the
blocks of a decoder are one block repeated. Inside ``repeated_once()``, ``export_capture`` finds such stacks
(a ``ModuleList`` or ``Sequential`` of three or more blocks of one class, with the same parameter and buffer
shapes and the same plain attributes, a layer index aside), captures the model with each stack cut to its
first two blocks, and writes the graph of block 1 again for blocks 2, 3, ... with their own parameters,
each block reading what the one before it produced and sharing the rest (position embeddings, masks).

Block 1 is copied rather than block 0 because its inputs show which values come from the block before; block
0 is compared with it node by node first, and where the two differ in anything but their parameters, or where
code outside the stack reads a block other than the last (the container's owner computing between blocks, as
``x = x + block(x)`` does), the model is captured whole instead.

What a copy cannot show is a block whose code branches on its index past the two traced (``if layer_idx >
3``). So only a caller that checks the graph against the model's own forward asks for this: ``thin`` does, as
it checks the user's class it returns. Where that check fails, ``faithful`` tells a copy that computes
otherwise (the model is then captured again in full) from a class that cannot follow the thinned graph.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxcondensa.capture.exported import example_shapes, export_capture
    >>> from fxcondensa.capture.records import graph_record
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         return x + torch.tanh(self.fc(x))
    >>> class Deep(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = nn.ModuleList(Block() for _ in range(6))
    ...     def forward(self, x):
    ...         for block in self.blocks:
    ...             x = block(x)
    ...         return x
    >>> model, x = Deep(), torch.randn(2, 8)
    >>> with repeated_once(), example_shapes():
    ...     gm = export_capture(model, (x,))
    >>> graph_record(gm).repeated, torch.equal(gm(x), model(x))
    (['blocks: 6 blocks, 2 traced'], True)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .sharing import adopt_tensors, copy_model, shared_tensors

__all__ = ["repeated_once", "enabled", "Stack", "find_stacks", "truncated", "stitch", "faithful"]

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("fxcondensa_repeated_once", default=False)

# Attributes that number a block (a key-value cache's slot): the one way identical blocks may differ.
_INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})
_PLAIN = (int, float, str, bool, type(None), torch.dtype)


@contextlib.contextmanager
def repeated_once() -> Iterator[None]:
    """torch.export captures made inside trace two blocks of each stack of identical blocks (see the module)."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """True inside ``repeated_once()``."""
    return _ENABLED.get()


@dataclass
class Stack:
    """A container of identical blocks: its path in the model, the container, and all its blocks."""

    path: str
    container: nn.Module
    blocks: dict[str, nn.Module]


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _signature(block: nn.Module) -> tuple[Any, ...]:
    """What two blocks must share to be one block repeated: classes, tensor shapes and plain attributes."""
    parts: list[Any] = []
    for name, sub in block.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(sub).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRIBUTES and _plain(v)))
        tensors = tuple((k, tuple(t.shape), t.dtype, t.device.type, isinstance(t, nn.Parameter))
                        for k, t in [*sub._parameters.items(), *sub._buffers.items()] if t is not None)
        parts.append((name, type(sub), attrs, tensors, tuple(sorted(sub._non_persistent_buffers_set))))
    return tuple(parts)


def find_stacks(model: nn.Module) -> list[Stack]:
    """The outermost containers of three or more identical blocks that share no tensor."""
    stacks: list[Stack] = []
    for path, container in model.named_modules():
        if not path or not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 3:
            continue
        if any(path.startswith(s.path + ".") for s in stacks):
            continue  # a stack inside a block of another stack (experts in each decoder layer)
        blocks = dict(container._modules)
        kids = list(blocks.values())
        if list(blocks) != [str(i) for i in range(len(kids))] or any(k is None for k in kids):
            continue
        tensors = [id(t) for k in kids for t in [*k.parameters(), *k.buffers()]]
        if len(set(map(id, kids))) != len(kids) or len(set(tensors)) != len(tensors):
            continue  # blocks that share a module or a tensor (one layer applied many times)
        first = _signature(kids[0])
        if all(type(k) is type(kids[0]) and _signature(k) == first for k in kids[1:]):
            stacks.append(Stack(path, container, blocks))
    return stacks


@contextlib.contextmanager
def truncated(stacks: list[Stack]) -> Iterator[None]:
    """Each stack holds its first two blocks only while inside."""
    try:
        for s in stacks:
            s.container._modules = {k: v for k, v in s.blocks.items() if k in ("0", "1")}
        yield
    finally:
        for s in stacks:
            s.container._modules = s.blocks


# ----------------------------------------------------------------------------------------- stitching

def _in_block(node: fx.Node, prefix: str) -> bool:
    if node.op == "get_attr":
        return str(node.target).startswith(prefix + ".")
    if node.op in ("placeholder", "output"):
        return False
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path == prefix or path.startswith(prefix + "."):
            return True
    return False


class _Mismatch(Exception):
    """Block 0 and block 1 differ; the reason is the message."""


def _template(value: Any, body: dict[fx.Node, int], attrs: dict[fx.Node, str], before: dict[fx.Node, int],
              foreign: set[fx.Node]) -> Any:
    """An argument in terms that do not name its block: ("body", i), ("attr", name), ("chain", i) for node i
    of the block before, ("ext", node) for a value from outside the stack."""
    if isinstance(value, fx.Node):
        if value in body:
            return ("body", body[value])
        if value in attrs:
            return ("attr", attrs[value])
        if value in before:
            return ("chain", before[value])
        if value in foreign:
            raise _Mismatch(f"node '{value.name}' of another block is read")
        return ("ext", value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_template(v, body, attrs, before, foreign) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _template(v, body, attrs, before, foreign)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        raise _Mismatch("a tensor constant in a node's arguments")
    return ("leaf", type(value), value)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both values are tensors of one dtype and one concrete shape (a size only known at run time, as after
    ``torch.where``, is not compared: asking would raise, so the two count as different)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.dtype != vb.dtype:
            return False
        sizes = [*va.shape, *vb.shape]
        return all(type(d) is int for d in sizes) and tuple(va.shape) == tuple(vb.shape)
    return True


def _rename(meta: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A node's metadata for the same op in block ``new`` (module paths renamed; values shared)."""
    out = dict(meta)

    def swap(path: str) -> str:
        return new + path[len(old):] if path == old or path.startswith(old + ".") else path

    stack = meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = {k.replace(old, new, 1) if old in k else k:
                                  ((swap(v[0]), *v[1:]) if isinstance(v, tuple) else v) for k, v in stack.items()}
    out.pop("from_node", None)
    return out


def stitch(graph: fx.Graph, stack: Stack, root: nn.Module) -> str | None:
    """Write blocks 2, 3, ... of ``stack`` into ``graph`` (captured with blocks 0 and 1) as copies of block 1,
    and put their tensors on ``root`` (the module that will own the graph) under their names. Returns None, or
    why the stack cannot be copied (then ``graph`` is unchanged)."""
    p0, p1 = f"{stack.path}.0", f"{stack.path}.1"
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    members = [[n for n in nodes if _in_block(n, p)] for p in (p0, p1)]
    body = [[n for n in m if n.op != "get_attr"] for m in members]
    attrs = [{n: str(n.target)[len(p) + 1:] for n in m if n.op == "get_attr"} for m, p in zip(members, (p0, p1), strict=True)]
    if not body[1]:
        return f"'{p1}' ran no op in the capture"
    if len(body[0]) != len(body[1]) or sorted(attrs[0].values()) != sorted(attrs[1].values()):
        return f"'{p0}' and '{p1}' captured different ops"
    index = [{n: i for i, n in enumerate(b)} for b in body]
    chain_in: dict[int, fx.Node] = {}
    try:
        for a, b in zip(*body, strict=True):
            if a.op != b.op or a.target != b.target or not _same_shape(a, b):
                raise _Mismatch(f"'{a.name}' and '{b.name}' differ")
            ta = _template((a.args, a.kwargs), index[0], attrs[0], {}, set(index[1]) | set(attrs[1]))
            tb = _template((b.args, b.kwargs), index[1], attrs[1], index[0], set(attrs[0]))
            _match(ta, tb, chain_in)
    except _Mismatch as exc:
        return f"'{p0}' and '{p1}' differ: {exc}"
    inside = set(members[0]) | set(members[1])
    last = body[1][-1]
    for node in nodes:
        if node in inside:
            continue
        read = set(node.all_input_nodes)
        if read & set(members[0]):
            return f"node '{node.name}' outside the stack reads block 0"
        if read & set(members[1]) and order[node] < order[last]:
            return f"node '{node.name}' outside the stack reads block 1 before it ends"
    tail = [u for n in body[1] for u in n.users if u not in inside]

    attr_anchor = max(attrs[1], key=order.__getitem__) if attrs[1] else None
    body_anchor = last
    previous = body[1]
    for k in range(2, len(stack.blocks)):
        pk = f"{stack.path}.{k}"
        new_attrs: dict[str, fx.Node] = {}
        for node, rel in sorted(attrs[1].items(), key=lambda kv: order[kv[0]]):
            with graph.inserting_after(attr_anchor):
                made = graph.get_attr(f"{pk}.{rel}")
            made.meta = _rename(node.meta, p1, pk)
            new_attrs[rel] = attr_anchor = made
            _put(root, f"{pk}.{rel}", stack.blocks[str(k)], rel)
        copies: list[fx.Node] = []

        def arg(value: Any, prior: list[fx.Node] = previous, made: list[fx.Node] = copies,
                fresh: dict[str, fx.Node] = new_attrs) -> Any:
            if value in index[1]:
                return made[index[1][value]]
            if value in attrs[1]:
                return fresh[attrs[1][value]]
            if value in index[0]:
                return prior[index[0][value]]
            return value

        for node in body[1]:
            with graph.inserting_after(body_anchor):
                made = graph.create_node(node.op, node.target, fx.map_arg(node.args, arg),
                                         fx.map_arg(node.kwargs, arg), type_expr=node.type)
            made.meta = _rename(node.meta, p1, pk)
            copies.append(made)
            body_anchor = made
        previous = copies
    # What read the last traced block reads the last block now.
    last_of = dict(zip(body[1], previous, strict=True))
    for user in dict.fromkeys(tail):
        user.args = fx.map_arg(user.args, lambda v: last_of.get(v, v))
        user.kwargs = fx.map_arg(user.kwargs, lambda v: last_of.get(v, v))
    return None


def _match(a: Any, b: Any, chain_in: dict[int, fx.Node]) -> None:
    """Block 1's template ``b`` is block 0's ``a`` with the block before as input where ``a`` reads outside."""
    if isinstance(b, tuple) and len(b) == 2 and b[0] == "chain":
        if not (isinstance(a, tuple) and len(a) == 2 and a[0] == "ext"):
            raise _Mismatch("block 1 reads block 0 where block 0 reads no value from before it")
        if chain_in.setdefault(b[1], a[1]) is not a[1]:
            raise _Mismatch("one value of block 0 stands for two inputs of block 0")
        return
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a[:1] == b[:1] and a[:1] in (
            ("body",), ("attr",), ("ext",), ("leaf",)):
        if a[0] == "leaf":
            if a[1] is not b[1] or not _equal(a[2], b[2]):
                raise _Mismatch(f"literal {a[2]!r} against {b[2]!r}")
        elif a[1] is not b[1] and a[1] != b[1]:
            raise _Mismatch("arguments differ")
        return
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for x, y in zip(a, b, strict=True):
            _match(x, y, chain_in)
        return
    if a != b:
        raise _Mismatch(f"{a!r} against {b!r}")


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


def _put(root: nn.Module, target: str, block: nn.Module, rel: str) -> None:
    """Put ``block``'s tensor ``rel`` on ``root`` at ``target``, a parameter as a parameter, a buffer as a
    buffer (persistent or not, as in the block), making plain containers on the way."""
    *owner_path, field = rel.split(".")
    owner = block.get_submodule(".".join(owner_path)) if owner_path else block
    value = getattr(owner, field)
    module = root
    for item in target.split(".")[:-1]:
        nxt = getattr(module, item, None)
        if nxt is None:
            nxt = nn.Module()
            setattr(module, item, nxt)
        module = nxt
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and field in owner._buffers:
        module.register_buffer(field, value, persistent=field not in owner._non_persistent_buffers_set)
    else:
        setattr(module, field, value)


def faithful(gm: fx.GraphModule, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``gm`` computes, bit for bit on these inputs, what ``model``'s own forward computes with ``gm``'s
    tensors (a scheme's masks kept aside are not applied by either): every output of the graph equals the
    model's output of the same name or position (the model may return more, such as a key-value cache the
    capture turned off).

    Example:
        >>> import torch
        >>> from fxcondensa.capture.exported import example_shapes, export_capture
        >>> model, x = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)]), torch.randn(2, 4)
        >>> with repeated_once(), example_shapes():
        ...     gm = export_capture(model, (x,))
        >>> faithful(gm, model, (x,), {})
        True
    """
    with shared_tensors():
        twin = copy_model(model)
    adopt_tensors(twin, gm)
    try:
        with torch.no_grad():
            return _same_outputs(gm(*args, **kwargs), twin.eval()(*args, **kwargs))
    except Exception:
        return False


def _same_outputs(got: Any, want: Any) -> bool:
    if isinstance(got, torch.Tensor):
        return isinstance(want, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)
    if isinstance(got, dict):
        return isinstance(want, dict) and all(k in want and _same_outputs(v, want[k]) for k, v in got.items())
    if isinstance(got, (tuple, list)):
        return (isinstance(want, (tuple, list)) and len(got) <= len(want)
                and all(_same_outputs(a, b) for a, b in zip(got, want[:len(got)], strict=True)))
    return True  # a plain value the capture baked in

"""The input shapes a graph captured by ``torch.export`` accepts, checked on every call.

``export_capture`` makes the batch dim of every input and the sequence dim of token inputs dynamic, so one
capture serves any batch size and sequence length. What stays fixed (a dim the model's code ties to a
size, such as the channels of an image) and what the model's code assumed while it was traced (the sequence
is longer than one token, two inputs have the same length) are the capture's guards. torch.export keeps them
in a submodule that cannot be pickled; here they are plain strings, checked by ``check_input_shapes`` (a
node at the head of the graph), which raises ``InputShapeError`` naming the guard and the shapes given
instead of an obscure size error deep inside the graph (or, worse, a branch taken that the inputs do not
satisfy). The same strings are the record's ``input_constraints``.

Example:
    >>> import torch
    >>> guards = (("args[0].size()[1] == 4", "x.shape[1] == 4"),)
    >>> check_input_shapes(guards, torch.zeros(3, 4))  # any batch, 4 features
    >>> try:
    ...     check_input_shapes(guards, torch.zeros(3, 5))
    ... except InputShapeError as exc:
    ...     print(str(exc)[:62])
    the inputs (3x5) do not satisfy x.shape[1] == 4: the model was
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import InputShapeError

__all__ = ["check_input_shapes", "export_guards", "insert_guard_node", "Guards"]

# (code over ``args``, the placeholder values in graph order; the same text over the input names)
Guards = tuple[tuple[str, str], ...]

_COMPILED: dict[str, Any] = {}


def _namespace() -> dict[str, Any]:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP  # what torch.export's guard code calls

    return {**SYMPY_INTERP, "math": math, "inf": math.inf, "torch": torch, "__builtins__": {}}


def check_input_shapes(guards: Guards, *args: Any) -> None:
    """Raise ``InputShapeError`` at the first guard that ``args`` (a graph's placeholder values) fail."""
    if not guards or torch.jit.is_tracing():  # a TorchScript trace records tensor ops, not Python checks
        return
    namespace = _namespace()
    for code, shown in guards:
        compiled = _COMPILED.get(code)
        if compiled is None:
            compiled = _COMPILED[code] = compile(code, "<input guard>", "eval")
        if not eval(compiled, namespace, {"args": args}):  # noqa: S307 - torch.export's own guard expressions
            shapes = ", ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise InputShapeError(
                f"the inputs ({shapes}) do not satisfy {shown}: the model was captured by torch.export for inputs "
                "where this holds (its code fixes that size or took a branch that depends on it), and the "
                "thinned model keeps the capture. Pass inputs that satisfy it, or thin again with example "
                "inputs of the shape you need.")


def export_guards(ep: Any, gm: fx.GraphModule) -> Guards:
    """The guards of an ``ExportedProgram`` over the placeholders of its module ``gm = ep.module()``: the
    sizes its dims were fixed to, their ranges and equalities, and the conditions its code assumed.

    Raises whatever torch raises where its private guard helpers changed; the caller records that."""
    from torch.export import _unlift

    signature = inspect.signature(gm.forward)
    paths = _unlift._get_input_paths(ep.example_inputs, signature)
    placeholders = gm.graph.find_nodes(op="placeholder")
    code = list(_unlift._get_input_guards_for_graph(placeholders, ep.range_constraints, paths))
    traced = _unlift._force_ep_signature_match(ep._guards_code, paths)
    code += _unlift._force_gm_signature_match(traced, signature)
    # Longest first: L['args'][1] is a prefix of L['args'][10].
    sources = sorted(((f"L{pytree.keystr(p)}", i, p) for i, p in enumerate(paths)), key=lambda s: -len(s[0]))
    guards: list[tuple[str, str]] = []
    for line in dict.fromkeys(code):
        actual, shown = line, line
        for source, i, path in sources:
            actual = actual.replace(source, f"args[{i}]")
            shown = shown.replace(source, _name(path))
        guards.append((actual, shown.replace(".size()[", ".shape[")))
    return tuple(guards)


def _name(path: Any) -> str:
    first = path[0]
    head = getattr(first, "key", getattr(first, "idx", first))
    return f"{head}{pytree.keystr(path[1:])}"


def insert_guard_node(gm: fx.GraphModule, guards: Guards) -> None:
    """Put a ``check_input_shapes`` call right after the placeholders of ``gm`` (nothing when no guards)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    if not guards or not placeholders:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(check_input_shapes, (guards, *placeholders))
    gm.recompile()

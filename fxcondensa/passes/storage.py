"""What a parameter is stored as: its values, their dtype and bytes, for plain and quantized tensors alike.

A weight quantized by torchao is a tensor subclass: it reports the float dtype it computes in
(``weight.dtype == torch.float32``) while it holds int8 values (``qdata``) and a float scale per row. The
report, the cost model and the benches ask what is *stored*, so they read it here rather than from
``tensor.dtype``. A plain tensor is stored as itself; a parameter a ``Quantize`` scheme annotated is stored
in the annotated dtype (the compressed-model file writes it so).

Example:
    >>> import torch
    >>> storage_dtype(torch.zeros(3, dtype=torch.float16)), count_nonzero(torch.tensor([0.0, 2.0]))
    (torch.float16, 1)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .annotate import annotations

__all__ = ["stored_values", "storage_dtype", "stored_bytes", "count_nonzero", "layer_storage"]


def _inner(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a wrapper subclass holds (``__tensor_flatten__``); empty for a plain tensor."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return {}
    names, _ = t.__tensor_flatten__()
    found = {n: getattr(t, n, None) for n in names}
    return {n: v for n, v in found.items() if isinstance(v, torch.Tensor)}


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """The tensor of values a (possibly quantized) tensor stores: ``qdata`` of a torchao tensor, else the
    largest inner tensor of a wrapper subclass, else the tensor itself.

    Example:
        >>> stored_values(torch.ones(2)).dtype
        torch.float32
    """
    inner = _inner(t)
    if not inner:
        return t
    if "qdata" in inner:
        return inner["qdata"]
    return max(inner.values(), key=lambda v: v.numel())


def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of the values ``t`` stores (``torch.int8`` for a torchao int8 weight).

    Example:
        >>> storage_dtype(torch.zeros(2, dtype=torch.bfloat16))
        torch.bfloat16
    """
    return stored_values(t).dtype


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of every tensor ``t`` holds: the int8 values and the scales of a quantized weight.

    Example:
        >>> stored_bytes(torch.zeros(4, 4))
        64
    """
    inner = _inner(t)
    parts = inner.values() if inner else [t]
    return sum(p.numel() * p.element_size() for p in parts)


def count_nonzero(t: torch.Tensor) -> int:
    """Non-zero values ``t`` stores; a quantized weight counts its integer values (a zero stays zero).

    Example:
        >>> count_nonzero(torch.eye(3))
        3
    """
    return int(stored_values(t).count_nonzero())


def _node_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, tensor) of the parameters a computing node uses, as the cost model attributes them:
    a module's own parameters, or those read through ``get_attr`` inputs."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return [(f"{node.target}.{n}" if node.target else n, p) for n, p in module.named_parameters()]
    found = []
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            obj = gm
            for part in str(a.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.Parameter):
                found.append((str(a.target), obj))
    return found


def layer_storage(gm: fx.GraphModule, *, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, str]:
    """Node name -> the storage dtype of the largest parameter it uses (its weight), e.g. ``"int8"``; nodes
    without parameters are left out. The weight stands for the layer: a float bias beside an int8 weight is
    a rounding error of the layer's bytes. ``dtypes`` (parameter name -> storage dtype) adds to the
    graph's own annotations, e.g. those of the graph a compressed model of the user's class keeps beside it.

    Example:
        >>> import fxcondensa
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> layer_storage(gm)["ip1"]
        'float32'
    """
    annotated = {n: a.dtype for n, a in annotations(gm).items() if a.dtype is not None}
    annotated.update(dtypes or {})
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        params = _node_params(gm, node)
        if not params:
            continue
        name, weight = max(params, key=lambda np: np[1].numel())
        dtype = annotated.get(name, storage_dtype(weight))
        out[node.name] = str(dtype).removeprefix("torch.")
    return out

"""The thinning check's big reads without big copies: a linear layer's weight read a block of rows at a time, an
embedding read only at the rows its indices select.

The check reads weights through a function ``read(tensor, index)`` that masks and/or widens them
(``reference.py``, ``precision.py``). Read whole, a masked or widened copy of a language model's embedding or
output head alone is a large share of the model (a float64 copy of a 128k-row bfloat16 embedding is four times
its bytes). Here those reads are cut down:

- ``linear(x, w, b)`` with a large ``w`` is computed ``CHUNK_ELEMENTS`` weight elements at a time (a block of
  output rows, each row's dot product computed as before) and the blocks concatenated;
- ``embedding(w, indices)`` gathers the selected rows first and masks or widens only those: gathering is exact
  in any dtype, so the result is the same.

``precision.widened_calls`` runs eager code (the user's own forward, which no interpreter sees node by node)
through the same reads.

Example:
    >>> import torch
    >>> w, x = torch.randn(6, 3, dtype=torch.bfloat16), torch.randn(2, 3, dtype=torch.bfloat16)
    >>> y = lean_call(torch.nn.functional.linear, (x, w), {}, lambda t, i: widen(t[i], torch.float64),
    ...               lambda v: widen(v, torch.float64))
    >>> y is NotImplemented  # a small weight: read whole, as before
    True
    >>> e = lean_call(torch.nn.functional.embedding, (torch.tensor([[4, 1]]), w), {},
    ...               lambda t, i: widen(t[i], torch.float64), lambda v: v)
    >>> e.dtype, e.shape, bool(torch.equal(e[0, 0], w[4].double()))
    (torch.float64, torch.Size([1, 2, 3]), True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx.node import map_aggregate

__all__ = ["CHUNK_ELEMENTS", "METADATA_OPS", "lean_call", "widen"]

# Weight elements read per block: 1M elements is 8 MiB in float64.
CHUNK_ELEMENTS = 1 << 20

_LINEARS = (torch.ops.aten.linear.default, torch._C._nn.linear)
_EMBEDDINGS = (torch.ops.aten.embedding.default, torch.nn.functional.embedding)
# Tensor methods that read metadata only: widening their tensor would copy a weight to learn its shape.
METADATA_OPS = {"__get__", "__set__", "size", "dim", "ndimension", "numel", "nelement", "stride", "element_size",
             "is_floating_point", "is_complex", "is_contiguous", "data_ptr", "__len__", "get_device",
             "untyped_storage", "storage_offset", "__format__", "__repr__"}

Read = Callable[[torch.Tensor, Any], torch.Tensor]


def lean_call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], read: Read,
              prepare: Callable[[Any], Any]) -> Any:
    """``target(*args, **kwargs)`` for a large linear or an embedding, reading its weight through
    ``read(tensor, index)`` (``index``: a slice of rows or a tensor of row indices) a part at a time; the other
    arguments go through ``prepare``. ``NotImplemented`` for any other call."""
    if target in _LINEARS:
        x, w = (args + (None, None))[:2]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() <= CHUNK_ELEMENTS:
            return NotImplemented
        step = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
        x = prepare(x)
        parts = []
        for start in range(0, w.shape[0], step):
            rows = slice(start, min(start + step, w.shape[0]))
            parts.append(torch.nn.functional.linear(x, read(w, rows), None if b is None else read(b, rows)))
        return torch.cat(parts, dim=-1)
    if target in _EMBEDDINGS:
        if target is torch.nn.functional.embedding:
            indices, w = (args + (None, None))[:2]
        else:
            w, indices = (args + (None, None))[:2]
        if not isinstance(w, torch.Tensor) or not isinstance(indices, torch.Tensor) or w.dim() != 2:
            return NotImplemented
        # Forward values only: padding_idx and the gradient options change nothing here.
        flat = indices.reshape(-1)
        return read(w, flat).reshape(*indices.shape, w.shape[1])
    return NotImplemented


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype != than and torch.finfo(dtype).bits <= torch.finfo(than).bits


def widen(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (nested) with every floating tensor narrower than ``dtype`` cast to it, and every such float
    dtype replaced by ``dtype``."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and _narrower(v.dtype, dtype):
            return v.to(dtype)
        if isinstance(v, torch.dtype) and v.is_floating_point and _narrower(v, dtype):
            return dtype
        return v
    return map_aggregate(value, one)

"""A compact, honest file for a compressed model: storage dtypes, sparse where that is smaller.

``save_compressed`` writes every parameter and persistent buffer (BatchNorm running statistics included) of
a model, each in its storage dtype (``storage_dtypes``: the Quantize annotation, else its own)
and each in whichever of two encodings is smaller:

- ``dense``: the values, flat;
- ``csr``: the tensor viewed as a (rows, cols) matrix (``(shape[0], rest)``; 1-D and 0-D tensors as a single
  row), stored as per-row non-zero counts, column indices and the non-zero values. Counts and indices use
  the smallest dtype that holds ``cols`` (uint8, int16, int32, int64). Per-row *counts* rather than
  cumulative row pointers because a count never exceeds ``cols``, so it fits the same small dtype; the row
  pointers are their cumulative sum.

The file is a ``torch.save`` of plain dicts, lists, strings, ints and tensors, read back with
``torch.load(weights_only=True)`` only: loading never runs pickled code.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import Compose, Prune, Quantize
    >>> w = fxcondensa.compress(fxcondensa.models.LeNet5(), Compose([Prune(0.007), Quantize(fxcondensa.float16)]))
    >>> n = fxcondensa.save_compressed(w, "/tmp/lenet5.fxc", overwrite=True)
    >>> w2 = fxcondensa.load_compressed("/tmp/lenet5.fxc", fxcondensa.models.LeNet5())
    >>> all(torch.equal(a, b) for a, b in zip(w.state_dict().values(), w2.state_dict().values()))
    True
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..capture.records import compressed_graph, set_compressed_graph
from ..errors import FileFormatError
from ..passes.annotate import annotations
from .fileio import load_plain, save_atomic

__all__ = ["save_compressed", "load_compressed", "architecture", "storage_dtypes", "encode_tensor", "decode_tensor",
           "decode_table", "MAGIC", "FORMAT_VERSION"]

MAGIC = "fxcondensa-compressed"
FORMAT_VERSION = 1

# Each tensor is one record of torch.save's zip archive: headers, its name twice and 64-byte alignment,
# about 250 bytes measured with torch 2.x. Counted when choosing an encoding, since csr writes three tensors.
_RECORD_BYTES = 256

_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)

# Dtypes a file may hold: values are the model's own dtypes or a storage dtype; indices are _INDEX_DTYPES.
_VALUE_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
}


def storage_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype each parameter is stored in: its annotated dtype (Quantize) or its own.

    It lives with the writer (``footprint`` reads it from here): the file decides what "stored" means.

    Example:
        >>> import fxcondensa
        >>> from fxcondensa.schemes import Quantize
        >>> storage_dtypes(fxcondensa.compress(fxcondensa.models.LeNet5(), Quantize(fxcondensa.float16)))["ip1.weight"]
        torch.float16
    """
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    gm = compressed_graph(model)  # the model itself, or the annotated graph beside a compressed own-class model
    if gm is not None:
        dtypes.update({n: a.dtype for n, a in annotations(gm).items() if a.dtype is not None})
    return dtypes


def index_dtype(cols: int) -> torch.dtype:
    """The smallest integer dtype holding every value in [0, cols]: indices and per-row counts."""
    for dtype in _INDEX_DTYPES:
        if cols <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a tensor row of {cols} columns is too wide to index")


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    # 1-D tensors (biases, BatchNorm stats) as a single row: one count instead of one per element.
    if len(shape) < 2:
        return 1, (shape[0] if shape else 1)
    return shape[0], int(torch.Size(shape[1:]).numel())


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Encode one tensor in ``dtype`` (default: its own) as the smaller of a dense and a csr entry.

    Example:
        >>> e = encode_tensor(torch.eye(100), torch.float16)
        >>> e["kind"], e["values"].dtype, e["cols"].dtype
        ('csr', torch.float16, torch.uint8)
    """
    values = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype)
    shape = [int(s) for s in values.shape]
    dense = {"kind": "dense", "shape": shape, "values": values.reshape(-1).clone()}
    rows, cols = _matrix_shape(values.shape)
    if values.numel() == 0:
        return dense
    matrix = values.reshape(rows, cols)
    nonzero = matrix != 0  # in the storage dtype: values that round to zero are zeros of the file too
    nnz = int(nonzero.sum())
    idx = index_dtype(cols)
    sparse_bytes = (rows + nnz) * idx.itemsize + nnz * values.element_size() + 2 * _RECORD_BYTES
    if sparse_bytes >= values.numel() * values.element_size():
        return dense
    return {
        "kind": "csr",
        "shape": shape,
        "counts": nonzero.sum(dim=1).to(idx),
        "cols": nonzero.nonzero()[:, 1].to(idx),  # row-major order, as the values below
        "values": matrix[nonzero].clone(),
    }


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _checked_tensor(entry: dict, key: str, dtypes: Any) -> torch.Tensor:
    t = entry.get(key)
    _check(isinstance(t, torch.Tensor) and t.dim() == 1, f"'{key}' must be a 1-D tensor")
    _check(t.dtype in dtypes, f"'{key}' has dtype {t.dtype}")
    return t


def decode_tensor(entry: Any) -> torch.Tensor:
    """Rebuild a tensor (in its storage dtype) from ``encode_tensor``'s entry; ValueError if malformed."""
    _check(isinstance(entry, dict), f"entry is a {type(entry).__name__}, not a dict")
    shape = entry.get("shape")
    _check(isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape),
           f"shape {shape!r} is not a list of non-negative ints")
    numel = int(torch.Size(shape).numel())
    values = _checked_tensor(entry, "values", _VALUE_DTYPES)
    if entry.get("kind") == "dense":
        _check(values.numel() == numel, f"{values.numel()} values for shape {shape}")
        return values.reshape(shape).clone()
    _check(entry.get("kind") == "csr", f"unknown encoding {entry.get('kind')!r}")
    rows, ncols = _matrix_shape(torch.Size(shape))
    counts = _checked_tensor(entry, "counts", _INDEX_DTYPES).long()
    cols = _checked_tensor(entry, "cols", _INDEX_DTYPES).long()
    _check(counts.numel() == rows, f"{counts.numel()} row counts for {rows} rows")
    _check(bool(((counts >= 0) & (counts <= ncols)).all()), "row counts out of range")
    nnz = int(counts.sum())
    _check(cols.numel() == nnz and values.numel() == nnz,
           f"{nnz} non-zeros counted but {cols.numel()} column indices and {values.numel()} values")
    _check(bool(((cols >= 0) & (cols < ncols)).all()), f"column index out of range [0, {ncols})")
    flat = torch.zeros(rows * ncols, dtype=values.dtype)
    flat[torch.repeat_interleave(torch.arange(rows), counts) * ncols + cols] = values
    return flat.reshape(shape)


def _entries(model: nn.Module) -> dict[str, Any]:
    """Every state-dict tensor by name; a tensor shared under a second name is stored once, as an alias."""
    dtypes = storage_dtypes(model)
    first: dict[int, str] = {}
    entries: dict[str, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            entries[name] = {"kind": "alias", "of": first[id(t)]}
            continue
        first[id(t)] = name
        entries[name] = encode_tensor(t, dtypes.get(name, t.dtype) if t.is_floating_point() else t.dtype)
    return entries


def save_compressed(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write ``model``'s parameters and buffers to ``path`` compactly; returns the bytes written.

    The write is atomic (a temporary file in the same folder, then ``os.replace``), so ``path`` never holds
    half a file. An existing ``path`` is replaced only with ``overwrite=True``.

    Example:
        >>> import fxcondensa
        >>> from fxcondensa.schemes import Prune
        >>> w = fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.01))
        >>> dense_bytes = fxcondensa.footprint(fxcondensa.models.LeNet5())
        >>> fxcondensa.save_compressed(w, "/tmp/w.fxc", overwrite=True) < dense_bytes / 20
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    payload = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "tensors": _entries(model),
    }
    return save_atomic(payload, path, overwrite=overwrite)


def _read(path: str) -> dict[str, Any]:
    """The file's payload, checked to be ours; FileFormatError (naming ``path``) for anything else."""
    payload = load_plain(path, "compressed-model", MAGIC, FORMAT_VERSION, "fxcondensa.save_compressed")
    if not isinstance(payload.get("tensors"), dict):
        raise FileFormatError(f"{path}: 'tensors' is missing or not a dict")
    return payload


def decode_table(path: str, table: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a file's table by name (aliases resolved); FileFormatError naming ``path`` and the
    tensor for a malformed entry. Shared by both loaders."""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        if isinstance(entry, dict) and entry.get("kind") == "alias":
            continue
        try:
            tensors[name] = decode_tensor(entry)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise FileFormatError(f"{path}: tensor '{name}' is malformed: {exc}") from exc
    for name, entry in table.items():
        if name not in tensors:
            if entry.get("of") not in tensors:
                raise FileFormatError(f"{path}: tensor '{name}' aliases missing tensor {entry.get('of')!r}")
            tensors[name] = tensors[entry["of"]]
    return tensors


def _match(path: str, payload: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The file must hold exactly the model's state-dict keys with the same shapes; name the first misfit."""
    expected = model.state_dict()
    misfit = (f"{path}: the file does not fit {type(model).__name__} (saved from a "
              f"{payload.get('model_class')!r})")
    for key, t in expected.items():
        if key not in tensors:
            raise FileFormatError(f"{misfit}: key '{key}' of the model is missing from the file")
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise FileFormatError(f"{misfit}: '{key}' has shape {tuple(tensors[key].shape)} in the file, "
                                  f"{tuple(t.shape)} in the model")
    for key in tensors:
        if key not in expected:
            raise FileFormatError(f"{misfit}: key '{key}' of the file is not in the model")


def architecture(model_or_factory: Any) -> nn.Module:
    """The model a loader fills: ``model_or_factory`` itself, or what calling it returns (both loaders)."""
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory
    if callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    raise TypeError("model_or_factory must be the torch.nn.Module the file was saved from (any weights: they "
                    "are replaced), or a callable that builds it, got " + type(model_or_factory).__name__)


def load_compressed(path: str | os.PathLike, model_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """A new copy of the model holding the parameters and buffers saved in ``path``.

    ``model_or_factory`` is the model the file was saved from (any weights: they are replaced), or a
    callable returning it; it is not modified. Values come back in the model's own dtypes, on its device.
    A file that is missing, truncated, of another format, crafted, or of another architecture is refused
    before any model is built. (No tracing options: the file holds a state dict, loaded without tracing.)

    Example:
        >>> import fxcondensa
        >>> m = fxcondensa.models.LeNet5()
        >>> _ = fxcondensa.save_compressed(m, "/tmp/m.fxc", overwrite=True)
        >>> type(fxcondensa.load_compressed("/tmp/m.fxc", fxcondensa.models.LeNet5)).__name__
        'LeNet5'
    """
    path = os.fspath(path)
    payload = _read(path)  # before building anything: a bad file costs no model
    tensors = decode_table(path, payload["tensors"])
    model = architecture(model_or_factory)
    _match(path, payload, tensors, model)
    graph = compressed_graph(model)
    if graph is not None and graph is not model:
        # A compressed model of the user's class: copied with the annotated graph beside it, in one deepcopy
        # so that the two copies share their tensors as the originals do.
        loaded, loaded_graph = copy.deepcopy((model, graph))
        set_compressed_graph(loaded, loaded_graph)
    else:
        loaded = copy.deepcopy(model)
    with torch.no_grad():
        loaded.load_state_dict(tensors, strict=True)  # copy_ converts each value to the model's dtype and device
    return loaded

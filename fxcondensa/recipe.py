"""Save a thinned model as tensors plus its thinning recipe; load it by re-thinning the architecture.

A thinned ``GraphModule`` is a new architecture: pickling it would pickle code. Instead ``save_thinned``
writes plain data, read back with ``torch.load(weights_only=True)`` only, so loading never runs code from
the file:

- the **recipe**: which channels stayed (``thinned.meta["fxcondensa"]["keep"]``, one bool per channel id
  of the channel analysis, deterministic for an architecture and its input shapes), the example input
  shapes and dtypes the model was thinned on, and the scheme's ``repr`` when ``thin`` recorded it;
- every parameter and buffer, encoded as ``save_compressed`` does (dense or CSR, whichever is smaller);
- a **signature** to check the rebuilt model against: the graph's node names and ops, and the model's
  outputs on seeded inputs of the recorded shapes.

``load_thinned(path, model_or_factory)`` traces the dense architecture, re-applies the recipe
(``passes.thin.rethin``: slices every tensor of each group, updates module attributes, rewrites
view/reshape/split sizes), loads the saved values and checks the signature. A file that is truncated,
foreign, crafted, or whose recipe does not fit the architecture raises ``FileFormatError`` naming the path
and the problem; no model is returned.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> x = torch.randn(1, 1, 28, 28)
    >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), x)
    >>> _ = fxcondensa.save_thinned(small, "/tmp/lenet5.thin", overwrite=True)
    >>> again = fxcondensa.load_thinned("/tmp/lenet5.thin", fxcondensa.models.LeNet5)
    >>> torch.equal(again(x), small(x))
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import FileFormatError, TraceError
from .fileio import load_plain, save_atomic
from .graph import flatten_outputs
from .passes.annotate import META
from .serialize import decode_tensor, encode_tensor

__all__ = ["save_thinned", "load_thinned", "MAGIC", "FORMAT_VERSION"]

MAGIC = "fxcondensa-thinned"
FORMAT_VERSION = 1

# Reference outputs: this many leading values of each output tensor are stored and compared on load.
_REF_VALUES = 4096
# Loose enough for another BLAS or CPU, tight enough to catch a channel in the wrong place.
_REF_RTOL, _REF_ATOL = 1e-3, 1e-4
_SEED = 0

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}
_PLAIN = (str, int, float, bool, type(None))


# -- helpers shared by save and load ----------------------------------------------------------------------
def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by every name it has (tied tensors and non-persistent buffers included)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _signature(gm: fx.GraphModule) -> list[list[str]]:
    return [[n.name, n.op] for n in gm.graph.nodes]


def _reference_inputs(specs: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the recorded shapes: normal floats, zero integers (valid indices for embeddings)."""
    g = torch.Generator().manual_seed(_SEED)
    out = []
    for s in specs:
        dtype = _DTYPES[s["dtype"]]
        if dtype.is_floating_point:
            out.append(torch.randn(s["shape"], generator=g, dtype=torch.float32).to(dtype))
        else:
            out.append(torch.zeros(s["shape"], dtype=dtype))
    return tuple(out)


def _run_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """The model's outputs (eval mode, no grad) as shapes plus leading values; training flags restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outs = flatten_outputs(model(*inputs))
    finally:
        for m, mode in modes:
            m.training = mode
    return [{"shape": [int(s) for s in t.shape], "head": t.detach().cpu().reshape(-1)[:_REF_VALUES].clone()}
            for t in outs]


def _plain(obj: Any) -> Any:
    """``obj`` restricted to what ``weights_only`` loads: plain containers, scalars and CPU tensors."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if isinstance(k, (str, int))}
    return repr(obj)


# -- save -------------------------------------------------------------------------------------------------
def save_thinned(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write a model returned by ``fxcondensa.thin`` to ``path`` as tensors plus its recipe; returns bytes.

    The write is atomic (temporary file in the same folder, then ``os.replace``); an existing ``path`` is
    replaced only with ``overwrite=True`` (else ``FileExistsError``). The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    meta = getattr(model, "meta", {}).get(META, {}) if isinstance(model, fx.GraphModule) else {}
    keep = meta.get("keep")
    shapes, dtypes = meta.get("input_shapes"), meta.get("input_dtypes")
    if not isinstance(keep, torch.Tensor) or shapes is None or dtypes is None:
        raise ValueError(f"{type(model).__name__} carries no thinning recipe (meta['{META}']['keep'] and input "
                         "shapes): save_thinned takes the GraphModule returned by fxcondensa.thin; save other "
                         "models with fxcondensa.save_compressed")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    specs = [{"shape": [int(s) for s in shape], "dtype": str(d)} for shape, d in zip(shapes, dtypes, strict=True)]
    first: dict[int, str] = {}
    tensors: dict[str, Any] = {}
    for name, t in _named_tensors(model):
        if id(t) in first:
            tensors[name] = {"kind": "alias", "of": first[id(t)]}
        else:
            first[id(t)] = name
            tensors[name] = encode_tensor(t)
    extra = {k: v for k, v in meta.items() if k not in ("keep", "input_shapes", "input_dtypes")}
    payload = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "scheme": meta.get("scheme") if isinstance(meta.get("scheme"), str) else None,
        "keep": keep.detach().cpu().to(torch.bool).clone(),
        "inputs": specs,
        "graph": _signature(model),
        "training": {name: bool(m.training) for name, m in model.named_modules()},
        "tensors": tensors,
        "reference": _run_reference(model, _reference_inputs(specs)),
        "meta": _plain(extra),
    }
    return save_atomic(payload, path, overwrite=overwrite)


# -- load -------------------------------------------------------------------------------------------------
def _fail(path: str, what: str) -> FileFormatError:
    return FileFormatError(f"{path}: {what}")


def _read(path: str) -> dict[str, Any]:
    """The payload, checked field by field; FileFormatError naming ``path`` for anything else."""
    payload = load_plain(path, "thinned-model", MAGIC, FORMAT_VERSION, "fxcondensa.save_thinned")
    keep = payload.get("keep")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1:
        raise _fail(path, "the recipe's 'keep' is not a 1-D bool tensor")
    specs = payload.get("inputs")
    if not isinstance(specs, list) or not specs or not all(
            isinstance(s, dict) and s.get("dtype") in _DTYPES and isinstance(s.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in s["shape"]) for s in specs):
        raise _fail(path, "the recipe's example input shapes are malformed")
    graph = payload.get("graph")
    if not isinstance(graph, list) or not all(isinstance(g, list) and len(g) == 2 and all(isinstance(x, str) for x in g)
                                              for g in graph):
        raise _fail(path, "the graph signature is malformed")
    for key, kind in (("tensors", dict), ("training", dict), ("reference", list), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise _fail(path, f"'{key}' is missing or not a {kind.__name__}")
    return payload


def _decode(path: str, table: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        if isinstance(entry, dict) and entry.get("kind") == "alias":
            continue
        try:
            tensors[name] = decode_tensor(entry)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise _fail(path, f"tensor '{name}' is malformed: {exc}") from exc
    for name, entry in table.items():
        if name not in tensors:
            if entry.get("of") not in tensors:
                raise _fail(path, f"tensor '{name}' aliases missing tensor {entry.get('of')!r}")
            tensors[name] = tensors[entry["of"]]
    return tensors


def _architecture(model_or_factory: Any) -> nn.Module:
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory
    if callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    raise TypeError("model_or_factory must be the dense torch.nn.Module the file was thinned from, or a "
                    f"callable that builds it, got {type(model_or_factory).__name__}")


def _load_values(path: str, gm: fx.GraphModule, tensors: dict[str, torch.Tensor], misfit: str) -> None:
    named = _named_tensors(gm)
    names = {n for n, _ in named}
    for name in tensors:
        if name not in names:
            raise _fail(path, f"{misfit}: tensor '{name}' of the file is not in the rebuilt model")
    with torch.no_grad():
        for name, t in named:
            if name not in tensors:
                raise _fail(path, f"{misfit}: tensor '{name}' of the rebuilt model is missing from the file")
            value = tensors[name]
            if tuple(value.shape) != tuple(t.shape):
                raise _fail(path, f"{misfit}: '{name}' has shape {tuple(value.shape)} in the file, "
                                  f"{tuple(t.shape)} in the rebuilt model")
            t.copy_(value)


def _check_reference(path: str, gm: fx.GraphModule, specs: list[dict[str, Any]], reference: list[Any],
                     misfit: str) -> None:
    got = _run_reference(gm, _reference_inputs(specs))
    if len(got) != len(reference):
        raise _fail(path, f"{misfit}: the rebuilt model returns {len(got)} tensors, the saved one {len(reference)}")
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        if not isinstance(r, dict) or not isinstance(r.get("head"), torch.Tensor):
            raise _fail(path, f"reference output {i} is malformed")
        a, b = g["head"], r["head"]
        if g["shape"] != r.get("shape") or a.shape != b.shape:
            raise _fail(path, f"{misfit}: output {i} has shape {g['shape']}, the saved model's {r.get('shape')}")
        same = (torch.allclose(a, b.to(a.dtype), rtol=_REF_RTOL, atol=_REF_ATOL, equal_nan=True)
                if a.is_floating_point() or a.is_complex() else torch.equal(a, b.to(a.dtype)))
        if not same:
            raise _fail(path, f"{misfit}: output {i} of the rebuilt model differs from the saved model's")


def load_thinned(path: str | os.PathLike, model_or_factory: nn.Module | Callable[[], nn.Module], *,
                 leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """Rebuild the thinned model saved in ``path`` from its dense architecture.

    ``model_or_factory`` is the dense model the file was thinned from (any weights: they are replaced), or
    a callable returning it; it is not modified. Pass the ``leaf_modules`` given to ``thin``. The result
    equals the saved model: same parameters, buffers, training flags and outputs.
    """
    path = os.fspath(path)
    payload = _read(path)  # before building anything: a bad file costs no model
    tensors = _decode(path, payload["tensors"])
    arch = _architecture(model_or_factory)
    specs = payload["inputs"]
    inputs = _reference_inputs(specs)
    misfit = f"the recipe does not fit {type(arch).__name__} (saved from a {payload.get('model_class')!r})"
    from .passes.thin import rethin  # thin imports the schemes; keep importing this module light

    try:
        gm = rethin(arch, payload["keep"], inputs, leaf_modules=tuple(leaf_modules))
    except TraceError:
        raise  # the architecture itself cannot be traced: not the file's fault
    except Exception as exc:  # a recipe of another model fails anywhere inside the slicing: name it
        first = (str(exc).splitlines() or [""])[0]
        raise _fail(path, f"{misfit}: {type(exc).__name__}: {first}") from exc
    signature = _signature(gm)
    if signature != payload["graph"]:
        where = next((i for i, (a, b) in enumerate(zip(signature, payload["graph"], strict=False)) if a != b),
                     min(len(signature), len(payload["graph"])))
        ours = signature[where] if where < len(signature) else None
        theirs = payload["graph"][where] if where < len(payload["graph"]) else None
        raise _fail(path, f"{misfit}: its graph differs at node {where} ({ours} here, {theirs} in the file); "
                          "pass the leaf_modules given to thin")
    _load_values(path, gm, tensors, misfit)
    _check_reference(path, gm, specs, payload["reference"], misfit)
    for name, m in gm.named_modules():
        m.training = bool(payload["training"].get(name, m.training))
    scheme = {"scheme": payload["scheme"]} if isinstance(payload.get("scheme"), str) else {}
    gm.meta[META] = {
        **payload["meta"],
        **scheme,
        "keep": payload["keep"].clone(),
        "input_shapes": [list(s["shape"]) for s in specs],
        "input_dtypes": [s["dtype"] for s in specs],
    }
    return gm

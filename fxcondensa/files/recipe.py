"""Save a thinned model as tensors plus its thinning recipe; load it by re-thinning the architecture.

A thinned ``GraphModule`` is a new architecture: pickling it would pickle code. Instead ``save_thinned``
writes plain data, read back with ``torch.load(weights_only=True)`` only, so loading never runs code from
the file:

- the **recipe**: which channels stayed (``thin_record(thinned).keep``, one bool per channel id of the
  channel analysis, deterministic for an architecture and its input shapes), the example input shapes and
  dtypes the model was thinned on, and the rest of the ``ThinRecord`` (groups, frozen groups and reasons,
  the FLOP target, how the graph was captured) as plain data;
- every parameter and buffer, encoded as ``save_compressed`` does (dense or CSR, whichever is smaller);
- a **signature** to check the rebuilt model against: the graph's node names and ops, and the model's
  outputs on seeded inputs of the recorded shapes, computed on the model's device with TF32 off.

``load_thinned(path, model_or_factory)`` traces the dense architecture on its device, re-applies the recipe
(``passes.thin.rethin``: slices every tensor of each group, updates module attributes, rewrites
view/reshape/split sizes), loads the saved values and checks the signature (a looser tolerance when a CUDA
device computed either side). A file that is truncated, foreign, crafted, or whose recipe does not fit the
architecture raises ``FileFormatError`` naming the path and the problem; no model is returned.

Format versions: 2 (this one) and 1 (written before the typed records; its ``scheme`` field, always None,
is ignored) load; any other version is refused with a message naming both.

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

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.exported import example_shapes
from ..capture.graph import flatten_outputs
from ..capture.modes import eval_mode
from ..capture.records import (
    META,
    FrozenGroup,
    GroupRecord,
    TargetRecord,
    ThinRecord,
    set_thin_record,
    thin_record,
)
from ..errors import FileFormatError, TraceError
from ..passes.own import blocking_edits, graph_edits, own_model
from ..passes.own_graphs import swap_blocking
from ..passes.thin import rethin_pair
from .fileio import load_plain, no_tf32, save_atomic
from .serialize import architecture, decode_table, encode_tensor

__all__ = ["save_thinned", "load_thinned", "thinning_record", "reference_tolerance", "MAGIC", "FORMAT_VERSION",
           "READABLE_VERSIONS"]

MAGIC = "fxcondensa-thinned"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Reference outputs: this many leading values of each output tensor are stored and compared on load.
_REF_VALUES = 4096
# Loose enough for another BLAS or CPU, tight enough to catch a channel in the wrong place (that moves
# outputs by their own magnitude). A CUDA device on either side sums in other orders with other kernels.
_REF_RTOL, _REF_ATOL = 1e-3, 1e-4
_REF_CUDA_RTOL, _REF_CUDA_ATOL = 5e-3, 5e-4
_SEED = 0

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


# -- helpers shared by save and load ----------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter or buffer (the CPU when it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by every name it has (tied tensors and non-persistent buffers included)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _signature(gm: nn.Module) -> list[list[str]]:
    """The graph's nodes (a model of the user's own class has none: its class and tensors say what it is)."""
    return [[n.name, n.op] for n in gm.graph.nodes] if isinstance(gm, fx.GraphModule) else []


def _reference_inputs(specs: Sequence[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the recorded shapes on ``device``: normal floats, zero integers (valid indices for
    embeddings). Drawn on the CPU, so that every device sees the same values."""
    g = torch.Generator().manual_seed(_SEED)
    out = []
    for s in specs:
        dtype = _DTYPES[s["dtype"]]
        if dtype.is_floating_point:
            t = torch.randn(s["shape"], generator=g, dtype=torch.float32).to(dtype)
        else:
            t = torch.zeros(s["shape"], dtype=dtype)
        out.append(t.to(device))
    return tuple(out)


def _run_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                   names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The model's outputs (eval mode, no grad, no TF32) as shapes plus leading values on the CPU; training
    flags restored. A model of the user's own class takes its inputs by ``names``."""
    with eval_mode(model), torch.no_grad(), no_tf32():
        outs = flatten_outputs(model(**dict(zip(names, inputs, strict=True))) if names else model(*inputs))
    return [{"shape": [int(s) for s in t.shape], "head": t.detach().reshape(-1)[:_REF_VALUES].cpu().clone()}
            for t in outs]


# -- the record as plain data -----------------------------------------------------------------------------
def _record_to_plain(rec: ThinRecord) -> dict[str, Any]:
    """What of the record is not the recipe itself, as plain data that ``weights_only`` loads."""
    return {
        "groups": [{"group": g.group, "producers": list(g.producers), "channels": int(g.channels),
                    "kept": int(g.kept), "frozen": g.frozen} for g in rec.groups],
        "frozen": [{"group": f.group, "layers": list(f.layers), "reason": f.reason} for f in rec.frozen],
        "target": None if rec.target is None else {"kind": rec.target.kind, "target": float(rec.target.target),
                                                   "reached": float(rec.target.reached),
                                                   "density": float(rec.target.density)},
        "rule_failures": int(rec.rule_failures),
        "capture": str(rec.capture),
        "returns": str(rec.returns),
        "reason": str(rec.reason),  # for the user's class: which submodules run as their thinned graphs
        "input_names": [str(n) for n in rec.input_names],
        "experts": {str(k): [int(e) for e in v] for k, v in rec.experts.items()},
    }


def _record_from_plain(d: dict[str, Any], keep: torch.Tensor, shapes: list[list[int]],
                       dtypes: list[str]) -> ThinRecord:
    """A ``ThinRecord`` from plain data: a file's (version 2 ``record``, version 1 ``meta``) or the dict
    ``thin`` wrote before the typed records. ValueError / TypeError / KeyError when malformed."""
    groups = [GroupRecord(group=str(g["group"]), producers=tuple(str(p) for p in g.get("producers", ())),
                          channels=int(g["channels"]), kept=int(g["kept"]), frozen=str(g.get("frozen", "")))
              for g in d.get("groups", [])]
    frozen = [FrozenGroup(group=str(f["group"]), layers=tuple(str(x) for x in f.get("layers", ())),
                          reason=str(f["reason"])) for f in d.get("frozen", [])]
    target = None
    t = d.get("target")
    if isinstance(t, TargetRecord):
        target = t
    elif isinstance(t, dict):
        target = TargetRecord(str(t["kind"]), float(t["target"]), float(t["reached"]), float(t["density"]))
    elif isinstance(d.get("target_flops"), dict):  # version 1 and the dict records: a FLOP target only
        t = d["target_flops"]
        target = TargetRecord("flops", float(t["target"]), float(t["reached"]), float(t["density"]))
    rule_failures = d.get("rule_failures", 0)
    if isinstance(rule_failures, bool) or not isinstance(rule_failures, int):
        raise TypeError(f"rule_failures is a {type(rule_failures).__name__}, not an int")
    return ThinRecord(keep=keep, input_shapes=[list(s) for s in shapes], input_dtypes=list(dtypes),
                      groups=groups, frozen=frozen, target=target, rule_failures=rule_failures,
                      capture=str(d.get("capture", "fx")), returns=str(d.get("returns", "graph")),
                      reason=str(d.get("reason", "")), input_names=[str(n) for n in d.get("input_names", [])],
                      experts={str(k): [int(e) for e in v] for k, v in d.get("experts", {}).items()})


def thinning_record(model: Any) -> ThinRecord | None:
    """The ``ThinRecord`` of a model returned by ``thin`` or ``load_thinned`` (None for any other model).

    Reads the typed record, and the plain dict that ``thin`` wrote before the typed records existed.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.5), torch.randn(1, 1, 28, 28))
        >>> thinning_record(small).input_shapes, thinning_record(fxcondensa.models.LeNet5())
        ([[1, 1, 28, 28]], None)
    """
    rec = thin_record(model)
    if rec is not None:
        return rec
    meta = getattr(model, "meta", None)
    d = meta.get(META) if isinstance(meta, dict) else None
    if not (isinstance(d, dict) and isinstance(d.get("keep"), torch.Tensor)
            and d.get("input_shapes") is not None and d.get("input_dtypes") is not None):
        return None
    return _record_from_plain(d, d["keep"], d["input_shapes"], d["input_dtypes"])


# -- save -------------------------------------------------------------------------------------------------
def save_thinned(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write a model returned by ``fxcondensa.thin`` to ``path`` as tensors plus its recipe; returns bytes.

    The model may live on any device: the reference outputs are computed there (TF32 off) and the device
    type is recorded. The write is atomic (temporary file in the same folder, then ``os.replace``); an
    existing ``path`` is replaced only with ``overwrite=True`` (else ``FileExistsError``). The model is not
    modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    rec = thinning_record(model)
    if rec is None:
        raise ValueError(f"{type(model).__name__} carries no thinning recipe (no ThinRecord in "
                         f"meta['{META}']): save_thinned takes the GraphModule returned by fxcondensa.thin or "
                         "fxcondensa.load_thinned; save other models with fxcondensa.save_compressed")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    specs = [{"shape": [int(s) for s in shape], "dtype": str(d).removeprefix("torch.")}
             for shape, d in zip(rec.input_shapes, rec.input_dtypes, strict=True)]
    first: dict[int, str] = {}
    tensors: dict[str, Any] = {}
    for name, t in _named_tensors(model):
        if id(t) in first:
            tensors[name] = {"kind": "alias", "of": first[id(t)]}
        else:
            first[id(t)] = name
            tensors[name] = encode_tensor(t)
    device = _device_of(model)
    payload = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "keep": rec.keep.detach().cpu().to(torch.bool).clone(),
        "inputs": specs,
        "graph": _signature(model),
        "training": {name: bool(m.training) for name, m in model.named_modules()},
        "tensors": tensors,
        "reference": _run_reference(model, _reference_inputs(specs, device), _call_names(model, rec)),
        "reference_device": device.type,
        "record": _record_to_plain(rec),
    }
    return save_atomic(payload, path, overwrite=overwrite)


# -- load -------------------------------------------------------------------------------------------------
def _fail(path: str, what: str) -> FileFormatError:
    return FileFormatError(f"{path}: {what}")


def _read(path: str) -> dict[str, Any]:
    """The payload, checked field by field; FileFormatError naming ``path`` for anything else."""
    payload = load_plain(path, "thinned-model", MAGIC, READABLE_VERSIONS, "fxcondensa.save_thinned")
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
    record_key = "record" if payload["version"] >= 2 else "meta"  # version 1 kept the record under "meta"
    for key, kind in (("tensors", dict), ("training", dict), ("reference", list), (record_key, dict)):
        if not isinstance(payload.get(key), kind):
            raise _fail(path, f"'{key}' is missing or not a {kind.__name__}")
    try:
        payload["thin_record"] = _record_from_plain(payload[record_key], keep.clone(), [s["shape"] for s in specs],
                                                    [s["dtype"] for s in specs])
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"the thinning record is malformed: {type(exc).__name__}: {exc}") from exc
    if payload.get("reference_device", "cpu") not in ("cpu", "cuda", "mps", "xpu"):
        raise _fail(path, f"'reference_device' {payload.get('reference_device')!r} is not a device type")
    return payload


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
            t.copy_(value)  # to the rebuilt model's device and dtype


def reference_tolerance(dtype: torch.dtype, devices: set[str]) -> tuple[float, float]:
    """(rtol, atol) for comparing reference outputs of ``dtype`` computed on the device types ``devices``.

    Example:
        >>> reference_tolerance(torch.float32, {"cpu"}), reference_tolerance(torch.float32, {"cpu", "cuda"})
        ((0.001, 0.0001), (0.005, 0.0005))
    """
    rtol, atol = (_REF_CUDA_RTOL, _REF_CUDA_ATOL) if devices - {"cpu"} else (_REF_RTOL, _REF_ATOL)
    if dtype.is_floating_point:  # half precision models: a few units in the last place of their own dtype
        eps = torch.finfo(dtype).eps
        rtol, atol = max(rtol, 8 * eps), max(atol, 8 * eps)
    return rtol, atol


def _call_names(model: nn.Module, rec: ThinRecord) -> list[str]:
    return [] if isinstance(model, fx.GraphModule) else list(rec.input_names)


def _check_reference(path: str, gm: nn.Module, specs: list[dict[str, Any]], reference: list[Any],
                     saved_on: str, misfit: str, names: Sequence[str] = ()) -> None:
    device = _device_of(gm)
    got = _run_reference(gm, _reference_inputs(specs, device), names)
    if len(got) != len(reference):
        raise _fail(path, f"{misfit}: the rebuilt model returns {len(got)} tensors, the saved one {len(reference)}")
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        if not isinstance(r, dict) or not isinstance(r.get("head"), torch.Tensor):
            raise _fail(path, f"reference output {i} is malformed")
        a, b = g["head"], r["head"]
        if g["shape"] != r.get("shape") or a.shape != b.shape:
            raise _fail(path, f"{misfit}: output {i} has shape {g['shape']}, the saved model's {r.get('shape')}")
        rtol, atol = reference_tolerance(a.dtype, {saved_on, device.type})
        same = (torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True)
                if a.is_floating_point() or a.is_complex() else torch.equal(a, b.to(a.dtype)))
        if not same:
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("nan")
            raise _fail(path, f"{misfit}: output {i} of the rebuilt model differs from the saved model's (max abs "
                              f"difference {diff:.3g}, rtol {rtol}, atol {atol}; saved on {saved_on}, rebuilt on "
                              f"{device})")


def load_thinned(path: str | os.PathLike, model_or_factory: nn.Module | Callable[[], nn.Module], *,
                 leaf_modules: Sequence[type[nn.Module]] = (),
                 concrete_args: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the thinned model saved in ``path`` from its dense architecture: of the model's own class where
    ``thin`` returned that (the module is resized as ``thin`` resized it), else the thinned ``GraphModule``.

    ``model_or_factory`` is the dense model the file was thinned from (any weights: they are replaced), or
    a callable returning it; it is not modified. The result lives on that model's device (a file saved from
    a CUDA model loads into a CPU model and the other way round). Pass the tracing options (``leaf_modules``,
    ``concrete_args``) given to ``thin``. The result equals the saved model: same parameters, buffers,
    training flags and outputs, and the same ``ThinRecord``.
    """
    path = os.fspath(path)
    payload = _read(path)  # before building anything: a bad file costs no model
    tensors = decode_table(path, payload["tensors"])
    arch = architecture(model_or_factory)
    specs = payload["inputs"]
    device = _device_of(arch)
    inputs = _reference_inputs(specs, device)
    misfit = f"the recipe does not fit {type(arch).__name__} (saved from a {payload.get('model_class')!r})"
    tracing: dict[str, Any] = {"leaf_modules": tuple(leaf_modules)}
    if concrete_args is not None:
        tracing["concrete_args"] = concrete_args
    record = payload["thin_record"]
    own = record.returns == "module" and bool(record.input_names)
    try:
        # The user's class came from a capture with the example's shapes (``thin``): replayed on the same.
        with example_shapes() if own else contextlib.nullcontext():
            dense, gm = rethin_pair(arch, payload["keep"], dict(zip(record.input_names, inputs, strict=True)) if own
                                    else inputs, experts=record.experts, **tracing)
    except TraceError:
        raise  # the architecture itself cannot be traced: not the file's fault
    except Exception as exc:  # a recipe of another model fails anywhere inside the slicing: name it
        first = (str(exc).splitlines() or [""])[0]
        raise _fail(path, f"{misfit}: {type(exc).__name__}: {first}") from exc
    if own:  # the user's class, as thin returned it
        return _load_own(path, arch, dense, gm, tensors, payload, misfit)
    signature = _signature(gm)
    if signature != payload["graph"]:
        where = next((i for i, (a, b) in enumerate(zip(signature, payload["graph"], strict=False)) if a != b),
                     min(len(signature), len(payload["graph"])))
        ours = signature[where] if where < len(signature) else None
        theirs = payload["graph"][where] if where < len(payload["graph"]) else None
        raise _fail(path, f"{misfit}: its graph differs at node {where} ({ours} here, {theirs} in the file); "
                          "pass the leaf_modules and concrete_args given to thin")
    _load_values(path, gm, tensors, misfit)
    _check_reference(path, gm, specs, payload["reference"], payload.get("reference_device", "cpu"), misfit)
    for name, m in gm.named_modules():
        m.training = bool(payload["training"].get(name, m.training))
    gm.meta[META] = payload["thin_record"]
    return gm


def _load_own(path: str, arch: nn.Module, dense: fx.GraphModule, thinned: fx.GraphModule,
              tensors: dict[str, torch.Tensor], payload: dict[str, Any], misfit: str) -> nn.Module:
    record = payload["thin_record"]
    try:
        edits = graph_edits(arch, dense, thinned)
        model = own_model(arch, dense, thinned, edits)
    except ValueError as exc:
        raise _fail(path, f"{misfit}: {exc}") from exc
    if record.reason:  # thin gave the class back with submodules run as their thinned graphs: so again
        swapped = swap_blocking(model, arch, dense, thinned, blocking_edits(edits))
        if isinstance(swapped, str):
            raise _fail(path, f"{misfit}: {swapped}")
    _load_values(path, model, tensors, misfit)
    _check_reference(path, model, payload["inputs"], payload["reference"], payload.get("reference_device", "cpu"),
                     misfit, record.input_names)
    for name, m in model.named_modules():
        m.training = bool(payload["training"].get(name, m.training))
    set_thin_record(model, record)
    return model

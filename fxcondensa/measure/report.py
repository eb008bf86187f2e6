"""Per-layer comparison of two models (original vs compressed or thinned): shapes, parameters, MACs, latency.

Rows are plain data (``LayerRow``); ``Report.__str__`` renders them with tabulate, ``to_json`` and ``to_csv``
serialise the very same rows. MACs are counted as described in ``fxcondensa.passes.costs``.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import Prune
    >>> model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    >>> r = fxcondensa.report(model, fxcondensa.compress(model, Prune(0.1)), x, latency=False)
    >>> r.rows[0].layer, r.rows[0].macs_before, round(r.totals["density"], 2)
    ('conv1', 288000, 0.1)
    >>> print(r)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from ..capture.exported import split_inputs
from ..capture.graph import trace
from ..capture.records import META, compressed_graph
from ..files.recipe import thinning_record
from ..passes.annotate import annotations
from ..passes.costs import NodeCost, profile_costs
from ..passes.storage import layer_storage, stored_bytes
from .latency import BACKENDS, NodeLatency, compare_latency, deployment_latency, node_latency

__all__ = ["report", "Report", "LayerRow", "frozen_groups"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerRow:
    """One computing node of the original graph, matched by node name with its counterpart in the other.

    ``None`` marks a side that lacks the node. ``density`` is the other model's non-zero parameters over the
    original's non-zero parameters (pruned zeros and removed channels both lower it; zeros the original
    already had, such as freshly initialised biases, do not). ``None`` for layers without parameters. Latencies are per-node medians
    in milliseconds, ``None`` when latency was not measured. ``frozen`` holds the reasons of the frozen
    channel groups this layer belongs to ("" when none). ``storage_before`` / ``storage_after`` name the
    dtype the layer's weight is stored in (``"float32"``, ``"float16"`` under Quantize, ``"int8"`` after
    ``quantize_int8``; ``fxcondensa.passes.storage.layer_storage``), ``None`` for layers without parameters.
    """

    layer: str
    type: str
    kind: str
    input_shape_before: Shape | None
    input_shape_after: Shape | None
    output_shape_before: Shape | None
    output_shape_after: Shape | None
    params_before: int | None
    params_after: int | None
    density: float | None
    macs_before: int | None
    macs_after: int | None
    latency_before_ms: float | None
    latency_after_ms: float | None
    frozen: str = ""
    storage_before: str | None = None
    storage_after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _shape_text(shape: Any) -> str:
    return "" if shape is None else "x".join(str(s) for s in shape)


@dataclass
class Report:
    """A per-layer table plus totals, latency notes and the frozen channel groups of the other model."""

    rows: list[LayerRow]
    totals: dict[str, Any]
    frozen: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_shapes: list[Shape] = field(default_factory=list)
    whole_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "whole_reason": self.whole_reason,
            "input_shapes": [list(s) for s in self.input_shapes],
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals,
            "frozen": self.frozen,
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Everything in the report as JSON (exact integers, shapes as lists)."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """The rows as CSV (shapes written ``1x20x24x24``, missing values empty), then one ``TOTAL`` row."""
        names = [f.name for f in fields(LayerRow)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _shape_text(v) if k.endswith("shape_before") or k.endswith("shape_after")
                             else ("" if v is None else v) for k, v in asdict(row).items()})
        t = self.totals
        writer.writerow({"layer": "TOTAL", "params_before": t["params_before"], "params_after": t["params_after"],
                         "density": t["density"], "macs_before": t["macs_before"], "macs_after": t["macs_after"],
                         "latency_before_ms": _get(t, "latency_before", "median_ms"),
                         "latency_after_ms": _get(t, "latency_after", "median_ms")})
        return buf.getvalue()

    def __str__(self) -> str:
        headers = ["layer", "type", "input shape", "output shape", "params", "density", "MACs", "latency ms"]
        table = [[r.layer, r.type,
                  _pair(r.input_shape_before, r.input_shape_after, _shape_text),
                  _pair(r.output_shape_before, r.output_shape_after, _shape_text),
                  _pair(r.params_before, r.params_after, _human),
                  "" if r.density is None else f"{r.density:.3f}",
                  _pair(r.macs_before, r.macs_after, _human),
                  _pair(r.latency_before_ms, r.latency_after_ms, _ms)] for r in self.rows]
        t = self.totals
        table.append(["TOTAL", "", "", "", _pair(t["params_before"], t["params_after"], _human),
                      f"{t['density']:.3f}", _pair(t["macs_before"], t["macs_after"], _human),
                      _pair(_get(t, "latency_before", "median_ms"), _get(t, "latency_after", "median_ms"), _ms)])
        # The storage column only where some weight is stored other than in float32 (Quantize, int8): in an
        # all-float32 comparison it would repeat one word on every row.
        if any(d not in (None, "float32") for r in self.rows for d in (r.storage_before, r.storage_after)):
            headers.insert(5, "storage")
            for r, line in zip(self.rows, table, strict=False):
                line.insert(5, "" if r.storage_before is None and r.storage_after is None
                            else _pair(r.storage_before, r.storage_after, str))
            table[-1].insert(5, "")
        lines = [f"left whole: {self.whole_reason}", ""] if self.whole_reason else []
        lines += [tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True), ""]
        lines.append(f"parameters: {t['params_before']} -> {t['params_after']} ({_ratio(t['params_ratio'])} smaller), "
                     f"non-zero {t['nonzero_params_before']} -> {t['nonzero_params_after']} "
                     f"(density {t['density']:.4f})")
        lines.append(f"MACs: {t['macs_before']} -> {t['macs_after']} ({_ratio(t['macs_ratio'])} fewer)")
        if "storage" in headers:
            a, b = t.get("param_bytes_before"), t.get("param_bytes_after")
            lines.append(f"parameter bytes as stored: {a} -> {b} ({_ratio(_safe_div(a, b))} smaller)")
        if t.get("flop_target"):
            ft = t["flop_target"]
            lines.append(f"MAC target: {ft['target']:.3f} of the dense MACs; the scheme's search reached "
                         f"{ft['reached']:.3f} (global density {ft['density']:.3f})")
        if t.get("latency_target"):
            lt = t["latency_target"]
            now = (f"; measured in this report: {1 / t['speedup']:.3f}" if t.get("speedup") else "")
            lines.append(f"latency target: {lt['target']:.3f} of the dense latency; measured when the scheme "
                         f"selected the channels: {lt['reached']:.3f}{now}")
        if t.get("latency_before"):
            lines.append(f"latency before: {_latency_text(t['latency_before'])}")
            lines.append(f"latency after:  {_latency_text(t['latency_after'])}")
            lines.append(f"speed-up: {_ratio(t['speedup'])}")
        lines += self.notes
        if self.frozen:
            lines += ["", "frozen channel groups (kept whole; pruning them would change the outputs):"]
            lines += [f"  - {g.get('group', '?')}: {g.get('reason', '?')} [layers: {', '.join(g.get('layers', []))}]"
                      for g in self.frozen]
        return "\n".join(lines)


def _get(d: dict[str, Any], key: str, sub: str) -> Any:
    inner = d.get(key)
    return inner.get(sub) if isinstance(inner, dict) else None


def _pair(before: Any, after: Any, fmt: Any) -> str:
    """``a`` when both sides agree, ``a -> b`` when they differ, ``-`` for a missing side."""
    a = "-" if before is None else fmt(before)
    b = "-" if after is None else fmt(after)
    return a if a == b else f"{a} -> {b}"


def _human(n: int) -> str:
    """Compact integers for the table (exact values are in JSON and CSV): 1600000 -> 1.6M."""
    if abs(n) < 10_000:
        return str(n)
    div, unit = next((d, u) for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "K")) if abs(n) >= d)
    return f"{n / div:.4g}{unit}"


def _ms(v: float) -> str:
    return f"{v:.3f}"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _latency_text(d: dict[str, Any]) -> str:
    return (f"{d['median_ms']:.3f} ms median (IQR {d['iqr_ms']:.3f}, min {d['min_ms']:.3f}, max {d['max_ms']:.3f}; "
            f"{d['repeat']} runs, {d['threads']} threads, batch {d['batch_size']}, {d['device']})")


def frozen_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The channel groups ``thin`` could not prune, from the model's ``ThinRecord``, as plain data:
    ``{"group", "layers", "reason"}`` ([] for a model that was not thinned)."""
    rec = thinning_record(model)
    return [] if rec is None else [{"group": f.group, "layers": list(f.layers), "reason": f.reason}
                                   for f in rec.frozen]


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def report(original: nn.Module, other: nn.Module, example_inputs: Any, *, latency: bool = True,
           warmup: int = 3, repeat: int = 10, leaf_modules: Sequence[type[nn.Module]] = (),
           concrete_args: dict[str, Any] | None = None, deployment: bool | Sequence[str] = False) -> Report:
    """Compare ``original`` with ``other`` (compressed or thinned) layer by layer on ``example_inputs``.

    Neither model is changed: both are traced (copies) and run in eval mode without gradients. With
    ``latency=True`` every node is timed ``repeat`` times (after ``warmup`` runs) and the report notes how
    the sum of per-layer medians compares with each whole model's median. The two whole models are timed
    in alternation, so that a busy machine slows both alike. ``leaf_modules`` and ``concrete_args`` are the
    tracing options of ``fxcondensa.trace`` (pass those given to ``thin`` or ``compress``). When ``other``
    was left whole by ``thin``, the report says why on its first line. ``deployment=True`` (or a list of
    backends) also times ``other`` deployed eager, in channels_last, under ``torch.compile`` and in ONNX
    Runtime when installed (``fxcondensa.measure.latency.deployment_latency``; compiling takes a while) and adds a
    line saying which is fastest.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import Prune
        >>> model = fxcondensa.models.LeNet5()
        >>> r = fxcondensa.report(model, fxcondensa.compress(model, Prune(0.5)), torch.randn(1, 1, 28, 28))
        >>> r.totals["macs_before"]
        2322940
    """
    # Inputs stay as the models take them (a tensor, positional inputs, or keyword inputs).
    inputs = example_inputs
    tracing = {"leaf_modules": leaf_modules, "concrete_args": concrete_args}
    gm_a, gm_b = trace(original, inputs, **tracing), trace(other, inputs, **tracing)
    costs_a, costs_b = profile_costs(gm_a), profile_costs(gm_b)
    dtypes_a, dtypes_b = _annotated(original), _annotated(other)
    storage_a, storage_b = layer_storage(gm_a, dtypes=dtypes_a), layer_storage(gm_b, dtypes=dtypes_b)
    lat_a: NodeLatency | None = None
    lat_b: NodeLatency | None = None
    if latency:
        whole_a, whole_b = compare_latency([gm_a, gm_b], inputs, warmup=warmup, repeat=repeat)
        lat_a = node_latency(gm_a, inputs, warmup=warmup, repeat=repeat, whole=whole_a)
        lat_b = node_latency(gm_b, inputs, warmup=warmup, repeat=repeat, whole=whole_b)
    frozen = frozen_groups(other)
    reasons: dict[str, list[str]] = {}
    for g in frozen:
        for layer in g.get("layers", []):
            reasons.setdefault(str(layer), []).append(str(g.get("reason", "")))

    # Rows are layers: nodes that produce a tensor (x.size(0) and other Python values are left out).
    costs_a = [c for c in costs_a if c.output_shape is not None]
    costs_b = [c for c in costs_b if c.output_shape is not None]
    by_name_b = {c.name: c for c in costs_b}
    names_a = {c.name for c in costs_a}
    pairs: list[tuple[NodeCost | None, NodeCost | None]] = [(c, by_name_b.get(c.name)) for c in costs_a]
    pairs += [(None, c) for c in costs_b if c.name not in names_a]
    rows = [_row(a, b, lat_a, lat_b, reasons, storage_a, storage_b) for a, b in pairs]

    p_a, p_b = sum(c.params for c in costs_a), sum(c.params for c in costs_b)
    nz_a, nz_b = sum(c.nonzero_params for c in costs_a), sum(c.nonzero_params for c in costs_b)
    m_a, m_b = sum(c.macs for c in costs_a), sum(c.macs for c in costs_b)
    totals: dict[str, Any] = {
        "params_before": p_a, "params_after": p_b, "params_ratio": _safe_div(p_a, p_b),
        "nonzero_params_before": nz_a, "nonzero_params_after": nz_b, "density": nz_b / nz_a if nz_a else 1.0,
        "macs_before": m_a, "macs_after": m_b, "macs_ratio": _safe_div(m_a, m_b),
        # bytes of the parameters in their storage dtypes (int8 values plus their scales once quantized)
        "param_bytes_before": _param_bytes(gm_a, dtypes_a), "param_bytes_after": _param_bytes(gm_b, dtypes_b),
        "latency_before": lat_a.whole.to_dict() if lat_a else None,
        "latency_after": lat_b.whole.to_dict() if lat_b else None,
        "layer_latency_sum_before_ms": lat_a.sum_ms if lat_a else None,
        "layer_latency_sum_after_ms": lat_b.sum_ms if lat_b else None,
        "speedup": _safe_div(lat_a.whole.median_ms, lat_b.whole.median_ms) if lat_a and lat_b else None,
        # StructurePrune(target_flops=...) records its MAC budget and what its search reached
        "flop_target": _flop_target(other),
        # StructurePrune(target_latency=...) records its target and the fraction it measured when selecting
        "latency_target": _target(other, "latency"),
        "deployment": None,
    }
    notes = [f"before: {lat_a.note()}", f"after:  {lat_b.note()}"] if lat_a and lat_b else []
    if lat_a and lat_b and (lat_a.whole.noisy or lat_b.whole.noisy):
        notes.append("warning: the run-to-run spread is wide (IQR above 25% of the median), so the latencies are "
                     "unreliable: other processes are probably competing for the CPU. Rerun on an idle machine, "
                     "with more repeats, or with fewer threads (torch.set_num_threads).")
    if deployment:
        backends = BACKENDS if deployment is True else tuple(deployment)
        dep = deployment_latency(other, inputs, backends=backends, warmup=warmup, repeat=repeat)
        totals["deployment"] = dep.to_dict()
        notes.append(dep.note())
    rec = thinning_record(other)
    return Report(rows=rows, totals=totals, frozen=frozen, notes=notes,
                  input_shapes=[tuple(t.shape) for t in _tensors(inputs)],
                  whole_reason=rec.whole_reason if rec is not None else None)


def _annotated(model: nn.Module) -> dict[str, torch.dtype]:
    """Storage dtypes a scheme annotated, by parameter name: on the graph itself, or on the annotated graph a
    compressed model of the user's own class keeps beside it (a fresh capture of it has no annotations)."""
    graph = compressed_graph(model)
    return {n: a.dtype for n, a in annotations(graph).items() if a.dtype is not None} if graph is not None else {}


def _param_bytes(gm: nn.Module, annotated: dict[str, torch.dtype]) -> int:
    return sum(p.numel() * annotated[n].itemsize if n in annotated else stored_bytes(p)
               for n, p in gm.named_parameters())


def _tensors(example_inputs: Any) -> list[torch.Tensor]:
    args, kwargs = split_inputs(example_inputs)
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _target(model: nn.Module, kind: str) -> dict[str, float] | None:
    """A target of ``kind`` recorded on a thinned (``ThinRecord``) or compressed (``GraphRecord``) model."""
    rec = thinning_record(model)
    target = rec.target if rec is not None else None
    if target is None:
        meta = getattr(model, "meta", None)
        target = getattr(meta.get(META) if isinstance(meta, dict) else None, "target", None)
    if target is None or getattr(target, "kind", None) != kind:
        return None
    return {"target": target.target, "reached": target.reached, "density": target.density}


def _flop_target(model: nn.Module) -> dict[str, float] | None:
    """The FLOP target of a thinned model (its ``ThinRecord``) or of a compressed graph (its ``GraphRecord``,
    or the dict schemes wrote before the typed records) as ``{"target", "reached", "density"}``."""
    rec = thinning_record(model)
    target = rec.target if rec is not None else None
    if target is None:
        meta = getattr(model, "meta", None)
        found = meta.get(META) if isinstance(meta, dict) else None
        target = getattr(found, "target", None)
        if isinstance(found, dict) and isinstance(found.get("target_flops"), dict):
            return dict(found["target_flops"])
    if target is None or target.kind != "flops":
        return None
    return {"target": target.target, "reached": target.reached, "density": target.density}


def _first_input(c: NodeCost | None) -> Shape | None:
    return c.input_shapes[0] if c and c.input_shapes else None


def _row(a: NodeCost | None, b: NodeCost | None, lat_a: NodeLatency | None, lat_b: NodeLatency | None,
         reasons: dict[str, list[str]], storage_a: dict[str, str], storage_b: dict[str, str]) -> LayerRow:
    some = a or b
    assert some is not None
    types = some.type if not (a and b) or a.type == b.type else f"{a.type} -> {b.type}"
    density = None
    if a is not None and b is not None:
        density = b.nonzero_params / a.nonzero_params if a.nonzero_params else None
    return LayerRow(
        layer=some.layer, type=types, kind=some.kind,
        input_shape_before=_first_input(a), input_shape_after=_first_input(b),
        output_shape_before=a.output_shape if a else None, output_shape_after=b.output_shape if b else None,
        params_before=a.params if a else None, params_after=b.params if b else None, density=density,
        macs_before=a.macs if a else None, macs_after=b.macs if b else None,
        latency_before_ms=lat_a.per_node_ms.get(a.name) if lat_a and a else None,
        latency_after_ms=lat_b.per_node_ms.get(b.name) if lat_b and b else None,
        frozen="; ".join(dict.fromkeys(reasons.get(some.layer, []))),
        storage_before=storage_a.get(a.name) if a else None, storage_after=storage_b.get(b.name) if b else None,
    )

"""Latency-aware channel selection: a per-layer latency model measured on the device, and a selection that
meets a latency target measured on the thinned model.

``LatencyModel.build`` times every conv and linear module of a traced graph on its own, at a few kept-channel
counts (random weights and inputs of the right shapes, on the device, dtype and batch of the example inputs),
and every other node once through an ``fx.Interpreter`` on the dense model. It predicts the latency of a
thinned model from a keep vector (one bool per channel id of the channel analysis) without building it:

- a conv / linear costs the bilinear interpolation of its table over (kept input channels, kept output
  channels): a conv's time is close to ``a + b*cin + c*cout + d*cin*cout``, which bilinear interpolation
  reproduces exactly on each cell; grid counts are multiples of 16 where the layer is wide enough;
- times a device-wide **alignment factor** for counts that are not multiples of 8 (or of 16), measured on the
  largest layers by timing them one and eight channels below an aligned count (oneDNN and cuDNN both run
  padded or slower kernels for odd channel counts);
- every other node (norms, activations, pools, adds: memory-bound) costs its dense time scaled by the kept
  fraction of its output channels.

Measurements are cached on disk (JSON, atomic writes) in ``$FXCONDENSA_CACHE_DIR``, else
``$XDG_CACHE_HOME/fxcondensa``, else ``~/.cache/fxcondensa``, one file per device name, dtype, torch version and
thread count; each layer table is keyed by its shapes and hyper-parameters, each graph's node times by the
graph's structure and shapes. A second build for the same shapes times nothing.

``select_for_latency`` keeps the channels that matter most per unit of predicted latency (HALP, Shen et al.,
NeurIPS 2022: a channel's score over the latency its group saves per channel removed) until the predicted
latency is the target fraction of dense, then builds the thinned model (``apply_keep``), measures it against
the dense one (alternating runs) and corrects the internal target from what it measured, a few times, so that
the **measured** fraction lands within ``tolerance`` of the target. ``auto_align`` rounds each group's kept
count up to the multiple (1, 8, 16, 32) the model predicts runs fastest.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.passes.analysis import analyze
    >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    >>> fake = lambda module, x: 1e-6 * sum(p.numel() for p in module.parameters())  # ms, for the example
    >>> lm = LatencyModel.build(gm, analyze(gm), torch.randn(1, 1, 28, 28), timer=fake, cache=False,
    ...                         node_times={})
    >>> sorted(t.node for t in lm.layers)
    ['conv1', 'conv2', 'ip1', 'ip2']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.records import TargetRecord
from ..files.fileio import write_atomic
from ..measure.latency import Latency, compare_latency_copies, measure_latency
from ..measure.latency import node_times as _node_times  # build() takes a node_times argument
from ..passes.analysis import balance_grouped
from ..passes.costs import node_cost
from ..passes.slicing import apply_keep
from ..rules.api import ChannelAnalysis, node_shape
from .selection import select_channels

__all__ = [
    "LatencyWarning",
    "LayerTable",
    "LatencyModel",
    "LatencySelection",
    "select_for_latency",
    "auto_align",
    "validate_target_latency",
    "placeholder_inputs",
    "cache_dir",
    "CACHE_ENV",
]

CACHE_ENV = "FXCONDENSA_CACHE_DIR"
FORMAT = 1
GRID = (0.25, 0.5, 1.0)
ALIGN_CHOICES = (1, 8, 16, 32)

Timer = Callable[[nn.Module, torch.Tensor], float]  # (module, input) -> milliseconds
Measure = Callable[[fx.GraphModule, fx.GraphModule, tuple], tuple[Latency, Latency]]  # -> (dense, thinned)


class LatencyWarning(UserWarning):
    """Latency measurements could not do what was asked (too noisy, or the target was not met); the message
    says what was measured."""


def validate_target_latency(value: Any, where: str = "target_latency") -> float:
    """``value`` as a float in (0, 1]: the fraction of the dense model's latency to reach.

    Example:
        >>> validate_target_latency(0.5)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{where} must be a fraction of the dense model's latency in (0, 1] (e.g. 0.5 for "
                         f"twice as fast), got {value!r}")
    return float(value)


def placeholder_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Random inputs with the shapes and dtypes recorded on ``gm``'s placeholders, on its parameters' device:
    what a scheme's ``annotate(gm)`` (which gets no inputs) times the model on.

    Example:
        >>> import torch, fxcondensa
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(4, 1, 28, 28))
        >>> [tuple(t.shape) for t in placeholder_inputs(gm)]
        [(4, 1, 28, 28)]
    """
    device = next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ValueError(f"placeholder {n.name!r} of {type(gm).__name__} has no shape metadata: trace the "
                             "model with example inputs (fxcondensa.trace(model, example_inputs))")
        out.append(torch.randn(meta.shape, dtype=meta.dtype, device=device) if meta.dtype.is_floating_point
                   else torch.zeros(meta.shape, dtype=meta.dtype, device=device))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ cache

def cache_dir() -> Path:
    """Where latency tables are cached: ``$FXCONDENSA_CACHE_DIR``, ``$XDG_CACHE_HOME/fxcondensa`` or
    ``~/.cache/fxcondensa``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxcondensa"


def device_name(device: torch.device) -> str:
    """A name for the hardware: the GPU's name, or the CPU's model name (timings differ between both)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device.type}:{cpu}"


def cache_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a timing depends on besides the layer's shapes: hardware, dtype, torch version and threads."""
    return {"device": device_name(device), "dtype": str(dtype), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


class _Cache:
    """One JSON file per ``cache_key``: ``layers`` (spec -> {"cin,cout": ms}) and ``graphs`` (signature ->
    {node: ms}). Written atomically (``files.fileio.write_atomic``); a corrupt or foreign file is ignored."""

    def __init__(self, directory: Path | None, key: dict[str, Any]):
        self.key = key
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = None if directory is None else Path(directory) / f"latency-{digest}.json"
        self.data = self._read()
        self.hits = self.misses = 0

    def _read(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"format": FORMAT, "key": self.key, "layers": {}, "graphs": {}}
        if self.path is None or not self.path.exists():
            return empty
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return empty  # a damaged cache costs a re-measurement, never a crash
        ok = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("key") == self.key
              and isinstance(data.get("layers"), dict) and isinstance(data.get("graphs"), dict))
        return data if ok else empty

    def save(self) -> None:
        if self.path is None:
            return
        disk = self._read()  # merge with what another process may have written meanwhile
        for part in ("layers", "graphs"):
            for k, v in self.data[part].items():
                disk[part].setdefault(k, {}).update(v)

        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(disk, fh)

        write_atomic(self.path, write, make_dirs=True)
        self.data = disk


# ----------------------------------------------------------------------------------------------- layers

def _grid_counts(total: int, grid: Sequence[float]) -> list[int]:
    """Kept counts to time a dim of ``total`` channels at: ``grid`` fractions rounded to multiples of 16
    (8 for narrower dims) so that the interpolation base is the aligned curve; ``total`` always included."""
    step = 16 if total >= 64 else 8 if total >= 16 else 1
    counts = {total}
    for f in grid:
        counts.add(min(total, max(step, int(round(f * total / step)) * step)))
    return sorted(counts)


@dataclass
class LayerTable:
    """One conv or linear node: its spec, which dims are prunable, and its measured points.

    ``in_ch`` / ``out_ch`` are the channel id of each index of its input / output channel dim (None when
    that dim is not tracked); ``tied`` marks a grouped conv whose input and output channels go together
    (depthwise), timed along one count. ``points`` maps (cin, cout) to milliseconds.
    """

    node: str
    spec: dict[str, Any]
    cin: int
    cout: int
    in_ch: torch.Tensor | None
    out_ch: torch.Tensor | None
    tied: bool = False
    points: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps(self.spec, sort_keys=True)

    def grid(self, grid: Sequence[float]) -> list[tuple[int, int]]:
        if self.tied:
            return [(c, c) for c in _grid_counts(self.cout, grid)]
        ins = _grid_counts(self.cin, grid) if self.in_ch is not None else [self.cin]
        outs = _grid_counts(self.cout, grid) if self.out_ch is not None else [self.cout]
        return [(i, o) for i in ins for o in outs]

    def module(self, cin: int, cout: int) -> tuple[nn.Module, torch.Size]:
        """The layer at (cin, cout) kept channels, and the shape of its input."""
        s = self.spec
        shape = list(s["input"])
        if s["type"] == "Linear":
            shape[-1] = cin
            return nn.Linear(cin, cout, bias=s["bias"]), torch.Size(shape)
        shape[1] = cin
        groups = s["groups"]
        if self.tied:  # channels per conv group stay, the number of conv groups shrinks
            groups = max(1, cout // max(1, self.cout // s["groups"]))
        conv = getattr(nn, s["type"])(cin, cout, s["kernel"], stride=s["stride"], padding=s["padding"],
                                      dilation=s["dilation"], groups=groups, bias=s["bias"],
                                      padding_mode=s["padding_mode"])
        return conv, torch.Size(shape)


def _layer_table(gm: fx.GraphModule, node: fx.Node, analysis: ChannelAnalysis, tied: set[str]) -> LayerTable | None:
    module = gm.get_submodule(node.target)
    x = node.args[0] if node.args else None
    dims = node_shape(x)
    if dims is None:
        return None
    shape = list(dims)
    if isinstance(module, nn.Linear):
        spec = {"type": "Linear", "input": shape, "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
        cin, cout = module.in_features, module.out_features
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if isinstance(module.padding, str) and module.padding != "valid":
            return None  # padding="same" depends on the kernel only, but keep the table to plain convs
        spec = {"type": type(module).__name__, "input": shape, "in": module.in_channels,
                "out": module.out_channels, "kernel": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
        cin, cout = module.in_channels, module.out_channels
        if module.groups > 1 and node.name not in tied:
            return None  # an untied grouped conv keeps its channels (the analysis freezes it)
    else:
        return None
    spec["dtype"] = str(module.weight.dtype)
    in_info, out_info = analysis.info(x), analysis.info(node)
    in_ch = analysis.channel_of[in_info.atoms] if in_info is not None and in_info.atoms.numel() == cin else None
    out_ch = analysis.channel_of[out_info.atoms] if out_info is not None and out_info.atoms.numel() == cout else None
    is_tied = node.name in tied
    if is_tied:
        in_ch = None
    return LayerTable(node.name, spec, cin, cout, in_ch, out_ch, tied=is_tied)


def _bilinear(xs: list[int], ys: list[int], table: dict[tuple[int, int], float], x: float, y: float) -> float:
    """Piecewise-bilinear interpolation on a grid; linear extrapolation beyond its ends."""

    def bracket(vs: list[int], v: float) -> tuple[int, int, float]:
        if len(vs) == 1:
            return 0, 0, 0.0
        j = 1
        while j < len(vs) - 1 and v > vs[j]:
            j += 1
        lo, hi = vs[j - 1], vs[j]
        return j - 1, j, (v - lo) / (hi - lo)

    i0, i1, tx = bracket(xs, x)
    j0, j1, ty = bracket(ys, y)
    a, b = table[(xs[i0], ys[j0])], table[(xs[i1], ys[j0])]
    c, d = table[(xs[i0], ys[j1])], table[(xs[i1], ys[j1])]
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


def _align_class(c: int) -> int:
    return 16 if c % 16 == 0 else 8 if c % 8 == 0 else 1


def _default_timer(warmup: int, repeat: int) -> Timer:
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        return measure_latency(module, x, warmup=warmup, repeat=repeat).median_ms
    return timer


# ------------------------------------------------------------------------------------------------ model

@dataclass
class LatencyModel:
    """Predicted latency (ms) of a thinned graph from a keep vector; see the module docstring.

    ``penalty`` maps an alignment class (1: not a multiple of 8, 8: of 8 but not 16) to the measured factor
    a dim of that class costs over an aligned one, for input and output dims (``"in"`` / ``"out"``) and for
    the channel count of depthwise (tied) convs (``"tied"``).
    """

    layers: list[LayerTable]
    others: list[tuple[str, float, torch.Tensor | None]]  # (node, dense ms, output channel ids or None)
    penalty: dict[str, dict[int, float]]
    build_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_path: str | None = None
    grid: tuple[float, ...] = GRID

    @classmethod
    def build(cls, gm: fx.GraphModule, analysis: ChannelAnalysis, example_inputs: Any, *,
              timer: Timer | None = None, cache: bool = True, directory: str | os.PathLike | None = None,
              grid: Sequence[float] = GRID, probes: int = 3, warmup: int = 1, repeat: int = 3,
              node_times: Mapping[str, float] | None = None) -> LatencyModel:
        """Time ``gm``'s conv and linear layers (or read them from the cache) and its other nodes.

        ``timer(module, x)`` returns milliseconds (default: ``measure_latency`` median of ``repeat`` runs
        after ``warmup``); ``node_times`` gives the dense per-node times instead of measuring them (tests);
        ``cache=False`` neither reads nor writes the disk cache; ``directory`` overrides ``cache_dir()``.
        """
        t0 = time.perf_counter()
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        param = next(iter(gm.parameters()), None)
        dtype = param.dtype if param is not None else (first.dtype if first is not None else torch.float32)
        store = _Cache(Path(directory) if directory is not None else cache_dir() if cache else None,
                       cache_key(device, dtype))
        timer = timer or _default_timer(warmup, repeat)
        tied = {g.node for g in analysis.grouped}
        layers: list[LayerTable] = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or node_cost(gm, node)[0] not in ("conv", "linear"):
                continue
            table = _layer_table(gm, node, analysis, tied)
            if table is not None:
                layers.append(table)

        def point(table: LayerTable, cin: int, cout: int) -> float:
            known = store.data["layers"].setdefault(table.key, {})
            k = f"{cin},{cout}"
            if k in known:
                store.hits += 1
            else:
                store.misses += 1
                module, shape = table.module(cin, cout)
                module = module.to(device=device, dtype=dtype).eval()
                x = torch.randn(shape, device=device, dtype=dtype)
                with torch.no_grad():
                    known[k] = float(timer(module, x))
            return known[k]

        by_key: dict[str, LayerTable] = {}
        for t in layers:
            by_key.setdefault(t.key, t)
        for t in by_key.values():
            for cin, cout in t.grid(grid):
                point(t, cin, cout)
        penalty = _probe_penalties(list(by_key.values()), point, grid, probes)
        for t in layers:
            for cin, cout in t.grid(grid):
                t.points[(cin, cout)] = point(by_key[t.key], cin, cout)

        timed = {t.node for t in layers}
        if node_times is None:
            sig = _graph_signature(gm, inputs)
            node_times = store.data["graphs"].get(sig)
            if node_times is None:
                store.misses += 1
                node_times = _node_times(gm, inputs, warmup, repeat)
                store.data["graphs"][sig] = node_times
            else:
                store.hits += 1
        others = []
        for node in gm.graph.nodes:
            if node.name in timed or node.name not in node_times:
                continue
            info = analysis.info(node)
            others.append((node.name, float(node_times[node.name]),
                           analysis.channel_of[info.atoms] if info is not None and info.atoms.numel() else None))
        if store.misses:
            try:
                store.save()
            except OSError as exc:  # an unwritable cache costs a re-measurement next time, not this result
                warnings.warn(f"could not write the latency cache {store.path}: {exc}. Set {CACHE_ENV} to a "
                              "writable folder to reuse these timings.", LatencyWarning, stacklevel=2)
        return cls(layers=layers, others=others, penalty=penalty, build_s=time.perf_counter() - t0,
                   cache_hits=store.hits, cache_misses=store.misses,
                   cache_path=str(store.path) if store.path else None, grid=tuple(grid))

    # -- prediction -------------------------------------------------------------------------------------
    def _factor(self, side: str, c: int) -> float:
        return self.penalty.get(side, {}).get(_align_class(c), 1.0)

    def layer_ms(self, table: LayerTable, cin: int, cout: int) -> float:
        """Predicted time of one layer at (cin, cout) kept channels."""
        if (cin, cout) in table.points:
            return table.points[(cin, cout)]
        pts = {}
        for (i, o), ms in table.points.items():  # the aligned base: measured points without their own factor
            pts[(i, o)] = ms / (self._factor("tied", o) if table.tied else self._factor("out", o) * self._factor("in", i))
        xs = sorted({i for i, _ in pts})
        ys = sorted({o for _, o in pts})
        if table.tied:
            line = {o: pts[(o, o)] for o in ys}
            base = _bilinear([0], ys, {(0, o): v for o, v in line.items()}, 0, cout)
            return max(0.0, base) * self._factor("tied", cout)
        base = _bilinear(xs, ys, pts, cin, cout)
        return max(0.0, base) * self._factor("in", cin) * self._factor("out", cout)

    def predict(self, keep: torch.Tensor) -> float:
        """Predicted latency (ms) of the model thinned to ``keep``."""
        total = 0.0
        for t in self.layers:
            cout = int(keep[t.out_ch].sum()) if t.out_ch is not None else t.cout
            cin = cout if t.tied else int(keep[t.in_ch].sum()) if t.in_ch is not None else t.cin
            total += self.layer_ms(t, max(cin, 1), max(cout, 1))
        for _, ms, ch in self.others:
            total += ms * (float(keep[ch].float().mean()) if ch is not None else 1.0)
        return total

    def fraction(self, keep: torch.Tensor) -> float:
        """Predicted latency under ``keep`` over the predicted dense latency."""
        dense = self.predict(torch.ones_like(keep))
        return self.predict(keep) / dense if dense > 0 else 1.0


def _probe_penalties(tables: list[LayerTable], point: Callable[[LayerTable, int, int], float],
                     grid: Sequence[float], probes: int) -> dict[str, dict[int, float]]:
    """Measured cost of unaligned counts: the widest layers timed 1 and 8 channels below an aligned grid
    count, over what a proportional change would cost. The median over ``probes`` layers per side."""
    wide = [t for t in tables if not t.tied and t.spec["type"] != "Linear" and t.cin >= 32 and t.cout >= 32]
    wide.sort(key=lambda t: -t.cin * t.cout * math.prod(t.spec["input"][2:]))
    ratios: dict[str, dict[int, list[float]]] = {"in": {1: [], 8: []}, "out": {1: [], 8: []}, "tied": {1: [], 8: []}}
    # Depthwise (tied) convs run other kernels than dense ones: their own probes, on the widest of them.
    for t in sorted((t for t in tables if t.tied and t.cout >= 32), key=lambda t: -t.cout * math.prod(t.spec["input"][2:]))[:probes]:
        co = [c for c in _grid_counts(t.cout, grid) if c % 16 == 0 and c >= 32]
        if not co:
            continue
        o0 = co[len(co) // 2]
        base = point(t, o0, o0)
        for cls_ in (1, 8):
            if base > 0:
                ratios["tied"][cls_].append(point(t, o0 - cls_, o0 - cls_) / (base * (o0 - cls_) / o0))
    for side in ("in", "out"):
        chosen = [t for t in wide if (t.in_ch if side == "in" else t.out_ch) is not None][:probes]
        for t in chosen:
            ci = [c for c in _grid_counts(t.cin, grid) if c % 16 == 0 and c >= 32]
            co = [c for c in _grid_counts(t.cout, grid) if c % 16 == 0 and c >= 32]
            if not ci or not co:
                continue
            i0, o0 = ci[len(ci) // 2], co[len(co) // 2]
            base = point(t, i0, o0)
            for cls_, d in ((1, 1), (8, 8)):
                if side == "out":
                    ms, scale = point(t, i0, o0 - d), (o0 - d) / o0
                else:
                    ms, scale = point(t, i0 - d, o0), (i0 - d) / i0
                if base > 0:
                    ratios[side][cls_].append(ms / (base * scale))
    return {side: {c: statistics.median(v) for c, v in by.items() if v} for side, by in ratios.items()}


def _target_name(target: Any) -> str:
    """A name for a node's target that is the same in every process (``str`` of a builtin holds its address)."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{getattr(target, '__module__', None) or ''}.{name}"


def _graph_signature(gm: fx.GraphModule, inputs: tuple) -> str:
    parts = [[n.name, n.op, _target_name(n.target), list(getattr(n.meta.get("tensor_meta"), "shape", []) or [])]
             for n in gm.graph.nodes]
    parts.append([list(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()




# -------------------------------------------------------------------------------------------- selection

def _candidates_of(analysis: ChannelAnalysis, candidate: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    out = []
    for g in analysis.groups:
        ch = g.channels[candidate[g.channels]]
        if ch.numel():
            out.append((g.id, ch))
    return out


def _group_costs(model: LatencyModel, analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor,
                 candidate: torch.Tensor, previous: dict[int, float]) -> dict[int, float]:
    """Latency saved per channel when a group drops a quarter of its kept candidates (the lowest scores),
    at the current ``keep``: what a channel of that group costs."""
    base = model.predict(keep)
    costs = dict(previous)
    for gid, ch in _candidates_of(analysis, candidate):
        kept = ch[keep[ch]]
        if kept.numel() <= 1:
            kept = ch  # measure the slope from the full group instead
            trial_base = keep.clone()
            trial_base[ch] = True
            ref = model.predict(trial_base)
        else:
            trial_base, ref = keep, base
        r = max(1, kept.numel() // 4)
        drop = kept[torch.topk(score[kept], r, largest=False).indices]
        trial = trial_base.clone()
        trial[drop] = False
        costs[gid] = max(0.0, (ref - model.predict(trial)) / r)
    return costs


def _values(analysis: ChannelAnalysis, score: torch.Tensor, costs: dict[int, float], total: float) -> torch.Tensor:
    """Score per unit of latency; a floor on the cost keeps free channels finite and ranked by score."""
    floor = max(total, 1e-12) * 1e-6
    value = score.clone().float()
    for g in analysis.groups:
        c = costs.get(g.id)
        if c is not None:
            value[g.channels] = score[g.channels].float() / max(c, floor)
    return value


def _floor(analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor, candidate: torch.Tensor,
           own: Mapping[int, float], min_density: float) -> torch.Tensor:
    """Every group (but those with a density of their own) keeps at least ``min_density`` of its candidates,
    best scores first."""
    if min_density <= 0:
        return keep
    keep = keep.clone()
    for gid, ch in _candidates_of(analysis, candidate):
        if gid in own:
            continue
        missing = math.ceil(min_density * ch.numel()) - int(keep[ch].sum())
        if missing > 0:
            dropped = ch[~keep[ch]]
            keep[dropped[torch.topk(score[dropped], min(missing, dropped.numel())).indices]] = True
    return keep


def _select(model: LatencyModel, analysis: ChannelAnalysis, value: torch.Tensor, candidate: torch.Tensor,
            own: Mapping[int, float], align: int | str | None, target: float, score: torch.Tensor,
            min_density: float) -> torch.Tensor:
    """Largest global density over ``value`` whose predicted latency fraction is at most ``target``."""
    fixed = align if isinstance(align, int) else None

    def pick(d: float) -> torch.Tensor:
        keep = select_channels(analysis, value, candidate, d, own, fixed)
        return _floor(analysis, keep, score, candidate, own, min_density)

    dense = model.predict(torch.ones(analysis.num_channels, dtype=torch.bool))
    lo, hi = 0.0, 1.0
    best = pick(1e-9)
    for _ in range(18):
        mid = (lo + hi) / 2
        keep = pick(mid)
        if model.predict(keep) <= target * dense:
            lo, best = mid, keep
        else:
            hi = mid
    if align != "auto":
        return best
    # Aligning only adds channels: step the density down until the aligned selection fits again (aligning
    # inside the bisection would cost a prediction per group and multiple at every step).
    aligned, _ = auto_align(model, analysis, best, score, candidate)
    d = lo
    for _ in range(12):
        if model.predict(aligned) <= target * dense or d <= 1e-6:
            break
        d *= 0.95
        aligned, _ = auto_align(model, analysis, pick(d), score, candidate)
    return aligned


def auto_align(model: LatencyModel, analysis: ChannelAnalysis, keep: torch.Tensor, score: torch.Tensor,
               candidate: torch.Tensor, *, choices: Sequence[int] = ALIGN_CHOICES,
               margin: float = 0.01) -> tuple[torch.Tensor, dict[str, int]]:
    """Round each group's kept count up to the multiple in ``choices`` the latency model predicts fastest.

    Extra channels are the best-scored dropped ones. Predictions within ``margin`` (relative) of the fastest
    count as ties and the larger count wins (more channels for the same time). Returns the new keep vector
    and the chosen multiple per group name.
    """
    keep = keep.clone()
    chosen: dict[str, int] = {}
    for g in analysis.groups:
        ch = g.channels
        cand = ch[candidate[ch]]
        if not cand.numel() or bool(keep[cand].all()):
            continue
        k, total = int(keep[ch].sum()), ch.numel()
        dropped = cand[~keep[cand]]
        order = dropped[torch.argsort(score[dropped].nan_to_num(float("-inf")), descending=True)]
        options = []
        for a in choices:
            want = min(total, max(a, -(-k // a) * a))
            extra = min(want - k, order.numel())
            trial = keep.clone()
            trial[order[:extra]] = True
            options.append((model.predict(trial), k + extra, a, trial))
        fastest = min(o[0] for o in options)
        ms, _, a, trial = max((o for o in options if o[0] <= fastest * (1 + margin)), key=lambda o: o[1])
        keep = trial
        chosen[g.name] = a
    return balance_grouped(analysis, keep, score), chosen


@dataclass
class LatencySelection:
    """What ``select_for_latency`` chose and measured.

    ``measured`` is the thinned model's median over the dense model's median, timed alternately after
    selection; ``predicted`` the latency model's fraction for the same keep vector; ``history`` one entry
    per feedback step (internal target, predicted, measured, medians and spreads).
    """

    keep: torch.Tensor = field(repr=False)
    target: float
    predicted: float
    measured: float
    dense_ms: float
    thinned_ms: float
    tolerance: float
    history: list[dict[str, Any]] = field(default_factory=list)
    build_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    density: float = 1.0

    @property
    def met(self) -> bool:
        return abs(self.measured - self.target) <= self.tolerance

    def target_record(self) -> TargetRecord:
        """For ``graph_record(gm).target``: kind "latency", the target, the measured fraction, the kept
        fraction of candidate channels."""
        return TargetRecord("latency", self.target, self.measured, self.density)


def _next_target(history: list[dict[str, Any]], internal: float, target: float) -> float:
    """The internal (predicted) target for the next step. With two steps whose internal targets differ,
    interpolate (or extrapolate) linearly between the two whose measurements are nearest the target: the
    measured fraction grows with the internal target, near-linearly over a small range. Trusted steps are used
    when there are two; noisy ones still beat no slope at all. With one step, the model was off by
    measured/predicted: scale the internal target by target/measured."""
    good = [h for h in history if not h["noisy"]]
    last = good[-1] if good else history[-1]  # a noisy step is a poor guide when a trusted one exists
    guess = last["internal_target"] * target / last["measured"] if last["measured"] > 0 else internal
    pool = good if len(good) >= 2 else history
    if len(pool) >= 2:
        a, b = sorted(pool, key=lambda h: abs(h["measured"] - target))[:2]
        if abs(a["internal_target"] - b["internal_target"]) > 1e-6 and abs(a["measured"] - b["measured"]) > 1e-6:
            slope = (a["measured"] - b["measured"]) / (a["internal_target"] - b["internal_target"])
            if slope > 0:
                guess = a["internal_target"] + (target - a["measured"]) / slope
    # A flat or noisy slope extrapolates wildly: move at most by a factor of 1.5 from the last aim.
    guess = min(max(guess, history[-1]["internal_target"] / 1.5), history[-1]["internal_target"] * 1.5)
    return min(1.0, max(1e-3, guess))


MEASURE_COPIES = 3  # fresh copies of dense and thinned timed per feedback step (see _default_measure)


def _default_measure(warmup: int, repeat: int, copies: int = MEASURE_COPIES) -> Measure:
    """Dense and thinned timed alternately as ``copies`` fresh copies (``compare_latency_copies``: where a
    model lands in memory moves its latency by more than the tolerance), about ``repeat`` runs in all; the
    pair whose thinned/dense fraction is the median is returned. Measured: a selection trusting one copy's
    0.484 of resnet50's dense latency measured 0.561 afterwards, over five copies."""
    per_copy = max(3, -(-repeat // copies))

    def measure(dense: fx.GraphModule, thinned: fx.GraphModule, inputs: tuple) -> tuple[Latency, Latency]:
        runs = compare_latency_copies([dense, thinned], inputs, copies=copies, warmup=warmup, repeat=per_copy)
        pairs = sorted(zip(*runs, strict=True), key=lambda p: p[1].median_ms / p[0].median_ms if p[0].median_ms > 0
                       else 0.0)
        return pairs[(len(pairs) - 1) // 2]
    return measure


def select_for_latency(gm: fx.GraphModule, analysis: ChannelAnalysis, score: torch.Tensor,
                       candidate: torch.Tensor, own: Mapping[int, float], target: float, inputs: Any, *,
                       align: int | str | None = None, tolerance: float = 0.05, steps: int = 4,
                       model: LatencyModel | None = None, measure: Measure | None = None,
                       timer: Timer | None = None, cache: bool = True, warmup: int = 2,
                       repeat: int = 7, min_density: float = 0.2) -> LatencySelection:
    """Keep vector whose thinned model measures within ``tolerance`` of ``target`` x the dense latency.

    ``score`` / ``candidate`` / ``own`` are those of ``select_channels`` (one entry per channel id; groups
    with their own density keep it). ``inputs`` are the graph's placeholder values (``graph_inputs``).
    ``align``: None, an int (as ``select_channels``), or ``"auto"`` (``auto_align``).

    Each of the ``steps`` feedback steps thins ``gm`` with ``apply_keep``, measures dense and thinned
    alternately (``measure``, default ``compare_latency_copies`` with ``MEASURE_COPIES`` fresh copies of both, about
    ``repeat`` runs in all after ``warmup`` each, the median copy kept; a noisy measurement is repeated once) and moves the internal target from what it measured, until a trusted measurement lands
    within half the tolerance; otherwise the closest step is kept. Every group keeps at least ``min_density``
    of its candidate channels: ranked by score per unit of latency alone, the costliest group (a residual
    stream, summed into every block) would lose nearly all its channels, since normalized scores do not grow
    as a layer empties. Warns ``LatencyWarning`` when the spread of a measurement is wider than the tolerance,
    or when no step landed within it (the closest is returned, with what was measured).
    """
    target = validate_target_latency(target)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1) (e.g. 0.05), got {tolerance!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (feedback measurements) must be an int >= 1, got {steps!r}")
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0 <= min_density <= 1:
        raise ValueError(f"min_density must be a fraction in [0, 1], got {min_density!r}")
    if align is not None and align != "auto" and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be a positive int, 'auto' or None, got {align!r}")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model = model or LatencyModel.build(gm, analysis, inputs, timer=timer, cache=cache)
    measure = measure or _default_measure(warmup, repeat)
    full = torch.ones(analysis.num_channels, dtype=torch.bool)
    dense_pred = model.predict(full)
    internal = target
    best: tuple[tuple[bool, float], torch.Tensor, dict[str, Any]] | None = None
    history: list[dict[str, Any]] = []
    for _ in range(steps):
        costs = _group_costs(model, analysis, full, score, candidate, {})
        keep = _select(model, analysis, _values(analysis, score, costs, dense_pred), candidate, own, align,
                       internal, score, min_density)
        # HALP re-evaluates the costs where the selection landed: a channel costs less in a thinner model.
        costs = _group_costs(model, analysis, keep, score, candidate, costs)
        keep = _select(model, analysis, _values(analysis, score, costs, dense_pred), candidate, own, align,
                       internal, score, min_density)
        keep = balance_grouped(analysis, keep, score)
        predicted = model.predict(keep) / dense_pred
        thinned = apply_keep(gm, analysis, keep, inputs)
        for _attempt in range(2):  # a burst of load on the machine: measure once more before trusting it
            dense_lat, thin_lat = measure(gm, thinned, inputs)
            measured = thin_lat.median_ms / dense_lat.median_ms
            # relative spreads of a ratio add in quadrature
            spread = measured * math.hypot(dense_lat.iqr_ms / dense_lat.median_ms, thin_lat.iqr_ms / thin_lat.median_ms)
            if spread <= tolerance:
                break
        noisy = spread > tolerance
        step = {"internal_target": internal, "predicted": predicted, "measured": measured,
                "dense_ms": dense_lat.median_ms, "thinned_ms": thin_lat.median_ms,
                "dense_iqr_ms": dense_lat.iqr_ms, "thinned_iqr_ms": thin_lat.iqr_ms, "spread": spread,
                "noisy": noisy}
        history.append(step)
        if noisy:
            warnings.warn(
                f"latency timing is too noisy to meet target_latency={target} within +-{tolerance}: dense "
                f"{dense_lat.median_ms:.3f} ms (IQR {dense_lat.iqr_ms:.3f}), thinned {thin_lat.median_ms:.3f} ms "
                f"(IQR {thin_lat.iqr_ms:.3f}), measured fraction {measured:.3f} +- {spread:.3f}. Run on an idle "
                "machine, with fewer threads (torch.set_num_threads) or more repeats.", LatencyWarning,
                stacklevel=2)
        # A trusted measurement inside the band beats any other; otherwise the closest one wins, noisy or not
        # (a trusted step far off the target is no better than a noisy one near it).
        rank = (noisy or abs(measured - target) > tolerance, abs(measured - target))
        if best is None or rank < best[0]:
            best = (rank, keep, step)
        # Stop inside half the tolerance: a step that only just made it would land on the edge of the band
        # as often as not when measured again.
        if not noisy and abs(measured - target) <= tolerance / 2:
            break
        internal = _next_target(history, internal, target)
    assert best is not None
    _, keep, step = best
    measured = step["measured"]
    if abs(measured - target) > tolerance:
        warnings.warn(
            f"target_latency={target} not met within +-{tolerance} after {len(history)} measured step(s): "
            f"closest measured fraction {measured:.3f} (dense {step['dense_ms']:.3f} ms, thinned "
            f"{step['thinned_ms']:.3f} ms); steps: "
            + ", ".join(f"{h['measured']:.3f}" for h in history), LatencyWarning, stacklevel=2)
    cand = int(candidate.sum())
    density = float((keep & candidate).sum()) / cand if cand else 1.0
    return LatencySelection(keep=keep, target=target, predicted=step["predicted"], measured=measured,
                            dense_ms=step["dense_ms"], thinned_ms=step["thinned_ms"], tolerance=tolerance,
                            history=history, build_s=model.build_s, cache_hits=model.cache_hits,
                            cache_misses=model.cache_misses, density=density)

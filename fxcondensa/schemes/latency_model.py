"""The latency model: per-layer timing tables measured on the device (cached on disk), from which it predicts
the latency of a thinned model.

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

The selection that uses it (``select_for_latency``, ``auto_align``) lives in ``latency_select.py``.

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

from ..files.fileio import write_atomic
from ..measure.latency import measure_latency
from ..measure.latency import node_times as _node_times  # build() takes a node_times argument
from ..passes.costs import node_cost
from ..rules.api import ChannelAnalysis, node_shape

__all__ = [
    "LatencyWarning",
    "LayerTable",
    "LatencyModel",
    "validate_target_latency",
    "placeholder_inputs",
    "cache_dir",
    "CACHE_ENV",
]

CACHE_ENV = "FXCONDENSA_CACHE_DIR"
FORMAT = 1
GRID = (0.25, 0.5, 1.0)

Timer = Callable[[nn.Module, torch.Tensor], float]  # (module, input) -> milliseconds


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
    parts = [[n.name, n.op, _target_name(n.target), list(node_shape(n) or [])] for n in gm.graph.nodes]
    parts.append([list(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()

"""Latency: whole-model timing (no_grad, warm-up, median and spread) and per-node timing.

``measure_latency`` times the whole model; ``compare_latency`` times several models alternating run by run;
``deployment_latency`` times one model as deployed several ways (eager, channels_last, ``torch.compile``,
ONNX Runtime when installed) and says which is fastest;
``NodeTimer`` is an ``fx.Interpreter`` that times every node, and ``node_latency`` compares the sum of the
per-node medians with the whole-model median (the interpreter adds Python overhead per node, so the sum is
usually larger).
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.exported import graph_inputs, split_inputs
from ..capture.graph import as_input_tuple, trace
from ..capture.modes import eval_mode

__all__ = ["Latency", "measure_latency", "compare_latency", "compare_latency_copies", "NodeTimer", "NodeLatency", "node_latency",
           "Deployment", "deployment_latency", "BACKENDS"]


@dataclass(frozen=True)
class Latency:
    """Whole-model latency over ``repeat`` timed runs, in milliseconds.

    ``threads`` is ``torch.get_num_threads()`` at measurement time; ``batch_size`` the first input's
    leading dimension.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    warmup: int
    threads: int
    batch_size: int | None
    device: str

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def noisy(self) -> bool:
        """Spread too wide to trust the median: IQR above a quarter of it (a busy or throttling machine)."""
        return self.repeat >= 4 and self.iqr_ms > 0.25 * self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (IQR {self.iqr_ms:.3f}, min {self.min_ms:.3f}, "
                f"max {self.max_ms:.3f}; {self.repeat} runs, {self.threads} threads, "
                f"batch {self.batch_size}, {self.device})")


def _summary(times_ms: list[float], warmup: int, inputs: tuple, device: torch.device) -> Latency:
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    return Latency(
        median_ms=statistics.median(times_ms), q1_ms=q1, q3_ms=q3, min_ms=min(times_ms), max_ms=max(times_ms),
        repeat=len(times_ms), warmup=warmup, threads=torch.get_num_threads(),
        batch_size=int(first.shape[0]) if first is not None and first.dim() > 0 else None, device=str(device),
    )


def _device(inputs: tuple) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _check_counts(warmup: int, repeat: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")


def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 10, repeat: int = 50) -> Latency:
    """Time ``model(*example_inputs)`` in eval mode under ``no_grad``: ``warmup`` untimed runs, then ``repeat``.

    On CUDA each run is timed with CUDA events, after a synchronisation so that earlier work is not billed
    to it; on CPU with ``time.perf_counter``. The model's training flags are restored afterwards.

    Example:
        >>> import torch, fxcondensa
        >>> lat = fxcondensa.measure_latency(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28), repeat=5)
        >>> lat.repeat, lat.batch_size, lat.device
        (5, 1, 'cpu')
    """
    return compare_latency([model], example_inputs, warmup=warmup, repeat=repeat)[0]


def compare_latency(models: Sequence[nn.Module], example_inputs: Any, *, warmup: int = 10,
                    repeat: int = 50) -> list[Latency]:
    """Time several models on the same inputs, alternating run by run, the order changing every round.

    Alternation spreads any drift of the machine (other processes, clock changes) over all models alike,
    so their ratio is fairer than with back-to-back measurements; changing the order (``_round_order``)
    gives every model every predecessor, and the caches it leaves, alike.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.measure.latency import compare_latency
        >>> a, b = compare_latency([fxcondensa.models.LeNet5()] * 2, torch.randn(1, 1, 28, 28), repeat=3)
        >>> a.repeat == b.repeat == 3
        True
    """
    _check_counts(warmup, repeat)
    # Inputs as the models take them: a tensor, positional inputs, or keyword inputs (Hugging Face models).
    args, kwargs = split_inputs(example_inputs)
    inputs, tensors = tuple(args), (*args, *kwargs.values())
    device = _device(tensors)
    calls = [functools.partial(m, **kwargs) if kwargs else m for m in models]
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack:
        stack.enter_context(eval_mode(*models))
        stack.enter_context(torch.no_grad())
        for call in calls:
            for _ in range(warmup):
                call(*inputs)
        for r in range(repeat):
            # The order changes every round: a model that always ran right after a bigger one would always
            # start with the caches that one left behind (measured: a thinned mobilenet_v2 timed right after
            # its dense model, batch 1, read 1.06-1.10x Torch-Pruning's latency; alternated with it alone,
            # 0.96x). A rotation alone keeps each model's predecessor, so the orders are permutations.
            for i in _round_order(len(calls), r):
                times[i].append(_time_once(calls[i], inputs, device))
    return [_summary(t, warmup, tensors, device) for t in times]


def compare_latency_copies(models: Sequence[nn.Module], example_inputs: Any, *, copies: int = 3, warmup: int = 10,
                           repeat: int = 50, fresh: Any = copy.deepcopy) -> list[list[Latency]]:
    """``compare_latency`` over ``copies`` fresh copies of the models (``fresh(model)`` makes one): per model, one
    ``Latency`` per copy. Take the median over copies (of a latency or of a ratio) rather than pooling runs.

    Why copies: where a model's weights and activations land in memory moves its latency by more than the
    differences being measured, and more runs of one copy do not average that out. Measured on this project's
    shared 2-core machine: the same two thinned mobilenet_v2 models (batch 1, 224x224, the dense model in the
    rotation) read 0.87-1.05 of each other over twelve runs in four processes and 0.87-1.00 over ten deep
    copies; one thinned resnet50 (batch 16, 128x128) read 0.516-0.639 of the dense latency over five copies.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.measure.latency import compare_latency_copies
        >>> runs = compare_latency_copies([fxcondensa.models.LeNet5()] * 2, torch.randn(1, 1, 28, 28), copies=2,
        ...                               warmup=1, repeat=3)
        >>> [len(r) for r in runs]
        [2, 2]
    """
    _check_counts(warmup, repeat)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1 (fresh copies of the models to time), got {copies!r}")
    runs: list[list[Latency]] = [[] for _ in models]
    for _ in range(copies):
        timed = [fresh(m) for m in models]
        for per_model, lat in zip(runs, compare_latency(timed, example_inputs, warmup=warmup, repeat=repeat),
                                  strict=True):
            per_model.append(lat)
        del timed  # the next copies are allocated while these are freed, not on top of them
    return runs


def _round_order(n: int, r: int) -> tuple[int, ...]:
    """The order of round ``r`` among ``n`` models: all permutations in turn for up to four models (each
    model then follows each other one equally often over ``n!`` rounds), else a rotation, reversed every
    other round."""
    if n <= 4:
        orders = list(itertools.permutations(range(n)))
        return orders[r % len(orders)]
    order = tuple((r // 2 + k) % n for k in range(n))
    return order[::-1] if r % 2 else order


def _time_once(model: nn.Module, inputs: tuple, device: torch.device) -> float:
    """One run in milliseconds: CUDA events after a synchronisation on CUDA, perf_counter elsewhere.

    On CUDA the events are recorded on the current stream *of the inputs' device*, with that device made
    current for the run: events recorded on another device's stream (the process's current device, often
    cuda:0) would time nothing of the model's work.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record(stream)
            model(*inputs)
            end.record(stream)
            end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    model(*inputs)
    return (time.perf_counter() - t0) * 1e3


class NodeTimer(fx.Interpreter):
    """An interpreter that records how long each node takes, in milliseconds, per run.

    ``times[node.name]`` collects one value per ``run``. On CUDA, nodes are bracketed by events and read
    after the run's final synchronisation, so timing does not serialise the stream node by node more than
    the events themselves do.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.times: dict[str, list[float]] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self._stream: Any = None  # the CUDA stream of the inputs' device during a run on CUDA

    def run(self, *args: Any, **kwargs: Any) -> Any:
        device = _device(args)
        if device.type != "cuda":
            self._stream = None
            return super().run(*args, **kwargs)
        with torch.cuda.device(device):  # events and kernels on the inputs' device, as in _time_once
            self._stream = torch.cuda.current_stream(device)
            torch.cuda.synchronize(device)
            result = super().run(*args, **kwargs)
            torch.cuda.synchronize(device)
        for name, start, end in self._events:
            self.times.setdefault(name, []).append(start.elapsed_time(end))
        self._events.clear()
        return result

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        if self._stream is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            result = super().run_node(n)
            end.record(self._stream)
            self._events.append((n.name, start, end))
            return result
        t0 = time.perf_counter()
        result = super().run_node(n)
        self.times.setdefault(n.name, []).append((time.perf_counter() - t0) * 1e3)
        return result


@dataclass(frozen=True)
class NodeLatency:
    """Median latency per node (ms, by node name), their sum, and the whole-model measurement."""

    per_node_ms: dict[str, float]
    whole: Latency
    sum_ms: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sum_ms", float(sum(self.per_node_ms.values())))

    @property
    def ratio(self) -> float:
        """Sum of per-node medians over the whole-model median (above 1: interpreter overhead)."""
        return self.sum_ms / self.whole.median_ms if self.whole.median_ms > 0 else float("nan")

    def note(self) -> str:
        return (f"per-layer latencies sum to {self.sum_ms:.3f} ms, {self.ratio:.2f}x the whole-model "
                f"median of {self.whole.median_ms:.3f} ms (layers are timed one by one through an fx "
                "Interpreter, which adds Python overhead per node)")


def node_times(gm: fx.GraphModule, inputs: tuple, warmup: int, repeat: int) -> dict[str, float]:
    """Median milliseconds of every node of ``gm`` over ``repeat`` interpreted runs (eval mode, no_grad)."""
    timer = NodeTimer(gm)
    with eval_mode(gm), torch.no_grad():
        for _ in range(warmup):
            timer.run(*inputs)
        timer.times.clear()
        for _ in range(repeat):
            timer.run(*inputs)
    return {name: statistics.median(ts) for name, ts in timer.times.items()}


def node_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 3, repeat: int = 10,
                 whole: Latency | None = None, leaf_modules: Sequence[type[nn.Module]] = (),
                 concrete_args: dict[str, Any] | None = None) -> NodeLatency:
    """Per-node median latency of ``model`` traced to a graph, and the whole graph's own latency.

    ``whole`` is a whole-model measurement made elsewhere (e.g. by ``compare_latency``); without it the
    graph is timed here. A model that is not a ``GraphModule`` is traced with ``leaf_modules`` and
    ``concrete_args`` (as ``fxcondensa.trace`` takes them).

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.measure.latency import node_latency
        >>> lat = node_latency(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28), repeat=3)
        >>> sorted(lat.per_node_ms)[:2]
        ['conv1', 'conv2']
    """
    _check_counts(warmup, repeat)
    gm = (model if isinstance(model, fx.GraphModule) and not leaf_modules and concrete_args is None
          else trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args))
    per_node = node_times(gm, graph_inputs(gm, example_inputs), warmup, repeat)
    if whole is None:
        whole = measure_latency(gm, example_inputs, warmup=warmup, repeat=repeat)
    return NodeLatency(per_node_ms=per_node, whole=whole)


BACKENDS = ("eager", "channels_last", "compile", "onnxruntime")


@dataclass
class Deployment:
    """Latency of one model under several deployment backends (timed alternately), and those skipped with
    the reason (a backend not installed, or one that failed on this model)."""

    latency: dict[str, Latency]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def fastest(self) -> str | None:
        return min(self.latency, key=lambda k: self.latency[k].median_ms) if self.latency else None

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": {k: v.median_ms for k, v in self.latency.items()},
                "iqr_ms": {k: v.iqr_ms for k, v in self.latency.items()}, "fastest": self.fastest,
                "skipped": dict(self.skipped)}

    def note(self) -> str:
        if not self.latency:
            return "deployment: no backend ran (" + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()) + ")"
        some = next(iter(self.latency.values()))
        base = self.latency.get("eager")
        parts = [f"{k} {v.median_ms:.3f} ms" for k, v in self.latency.items()]
        best = self.fastest
        assert best is not None
        text = (f"deployment (batch {some.batch_size}, {some.threads} threads, {some.device}): " + ", ".join(parts)
                + f"; fastest: {best}")
        if base is not None and best != "eager":
            text += f" ({base.median_ms / self.latency[best].median_ms:.2f}x eager)"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text


class _ChannelsLast(nn.Module):
    """The model in channels_last, fed NCHW inputs converted on the way in (what a caller with ordinary
    tensors gets; the conversion is part of the time)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, *args: Any) -> Any:
        return self.model(*(a.contiguous(memory_format=torch.channels_last)
                            if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args))


class _OnnxRuntime(nn.Module):
    """An ONNX Runtime session behind a module call (CPU provider, as many intra-op threads as torch)."""

    def __init__(self, path: str):
        super().__init__()
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def forward(self, *args: Any) -> Any:
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(self.session.get_inputs(), args, strict=False)}
        return self.session.run(None, feeds)


def _backend(name: str, model: nn.Module, inputs: tuple, tmp: str) -> nn.Module:
    work = copy.deepcopy(model).eval()
    if name == "eager":
        return work
    if name == "channels_last":
        return _ChannelsLast(work)
    if name == "compile":
        compiled = torch.compile(work)
        with torch.no_grad():
            compiled(*inputs)  # compile now, not inside the warm-up of the timed loop
        return compiled
    if name == "onnxruntime":
        from ..files import export

        path = os.path.join(tmp, "model.onnx")
        export.onnx(work, path, inputs if len(inputs) != 1 else inputs[0], overwrite=True, dynamic=False)
        return _OnnxRuntime(path)
    raise ValueError(f"unknown deployment backend {name!r}: choose among {BACKENDS}")


def deployment_latency(model: nn.Module, example_inputs: Any, *, backends: Sequence[str] = BACKENDS,
                       warmup: int = 3, repeat: int = 10) -> Deployment:
    """Time ``model`` deployed each way in ``backends``, alternating run by run, and name the fastest.

    ``eager``: the module as it is; ``channels_last``: weights and 4-d inputs in channels_last (the input
    conversion is timed); ``compile``: ``torch.compile`` (compiled before timing); ``onnxruntime``: exported
    with ``fxcondensa.files.export.onnx`` (static shapes) and run by ONNX Runtime's CPU provider. CPU inputs only
    for ``onnxruntime``. A backend that is not installed or fails on the model is skipped, with the reason
    in ``skipped``. ``model`` is not changed (each backend gets a copy).

    Example:
        >>> import torch, fxcondensa
        >>> d = deployment_latency(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28),
        ...                        backends=("eager", "channels_last"), warmup=1, repeat=3)
        >>> list(d.latency), d.fastest, d.skipped["channels_last"][:36]  # LeNet-5 calls x.view(n, -1)
        (['eager'], 'eager', 'failed: RuntimeError: view size is n')
    """
    _check_counts(warmup, repeat)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown deployment backend {b!r}: choose among {BACKENDS}")
    inputs = as_input_tuple(example_inputs)
    built: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fxcondensa-deploy-") as tmp:
        for name in backends:
            if name == "onnxruntime" and _device(inputs).type != "cpu":
                skipped[name] = "CPU inputs only"
                continue
            try:
                runnable = _backend(name, model, inputs, tmp)
                with torch.no_grad():
                    runnable(*inputs)  # a backend that cannot run the model fails here, not in the timed loop
                built[name] = runnable
            except ImportError as exc:
                skipped[name] = f"not installed: {exc}"
            except Exception as exc:  # noqa: BLE001 - a backend failing on a model is a result, not a crash
                skipped[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        timed = compare_latency(list(built.values()), inputs, warmup=warmup, repeat=repeat) if built else []
    return Deployment(latency=dict(zip(built, timed, strict=True)), skipped=skipped)

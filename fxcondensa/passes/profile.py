"""Profiling: per-node MACs and parameter counts from shape metadata, and latency, whole-model and per node.

What is counted (one number per node, ``NodeCost.macs``, called MACs throughout):

- **conv** (1d/2d/3d, any ``groups``, module or ``F.conv*``): ``output elements x in_channels/groups x kernel
  elements``, i.e. multiply-accumulates; bias adds are not counted. LeNet-5's conv1 on 1x1x28x28:
  ``20*24*24 * 1*5*5 = 288000``.
- **conv-transpose**: ``input elements x out_channels/groups x kernel elements`` (each input pixel is
  scattered through the kernel).
- **linear** (module or ``F.linear``): ``output elements x in_features``.
- **matmul / mm / bmm / addmm / baddbmm / @**: ``output elements x the contracted dimension``.
- **norm** (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm): one per output element
  (an inference-time norm is one scale-and-shift per element; the statistics of Layer/Group norms are not
  counted separately).
- **pool**: max/avg/LP pooling ``output elements x kernel elements``; adaptive pooling ``input elements``.
- **elementwise** (activations, softmax, add/mul/sub/div, ...): one per output element.
- **shape** ops (view, reshape, flatten, cat, getitem, permute, dropout, identity, ...): zero.
- anything else (``kind == "other"``, e.g. an opaque leaf module or ``einsum``): zero; it is listed so that a
  reader sees what was not counted.

Parameters are attributed to the node that uses them first: a ``call_module`` node gets its module's
parameters, a ``call_function`` node the parameters it reads through ``get_attr`` nodes.

Latency: ``measure_latency`` times the whole model (no_grad, warm-up, median and spread); ``NodeTimer`` is an
``fx.Interpreter`` that times every node, and ``node_latency`` compares the sum of the per-node medians with
the whole-model median (the interpreter adds Python overhead per node, so the sum is usually larger).
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..graph import as_input_tuple, trace

__all__ = [
    "NodeCost",
    "profile_costs",
    "Latency",
    "measure_latency",
    "compare_latency",
    "NodeTimer",
    "NodeLatency",
    "node_latency",
    "layer_name",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = tuple(t for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
                          nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                          nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.LPPool1d, nn.LPPool2d)
_ADAPTIVE_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus,
                        nn.Softmax, nn.LogSoftmax, nn.Softsign, nn.Tanhshrink, nn.Threshold)
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)

_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)
_CONV_T_FNS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_MATMUL_FNS = (torch.matmul, torch.mm, torch.bmm, operator.matmul)
_ADDMM_FNS = (torch.addmm, torch.baddbmm, torch.addbmm)
_NORM_FNS = (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm,
             *((F.rms_norm,) if hasattr(F, "rms_norm") else ()))
_POOL_FNS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.lp_pool1d, F.lp_pool2d)
_ADAPTIVE_POOL_FNS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                      F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
_ELEMENTWISE_FNS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.clamp, torch.pow, torch.where, torch.softmax,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
    F.elu, F.selu, F.mish, F.softplus, F.softmax, F.log_softmax, F.prelu,
)
_SHAPE_FNS = (
    operator.getitem, torch.flatten, torch.reshape, torch.cat, torch.stack, torch.chunk, torch.split,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.narrow, F.dropout, F.pixel_shuffle,
    getattr,
)
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "log", "sqrt",
                        "rsqrt", "abs", "clamp", "pow", "softmax", "log_softmax", "add_", "mul_", "relu_",
                        "sigmoid_", "float", "half", "to", "type_as", "masked_fill"}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "size", "dim", "chunk",
                  "split", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "narrow", "unbind",
                  "view_as", "reshape_as", "t"}


@dataclass(frozen=True)
class NodeCost:
    """What one node of a traced graph computes and holds.

    ``layer`` is the module's qualified name for ``call_module`` nodes (what thinning keeps) and the node
    name otherwise; ``nonzero_params`` counts the non-zero values of ``params`` (density after pruning).
    """

    name: str
    layer: str
    op: str
    type: str
    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...] | None
    params: int
    nonzero_params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shapes"] = [list(s) for s in self.input_shapes]
        d["output_shape"] = None if self.output_shape is None else list(self.output_shape)
        return d


def _shape(arg: Any) -> tuple[int, ...] | None:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    return tuple(int(s) for s in meta.shape) if isinstance(meta, TensorMetadata) else None


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _kernel_numel(kernel: Any, dims: int) -> int:
    if isinstance(kernel, int):
        return kernel ** dims
    return math.prod(int(k) for k in kernel)


def layer_name(node: fx.Node) -> str:
    """The name a report shows for a node: a module's qualified name, else the node's name."""
    return str(node.target) if node.op == "call_module" else node.name


def _type_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _module_cost(mod: nn.Module, ins: list, out: tuple[int, ...] | None) -> tuple[str, int]:
    """(kind, MACs) of a call_module node."""
    if isinstance(mod, _CONV):
        return "conv", _numel(out) * math.prod(mod.weight.shape[1:])
    if isinstance(mod, _CONV_T):
        return "conv_transpose", _numel(ins[0]) * math.prod(mod.weight.shape[1:])
    if isinstance(mod, nn.Linear):
        return "linear", _numel(out) * mod.in_features
    if isinstance(mod, _NORM):
        return "norm", _numel(out)
    if isinstance(mod, _POOL):
        return "pool", _numel(out) * _kernel_numel(mod.kernel_size, len(out or ()) - 2 if out else 0)
    if isinstance(mod, _ADAPTIVE_POOL):
        return "pool", _numel(ins[0])
    if isinstance(mod, _ELEMENTWISE_MODULES):
        return "elementwise", _numel(out)
    if isinstance(mod, _SHAPE_MODULES):
        return "shape", 0
    return "other", 0


def _function_cost(node: fx.Node, ins: list, out: tuple[int, ...] | None) -> tuple[str, int]:
    """(kind, MACs) of a call_function or call_method node, from argument shapes."""
    f = node.target
    if node.op == "call_method":
        if f in ("matmul", "mm", "bmm", "__matmul__"):
            a = ins[0]
            return "matmul", _numel(out) * (a[-1] if a else 0)
        if f in _ELEMENTWISE_METHODS:
            return "elementwise", _numel(out)
        return ("shape", 0) if f in _SHAPE_METHODS else ("other", 0)
    if f in _CONV_FNS:
        w = _shape(_arg(node, 1, "weight"))
        return "conv", _numel(out) * math.prod(w[1:]) if w else 0
    if f in _CONV_T_FNS:
        w = _shape(_arg(node, 1, "weight"))
        return "conv_transpose", _numel(ins[0]) * math.prod(w[1:]) if w else 0
    if f is F.linear:
        w = _shape(_arg(node, 1, "weight"))
        return "linear", _numel(out) * w[-1] if w else 0
    if f in _MATMUL_FNS or f in _ADDMM_FNS:
        a = ins[1] if f in _ADDMM_FNS else ins[0]
        return "matmul", _numel(out) * (a[-1] if a else 0)
    if f in _NORM_FNS:
        return "norm", _numel(out)
    if f in _POOL_FNS:
        dims = len(out) - 2 if out else 0
        return "pool", _numel(out) * _kernel_numel(_arg(node, 1, "kernel_size", 1), dims)
    if f in _ADAPTIVE_POOL_FNS:
        return "pool", _numel(ins[0])
    if f in _ELEMENTWISE_FNS:
        return "elementwise", _numel(out)
    return ("shape", 0) if f in _SHAPE_FNS else ("other", 0)


def _graph_module(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """A GraphModule with shape metadata: traced from the model when example inputs are given."""
    if example_inputs is not None:
        return trace(model, example_inputs)
    if isinstance(model, fx.GraphModule) and any("tensor_meta" in n.meta for n in model.graph.nodes
                                                 if n.op == "placeholder"):
        return model
    raise ValueError(f"profiling {type(model).__name__} needs shapes: pass example_inputs "
                     "(e.g. torch.randn(1, 3, 224, 224)) or a GraphModule from fxcondensa.trace(model, inputs)")


def profile_costs(model: nn.Module, example_inputs: Any = None) -> list[NodeCost]:
    """MACs and parameters of every computing node (not placeholders, get_attr or output), in graph order.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.profile import profile_costs
        >>> costs = profile_costs(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> [(c.layer, c.macs, c.params) for c in costs if c.kind == "conv"]
        [('conv1', 288000, 520), ('conv2', 1600000, 25050)]
    """
    gm = _graph_module(model, example_inputs)
    seen: set[int] = set()  # ids of parameters already attributed (shared modules count once)

    def take(params: Sequence[torch.Tensor]) -> tuple[int, int]:
        total = nonzero = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                nonzero += int(p.count_nonzero())
        return total, nonzero

    costs: list[NodeCost] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        inputs = [a for a in node.all_input_nodes]
        ins = [_shape(a) for a in inputs]
        out = _shape(node)
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind, macs = _module_cost(mod, ins, out)
            params = take(list(mod.parameters()))
        else:
            kind, macs = _function_cost(node, ins, out)
            attrs = [_fetch(gm, a.target) for a in inputs if a.op == "get_attr"]
            params = take([t for t in attrs if isinstance(t, nn.Parameter)])
        costs.append(NodeCost(
            name=node.name, layer=layer_name(node), op=node.op, type=_type_name(gm, node), kind=kind,
            input_shapes=tuple(s for s in ins if s is not None), output_shape=out,
            params=params[0], nonzero_params=params[1], macs=int(macs),
        ))
    return costs


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------- latency

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


class _EvalMode:
    """Put a module in eval mode for a while and restore every submodule's training flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.modes = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for name, m in self.model.named_modules():
            m.training = self.modes[name]


def measure_latency(model: nn.Module, example_inputs: Any, warmup: int = 10, repeat: int = 50) -> Latency:
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


def compare_latency(models: Sequence[nn.Module], example_inputs: Any, warmup: int = 10,
                    repeat: int = 50) -> list[Latency]:
    """Time several models on the same inputs, alternating run by run (A, B, A, B, ...).

    Alternation spreads any drift of the machine (other processes, clock changes) over all models alike,
    so their ratio is fairer than with back-to-back measurements.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.profile import compare_latency
        >>> a, b = compare_latency([fxcondensa.models.LeNet5()] * 2, torch.randn(1, 1, 28, 28), repeat=3)
        >>> a.repeat == b.repeat == 3
        True
    """
    _check_counts(warmup, repeat)
    inputs = as_input_tuple(example_inputs)
    device = _device(inputs)
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack:
        for m in models:
            stack.enter_context(_EvalMode(m))
        stack.enter_context(torch.no_grad())
        for m in models:
            for _ in range(warmup):
                m(*inputs)
        for _ in range(repeat):
            for i, m in enumerate(models):
                times[i].append(_time_once(m, inputs, device))
    return [_summary(t, warmup, inputs, device) for t in times]


def _time_once(model: nn.Module, inputs: tuple, device: torch.device) -> float:
    """One run in milliseconds: CUDA events after a synchronisation on CUDA, perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        model(*inputs)
        end.record()
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
        self._cuda = False

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._cuda = _device(args).type == "cuda"
        if self._cuda:
            torch.cuda.synchronize()
        result = super().run(*args, **kwargs)
        if self._cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.times.setdefault(name, []).append(start.elapsed_time(end))
            self._events.clear()
        return result

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = super().run_node(n)
            end.record()
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


def node_latency(model: nn.Module, example_inputs: Any, warmup: int = 3, repeat: int = 10,
                 whole: Latency | None = None) -> NodeLatency:
    """Per-node median latency of ``model`` traced to a graph, and the whole graph's own latency.

    ``whole`` is a whole-model measurement made elsewhere (e.g. by ``compare_latency``); without it the
    graph is timed here.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.profile import node_latency
        >>> lat = node_latency(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28), repeat=3)
        >>> sorted(lat.per_node_ms)[:2]
        ['conv1', 'conv2']
    """
    _check_counts(warmup, repeat)
    inputs = as_input_tuple(example_inputs)
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    timer = NodeTimer(gm)
    with _EvalMode(gm), torch.no_grad():
        for _ in range(warmup):
            timer.run(*inputs)
        timer.times.clear()
        for _ in range(repeat):
            timer.run(*inputs)
    per_node = {name: statistics.median(ts) for name, ts in timer.times.items()}
    if whole is None:
        whole = measure_latency(gm, inputs, warmup=warmup, repeat=repeat)
    return NodeLatency(per_node_ms=per_node, whole=whole)

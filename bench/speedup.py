"""Does thinning pay? Dense vs thinned latency, side by side, with the FLOP ratio and the efficiency.

For each model and ``StructurePrune`` density the model is thinned once (``fxcondensa.thin``, checked), and
the dense, the thinned and (when ``torch-pruning`` is installed) a torch-pruning model pruned to the same
FLOP ratio are timed in one run, alternating run by run (``compare_latency``), eval mode, ``no_grad``;
medians are reported. Rows:

- ``speedup``    = dense median / thinned median
- ``flop_ratio`` = dense MACs / thinned MACs (``profile_costs``, same input resolution as the row)
- ``efficiency`` = speedup / flop_ratio (1.0: the latency falls exactly as the FLOPs do)

torch-pruning: ``MagnitudePruner`` (L2 magnitude, ``global_pruning=True``, final classifier ignored), its
``pruning_ratio`` found by bisection so that its FLOP ratio matches ours.

Goal (issue 7): efficiency >= 0.95 at the throughput batch for the conv nets, LeNet-5 >= 2.17x at batch 256,
and our thinned latency at or below torch-pruning's.

    python bench/speedup.py                                   # the full CPU table
    python bench/speedup.py --quick                           # short smoke run of every code path
    python bench/speedup.py --models resnet18 --densities 0.5 --align 8 --channels-last
    python bench/speedup.py --device cuda --amp bf16          # CUDA events, bf16 autocast
    python bench/speedup.py --models resnet18 --densities 0.5 --deploy   # + eager / channels_last / compile / ORT
    python bench/speedup.py --models resnet18 --target-latency 0.5       # latency-target rows (batch 16, 128x128)
    python bench/speedup.py --models resnet50 --align auto               # align="auto" from the latency model
    python bench/speedup.py --models mobilenet_v2 --copies 5             # 5 fresh copies per row, median ratio

``--deploy`` also times each thinned model under every deployment backend of
``fxcondensa.measure.latency.deployment_latency`` (eager, channels_last, torch.compile, ONNX Runtime when installed),
alternating, and names the fastest. ``--target-latency F`` runs ``StructurePrune(target_latency=F)`` and then
measures the thinned model against the dense one again, alternating: ``measured_after`` is the fraction the
issue asks for. ``--align auto`` thins once per row, with the row's batch and resolution as the example
inputs (the latency model is measured at the shape the model will run at). Every row records the load average.

On CPU the throughput rows of the torchvision conv nets use ``--thr-size`` (128 by default) to keep the run
short on a small machine; batch-1 rows and vit_b_32 (fixed 224) use 224. The resolution is in every row.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxcondensa
from fxcondensa.capture.graph import trace
from fxcondensa.capture.records import thin_record
from fxcondensa.measure.latency import NodeTimer, compare_latency_copies, deployment_latency
from fxcondensa.passes.costs import profile_costs
from fxcondensa.schemes import StructurePrune

try:
    import torch_pruning as tp
except ImportError:  # the bench extra is optional
    tp = None

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["lenet5", "resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "vit_b_32"]
DENSITIES = [0.7, 0.5, 0.3]
CONV_NETS = {"resnet18", "resnet50", "mobilenet_v2", "vgg11_bn"}
GOAL_EFFICIENCY, GOAL_LENET = 0.95, 2.17
# Environment variables that change how CPU timings come out through the C allocator; recorded with every run.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")

__all__ = ["bench_model", "run", "main"]


# ----------------------------------------------------------------------------------------------- models

def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(model in eval mode with seeded random weights, input shape without the batch dim)."""
    torch.manual_seed(0)
    if name == "lenet5":
        return fxcondensa.models.LeNet5().eval(), (1, 28, 28)
    return torchvision.models.get_model(name, weights=None).eval(), (3, 224, 224)


def densities_for(name: str, densities: list[float]) -> list[float]:
    return [0.3] if name == "lenet5" else densities  # LeNet-5: the tutorial's FLOP scheme only


def throughput_batch(name: str, batch: int | None) -> int:
    return batch if batch else (256 if name == "lenet5" else 32)


def resolution(name: str, shape: tuple[int, ...], batch: int, thr_batch: int, thr_size: int) -> tuple[int, ...]:
    """Input shape (no batch dim) of a row: conv nets' throughput rows may run at a smaller resolution."""
    if name in CONV_NETS and batch == thr_batch and thr_size and batch > 1:
        return (shape[0], thr_size, thr_size)
    return shape


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return sum(c.macs for c in profile_costs(model, x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ torch-pruning

def _tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    work = copy.deepcopy(model)
    ignored: list[nn.Module] = [m for m in work.modules() if isinstance(m, nn.Linear)][-1:]
    if isinstance(work, torchvision.models.VisionTransformer):
        # Prune what ours prunes in a ViT: the MLP hidden dims. The embedding dim runs through LayerNorms
        # and the attention, which fxcondensa freezes; ignore every layer that writes it.
        ignored += [work.conv_proj, *(m for m in work.modules() if isinstance(m, nn.MultiheadAttention))]
        ignored += [blk.mlp[3] for blk in work.encoder.layers]
    pruner = tp.pruner.MagnitudePruner(work, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.95,
                                       ignored_layers=ignored)
    pruner.step()
    return work.eval()


def tp_match(model: nn.Module, x: torch.Tensor, target_ratio: float, dense_macs: int,
             steps: int = 9) -> tuple[nn.Module, float, float] | None:
    """torch-pruning's model whose FLOP ratio is closest to ``target_ratio``: (model, pruning_ratio, ratio)."""
    if tp is None:
        return None
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            pruned = _tp_prune(model, x, mid)
            r = dense_macs / macs(pruned, x)
        except Exception as e:  # noqa: BLE001 — a peer failing on a model is a result, not a crash
            print(f"  torch-pruning failed at ratio {mid:.3f}: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        if best is None or abs(r - target_ratio) < abs(best[2] - target_ratio):
            best = (pruned, mid, r)
        if abs(r - target_ratio) / target_ratio < 0.01:
            break
        lo, hi = (mid, hi) if r < target_ratio else (lo, mid)
    return best


# -------------------------------------------------------------------------------------------- measuring

class Autocast(nn.Module):
    """Run the wrapped model under ``torch.autocast`` (bf16 / fp16 on CUDA or CPU)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.model, self.dtype, self.device_type = model, dtype, device_type

    def forward(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args)


def prepare(model: nn.Module, device: torch.device, channels_last: bool, amp: str | None,
            compile_: bool) -> nn.Module:
    """The model as it is timed: on the device, memory format, autocast, torch.compile, same for all."""
    model = copy.deepcopy(model).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if amp:
        model = Autocast(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp], device.type)
    if compile_:
        model = torch.compile(model)
    return model


def timed_copies(contenders: dict[str, nn.Module], x: torch.Tensor, copies: int, prepare_: Any, *, warmup: int,
                 repeat: int) -> dict[str, list[Any]]:
    """``compare_latency_copies`` with ``prepare_`` making each fresh copy: a list of ``Latency`` per
    contender, one per copy."""
    runs = compare_latency_copies(list(contenders.values()), x, copies=copies, warmup=warmup, repeat=repeat,
                                  fresh=prepare_)
    return dict(zip(contenders, runs, strict=True))


def median_latency(lats: list[Any]) -> Any:
    """One ``Latency`` for several copies: the copy with the median ``median_ms`` (the copy itself when one)."""
    return sorted(lats, key=lambda lat: lat.median_ms)[(len(lats) - 1) // 2]


def copy_ratios(num: list[Any], den: list[Any]) -> list[float]:
    """Per copy, ``num``'s median latency over ``den``'s (two lists of ``Latency``, one per fresh copy)."""
    return [a.median_ms / b.median_ms for a, b in zip(num, den, strict=True)]


def median_ci(values: list[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the median of ``values`` (percentile method, seeded: the same values give the same
    interval). With per-copy ratios it says whether a median below 1 is more than the copies' scatter."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return meds[tail], meds[resamples - 1 - tail]


def _input(shape: tuple[int, ...], batch: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def thinned_variants(model: nn.Module, density: float, align: int | str | None, batches: list[int],
                     shapes: dict[int, tuple[int, ...]], x1: torch.Tensor) -> list[tuple[nn.Module, str | None, float, list[int]]]:
    """The thinned models one density's rows time: ``(thinned, via, thin seconds, the batches it is timed at)``.

    A fixed ``align`` thins once for every row. ``align="auto"`` thins once per row, with that row's input as
    the example inputs, as a user deploying at that batch and resolution would: its latency model is measured
    at the shapes it will run at (counts that are fast at batch 32 and 128x128 need not be at batch 1 and
    224x224).
    """
    variants: list[tuple[nn.Module, str | None, float, list[int]]] = []
    if align != "auto":
        t0 = time.perf_counter()
        thinned = fxcondensa.thin(model, StructurePrune(density, align=align), x1, check=True, output="graph")
        return [(thinned, None, time.perf_counter() - t0, list(batches))]
    for b in batches:
        t0 = time.perf_counter()
        xb = _input(shapes[b], b, torch.device("cpu"), False)
        thinned = fxcondensa.thin(model, StructurePrune(density, align="auto"), xb, check=True,
                                   output="graph")
        variants.append((thinned, f"latency model at {'x'.join(map(str, xb.shape))}", time.perf_counter() - t0, [b]))
    return variants


def latency_target_row(name: str, target: float, *, batch: int = 16, size: int = 128, warmup: int = 3,
                       repeat: int = 11, device: str = "cpu", dtype: str | None = None,
                       channels_last: bool = False, copies: int = 1, log: Any = print) -> dict[str, Any]:
    """``StructurePrune(target_latency=target)`` on ``name`` at (batch, 3, size, size), then measured again.

    ``measured_at_selection`` is what the selection's last feedback step measured; ``measured_after`` a fresh
    alternating measurement of the thinned model against the dense one (the number that counts), the median
    over ``copies`` fresh copies of both (``timed_copies``). ``dtype``
    ("bf16" / "fp16") casts the model and inputs (the latency model is measured in that dtype: no autocast);
    ``channels_last`` puts models and inputs in channels_last for every measurement after selection.
    """
    model, shape = build(name)
    dev = torch.device(device)
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}[dtype]
    model = model.to(device=dev, dtype=cast)
    x = torch.randn(batch, shape[0], size, size, device=dev, dtype=cast)

    def layout(m: nn.Module) -> nn.Module:
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def fresh(m: nn.Module) -> nn.Module:
        return layout(copy.deepcopy(m))

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    thinned = fxcondensa.thin(model, StructurePrune(target_latency=target), x, output="graph")
    rec = thin_record(thinned)
    record: dict[str, Any] = {}
    if rec is not None and rec.target is not None:
        record = {"measured_at_selection": rec.target.reached, "density": rec.target.density}
    total_s = time.perf_counter() - t0
    xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    runs = timed_copies({"dense": model, "thinned": thinned}, xs, copies, fresh, warmup=warmup,
                        repeat=max(repeat, 7))
    dense, thin_ = median_latency(runs["dense"]), median_latency(runs["thinned"])
    fractions = copy_ratios(runs["thinned"], runs["dense"])
    row = {"model": name, "target_latency": target, "batch": batch, "input": [batch, shape[0], size, size],
           "device": str(dev), "dtype": str(cast), "channels_last": channels_last, "threads": torch.get_num_threads(), "select_s": total_s,
           "dense_ms": dense.median_ms, "thinned_ms": thin_.median_ms, "dense_iqr_ms": dense.iqr_ms,
           "thinned_iqr_ms": thin_.iqr_ms, "measured_after": statistics.median(fractions), "copies": copies,
           **({"measured_after_copies": fractions} if copies > 1 else {}),
           "macs_fraction": macs(thinned, x[:1]) / macs(model, x[:1]), "load_before": list(load_before),
           "load_after": list(os.getloadavg()), **record}
    row["goal"] = "met" if 0.45 <= row["measured_after"] <= 0.55 else f"missed: {row['measured_after']:.3f}"
    log(f"  {name} target_latency={target} b={batch} {size}x{size}: measured after {row['measured_after']:.3f} "
        f"(at selection {row.get('measured_at_selection', float('nan')):.3f}), MACs {row['macs_fraction']:.3f}, "
        f"total {total_s:.1f} s, load {load_before[0]:.1f}"
        f"{', ' + dtype if dtype else ''}{', channels_last' if channels_last else ''}")
    return row


def bench_model(name: str, densities: list[float], *, batches: list[int] | None = None, thr_size: int = 128,
                align: int | str | None = None, deploy: bool = False, device: str = "cpu", amp: str | list[str | None] | None = None,
                channels_last: bool = False, compile_: bool = False, warmup: int = 3, repeat: int = 10,
                torch_pruning: bool = True, layers: bool = False, tp_steps: int = 9, copies: int = 1,
                control: bool = False, log: Any = print, on_row: Any = None) -> list[dict[str, Any]]:
    """Rows (dicts) for one model: every density x batch, dense / thinned / torch-pruning side by side.

    ``copies`` > 1 times that many fresh copies of the contenders, one ``compare_latency`` run each (see
    ``timed_copies``); the ratios are then medians of the per-copy ratios. ``control`` adds a second fresh
    copy of torch-pruning's model to the rotation: ``control_over_tp`` (the same median of per-copy ratios)
    is what the measurement reads between two identical models, the resolution of ``ours_over_tp``.

    ``on_row(row)`` is called as soon as each row is measured (the command line rewrites its JSON there, so
    that a time limit keeps every finished row).
    """
    dev = torch.device(device)
    amps = amp if isinstance(amp, list) else [amp]
    channels_last = channels_last and name != "lenet5"  # its x.view(n, -1) needs contiguous NCHW
    model, shape = build(name)
    thr = throughput_batch(name, None)
    batches = batches or [1, thr]
    thr = max(batches)
    x1 = torch.randn(1, *shape)
    # Shapes the FLOP ratio is computed at, one per distinct row resolution.
    shapes = {b: resolution(name, shape, b, thr, thr_size if dev.type == "cpu" else 0) for b in batches}
    dense_macs = {s: macs(model, torch.randn(1, *s)) for s in set(shapes.values())}
    rows = []
    for density in densities_for(name, densities):
        for variant in thinned_variants(model, density, align, batches, shapes, x1):
            thinned, via, thin_s, row_batches = variant
            ours_macs = {s: macs(thinned, torch.randn(1, *s)) for s in {shapes[b] for b in row_batches}}
            peer: dict[tuple[int, ...], Any] = {}
            if torch_pruning and tp is not None:
                for s in ours_macs:  # one match per resolution (the fc term makes the ratio resolution-dependent)
                    xs = torch.randn(1, *s)
                    peer[s] = tp_match(model, xs, dense_macs[s] / ours_macs[s], dense_macs[s], tp_steps)
            for b in row_batches:
                s = shapes[b]
                x = _input(s, b, dev, channels_last)
                for amp in amps:
                    contenders = {"dense": model, "thinned": thinned}
                    if peer.get(s) is not None:
                        contenders["torch_pruning"] = peer[s][0]
                        if control:
                            contenders["control"] = peer[s][0]  # timed from its own fresh copies
                    runs = timed_copies(contenders, x, copies, lambda m, amp=amp: prepare(m, dev, channels_last, amp, compile_),
                                        warmup=warmup, repeat=repeat)
                    lat = {k: median_latency(v) for k, v in runs.items()}
                    flop_ratio = dense_macs[s] / ours_macs[s]
                    speedups = copy_ratios(runs["dense"], runs["thinned"])
                    speedup = statistics.median(speedups)
                    row: dict[str, Any] = {
                        "model": name, "density": density, "align": align, "batch": b, "resolution": list(s[1:]),
                        "input": [b, *s], "device": str(dev), "amp": amp, "channels_last": channels_last,
                        "compile": compile_, "threads": torch.get_num_threads(), "repeat": repeat, "warmup": warmup,
                        "copies": copies,
                        "dense_ms": lat["dense"].median_ms, "thinned_ms": lat["thinned"].median_ms,
                        "dense_iqr_ms": lat["dense"].iqr_ms, "thinned_iqr_ms": lat["thinned"].iqr_ms,
                        "noisy": lat["dense"].noisy or lat["thinned"].noisy,
                        "speedup": speedup, "dense_macs": dense_macs[s], "thinned_macs": ours_macs[s],
                        "flop_ratio": flop_ratio, "efficiency": speedup / flop_ratio,
                        "params_dense": n_params(model), "params_thinned": n_params(thinned), "thin_s": thin_s,
                        "tp_ms": None, "tp_speedup": None, "tp_flop_ratio": None, "tp_efficiency": None,
                        "tp_pruning_ratio": None, "ours_over_tp": None, "load": list(os.getloadavg()),
                    }
                    if via is not None:
                        row["align_via"] = via
                    if "torch_pruning" in lat:
                        _, ratio, tp_flops = peer[s]
                        t = lat["torch_pruning"].median_ms
                        per_copy = copy_ratios(runs["thinned"], runs["torch_pruning"])
                        row.update(tp_ms=t, tp_speedup=row["dense_ms"] / t, tp_flop_ratio=tp_flops,
                                   tp_efficiency=row["dense_ms"] / t / tp_flops, tp_pruning_ratio=ratio,
                                   ours_over_tp=statistics.median(per_copy), tp_iqr_ms=lat["torch_pruning"].iqr_ms)
                        if copies > 1:
                            row["ours_over_tp_copies"] = per_copy
                            row["ours_over_tp_ci95"] = median_ci(per_copy)
                    if "control" in lat:
                        same = copy_ratios(runs["control"], runs["torch_pruning"])
                        row.update(control_ms=lat["control"].median_ms, control_over_tp=statistics.median(same))
                        if copies > 1:
                            row["control_over_tp_copies"] = same
                            row["control_over_tp_ci95"] = median_ci(same)
                    if copies > 1:
                        row["speedup_copies"] = speedups
                    if deploy:
                        dep = deployment_latency(thinned, x, warmup=warmup, repeat=repeat)
                        row["deploy"] = dep.to_dict()
                        log(f"    {dep.note()}")
                    if layers and dev.type == "cpu" and not (channels_last or amp or compile_):
                        row["layers"] = layer_breakdown(model, thinned, x, repeat=max(3, repeat // 2))
                    row["goal"] = goal(row, thr)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    log(f"  {name} d={density} b={b} {amp or 'fp32'} {'x'.join(map(str, s[1:]))}: dense {row['dense_ms']:.2f} ms, "
                        f"thinned {row['thinned_ms']:.2f} ms, x{speedup:.2f} at FLOPs /{flop_ratio:.2f}, "
                        f"eff {row['efficiency']:.2f}" + (f", tp {row['tp_ms']:.2f} ms" if row["tp_ms"] else "")
                        + (f", ours/tp {row['ours_over_tp']:.3f}" if row["ours_over_tp"] else "")
                        + (f", control/tp {row['control_over_tp']:.3f}" if "control_over_tp" in row else ""))
    return rows


def layer_breakdown(dense: nn.Module, thinned: nn.Module, x: torch.Tensor, warmup: int = 1,
                    repeat: int = 5) -> dict[str, Any]:
    """Per-node latency of dense vs thinned (fx Interpreter, alternating), beside each node's MAC ratio.

    ``layer_efficiency`` = (dense ms / thinned ms) / (dense MACs / thinned MACs) per conv / linear node;
    ``by_kind`` sums the medians per kind (conv, norm, elementwise, pool, ...), which shows where the time
    that did not shrink with the FLOPs goes.
    """
    gms = [trace(dense, x[:1]), thinned]
    costs = [{c.name: c for c in profile_costs(g, x)} for g in gms]
    timers = [NodeTimer(g) for g in gms]
    with torch.no_grad():
        for i in range(warmup + repeat):
            for t in timers:
                if i == warmup:
                    t.times.clear()
                t.run(x)
    med = [{k: statistics.median(v) for k, v in t.times.items()} for t in timers]
    nodes, by_kind = [], {}
    for name, cd in costs[0].items():
        ct = costs[1].get(name)
        if ct is None or name not in med[0] or name not in med[1]:
            continue
        k = by_kind.setdefault(cd.kind, {"dense_ms": 0.0, "thinned_ms": 0.0, "dense_macs": 0, "thinned_macs": 0})
        k["dense_ms"] += med[0][name]
        k["thinned_ms"] += med[1][name]
        k["dense_macs"] += cd.macs
        k["thinned_macs"] += ct.macs
        if cd.kind in ("conv", "linear") and ct.macs:
            sp = med[0][name] / med[1][name]
            fr = cd.macs / ct.macs
            nodes.append({"node": name, "kind": cd.kind, "dense_in": list(cd.input_shapes[0]),
                          "thinned_in": list(ct.input_shapes[0]), "dense_out": list(cd.output_shape or ()),
                          "thinned_out": list(ct.output_shape or ()), "dense_ms": med[0][name],
                          "thinned_ms": med[1][name], "flop_ratio": fr, "layer_efficiency": sp / fr,
                          "dense_gmacs": cd.macs / med[0][name] / 1e6, "thinned_gmacs": ct.macs / med[1][name] / 1e6})
    return {"nodes": nodes, "by_kind": by_kind}


def goal(row: dict[str, Any], thr_batch: int) -> str | None:
    """'met' / 'missed: why' for rows a goal applies to, None otherwise: issue 7's speed-up and efficiency at
    the throughput batch, issue 14's "no slower than torch-pruning at equal MACs" at every batch."""
    throughput = row["batch"] == thr_batch and row["batch"] > 1
    if row["ours_over_tp"] is None and not (throughput and (row["model"] in CONV_NETS or row["model"] == "lenet5")):
        return None
    why = []
    if throughput and row["model"] == "lenet5" and row["speedup"] < GOAL_LENET:
        why.append(f"speedup {row['speedup']:.2f} < {GOAL_LENET}")
    if throughput and row["model"] in CONV_NETS and row["efficiency"] < GOAL_EFFICIENCY:
        why.append(f"efficiency {row['efficiency']:.2f} < {GOAL_EFFICIENCY}")
    if row["ours_over_tp"] is not None and row["ours_over_tp"] > 1.0:
        why.append(f"slower than torch-pruning (x{row['ours_over_tp']:.3f})")
    return "missed: " + "; ".join(why) if why else "met"


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def config(r: dict[str, Any]) -> str:
        parts = [f"align {r['align']}" if r["align"] else "", r["amp"] or "", "channels_last" * r["channels_last"],
                 "compile" * r["compile"]]
        return ", ".join(p for p in parts if p) or "fp32"

    body = [[r["model"], config(r), r["density"], r["batch"], "x".join(map(str, r["resolution"])), f(r["dense_ms"], ".2f"),
             f(r["thinned_ms"], ".2f"), f(r["speedup"], ".2f"), f(r["flop_ratio"], ".2f"), f(r["efficiency"], ".2f"),
             f(r["tp_ms"], ".2f"), f(r["tp_flop_ratio"], ".2f"), f(r["ours_over_tp"], ".2f"),
             (r["goal"] or "") + (" (noisy)" if r["noisy"] else "")] for r in rows]
    return tabulate(body, headers=["model", "config", "density", "batch", "res", "dense ms", "thinned ms", "speedup",
                                   "FLOP ratio", "efficiency", "tp ms", "tp FLOP ratio", "ours/tp", "goal"],
                    tablefmt="github")


def latency_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    body = [[r["model"], r["target_latency"], "x".join(map(str, r["input"])), f(r["dense_ms"], ".1f"),
             f(r["thinned_ms"], ".1f"), f(r["measured_after"], ".3f"), f(r.get("measured_at_selection"), ".3f"),
             f(r["macs_fraction"], ".3f"), f(r["select_s"], ".1f"),
             f(r["load_before"][0], ".1f"), r["goal"]] for r in rows]
    return tabulate(body, headers=["model", "target", "input", "dense ms", "thinned ms", "measured after",
                                   "at selection", "MAC fraction", "total s", "load", "goal"],
                    tablefmt="github")


TP_MISSING = ("torch-pruning is not installed: the tp_* columns stay empty. Install the bench extra "
              "(pip install 'fxcondensa[bench]') or pass --no-torch-pruning")


def run(args: argparse.Namespace, log: Any = print, out: Path | None = None) -> dict[str, Any]:
    """All rows of the command line's models; with ``out``, the JSON is rewritten after every row."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu_settings: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        # What a GPU user runs with: cuDNN picks its fastest kernels per shape (dense and thinned shapes
        # differ, so each gets its own), and float32 matmuls may use TF32. Recorded with the rows.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        gpu_settings = {"cudnn_benchmark": True, "tf32": True}
    warmup, repeat = (1, 3) if args.quick else (args.warmup, args.repeat)
    models = args.models or (["lenet5", "resnet18", "mobilenet_v2", "vit_b_32"] if args.quick else MODELS)
    densities = args.densities or ([0.5] if args.quick else DENSITIES)
    rows: list[dict[str, Any]] = []
    warnings_: list[str] = []
    if tp is None and not args.no_torch_pruning:
        warnings_.append(TP_MISSING)
        print(f"\n{'!' * 100}\nWARNING: {TP_MISSING}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    result = {"command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(args.device),
              "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", None), **gpu_settings,
              "warnings": warnings_, "rows": rows}

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        on_row_done(result, out)

    if args.target_latency:
        for name in models:
            for target in args.target_latency:
                amp = next((a for a in args.amp if a != "fp32"), None)
                row = latency_target_row(name, target, batch=args.batch or 16, size=args.thr_size, warmup=warmup,
                                         repeat=repeat, device=args.device, dtype=amp,
                                         channels_last=args.channels_last, copies=args.copies, log=log)
                rows.append(row)
                on_row_done(result, out)
        return result
    for name in models:
        for align in args.align or [None]:
            log(f"{name}" + (f" align={align}:" if align else ":"))
            batches = [1, throughput_batch(name, args.batch)]
            batches = batches[1:] if args.throughput_only else batches[:1] if args.latency_only else batches
            bench_model(name, densities, batches=batches,
                        thr_size=args.thr_size, align=align or None, deploy=args.deploy, device=args.device,
                        amp=[None if a == "fp32" else a for a in args.amp], tp_steps=args.tp_steps,
                        channels_last=args.channels_last, compile_=args.compile, warmup=warmup,
                        repeat=repeat, torch_pruning=not args.no_torch_pruning, layers=args.layers, log=log,
                        copies=args.copies, control=args.control, on_row=on_row)
    return result


def on_row_done(result: dict[str, Any], out: Path | None) -> None:
    if out is not None:  # partial results survive a time limit
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)  # a kill mid-write leaves the previous JSON whole


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    # How the C allocator was tuned: glibc's default returns large freed blocks to the OS, so every CPU forward
    # page-faults its activations afresh, and how often depends on what the process freed before (BENCHMARKS.md).
    allocator = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    info["allocator"] = allocator or "default"
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _align_arg(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--densities", nargs="+", type=float, help="StructurePrune densities (default 0.7 0.5 0.3)")
    p.add_argument("--batch", type=int, help="throughput batch (default 256 for LeNet-5, 32 for the others)")
    p.add_argument("--thr-size", type=int, default=None,
                   help="resolution of the conv nets' throughput rows (default 128 on CPU, 224 on CUDA)")
    p.add_argument("--align", type=_align_arg, nargs="+",
                   help="StructurePrune(align=N): kept channels rounded up to multiples of N; several values "
                        "(0 = none, auto = the latency model's choice) give one set of rows each, for an align study")
    p.add_argument("--deploy", action="store_true",
                   help="also time each thinned model eager / channels_last / torch.compile / ONNX Runtime")
    p.add_argument("--target-latency", type=float, nargs="+",
                   help="latency-target rows instead: StructurePrune(target_latency=F), measured afterwards "
                        "(batch --batch or 16, --thr-size resolution)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile dense, thinned and torch-pruning alike")
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA-event timing)")
    p.add_argument("--amp", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                   help="autocast dtype(s); several give one row each on the same thinned models (default fp32)")
    p.add_argument("--tp-steps", type=int, default=9, help="bisection steps of the torch-pruning FLOP match")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1 on CPU: on a shared machine more threads time the neighbours)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--copies", type=int, default=1,
                   help="time this many fresh copies of the contenders, one alternating run each; ratios are the "
                        "median of the per-copy ratios (where weights land moves a batch-1 forward by several %%)")
    p.add_argument("--throughput-only", action="store_true", help="skip the batch-1 rows")
    p.add_argument("--latency-only", action="store_true", help="only the batch-1 rows")
    p.add_argument("--control", action="store_true",
                   help="also time a second fresh copy of torch-pruning's model in the rotation: control_over_tp is "
                        "how far two identical models read apart in the same run (the noise floor of ours_over_tp)")
    p.add_argument("--layers", action="store_true",
                   help="per-layer dense vs thinned latency (fx Interpreter) in each row's JSON (CPU, plain fp32)")
    p.add_argument("--quick", action="store_true", help="short run: few models, density 0.5, 3 repeats")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the torch-pruning comparison")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/speedup.json, latency_target.json with --target-latency; in $OUT/ if set)")
    args = p.parse_args(argv)
    if args.throughput_only and args.latency_only:
        p.error("--throughput-only and --latency-only together leave no rows: give one of them")
    if args.control and args.no_torch_pruning:
        p.error("--control times torch-pruning's model twice: it cannot go with --no-torch-pruning")
    if args.copies < 1:
        p.error(f"--copies {args.copies}: give 1 or more fresh copies to time")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.thr_size is None:
        args.thr_size = 128 if args.device == "cpu" else 224
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    log = functools.partial(print, flush=True)  # unbuffered progress, also through a pipe
    name = "latency_target.json" if args.target_latency else "speedup.json"  # one results file per measure
    out = args.out or (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else RESULTS / name)
    result = run(args, log=log, out=out)
    print(latency_table(result["rows"]) if args.target_latency else table(result["rows"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"JSON: {out}")
    missed = [r for r in result["rows"] if (r["goal"] or "").startswith("missed")]
    if missed:
        print(f"{len(missed)} row(s) below goal:", *(f"  {r['model']} d={r.get('density')} b={r['batch']}: {r['goal']}"
                                                   for r in missed), sep="\n")


if __name__ == "__main__":
    main()

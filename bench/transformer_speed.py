"""CPU latency of thinned transformers: dense vs fxcondensa-thinned vs Torch-Pruning at equal MACs.

Models: torchvision ``vit_b_32`` (224 x 224) and a BERT-base-sized encoder (Hugging Face
``BertForSequenceClassification``, 12 layers, width 768, 12 heads, sequence length 128), random weights.
The thinned model is ``fxcondensa.thin(model, StructurePrune(density, attention=...))`` (exact: ``thin`` checks
it; ``--attention head_dim`` or ``both`` prunes columns inside the heads, keeping the dense softmax scale);
Torch-Pruning's model is pruned with ``MetaPruner`` (L2 magnitude, heads and widths) at the largest ratio
whose MACs do not exceed the thinned model's (a bisection over the ratio). MACs are counted by the same
cost model for all three (``fxcondensa.passes.costs.profile_costs``). The machine is shared: the load
average before and after each model is recorded with the timings.

Run: ``python bench/transformer_speed.py --models vit_b_32 --out bench/results/transformer_speed_vit_b_32.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxcondensa
from fxcondensa.measure.latency import compare_latency
from fxcondensa.passes.costs import profile_costs
from fxcondensa.schemes import StructurePrune


def build(name: str, batch: int, seq: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    if name == "vit_b_32":
        import torchvision

        return torchvision.models.vit_b_32().eval(), (torch.randn(batch, 3, 224, 224),)
    if name == "bert_base":
        import transformers

        cfg = transformers.BertConfig(num_labels=2)  # BERT-base: 12 x 768, 12 heads, 3072 MLP
        model = transformers.BertForSequenceClassification(cfg).eval()
        return model, (torch.randint(0, cfg.vocab_size, (batch, seq)),)
    raise ValueError(f"unknown model {name!r}: choose vit_b_32 or bert_base")


def macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    return sum(c.macs for c in profile_costs(model, inputs))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latencies_ms(models: dict[str, Callable[..., Any]], inputs: tuple[torch.Tensor, ...], warmup: int,
                 repeat: int) -> dict[str, dict[str, float]]:
    """Median and IQR per model from ``fxcondensa.measure.latency.compare_latency``: the runs interleaved, one of each
    in turn and in a new order every round, so that a change of load on the shared machine, or the caches
    one model leaves to the next, hit every contender alike."""
    timed = compare_latency(list(models.values()), inputs, warmup=warmup, repeat=repeat)
    return {k: {"median_ms": t.median_ms, "iqr_ms": t.iqr_ms, "runs": t.repeat} for k, t in zip(models, timed,
                                                                                               strict=True)}


# ---------------------------------------------------------------------------------------- Torch-Pruning

def _tp_vit(model: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float) -> nn.Module:
    """Torch-Pruning's own handling of ``nn.MultiheadAttention`` (its default: the embedding width, with the
    in-projection, shrinks; the head count stays, so head_dim shrinks). Given ``num_heads`` it prunes no
    stream channel of this model at all (measured: 59.9M parameters at ratio 0.5, MLP hidden only)."""
    import torch_pruning as tp

    work = copy.deepcopy(model)
    heads = next(m.num_heads for m in work.modules() if isinstance(m, nn.MultiheadAttention))
    # round_to: the width must stay a multiple of the head count, which Torch-Pruning keeps
    pruner = tp.pruner.MetaPruner(work, inputs[0], importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[work.heads], round_to=heads)
    pruner.step()
    for m in work.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
            m.head_dim = m.embed_dim // m.num_heads
    work.hidden_dim = work.conv_proj.out_channels
    return work


def _tp_bert(model: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float) -> nn.Module:
    import torch_pruning as tp

    work = copy.deepcopy(model)
    heads = {}
    for m in work.modules():
        if hasattr(m, "num_attention_heads") and hasattr(m, "query"):
            for lin in (m.query, m.key, m.value):
                heads[lin] = m.num_attention_heads
    pruner = tp.pruner.MetaPruner(work, inputs[0], importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[work.classifier], num_heads=heads,
                                  prune_num_heads=True, head_pruning_ratio=ratio, prune_head_dims=False,
                                  global_pruning=False)
    pruner.step()
    for m in work.modules():
        if hasattr(m, "num_attention_heads") and hasattr(m, "query"):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return work


def tp_match(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], budget: int,
             steps: int) -> tuple[nn.Module, float, int]:
    """Torch-Pruning's model at the largest ratio (of ``steps`` bisection steps) with MACs <= ``budget``."""
    prune = _tp_vit if name == "vit_b_32" else _tp_bert
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = prune(model, inputs, mid)
        m = macs(candidate, inputs)
        if m <= budget:
            hi, best = mid, (candidate, mid, m)
        else:
            lo = mid
    if best is None:
        candidate = prune(model, inputs, hi)
        best = (candidate, hi, macs(candidate, inputs))
    return best


def run(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    model, inputs = build(name, args.batch, args.seq)
    row: dict[str, Any] = {"model": name, "batch": args.batch, "seq": args.seq if name == "bert_base" else None,
                           "density": args.density, "align": args.align, "attention": args.attention,
                           "load_before": os.getloadavg()}
    t = time.perf_counter()
    small = fxcondensa.thin(model, StructurePrune(args.density, align=args.align, attention=args.attention), inputs,
                            output="graph")
    row["thin_s"] = time.perf_counter() - t
    row.update(dense_params=n_params(model), thinned_params=n_params(small),
               dense_macs=macs(model, inputs), thinned_macs=macs(small, inputs))
    log(f"{name}: params {row['dense_params']} -> {row['thinned_params']}, MACs {row['dense_macs']} -> "
        f"{row['thinned_macs']} (thin {row['thin_s']:.0f} s)")
    contenders: dict[str, Callable[..., Any]] = {"dense": model, "thinned": small}
    if not args.no_torch_pruning:
        try:
            peer, ratio, peer_macs = tp_match(name, model, inputs, row["thinned_macs"], args.tp_steps)
            contenders["torch_pruning"] = peer
            row.update(tp_ratio=ratio, tp_macs=peer_macs, tp_params=n_params(peer))
            log(f"{name}: Torch-Pruning ratio {ratio:.3f}, MACs {peer_macs}, params {row['tp_params']}")
        except Exception as exc:  # recorded, not hidden: the row says why there is no Torch-Pruning timing
            row["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"{name}: Torch-Pruning failed: {row['tp_error']}")
    for key, lat in latencies_ms(contenders, inputs, args.warmup, args.repeat).items():
        row[key] = lat
        log(f"{name}: {key} {lat['median_ms']:.1f} ms (IQR {lat['iqr_ms']:.1f})")
    row["speedup"] = row["dense"]["median_ms"] / row["thinned"]["median_ms"]
    if "torch_pruning" in row:
        row["thinned_over_tp"] = row["thinned"]["median_ms"] / row["torch_pruning"]["median_ms"]
    row["load_after"] = os.getloadavg()
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_b_32", "bert_base"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--align", type=int, default=None, help="StructurePrune's align (kept counts a multiple of it)")
    p.add_argument("--attention", default=None, choices=["heads", "head_dim", "both", "keep"],
                   help="StructurePrune's attention option (default None: whole heads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--tp-steps", type=int, default=5)
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(run(name, args, lambda s: print(s, flush=True)))
    result = {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(), "rows": rows}
    text = json.dumps(result, indent=1, default=str)
    if args.out is not None:  # atomic: a reader never sees half a file
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.replace(f.name, args.out)
    print(text)


if __name__ == "__main__":
    main()

"""Mixture-of-experts models thinned: parameter ratio, ``thin`` time and exactness of Mixtral and Qwen2-MoE
(transformers, small random configurations) with half of each layer's experts removed (``ExpertPrune(0.5)``),
half of their channels (``StructurePrune(0.5)``) and both (``Compose([ExpertPrune(0.5), StructurePrune(0.5)])``).

Configurations: hidden 32, 1 layer, 4 experts of width 48 (the tests' size), and hidden 64, 2 layers, 8
experts of width 128; 4 heads, top-2 routing, vocabulary 64, a sequence of 8 tokens, float32. ``exact`` is
the largest difference of the thinned model's logits from the compressed model's on a fresh input (``thin``
checks the example input itself). Times are wall-clock seconds of one ``thin`` call after a warm-up run.

Run: ``python bench/moe.py [--out bench/results/moe.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import Compose, ExpertPrune, StructurePrune

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"small": dict(hidden_size=32, num_hidden_layers=1, inner=48, experts=4),
         "medium": dict(hidden_size=64, num_hidden_layers=2, inner=128, experts=8)}
SCHEMES = {"StructurePrune(0.5)": lambda: StructurePrune(0.5), "ExpertPrune(0.5)": lambda: ExpertPrune(0.5),
           "ExpertPrune(0.5) + StructurePrune(0.5)": lambda: Compose([ExpertPrune(0.5), StructurePrune(0.5)])}


def build(kind: str, size: str) -> nn.Module:
    import transformers

    s = SIZES[size]
    common = dict(vocab_size=64, max_position_embeddings=32, hidden_size=s["hidden_size"],
                  num_hidden_layers=s["num_hidden_layers"], num_attention_heads=4, num_key_value_heads=4,
                  num_experts_per_tok=2)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=s["inner"], num_local_experts=s["experts"]))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, intermediate_size=s["inner"], moe_intermediate_size=s["inner"],
            shared_expert_intermediate_size=s["inner"], num_experts=s["experts"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights, norms included, so no zero is accidental
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tokens(seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(seed))}


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(kind: str, size: str, name: str) -> dict:
    model, x = build(kind, size), tokens(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxcondensa.thin(model, SCHEMES[name](), x)  # warm-up: imports, first capture
        start = time.perf_counter()
        small = fxcondensa.thin(model, SCHEMES[name](), x)
        seconds = time.perf_counter() - start
        compressed = fxcondensa.compress(model, SCHEMES[name](), x)
    with torch.no_grad():
        fresh = tokens(1)
        diff = float((small(**fresh).logits - compressed(**fresh).logits).abs().max())
    record = thin_record(small)
    return {"model": kind, "size": size, "scheme": name, "params_dense": params(model),
            "params_thinned": params(small), "ratio": round(params(model) / params(small), 3),
            "thin_s": round(seconds, 2), "max_abs_diff_vs_compressed": diff, "returns": record.returns,
            "experts_kept": {k: len(v) for k, v in record.experts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "moe.json", help="JSON file")
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        for kind in ("mixtral", "qwen2-moe"):
            for name in SCHEMES:
                row = run(kind, size, name)
                rows.append(row)
                print(f"{kind:10s} {size:7s} {name:40s} {row['params_dense']:>7d} -> {row['params_thinned']:>7d} "
                      f"{row['ratio']:5.2f}x  thin {row['thin_s']:5.2f}s  diff {row['max_abs_diff_vs_compressed']:.2e}"
                      f"  {row['returns']}", flush=True)
    data = {"machine": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, args.out)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main()

"""Thinning and int8 together: dense fp32, thinned fp32, dense int8 and thinned int8, on CPU.

For resnet50, vit_b_16 (torchvision) and a BERT-base-sized encoder (``transformers.BertModel`` with
``BertConfig()``'s sizes: 12 layers, hidden 768, 110M parameters) at sequence length 128, every model has random
weights (norm affines, biases and BatchNorm statistics randomised too), and:

- **thinned**: ``fxcondensa.thin(model, StructurePrune(density), x)`` (checked against the compressed model);
- **int8**: ``fxcondensa.compression.int8.quantize_int8(model, mode=...)``: Linear weights in int8 through torchao,
  convolutions, norms and embeddings left float32 (the choice ``fxcondensa.compression.int8`` documents). resnet50 has one
  Linear layer (its classifier); vit_b_16's attention projections live in ``nn.MultiheadAttention``, which reads
  its weights directly, so they stay float32 too: its MLP layers and head become int8.

Columns:

- ``file MB``: the ``torch.export`` program (``.pt2``, written and checked by ``fxcondensa.files.export.torch_export``:
  reloaded and compared with the model's own outputs, rtol 1e-4, atol 1e-5), the deployable file that keeps
  the int8 values; ``param MB``: the parameters in their storage dtypes (int8 values plus float scales);
- ``x smaller``: dense fp32 file size / this file size;
- ``int8 error``: max |int8 output - float output| / max |float output| of the same (dense or thinned) model on
  one input: what int8 rounding costs in outputs (random weights: no accuracy to measure);
- ``batch B ms``: median latency over ``--repeat`` runs, the four variants alternating run by run
  (``compare_latency``), eval mode, no_grad, ``--threads`` threads. Every run records the load average: a
  loaded machine (load above half the cores) makes the timings unreliable, and the table says so.

Hugging Face models are captured by ``torch.export``, specialised to the example shapes: the thinned encoder is
thinned again at every batch size timed (the same channels are kept: StructurePrune scores weights only).

    python bench/int8.py                            # the full table: 3 models, batch 1 and 16
    python bench/int8.py --quick                    # every code path on small models, in a few minutes
    python bench/int8.py --no-latency               # file sizes only (deterministic: any machine will do)
    python bench/int8.py --models bert --modes weight_only dynamic --threads 4
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxcondensa
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.compression.int8 import int8_candidates, quantize_int8
from fxcondensa.measure.latency import compare_latency
from fxcondensa.passes.storage import stored_bytes
from fxcondensa.schemes import StructurePrune

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["resnet50", "vit_b_16", "bert"]
VARIANTS = ["dense fp32", "thinned fp32", "dense int8", "thinned int8"]
MB = 1e6


def _randomize() -> Callable[[nn.Module], None]:
    """bench/coverage.py's randomize_constants, loaded by path (a package named coverage may be imported)."""
    spec = importlib.util.spec_from_file_location("fxcondensa_bench_coverage", Path(__file__).with_name("coverage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.randomize_constants


def build(name: str, quick: bool) -> tuple[nn.Module, Callable[[int], Any], str]:
    """(model in eval mode with random weights, batch -> example inputs, what the input is)."""
    import torchvision

    if name == "resnet50":
        if quick:  # resnet50's bottleneck blocks, one per stage
            model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
        else:
            model = torchvision.models.resnet50(weights=None)
        size = 64 if quick else 224
        make = functools.partial(_images, size=size)
        what = f"image {size}x{size}"
    elif name == "vit_b_16":
        if quick:  # the same architecture, small: 2 layers, width 64, 32x32 images
            model = torchvision.models.VisionTransformer(32, 16, 2, 4, 64, 128)
            size = 32
        else:
            model, size = torchvision.models.vit_b_16(weights=None), 224
        make = functools.partial(_images, size=size)
        what = f"image {size}x{size}"
    elif name == "bert":
        import transformers

        sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                 "vocab_size": 1000} if quick else {}
        config = transformers.BertConfig(**sizes)  # BertConfig() is bert-base: 12 x 768, 3072, vocab 30522
        model = transformers.BertModel(config, add_pooling_layer=False)
        seq = 32 if quick else 128
        make = functools.partial(_tokens, seq=seq, vocab=config.vocab_size)
        what = f"tokens {seq}"
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    torch.manual_seed(0)
    _randomize()(model)
    return model.eval(), make, what


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _tokens(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _call(model: nn.Module, x: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return flatten_outputs(out)


def _rel_error(a: nn.Module, b: nn.Module, x: Any) -> float:
    ya, yb = _call(a, x)[0].float(), _call(b, x)[0].float()
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))


def _param_bytes(model: nn.Module) -> int:
    return sum(stored_bytes(p) for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())


def _file_bytes(model: nn.Module, x: Any, folder: str, name: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StaticShapeWarning for captured graphs: sizes do not depend on it
        path = fxcondensa.files.export.torch_export(model, Path(folder) / f"{name}.pt2", x)
    size = path.stat().st_size
    path.unlink()
    return size


def variants(dense: nn.Module, x: Any, density: float, mode: str) -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        thinned = fxcondensa.thin(dense, StructurePrune(density), x, output="graph")
    return {"dense fp32": dense, "thinned fp32": thinned, "dense int8": quantize_int8(dense, mode=mode),
            "thinned int8": quantize_int8(thinned, mode=mode)}


def bench_model(name: str, *, density: float, mode: str, batches: list[int], quick: bool, latency: bool,
                warmup: int, repeat: int, log: Any = print) -> dict[str, Any]:
    dense, make, what = build(name, quick)
    x1 = make(1)
    models = variants(dense, x1, density, mode)
    names, left = int8_candidates(models["thinned fp32"])
    row: dict[str, Any] = {"model": name, "input": what, "density": density, "mode": mode,
                           "int8_weights": len(names), "left_float": len(left), "variants": {}}
    with tempfile.TemporaryDirectory() as folder:
        for v, m in models.items():
            log(f"  {name} {v}: export")
            row["variants"][v] = {"params": sum(p.numel() for p in m.parameters()),
                                  "param_bytes": _param_bytes(m), "file_bytes": _file_bytes(m, x1, folder, v.replace(" ", "_"))}
    row["int8_error_dense"] = _rel_error(models["dense fp32"], models["dense int8"], x1)
    row["int8_error_thinned"] = _rel_error(models["thinned fp32"], models["thinned int8"], x1)
    row["latency"] = {}
    if latency:
        captured = isinstance(x1, dict)  # captured graphs are specialised to their example shapes
        for batch in batches:
            x = make(batch)
            timed = variants(dense, x, density, mode) if captured and batch != 1 else models
            log(f"  {name} batch {batch}: timing")
            load = os.getloadavg()[0]
            lats = compare_latency(list(timed.values()), x, warmup=warmup, repeat=repeat)
            row["latency"][str(batch)] = {v: lat.median_ms for v, lat in zip(timed, lats, strict=True)}
            row["latency"][str(batch)]["load"] = max(load, os.getloadavg()[0])
    return row


def size_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        base = r["variants"]["dense fp32"]["file_bytes"]
        for v in VARIANTS:
            d = r["variants"][v]
            err = "" if "fp32" in v else f"{r['int8_error_' + v.split()[0]]:.4f}"
            lines.append([r["model"], r["input"], r["mode"] if "int8" in v else "", v, f"{d['params'] / 1e6:.2f}M", f"{d['param_bytes'] / MB:.1f}",
                          f"{d['file_bytes'] / MB:.1f}", f"{base / d['file_bytes']:.2f}x", err])
    return tabulate(lines, headers=["model", "input", "int8 mode", "variant", "params", "param MB", "file MB", "x smaller",
                                    "int8 error"], tablefmt="github", disable_numparse=True)


def latency_table(rows: list[dict[str, Any]], cores: int) -> str:
    lines = []
    for r in rows:
        for batch, lat in r["latency"].items():
            loaded = lat["load"] > cores / 2
            lines.append([r["model"], r["mode"], batch, *(f"{lat[v]:.2f}" for v in VARIANTS),
                          f"{lat['dense fp32'] / lat['thinned int8']:.2f}x",
                          f"{lat['load']:.1f}" + (" (loaded: unreliable)" if loaded else "")])
    return tabulate(lines, headers=["model", "int8 mode", "batch", *(f"{v} ms" for v in VARIANTS), "dense fp32 / thinned int8",
                                    "load avg"], tablefmt="github", disable_numparse=True)


def machine() -> dict[str, Any]:
    import torchao

    return {"platform": platform.platform(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchao": torchao.__version__, "date": datetime.date.today().isoformat()}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--density", type=float, default=0.5, help="StructurePrune density (default 0.5)")
    p.add_argument("--modes", nargs="+", choices=["weight_only", "dynamic"], default=["dynamic"],
                   help="int8 modes of quantize_int8 (default dynamic: int8 weights and activations)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--no-latency", action="store_true", help="file sizes and int8 error only")
    p.add_argument("--quick", action="store_true", help="small models, 2 repeats: every code path, fast")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/int8.json, or $OUT/int8.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeat = 1, 2
    if not 0 < args.density <= 1:
        p.error(f"--density {args.density}: give a fraction in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = functools.partial(print, flush=True)
    out = args.out or (Path(os.environ["OUT"]) / "int8.json" if os.environ.get("OUT") else
                       RESULTS / ("int8_quick.json" if args.quick else "int8.json"))
    result: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    for mode in args.modes:
        for name in args.models:
            log(f"{name} ({mode})")
            result["rows"].append(bench_model(name, density=args.density, mode=mode, batches=args.batches,
                                              quick=args.quick, latency=not args.no_latency, warmup=args.warmup,
                                              repeat=args.repeat, log=log))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, out)  # partial results survive a time limit, whole
    print(size_table(result["rows"]))
    if not args.no_latency:
        print()
        print(latency_table(result["rows"], os.cpu_count() or 1))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()

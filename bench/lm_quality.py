"""Language-model quality after structured thinning: held-out perplexity of a small Llama trained here.

The model: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (grouped-query attention, RMSNorm, rotary
embeddings), a byte-level vocabulary of 256, random initialisation, trained by this script with AdamW on
the **source of Python's standard library** (the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``,
test packages and ``site-packages`` excluded). The split is by file: a file whose path (relative to the
standard library) has a SHA-1 digest divisible by 10 is held out, every other file is training text. The
trained weights are cached (``--cache-dir``; keyed by every training argument and the corpus digest), so
only the first run trains.

Reported, as held-out perplexity (``exp`` of the mean next-token cross-entropy over ``--eval-windows`` fixed
windows of the held-out text):

- the dense model;
- thinned with ``fxcondensa.thin(model, StructurePrune(density, criteria=..., calibration=...), x)`` at about
  20% and 50% of the parameters removed (the density found by secant steps on the thinned parameter count), by
  each criterion: ``magnitude`` (the weights-only default), ``activation`` (the default given calibration) and
  ``taylor`` (calibration batches: ``--calibration-batches`` random training windows), no recovery;
- Torch-Pruning's magnitude pruning (``MetaPruner`` with ``MagnitudeImportance``, heads pruned whole,
  the output layer ignored, as its LLM example does) at the same parameter count (ratio found by bisection;
  its dependency search runs with the rotary embedding switched off, see ``_rotary_off``);
- the pruned models of ``--recover-criteria`` (default: ``activation``) recovered with ``FineTune`` and with
  ``Distill`` (from the dense model) at the same budget of training tokens (``--recover-steps`` minibatches
  of ``--batch`` windows), each with its own default schedule (``FineTune``: a cosine from lr 0.05;
  ``Distill``: a 10% warm-up to 0.15, then a cosine), each ``--seeds`` times (the seed orders the
  minibatches), the mean reported.

Run: ``python bench/lm_quality.py`` (defaults: a 0.85M-parameter model, 1200 AdamW steps of 16 x 64 bytes;
one thread), or ``--quick`` for a smaller model and budget. Prints a table and writes ``bench/results/lm_quality.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxcondensa  # noqa: E402
from fxcondensa.files.fileio import save_atomic  # noqa: E402
from fxcondensa.opt import Distill, FineTune  # noqa: E402
from fxcondensa.opt.training import TensorBatches  # noqa: E402
from fxcondensa.schemes import StructurePrune  # noqa: E402

DEFAULTS = dict(hidden=128, layers=4, intermediate=384, heads=4, kv_heads=2, seq=64, batch=16, train_steps=1200,
                eval_windows=128, recover_steps=50, calibration_batches=8, corpus_mb=8.0)
QUICK = dict(hidden=96, layers=2, intermediate=256, heads=4, kv_heads=2, seq=64, batch=16, train_steps=400,
             eval_windows=32, recover_steps=30, calibration_batches=4, corpus_mb=3.0)


# ------------------------------------------------------------------------------------------------ corpus

def corpus(limit_mb: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(training bytes, held-out bytes, a description) from the standard library's Python source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not ({"test", "tests", "site-packages", "idle_test"} & set(p.relative_to(stdlib).parts)))
    train, held = bytearray(), bytearray()
    n_train = n_held = 0
    limit = int(limit_mb * 2**20)
    for p in files:
        rel = str(p.relative_to(stdlib))
        data = p.read_bytes() + b"\n"
        if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0:
            if len(held) < limit // 9:
                held += data
                n_held += 1
        elif len(train) < limit:
            train += data
            n_train += 1
    digest = hashlib.sha256(bytes(train) + bytes(held)).hexdigest()[:16]
    desc = {"source": f"Python {sys.version.split()[0]} standard library .py files (tests excluded)",
            "split": "held out: sha1(relative path) % 10 == 0", "train_files": n_train, "held_out_files": n_held,
            "train_bytes": len(train), "held_out_bytes": len(held), "digest": digest}
    as_tensor = lambda b: torch.frombuffer(bytes(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held), desc


def windows(stream: torch.Tensor, n: int, seq: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` windows of ``seq + 1`` bytes: random starts with a generator, consecutive ones without."""
    if generator is None:
        starts = torch.arange(n) * seq
    else:
        starts = torch.randint(0, len(stream) - seq - 1, (n,), generator=generator)
    return torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------------- model

def build(a: argparse.Namespace) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                      num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
                                      use_cache=False, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def trained(a: argparse.Namespace, train: torch.Tensor, desc: dict[str, Any]) -> torch.nn.Module:
    key = {k: getattr(a, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "seq", "batch",
                                      "train_steps", "lr", "seed")}
    key["corpus"] = desc["digest"]
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(a.cache_dir).expanduser() / f"llama-{name}.pt"
    torch.manual_seed(a.seed)
    model = build(a)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"dense model: cached {path}")
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(a.seed)
    start = time.perf_counter()
    model.train()
    for step in range(a.train_steps):
        lr = a.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / a.train_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        w = windows(train, a.batch, a.seq, g)
        loss = lm_loss(model(w[:, :-1]), w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == a.train_steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    save_atomic(model.state_dict(), path, make_dirs=True)
    print(f"dense model: trained in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model.eval()


@torch.no_grad()
def perplexity(model: torch.nn.Module, held: torch.Tensor, batch: int) -> float:
    """exp(mean next-token cross-entropy) over the held-out windows, in batches of the captured shape."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(held) - batch + 1, batch):
        w = held[i:i + batch]
        total += lm_loss(model(w[:, :-1]), w[:, 1:]).item() * w[:, 1:].numel()
        n += w[:, 1:].numel()
    return math.exp(total / n)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- pruning

def scheme_for(criteria: str, density: float, calibration: list[torch.Tensor]) -> StructurePrune:
    if criteria == "magnitude":
        return StructurePrune(density)
    return StructurePrune(density, criteria=criteria, calibration=calibration)


def bisect(count: Any, target: int, lo: float, hi: float, steps: int, decreasing: bool = False) -> tuple[float, Any]:
    """The argument whose ``count(x) -> (params, result)`` comes closest to ``target`` params."""
    best: tuple[float, Any] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        n, result = count(mid)
        if best is None or abs(n - target) < abs(best[1][0] - target):
            best = (mid, (n, result))
        if (n > target) != decreasing:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best[0], best[1][1]


def secant(count: Any, target: int, start: tuple[float, int], guess: float, steps: int,
           lo: float = 0.02, hi: float = 1.0) -> tuple[float, Any]:
    """The argument whose ``count(x) -> (params, result)`` comes closest to ``target`` params, by secant steps
    from a known point ``start = (x, params)`` and a first ``guess`` (the parameter count is smooth and
    monotone in the density: 3-4 thinnings land within about 1%, where bisection needs 7)."""
    (x0, n0), x1 = start, guess
    best: tuple[float, tuple[int, Any]] | None = None
    for _ in range(steps):
        n1, result = count(x1)
        if best is None or abs(n1 - target) < abs(best[1][0] - target):
            best = (x1, (n1, result))
        if n1 in (target, n0):
            break
        x0, n0, x1 = x1, n1, min(hi, max(lo, x1 + (target - n1) * (x1 - x0) / (n1 - n0)))
    assert best is not None
    return best[0], best[1][1]


def ours(model: torch.nn.Module, criteria: str, target: int, x: torch.Tensor, calibration: list[torch.Tensor],
         steps: int) -> tuple[float, torch.nn.Module]:
    def count(d: float) -> tuple[int, torch.nn.Module]:
        small = fxcondensa.thin(model, scheme_for(criteria, d, calibration), (x,))
        return params(small), small

    return secant(count, target, (1.0, params(model)), target / params(model), steps)


@contextlib.contextmanager
def _rotary_off() -> Any:
    """Rotary embeddings as the identity while Torch-Pruning traces and prunes.

    Its dependency search follows index mappings through ``rotate_half``'s slices and concatenation and does
    not finish on transformers 5's Llama (one layer: no result after minutes). Heads are pruned whole and head
    dims kept (``prune_head_dims=False``), so the rotary pairs columns that always stay or go together: the
    groups and the magnitude scores Torch-Pruning computes are the same without it. The pruned model runs with
    the real rotary embeddings.
    """
    import transformers.models.llama.modeling_llama as llama

    real = llama.apply_rotary_pos_emb
    llama.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        llama.apply_rotary_pos_emb = real


def torch_pruning(model: torch.nn.Module, target: int, x: torch.Tensor, steps: int) -> tuple[float, torch.nn.Module]:
    import torch_pruning as tp

    def prune(ratio: float) -> tuple[int, torch.nn.Module]:
        with _rotary_off():
            return _tp_prune(ratio)

    def _tp_prune(ratio: float) -> tuple[int, torch.nn.Module]:
        m = copy.deepcopy(model)
        heads = {}
        for name, mod in m.named_modules():
            if name.endswith("self_attn"):
                heads[mod.q_proj] = m.config.num_attention_heads
                heads[mod.k_proj] = heads[mod.v_proj] = m.config.num_key_value_heads
        pruner = tp.pruner.MetaPruner(m, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=2),
                                      global_pruning=False, pruning_ratio=ratio, ignored_layers=[m.lm_head],
                                      num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                                      head_pruning_ratio=ratio, round_to=2)
        pruner.step()
        for name, mod in m.named_modules():  # what the attention's forward reads
            if name.endswith("self_attn"):
                mod.num_key_value_groups = mod.q_proj.out_features // mod.k_proj.out_features
        return params(m), m

    return bisect(prune, target, 0.0, 0.95, steps, decreasing=True)


# -------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and budget: " + json.dumps(QUICK))
    for k, v in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the dense training")
    p.add_argument("--recover-lr", type=float, default=None,
                   help="SGD peak learning rate of FineTune and Distill (default: each one's own, 0.05 and 0.15)")
    p.add_argument("--temperature", type=float, default=1.0, help="Distill's temperature")
    p.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.5], help="fractions of parameters removed")
    p.add_argument("--criteria", nargs="+", default=["magnitude", "activation", "taylor"])
    p.add_argument("--recover-criteria", nargs="+", default=["activation"],
                   help="criteria whose pruned models are recovered (default: the calibration-aware default)")
    p.add_argument("--seeds", type=int, default=3, help="recovery runs per optimizer (data order), averaged")
    p.add_argument("--no-recovery", action="store_true")
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--bisect-steps", type=int, default=4, help="thinnings per criterion and target (secant steps; "
                   "Torch-Pruning's ratio: bisection, 2 more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leaves the other cores free)")
    p.add_argument("--cache-dir", default=os.environ.get("FXCONDENSA_CACHE", "~/.cache/fxcondensa/lm_quality"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_quality.json"))
    a = p.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick else v)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    train, held_stream, desc = corpus(a.corpus_mb)
    print(f"corpus: {desc}")
    model = trained(a, train, desc)
    g = torch.Generator().manual_seed(a.seed + 1)
    held = windows(held_stream, a.eval_windows, a.seq, None)
    example = held[:a.batch, :-1]
    calibration = [w[:, :-1] for w in windows(train, a.calibration_batches * a.batch, a.seq, g).split(a.batch)]
    dense_params, dense_ppl = params(model), perplexity(model, held, a.batch)
    print(f"dense: {dense_params} params, held-out perplexity {dense_ppl:.3f}")
    rows: list[dict[str, Any]] = [{"method": "dense", "removed": 0.0, "params": dense_params, "ppl": dense_ppl}]
    recover = windows(train, a.recover_steps * a.batch, a.seq, g)
    data = TensorBatches(recover[:, :-1], recover[:, 1:], a.batch)

    def add(row: dict[str, Any]) -> None:
        row["removed_actual"] = 1 - row["params"] / dense_params
        row["ppl_ratio"] = row["ppl"] / dense_ppl
        rows.append(row)
        print(f"  {row['method']:<28} target {row['removed']:.0%} removed {row['removed_actual']:.1%} "
              f"ppl {row['ppl']:.3f} ({row['ppl_ratio']:.3f}x dense)  [{time.perf_counter() - start:.0f} s]",
              flush=True)

    for removed in a.removed:
        target = round((1 - removed) * dense_params)
        for criteria in a.criteria:
            density, small = ours(model, criteria, target, example, calibration, a.bisect_steps)
            pruned_ppl = perplexity(small, held, a.batch)
            add({"method": f"fxcondensa {criteria}", "removed": removed, "density": density,
                 "params": params(small), "ppl": pruned_ppl})
            if a.no_recovery or criteria not in a.recover_criteria:
                continue
            scheme = scheme_for(criteria, density, calibration)
            for make in (FineTune, Distill):
                ppls, seconds = [], 0.0
                for seed in range(a.seed, a.seed + a.seeds):
                    common = dict(evaluations=1, l_batch_size=a.batch, device="cpu", progress=False, seed=seed,
                                  bn_batches=0)
                    if a.recover_lr is not None:
                        common["lr"] = a.recover_lr
                    opt = Distill(a.recover_steps, temperature=a.temperature, **common) if make is Distill \
                        else FineTune(a.recover_steps, **common)
                    t0 = time.perf_counter()
                    result, _ = opt.compress(model, scheme, data, None, None, lm_loss, example)
                    seconds += time.perf_counter() - t0
                    ppls.append(perplexity(result, held, a.batch))
                mean = sum(ppls) / len(ppls)
                add({"method": f"fxcondensa {criteria} + {make.__name__}", "removed": removed, "density": density,
                     "params": params(small), "ppl": mean, "ppl_seeds": ppls, "optimizer": repr(opt),
                     # the share of the pruned model's perplexity gap to the dense one that recovery closes
                     "gap_closed": (pruned_ppl - mean) / (pruned_ppl - dense_ppl),
                     "tokens": a.recover_steps * a.batch * a.seq, "seconds": seconds / len(ppls)})
        if not a.no_torch_pruning:
            ratio, pruned = torch_pruning(model, target, example, a.bisect_steps + 2)
            add({"method": "Torch-Pruning magnitude", "removed": removed, "ratio": ratio, "params": params(pruned),
                 "ppl": perplexity(pruned, held, a.batch)})

    result = {"config": vars(a), "corpus": desc,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "seconds": time.perf_counter() - start}
    print()
    print(table(rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {a.out}")
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | target removed | params removed | held-out perplexity | x dense |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['removed']:.0%} | {r.get('removed_actual', 0.0):.1%} | {r['ppl']:.3f} | "
                     f"{r.get('ppl_ratio', 1.0):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

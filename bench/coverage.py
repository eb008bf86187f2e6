"""Thinning coverage over model zoos: torchvision, timm and Hugging Face transformers.

For every model (random weights, eval mode, every constant-initialised parameter and BatchNorm statistic
randomised so that nothing is trivially zero), apply ``StructurePrune(0.5)``, thin, compare the thinned model
with the compressed one on a fresh input, and record parameters and MACs before and after, the groups kept
whole with their reasons, or why the model cannot be thinned. Each model runs in its own process (with a
timeout), so one failure or one large model cannot affect the others.

    python bench/coverage.py                       # torchvision: all classification models
    python bench/coverage.py resnet18 vit_b_32     # some models
    python bench/coverage.py --zoo timm --jobs 2   # one model per timm family (the smallest variant)
    python bench/coverage.py --zoo hf --jobs 2     # small Hugging Face configs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Convolutional nets run at 128x128 (MAC ratios barely depend on the resolution, and the run stays short on
# a small machine); transformers need their native 224x224, inception_v3 its 299x299.
FIXED_SIZE = {"inception_v3": 299}
NATIVE_224 = ("vit_", "swin_", "maxvit_")
TIMM_SIZE = 128  # timm models run at min(their default, this); fixed-size ones are rebuilt at it when they allow
JSON_NAME = {"torchvision": "coverage_torchvision.json", "timm": "coverage_timm.json", "hf": "coverage_hf.json"}


def input_size(name: str) -> int:
    return FIXED_SIZE.get(name, 224 if name.startswith(NATIVE_224) else 128)


# ------------------------------------------------------------------------------------------ randomising

def randomize_constants(model: Any, seed: int = 0) -> None:
    """Give every constant-initialised floating parameter random values, and BatchNorm random statistics.

    Zero biases, unit norm weights, zero-initialised last norms of residual blocks, 1e-6 layer scales and
    zero class tokens would otherwise make channels trivially zero or blocks invisible, which hides wrong
    slices. Values keep the sign and scale of the initialisation where it has one.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            flat = p.detach().flatten()
            if p.numel() > 1 and not bool((flat == flat[0]).all()):
                continue
            v = float(flat[0])
            if v == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif abs(v) < 1e-2:  # layer scales (1e-6, 1e-5): bring the block into play
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:  # norm weights, gains: around their value
                p.copy_(v * (torch.rand(p.shape, generator=g) + 0.5))
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.is_floating_point():
                mean.copy_(torch.randn(mean.shape, generator=g) * 0.2)
                var.copy_(torch.rand(var.shape, generator=g) + 0.5)


# ------------------------------------------------------------------------------------------------ zoos

def timm_families() -> dict[str, str]:
    """Family (the ``timm.models`` module a model is defined in) -> its smallest model by parameter count.

    Parameter counts come from building every model on the meta device (no memory, no init); the choice
    is cached in bench/results/timm_families.json per timm version.
    """
    import timm

    cache = RESULTS / "timm_families.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("timm") == timm.__version__:
            return data["families"]
    out = subprocess.run([sys.executable, __file__, "--timm-sizes"], capture_output=True, text=True, timeout=3600)
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    best: dict[str, tuple[int, str]] = {}
    for name, (family, params) in sizes.items():
        if params is not None and (family not in best or (params, name) < best[family]):
            best[family] = (params, name)
    families = {f: best[f][1] for f in sorted(best)}
    RESULTS.mkdir(exist_ok=True)
    _write_json(cache, {"timm": timm.__version__, "families": families})
    return families


def _timm_sizes() -> dict[str, tuple[str, int | None]]:
    import warnings

    import timm
    import torch
    from timm.models import _registry

    warnings.filterwarnings("ignore")
    sizes = {}
    for name in timm.list_models():
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            sizes[name] = (_registry._model_to_module[name], sum(p.numel() for p in m.parameters()))
        except Exception:
            sizes[name] = (_registry._model_to_module[name], None)
    return sizes


def build_torchvision(name: str) -> tuple[Any, Any, Any, str]:
    import torch
    import torchvision

    size = input_size(name)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(1, 3, size, size), torch.randn(1, 3, size, size, generator=g), f"1x3x{size}x{size}"


def build_timm(name: str) -> tuple[Any, Any, Any, str]:
    """A timm model at a small input: min(default, 128) where the model takes any size; a fixed-size model
    (ViTs, Swin) is rebuilt with ``img_size=128`` when it accepts that, else it runs at its default."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    default = tuple((cfg.input_size if cfg is not None else None) or (3, 224, 224))
    chans, size = default[0], min(default[1], TIMM_SIZE)
    model = None
    if size != default[1] and cfg is not None and getattr(cfg, "fixed_input_size", False):
        try:
            model = timm.create_model(name, pretrained=False, img_size=size).eval()
            with torch.no_grad():
                model(torch.randn(1, chans, size, size))
        except Exception:
            model, size = None, default[1]
    if model is None:
        model = timm.create_model(name, pretrained=False).eval()
        if size != default[1]:
            try:
                with torch.no_grad():
                    model(torch.randn(1, chans, size, size))
            except Exception:
                size = default[1]
    randomize_constants(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, chans, size, size, generator=torch.Generator().manual_seed(0))
    return model, x, torch.randn(1, chans, size, size, generator=g), f"1x{chans}x{size}x{size}"


# Hugging Face models from small configs (few layers, hidden 32-64), default options otherwise (GPT-2 and
# Llama keep use_cache=True), random weights: name -> (config class, model class, input kind, config sizes).
_TEXT = {"vocab_size": 128, "max_position_embeddings": 64}
HF_MODELS: dict[str, tuple[str, str, str, dict]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", "text",
             {**_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", "text",
                   {**_TEXT, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "text",
                {**_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}),
    "gpt2-classification": ("GPT2Config", "GPT2ForSequenceClassification", "text",
                            {"vocab_size": 128, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "gpt2-lm": ("GPT2Config", "GPT2LMHeadModel", "text",
                {"vocab_size": 128, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "vit": ("ViTConfig", "ViTForImageClassification", "image",
            {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64}),
    "swin": ("SwinConfig", "SwinForImageClassification", "image",
             {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
              "window_size": 4}),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", "image",
                 {"image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2}),
    "resnet": ("ResNetConfig", "ResNetForImageClassification", "image",
               {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "bottleneck"}),
    "t5-encoder": ("T5Config", "T5EncoderModel", "text",
                   {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}),
    "bart": ("BartConfig", "BartForConditionalGeneration", "text",
             {**_TEXT, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
              "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "text",
              {**_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4}),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM", "text",
                  {**_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", "text",
                    {**_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2}),
    "mixtral-moe": ("MixtralConfig", "MixtralForCausalLM", "text",
                    {**_TEXT, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
                     "num_experts_per_tok": 2}),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "text",
                  {**_TEXT, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 48,
                   "shared_expert_intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2}),
}


def hf_inputs(kind: str, seed: int) -> dict:
    """Keyword inputs: token ids with an attention mask that pads the last token, or pixel values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, -1] = 0
    return {"input_ids": torch.randint(0, 128, (1, 8), generator=g), "attention_mask": mask}


def build_hf(name: str) -> tuple[Any, Any, Any, str]:
    import transformers

    config_cls, model_cls, kind, sizes = HF_MODELS[name]
    config = getattr(transformers, config_cls)(**sizes)
    model = getattr(transformers, model_cls)(config).eval()
    randomize_constants(model)
    x, fresh = hf_inputs(kind, 0), hf_inputs(kind, 1)
    return model, x, fresh, ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in x.items())


ZOOS = {"torchvision": build_torchvision, "timm": build_timm, "hf": build_hf}


# ---------------------------------------------------------------------------------------------- one run

def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def run_one(zoo: str, name: str, density: float) -> dict:
    import torch

    import fxcondensa
    from fxcondensa.capture.graph import flatten_outputs
    from fxcondensa.capture.records import thin_record
    from fxcondensa.passes.costs import profile_costs
    from fxcondensa.schemes import StructurePrune

    torch.manual_seed(0)
    torch.set_num_threads(1)
    row: dict = {"model": name}
    try:
        model, x, fresh, shape = ZOOS[zoo](name)
    except Exception as exc:
        row.update(status="not built", reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        return row
    row["input"] = shape
    if zoo == "timm":
        from timm.models import _registry

        row["family"] = _registry._model_to_module.get(name, "")
    start = time.perf_counter()
    try:
        scheme = StructurePrune(density)
        # The graphs: this table is the thinning pass's; what thin returns by default is _own_class's column.
        compressed = fxcondensa.compress(model, scheme, x, output="graph")
        thinned = fxcondensa.thin(compressed, None, x, output="graph")
    except Exception as exc:  # the table records why, that is the point of this script
        row.update(status="not thinned", reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    record = thin_record(thinned)
    with torch.no_grad():
        ref = flatten_outputs(_call(compressed.eval(), fresh))
        got = flatten_outputs(_call(thinned.eval(), fresh))
    exact = len(ref) == len(got) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                         for a, b in zip(ref, got, strict=True))
    if not exact:  # float32 rounding of shorter sums, or a wrong model? float64 tells them apart
        import copy

        c64, t64 = copy.deepcopy(compressed).double(), copy.deepcopy(thinned).double()
        f64 = ({k: (v.double() if v.is_floating_point() else v) for k, v in fresh.items()}
               if isinstance(fresh, dict) else fresh.double())
        with torch.no_grad():
            ref, got = flatten_outputs(_call(c64, f64)), flatten_outputs(_call(t64, f64))
        exact = len(ref) == len(got) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                             for a, b in zip(ref, got, strict=True))
    returns, own_exact = _own_class(model, scheme, x, fresh, compressed)
    exact = exact and own_exact
    macs0 = sum(c.macs for c in profile_costs(compressed))
    macs1 = sum(c.macs for c in profile_costs(thinned))
    p0 = sum(p.numel() for p in model.parameters())
    p1 = sum(p.numel() for p in thinned.parameters())
    frozen = record.frozen
    status = "WRONG" if not exact else "thinned" if p1 < p0 else "no reduction"
    row.update(status=status, exact_on_fresh_input=exact, capture=record.capture, returns=returns,
               params=p0, params_thinned=p1,
               param_ratio=round(p0 / max(p1, 1), 2), macs=macs0, macs_thinned=macs1,
               mac_ratio=round(macs0 / max(macs1, 1), 2), frozen_groups=len(frozen),
               frozen_reasons=sorted({f.reason.split(" at node")[0][:100] for f in frozen})[:3],
               rule_failures=record.rule_failures, whole_reason=record.whole_reason)
    return row


def _close(ref: list, got: list) -> bool:
    import torch

    return len(ref) == len(got) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                        for a, b in zip(ref, got, strict=True))


def _own_class(model: Any, scheme: Any, x: Any, fresh: Any, compressed: Any) -> tuple[str, bool]:
    """What ``thin(..., output="auto")`` returns ("module"; "module, N submodules as graphs (first: ...)" where
    some run as their thinned graphs; or "graph: why") and whether that model equals the
    compressed one on the fresh input (in float32, or else in float64: rounding vanishes there)."""
    import copy

    import torch

    import fxcondensa
    from fxcondensa.capture.graph import flatten_outputs
    from fxcondensa.capture.records import thin_record

    try:
        own = fxcondensa.thin(model, scheme, x, output="auto")
    except Exception as exc:
        return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}", False
    record = thin_record(own)
    if record.returns != "module":
        return f"graph: {record.reason[:200]}", True  # the graph itself is compared by run_one
    # Submodules run as their thinned graphs are said, with the first and why: the count is honest.
    returns = f"module, {record.reason}" if record.reason else "module"
    with torch.no_grad():
        if _close(flatten_outputs(_call(compressed.eval(), fresh)), flatten_outputs(_call(own.eval(), fresh))):
            return returns, True
        c64, o64 = copy.deepcopy(compressed).double(), copy.deepcopy(own).double()
        f64 = ({k: (v.double() if v.is_floating_point() else v) for k, v in fresh.items()}
               if isinstance(fresh, dict) else fresh.double())
        return returns, _close(flatten_outputs(_call(c64, f64)), flatten_outputs(_call(o64, f64)))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def default_names(zoo: str) -> list[str]:
    if zoo == "timm":
        return list(timm_families().values())
    if zoo == "hf":
        return list(HF_MODELS)
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="torchvision")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel (each in its own process)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/coverage_<zoo>.json)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="print the README table of a JSON written by this script, and exit")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--timm-sizes", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.timm_sizes:
        print(json.dumps(_timm_sizes()))
        return
    if args.one:
        print(json.dumps(run_one(args.zoo, args.models[0], args.density)))
        return
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    names = args.models or default_names(args.zoo)

    def one(name: str) -> dict:
        cmd = [sys.executable, __file__, "--one", "--zoo", args.zoo, "--density", str(args.density), name]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            return {"model": name, "status": "timeout", "reason": f"over {args.timeout}s on this machine"}
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            "model": name, "status": "error", "reason": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        return row

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(one, names):
            rows.append(row)
            print(_line(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = args.out or RESULTS / JSON_NAME[args.zoo]
    _write_json(path, {"zoo": args.zoo, "density": args.density, "rows": rows})
    ok = sum(r["status"] == "thinned" for r in rows)
    big = sum(r["status"] == "thinned" and r["param_ratio"] >= 1.5 for r in rows)
    wrong = sum(r["status"] == "WRONG" for r in rows)
    own = sum(r.get("returns", "").startswith("module") for r in rows)
    hybrid = sum(r.get("returns", "").startswith("module, ") for r in rows)
    print(f"\n{ok}/{len(rows)} models thinned at StructurePrune({args.density}), {big} with >= 1.5x fewer "
          f"parameters, {wrong} wrong; {own}/{len(rows)} come back as their own class (thin(output='auto'); "
          f"{hybrid} of them with submodules as graphs); JSON in {path}")


def markdown(data: dict) -> str:
    """The README table: one row per model, sorted by family (timm) or name, with the frozen reasons and,
    for a model left whole, the one-line reason."""
    rows = sorted(data["rows"], key=lambda r: (r.get("family", ""), r["model"]))
    timm = any("family" in r for r in rows)
    head = ("| family | model | input | capture | returns | parameters | MACs | frozen groups: first reasons |\n"
            "|---|---|---|---|---|---|---|---|") if timm else \
        ("| model | inputs | capture | returns | parameters | MACs | frozen groups: first reasons |\n"
         "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        name = r["model"] + (f" ({r['run']})" if r.get("run") else "")  # the run of a merged JSON
        lead = f"| {r.get('family', '')} | {name} | " if timm else f"| {name} | "
        size = r.get("input", "").replace("1x3x", "")
        if r["status"] in ("thinned", "no reduction", "WRONG"):
            reasons = "; ".join(x.replace("|", "/") for x in r["frozen_reasons"][:2])
            whole = f" **Left whole:** {r['whole_reason']}" if r.get("whole_reason") else ""
            wrong = " **WRONG on the fresh input**" if r["status"] == "WRONG" else ""
            returns = r.get("returns", "").replace("|", "/")[:120]
            lines.append(f"{lead}{size} | {r.get('capture', '')} | {returns} | {_count(r['params'])} → "
                         f"{_count(r['params_thinned'])} ({r['param_ratio']}x) | {_count(r['macs'], 'G')} → "
                         f"{_count(r['macs_thinned'], 'G')} ({r['mac_ratio']}x) | {r['frozen_groups']}: "
                         f"{reasons}{whole}{wrong} |")
        else:
            lines.append(f"{lead}{size} | | | {r['status']} | | {r.get('reason', '').replace('|', '/')[:160]} |")
    return "\n".join(lines)


def _count(n: int, unit: str = "M") -> str:
    if unit == "G":
        return f"{n / 1e9:.2f}G" if n >= 1e7 else f"{n / 1e6:.2f}M"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _line(r: dict) -> str:
    if r["status"] in ("thinned", "no reduction", "WRONG"):
        reasons = "; ".join(r["frozen_reasons"][:2])
        whole = f" WHOLE: {r['whole_reason']}" if r.get("whole_reason") else ""
        return (f"| {r['model']} | {r.get('input', '')} | {r.get('returns', '')[:80]} | "
                f"{r['params'] / 1e6:.2f}M -> {r['params_thinned'] / 1e6:.2f}M "
                f"({r['param_ratio']}x) | {r['macs'] / 1e9:.3f}G -> {r['macs_thinned'] / 1e9:.3f}G ({r['mac_ratio']}x) "
                f"| {r['frozen_groups']}: {reasons}{whole} |" + (" WRONG" if r["status"] == "WRONG" else ""))
    return f"| {r['model']} | {r.get('input', '')} | {r['status']} | {r.get('reason', '')} | |"


if __name__ == "__main__":
    main()

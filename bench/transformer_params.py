"""Parameter reduction of ``thin(model, StructurePrune(0.5), x)`` on transformer models (exact: ``thin``
checks the thinned model against the compressed one), with the groups that stayed frozen.

Models: torchvision vit_b_32, swin_t, convnext_tiny (224 x 224); timm vit_tiny, deit_tiny, swin_tiny
(224 x 224); Hugging Face BERT (sequence classification), GPT-2 (LM head), ViT (image classification) and
Llama (causal LM, grouped-query attention) in small random configurations (width 64, 2 layers, 4 heads,
vocabulary 100). Random weights; LayerNorms get random affine terms so that zeros are never accidental.

``--attention head_dim,both`` runs ``StructurePrune(0.5, attention=...)`` for each value given (``none`` is
the default ``attention=None``: whole heads), one line per model and value; frozen ``(head_dim)`` groups
are columns left whole (their reason is in the thinning record).

Run: ``nice -n 10 .venv/bin/python bench/transformer_params.py [names...] [--attention none,head_dim,both]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

TORCHVISION = ["vit_b_32", "swin_t", "convnext_tiny"]
TIMM = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]
HF = ["hf_bert", "hf_gpt2", "hf_vit", "hf_llama"]


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    if name in TORCHVISION:
        import torchvision

        return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 224, 224),)
    if name in TIMM:
        import timm

        return timm.create_model(name, pretrained=False).eval(), (torch.randn(1, 3, 224, 224),)
    import transformers as T

    ids = (torch.randint(0, 100, (2, 8)),)
    if name == "hf_bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=32)).eval(), ids
    if name == "hf_gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                              use_cache=False)).eval(), ids
    if name == "hf_vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)).eval(), (torch.randn(2, 3, 32, 32),)
    if name == "hf_llama":
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=32, use_cache=False)).eval(), ids
    raise ValueError(f"unknown model {name!r}: choose from {TORCHVISION + TIMM + HF}")


def main(names: list[str], attentions: list[str | None]) -> None:
    torch.set_num_threads(1)
    for name in names or TORCHVISION + TIMM + HF:
        for attention in attentions:
            run(name, attention)


def run(name: str, attention: str | None) -> None:
    """Thin one model at density 0.5 with the given ``attention`` option and print one line."""
    model, x = build(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    t = time.perf_counter()
    small = fxcondensa.thin(model, StructurePrune(0.5, attention=attention), x)
    dense, thinned = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    frozen = [g.group for g in thin_record(small).groups if g.frozen]
    print(f"{name} attention={attention}: {dense / 1e6:.2f}M -> {thinned / 1e6:.2f}M params "
          f"({dense / thinned:.2f}x fewer), exact, frozen groups {frozen} ({time.perf_counter() - t:.0f} s)",
          flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models (default all): {TORCHVISION + TIMM + HF}")
    parser.add_argument("--attention", default="none",
                        help="comma-separated attention options: none, heads, head_dim, both, keep")
    args = parser.parse_args()
    main(args.names, [None if a == "none" else a for a in args.attention.split(",")])

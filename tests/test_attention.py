"""Attention heads thinned exactly: fused and separate q/k/v, matmul + softmax and scaled_dot_product_attention,
grouped-query attention, nn.MultiheadAttention, and the ``attention=`` option of the structured schemes.

Every model is compressed and thinned; the thinned model must compute what ``compress`` computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa import compress, thin
from fxcondensa.capture.records import thin_record
from fxcondensa.nn import ThinMultiheadAttention
from fxcondensa.passes.analysis import analyze
from fxcondensa.rules.heads import head_channels
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


class Attention(nn.Module):
    """Self-attention in the styles models write it.

    ``style``: "fused_sdpa" (timm: qkv -> reshape(B, N, 3, H, D) -> permute -> unbind -> SDPA), "fused_index"
    (qkv[0], qkv[1], qkv[2] and matmul + softmax), "separate" (q, k, v linears -> view -> transpose ->
    matmul + softmax with a literal scale), "gqa_sdpa" (fewer key/value heads, enable_gqa=True) and
    "gqa_repeat" (Hugging Face's repeat_kv: expand and reshape the key/value heads).
    """

    def __init__(self, c: int, heads: int, head_dim: int, style: str, kv_heads: int | None = None):
        super().__init__()
        self.c, self.h, self.d, self.style = c, heads, head_dim, style
        self.kv = kv_heads or heads
        inner = heads * head_dim
        if style.startswith("fused"):
            self.qkv = nn.Linear(c, 3 * inner)
        else:
            self.q = nn.Linear(c, inner)
            self.k = nn.Linear(c, self.kv * head_dim)
            self.v = nn.Linear(c, self.kv * head_dim)
        self.proj = nn.Linear(inner, c)
        self.inner, self.same = inner, inner == c  # timm writes reshape(B, N, C) with C read off the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.style == "fused_sdpa":
            qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.style == "fused_index":
            qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            out = torch.softmax((q * self.d ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        else:
            q = self.q(x).view(B, N, self.h, self.d).transpose(1, 2)
            k = self.k(x).view(B, N, self.kv, self.d).transpose(1, 2)
            v = self.v(x).view(B, N, self.kv, self.d).transpose(1, 2)
            if self.style == "gqa_sdpa":
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                if self.style == "gqa_repeat":
                    rep = self.h // self.kv
                    k = k[:, :, None, :, :].expand(B, self.kv, rep, N, self.d).reshape(B, self.h, N, self.d)
                    v = v[:, :, None, :, :].expand(B, self.kv, rep, N, self.d).reshape(B, self.h, N, self.d)
                attn = torch.matmul(q, k.transpose(2, 3)) * 0.125
                out = torch.matmul(attn.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C) if self.same else out.transpose(1, 2).reshape(B, N, self.inner))


class Encoder(nn.Module):
    """Pre-norm encoder blocks with a class token, position embedding, attention and MLP."""

    def __init__(self, c: int = 16, heads: int = 4, head_dim: int = 4, style: str = "fused_sdpa",
                 kv_heads: int | None = None, blocks: int = 2):
        super().__init__()
        self.embed = nn.Linear(5, c)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Parameter(torch.randn(1, 7, c))
        self.n1 = nn.ModuleList(nn.LayerNorm(c) for _ in range(blocks))
        self.n2 = nn.ModuleList(nn.LayerNorm(c) for _ in range(blocks))
        self.attn = nn.ModuleList(Attention(c, heads, head_dim, style, kv_heads) for _ in range(blocks))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)) for _ in range(blocks))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for n1, attn, n2, mlp in zip(self.n1, self.attn, self.n2, self.mlp, strict=True):
            x = x + attn(n1(x))
            x = x + mlp(n2(x))
        return self.head(self.norm(x)[:, 0])


def _exact(model: nn.Module, x: torch.Tensor, scheme=None, output: str = "auto") -> nn.Module:
    scheme = scheme or StructurePrune(0.5)
    model = model.eval()
    compressed = compress(model, scheme, x)
    small = thin(model, scheme, x, output=output)
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), compressed(*inputs), rtol=RTOL, atol=ATOL)
    return small


X = torch.randn(2, 6, 5)


@pytest.mark.parametrize("style", ["fused_sdpa", "fused_index", "separate"])
def test_heads_and_stream_are_thinned_exactly(style):
    torch.manual_seed(0)
    model = Encoder(style=style, head_dim=4 if style != "separate" else 6)
    small = _exact(model, X)
    inner = [small.get_submodule(f"attn.{b}.proj").in_features for b in range(2)]
    d = model.attn[0].d
    assert all(k % d == 0 for k in inner) and sum(inner) < 2 * 4 * d  # whole heads went
    assert small.embed.out_features < 16 and small.cls_token.shape[-1] == small.embed.out_features
    assert [g.group for g in thin_record(small).groups if g.frozen] == ["head"]


@pytest.mark.parametrize("style", ["gqa_sdpa", "gqa_repeat"])
def test_grouped_query_attention_keeps_key_value_heads_with_their_query_group(style):
    torch.manual_seed(1)
    model = Encoder(style=style, heads=4, kv_heads=2, head_dim=4)
    small = _exact(model, X, StructurePrune(0.3))
    for b in range(2):
        q, k = small.get_submodule(f"attn.{b}.q").out_features, small.get_submodule(f"attn.{b}.k").out_features
        assert q == 2 * k and k % 4 == 0  # each kept key/value head keeps its two query heads
    assert any(small.get_submodule(f"attn.{b}.k").out_features < 8 for b in range(2))


def test_head_channels_unite_a_head_across_q_k_v():
    gm = fxcondensa.trace(Encoder(style="fused_sdpa", blocks=1), X)
    analysis = analyze(gm)
    heads = head_channels(gm, analysis)
    assert int(heads.sum()) == 4  # four heads, each one channel over its 3 x head_dim rows


class _SelfMHA(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(5, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.ln(x)
        y, _ = self.attn(h, h, h, need_weights=False)
        return self.head(x + y)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_thinned_per_head(batch_first):
    # Seed 1 keeps two heads: a regression test for heads removed although their weights were not zero.
    torch.manual_seed(1)
    small = _exact(_SelfMHA(batch_first), X)
    attn = small.attn
    assert isinstance(attn, ThinMultiheadAttention) and attn.head_dim == 4 and attn.num_heads < 4
    assert attn.in_proj_weight.shape == (3 * attn.num_heads * 4, small.embed.out_features)
    assert attn.scale == pytest.approx(0.5)


class _WeightsUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        y, w = self.attn(h, h, h)
        return self.head(y) + w.mean()


def test_multihead_attention_with_used_weights_is_frozen_with_reason():
    small = _exact(_WeightsUsed(), X)
    frozen = " ".join(g.frozen for g in thin_record(small).groups)
    assert "nn.MultiheadAttention 'attn' returns attention weights that are used" in frozen
    assert isinstance(small.attn, nn.MultiheadAttention)


def test_attention_keep_keeps_every_head():
    torch.manual_seed(3)
    small = _exact(Encoder(), X, StructurePrune(0.5, attention="keep"))
    assert all(small.get_submodule(f"attn.{b}.proj").in_features == 16 for b in range(2))


def test_attention_heads_on_a_model_without_attention_raises():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"the model Sequential has no attention heads .* nn.MultiheadAttention"):
        thin(model, StructurePrune(0.5, attention="heads"), torch.randn(1, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attention_option_is_validated():
    with pytest.raises(ValueError, match="attention must be one of .* got 'head'"):
        StructurePrune(0.5, attention="head")


def test_thinned_attention_exports(tmp_path):
    torch.manual_seed(4)
    small = thin(Encoder(style="fused_sdpa").eval(), StructurePrune(0.5), X)
    fxcondensa.files.export.torchscript(small, tmp_path / "a.pt", X)
    fxcondensa.files.export.torch_export(small, tmp_path / "a.pt2", X)
    mha = thin(_SelfMHA(True).eval(), StructurePrune(0.5), X)
    fxcondensa.files.export.torchscript(mha, tmp_path / "m.pt", X)
    fxcondensa.files.export.torch_export(mha, tmp_path / "m.pt2", X)


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 5), c=st.integers(3, 12),
       style=st.sampled_from(["fused_sdpa", "fused_index", "separate", "gqa_sdpa", "gqa_repeat"]),
       density=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_head_and_width_pruning_property(heads, head_dim, c, style, density, seed):
    torch.manual_seed(seed)
    kv = max(1, heads // 2) if style.startswith("gqa") else None
    _exact(Encoder(c, heads, head_dim, style, kv, blocks=1), torch.randn(2, 6, 5), StructurePrune(density))


def test_torchvision_swin_windows_heads_and_stream_are_thinned_exactly():
    import torchvision

    torch.manual_seed(5)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    small = _exact(model, x, output="graph")  # the graph, to read its window attention calls
    calls = [n for n in small.graph.nodes if n.op == "call_function" and "window_attention" in n.target.__name__]
    assert calls and all(n.target is fxcondensa.nn.window_attention for n in calls)
    dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < dense
    assert [g.group for g in thin_record(small).groups if g.frozen] == ["head"]


def _hf(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    if name == "bert":
        cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=16)
        return T.BertForSequenceClassification(cfg).eval(), (ids,)
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False)
        return T.GPT2LMHeadModel(cfg).eval(), (ids,)
    if name == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)
        return T.ViTForImageClassification(cfg).eval(), (torch.randn(2, 3, 16, 16),)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16, use_cache=False)
    return T.LlamaForCausalLM(cfg).eval(), (ids,)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_hugging_face_transformers_lose_heads_and_width_exactly(name):
    """Captured with torch.export: aten linear / addmm (GPT-2's Conv1D) / embedding / layer_norm / select /
    scaled_dot_product_attention (grouped-query in Llama), the Llama RMSNorm written out."""
    model, x = _hf(name)
    for m in model.modules():  # norms with random affine terms, so that zeros are never accidental
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    small = _exact(model, x, StructurePrune(0.5, attention="heads"))  # raises if no heads were recognised
    dense = sum(p.numel() for p in model.parameters())
    assert dense / sum(p.numel() for p in small.parameters()) >= 1.5
    frozen = [g.group for g in thin_record(small).groups if g.frozen]
    assert len(frozen) == 1 and frozen[0] in ("classifier", "lm_head")  # only the output layer keeps its channels


class _MaskedMHA(_SelfMHA):
    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.ln(x)
        y, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        return self.head(x + y)


def test_multihead_attention_with_key_padding_mask_is_thinned_exactly():
    torch.manual_seed(6)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    small = _exact(_MaskedMHA(True), (X, pad))
    assert isinstance(small.attn, ThinMultiheadAttention) and small.attn.num_heads < 4

"""Rules added for timm coverage, each on a hand-built pattern in both capture frontends: the thinned model
equals the compressed dense one on a fresh input, the pattern's channels are removed, and what cannot be
removed stays whole with its reason.

- a projection whose bias is concatenated in forward from parameters (BEiT, EVA / DINOv3, Swin-V2:
  ``cat((q_bias, k_bias, v_bias))``, older timm's ``zeros_like(v_bias)``), and one whose bias is computed
  some other way (its input side still thins);
- a position embedding resampled in forward from its parameter (ViT's and Qwen3-ViT's dynamic image size:
  slice, reshape, permute, interpolate, cat) added to the token stream;
- ``aten.type_as`` (RoPE under torch.export) and ``repeat`` along other dims (XCiT's position encoding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rules_zoo import ATOL, RTOL, SCHEME, compressed, params
from torch import nn

from fxcondensa import thin
from fxcondensa.capture.records import thin_record


def _randomize(model: nn.Module) -> nn.Module:
    """Every parameter random (zero-initialised biases and embeddings would hide wrong slices)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


class ConcatBiasQKV(nn.Module):
    """A fused q/k/v projection with ``cat((q_bias, k_bias, v_bias))`` (``k_bias`` a zero buffer, or
    ``zeros_like(v_bias)``), split into heads, attention, out-projection, on a thinnable token stream."""

    def __init__(self, like: bool = False, dim: int = 16, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.like = like
        if not like:
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)
        self.heads = heads

    def forward(self, x):
        b, n, _ = x.shape
        h = torch.relu(self.embed(x))
        k_bias = torch.zeros_like(self.v_bias, requires_grad=False) if self.like else self.k_bias
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return self.head(torch.relu(h))


class ComputedBias(nn.Module):
    """A linear whose bias is computed in forward (not a concatenation of parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(F.linear(h, self.b.weight, self.b.bias * self.scale)))


class ResampledPosEmbed(nn.Module):
    """ViT with a dynamic image size: the grid part of ``pos_embed`` is resampled (reshape to a grid,
    permute, bicubic interpolate, permute back, reshape with the literal width), the class token's part
    concatenated in front, and the sum enters the token stream."""

    def __init__(self, dim: int = 16, grid: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.grid, self.dim = grid, dim
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        prefix, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        g = g.permute(0, 2, 3, 1).reshape(1, -1, self.dim)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + torch.cat([prefix, g], 1)
        return self.fc(torch.relu(t))


class RepeatedEncoding(nn.Module):
    """XCiT: a position encoding from a constant grid through a 1x1 conv, tiled over the batch with
    ``repeat(B, 1, 1, 1)`` and added to the patch features (its conv's channels join the stream)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 1)
        self.proj = nn.Conv2d(4, dim, 1)
        self.register_buffer("grid", torch.randn(1, 4, 8, 8))
        self.out = nn.Conv2d(dim, 3, 1)

    def forward(self, x):
        pos = self.proj(self.grid).repeat(x.shape[0], 1, 1, 1)
        return self.out(torch.relu(self.patch(x) + pos))


class TypeAs(nn.Module):
    """``cos.type_as(q)`` and ``q.type_as(x)`` in a rotary-embedding-like product."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.register_buffer("cos", torch.randn(5, 8))
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        q = torch.relu(self.a(x))
        return self.b(q.type_as(x) * self.cos.type_as(q))


def _check(model: nn.Module, x: torch.Tensor, capture: str, group: str) -> nn.Module:
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    thinned = thin(model, SCHEME, x, capture=capture)
    rec = next(g for g in thin_record(thinned).groups if g.group == group)
    assert rec.frozen == "" and rec.kept < rec.channels, rec
    assert params(thinned) < params(model)
    with torch.no_grad():
        torch.testing.assert_close(thinned(fresh), compressed(model, x, capture)(fresh), rtol=RTOL, atol=ATOL)
    return thinned


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("like", [False, True])
def test_concatenated_qkv_bias_is_sliced_with_the_heads(capture, like):
    model = _randomize(ConcatBiasQKV(like))
    if not like:
        model.k_bias.zero_()
    thinned = _check(model, torch.randn(2, 5, 6), capture, "embed")
    rec = next(g for g in thin_record(thinned).groups if g.group == "qkv")
    assert rec.frozen == "" and rec.kept < rec.channels, rec  # heads went, their q/k/v bias entries too
    q_bias = dict(thinned.named_parameters())["q_bias"]
    assert q_bias.numel() < 16 and q_bias.numel() % 4 == 0


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_computed_bias_keeps_the_outputs_and_thins_the_inputs(capture):
    thinned = _check(_randomize(ComputedBias()), torch.randn(2, 6), capture, "a")
    rec = next(g for g in thin_record(thinned).groups if g.group == "b")
    assert rec.kept == rec.channels and "bias computed in forward" in rec.frozen


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_resampled_position_embedding_is_sliced_with_the_tokens(capture):
    thinned = _check(_randomize(ResampledPosEmbed()), torch.randn(2, 3, 8, 8), capture, "patch")
    shapes = {k: tuple(v.shape) for k, v in thinned.named_parameters()}
    kept = shapes["patch.weight"][0]
    assert shapes["pos_embed"] == (1, 17, kept) and shapes["cls_token"] == (1, 1, kept) and kept < 16


def test_position_embedding_read_twice_stays_whole_with_a_reason():
    class ReadTwice(ResampledPosEmbed):
        def forward(self, x):
            return super().forward(x) + self.pos_embed.sum()  # a second reader that would not follow a slice

    thinned = thin(_randomize(ReadTwice()), SCHEME, torch.randn(2, 3, 8, 8))
    rec = next(g for g in thin_record(thinned).groups if g.group == "patch")
    assert rec.kept == rec.channels and "cannot be sliced" in rec.frozen


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_repeat_along_the_batch_keeps_channels_apart(capture):
    thinned = _check(_randomize(RepeatedEncoding()), torch.randn(2, 3, 8, 8), capture, "proj")
    shapes = {k: tuple(v.shape) for k, v in thinned.named_parameters()}
    assert shapes["proj.weight"][0] == shapes["patch.weight"][0] < 8


def test_repeat_along_the_channel_dim_freezes_with_a_reason():
    class ChannelRepeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.a(x).repeat(1, 2, 1, 1))

    thinned = thin(_randomize(ChannelRepeat()), SCHEME, torch.randn(1, 3, 4, 4))
    rec = next(g for g in thin_record(thinned).groups if g.group == "a")
    assert rec.kept == rec.channels and "repeat along the channel dim" in rec.frozen


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_type_as_carries_its_first_operand(capture):
    _check(_randomize(TypeAs()), torch.randn(2, 5, 6), capture, "a")


class HeadWidthFromInput(nn.Module):
    """XCiT / VOLO / Swin-V2-CR attention: ``B, N, C = x.shape`` on the block input, then the fused
    projection split with ``C // num_heads`` and merged back with ``C``; the stream ``x`` thins, the
    attention keeps its width."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)
        self.heads = heads

    def forward(self, x):
        x = torch.relu(self.embed(x))
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1)  # cosine attention: the heads stay whole, the stream still thins
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + self.proj(a.permute(0, 2, 1, 3).reshape(b, n, c))
        return self.head(torch.relu(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_head_width_computed_from_a_thinned_stream_keeps_its_dense_value(capture):
    thinned = _check(_randomize(HeadWidthFromInput()), torch.randn(2, 5, 6), capture, "embed")
    assert dict(thinned.named_parameters())["qkv.weight"].shape[1] < 16
    # the head width also sizes the batch of another input: the dense constant is exact for every input
    other = torch.randn(3, 7, 6)
    with torch.no_grad():
        model = _randomize(HeadWidthFromInput())
        torch.testing.assert_close(thin(model, SCHEME, torch.randn(2, 5, 6), capture="fx")(other),
                                   compressed(model, torch.randn(2, 5, 6), "fx")(other), rtol=RTOL, atol=ATOL)


def test_channel_count_used_as_a_number_still_freezes():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h * (h.shape[-1] // 2))

    thinned = thin(_randomize(Scaled()), SCHEME, torch.randn(2, 6))
    rec = next(g for g in thin_record(thinned).groups if g.group == "a")
    assert rec.kept == rec.channels and "used as a number" in rec.frozen

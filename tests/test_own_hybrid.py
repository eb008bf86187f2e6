"""thin(output="auto") gives the user's class back with the modules whose forward computes with a dense size
(tied-width attention, an uneven split by a literal) run as their thinned graphs; checked, trainable, saved."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from _models import state_hash
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune


class _Attention(nn.Module):
    """timm's attention as written there: the output is reshaped to the width of the input."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = torch.tensor(0.9)  # a plain tensor attribute: the tracer lifts it as a constant
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(-1)
        if attn_mask is not None:
            attn = attn + attn_mask
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mask: bool = False):
        super().__init__()
        # A block may hand its attention a mask: the module is then matched with that argument given.
        self.register_buffer("mask", torch.randn(1) if mask else None)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + (self.attn(self.norm1(x)) if self.mask is None else self.attn(self.norm1(x), attn_mask=self.mask))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, mask: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(_Block(dim, heads, mask), _Block(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward_features(self, x):
        return self.norm(self.blocks(self.embed(x).flatten(2).transpose(1, 2)))

    def forward(self, x):
        return self.head(self.forward_features(x).mean(1))


class _CrossStage(nn.Module):
    """CSPNet's split: ``torch.split(x, 32)`` with a literal that the pruned halves no longer have."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 1)
        self.fuse = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        p, q = torch.split(self.expand(x).relu(), 32, dim=1)
        return x + self.fuse(torch.cat([self.a(p).relu(), self.b(q)], 1))


class TinyCSP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stage = _CrossStage()
        self.head = nn.Linear(16, 5)

    def forward_features(self, x):
        return self.stage(self.stem(x).relu())

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


def _reference(model: nn.Module, scheme, x) -> nn.Module:
    """The compressed dense model as the user's class."""
    dense = copy.deepcopy(model)
    dense.load_state_dict(fxcondensa.compress(model, scheme, x).state_dict(), strict=False)
    return dense.eval()


@pytest.mark.parametrize(("make", "shape", "others", "first"), [
    (TinyViT, (1, 3, 16, 16), [(3, 3, 16, 16), (2, 3, 24, 24)], "'blocks.0.attn' (_Attention)"),
    (functools.partial(TinyViT, mask=True), (1, 3, 16, 16), [(3, 3, 16, 16)], "'blocks.0.attn' (_Attention)"),
    (TinyCSP, (1, 3, 8, 8), [(3, 3, 8, 8), (2, 3, 12, 10)], "'stage' (_CrossStage): node 'split'"),
])
def test_blocking_modules_run_as_graphs_in_the_users_class(make, shape, others, first):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    before = state_hash(model)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert type(small) is type(model) and state_hash(model) == before
    # The module traced alone leaves nothing on the user's module (torch.fx keeps constants on its root).
    assert not [k for m in model.modules() for k in vars(m) if k.startswith("_tensor_constant")]
    rec = thin_record(small)
    assert rec.returns == "module" and f" (first: {first}" in rec.reason
    assert sorted(small.state_dict()) == sorted(model.state_dict())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    ref = _reference(model, StructurePrune(0.5), x)
    with torch.no_grad():
        for s in [shape, *others]:  # other batch sizes and token counts / image sizes
            y = torch.randn(s)
            torch.testing.assert_close(small(y), ref(y), rtol=1e-4, atol=1e-5)
            assert small.forward_features(y).shape[0] == s[0]  # the class's other methods run (fewer channels)
    small.train()
    small(torch.randn(others[0])).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())
    # output="module" stays strict: the module and what blocks it are named.
    with pytest.raises(ValueError, match=r"cannot come back as its own class: module '.*' \(_"):
        fxcondensa.thin(model, StructurePrune(0.5), x, output="module")
    assert state_hash(model) == before


class _RootLiteral(nn.Module):
    """The literal sits in the model's own forward: no submodule can hold the rewrite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        y = self.conv(x).relu()
        return self.head(y.view(y.shape[0], 64, -1).mean(-1))


def test_a_literal_in_the_models_own_forward_still_returns_the_graph_with_why():
    torch.manual_seed(0)
    small = fxcondensa.thin(_RootLiteral(), StructurePrune(0.5), torch.randn(1, 3, 8, 8))
    rec = thin_record(small)
    assert isinstance(small, torch.fx.GraphModule) and rec.returns == "graph"
    assert "the model's own forward cannot run as its thinned graph" in rec.reason


def test_a_hybrid_deep_copies_saves_and_loads_back_as_its_class(tmp_path):
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(1, 3, 16, 16)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    y = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(small)(y), small(y))
        fxcondensa.save_thinned(small, tmp_path / "t.pt")
        back = fxcondensa.load_thinned(tmp_path / "t.pt", TinyViT())
        assert type(back) is TinyViT and isinstance(back.blocks[0].attn, torch.fx.GraphModule)
        torch.testing.assert_close(back(y), small(y))
    assert thin_record(back).reason == thin_record(small).reason
    # A pickle would carry the swapped module's generated code: refused, with what to do.
    with pytest.raises(TypeError, match=r"'blocks.0.attn'.*save_thinned"):
        pickle.dumps(small)


def test_timm_relpos_vit_comes_back_as_its_class_with_attention_as_graphs():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit_relpos", pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert type(small) is type(model) and "(RelPosAttention)" in thin_record(small).reason
    ref = _reference(model, StructurePrune(0.5), x)
    with torch.no_grad():
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(small(y), ref(y), rtol=1e-4, atol=1e-5)
        assert small.forward_features(y).shape[0] == 2

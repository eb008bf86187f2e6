"""head_dim columns in the user's own class: a timm Attention takes its new head width from the rewritten
reshape and keeps the dense scale; where a class cannot express it, "auto" returns the graph with the reason."""

from __future__ import annotations

import pytest
import torch
from _models import bench_coverage, state_hash

import fxcondensa
from fxcondensa.schemes import StructurePrune

_bench = bench_coverage()


def _vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    _bench.randomize_constants(model)
    return model


@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_timm_vit_head_dim_comes_back_as_its_class_exact(attention):
    model = _vit()
    before = state_hash(model)
    x = torch.randn(1, 3, 32, 32)
    scheme = StructurePrune(0.5, attention=attention)
    small = fxcondensa.thin(model, scheme, x, output="module")  # checked inside against the compressed model
    attn, dense = small.blocks[0].attn, model.blocks[0].attn
    assert type(small) is type(model) and state_hash(model) == before
    assert attn.head_dim < dense.head_dim and attn.scale == dense.scale  # the dense scale, as compressed
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
    if attention == "both":
        assert attn.num_heads <= dense.num_heads
    ref = fxcondensa.compress(model, scheme, x)
    fresh = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(fresh), ref(fresh), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(small.forward_head(small.forward_features(fresh)), small(fresh), rtol=0, atol=0)


def test_head_dim_the_class_cannot_express_is_refused_with_the_reason():
    """GPT-2 scales its scores by the value's width, which the columns change: its forward cannot follow
    ("auto" returns the graph with this reason in the record)."""
    torch.manual_seed(0)
    model, x, _, _ = _bench.build_hf("gpt2-lm")
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"thin\(output='module'\): GPT2LMHeadModel cannot come back as its own "
                                         r"class: the model's own forward (fails on the thinned modules|differs from the compressed model)"):
        fxcondensa.thin(model, StructurePrune(0.5, attention="head_dim"), x, output="module")
    assert state_hash(model) == before

"""MAC targets with head_dim pruning: ``StructurePrune(target_flops=t, attention="head_dim" | "both")``.

The search's MAC model must see the head_dim columns (q/k/v projection rows, ``q @ k^T``, ``attn @ v``, the
out-projection's input columns): every test thins the model, counts the thinned model's MACs with
``profile_costs`` (the project's own counting), and checks that the fraction is the one the search recorded,
within the target, and (for ViT-like models) close to it. Each thinned model must compute what ``compress``
computes (``_exact``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_attention import Encoder, _exact, _hf
from torch import nn

import fxcondensa
from fxcondensa import thin
from fxcondensa.capture.records import thin_record
from fxcondensa.passes.costs import profile_costs
from fxcondensa.schemes import StructurePrune


def _macs(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return sum(c.macs for c in profile_costs(model, x))


def _reached(model: nn.Module, small: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], target: float) -> float:
    """The thinned model's MAC fraction, checked against the record the search left. ``small`` is the thinned
    graph: the search counts its nodes (a capture of the user's class may split ops otherwise)."""
    reached = _macs(small, x) / _macs(model, x)
    record = thin_record(small).target
    assert record is not None and record.kind == "flops" and record.target == target
    assert record.reached == pytest.approx(reached, abs=1e-9)  # the MAC model predicted the thinned model
    return reached


def _columns_went(small: nn.Module) -> bool:
    return any(g.group.endswith("(head_dim)") and g.kept < g.channels for g in thin_record(small).groups)


def _vit(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "torchvision":  # vit_b_32's architecture (nn.MultiheadAttention), small
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=6,
                                                    hidden_dim=192, mlp_dim=768)
    import timm

    # vit_tiny's width and heads (192, 3: fused qkv and scaled_dot_product_attention), two blocks, 32 x 32
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2,
                                                            num_heads=3, num_classes=10)


@pytest.mark.parametrize(("kind", "attention", "target"), [("torchvision", "head_dim", 0.5),
                                                            ("torchvision", "both", 0.3),
                                                            ("timm", "head_dim", 0.3),
                                                            ("timm", "both", 0.5)])
def test_vit_meets_the_mac_target_closely_with_head_dim_columns(kind, attention, target):
    model, x = _vit(kind).eval(), torch.randn(1, 3, 32, 32)
    small = _exact(model, x, StructurePrune(target_flops=target, attention=attention), output="graph")
    reached = _reached(model, small, x, target)
    assert target - 0.03 < reached <= target
    assert _columns_went(small)
    if kind == "torchvision":
        attn = small.get_submodule("encoder.layers.encoder_layer_0.self_attention")
        assert attn.head_dim < 32 and (attn.num_heads == 6) == (attention == "head_dim")
    else:
        qkv = small.get_submodule("blocks.0.attn.qkv")
        assert qkv.out_features < 3 * 192 and (attention == "both" or qkv.out_features % 9 == 0)  # 3 x 3 heads


@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_bert_meets_the_mac_target_with_head_dim_columns(attention):
    model, x = _hf("bert")
    small = _exact(model, x, StructurePrune(target_flops=0.5, attention=attention), output="graph")
    reached = _reached(model, small, x, 0.5)
    assert 0.4 < reached <= 0.5  # 4 heads of 8 columns: coarser steps than a ViT's
    assert _columns_went(small)
    rows = small.get_submodule("bert.encoder.layer.0.attention.self.query").weight.shape[0]  # export: plain modules
    assert rows < 32 and (attention == "both" or rows % 4 == 0)


def test_head_dim_search_counts_what_whole_heads_cannot_reach():
    """A target between two head counts: head_dim reaches it more closely than whole heads of a model with
    few heads, and both thin exactly to what the search predicted."""
    torch.manual_seed(0)
    model, x = Encoder(c=32, heads=2, head_dim=16, style="separate"), torch.randn(2, 6, 5)
    small = _exact(model, x, StructurePrune(target_flops=0.6, attention="head_dim"), output="graph")
    reached = _reached(model, small, x, 0.6)
    assert reached <= 0.6 and _columns_went(small)
    for b in range(2):  # every head stays, with fewer columns
        q = small.get_submodule(f"attn.{b}.q").out_features
        assert q % 2 == 0 and q < 32


def test_report_shows_the_mac_target_and_what_it_reached():
    torch.manual_seed(0)
    model, x = Encoder(c=32, heads=4, head_dim=8, style="fused_sdpa").eval(), torch.randn(2, 6, 5)
    small = thin(model, StructurePrune(target_flops=0.45, attention="both"), x, output="graph")
    reached = _reached(model, small, x, 0.45)
    rep = fxcondensa.report(model, small, x, latency=False)
    assert rep.totals["flop_target"]["reached"] == pytest.approx(reached)
    assert f"MAC target: 0.450 of the dense MACs; the scheme's search reached {reached:.3f}" in str(rep)


def test_target_latency_with_head_dim_is_refused_with_what_to_use():
    with pytest.raises(ValueError, match=r"attention='head_dim' cannot take target_latency=0\.6.*Give "
                                         r"target_flops=0\.6 .* or attention=None"):
        StructurePrune(target_latency=0.6, attention="head_dim")


# Each example compresses and thins twice (seconds): shrinking a failure would take many minutes, and the
# failing example is printed as drawn.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(target=st.floats(0.2, 0.9), attention=st.sampled_from(["head_dim", "both"]),
       style=st.sampled_from(["fused_sdpa", "fused_index", "separate", "gqa_sdpa", "gqa_repeat"]),
       heads=st.sampled_from([2, 4]), head_dim=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_mac_target_property(target, attention, style, heads, head_dim, seed):
    torch.manual_seed(seed)  # "gqa" styles have heads // 2 key/value heads: one (multi-query) where heads is 2
    kv = heads // 2 if style.startswith("gqa") else None
    model, x = Encoder(c=32, heads=heads, head_dim=head_dim, style=style, kv_heads=kv), torch.randn(2, 6, 5)
    small = _exact(model, x, StructurePrune(target_flops=target, attention=attention), output="graph")
    reached = _reached(model, small, x, target)
    # Below target, unless no density reaches it (every group keeps a channel; the output layer stays whole):
    # then the search keeps the smallest model it can.
    assert reached <= target + 1e-9 or thin_record(small).target.density == 0.0
    if attention == "head_dim":
        assert all(small.get_submodule(f"attn.{b}.proj").in_features % heads == 0 for b in range(2))


def test_both_keeps_two_key_value_heads_so_that_their_columns_can_go():
    """thin's second stage finds columns where a reshape splits two or more heads: "both" keeps two key/value
    heads of a grouped-query attention that has two, and removes columns instead (the target still met)."""
    torch.manual_seed(0)
    model, x = Encoder(c=32, heads=4, head_dim=8, style="gqa_sdpa", kv_heads=2), torch.randn(2, 6, 5)
    small = _exact(model, x, StructurePrune(target_flops=0.3, attention="both"), output="graph")
    assert _reached(model, small, x, 0.3) <= 0.3
    for b in range(2):
        k, v = (small.get_submodule(f"attn.{b}.{n}").out_features for n in "kv")
        assert k % 2 == 0 and v % 2 == 0 and (k < 16 or v < 16)  # two kv heads, fewer columns


def test_head_dim_on_multi_query_attention():
    """One key/value head (multi-query): its view (B, T, d) -> (B, T, 1, d) is a split into one head, so its
    columns pair with every query head's and go in thin's second stage, as the MAC search counted."""
    torch.manual_seed(0)
    model, x = Encoder(c=32, heads=2, head_dim=4, style="gqa_sdpa", kv_heads=1), torch.randn(2, 6, 5)
    small = _exact(model, x, StructurePrune(target_flops=0.5, attention="head_dim"), output="graph")
    assert _reached(model, small, x, 0.5) <= 0.5
    for b in range(2):
        q, k, v, proj = (getattr(small.get_submodule(f"attn.{b}.{n}"), f) for n, f in
                         (("q", "out_features"), ("k", "out_features"), ("v", "out_features"), ("proj", "in_features")))
        assert q == 2 * k and proj == 2 * v  # two query heads, one key/value head, the same columns in each
    assert any(small.get_submodule(f"attn.{b}.{n}").out_features < 4 for b in range(2) for n in "kv")


class _UnsqueezeGate(nn.Module):
    """A view that inserts a size-1 dim, (B, T, d) -> (B, T, 1, d), feeding no attention product."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.inp(x).view(b, t, 1, 8)
        return self.out((y * torch.sigmoid(y)).view(b, t, 8))


def test_single_head_view_counts_only_where_attention_reads_it():
    """The one-head split of multi-query attention is recognised where a matmul or SDPA consumes it; the same
    view elsewhere stays an unsqueeze (its channels are no head_dim columns)."""
    from fxcondensa.passes.analysis import analyze
    from fxcondensa.rules.heads import head_dim_channels

    x = torch.randn(2, 6, 5)
    gate = fxcondensa.trace(_UnsqueezeGate().eval(), x)
    assert not bool(head_dim_channels(analyze(gate, head_dim=True)).any())
    mqa = fxcondensa.trace(Encoder(c=32, heads=2, head_dim=4, style="gqa_sdpa", kv_heads=1, blocks=1).eval(), x)
    assert int(head_dim_channels(analyze(mqa, head_dim=True)).sum()) == 8  # q/k columns and v columns, 4 each


def test_thin_without_a_scheme_finds_multi_query_columns():
    """A model whose multi-query columns were zeroed elsewhere (here: compress) loses them in thin(model) too,
    though the first analysis finds no head there."""
    torch.manual_seed(0)
    model, x = Encoder(c=32, heads=2, head_dim=4, style="gqa_sdpa", kv_heads=1), torch.randn(2, 6, 5)
    compressed = fxcondensa.compress(model.eval(), StructurePrune(target_flops=0.5, attention="head_dim"), x)
    small = thin(compressed, None, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressed(x), rtol=1e-4, atol=1e-5)
    assert any(small.get_submodule(f"attn.{b}.{n}").out_features < 4 for b in range(2) for n in "kv")

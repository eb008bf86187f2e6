"""head_dim pruning inside attention heads: ``StructurePrune(..., attention="head_dim" | "both")``.

Column ``j`` of every head of an attention goes together (q's and k's columns pair in ``q @ k^T``, v's with the
out-projection), every head keeps the same head_dim, and the softmax keeps the dense scale. Each model is
compressed and thinned; the thinned model must compute what ``compress`` computes (``thin`` checks it, and
``_exact`` compares again).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import Encoder, X, _exact, _hf, _SelfMHA
from torch import nn

import fxcondensa
from fxcondensa import compress, thin
from fxcondensa.nn import ThinMultiheadAttention
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.thin import rethin
from fxcondensa.records import thin_record
from fxcondensa.rules.attention import head_dim_channels
from fxcondensa.schemes import StructurePrune

STYLES = ["fused_sdpa", "fused_index", "separate", "gqa_sdpa", "gqa_repeat"]


def _widths(small: nn.Module, style: str, b: int) -> dict[str, int]:
    names = ["qkv", "proj"] if style.startswith("fused") else ["q", "k", "v", "proj"]
    return {n: small.get_submodule(f"attn.{b}.{n}").weight.shape[0 if n != "proj" else 1] for n in names}


@pytest.mark.parametrize("style", STYLES)
def test_head_dim_keeps_every_head_and_thins_columns_exactly(style):
    torch.manual_seed(0)
    kv = 2 if style.startswith("gqa") else None
    model = Encoder(style=style, heads=4, kv_heads=kv, head_dim=4)
    small = _exact(model, X, StructurePrune(0.5, attention="head_dim"))
    for b in range(2):
        w = _widths(small, style, b)
        if style.startswith("fused"):  # one reshape (B, N, 3, H, D'): q, k and v keep the same columns
            assert w["qkv"] == 3 * w["proj"] and w["proj"] % 4 == 0 and w["proj"] < 16
        else:
            q_cols, v_cols = w["q"] // 4, w["proj"] // 4  # every query head stays
            assert w["q"] == 4 * q_cols and w["k"] == (kv or 4) * q_cols and w["v"] == (kv or 4) * v_cols
            assert q_cols < 4 and v_cols < 4
    columns = [g for g in thin_record(small).groups if g.group.endswith("(head_dim)")]
    assert columns and all(g.kept < g.channels for g in columns)


@pytest.mark.parametrize("style", STYLES)
def test_both_prunes_heads_and_columns_exactly(style):
    torch.manual_seed(2)
    kv = 2 if style.startswith("gqa") else None
    model = Encoder(style=style, heads=4, kv_heads=kv, head_dim=4)
    small = _exact(model, X, StructurePrune(0.3, attention="both"))
    widths = [_widths(small, style, b) for b in range(2)]
    # sqrt(0.3) of 4 heads and of 4 columns: fewer than 4 * 4 q rows, and neither whole heads alone
    # (a multiple of 4) nor whole columns alone can explain the count.
    q = [w["qkv"] // 3 if "qkv" in w else w["q"] for w in widths]
    assert all(n < 16 for n in q)
    assert any(g.group.endswith("(head_dim)") and g.kept < g.channels for g in thin_record(small).groups)


@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_multihead_attention_loses_columns_with_the_dense_scale(attention):
    torch.manual_seed(1)
    small = _exact(_SelfMHA(True), X, StructurePrune(0.5, attention=attention))
    attn = small.attn
    assert isinstance(attn, ThinMultiheadAttention) and attn.head_dim < 4
    assert attn.scale == pytest.approx(0.5)  # 1 / sqrt(4), the dense head_dim
    assert attn.in_proj_weight.shape[0] == 3 * attn.num_heads * attn.head_dim
    assert (attn.num_heads == 4) == (attention == "head_dim")


def test_sdpa_keeps_the_dense_softmax_scale():
    torch.manual_seed(3)
    model = Encoder(style="fused_sdpa", heads=2, head_dim=4, blocks=1).eval()
    scheme = StructurePrune(0.5, attention="head_dim")
    small = thin(model, scheme, X)
    calls = [n for n in small.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(calls) == 1 and calls[0].kwargs["scale"] == pytest.approx(0.5)
    assert small.get_submodule("attn.0.proj").in_features < 8  # columns went, so the default scale would be another one
    expected = compress(model, scheme, X)(X)
    with torch.no_grad():
        torch.testing.assert_close(small(X), expected, rtol=1e-4, atol=1e-5)
        # The scale recomputed from the thinned head_dim (SDPA's default) computes something else.
        calls[0].kwargs = {k: v for k, v in calls[0].kwargs.items() if k != "scale"}
        small.recompile()
        assert not torch.allclose(small(X), expected, rtol=1e-4, atol=1e-5)


class _ScaleFromShape(nn.Module):
    """Attention whose scale is computed from q's width at run time (``q.size(-1) ** -0.5``)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_scale_computed_from_the_width_leaves_head_dim_whole_with_a_reason():
    torch.manual_seed(4)
    small = _exact(_ScaleFromShape(), torch.randn(2, 5, 8), StructurePrune(0.5, attention="head_dim"))
    assert small.proj.in_features == 8
    reasons = [f.reason for f in thin_record(small).frozen if f.group.endswith("(head_dim)")]
    assert reasons and "is used as a number" in reasons[0]


def test_thin_without_scheme_removes_zero_columns_and_the_recipe_rebuilds_them(tmp_path):
    torch.manual_seed(5)
    model = Encoder(style="separate", heads=4, head_dim=6).eval()
    compressed = compress(model, StructurePrune(0.5, attention="both"), X)
    small = thin(compressed, example_inputs=X)  # the second stage finds the zero columns by itself
    assert any(g.group.endswith("(head_dim)") and g.kept < g.channels for g in thin_record(small).groups)
    direct = thin(model, StructurePrune(0.5, attention="both"), X)
    assert {k: v.shape for k, v in direct.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    again = rethin(compressed, thin_record(small).keep, X)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    fxcondensa.save_thinned(small, tmp_path / "m.thin")
    loaded = fxcondensa.load_thinned(tmp_path / "m.thin", compressed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), small(X))


def test_head_dim_analysis_makes_one_channel_per_column():
    gm = fxcondensa.trace(Encoder(style="fused_sdpa", heads=4, head_dim=3, blocks=1), X)
    assert int(head_dim_channels(analyze(gm, head_dim=True)).sum()) == 3  # q, k and v of 4 heads share 3
    assert not bool(head_dim_channels(analyze(gm)).any())  # the default analysis has heads instead


@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_head_dim_on_a_model_without_attention_raises(attention):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"attention='{attention}'\): the model Sequential has no attention heads "
                                         r".*reshaped into .* nn.MultiheadAttention"):
        thin(model, StructurePrune(0.5, attention=attention), torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_head_dim_options_are_validated_and_rebuild_from_repr():
    for attention in ("head_dim", "both"):
        s = StructurePrune(0.4, attention=attention, align=2)
        assert eval(repr(s), {"StructurePrune": StructurePrune}) == s
        with pytest.raises(ValueError, match=f"attention='{attention}' needs a density"):
            StructurePrune(target_flops=0.5, attention=attention)


def test_llama_rotary_embedding_keeps_query_key_columns_with_a_reason():
    """Rotary embeddings multiply q and k by computed cos/sin tables over head_dim: their columns stay (with
    the reason), while v's columns and the out-projection thin exactly."""
    model, x = _hf("llama")
    small = _exact(model, x, StructurePrune(0.5, attention="head_dim"))
    layer = small.get_submodule("model.layers.0.self_attn")
    assert layer.q_proj.weight.shape[0] == 32 and layer.v_proj.weight.shape[0] < 16  # 4 heads x 8, 2 kv heads x 8
    frozen = [f for f in thin_record(small).frozen if f.group.endswith("q_proj (head_dim)")]
    assert frozen and "cannot be sliced" in frozen[0].reason


@settings(max_examples=10, deadline=None)
@given(heads=st.sampled_from([2, 4]), head_dim=st.integers(2, 6), c=st.integers(3, 12),
       style=st.sampled_from(STYLES), attention=st.sampled_from(["head_dim", "both"]),
       density=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_head_dim_pruning_property(heads, head_dim, c, style, attention, density, seed):
    torch.manual_seed(seed)
    kv = max(1, heads // 2) if style.startswith("gqa") else None
    model = Encoder(c, heads, head_dim, style, kv, blocks=1)
    small = _exact(model, torch.randn(2, 6, 5), StructurePrune(density, attention=attention))
    kept = [g for g in thin_record(small).groups if g.group.endswith("(head_dim)")]
    assert all(1 <= g.kept <= g.channels for g in kept)
    w = small.get_submodule("attn.0.proj").in_features
    assert w <= heads * head_dim and (attention == "both" or w % heads == 0)  # head_dim: every head stays
    assert math.isfinite(float(small(torch.randn(2, 6, 5)).sum()))

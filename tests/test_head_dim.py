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
from fxcondensa.capture.records import thin_record
from fxcondensa.nn import ThinMultiheadAttention
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.thin import rethin
from fxcondensa.rules.heads import head_dim_channels
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
    small = thin(model, scheme, X, output="graph")  # the graph, to read its sdpa call
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
        with pytest.raises(ValueError, match=rf"attention='{attention}' cannot take target_latency=0.5: the latency "
                                             r"search does not see head_dim columns\. Give target_flops=0.5"):
            StructurePrune(target_latency=0.5, attention=attention)
        s = StructurePrune(target_flops=0.5, attention=attention)  # the MAC search counts head_dim columns
        assert eval(repr(s), {"StructurePrune": StructurePrune}) == s


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_llama_rotary_embedding_prunes_query_key_column_pairs(implementation, attention):
    """Rotary embeddings pair column ``j`` of q and k with ``j + D/2`` (``rotate_half``) and with frequency
    ``j mod D/2`` of the ``inv_freq`` buffer, shared by every layer: q/k columns go in pairs, the buffer loses the
    pairs' frequencies, the softmax keeps the dense scale, and the thinned model computes what ``compress``
    computes (captured with torch.export; SDPA and the eager matmul / softmax path)."""
    model, x = _hf("llama")
    model.set_attn_implementation(implementation)
    small = _exact(model, x, StructurePrune(0.5, attention=attention))
    inv_freq = small.get_submodule("model.rotary_emb").inv_freq
    columns = 2 * inv_freq.numel()  # one frequency per kept pair of q/k columns, in every layer
    assert columns < 8
    for layer in range(2):
        attn = small.get_submodule(f"model.layers.{layer}.self_attn")
        q, k = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        assert q % columns == 0 and k % columns == 0 and q // columns == 2 * (k // columns)  # 2 query heads per kv head
        assert attention == "both" or q // columns == 4  # head_dim alone keeps every head
    dense = model.get_submodule("model.rotary_emb").inv_freq
    where = [int(torch.nonzero(dense == f)[0]) for f in inv_freq]
    assert where == sorted(set(where))  # kept frequencies, in order, unchanged
    assert not [f for f in thin_record(small).frozen if f.group.endswith("(head_dim)")]
    # The dense softmax scale 1 / sqrt(8): SDPA's explicit scale, or the eager path's literal product.
    calls = [n for n in small.graph.nodes
             if getattr(n.target, "overloadpacket", None) is torch.ops.aten.scaled_dot_product_attention]
    literal = [n for n in small.graph.nodes if getattr(n.target, "overloadpacket", None) is torch.ops.aten.mul
               and n.args[1:] == (pytest.approx(8 ** -0.5),)]
    assert len(calls if implementation == "sdpa" else literal) == 2
    assert all(n.kwargs["scale"] == pytest.approx(8 ** -0.5) for n in calls)


class _RotaryAttention(nn.Module):
    """Self-attention with Hugging Face's rotary embedding written out: an ``inv_freq`` buffer, its outer
    product with the positions (``outer="mul"``: transformers 5's broadcast product, ``"matmul"``: the
    ``inv_freq[None, :, None] @ positions[:, None, :]`` of earlier versions), ``emb = cat((freqs, freqs), -1)``,
    cos and sin, and ``rotate_half`` with ``x[..., D/2:]`` and ``x[..., :D/2]`` (``computed_half``: ``D/2`` read as
    ``x.shape[-1] // 2``, as Hugging Face writes it; torch.export makes it a literal). ``interleaved=True`` pairs
    neighbouring columns instead (GPT-J's ``rotate_every_two``: strided slices, ``stack``, tables made with
    ``repeat_interleave``), which the rules do not follow."""

    def __init__(self, c: int = 16, heads: int = 2, d: int = 8, outer: str = "mul", interleaved: bool = False,
                 sdpa: bool = True, computed_half: bool = True):
        super().__init__()
        self.h, self.d, self.outer, self.interleaved, self.sdpa = heads, d, outer, interleaved, sdpa
        self.computed_half = computed_half
        self.q, self.k, self.v = (nn.Linear(c, heads * d) for _ in range(3))
        self.o = nn.Linear(heads * d, c)
        self.register_buffer("inv_freq", 1.0 / (100 ** (torch.arange(0, d, 2).float() / d)), persistent=False)

    def tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = x.shape[0], x.shape[1]
        pos = torch.arange(n, device=x.device)[None].expand(b, -1)
        if self.outer == "matmul":
            freqs = (self.inv_freq[None, :, None].float().expand(b, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        else:
            freqs = pos[..., None].float() * self.inv_freq
        emb = torch.repeat_interleave(freqs, 2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            return torch.stack((-t[..., 1::2], t[..., ::2]), dim=-1).flatten(-2)
        half = t.shape[-1] // 2 if self.computed_half else self.d // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        cos, sin = self.tables(x)
        q = q * cos + self.rotate(q) * sin
        k = k * cos + self.rotate(k) * sin
        if self.sdpa:  # the default scale: rewritten to the dense one
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _rotary_exact(model: nn.Module, x: torch.Tensor, scheme: StructurePrune, capture: str) -> nn.Module:
    model = model.eval()
    small = thin(model, scheme, x, capture=capture)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compress(model, scheme, x)(x), rtol=1e-4, atol=1e-5)
    return small


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize(("outer", "capture", "computed_half"), [
    ("mul", "fx", True), ("mul", "fx", False), ("mul", "export", True), ("matmul", "export", False)])
def test_rotary_attention_prunes_column_pairs_exactly(outer, capture, computed_half, sdpa):
    """torch.fx keeps ``x.shape[-1] // 2`` as arithmetic on the width (the slice bounds become the kept
    counts); torch.export records literal halves; the outer product is a broadcast ``mul`` or a ``matmul``
    (torch.fx cannot trace the ``expand`` of that form, whose buffer it does not proxy)."""
    torch.manual_seed(7)
    model = _RotaryAttention(heads=2, d=8, outer=outer, sdpa=sdpa, computed_half=computed_half)
    small = _rotary_exact(model, torch.randn(2, 5, 16), StructurePrune(0.5, attention="head_dim"), capture)
    q, k = small.get_submodule("q").weight.shape[0], small.get_submodule("k").weight.shape[0]
    assert q == k < 16 and q % 2 == 0 and small.inv_freq.numel() == q // 4  # 2 heads, columns in pairs
    assert not [f for f in thin_record(small).frozen if f.group.endswith("(head_dim)")]


def test_rotary_analysis_pairs_column_j_with_j_plus_half():
    gm = fxcondensa.trace(_RotaryAttention(heads=2, d=8), torch.randn(2, 5, 16))
    analysis = analyze(gm, head_dim=True)
    for name in ("view", "view_1"):  # q and k split into heads: one column per head_dim index
        channel = analysis.channel_of[analysis.info(name).atoms]
        assert all(channel[j] == channel[j + 4] for j in range(4))
        assert len(set(channel[:4].tolist())) == 4
    q, k = (analysis.channel_of[analysis.info(n).atoms] for n in ("view", "view_1"))
    assert torch.equal(q, k)  # summed over together in q @ k^T
    assert not bool(analysis.frozen_channels()[q].any())


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([2, 3]), half=st.integers(1, 4), density=st.floats(0.1, 0.9),
       sdpa=st.booleans(), computed_half=st.booleans(), seed=st.integers(0, 2**16))
def test_rotary_column_pairs_property(heads, half, density, sdpa, computed_half, seed):
    torch.manual_seed(seed)
    model = _RotaryAttention(c=8, heads=heads, d=2 * half, sdpa=sdpa, computed_half=computed_half)
    x = torch.randn(2, 4, 8)
    small = _rotary_exact(model, x, StructurePrune(density, attention="head_dim"), "fx")
    q, k = small.get_submodule("q").weight.shape[0], small.get_submodule("k").weight.shape[0]
    assert q == k == 2 * heads * small.inv_freq.numel() and 1 <= small.inv_freq.numel() <= half
    with torch.no_grad():  # fx capture: any sequence length
        assert math.isfinite(float(small(torch.randn(2, 7, 8)).sum()))


class _WidthBoundsTokens(nn.Module):
    """The channel width bounds a slice of the tokens: after thinning it would count other tokens."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h[:, : h.shape[-1] // 2])


def test_width_bounding_a_slice_of_another_dim_stays_whole_with_a_reason():
    torch.manual_seed(9)
    small = _exact(_WidthBoundsTokens(), torch.randn(2, 12, 8), StructurePrune(0.5))
    assert small.a.out_features == 8
    reasons = [f.reason for f in thin_record(small).frozen if f.group == "a"]
    assert reasons and "is used as a number" in reasons[0]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rotary_embedding_the_rules_cannot_pair_keeps_query_key_columns_with_a_reason(capture):
    """Interleaved rotary (neighbouring columns paired, the table built with ``repeat_interleave``): q and k
    keep every column with the reason, ``inv_freq`` stays whole, v's columns still go."""
    torch.manual_seed(8)
    model = _RotaryAttention(heads=2, d=8, interleaved=True)
    small = _rotary_exact(model, torch.randn(2, 5, 16), StructurePrune(0.5, attention="head_dim"), capture)
    assert small.get_submodule("q").weight.shape[0] == small.get_submodule("k").weight.shape[0] == 16
    assert small.inv_freq.numel() == 4 and small.get_submodule("v").weight.shape[0] < 16
    reasons = " ".join(f.reason for f in thin_record(small).frozen if f.group == "q (head_dim)")
    assert "computed from the buffer 'inv_freq'" in reasons and "repeat_interleave" in reasons


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


def test_sdpa_cost_counts_the_value_head_dim_apart_from_the_query_one():
    """Regression: head_dim pruning can leave v with other columns than q and k; ``attn @ v`` costs v's, not
    q's (the counter used q's for both products)."""
    from fxcondensa.passes.costs import profile_costs

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    (cost,) = [c for c in profile_costs(Attn(), (q, k, v)) if c.macs]
    assert cost.macs == 2 * 3 * 5 * 7 * (8 + 4)  # q @ k^T over 8 columns, attn @ v producing 4


def test_inplace_head_dim_thins_columns_exactly():
    # The scheme says on the graph record, as it annotates, that it prunes head_dim columns: thin reads that
    # after the scheme ran, inplace or not (read before it, the columns stayed whole).
    torch.manual_seed(0)
    model = Encoder(style="separate", heads=4, head_dim=4).eval()
    scheme = StructurePrune(0.5, attention="head_dim")
    expected = compress(model, scheme, X)(X)
    small = thin(model, scheme, X, inplace=True)
    assert small is model and _widths(model, "separate", 0)["q"] < 16
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=1e-4, atol=1e-5)

"""Swin window attention thinned exactly: heads and head_dim columns of timm's ``WindowAttention`` (its relative
position bias table gathered by an index buffer, the shifted-window mask reshaped with a literal head count)
and of torchvision's ``shifted_window_attention`` (Swin V1, and V2's cosine attention), captured with torch.fx
and torch.export.

Every model is thinned and compared with the compressed dense model (``trace`` + the scheme's ``pi`` and
``delta``) on a fresh input. Weights are random, with random norm affines, linear biases and bias tables, so
that nothing is zero by accident.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from fxcondensa import thin, trace
from fxcondensa.capture.records import thin_record
from fxcondensa.nn import window_attention
from fxcondensa.passes.analysis import analyze, removable_channels
from fxcondensa.rules.heads import head_channels, head_dim_channels
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FRESH = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.Linear) and m.bias is not None:  # Swin V2's key bias too (zeroed in forward)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _timm_swin(**kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _randomize(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                                        depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3, **kwargs))


def _torchvision_swin(v2: bool = False) -> nn.Module:
    import torchvision
    from torchvision.models import swin_transformer as tv

    torch.manual_seed(5)
    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if v2 else {}
    return _randomize(torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                                         num_heads=[2, 4], window_size=[4, 4], num_classes=3,
                                                         **extra), seed=1)


def _exact(model: nn.Module, scheme_args: dict, capture: str = "fx") -> nn.Module:
    """Thin ``model`` and check it against the compressed dense model of the same capture on a fresh input."""
    small = thin(model, StructurePrune(0.5, **scheme_args), X, capture=capture, output="graph")  # read as a graph
    compressed = trace(model, X, capture=capture)
    scheme = StructurePrune(0.5, **scheme_args)
    with torch.no_grad():
        scheme.pi(compressed)
        scheme.delta(compressed)
        torch.testing.assert_close(small(FRESH), compressed(FRESH), rtol=RTOL, atol=ATOL)
    return small


def _params(m: nn.Module, suffix: str) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in m.named_parameters() if k.endswith(suffix)}


# ---------------------------------------------------------------------------------------------- timm heads

@pytest.mark.parametrize("capture", ["fx", "export"])
def test_timm_swin_heads_go_with_their_bias_table_columns(capture):
    model = _timm_swin()
    small = _exact(model, {}, capture)
    tables, qkv = _params(small, "relative_position_bias_table"), _params(small, "attn.qkv.weight")
    dense_tables = _params(model, "relative_position_bias_table")
    assert sum(t[1] for t in tables.values()) < sum(t[1] for t in dense_tables.values())  # heads went
    for key, t in tables.items():  # each kept head keeps its table column and its 3 * 8 q/k/v rows
        assert t[0] == 49 and qkv[key.replace("relative_position_bias_table", "qkv.weight")][0] == 3 * 8 * t[1]
    shifted = "layers.1.blocks.1.attn.relative_position_bias_table"  # a shifted block: mask reshaped by heads
    assert tables[shifted][1] < dense_tables[shifted][1]
    assert [g.group for g in thin_record(small).groups if g.frozen] == ["head.fc"]


def test_timm_swin_head_goes_whatever_its_bias_table_column_holds():
    """A head whose q, k and v rows are zero outputs exactly zero, whatever the bias added to its logits: it
    goes, and its table column with it."""
    model = _timm_swin()
    attn = model.layers[0].blocks[1].attn  # 2 heads of 8, shifted windows: q rows 0-15, k 16-31, v 32-47
    with torch.no_grad():
        for part in range(3):  # head 1
            attn.qkv.weight[16 * part + 8:16 * part + 16] = 0
            attn.qkv.bias[16 * part + 8:16 * part + 16] = 0
        assert float(attn.relative_position_bias_table[:, 1].abs().min()) > 0
    small = thin(model, None, X)
    assert small.get_submodule("layers.0.blocks.1.attn").relative_position_bias_table.shape == (49, 1)
    assert small.get_submodule("layers.0.blocks.0.attn").relative_position_bias_table.shape == (49, 2)
    with torch.no_grad():
        torch.testing.assert_close(small(FRESH), model(FRESH), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_timm_swin_head_dim_columns_go_with_the_dense_scale(capture, attention):
    model = _timm_swin()
    small = _exact(model, {"attention": attention}, capture)
    tables, qkv = _params(small, "relative_position_bias_table"), _params(small, "attn.qkv.weight")
    columns = {k: qkv[k.replace("relative_position_bias_table", "qkv.weight")][0] // (3 * t[1])
               for k, t in tables.items()}
    assert min(columns.values()) < 8  # head_dim columns went
    if attention == "head_dim":  # every head stays
        assert tables == _params(model, "relative_position_bias_table")
    scales = [n.args[1] for n in small.graph.nodes
              if n.target in (operator.mul, torch.ops.aten.mul.Tensor) and isinstance(n.args[1], float)]
    assert scales and all(s == pytest.approx(8 ** -0.5) for s in scales)  # timm's literal q * scale: dense


def test_timm_swin_fused_attention_keeps_heads_with_the_reason():
    """timm's experimental fused path adds the bias table and the window mask into one per-head SDPA mask:
    heads stay whole, with the reason; the stream still thins exactly."""
    model = _timm_swin()
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "relative_position_bias_table"):
            m.fused_attn = True
    small = _exact(model, {})
    frozen = {f.group: f.reason for f in thin_record(small).frozen}
    assert any("attn.qkv" in g and "per-head mask" in r for g, r in frozen.items())
    assert _params(small, "relative_position_bias_table") == _params(model, "relative_position_bias_table")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- indexing

class Gather(nn.Module):
    """A per-channel table gathered by an integer index buffer and added to a linear's output (dim 1 of the
    table follows the linear's channels), or the channels themselves gathered by an index (``on_channels``)."""

    def __init__(self, on_channels: bool):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
        self.table = nn.Parameter(torch.randn(5, 6))
        self.register_buffer("index", torch.tensor([4, 0, 2, 2, 1, 3, 0]))
        self.on_channels = on_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)  # (B, 7, 6)
        y = y[:, :, self.index[:6]] if self.on_channels else y + self.table[self.index].unsqueeze(0)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_gathered_table_follows_the_channels_and_a_gather_of_channels_freezes_them(capture):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    model = _randomize(Gather(on_channels=False))
    with torch.no_grad():
        model.fc.weight[1] = 0
        model.fc.bias[1] = 0
        model.table[:, 1] = 0  # channel 1 is zero after the add: out reads nothing there
    small = thin(model, None, x, capture=capture)
    assert small.get_parameter("fc.weight").shape[0] == 5 and tuple(small.get_parameter("table").shape) == (5, 5)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)
    a = analyze(trace(Gather(on_channels=True), x, capture=capture))
    reasons = [r for g in a.groups if g.name == "fc" for r in g.frozen]
    assert any("indexing along the channel dim with an index tensor" in r for r in reasons)


# -------------------------------------------------------------------------------------- torchvision Swin

def test_window_attention_computes_torchvisions_shifted_window_attention():
    from torchvision.models.swin_transformer import shifted_window_attention

    torch.manual_seed(3)
    x, wq, bq = torch.randn(2, 6, 6, 8), torch.randn(24, 8), torch.randn(24)
    wp, bp, bias = torch.randn(8, 8), torch.randn(8), torch.randn(1, 2, 16, 16)
    for logit in (None, torch.randn(2, 1, 1)):  # V1, and V2 (whose key bias is zeroed in forward)
        for shift in ([0, 0], [2, 2]):
            args = (x, wq, wp, bias, [4, 4], 2, shift, 0.0, 0.0, bq, bp, logit, False)
            expected = shifted_window_attention(*args)
            torch.testing.assert_close(window_attention(*args, head_dim=4), expected, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(window_attention(*args, head_dim=4, scale=0.5), expected, rtol=RTOL,
                                       atol=ATOL)  # V1 would differ: 0.5 is 4 ** -0.5
    with torch.no_grad():
        other = window_attention(x, wq, wp, bias, [4, 4], 2, [0, 0], qkv_bias=bq, proj_bias=bp, training=False,
                                 head_dim=4, scale=0.25)
    assert not torch.allclose(other, shifted_window_attention(x, wq, wp, bias, [4, 4], 2, [0, 0], 0.0, 0.0, bq, bp,
                                                              None, False))


def _calls(small: nn.Module) -> list[dict]:
    return [n.kwargs for n in small.graph.nodes if n.target is window_attention]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_torchvision_swin_heads_go_exactly(capture):
    model = _torchvision_swin()
    small = _exact(model, {}, capture)
    assert [g.group for g in thin_record(small).groups if g.frozen] == ["head"]
    tables = _params(small, "relative_position_bias_table")
    assert sum(t[1] for t in tables.values()) < sum(t[1] for t in _params(model, "relative_position_bias_table").values())
    if capture == "fx":
        assert all(c["head_dim"] == 8 and c["scale"] == pytest.approx(8 ** -0.5) for c in _calls(small))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("attention", ["head_dim", "both"])
def test_torchvision_swin_head_dim_columns_go_with_the_dense_scale(capture, attention):
    model = _torchvision_swin()
    small = _exact(model, {"attention": attention}, capture)
    qkv = _params(small, "attn.qkv.weight")
    assert sum(w[0] for w in qkv.values()) < sum(w[0] for w in _params(model, "attn.qkv.weight").values())
    if capture == "fx":
        calls = _calls(small)
        assert min(c["head_dim"] for c in calls) < 8  # columns went; the softmax scale is the dense one
        assert all(c["scale"] == pytest.approx(8 ** -0.5) for c in calls)
        if attention == "head_dim":
            assert [c["num_heads"] for c in calls] == [2, 2, 4, 4]
    groups = [g for g in thin_record(small).groups if g.group.endswith("(head_dim)")]
    assert groups and any(g.kept < g.channels for g in groups)


def test_torchvision_swin_thinned_twice_stays_exact():
    """The thinned model calls ``fxcondensa.nn.window_attention``: its heads and columns thin again."""
    model = _torchvision_swin()
    once = thin(model, StructurePrune(0.7, attention="both"), X)
    twice = _exact(once, {"attention": "both"})
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in once.parameters())


def test_torchvision_swin_v2_keeps_heads_and_thins_cosine_attention_columns():
    """Swin V2: the bias comes from the continuous position bias MLP and a per-head logit scale multiplies the
    logits; neither is sliced here, so heads stay whole with the reason. head_dim columns go (cosine
    attention normalises q and k over head_dim: zero columns change no norm)."""
    model = _torchvision_swin(v2=True)
    assert float(model.features[1][0].attn.qkv.bias[16:32].detach().abs().min()) > 0  # a key bias V2 zeroes in forward
    small = _exact(model, {"attention": "both"})
    frozen = {f.group: f.reason for f in thin_record(small).frozen}
    assert "relative position bias or logit scale that is not a parameter table" in frozen["features.1.0.attn.qkv (heads)"]
    calls = _calls(small)
    assert [c["num_heads"] for c in calls] == [2, 2, 4, 4] and min(c["head_dim"] for c in calls) < 8
    assert all(c["logit_scale"] is not None for c in calls)


def test_cosine_attention_column_goes_only_when_zero_in_both_query_and_key():
    """In ``normalize(q) @ normalize(k)^T`` a column that is zero in q but not in k still counts in k's norm: it
    must stay. Zero in q and k (and v): it goes. Plain attention needs q or k only."""
    def removable(v2: bool, zero: tuple[int, ...]) -> int:
        model = _torchvision_swin(v2=v2)
        attn = model.features[1][0].attn  # 2 heads of 8: q rows 0-15, k rows 16-31, v rows 32-47
        with torch.no_grad():
            for part in zero:  # column 3 of both heads
                for head in range(2):
                    attn.qkv.weight[16 * part + 8 * head + 3] = 0
                    attn.qkv.bias[16 * part + 8 * head + 3] = 0
        gm = trace(model, X)
        a = analyze(gm, head_dim=True)
        return int((removable_channels(gm, a) & head_dim_channels(a)).sum())

    assert removable(True, (0, 2)) == 0
    assert removable(True, (0, 1, 2)) == 1
    assert removable(False, (0, 2)) == 1


def test_swin_window_attention_heads_are_recognised_as_heads():
    for model in (_torchvision_swin(), _torchvision_swin(v2=True), _timm_swin()):
        gm = trace(model, X)
        heads = head_channels(gm, analyze(gm))
        assert int(heads.sum()) == 2 + 2 + 4 + 4



class NewZeros(nn.Module):
    """``y.new_zeros(size)`` takes only y's dtype and device (torchvision's shifted-window mask); a size read
    off ``y`` at run time (``computed``) may count its channels."""

    def __init__(self, computed: bool):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        mask = y.new_zeros(y.shape) if self.computed else y.new_zeros((3, 2))
        return self.out(y) + mask.sum()


def test_new_zeros_carries_no_channels_unless_its_size_is_computed():
    x = torch.randn(3, 4)
    literal = analyze(trace(NewZeros(computed=False), x))
    assert not next(g for g in literal.groups if g.name == "fc").frozen
    computed = analyze(trace(NewZeros(computed=True), x))
    assert any("new_zeros with a size computed at run time" in r
               for r in next(g for g in computed.groups if g.name == "fc").frozen)
    small = thin(NewZeros(computed=False), StructurePrune(0.5), x)
    assert small.get_submodule("fc").out_features == 3

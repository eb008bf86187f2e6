"""Width-preserving normalisation: LayerNorm / RMSNorm over the channel dim, thinned exactly.

Every model here is compressed with a structured scheme and thinned; the thinned model must compute what
the compressed dense model computes (checked here against ``compress``, independently of ``thin``'s own
check). The residual stream under the norms must shrink, and the norms must keep their dense width.
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
from fxcondensa.nn import WidthLayerNorm, WidthRMSNorm, layer_norm_width, rms_norm_width
from fxcondensa.passes.analysis import analyze
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine terms, so that a norm's zero output is never an accident of initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None) if isinstance(m, (nn.LayerNorm, _RMS)) else None
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name == "weight"
                            else torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


_RMS = nn.RMSNorm


class PreNorm(nn.Module):
    """A pre-norm residual MLP stack: embedding linear + position parameter, blocks, final norm, head."""

    def __init__(self, c: int = 12, hidden: int = 20, blocks: int = 2, norm: str = "module"):
        super().__init__()
        self.norm_kind = norm
        self.embed = nn.Linear(6, c)
        self.pos = nn.Parameter(torch.randn(1, 5, c))
        self.norms = nn.ModuleList(self._norm(c) for _ in range(blocks + 1))
        self.fc1 = nn.ModuleList(nn.Linear(c, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, c) for _ in range(blocks))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)  # a layer scale on the last block
        self.head = nn.Linear(c, 3)

    def _norm(self, c: int) -> nn.Module:
        return nn.RMSNorm(c, eps=1e-6) if self.norm_kind == "rms" else nn.LayerNorm(c)

    def _apply_norm(self, k: int, x: torch.Tensor) -> torch.Tensor:
        n = self.norms[k]
        if self.norm_kind == "functional":
            return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)
        if self.norm_kind == "rms_functional":
            return F.rms_norm(x, n.normalized_shape, n.weight, 1e-6)
        return n(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for k in range(len(self.fc1)):
            y = self.fc2[k](F.gelu(self.fc1[k](self._apply_norm(k, x))))
            x = x + (y * self.gamma if k == len(self.fc1) - 1 else y)
        return self.head(self._apply_norm(len(self.fc1), x)[:, 0])


class ChannelsFirst(nn.Module):
    """ConvNeXt-style: conv -> permute -> LayerNorm -> permute back (timm's / torchvision's LayerNorm2d)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.norm = nn.LayerNorm(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.pw = nn.Conv2d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.dw(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.pw(x)


def _exact(model: nn.Module, x: torch.Tensor, scheme=None, output: str = "auto") -> nn.Module:
    scheme = scheme or StructurePrune(0.5)
    compressed = compress(model, scheme, x)
    small = thin(model, scheme, x, output=output)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressed(x), rtol=RTOL, atol=ATOL)
    return small


@pytest.mark.parametrize("norm", ["module", "functional", "rms", "rms_functional"])
def test_residual_stream_under_norms_is_thinned_exactly(norm):
    torch.manual_seed(0)
    model = _randomize_norms(PreNorm(norm=norm))
    small = _exact(model, torch.randn(2, 5, 6), output="graph")  # the rewrites, read in the graph's code
    assert small.embed.out_features < 12  # the stream lost channels
    assert small.gamma.numel() == small.embed.out_features and small.pos.shape[-1] == small.embed.out_features
    frozen = [g for g in thin_record(small).groups if g.frozen]
    assert [g.group for g in frozen] == ["head"]
    code = small.code
    if norm == "module":
        assert isinstance(small.get_submodule("norms.0"), WidthLayerNorm) and small.get_submodule("norms.0").width == 12
    elif norm == "rms":
        assert isinstance(small.get_submodule("norms.0"), WidthRMSNorm) and small.get_submodule("norms.0").width == 12
    elif norm == "functional":
        assert "layer_norm_width" in code
    else:
        assert "rms_norm_width" in code


def test_channels_first_layer_norm_is_thinned_exactly():
    torch.manual_seed(1)
    model = _randomize_norms(ChannelsFirst())
    small = _exact(model, torch.randn(2, 3, 6, 6))
    assert isinstance(small.norm, WidthLayerNorm) and small.stem.out_channels < 10


def test_norm_input_must_be_zero_for_a_channel_to_go():
    """Regression: a channel whose norm weight and bias are zero is zero at the norm's output, but the norm
    still saw it; removing it would change every other channel's mean and variance."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    _randomize_norms(model)
    with torch.no_grad():
        model[1].weight[3] = 0
        model[1].bias[3] = 0
    x = torch.randn(5, 4)
    small = thin(model, example_inputs=x)
    assert small.get_submodule("2").in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)
    # With the producer row zero too, the channel is zero at the norm's input and goes.
    with torch.no_grad():
        model[0].weight[3] = 0
        model[0].bias[3] = 0
    small = thin(model, example_inputs=x)
    assert small.get_submodule("2").in_features == 7
    assert isinstance(small.get_submodule("1"), WidthLayerNorm)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


def test_norm_over_two_dims_with_the_channel_dim_is_frozen_with_reason():
    model = nn.Sequential(nn.Linear(4, 6), _TwoDimNorm(), nn.Linear(6, 2))
    gm = fxcondensa.trace(model, torch.randn(3, 5, 4))
    reasons = [r for g in analyze(gm).groups for r in g.frozen]
    assert any("normalizes over 2 dims that include the channel dim" in r for r in reasons)
    gm = fxcondensa.trace(nn.Sequential(nn.Linear(4, 6), _ComputedShapeNorm(), nn.Linear(6, 2)), torch.randn(3, 5, 4))
    reasons = [r for g in analyze(gm).groups for r in g.frozen]
    assert any("layer_norm with a computed normalized_shape" in r for r in reasons)


class _ComputedShapeNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:])


class _TwoDimNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (5, 6))


def test_width_norms_match_dense_norms_with_zero_channels():
    torch.manual_seed(3)
    x = torch.randn(4, 7, 10) * 3 + 5  # a large mean: the centred variance keeps float32 exact
    x[..., 6:] = 0
    w, b = torch.rand(10) + 0.5, torch.randn(10)
    dense = F.layer_norm(x, (10,), w, b, 1e-5)[..., :6]
    torch.testing.assert_close(layer_norm_width(x[..., :6], 10, w[:6], b[:6], 1e-5), dense, rtol=RTOL, atol=ATOL)
    dense = F.rms_norm(x, (10,), w, 1e-6)[..., :6]
    torch.testing.assert_close(rms_norm_width(x[..., :6], 10, w[:6], 1e-6), dense, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="keeps 11 channels of a dense width of 10"):
        WidthLayerNorm(11, width=10)


def test_thinned_norms_export(tmp_path):
    torch.manual_seed(4)
    model = _randomize_norms(PreNorm(norm="functional"))
    x = torch.randn(2, 5, 6)
    small = thin(model, StructurePrune(0.5), x)
    fxcondensa.files.export.torchscript(small, tmp_path / "m.pt", x)
    fxcondensa.files.export.torch_export(small, tmp_path / "m.pt2", x)
    fxcondensa.files.export.onnx(small, tmp_path / "m.onnx", x)
    module_norms = thin(_randomize_norms(PreNorm(norm="rms")), StructurePrune(0.5), x)
    fxcondensa.files.export.torch_export(module_norms, tmp_path / "r.pt2", x)
    fxcondensa.files.export.onnx(module_norms, tmp_path / "r.onnx", x)


@settings(max_examples=15, deadline=None)
@given(c=st.integers(4, 16), hidden=st.integers(2, 12), blocks=st.integers(1, 3),
       density=st.floats(0.1, 0.9), norm=st.sampled_from(["module", "functional", "rms"]),
       seed=st.integers(0, 2**16))
def test_width_pruning_property(c, hidden, blocks, density, norm, seed):
    torch.manual_seed(seed)
    model = _randomize_norms(PreNorm(c, hidden, blocks, norm), seed)
    _exact(model, torch.randn(2, 5, 6), StructurePrune(density))


class LlamaRMSNorm(nn.Module):
    """Hugging Face Llama's RMSNorm, written out: pow, mean over channels, rsqrt, weight."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LlamaStream(nn.Module):
    def __init__(self, c: int = 10):
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.norm1, self.norm2 = LlamaRMSNorm(c), LlamaRMSNorm(c)
        self.up, self.down = nn.Linear(c, 16, bias=False), nn.Linear(16, c, bias=False)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.down(F.silu(self.up(self.norm1(x))))
        return self.head(self.norm2(x))


def test_llama_style_rms_norm_is_thinned_exactly():
    torch.manual_seed(5)
    small = _exact(LlamaStream().eval(), torch.randn(2, 3, 4), output="graph")  # the rewrite, in the graph
    assert small.embed.out_features < 10 and "mean_width" in small.code
    assert small.norm1.weight.numel() == small.embed.out_features


def test_thinned_llama_style_norm_thins_again_and_costs_what_its_mean_costs():
    """Regression: the ``mean_width`` a first ``thin`` writes had no registry entry, so a second ``thin``
    froze the stream (unknown op) and the MAC count left the mean out."""
    from fxcondensa.passes.costs import profile_costs

    torch.manual_seed(6)
    x = torch.randn(2, 3, 4)
    once = _exact(LlamaStream(c=16).eval(), x, output="graph")
    width = once.embed.out_features
    means = [c for c in profile_costs(once, x) if "mean" in c.name]
    assert means and all(c.macs == 2 * 3 * width for c in means)  # the mean reads every kept channel
    twice = _exact(once, x, output="graph")
    assert twice.embed.out_features < width and "mean_width" in twice.code


def test_mean_over_channels_needs_zero_inputs():
    """Regression: a mean over channels keeps a channel that is not zero where it is averaged."""
    model = nn.Sequential(nn.Linear(4, 6), _MeanScale(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[1].w[2] = 0  # channel 2 is zero after the scale, but the mean saw it
    x = torch.randn(3, 4)
    small = thin(model, example_inputs=x)
    assert small.get_submodule("2").in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


class _MeanScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) * self.w


class TiedLM(nn.Module):
    """Token embedding -> pre-norm MLP block -> final norm -> output head tied to the embedding."""

    def __init__(self, vocab: int = 20, c: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, c)
        self.pos = nn.Embedding(6, c)
        self.n1, self.n2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos(positions)
        x = x + self.fc2(F.gelu(self.fc1(self.n1(x))))
        return self.lm_head(self.n2(x))


def test_embedding_width_and_tied_output_head_stay_one_tensor():
    torch.manual_seed(6)
    model = _randomize_norms(TiedLM())
    inputs = (torch.randint(0, 20, (2, 6)), torch.arange(6).expand(2, 6))
    compressed = compress(model, StructurePrune(0.5), inputs)
    small = thin(model, StructurePrune(0.5), inputs)
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), compressed(*inputs), rtol=RTOL, atol=ATOL)
    assert small.emb.embedding_dim < 12 and small.emb.weight.shape[1] == small.emb.embedding_dim
    assert small.lm_head.weight is small.emb.weight  # still tied
    assert small.pos.embedding_dim == small.emb.embedding_dim


def test_class_token_concatenated_into_the_stream_is_sliced():
    class ClsToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 10)
            self.cls = nn.Parameter(torch.randn(1, 1, 10))
            self.norm = nn.LayerNorm(10)
            self.head = nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
            return self.head(self.norm(x)[:, 0])

    torch.manual_seed(7)
    small = _exact(_randomize_norms(ClsToken()), torch.randn(2, 3, 4))
    assert small.cls.shape == (1, 1, small.embed.out_features) and small.embed.out_features < 10


class _LayerNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm (timm / torchvision style) that a user made a leaf module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def test_layer_norm_subclass_with_its_own_forward_as_a_leaf_is_frozen():
    """Regression: the module rule assumed nn.LayerNorm's channels-last forward for every subclass."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), _LayerNorm2d(6), nn.Conv2d(6, 2, 1)).eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, 6, 6)
    small = thin(model, StructurePrune(0.5), x, leaf_modules=[_LayerNorm2d])
    assert small.get_submodule("0").out_channels == 6
    reasons = " ".join(g.frozen for g in thin_record(small).groups)
    assert "_LayerNorm2d '1' (a LayerNorm with its own forward) at node '_1' cannot be thinned" in reasons
    # traced through (the default), the same norm is thinned exactly
    assert _exact(model, x).get_submodule("0").out_channels < 6

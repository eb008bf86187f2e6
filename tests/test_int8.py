"""int8 through torchao: quantize_int8 against a reference of per-row symmetric int8 arithmetic, on module
graphs (LeNet-5) and captured graphs (Hugging Face), in float32 and bfloat16; what the report shows; the
.pt2 export that keeps int8; the errors."""

from __future__ import annotations

import sys

import pytest
import torch
from _models import bench_coverage, state_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.compression.int8 import TorchaoMissingError, int8_candidates, quantize_int8
from fxcondensa.passes.storage import count_nonzero, storage_dtype, stored_bytes, stored_values
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

build_hf = bench_coverage().build_hf


# -- the reference: what int8 per-row symmetric quantization computes ------------------------------------
def ref_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to [-127.5, 127.5] by amax / 127.5, rounded to int8 (torchao's symmetric int8 mapping)."""
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps) / 127.5
    return torch.clamp(torch.round(t * (1.0 / scale)), -128, 127), scale


def ref_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mode: str) -> torch.Tensor:
    qw, sw = ref_quantize(w)
    if mode == "weight_only":
        y = x @ (qw * sw).T
    else:  # int8 activations too, per row of the input
        qx, sx = ref_quantize(x)
        y = (qx @ qw.T) * sx * sw.T
    return y if b is None else y + b


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 6), cin=st.integers(1, 40), cout=st.integers(1, 40), bias=st.booleans(),
       mode=st.sampled_from(["weight_only", "dynamic"]), seed=st.integers(0, 2**16))
def test_quantized_linear_equals_the_reference(rows, cin, cout, bias, mode, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cin, cout, bias=bias).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(cout, cin, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(cout, generator=g))
    x = torch.randn(rows, cin, generator=g)
    q = quantize_int8(nn.Sequential(layer), mode=mode)
    if cin == 1:  # torchao cannot quantize a one-column weight: left float, with the reason
        assert "one input feature" in int8_candidates(layer)[1]["weight"]
        assert q[0].weight.dtype == torch.float32 and storage_dtype(q[0].weight) == torch.float32
        return
    qw, sw = ref_quantize(layer.weight.detach())
    assert torch.equal(stored_values(q[0].weight), qw.to(torch.int8))
    torch.testing.assert_close(q[0].weight.scale.reshape(-1), sw.reshape(-1))
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref_linear(x, layer.weight, layer.bias, mode), rtol=1e-5, atol=1e-5)


# -- models -----------------------------------------------------------------------------------------------
def lenet_thinned():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    return fxcondensa.thin(fxcondensa.models.LeNet5().eval(), StructurePrune(0.5), x), x


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_thinned_lenet_linear_layers_become_int8_convolutions_stay_float(mode):
    small, x = lenet_thinned()
    before = state_hash(small)
    q = quantize_int8(small, mode=mode)
    assert state_hash(small) == before, "the input model was modified"
    assert storage_dtype(q.ip1.weight) == storage_dtype(q.ip2.weight) == torch.int8
    assert storage_dtype(q.conv1.weight) == storage_dtype(q.conv2.weight) == torch.float32
    assert q.ip1.bias.dtype == torch.float32
    with torch.no_grad():  # the reference: each quantized Linear computed by ref_linear, the rest as it was
        h = small.pool2(small.relu_conv2(small.conv2(small.pool1(small.relu_conv1(small.conv1(x))))))
        h = torch.relu(ref_linear(h.flatten(1), small.ip1.weight, small.ip1.bias, mode))
        want = ref_linear(h, small.ip2.weight, small.ip2.bias, mode)
        torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-4)


def test_inplace_and_exclude():
    small, _ = lenet_thinned()
    q = quantize_int8(small, exclude=["ip2.*"], inplace=True)
    assert q is small
    assert storage_dtype(small.ip1.weight) == torch.int8 and storage_dtype(small.ip2.weight) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_hf_graph_linear_calls_are_quantized(dtype):
    """A captured Hugging Face graph (thin's output="graph"): linear calls on parameters, no modules."""
    torch.manual_seed(0)
    model, x, fresh, _ = build_hf("llama")
    model = model.to(dtype)
    with pytest.warns(UserWarning, match="use_cache=False"):
        small = fxcondensa.thin(model, StructurePrune(0.5), x, output="graph")
    names, left = int8_candidates(small)
    linear_calls = [n for n in small.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(names) == len(linear_calls) > 10 and not left
    q = quantize_int8(small, mode="weight_only")
    assert all(storage_dtype(q.get_parameter(n)) == torch.int8 for n in names)
    assert q.get_parameter(names[0]).dtype == dtype  # computes in the model's dtype
    with torch.no_grad():
        got, want = q(**fresh).logits.float(), small(**fresh).logits.float()
    # weight rounding only: within a few percent of the logits' range (bf16 adds its own rounding)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_a_weight_tied_to_an_embedding_stays_float():
    """BERT's masked-LM decoder is the word embedding: torchao's int8 tensor cannot serve both."""
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertForMaskedLM(config).eval()
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    graph = fxcondensa.trace(model, x, capture="export")
    names, left = int8_candidates(graph)
    assert "cls.predictions.decoder.weight" in left or "bert.embeddings.word_embeddings.weight" in left
    q = quantize_int8(graph)
    with torch.no_grad():
        assert q(**x).logits.shape == (1, 8, 64)


def test_plain_modules_skip_linear_subclasses():
    """MultiheadAttention reads its out_proj weight directly (not through Linear.forward): left float."""
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)).eval()
    names, _ = int8_candidates(model)
    assert "0.linear1.weight" in names and not any("out_proj" in n for n in names)
    q = quantize_int8(model)
    with torch.no_grad():
        assert q(torch.randn(1, 4, 16)).shape == (1, 4, 16)


# -- report and storage ------------------------------------------------------------------------------------
def test_report_shows_storage_dtype_per_layer():
    small, x = lenet_thinned()
    q = quantize_int8(small, mode="dynamic")
    rep = fxcondensa.report(small, q, x, latency=False)
    rows = {r.layer: r for r in rep.rows}
    assert (rows["ip1"].storage_before, rows["ip1"].storage_after) == ("float32", "int8")
    assert (rows["conv1"].storage_before, rows["conv1"].storage_after) == ("float32", "float32")
    assert rows["relu_ip1"].storage_after is None
    text = str(rep)
    assert "storage" in text and "float32 -> int8" in text and "parameter bytes as stored" in text
    t = rep.totals
    assert t["param_bytes_before"] == 4 * t["params_before"]
    assert t["param_bytes_after"] == sum(stored_bytes(p) for p in q.parameters()) < t["param_bytes_before"]
    assert '"storage_after": "int8"' in rep.to_json() and "storage_after" in rep.to_csv()


def test_report_storage_column_only_when_something_is_not_float32():
    model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    assert "storage" not in str(fxcondensa.report(model, fxcondensa.compress(model, Prune(0.5), x), x, latency=False))
    half = fxcondensa.compress(model, Compose([Prune(0.5), Quantize(fxcondensa.float16)]), x)
    rep = fxcondensa.report(model, half, x, latency=False)
    assert "float32 -> float16" in str(rep)
    assert rep.totals["param_bytes_after"] * 2 == rep.totals["param_bytes_before"]


def test_storage_helpers_read_the_int8_values():
    q = quantize_int8(nn.Sequential(nn.Linear(8, 4)))
    w = q[0].weight
    assert w.dtype == torch.float32 and storage_dtype(w) == torch.int8
    assert stored_bytes(w) == 4 * 8 + 4 * 4 + 4  # int8 values, float32 scales, int8 zero points
    assert count_nonzero(w) == int((stored_values(w) != 0).sum())


# -- export ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_pt2_export_keeps_int8_and_matches_the_quantized_model(mode, tmp_path):
    small, x = lenet_thinned()
    q = quantize_int8(small, mode=mode)
    # export() reloads the file and compares it with q's own outputs (rtol 1e-4, atol 1e-5) before keeping it
    path = fxcondensa.files.export.torch_export(q, tmp_path / "q.pt2", x)
    program = torch.export.load(str(path))
    dtypes = {str(storage_dtype(t)) for t in program.state_dict.values()}
    assert "torch.int8" in dtypes
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), q(x), rtol=1e-4, atol=1e-5)
    float_path = fxcondensa.files.export.torch_export(small, tmp_path / "f.pt2", x)
    assert path.stat().st_size < 0.5 * float_path.stat().st_size  # LeNet-5 is nearly all Linear


# -- errors ------------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_value():
    model = fxcondensa.models.LeNet5()
    with pytest.raises(ValueError, match="mode='int4'.*'weight_only', 'dynamic'"):
        quantize_int8(model, mode="int4")
    with pytest.raises(TypeError, match=r"exclude='ip1'\): pass a list of patterns, e.g. \['ip1'\]"):
        quantize_int8(model, exclude="ip1")
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got str"):
        quantize_int8("LeNet5")


def test_without_torchao_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(TorchaoMissingError, match=r"pip install 'fxcondensa\[torchao\]'"):
        quantize_int8(fxcondensa.models.LeNet5())


class _AttentionBlock(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        y = self.norm(x)
        return self.fc(x + self.attention(y, y, y, need_weights=False)[0])


def test_pt2_export_of_dynamic_int8_after_multihead_attention(tmp_path):
    """MultiheadAttention's fused eval kernel differs from the exported program in the last bits, enough to flip
    int8 roundings downstream: the export is checked against the model run without that kernel (same math)."""
    torch.manual_seed(0)
    q = quantize_int8(nn.Sequential(_AttentionBlock(), _AttentionBlock()).eval(), mode="dynamic")
    x = torch.randn(2, 16, 64)
    path = fxcondensa.files.export.torch_export(q, tmp_path / "attention.pt2", x)  # checked: rtol 1e-4, atol 1e-5
    assert torch.backends.mha.get_fastpath_enabled()  # the setting is restored
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = q(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), want, rtol=1e-4, atol=1e-5)

"""thin on bfloat16 and float16 language models: the check compares in the model's dtype with that dtype's
tolerance, then in float32 and float64 (``fxcondensa.passes.precision``), also on torch.export graphs, whose
``_assert_tensor_metadata`` nodes insist on the captured dtype. Widths of 256 make bf16 rounding exceed
float32's tolerance, so the re-check runs (it used to crash there)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import bench_coverage, state_hash
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.capture.exported import graph_inputs
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.records import thin_record
from fxcondensa.passes import precision
from fxcondensa.passes import thin as thin_module
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
SCHEME = StructurePrune(0.5)


def llama(dtype: torch.dtype, hidden: int = 256) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    bench_coverage().randomize_constants(model)
    return model.to(dtype)


def tokens(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -1] = 0
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=g), "attention_mask": mask}


def in_float32(gm: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The graph's outputs computed in float32: the comparison that tells a wrong model from bf16 rounding."""
    return flatten_outputs(dict(precision.run_in(gm, graph_inputs(gm, inputs), torch.float32)))


@pytest.fixture(scope="module")
def bf16_llama():
    model = llama(torch.bfloat16)
    x = tokens(1, 8)
    before = state_hash(model)
    with pytest.warns(UserWarning, match="use_cache=False"):
        thinned = fxcondensa.thin(model, SCHEME, x, output="graph")  # run_in reads the graph
    assert state_hash(model) == before, "the input model was modified"
    return model, thinned, fxcondensa.compress(model, SCHEME, x, output="graph")


def test_a_bf16_llama_thins_and_checks(bf16_llama):
    model, thinned, compressed = bf16_llama
    assert sum(p.numel() for p in thinned.parameters()) < sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in thinned.parameters()} == {torch.bfloat16}  # the wider runs copied nothing
    fresh = tokens(1, 8, seed=1)
    for a, b in zip(in_float32(thinned, fresh), in_float32(compressed, fresh), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch,length", [(2, 12), (3, 5)])
def test_a_bf16_llama_runs_at_other_shapes(bf16_llama, batch, length):
    _, thinned, compressed = bf16_llama
    x = tokens(batch, length, seed=2)
    with torch.no_grad():
        assert thinned(**x)["logits"].shape == (batch, length, 128)
    for a, b in zip(in_float32(thinned, x), in_float32(compressed, x), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_an_fp16_llama_thins_and_checks_as_its_class():
    model = llama(torch.float16)
    thinned = fxcondensa.thin(model, SCHEME, tokens(1, 8))  # its own forward passes the widened re-check
    assert type(thinned) is type(model) and thin_record(thinned).returns == "module"
    assert {p.dtype for p in thinned.parameters()} == {torch.float16}
    assert sum(p.numel() for p in thinned.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_wrong_bf16_model_fails_the_check_at_a_node(monkeypatch):
    """A live channel removed: bf16 rounding cannot excuse it, the float32 and float64 runs of the export
    graph (through its dtype asserts) disagree too, and the error names a node."""
    real = thin_module.removable_channels

    def too_many(gm, analysis):
        removable = real(gm, analysis).clone()
        removable[~removable & ~analysis.frozen_channels()] = True
        return removable

    monkeypatch.setattr(thin_module, "removable_channels", too_many)
    with pytest.raises(fxcondensa.ThinningCheckError, match=r"bfloat16 and .* float32 and float64, first at node '"):
        fxcondensa.thin(llama(torch.bfloat16, hidden=64), SCHEME, tokens(1, 8))


def test_float32_keeps_its_tolerance_and_its_float64_recheck():
    assert precision.tolerance(torch.float32) == (thin_module.RTOL, thin_module.ATOL) == (1e-4, 1e-5)
    assert precision.wider_dtypes(torch.float32) == [torch.float64]
    assert precision.wider_dtypes(torch.bfloat16) == [torch.float32, torch.float64]
    assert precision.wider_dtypes(torch.float64) == []


def test_the_model_dtype_is_the_narrowest_floating_one():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(torch.float16))
    assert precision.compute_dtype(model, (torch.zeros(1, 2),)) == torch.float16
    assert precision.compute_dtype(nn.Linear(2, 2).to(torch.bfloat16), (torch.zeros(1, 2),)) == torch.bfloat16
    assert precision.compute_dtype(nn.Embedding(3, 2).double(), (torch.zeros(1, dtype=torch.long),)) == torch.float64


class _Casts(nn.Module):
    """Casts named as literals: to float16 on the way in, to float32 on the way out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x.to(torch.float16).to(self.fc.weight.dtype))
        return (h * torch.ones(3, dtype=torch.bfloat16)).to(torch.float32)


@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       capture=st.sampled_from(["fx", "export"]), seed=st.integers(0, 2**16))
def test_run_in_float64_widens_weights_inputs_and_casts(dtype, capture, seed):
    torch.manual_seed(seed)
    model = _Casts().to(dtype)
    x = torch.randn(2, 4, dtype=dtype)
    gm = fxcondensa.trace(model, x, capture=capture)
    got = precision.run_in(gm, graph_inputs(gm, x), torch.float64)
    w, b = model.fc.weight.double(), model.fc.bias.double()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x.double() @ w.T + b, rtol=1e-12, atol=1e-12)  # no cast rounded anything
    assert {p.dtype for p in gm.parameters()} == {dtype}  # the graph itself was not widened


def test_run_in_skips_the_dtype_asserts_of_an_export_graph():
    gm = fxcondensa.trace(_Casts().to(torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16), capture="export")
    assert any("_assert_tensor_metadata" in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert precision.run_in(gm, (x,), torch.float64).dtype == torch.float64


def test_the_record_of_a_bf16_thin_is_export(bf16_llama):
    assert thin_record(bf16_llama[1]).capture == "export"


class _Eager(_Casts):
    """A cast by method (``.half()``) as well as by dtype argument."""

    def forward(self, x):
        return super().forward(x.half().to(self.fc.weight.dtype))


@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_widened_calls_runs_eager_code_in_float64_without_widening_the_model(dtype, seed):
    torch.manual_seed(seed)
    model = _Eager().to(dtype)
    x = torch.randn(2, 4, dtype=dtype)
    with precision.widened_calls(torch.float64):
        got = model(x)
    w, b = model.fc.weight.double(), model.fc.bias.double()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x.double() @ w.T + b, rtol=1e-12, atol=1e-12)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_widened_calls_reads_a_rounded_tensor_as_its_exact_value():
    lin = nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    exact = torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64)
    with precision.widened_calls(torch.float64, {id(lin.weight): exact}):
        got = lin(torch.ones(1, 2, dtype=torch.bfloat16))
    assert got.item() == pytest.approx(1.0, abs=1e-15)


def test_a_wrong_bf16_own_model_is_refused_by_the_widened_recheck(monkeypatch):
    """The model's own forward is re-run widened in the check: a wrong weight in it is not excused as bf16
    rounding, and the graph comes back with the reason."""
    from fxcondensa.compression import thinning

    real = thinning.own_model

    def wrong(*args):
        result = real(*args)  # shares its tensors with the thinned graph: a new one, not an in-place change
        result.lm_head.weight = nn.Parameter(result.lm_head.weight.detach() + 0.05)
        return result

    monkeypatch.setattr(thinning, "own_model", wrong)
    with pytest.warns(UserWarning, match="use_cache=False"):
        small = fxcondensa.thin(llama(torch.bfloat16, hidden=64), SCHEME, tokens(1, 8))
    reason = thin_record(small).reason
    assert isinstance(small, torch.fx.GraphModule)
    assert "own forward differs" in reason and "float32 and float64" in reason, reason


def _count_forwards(monkeypatch) -> dict[str, int]:
    """Counts the check's forward passes: the compressed model's in its own dtype (``_run``), the thinned
    model's in its own dtype (shape propagation) and each widened run (``run_in``)."""
    counts = {"compressed own dtype": 0, "thinned own dtype": 0, "widened": 0}

    def counted(key, real):
        def run(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(thin_module, "_run", counted("compressed own dtype", thin_module._run))
    monkeypatch.setattr(thin_module, "propagate_shapes", counted("thinned own dtype", thin_module.propagate_shapes))
    monkeypatch.setattr(thin_module, "run_in", counted("widened", thin_module.run_in))
    return counts


@pytest.mark.parametrize("output", ["graph", "auto"])
def test_a_bf16_check_settled_in_float32_never_runs_the_compressed_model_in_bf16(monkeypatch, output):
    """A bf16 model compares in float32 first; it agrees, so the compressed model's bf16 run (the dearest, and
    at real widths a comparison bound to fail) is never made: three forwards, where the bf16-first order made
    four whenever bf16 rounding exceeded its tolerance."""
    model, x = llama(torch.bfloat16), tokens(1, 8)
    counts = _count_forwards(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the graph's use_cache=False note
        small = fxcondensa.thin(model, SCHEME, x, output=output)
    assert isinstance(small, torch.fx.GraphModule) == (output == "graph")
    assert counts == {"compressed own dtype": 0, "thinned own dtype": 1, "widened": 2}, counts


def test_a_bf16_check_the_wider_dtypes_cannot_settle_compares_in_bf16_last(monkeypatch):
    """Where the widened comparisons fail, the bf16 one still runs (last) and its verdict stands: the order
    changes the cost of the check, never its outcome."""
    model, x = llama(torch.bfloat16, hidden=64), tokens(1, 8)
    counts = _count_forwards(monkeypatch)
    monkeypatch.setattr(thin_module, "_outputs_close",
                        lambda a, b, rtol=RTOL, atol=ATOL: rtol > RTOL)  # only bf16's tolerance agrees
    with pytest.warns(UserWarning, match="use_cache=False"):
        fxcondensa.thin(model, SCHEME, x, output="graph")
    assert counts == {"compressed own dtype": 1, "thinned own dtype": 1, "widened": 4}, counts

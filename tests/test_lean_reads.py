"""The thinning check's big reads without big copies (``passes/lean_reads.py``), the user's forward widened op by op
(``precision.widened_calls``), one reference run per ``thin`` (``passes/memo.py``) and the faster channel scores
(``schemes/scores.row_norms``, ``_owned_scores(only=...)``). Each is compared with the plain computation."""

from __future__ import annotations

import pytest
import torch
from _models import llama_tokens, small_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.capture.exported import graph_inputs
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.passes import lean_reads, memo, own, precision, reference
from fxcondensa.passes import thin as thin_module
from fxcondensa.passes.analysis import analyze
from fxcondensa.rules import owners
from fxcondensa.schemes import StructurePrune
from fxcondensa.schemes.scores import row_norms, row_scores
from fxcondensa.schemes.structured import _owned_scores


def llama(dtype: torch.dtype, hidden: int = 64) -> nn.Module:
    return small_llama(dtype, hidden=hidden, layers=1)


tokens = llama_tokens


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.fc = nn.Linear(12, 40)

    def forward(self, ids):
        return self.fc(self.embed(ids))


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 9), chunk=st.integers(1, 60), bias=st.booleans())
def test_a_linear_read_in_blocks_of_rows_equals_the_whole(rows, cols, chunk, bias):
    g = torch.Generator().manual_seed(rows * 100 + cols)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(3, cols, generator=g)
    b = torch.randn(rows, generator=g) if bias else None
    old = lean_reads.CHUNK_ELEMENTS
    lean_reads.CHUNK_ELEMENTS = chunk
    try:
        out = lean_reads.lean_call(torch.ops.aten.linear.default, (x, w, b), {}, lambda t, i: t[i], lambda v: v)
    finally:
        lean_reads.CHUNK_ELEMENTS = old
    if w.numel() <= chunk:
        assert out is NotImplemented  # small weights are read whole, as before
    else:
        torch.testing.assert_close(out, nn.functional.linear(x, w, b))


def test_masked_and_widened_reads_of_an_embedding_and_a_large_linear_equal_the_masked_model(monkeypatch):
    monkeypatch.setattr(lean_reads, "CHUNK_ELEMENTS", 64)  # fc's 480 elements are read in 8 blocks
    torch.manual_seed(0)
    model, ids = Net().to(torch.bfloat16), torch.randint(0, 50, (2, 5))
    gm = fxcondensa.trace(model, ids)
    masks = {"embed.weight": (torch.arange(12) % 3 > 0).view(1, -1).expand(50, 12),
             "fc.weight": (torch.arange(40) % 4 > 0).view(-1, 1).expand(40, 12)}
    reference.set_masks(gm, masks)
    dense = Net().to(torch.bfloat16)
    dense.load_state_dict({k: v * masks[k] if k in masks else v for k, v in model.state_dict().items()})
    torch.testing.assert_close(reference.MaskedInterpreter(gm).run(ids), dense(ids), rtol=0, atol=0)
    wide = precision.run_in(gm, (ids,), torch.float64)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, dense.double()(ids))


def test_widened_calls_runs_a_bf16_llama_as_its_float64_copy():
    model, x = llama(torch.bfloat16), tokens()
    with torch.no_grad(), precision.widened_calls(torch.float64):
        wide = model(**x, use_cache=False).logits
    with torch.no_grad():
        expected = llama(torch.bfloat16).double()(**x, use_cache=False).logits
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, expected, rtol=1e-4, atol=1e-6)  # bf16 alone: ~1e-2


def test_the_wider_recheck_of_the_own_forward_widens_it():
    """The bug: the own class's forward ran in bf16 inside the float32 and float64 re-checks, so a bf16 model of
    the user's class could never pass them."""
    model, x = llama(torch.bfloat16), tokens()
    gm = fxcondensa.trace(model, x)
    call = own._call_graph(gm, model)
    out = flatten_outputs(dict(precision.run_in(call, graph_inputs(gm, x), torch.float64)))
    with torch.no_grad():
        expected = llama(torch.bfloat16).double()(**x, use_cache=False).logits
    assert out[0].dtype == torch.float64
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-6)


def test_the_reference_runs_once_per_dtype_for_both_candidates(monkeypatch):
    """The own class is checked first; where it does not pass, the graph is checked against the same
    reference outputs, not a second run of the compressed model."""
    runs: list[tuple[int, object]] = []
    real_run, real_run_in = thin_module._run, thin_module.run_in
    monkeypatch.setattr(thin_module, "_run", lambda gm, inputs: runs.append((id(gm), "own dtype"))
                        or real_run(gm, inputs))
    monkeypatch.setattr(thin_module, "run_in", lambda gm, inputs, d: runs.append((id(gm), d))
                        or real_run_in(gm, inputs, d))
    # Without the exact values of the folded norm weights the own class of a bf16 Llama fails its wider
    # re-check, so the graph is checked after it: both candidates, one reference run per dtype.
    monkeypatch.setattr(owners, "exact_value", lambda t: None)
    model, x = llama(torch.bfloat16), tokens()
    with pytest.warns(UserWarning):
        fxcondensa.thin(model, StructurePrune(0.5), x)
    assert runs and max(runs.count(r) for r in runs) == 1


def test_remember_keeps_nothing_outside_remembered():
    with memo.remembered():
        assert memo.remember("k", lambda: 1) == 1
        assert memo.remember("k", lambda: 2) == 1
    assert memo.remember("k", lambda: 3) == 3


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), step=st.integers(1, 50),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 9))
def test_row_norms_equal_the_l2_row_scores_and_write_nothing(shape, step, dtype, seed):
    from fxcondensa.schemes import scores

    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    before = w.clone()
    old = scores._ROW_STEP_ELEMENTS
    scores._ROW_STEP_ELEMENTS = step  # slabs of a few rows: columns add up several slabs
    try:
        for dim in range(w.dim()):
            torch.testing.assert_close(row_norms(w, dim), row_scores(w, dim, lambda r: r.pow(2).sum(1).sqrt()),
                                       rtol=1e-5, atol=1e-6)
    finally:
        scores._ROW_STEP_ELEMENTS = old
    assert torch.equal(w, before)  # a float32 weight is the user's own: squared into a copy


def test_owned_scores_of_the_heads_only_equal_those_of_all_channels():
    model = llama(torch.float32)
    gm = fxcondensa.trace(model, tokens())
    analysis = analyze(gm)
    from fxcondensa.rules.heads import head_channels

    heads = head_channels(gm, analysis)
    assert bool(heads.any())
    everything = _owned_scores(gm, analysis, True)
    only = _owned_scores(gm, analysis, True, only=heads)
    torch.testing.assert_close(only[heads], everything[heads], rtol=0, atol=0)


def test_the_own_check_does_not_search_for_the_first_differing_node(monkeypatch):
    """Its message stops before the node, so the node-by-node re-run (every value kept) is not made."""
    def no(*args, **kwargs):
        raise AssertionError("searched for the first differing node")

    monkeypatch.setattr(thin_module, "_first_divergence", no)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    gm = fxcondensa.trace(model, x)
    keep = torch.ones(analyze(gm).num_channels, dtype=torch.bool)
    reason = own.check_own(gm, nn.Sequential(nn.Linear(4, 3)), keep, (x,))
    assert reason is not None and "the model's own forward differs" in reason


def test_widened_row_blocks_share_one_buffer_and_gathered_rows_do_not():
    # A linear's blocks are used before the next read: one buffer per shape, refilled (a fresh block per read
    # left the C allocator's heap holding about the model's bytes on some runs). Gathered rows are an
    # embedding's output and stay: never shared.
    import torch.fx as fx

    from fxcondensa.passes.precision import WidenedInterpreter

    w = torch.randn(8, 4, dtype=torch.bfloat16)
    reader = WidenedInterpreter(fx.symbolic_trace(torch.nn.Identity()), torch.float64)
    a = reader.read(w, slice(0, 4))
    assert torch.equal(a, w[0:4].double())
    b = reader.read(w, slice(4, 8))
    assert b is a and torch.equal(b, w[4:8].double())
    c, d = reader.read(w, torch.tensor([1, 2])), reader.read(w, torch.tensor([3, 5]))
    assert c is not d and torch.equal(c, w[[1, 2]].double()) and torch.equal(d, w[[3, 5]].double())

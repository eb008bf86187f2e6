"""The faster paths of ``thin`` do what the slower ones did: the check's real run records the thinned
shapes and still catches a wrong model, the vectorised channel bookkeeping equals the plain loops, the
memoised meta shape propagation equals an unmemoised one, and node stack traces do not need torch's
compiler stack. Nothing here measures time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.capture import graph as graph_module
from fxcondensa.passes.analysis import analyze, keep_one_per_slice, removable_channels
from fxcondensa.passes.costs import profile_costs
from fxcondensa.passes.slicing import apply_keep
from fxcondensa.schemes import StructurePrune


def _shapes(gm: torch.fx.GraphModule) -> dict[str, object]:
    return {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


def _resnet18() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)


def test_checked_thinning_records_the_same_shapes_as_unchecked():
    model, x = _resnet18()
    checked = fxcondensa.thin(model, StructurePrune(0.5), x, output="graph")  # shapes from the check's real run
    unchecked = fxcondensa.thin(model, StructurePrune(0.5), x, check=False, output="graph")  # shapes from meta tensors
    shapes = _shapes(checked)
    assert shapes == _shapes(unchecked)
    assert shapes["fc"].shape == (1, 1000) and shapes["layer4_1_conv2"].shape[1] < 512
    assert checked.get_submodule("layer4.1.conv2").out_channels == unchecked.get_submodule("layer4.1.conv2").out_channels


def test_apply_keep_without_shapes_leaves_no_dense_shapes():
    model, x = _resnet18()
    gm = fxcondensa.compress(model, StructurePrune(0.5), x)
    gm = fxcondensa.trace(gm, x)
    analysis = analyze(gm)
    keep = ~removable_channels(gm, analysis)
    bare = apply_keep(gm, analysis, keep, (x,), shapes=False)
    assert all("tensor_meta" not in n.meta for n in bare.graph.nodes)
    assert any("tensor_meta" in n.meta for n in gm.graph.nodes)  # the dense graph keeps its own
    shaped = apply_keep(gm, analysis, keep, (x,))
    graph_module.propagate_shapes(bare, (x,))
    assert _shapes(bare) == _shapes(shaped)


def _groups_by_loop(analysis) -> list[list[str]]:
    """Groups of producers the plain way: a union-find over every (channel, range) pair."""
    parent = list(range(len(analysis.range_names)))

    def find(r: int) -> int:
        while parent[r] != r:
            r = parent[r]
        return r

    first: dict[int, int] = {}
    range_of = torch.tensor(analysis.range_of)
    for ch, r in zip(analysis.channel_of.tolist(), range_of.tolist(), strict=True):
        if ch in first:
            a, b = find(first[ch]), find(r)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first[ch] = r
    groups: dict[int, list[str]] = {}
    for r, name in enumerate(analysis.range_names):
        groups.setdefault(find(r), []).append(name)
    return sorted(groups.values())


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_small"])
def test_groups_equal_a_plain_union_find(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    analysis = analyze(fxcondensa.trace(model, torch.randn(1, 3, 64, 64)))
    assert sorted(g.producers for g in analysis.groups) == _groups_by_loop(analysis)
    for g in analysis.groups:  # every channel of a group is counted there, and only there
        assert bool((analysis.group_of_channel[g.channels] == g.id).all())
    assert sum(g.channels.numel() for g in analysis.groups) == analysis.num_channels


def test_keep_one_per_slice_equals_the_plain_loop():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    analysis = analyze(fxcondensa.trace(model, torch.randn(1, 3, 64, 64)))
    score = torch.rand(analysis.num_channels)
    for keep in (torch.zeros(analysis.num_channels, dtype=torch.bool), torch.rand(analysis.num_channels) < 0.01):
        expected = keep.clone()
        for s in analysis.slices:
            ch = analysis.channel_of[s.atoms]
            if ch.numel() and not bool(expected[ch].any()):
                expected[ch[int(torch.argmax(score[ch]))]] = True
        assert torch.equal(keep_one_per_slice(analysis, keep, score), expected)


class _Repeated(nn.Module):
    """The same layer configuration called on the same shapes again and again, as in a ResNet stage."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                    for _ in range(4))
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.pool(x.contiguous(memory_format=torch.channels_last)).flatten(1)


def test_memoised_meta_shapes_equal_unmemoised(monkeypatch):
    model, x = _Repeated().eval(), torch.randn(2, 8, 16, 16)
    memoised = fxcondensa.trace(model, x)
    monkeypatch.setattr(graph_module, "_call_key", lambda module, args, kwargs: None)
    plain = fxcondensa.trace(model, x)
    assert _shapes(memoised) == _shapes(plain)
    real = fxcondensa.trace(model, x)
    graph_module.propagate_shapes(real, x)  # real tensors: the reference
    assert _shapes(memoised) == _shapes(real)


def test_a_layer_with_a_hook_runs_on_every_call():
    model, x = _Repeated().eval(), torch.randn(2, 8, 16, 16)
    gm = fxcondensa.trace(model, x)
    calls = []
    norms = [gm.get_submodule(f"blocks.{k}.1") for k in range(4)]
    for norm in norms:
        norm.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    graph_module.propagate_shapes(gm, x, fake=True)
    assert calls == [(2, 8, 16, 16)] * 4
    meta = (torch.empty(2, 8, 16, 16, device="meta"),)
    assert graph_module._call_key(norms[0], meta, {}) is None
    assert graph_module._call_key(gm.get_submodule("blocks.0.0"), meta, {}) is not None


def test_tensor_metadata_equals_torchs():
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    for t in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
              torch.randn(3, 4).t(), torch.zeros(2, dtype=torch.long), torch.randn(4, requires_grad=True)):
        a, b = graph_module._tensor_metadata(t), graph_module._tensor_metadata(t)
        assert a == b == _extract_tensor_metadata(t)
        assert a.qparams is not b.qparams  # each node gets its own


def test_profile_costs_without_nonzero_counts():
    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    full, lean = profile_costs(gm), profile_costs(gm, count_nonzero=False)
    assert [(c.name, c.macs, c.params) for c in full] == [(c.name, c.macs, c.params) for c in lean]
    assert all(c.nonzero_params == -1 for c in lean) and any(c.nonzero_params > 0 for c in full)


def test_tracing_needs_no_compiler_stack_and_keeps_torchs_stack_traces():
    """torch names the frames it leaves out of a node's stack trace by importing torch.export, dynamo and
    inductor; the tracer gets the same stack traces without them (a fresh interpreter, so that nothing
    else has imported them)."""
    script = textwrap.dedent("""
        import sys
        import torch, torchvision
        from fxcondensa.capture import graph

        model = torchvision.models.resnet18(weights=None)
        first = [(n.name, n.stack_trace) for n in graph._fx_trace(model, (), None).graph.nodes]
        assert "torch.export._trace" not in sys.modules and "torch._inductor.sizevars" not in sys.modules
        assert sum(s is not None for _, s in first) > 50
        from torch.fx.experimental.symbolic_shapes import uninteresting_files
        uninteresting_files()  # torch's own filter from here on
        again = [(n.name, n.stack_trace) for n in graph._fx_trace(model, (), None).graph.nodes]
        assert again == first
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuts_by_runs_and_compact_masks_equal_index_select(dtype):
    """A cut of whole heads (a few runs of columns) copies blocks, a mask's repeated dims stay size 1, zero
    rows are reduced in place, a mask multiplies from its compact form: each equals the plain operation."""
    from fxcondensa.passes.reference import _apply
    from fxcondensa.passes.slicing import _cut
    from fxcondensa.rules.layers import zero_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, 3, generator=g).to(dtype)
    w[2] = 0
    w[:, 7] = -0.0
    w[4, 9, 1] = float("nan")
    for idx in (torch.arange(64, 192), torch.cat([torch.arange(0, 32), torch.arange(96, 128)]),
                torch.sort(torch.randperm(256, generator=g)[:100]).values, torch.tensor([5]), torch.tensor([3, 4, 1, 2])):
        cut = _cut(w, 1, idx)
        torch.testing.assert_close(cut, w.index_select(1, idx), rtol=0, atol=0, equal_nan=True)
        assert cut.is_contiguous()
    for dim in range(w.dim()):
        plain = w.movedim(dim, 0).reshape(w.shape[dim], -1).abs().amax(1) == 0
        assert torch.equal(zero_rows(w, dim), plain)
    keep = torch.rand(256, generator=g) > 0.5
    mask = keep.view(1, -1, 1).expand_as(w)
    torch.testing.assert_close(_apply(w, mask), w * mask, rtol=0, atol=0, equal_nan=True)


@given(shape=st.lists(st.integers(1, 9), min_size=2, max_size=4), data=st.data(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.bool]),
       block=st.sampled_from([1, 7, 1 << 18]))
@settings(max_examples=40, deadline=None)
def test_a_scattered_cut_copies_the_bits_index_select_copies(shape, data, dtype, block):
    """Scattered indices along an inner dim are gathered a block of rows at a time in 2-byte dtypes (``_cut``
    does so past ``_MAX_RUNS`` runs; ``_gather`` is called here directly too): the same bits as
    ``index_select`` (NaN payloads and signed zeros included), whatever the block."""
    from fxcondensa.passes import slicing

    dim = data.draw(st.integers(1, len(shape) - 1))
    idx = torch.tensor(sorted(data.draw(st.sets(st.integers(0, shape[dim] - 1), min_size=1))))
    bits = torch.randint(-2**15, 2**15, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(len(idx)))
    w = bits.to(torch.int16).view(dtype) if dtype.itemsize == 2 else bits.to(dtype)
    before, slicing._GATHER_BLOCK = slicing._GATHER_BLOCK, block
    try:
        cuts = [slicing._cut(w, dim, idx), slicing._gather(w, dim, idx)]
    finally:
        slicing._GATHER_BLOCK = before
    plain = w.index_select(dim, idx)
    for cut in cuts:
        assert cut.shape == plain.shape and cut.dtype == dtype and cut.is_contiguous()
        as_int = torch.int16 if dtype.itemsize == 2 else None
        assert torch.equal(cut.view(as_int), plain.view(as_int)) if as_int else torch.equal(cut, plain)


_SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1.0, 2.0**-24, 3.0]


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       slab=st.sampled_from([1, 5, 1 << 18]))
@settings(max_examples=60, deadline=None)
def test_zero_rows_by_bits_equals_amax_and_amin(shape, data, dtype, slab):
    """Zero slices found on the bits (slab by slab of rows) are those of the float reductions: signed zeros
    are zero, NaN, infinities and subnormals are not."""
    from fxcondensa.rules import layers

    dim = data.draw(st.integers(0, len(shape) - 1))
    values = data.draw(st.lists(st.sampled_from(_SPECIAL), min_size=1, max_size=4))
    zeros = data.draw(st.floats(0, 1))
    g = torch.Generator().manual_seed(len(values))
    pick = torch.tensor(values)[torch.randint(0, len(values), shape, generator=g)]
    w = torch.where(torch.rand(shape, generator=g) < zeros, torch.zeros(shape), pick).to(dtype)
    others = [d for d in range(w.dim()) if d != dim]
    plain = ((w.amax(others) == 0) & (w.amin(others) == 0)) if others else w == 0
    before, layers._ZERO_SLAB = layers._ZERO_SLAB, slab
    try:
        assert torch.equal(layers.zero_rows(w, dim), plain)
    finally:
        layers._ZERO_SLAB = before

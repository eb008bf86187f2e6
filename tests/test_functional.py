"""Pure tensor math: thresholds, masks, block scores, criteria and dtype round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcondensa import functional as F


@pytest.mark.parametrize(("n", "density", "k"), [(0, 0.5, 0), (1, 0.01, 1), (10, 0.5, 5), (10, 0.01, 1),
                                                 (10, 1.0, 10), (430500, 0.007, 3014), (3, 0.5, 2)])
def test_keep_count(n, density, k):
    assert F.keep_count(n, density) == k


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), density=st.floats(0.001, 1.0), seed=st.integers(0, 2**16))
def test_magnitude_threshold_keeps_k_largest(n, density, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g)  # continuous: no ties
    t = F.magnitude_threshold(scores, density)
    reference = torch.sort(scores, descending=True).values[F.keep_count(n, density) - 1]
    assert t == float(reference)
    assert int((scores >= t).sum()) == F.keep_count(n, density)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), density=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_top_mask_exact_count_even_with_ties(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, shape, generator=g).float()  # many ties
    mask = F.top_mask(scores, density)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    k = F.keep_count(scores.numel(), density)
    assert int(mask.sum()) == k
    if k < scores.numel():  # every kept score is at least every dropped one
        assert scores[mask].min() >= scores[~mask].max()


def test_block_scores_by_hand():
    w = torch.arange(16.0).reshape(4, 4)
    s = F.block_scores(w, (2, 2), F.sum)
    assert s.tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
    l2 = F.block_scores(w, (2, 2), F.l2norm)
    assert math.isclose(float(l2[0, 0]), math.sqrt(0 + 1 + 16 + 25), rel_tol=1e-6)
    assert F.block_scores(w, (1, 4), F.max).tolist() == [[3.0], [7.0], [11.0], [15.0]]


def test_criteria_reduce_absolute_values():
    x = torch.tensor([[-3.0, 1.0], [2.0, -4.0]])
    assert F.max(x, [1]).tolist() == [3.0, 4.0]
    assert F.min(x, [1]).tolist() == [1.0, 2.0]
    assert F.mean(x, [0]).tolist() == [2.5, 2.5]
    assert F.sum(x, [0, 1]).item() == 10.0
    assert F.l2norm(x, [1]).tolist() == pytest.approx([math.sqrt(10), math.sqrt(20)])


def test_resolve_criteria():
    assert F.resolve_criteria("l2norm") is F.l2norm
    custom = lambda x, dims: x.abs().sum(dim=tuple(dims))  # noqa: E731
    assert F.resolve_criteria(custom) is custom
    with pytest.raises(ValueError, match="'l3norm'"):
        F.resolve_criteria("l3norm")
    with pytest.raises(TypeError, match="int"):
        F.resolve_criteria(3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_is_representable_and_idempotent(dtype):
    x = torch.randn(1000) * 10
    y = F.round_trip(x, dtype)
    assert y.dtype == torch.float32
    assert torch.equal(y.to(dtype).to(torch.float32), y)
    assert torch.equal(F.round_trip(y, dtype), y)
    assert not torch.equal(y, x)  # something was actually rounded
    assert torch.allclose(y, x, rtol=2 ** -7, atol=0)


def test_builtins_still_reachable():
    assert F.builtins_max(1, 2) == 2 and F.builtins_min(1, 2) == 1

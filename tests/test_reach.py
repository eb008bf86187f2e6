"""Reach of the channel analysis: layers and call forms it used to crash on, freeze without a reason, or treat
differently under the two capture frontends. Each thinned model is compared with the compressed dense one."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from _models import state_hash
from torch import nn

import fxcondensa
from fxcondensa import thin, trace
from fxcondensa.records import thin_record
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, norm affines and biases included (no parameter is left at its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + 0.5 if "var" in name else torch.randn(b.shape, generator=g))
    return model.eval()


def _thin_exact(model: nn.Module, x, *, capture: str = "auto", scheme=None) -> torch.fx.GraphModule:
    """Thin ``model`` and check it against the compressed dense model on fresh inputs (the reference)."""
    scheme = scheme or StructurePrune(0.5)
    before = state_hash(model)
    small = thin(model, scheme, x, capture=capture)
    assert state_hash(model) == before, "the input model was modified"
    dense = trace(model, x, capture=capture)
    with torch.no_grad():
        scheme.pi(dense)
        scheme.delta(dense)
        fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(small(fresh), dense(fresh), rtol=RTOL, atol=ATOL)
    return small


# -- crashes found by random architectures -------------------------------------------------------------

@pytest.mark.parametrize("cin,cout,groups", [(8, 24, 2), (8, 8, 8), (6, 12, 3)])
def test_grouped_transposed_conv_thins_exactly(cin, cout, groups):
    # Its weight holds out_channels // groups on dim 1: scoring used to index it with every output channel.
    model = _randomized(nn.Sequential(nn.Conv2d(4, cin, 1), nn.ReLU(),
                                      nn.ConvTranspose2d(cin, cout, 3, padding=1, groups=groups), nn.ReLU(),
                                      nn.Conv2d(cout, 4, 1)))
    small = _thin_exact(model, torch.randn(1, 4, 8, 8))
    t = small.get_submodule("2")
    assert t.out_channels < cout and t.in_channels <= cin
    if cin == cout == groups:  # depthwise: whole conv groups go
        assert t.groups == t.out_channels == t.in_channels
    else:  # every conv group keeps the same count
        assert t.groups == groups and t.out_channels % groups == 0 and t.in_channels % groups == 0
    assert _params(small) < _params(model)


def test_the_grouped_transposed_conv_of_the_report_thins():
    model = _randomized(nn.Sequential(nn.ConvTranspose2d(8, 24, 3, padding=1, groups=2), nn.ReLU(),
                                      nn.Conv2d(24, 4, 1)))
    small = _thin_exact(model, torch.randn(1, 8, 8, 8))
    assert small.get_submodule("0").out_channels < 24


class MaxPools(nn.Module):
    """Calls the pooling functions torch builds with a factory (``boolean_dispatch``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv1d(8, 4, 1)

    def forward(self, x):
        y = F.adaptive_max_pool2d(F.max_pool2d(self.a(x), 2), 2)
        return self.b(F.max_pool1d(y.flatten(2), 2, return_indices=False))


@pytest.mark.parametrize("kind", ["trace", "compress", "thin"])
def test_a_model_calling_max_pool_functions_pickles(kind):
    model, x = _randomized(MaxPools()), torch.randn(1, 3, 12, 12)
    gm = {"trace": lambda: trace(model, x),
          "compress": lambda: fxcondensa.compress(model, StructurePrune(0.5), x),
          "thin": lambda: thin(model, StructurePrune(0.5), x)}[kind]()
    buf = io.BytesIO()
    torch.save(gm, buf)
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    twice = pickle.loads(pickle.dumps(gm))
    with torch.no_grad():
        torch.testing.assert_close(again(x), gm(x))
        torch.testing.assert_close(twice(x), gm(x))
    # Reloaded graphs call the same functions, so the channel analysis still knows them.
    assert [n.target for n in again.graph.nodes] == [n.target for n in gm.graph.nodes]
    if kind == "thin":
        assert thin_record(again).frozen == thin_record(gm).frozen

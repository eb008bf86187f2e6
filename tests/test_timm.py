"""A handful of small timm models thin exactly (thinned == compressed on a fresh input) and lose parameters:
the fused norm+activation layers (``BatchNormAct2d`` calls ``F.batch_norm`` and reads ``x.ndim``), timm's
layer scales (``gamma.reshape(1, -1, 1, 1)``) and ConvNeXt blocks."""

from __future__ import annotations

import pytest
import timm
import torch
from _models import bench_coverage

from fxcondensa import thin, trace
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

_bench = bench_coverage()
randomize_constants = _bench.randomize_constants  # the zoo of bench/coverage.py: the same models and randomisation

RTOL, ATOL = 1e-4, 1e-5
SCHEME = StructurePrune(0.5)


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_small_timm_model_thins_exactly(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomize_constants(model)
    x = torch.randn(1, 3, 64, 64)
    fresh = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    thinned = thin(model, SCHEME, x)
    record = thin_record(thinned)
    assert record.capture == "fx" and record.rule_failures == 0
    assert params(thinned) * 1.3 < params(model), (params(thinned), params(model))
    compressed = trace(model, x)
    with torch.no_grad():
        SCHEME.pi(compressed)
        SCHEME.delta(compressed)
        torch.testing.assert_close(thinned.eval()(fresh), compressed.eval()(fresh), rtol=RTOL, atol=ATOL)

"""thin's equivalence check: float32 rounding is told apart from a wrong model by a float64 comparison."""

from __future__ import annotations

import pytest
import torch

import fxcondensa
from fxcondensa.passes import thin as thin_module
from fxcondensa.schemes import StructurePrune


def _fp32_always_differs(monkeypatch):
    real = thin_module._outputs_close

    def close(a, b, *tolerances):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            return False  # as if float32 rounding had exceeded the tolerance
        return real(a, b, *tolerances)

    monkeypatch.setattr(thin_module, "_outputs_close", close)


def test_rounding_only_differences_pass_in_float64(monkeypatch):
    _fp32_always_differs(monkeypatch)
    model, x = fxcondensa.models.LeNet5(), torch.randn(2, 1, 28, 28)
    small = fxcondensa.thin(model, StructurePrune(0.3), x)
    assert small.conv1.out_channels < 20
    assert small.conv1.weight.dtype == torch.float32  # the float64 copies are only for the check


def _remove_a_live_channel(monkeypatch) -> None:
    real = thin_module.removable_channels

    def too_many(gm, analysis):  # also remove a live channel: the thinned model is then wrong
        removable = real(gm, analysis).clone()
        removable[~removable & ~analysis.frozen_channels()] = True
        return removable

    monkeypatch.setattr(thin_module, "removable_channels", too_many)


def test_a_wrong_model_still_fails_in_float64(monkeypatch):
    _fp32_always_differs(monkeypatch)
    _remove_a_live_channel(monkeypatch)
    with pytest.raises(fxcondensa.ThinningCheckError, match="float64"):
        fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(2, 1, 28, 28))


def test_the_check_catches_a_wrong_model(monkeypatch):
    """The thinned model's outputs come from the run that also records its shapes: a live channel removed
    still fails the check (in float32, and in float64 after it); without the check the wrong model is
    returned, so the check is what catches it."""
    _remove_a_live_channel(monkeypatch)
    with pytest.raises(fxcondensa.ThinningCheckError, match="float64"):
        fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(2, 1, 28, 28))
    fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(2, 1, 28, 28), check=False)

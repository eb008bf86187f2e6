"""Calibration-aware channel scores ("activation", "taylor"): they equal a reference computation, they see what
weights alone cannot (a channel that never fires), the thinned model still equals the compressed one on a
grouped-query Llama (float32 and bf16, heads and head_dim columns, a MAC target), and bad calibration is named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxcondensa
from fxcondensa.schemes import StructurePrune
from fxcondensa.schemes.calibration import Calibration


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _kept_rows(gm: nn.Module) -> set[int]:
    return set(torch.nonzero(gm.get_parameter("0.weight").abs().sum(1) > 0).flatten().tolist())


def test_activation_scores_equal_mean_abs_input_times_column_norm():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 8, generator=g) for _ in range(3)]
    w = fxcondensa.compress(model, StructurePrune(0.5, criteria="activation", calibration=batches, align=1),
                            batches[0])
    with torch.no_grad():
        h = torch.cat([model[1](model[0](x)) for x in batches])
        score = h.abs().mean(0) * model[2].weight.norm(dim=0)
    assert _kept_rows(w) == set(score.topk(8).indices.tolist())


def test_taylor_scores_equal_sum_of_weight_times_gradient_over_the_group():
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # (inputs, targets): cross-entropy on the targets
    w = fxcondensa.compress(model, StructurePrune(0.5, criteria="taylor", calibration=loader, align=1), x[:4])
    ref = _mlp()
    sum(F.cross_entropy(ref(x[i:i + 4]), y[i:i + 4]) for i in range(0, 12, 4)).backward()
    wg = lambda p: (p * p.grad).abs()  # noqa: E731
    score = wg(ref[0].weight).sum(1) + wg(ref[0].bias) + wg(ref[2].weight).sum(0)
    assert _kept_rows(w) == set(score.topk(8).indices.tolist())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the user's model untouched


def test_a_channel_that_never_fires_goes_first_whatever_its_weights():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3] *= 50  # the largest row by far ...
        model[0].bias[3] = -1e4  # ... but its ReLU output is always zero
    x = [torch.randn(6, 8) for _ in range(2)]
    by_weights = fxcondensa.compress(model, StructurePrune(0.5, align=1), x[0])
    by_activation = fxcondensa.compress(model, StructurePrune(0.5, calibration=x, align=1), x[0])
    assert 3 in _kept_rows(by_weights) and 3 not in _kept_rows(by_activation)


def _llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      use_cache=False, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


@pytest.mark.parametrize("criteria, attention, target, dtype", [
    ("activation", None, None, torch.float32),
    ("taylor", "both", None, torch.float32),
    ("activation", "head_dim", 0.5, torch.bfloat16),
    ("taylor", None, 0.6, torch.bfloat16),
])
def test_thinned_equals_compressed_on_a_grouped_query_llama(criteria, attention, target, dtype):
    model = _llama(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (2, 8), generator=g)
    calibration = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(2)]
    kw = dict(target_flops=target) if target else dict(density=0.5)
    scheme = StructurePrune(**kw, criteria=criteria, calibration=calibration, attention=attention)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxcondensa.thin(model, scheme, (x,))
    compressed = fxcondensa.compress(model, scheme, (x,))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    fresh = torch.randint(0, 64, (2, 8), generator=g)
    with torch.no_grad():
        a, b = small(fresh).logits.float(), compressed(fresh).logits.float()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a, b, **tol)


def test_the_default_criteria_with_calibration_is_activation():
    scheme = StructurePrune(0.5, calibration=[torch.zeros(2, 8)])
    assert scheme.criteria == "activation"
    assert "calibration=Calibration(batches=1, digest=" in repr(scheme)
    assert scheme == StructurePrune(0.5, calibration=[torch.zeros(2, 8)])
    assert scheme != StructurePrune(0.5, calibration=[torch.ones(2, 8)])


@pytest.mark.parametrize("kw, match", [
    (dict(criteria="activation"), r"criteria='activation' scores channels on calibration batches: pass calibration="),
    (dict(criteria="taylor"), r"criteria='taylor' scores channels .* calibration=\[x1, x2\]"),
    (dict(criteria="l2norm", calibration=[torch.zeros(2, 8)]), "calibration is read only by criteria"),
    (dict(calibration=torch.zeros(2, 8)), r"calibration must be a DataLoader or a list of batches, got Tensor"),
    (dict(calibration=[]), "calibration is an empty list; pass calibration="),
])
def test_bad_calibration_arguments_are_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StructurePrune(0.5, **kw)


@pytest.mark.parametrize("batches, match", [
    ([torch.zeros(4, 7)], r"calibration batch 0, input 0: shape \(4, 7\) and dtype torch.float32, but the model "
                          r"was captured with shape \(2, 8\)"),
    ([torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float64)], r"calibration batch 1, input 0: .* dtype "
                                                                   r"torch.float64"),
    ([(torch.zeros(4, 8), torch.zeros(4), torch.zeros(4))], "calibration batch 0 has 3 inputs, the model takes 1"),
    (DataLoader(TensorDataset(torch.zeros(0, 8)), batch_size=2), "calibration yielded no batch"),
])
@pytest.mark.parametrize("criteria", ["activation", "taylor"])
def test_bad_calibration_batches_are_named(batches, match, criteria):
    with pytest.raises(ValueError, match=match):
        fxcondensa.compress(_mlp(), StructurePrune(0.5, criteria=criteria, calibration=batches), torch.zeros(2, 8))


def test_an_export_captured_model_needs_its_exact_shapes():
    scheme = StructurePrune(0.5, calibration=[{"input_ids": torch.zeros(3, 8, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"calibration batch 0, input_ids: shape \(3, 8\) .* captured with shape "
                                         r"\(2, 8\) .* exactly"):
        fxcondensa.compress(_llama(), scheme, (torch.zeros(2, 8, dtype=torch.long),))


def test_calibration_loss_must_be_callable():
    with pytest.raises(TypeError, match="Calibration: loss must be a callable"):
        Calibration([torch.zeros(1)], loss=3)

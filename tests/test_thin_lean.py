"""thin without a second dense copy: a scheme that only records masks is applied on the fly
(``fxcondensa.passes.reference``), the capture shares the user's tensors (``capture.sharing``) and never
writes to them, and the thinned model shares none of them. Each transform is compared with the reference:
the same thin run on a compressed copy (``compress`` zeroes the weights, the old path)."""

from __future__ import annotations

import pytest
import torch
from _models import llama_tokens, small_llama, state_hash
from torch import nn

import fxcondensa
from fxcondensa.capture.exported import graph_inputs
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.sharing import copy_model, shared_tensors
from fxcondensa.passes import reference
from fxcondensa.passes.analysis import analyze, removable_channels
from fxcondensa.passes.annotate import annotations, apply_annotations
from fxcondensa.passes.precision import run_in
from fxcondensa.schemes import Prune, Quantize, StructurePrune


def llama(dtype: torch.dtype, hidden: int = 128) -> nn.Module:
    return small_llama(dtype, hidden=hidden, layers=2)


tokens = llama_tokens


def _pointers(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def test_copy_model_shares_tensors_only_when_asked():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with shared_tensors():
        twin = copy_model(model)
    assert twin is not model and twin[0] is not model[0]
    assert twin[0].weight is model[0].weight and twin[1].running_mean is model[1].running_mean
    assert copy_model(model)[0].weight is not model[0].weight  # outside the context: a real copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thin_equals_thin_of_the_compressed_copy_and_shares_nothing(dtype):
    model, x = llama(dtype), tokens()
    before = state_hash(model)
    with pytest.warns(UserWarning, match="use_cache=False"):
        lean = fxcondensa.thin(model, StructurePrune(0.5), x, output="graph")
    assert state_hash(model) == before, "the input model was modified"
    assert not _pointers(lean) & _pointers(model), "the thinned model shares a tensor with the user's model"
    with pytest.warns(UserWarning, match="use_cache=False"):
        old = fxcondensa.thin(fxcondensa.compress(model, StructurePrune(0.5), x), example_inputs=x, output="graph")
    lean_state, old_state = lean.state_dict(), old.state_dict()
    assert lean_state.keys() == old_state.keys()
    for k in lean_state:  # the same tensors, bit for bit: slicing then masking equals masking then slicing
        assert torch.equal(lean_state[k], old_state[k]), k
    out_lean = flatten_outputs(dict(lean(**x)))
    out_old = flatten_outputs(dict(old(**x)))
    assert all(torch.equal(a, b) for a, b in zip(out_lean, out_old, strict=True))


def test_thin_output_module_of_a_lean_thin_leaves_the_model_alone():
    model, x = llama(torch.float32), tokens()
    before = state_hash(model)
    small = fxcondensa.thin(model, StructurePrune(0.5), x, output="module")
    assert state_hash(model) == before
    assert type(small) is type(model) and not _pointers(small) & _pointers(model)
    expected = fxcondensa.compress(model, StructurePrune(0.5), x)(**x).logits
    torch.testing.assert_close(small(**x).logits, expected, rtol=1e-4, atol=1e-5)


def _masked_graph():
    """A captured Linear whose masks say row 1 is pruned, and the same graph with the mask applied."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3)
    with shared_tensors():
        gm = fxcondensa.trace(model, x)
    keep = torch.tensor([True, False, True, True])
    masks = {"0.weight": keep.view(-1, 1).expand(4, 3), "0.bias": keep}
    reference.set_masks(gm, masks)
    dense = fxcondensa.trace(model, x)
    with torch.no_grad():
        dense.get_submodule("0").weight.mul_(masks["0.weight"])
        dense.get_submodule("0").bias.mul_(keep)
    return model, gm, dense, x


def test_masked_interpreter_runs_the_masked_values_and_writes_nothing():
    model, gm, dense, x = _masked_graph()
    before = state_hash(model)
    assert torch.equal(reference.MaskedInterpreter(gm).run(x), dense(x))
    assert torch.equal(run_in(gm, (x,), torch.float64), run_in(dense, (x,), torch.float64))
    assert state_hash(model) == before and bool(model[0].weight[1].abs().sum() > 0)


def test_masked_view_shows_zero_channels_to_the_analysis():
    _, gm, dense, _ = _masked_graph()
    analysis = analyze(gm)
    assert torch.equal(removable_channels(gm, analysis), removable_channels(dense, analyze(dense)))
    assert bool(removable_channels(gm, analysis).any())
    reference.set_masks(gm, {})
    assert not bool(removable_channels(gm, analyze(gm)).any())  # without masks: the dense values


def test_masks_of_a_copy_are_not_inherited():
    import copy

    _, gm, _, _ = _masked_graph()
    assert reference.masks_of(gm) and not reference.masks_of(copy.deepcopy(gm))


def test_structured_masks_are_views_of_one_vector():
    model, x = llama(torch.bfloat16), tokens()
    gm = fxcondensa.trace(model, x)
    StructurePrune(0.5).annotate(gm)
    masks = {n: a.mask for n, a in annotations(gm).items() if a.mask is not None}
    assert masks and all(0 in m.stride() for m in masks.values() if m.dim() == 2)
    apply_annotations(gm)  # an expanded mask applies like a full one
    for name, mask in masks.items():
        assert bool((gm.get_parameter(name)[~mask] == 0).all()), name
    assert bool((gm.get_parameter("model.embed_tokens.weight") == 0).any())


@pytest.mark.parametrize("scheme", [Quantize(torch.float16), Prune(0.5)])
def test_other_schemes_thin_as_before(scheme):
    torch.manual_seed(0)
    model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    before = state_hash(model)
    small = fxcondensa.thin(model, scheme, x)
    assert state_hash(model) == before
    expected = fxcondensa.compress(model, scheme, x)(x)
    torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
    assert scheme.masks_only is isinstance(scheme, Prune)


def test_reference_check_still_catches_a_wrong_thinned_model():
    """The masked reference is what the check compares with: a thinned tensor off by one value fails."""
    from fxcondensa.errors import ThinningCheckError
    from fxcondensa.passes.thin import _check

    model, gm, _, x = _masked_graph()
    analysis = analyze(gm)
    keep = ~removable_channels(gm, analysis)
    from fxcondensa.passes.slicing import apply_keep

    thinned = apply_keep(gm, analysis, keep, graph_inputs(gm, x))
    _check(gm, thinned, analysis, keep, (x,))  # exact: passes
    with torch.no_grad():
        thinned.get_submodule("2").bias[0] += 1.0
    with pytest.raises(ThinningCheckError, match="differs from the compressed model"):
        _check(gm, thinned, analysis, keep, (x,))

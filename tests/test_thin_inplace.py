"""thin(inplace=True) cuts the user's own tensors one at a time (``fxcondensa.passes.inplace``): the result is
the model object itself, exactly what thin without inplace returns, and no dense tensor outlives its slice."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from _models import llama_tokens, small_llama
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.errors import ThinningCheckError
from fxcondensa.passes import inplace
from fxcondensa.schemes import StructurePrune


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_is_the_same_object_and_equals_thin_and_the_compressed_model(dtype):
    model, x = small_llama(dtype, hidden=96, layers=1), llama_tokens()
    reference = fxcondensa.compress(copy.deepcopy(model), StructurePrune(0.5), x)
    usual = fxcondensa.thin(copy.deepcopy(model), StructurePrune(0.5), x)  # the user's model untouched
    dense = {n: weakref.ref(p) for n, p in model.named_parameters()}
    out = fxcondensa.thin(model, StructurePrune(0.5), x, inplace=True)
    assert out is model and thin_record(model).returns == "module"
    assert model.model.embed_tokens.weight.shape[1] < 96 and model.config.hidden_size < 96
    state, expected = model.state_dict(), usual.state_dict()
    assert state.keys() == expected.keys()
    for k in state:  # bit for bit: cutting then masking in place equals masking on the fly then cutting
        assert torch.equal(state[k], expected[k]), k
    with torch.no_grad():
        logits, ref = model(**x).logits, reference(**x).logits
    assert torch.equal(logits, usual(**x).logits)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
    torch.testing.assert_close(logits, ref, rtol=rtol, atol=atol)
    cut = {n for n, p in model.named_parameters() if p.shape != reference.get_parameter(n).shape}
    gc.collect()
    assert cut and not [n for n in cut if dense[n]() is not None], "a dense tensor outlived its slice"


def test_each_dense_tensor_is_freed_before_the_next_is_cut(monkeypatch):
    """No second copy of a weight is alive at once: whenever a slice is put in place, every dense tensor cut
    before it is gone (the largest, the embedding and the output head, are cut last)."""
    model, x = small_llama(torch.float32, hidden=64, layers=1), llama_tokens()
    dense = {n: weakref.ref(p) for n, p in model.named_parameters()}
    numel = {n: p.numel() for n, p in model.named_parameters()}
    order: list[list[str]] = []
    alive_after: list[list[str]] = []
    put = inplace.put_tensor

    def spy(root, names, value):
        if value.untyped_storage().nbytes() == value.numel() * value.element_size() and root is not model:
            alive_after.append([n for done in order for n in done if dense.get(n) and dense[n]() is not None])
            order.append(names)
        put(root, names, value)

    monkeypatch.setattr(inplace, "put_tensor", spy)
    fxcondensa.thin(model, StructurePrune(0.5), x, inplace=True)
    assert len(order) > 5 and not any(alive_after), alive_after
    sizes = [numel[names[0]] for names in order]
    assert sizes == sorted(sizes), "the largest tensors are cut last, when the others have made room"


def test_a_failed_check_after_cutting_says_the_model_was_changed(monkeypatch):
    model, x = small_llama(torch.float32), llama_tokens()
    monkeypatch.setattr(fxcondensa.compression.thinning, "check_own", lambda *a: "forced to differ")
    with pytest.raises(ThinningCheckError, match=r"forced to differ.*LlamaForCausalLM was thinned in place "
                                                 r"before the check.*do not use it\. Load the model again"):
        fxcondensa.thin(model, StructurePrune(0.5), x, inplace=True)
    # The state the message describes: the weights are cut and the sizes follow them.
    assert model.model.embed_tokens.weight.shape[1] == model.config.hidden_size < 64


class _Literal(nn.Module):
    """A forward with a literal channel count (16): only a graph can be the thinned model."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x).relu().reshape(x.shape[0], 16))


def test_inplace_where_only_a_graph_can_follow_leaves_the_model_compressed_not_cut():
    torch.manual_seed(0)
    model, x = _Literal(), torch.randn(3, 8)
    reference = fxcondensa.compress(model, StructurePrune(0.5), x)
    with pytest.raises(ValueError, match=r"literal size 16 .*\(inplace=True: _Literal is now the compressed "
                                         r"model, its pruned weights zeroed in place and none cut\)"):
        fxcondensa.thin(model, StructurePrune(0.5), x, output="module", inplace=True)
    assert model.a.weight.shape == (16, 8)
    for name, t in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    small = fxcondensa.thin(model, StructurePrune(0.5), x, inplace=True)
    assert isinstance(small, torch.fx.GraphModule) and "literal size 16" in thin_record(small).reason
    assert model.a.weight.shape == (16, 8)  # not cut: its pruned rows are zero, as compress would make them
    for name, t in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    with torch.no_grad():
        torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-5)
    ours = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert not ours & {t.untyped_storage().data_ptr() for t in small.parameters()}

"""Whole experts removed from mixture-of-experts layers (``ExpertPrune``) with their router rows: exact against
the compressed model, in which the removed experts' router logits are -inf; alone (the user's class comes
back, with its config) and with channel pruning; float32 and bfloat16; the errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import state_hash
from test_moe import TOL, ListMoE, _hf_moe, _randomized, _tokens, params
from torch import nn

from fxcondensa import compress, load_thinned, save_thinned, thin, trace
from fxcondensa import nn as fxnn
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.records import graph_record, thin_record
from fxcondensa.schemes import Compose, ExpertPrune, StructurePrune


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # transformers' use_cache note on the capture
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _close(a, b, dtype):
    for x, y in zip(flatten_outputs(dict(a)), flatten_outputs(dict(b)), strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


def _routers(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_expert_removal_alone_is_exact_and_keeps_the_class(kind, dtype):
    model = _randomized(_hf_moe(kind)).to(dtype)
    x, before = _tokens(0), state_hash(model)
    small = _quiet(thin, model, ExpertPrune(0.5), x)
    assert state_hash(model) == before, "the input model was modified"
    assert type(small) is type(model), thin_record(small).reason
    kept = thin_record(small).experts["model.layers.0.mlp.gate.weight"]
    assert len(kept) == 2
    assert small.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    assert _routers(small)[0].weight.shape[0] == 2 and _routers(small)[0].num_experts == 2
    assert (small.config.num_local_experts if kind == "mixtral" else small.config.num_experts) == 2
    assert params(small) < params(model)
    compressed = _quiet(compress, model, ExpertPrune(0.5), x)
    # The compressed model cannot be the class: its router puts the removed experts at -inf.
    assert isinstance(compressed, torch.fx.GraphModule) and "-inf" in graph_record(compressed).reason
    with torch.no_grad():
        fresh = _tokens(1)
        _close(small(**fresh), compressed(**fresh), dtype)
        # The dense model routes to the removed experts: the result differs from it.
        assert not torch.allclose(small(**fresh).logits.float(), model(**fresh).logits.float(), atol=1e-3)


def test_greedy_generation_equals_the_compressed_model():
    model = _randomized(_hf_moe("mixtral"))
    x = _tokens(0)
    small = _quiet(thin, model, ExpertPrune(experts=2), x)
    compressed = _quiet(compress, model, ExpertPrune(experts=2), x)
    ids = x["input_ids"]
    with torch.no_grad():
        out = small.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = ids
        for _ in range(4):  # the compressed graph, one full pass per token
            ref = torch.cat([ref, compressed(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_expert_removal_with_channel_pruning_is_exact(kind, dtype):
    model = _randomized(_hf_moe(kind)).to(dtype)
    scheme = Compose([ExpertPrune(0.5), StructurePrune(0.5)])
    x = _tokens(0)
    small = _quiet(thin, model, scheme, x, output="graph")
    assert small.get_parameter("model.layers.0.mlp.experts.down_proj").shape[0] == 2
    # StructurePrune(0.5) alone: 3.35x (Mixtral), 3.54x (Qwen2-MoE); half the experts too: 5.06x, 4.44x
    assert params(model) / params(small) >= 4.2
    compressed = _quiet(compress, model, scheme, x)
    with torch.no_grad():
        fresh = _tokens(1)
        _close(small(**fresh), compressed(**fresh), dtype)


def test_removed_experts_are_never_routed_to_in_the_compressed_model():
    model = _randomized(_hf_moe("mixtral"))
    compressed = _quiet(compress, model, ExpertPrune(0.5), _tokens(0))
    mask = next(n for n in compressed.graph.nodes if n.target is fxnn.mask_experts)
    removed = list(mask.args[1])
    weight = compressed.get_parameter("model.layers.0.mlp.gate.weight")
    assert weight[removed].abs().sum() == 0 and weight[[e for e in range(4) if e not in removed]].abs().sum() > 0
    experts = compressed.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert experts[removed].abs().sum() == 0


def test_routing_criterion_removes_the_least_routed_experts():
    model = _randomized(_hf_moe("mixtral"))
    batches = [_tokens(s) for s in range(3)]
    x = batches[0]
    compressed = _quiet(compress, model, ExpertPrune(experts=2, calibration=batches), x)
    removed = next(n for n in compressed.graph.nodes if n.target is fxnn.mask_experts).args[1]
    probs = torch.zeros(4)
    hidden = {}
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda m, i, o: hidden.setdefault("x", []).append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    for h in hidden["x"]:
        probs += torch.softmax(nn.functional.linear(h.reshape(-1, 32), gate.weight).double(), -1).sum(0).float()
    assert sorted(removed) == sorted(torch.argsort(probs)[:2].tolist())
    small = _quiet(thin, model, ExpertPrune(experts=2, calibration=batches), x)
    with torch.no_grad():
        _close(small(**_tokens(5)), compressed(**_tokens(5)), torch.float32)


def test_save_pretrained_round_trip(tmp_path):
    model = _randomized(_hf_moe("qwen2-moe"))
    small = _quiet(thin, model, ExpertPrune(0.5), _tokens(0))
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**_tokens(2)).logits, small(**_tokens(2)).logits)


def test_errors_name_the_value():
    model, x = _randomized(_hf_moe("mixtral")), _tokens(0)
    gm = _quiet(trace, model, x)
    with pytest.raises(ValueError, match=r"experts=5 keeps more experts .* \(4\)"):
        ExpertPrune(experts=5).annotate(gm)
    with pytest.raises(ValueError, match=r"experts=1 would leave 1 experts .* top 2; keep at least 2"):
        ExpertPrune(experts=1).annotate(gm)
    with pytest.raises(ValueError, match=r"density=0.25 \(1 of 4\) would leave 1 experts"):
        ExpertPrune(0.25).annotate(gm)
    with pytest.raises(ValueError, match="exactly one of density .* got density=0.5, experts=2"):
        ExpertPrune(0.5, experts=2)
    with pytest.raises(ValueError, match="experts must be a positive int .* got 0"):
        ExpertPrune(experts=0)
    with pytest.raises(ValueError, match="criteria must be one of .* got 'norm'"):
        ExpertPrune(0.5, criteria="norm")
    with pytest.raises(ValueError, match="calibration="):
        ExpertPrune(0.5, criteria="routing")
    with pytest.raises(ValueError, match="calibration is read only by criteria='routing'"):
        ExpertPrune(0.5, criteria="l2norm", calibration=[x])
    with pytest.raises(ValueError, match="output='module'.*-inf"):
        _quiet(compress, model, ExpertPrune(0.5), x, output="module")


def test_a_model_without_removable_experts_is_refused():
    # Experts as a list of modules, picked by comparing ids with each expert's number: whole experts of
    # this form are not removed (their channels are, see test_moe.py).
    with pytest.raises(ValueError, match="ListMoE has no mixture-of-experts layer whose experts can be removed"):
        compress(_randomized(ListMoE()), ExpertPrune(0.5), torch.randn(12, 8), output="graph")
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        compress(nn.Sequential(nn.Linear(4, 4)), ExpertPrune(0.5), torch.randn(2, 4))


class IndexedMoE(nn.Module):
    """Experts as one (experts, d, d) weight indexed by the routed ids (a batched matmul per token and slot),
    with a biased router."""

    def __init__(self, d: int = 8, experts: int = 6):
        super().__init__()
        self.router, self.w = nn.Linear(d, experts), nn.Parameter(torch.randn(experts, d, d))
        self.d = d

    def forward(self, x):
        p, ids = torch.topk(torch.softmax(self.router(x), -1), 2, dim=-1)
        picked = self.w[ids.reshape(-1)]
        y = torch.bmm(x[:, None].expand(-1, 2, -1).reshape(-1, 1, self.d), picked).reshape(-1, 2, self.d)
        return (y * p[..., None]).sum(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_experts_indexed_by_id_are_removed_exactly(capture):
    model, x = _randomized(IndexedMoE()), torch.randn(16, 8)
    small = thin(model, ExpertPrune(0.5), x, capture=capture)
    assert type(small) is IndexedMoE and small.w.shape[0] == 3
    assert small.router.weight.shape[0] == small.router.bias.shape[0] == small.router.out_features == 3
    compressed = compress(model, ExpertPrune(0.5), x)
    fresh = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(fresh), compressed(fresh), **TOL[torch.float32])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_recipe_replays_the_removed_experts(tmp_path, capture):
    model, x = _randomized(IndexedMoE()), torch.randn(16, 8)
    small = thin(model, Compose([ExpertPrune(0.5), StructurePrune(0.5)]), x, capture=capture)
    save_thinned(small, tmp_path / "moe.fxc")
    again = load_thinned(tmp_path / "moe.fxc", IndexedMoE())
    assert thin_record(again).experts == thin_record(small).experts
    assert again.w.shape == small.w.shape and again.router.weight.shape == small.router.weight.shape
    torch.testing.assert_close(again(x), small(x))


def test_channels_first_then_experts():
    model, x = _randomized(IndexedMoE()), torch.randn(16, 8)
    scheme = Compose([StructurePrune(0.5), ExpertPrune(experts=3)])
    small, compressed = thin(model, scheme, x), compress(model, scheme, x)
    assert small.w.shape[0] == 3
    fresh = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(small(fresh), compressed(fresh), **TOL[torch.float32])

"""Mixture-of-experts layers thin exactly: transformers' experts stored as 3-D weights and run as a grouped
matmul (Mixtral, Qwen2-MoE with its gated shared expert; float32 and bfloat16), and experts written as a list
of ``nn.Linear`` MLPs with token routing. Each thinned model is compared with the compressed dense one on a
fresh input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import state_hash
from torch import nn

from fxcondensa import thin, trace
from fxcondensa.capture.graph import flatten_outputs
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

SCHEME = StructurePrune(0.5)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _hf_moe(kind: str) -> nn.Module:
    import transformers

    sizes = dict(vocab_size=64, max_position_embeddings=32, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=2)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes, intermediate_size=48,
                                                                          num_local_experts=4))
    config = transformers.Qwen2MoeConfig(**sizes, intermediate_size=48, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=48, num_experts=4)
    return transformers.Qwen2MoeForCausalLM(config)


def _tokens(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (1, 8), generator=g)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_transformers_experts_thin_exactly(kind, dtype):
    model = _randomized(_hf_moe(kind)).to(dtype)
    x = _tokens(0)
    before = state_hash(model)
    with warnings.catch_warnings(record=True) as seen:  # the capture's use_cache note, where a graph comes back
        warnings.simplefilter("always")
        small = thin(model, SCHEME, x)
    record = thin_record(small)
    assert record.returns == "module" or any("use_cache=False" in str(w.message) for w in seen), record.reason
    assert state_hash(model) == before, "the input model was modified"
    assert params(model) / params(small) >= 1.8
    experts = [n for n, _ in small.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert experts, "the expert weights are kept under their own names"
    for name in experts:  # every expert keeps one width: fewer hidden columns, all experts still there
        dense, thinned = model.get_parameter(name), small.get_parameter(name)
        assert thinned.shape[0] == dense.shape[0] and thinned.shape[1] < dense.shape[1]
    with warnings.catch_warnings():  # the same use_cache warning, or none when it was given once
        warnings.simplefilter("ignore")
        dense = trace(model, x)
    with torch.no_grad():
        SCHEME.pi(dense)
        SCHEME.delta(dense)
        fresh = _tokens(1)
        for a, b in zip(flatten_outputs(dict(small(**fresh))), flatten_outputs(dict(dense(**fresh))), strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])


class ListMoE(nn.Module):
    """Experts as a list of MLPs, each run on the tokens routed to it (top-2 of a softmax router)."""

    def __init__(self, d: int = 16, hidden: int = 32, experts: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x)
        weights, chosen = torch.topk(F.softmax(self.router(h), -1), 2, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out = out.index_add(0, token, expert(h[token]) * weights[token, slot, None])
        return self.head(h + out)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_experts_as_a_list_of_linear_layers_thin_per_expert(capture):
    model, x = _randomized(ListMoE()), torch.randn(12, 8)
    small = thin(model, SCHEME, x, capture=capture)
    widths = [small.get_parameter(f"experts.{e}.0.weight").shape[0] for e in range(4)]
    assert all(w < 32 for w in widths)
    assert params(model) / params(small) >= 1.8
    dense = trace(model, x, capture=capture)
    with torch.no_grad():
        SCHEME.pi(dense)
        SCHEME.delta(dense)
        fresh = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(small(fresh), dense(fresh), **TOL[torch.float32])

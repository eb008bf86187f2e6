"""Stacks of identical blocks captured two blocks deep and copied (fxcondensa/capture/repeated.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import fxcondensa
from fxcondensa.capture import repeated
from fxcondensa.capture.exported import example_shapes, export_capture
from fxcondensa.capture.records import graph_record, thin_record
from fxcondensa.capture.repeated import find_stacks, repeated_once
from fxcondensa.capture.sharing import shared_tensors
from fxcondensa.compression import thinning
from fxcondensa.schemes import StructurePrune


def _llama(layers: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=layers, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _capture(model: nn.Module, inputs: dict, *, once: bool) -> torch.fx.GraphModule:
    with example_shapes(), shared_tensors():
        if once:
            with repeated_once():
                return export_capture(model, (), inputs)
        return export_capture(model, (), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [3, 5])
def test_copied_blocks_compute_what_the_whole_capture_computes(layers, dtype):
    model, inputs = _llama(layers, dtype)
    whole, once = _capture(model, inputs, once=False), _capture(model, inputs, once=True)
    assert graph_record(once).repeated == [f"model.layers: {layers} blocks, 2 traced"]
    assert graph_record(whole).repeated == []
    assert [n.target for n in once.graph.nodes] == [n.target for n in whole.graph.nodes]
    assert once.state_dict().keys() == whole.state_dict().keys()
    assert all(once.get_parameter(k) is model.get_parameter(k) for k, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(once(**inputs).logits, whole(**inputs).logits)
        assert torch.equal(once(**inputs).logits, model(**inputs).logits)


def test_blocks_that_differ_in_an_attribute_are_no_stack():
    model, _ = _llama(4, torch.float32)
    model.model.layers[2].self_attn.scaling = 0.5  # one block computes otherwise
    assert find_stacks(model) == []
    model, _ = _llama(4, torch.float32)
    assert [s.path for s in find_stacks(model)] == ["model.layers"]


class _Block(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.layer_idx = index  # an index is the one attribute identical blocks may differ in

    def forward(self, x):
        y = x + torch.relu(self.fc(x))
        if self.layer_idx >= 3:  # a branch on the index past the two traced blocks: no copy can show it
            y = y * 2
        return y


class _Indexed(nn.Module):
    def __init__(self, depth: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(i) for i in range(depth))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Between(_Indexed):
    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)  # the owner computes between blocks: each block's output is read outside it
        return self.head(x)


def test_a_block_that_branches_on_its_index_is_caught_by_the_check_and_captured_whole(monkeypatch):
    torch.manual_seed(0)
    model, x = _Indexed(), torch.randn(3, 16)
    with example_shapes(), shared_tensors(), repeated_once():
        copied = export_capture(model, (x,))
    assert graph_record(copied).repeated  # the copy is wrong on blocks 3 and 4 ...
    assert not torch.allclose(copied(x), model(x))
    calls = []
    real = thinning._thin_rest
    monkeypatch.setattr(thinning, "_thin_rest", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = fxcondensa.thin(model, StructurePrune(0.5), x, capture="export")
    assert len(calls) == 2  # ... so thin's check of the user's class failed, and thin captured it whole
    assert type(small) is _Indexed and thin_record(small).returns == "module"
    compressed = fxcondensa.compress(model, StructurePrune(0.5), x, capture="export")
    with torch.no_grad():
        fresh = torch.randn(5, 16)
        torch.testing.assert_close(small(fresh), compressed(fresh), rtol=1e-4, atol=1e-5)


def test_an_owner_that_computes_between_blocks_is_captured_whole():
    torch.manual_seed(0)
    model, x = _Between(), torch.randn(3, 16)
    with example_shapes(), shared_tensors(), repeated_once():
        gm = export_capture(model, (x,))
    assert graph_record(gm).repeated == []
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thin_with_copied_blocks_equals_thin_with_a_whole_capture(dtype, monkeypatch):
    model, inputs = _llama(4, dtype)
    seen = []
    real = repeated.stitch
    monkeypatch.setattr(repeated, "stitch", lambda *a: seen.append(a[1].path) or real(*a))
    import fxcondensa.capture.exported as exported

    monkeypatch.setattr(exported, "stitch", repeated.stitch)
    once = fxcondensa.thin(model, StructurePrune(0.5), inputs)
    assert seen == ["model.layers"]
    token = thinning._WHOLE.set(True)
    try:
        whole = fxcondensa.thin(model, StructurePrune(0.5), inputs)
    finally:
        thinning._WHOLE.reset(token)
    assert seen == ["model.layers"]
    assert type(once) is type(whole) is type(model)
    assert once.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(once.state_dict().values(), whole.state_dict().values(), strict=True))
    # Unchecked or in-place thinning never copies blocks: nothing would catch a wrong copy.
    fxcondensa.thin(model, StructurePrune(0.5), inputs, check=False)
    assert seen == ["model.layers"]


class _LiteralBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).reshape(-1, 32)  # a literal width: the class cannot follow a thinned fc1
        return x + self.fc2(h)


class _Literal(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_LiteralBlock() for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_class_that_cannot_follow_returns_the_whole_graph_checked_without_a_second_pass(monkeypatch):
    torch.manual_seed(0)
    model, x = _Literal(), torch.randn(3, 16)
    calls = []
    real = thinning._thin_rest
    monkeypatch.setattr(thinning, "_thin_rest", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = fxcondensa.thin(model, StructurePrune(0.5), x, capture="export")
    assert len(calls) == 1
    assert isinstance(small, torch.fx.GraphModule) and "32" in thin_record(small).reason
    assert graph_record(small).repeated == []  # the graph that comes back is a whole capture
    assert small.get_parameter("blocks.3.fc1.weight").shape[0] < 32
    compressed = fxcondensa.compress(model, StructurePrune(0.5), x, capture="export")
    with torch.no_grad():
        fresh = torch.randn(5, 16)
        torch.testing.assert_close(small(fresh), compressed(fresh), rtol=1e-4, atol=1e-5)

"""compress: a compressed copy whose state dict drops into the original architecture."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _models import LeNet5, lenet_input, make_convnet, state_hash

from fxcondensa.compression.apply import compress, density, layer_densities
from fxcondensa.passes.annotate import annotations
from fxcondensa.schemes import Compose, Prune, Quantize

TUTORIAL_MEM = textwrap.dedent("""
    import fxcondensa as condensa
    from fxcondensa.schemes import Compose, Prune, Quantize

    MEM = Compose([Prune(0.007), Quantize(condensa.float16)])
""")


def _lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5()


def test_input_model_unchanged():
    model = _lenet()
    before = state_hash(model)
    compress(model, Compose([Prune(0.01), Quantize(torch.float16)]))
    assert state_hash(model) == before
    assert density(model) == 1.0


def test_input_model_with_batchnorm_unchanged():
    model = make_convnet(3, 8, 3).train()
    before = state_hash(model)
    w = compress(model, Prune(0.3), torch.randn(2, 3, 6, 6))
    assert state_hash(model) == before
    assert model.training
    assert torch.equal(w.bn.running_mean, model.bn.running_mean)


def test_state_dict_keys_equal_and_load_into_original_architecture():
    model = _lenet()
    w = compress(model, Compose([Prune(0.02), Quantize(torch.float16)]), lenet_input())
    assert list(w.state_dict()) == list(model.state_dict())
    fresh = LeNet5()
    fresh.load_state_dict(w.state_dict())  # strict: same keys and shapes
    x = lenet_input(4)
    torch.testing.assert_close(fresh(x), w(x), rtol=0, atol=0)
    assert layer_densities(fresh) == layer_densities(w)


def test_result_is_a_graph_module_with_annotations():
    w = compress(_lenet(), Compose([Prune(0.1), Quantize(torch.bfloat16)]), output="graph")
    anns = annotations(w)
    assert set(anns) >= {"conv1.weight", "ip1.weight", "ip1.bias"}
    assert anns["ip1.weight"].mask is not None and anns["ip1.weight"].dtype == torch.bfloat16
    assert anns["ip1.bias"].mask is None
    assert torch.equal(w.ip1.weight != 0, anns["ip1.weight"].mask)


def test_tutorial_mem_lines_run_unchanged():
    namespace: dict = {}
    exec(TUTORIAL_MEM, namespace)
    model = _lenet()
    w = namespace["condensa"].compress(model, namespace["MEM"])
    assert density(w) == pytest.approx(0.007, abs=1e-5)
    assert all(torch.equal(p.half().float(), p) for p in w.parameters())
    assert namespace["condensa"].float16 is torch.float16


def test_compressing_twice_is_stable():
    w = compress(_lenet(), Compose([Prune(0.05), Quantize(torch.float16)]))
    assert state_hash(compress(w, Compose([Prune(1.0), Quantize(torch.float16)]))) == state_hash(w)


def test_not_a_scheme():
    with pytest.raises(TypeError) as info:
        compress(_lenet(), "MEM")
    assert "'MEM'" in str(info.value) and "pi(module)" in str(info.value)


def test_density_helpers():
    model = _lenet()
    assert density(model) == 1.0
    assert set(layer_densities(model)) == {"conv1.weight", "conv2.weight", "ip1.weight", "ip2.weight"}
    with torch.no_grad():
        model.ip2.weight.zero_()
    assert layer_densities(model)["ip2.weight"] == 0.0
    assert density(model) == pytest.approx(1 - 5000 / 430500)
    assert density(torch.nn.ReLU()) == 1.0  # nothing to prune: dense by convention

"""trace: shape metadata, the user's model untouched, and errors that say where and what to do."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from _models import ConvBN, LeNet5, lenet_input, make_convnet, state_hash
from torch import nn

from fxcondensa.capture.graph import as_input_tuple, trace
from fxcondensa.errors import ExampleInputError, TraceError


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}


def test_lenet_shapes_on_every_tensor_node():
    gm = trace(LeNet5(), lenet_input(3))
    shapes = _shapes(gm)
    assert shapes["x"] == (3, 1, 28, 28)
    assert shapes["conv1"] == (3, 20, 24, 24)
    assert shapes["pool1"] == (3, 20, 12, 12)
    assert shapes["conv2"] == (3, 50, 8, 8)
    assert shapes["pool2"] == (3, 50, 4, 4)
    assert shapes["view"] == (3, 800)
    assert shapes["ip1"] == (3, 500)
    assert shapes["ip2"] == (3, 10)
    assert gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape == (3, 10)
    assert all(n.meta["tensor_meta"].dtype == torch.float32 for n in gm.graph.nodes if "tensor_meta" in n.meta)


def test_without_example_inputs_no_shapes_but_same_outputs():
    model = LeNet5().eval()
    gm = trace(model)
    assert _shapes(gm) == {}
    x = lenet_input()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_state_dict_keys_and_class_name_kept():
    model = make_convnet(3, 4, 3)
    gm = trace(model, torch.randn(1, 3, 6, 6))
    assert list(gm.state_dict()) == list(model.state_dict())
    assert type(gm).__name__ == "ConvBN"


def test_model_unchanged_by_trace_including_batchnorm_stats_and_mode():
    model = make_convnet(3, 8, 3).train()  # training mode: a careless shape pass would move BN stats
    before = state_hash(model)
    gm = trace(model, torch.randn(4, 3, 6, 6))
    assert state_hash(model) == before
    assert model.training and all(m.training for m in model.modules())
    assert gm.training  # the copy keeps the mode too
    gm.conv.weight.data.zero_()  # and the copy shares no storage with the model
    assert state_hash(model) == before


def test_shape_pass_leaves_batchnorm_stats_of_the_copy():
    model = make_convnet(3, 8, 3).train()
    gm = trace(model, torch.randn(4, 3, 6, 6))
    assert state_hash(gm) == state_hash(model)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.branchy = _Branchy()

    def forward(self, x):
        return self.branchy(self.lin(x))


def test_trace_error_names_module_line_and_fixes():
    model = _Outer()
    before = state_hash(model)
    with pytest.raises(TraceError) as info:
        trace(model, torch.randn(2, 4))
    msg = str(info.value)
    assert "'branchy'" in msg
    assert "test_graph.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg
    assert "_Outer" in msg
    assert state_hash(model) == before


def test_leaf_modules_fix_the_trace_error():
    model = _Outer().eval()
    gm = trace(model, torch.randn(2, 4), leaf_modules=[_Branchy])
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x))
    assert any(n.op == "call_module" and n.target == "branchy" for n in gm.graph.nodes)


def test_wrong_shape_example_input_names_node():
    with pytest.raises(ExampleInputError) as info:
        trace(LeNet5(), torch.randn(2, 3, 28, 28))  # 3 channels, conv1 expects 1
    msg = str(info.value)
    assert "node 'conv1'" in msg
    assert "(2, 3, 28, 28)" in msg
    assert isinstance(info.value, ValueError)


def test_wrong_spatial_size_names_the_linear_node():
    with pytest.raises(ExampleInputError, match="node 'ip1'"):
        trace(LeNet5(), torch.randn(2, 1, 32, 32))  # flatten gives 1250 features, ip1 wants 800


def test_bad_arguments():
    with pytest.raises(TypeError, match="Module"):
        trace("not a model")
    with pytest.raises(TypeError, match="example_inputs"):
        as_input_tuple([])
    assert as_input_tuple(torch.zeros(1))[0].shape == (1,)


def test_tracing_a_graph_module_again_keeps_it_working():
    model = ConvBN().eval()
    gm = trace(trace(model), torch.randn(1, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x))
    assert _shapes(gm)["head"] == (1, 5)

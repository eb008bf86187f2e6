"""fxcondensa.models: LeNet5 is the tutorial's network, layer for layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxcondensa.models import LeNet5


@pytest.mark.parametrize("batch", [1, 7])
def test_output_shape(batch):
    assert LeNet5()(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_parameter_count_matches_the_tutorial():
    # conv1 20*1*5*5+20, conv2 50*20*5*5+50, ip1 800*500+500, ip2 500*10+10
    assert sum(p.numel() for p in LeNet5().parameters()) == 431080


def test_layers_names_and_order():
    layers = [(name, type(m)) for name, m in LeNet5().named_children()]
    assert layers == [
        ("conv1", nn.Conv2d),
        ("relu_conv1", nn.ReLU),
        ("pool1", nn.MaxPool2d),
        ("conv2", nn.Conv2d),
        ("relu_conv2", nn.ReLU),
        ("pool2", nn.MaxPool2d),
        ("ip1", nn.Linear),
        ("relu_ip1", nn.ReLU),
        ("ip2", nn.Linear),
    ]
    model = LeNet5()
    assert model.relu_conv1.inplace and model.relu_conv2.inplace and model.relu_ip1.inplace
    assert (model.conv1.out_channels, model.conv1.kernel_size) == (20, (5, 5))
    assert (model.conv2.out_channels, model.conv2.kernel_size) == (50, (5, 5))
    assert (model.ip1.in_features, model.ip1.out_features) == (800, 500)
    assert (model.ip2.in_features, model.ip2.out_features) == (500, 10)


def test_forward_equals_the_functional_reference():
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    F = nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias)), 2, 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, model.conv2.weight, model.conv2.bias)), 2, 2)
    h = F.relu(F.linear(h.flatten(1), model.ip1.weight, model.ip1.bias))
    ref = F.linear(h, model.ip2.weight, model.ip2.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_traces_with_torch_fx_and_keeps_the_view():
    gm = torch.fx.symbolic_trace(LeNet5())
    assert any(n.op == "call_method" and n.target == "view" for n in gm.graph.nodes)
    x = torch.randn(2, 1, 28, 28)
    model = LeNet5()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_rejects_other_image_sizes():
    with pytest.raises(RuntimeError):
        LeNet5()(torch.randn(1, 1, 32, 32))


def test_resnet20_shapes_parameters_and_stages():
    from fxcondensa.models import ResNet20

    model = ResNet20().eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 272186
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    feats = model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 1, 28, 28)))))))
    assert feats.shape == (1, 64, 7, 7)


def test_resnet20_thins_to_half_its_macs_exactly():
    import fxcondensa
    from fxcondensa.models import ResNet20
    from fxcondensa.schemes import StructurePrune

    torch.manual_seed(0)
    model = ResNet20().eval()
    x = torch.randn(4, 1, 28, 28)
    scheme = StructurePrune(target_flops=0.5)
    small = fxcondensa.thin(model, scheme, x)
    dense = fxcondensa.compress(model, scheme, x).eval()
    y = torch.randn(2, 1, 28, 28)  # other inputs than the ones thin checked
    torch.testing.assert_close(small(y), dense(y), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())

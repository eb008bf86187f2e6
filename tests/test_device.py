"""Device handling of the passes that touch weights, tested without a GPU.

Fake CUDA tensors (``FakeTensorMode(allow_non_fake_inputs=True)``) carry a CUDA device and raise
``FakeTensorDeviceMismatchError`` on any CPU/CUDA mix, exactly where a real GPU would raise, so the channel
scores, the zero rules, the masks and the tensor slicing of ``thin`` are checked here on a CPU-only machine.
Channel bookkeeping (atoms, zero flags, keep vectors) stays on the CPU by design; only the small per-channel
results cross over.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fxcondensa
from fxcondensa.capture.records import ParamAnnotation
from fxcondensa.passes.analysis import analyze, zero_channels
from fxcondensa.passes.annotate import annotate_param, annotations, apply_annotations
from fxcondensa.schemes import StructurePrune, channel_scores

CUDA = torch.device("cuda", 0)


def fake_cuda(gm: fx.GraphModule, mode: FakeTensorMode) -> fx.GraphModule:
    """Move every parameter and buffer of ``gm`` to a fake CUDA device, in place."""
    with mode:
        for module in gm.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(mode.from_tensor(p.detach()).to(CUDA), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = mode.from_tensor(b).to(CUDA)
    return gm


@pytest.fixture
def mode():
    return FakeTensorMode(allow_non_fake_inputs=True)


def traced(name: str, size: int = 32) -> fx.GraphModule:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    return fxcondensa.trace(model, torch.randn(1, 3, size, size))


def test_fake_cuda_tensors_catch_a_device_mix(mode):
    # The premise of this file: a CPU accumulator fed a CUDA value raises, as on a GPU.
    gm = fake_cuda(traced("resnet18"), mode)
    w = gm.get_parameter("conv1.weight")
    assert isinstance(w, FakeTensor) and w.device == CUDA
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(64).scatter_reduce_(0, torch.arange(64), w.reshape(64, -1).sum(1), reduce="sum")


@pytest.mark.parametrize("criteria", ["l2norm", "max", "sum"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_channel_scores_on_cuda_weights(mode, name, criteria):
    gm = traced(name)
    analysis = analyze(gm)
    fake_cuda(gm, mode)
    score = channel_scores(gm, analysis, criteria, normalize=True)
    assert score.device.type == "cpu" and score.shape == (analysis.num_channels,)


def test_zero_rules_on_cuda_weights_return_cpu_flags(mode):
    # resnet18: conv + BatchNorm (affine, running stats) + residual adds; mobilenet_v2: depthwise + ReLU6 (clamp).
    for name in ("resnet18", "mobilenet_v2"):
        gm = traced(name)
        analysis = analyze(gm)
        fake_cuda(gm, mode)
        zeros = zero_channels(gm, analysis)
        flags = [t for v in zeros.values() for t in (v if isinstance(v, list) else [v])]
        assert flags and all(t.device.type == "cpu" and t.dtype == torch.bool for t in flags), name


def test_zero_rules_of_parameter_operands_and_norms_without_affine(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm2d(6, affine=False)
            self.gn = nn.GroupNorm(3, 6)
            self.scale = nn.Parameter(torch.rand(1, 6, 1, 1))
            self.out = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.gn(self.bn(self.conv(x)) * self.scale + 0.0)
            return self.out(torch.cat([y, y], 0))

    gm = fxcondensa.trace(Net(), torch.randn(1, 3, 8, 8))
    analysis = analyze(gm)
    fake_cuda(gm, mode)
    assert all(v.device.type == "cpu" for v in zero_channels(gm, analysis).values())


def test_structured_masks_live_with_their_cuda_parameter(mode):
    gm = traced("resnet18")
    analysis = analyze(gm)
    fake_cuda(gm, mode)
    keep = torch.rand(analysis.num_channels) > 0.5
    StructurePrune(0.5)._annotate_masks(gm, analysis, keep)
    masks = {n: a.mask for n, a in annotations(gm).items() if a.mask is not None}
    assert masks and all(m.device == CUDA for m in masks.values())
    apply_annotations(gm)  # mul_ of a CUDA weight by its mask: no device mix


def test_composing_masks_made_on_different_devices(mode):
    with mode:  # moving a real CPU tensor to CUDA needs the mode active (outside it, a real CUDA init)
        cuda_mask = torch.ones(4, 3, dtype=torch.bool, device=CUDA)
        merged = ParamAnnotation(mask=cuda_mask).merged(torch.zeros(4, 3, dtype=torch.bool), None)
    assert merged.mask.device == CUDA
    merged = ParamAnnotation(mask=torch.ones(4, 3, dtype=torch.bool)).merged(cuda_mask, torch.float16)
    assert merged.mask.device.type == "cpu" and merged.dtype is torch.float16


def test_annotate_param_accepts_a_cpu_mask_for_a_cuda_weight(mode):
    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    fake_cuda(gm, mode)
    annotate_param(gm, "conv1.weight", mask=torch.ones(20, 1, 5, 5, dtype=torch.bool))
    annotate_param(gm, "conv1.weight", mask=torch.ones(20, 1, 5, 5, dtype=torch.bool))  # merged, CPU with CPU
    with mode:  # the CPU mask moves to the weight's device (a real CUDA call outside the mode)
        apply_annotations(gm)


def test_thin_slices_cuda_weights_with_cpu_indices(mode):
    # mobilenet_v2's depthwise convs take the grouped-conv slicing path; resnet18 the plain one.
    from fxcondensa.passes.slicing import _apply_slices, _slice_plan

    for name in ("mobilenet_v2", "resnet18"):
        gm = traced(name)
        analysis = analyze(gm)
        fake_cuda(gm, mode)
        keep = fxcondensa.passes.analysis.balance_grouped(analysis, torch.rand(analysis.num_channels) > 0.3)
        plan = _slice_plan(analysis, keep)  # CPU indices, decided from the analysis
        with mode:  # indices move to the weights' device (a real CUDA call outside the mode)
            _apply_slices(gm, plan)
        assert all(p.device == CUDA for p in gm.parameters()), name


def test_thin_without_example_inputs_makes_them_where_the_model_lives(monkeypatch):
    from fxcondensa.compression import thinning as thin_pass

    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(2, 1, 28, 28))
    meta_model = gm.to("meta")  # a device other than the CPU that needs no GPU
    inputs = thin_pass._example_inputs(meta_model, None)
    assert inputs[0].device.type == "meta" and inputs[0].shape == (2, 1, 28, 28)

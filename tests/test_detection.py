"""Models whose end cannot be captured (a detector's data-dependent post-processing) thin part by part:
``thin(..., modules=[...])`` or ``modules="auto"`` thins the parts that capture, keeps the rest as the
user's code and checks the whole model's outputs against the model with the same parts compressed."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from _models import state_hash
from torch import nn

from fxcondensa import thin, trace
from fxcondensa.capture.records import thin_record
from fxcondensa.errors import ThinningCheckError, TraceError
from fxcondensa.schemes import StructurePrune

SCHEME = StructurePrune(0.5)


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _bench_detection():
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "detection.py"
    spec = importlib.util.spec_from_file_location("bench_detection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Detector(nn.Module):
    """A backbone and a head that capture, and a data-dependent end (boxes above a threshold) that does not."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 24, 3, padding=1), nn.ReLU())
        self.head = nn.ModuleDict({"cls": nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 3, 1)),
                                   "box": nn.Conv2d(24, 4, 1)})

    def forward(self, images):
        f = self.backbone(images)
        scores, boxes = self.head["cls"](f).flatten(2).amax(1), self.head["box"](f).flatten(2)
        keep = scores[0] > scores[0].median()
        if keep.sum() > 10:  # data-dependent: neither torch.fx nor torch.export can follow it
            keep[10:] = False
        return {"scores": scores[0][keep], "boxes": boxes[0][:, keep].T}


def _detector():
    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():
        model.backbone[1].running_var.uniform_(0.5, 1.5)
        model.backbone[1].running_mean.normal_()
    return model, torch.randn(1, 3, 8, 8)


def test_a_capture_error_names_the_users_line():
    model, x = _detector()
    with pytest.raises(TraceError) as info:
        trace(model, x)
    message = str(info.value)
    assert "<root>" not in message and "<string>" not in message
    assert "test_detection.py" in message and "Detector.forward" in message


@pytest.mark.parametrize("modules", [["backbone", "head.cls", "head.box"], "auto"])
def test_the_parts_that_capture_are_thinned_and_the_whole_checked(modules):
    model, x = _detector()
    before = state_hash(model)
    small = thin(model, SCHEME, x, modules=modules)
    assert state_hash(model) == before, "the input model was modified"
    assert type(small) is Detector and params(small) < params(model)
    assert isinstance(small.backbone, torch.fx.GraphModule) and thin_record(small.backbone).groups
    assert small.backbone.get_submodule("3").out_channels == 24  # a part's outputs keep every channel
    compressed = Detector().eval()
    compressed.load_state_dict(model.state_dict())
    for name in ("backbone", "head.cls", "head.box"):
        part = trace(model.get_submodule(name), x if name == "backbone" else torch.randn(1, 24, 8, 8))
        with torch.no_grad():
            SCHEME.pi(part)
            SCHEME.delta(part)
        compressed.set_submodule(name, part)
    fresh = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, ref = small(fresh), compressed(fresh)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bad_module_names_are_refused_with_the_name():
    model, x = _detector()
    with pytest.raises(ValueError, match=r"modules names 'neck', which is not a submodule of Detector"):
        thin(model, SCHEME, x, modules=["neck"])
    with pytest.raises(ValueError, match=r"modules names both 'head' and 'head.cls', which is inside it"):
        thin(model, SCHEME, x, modules=["head", "head.cls"])
    with pytest.raises(TypeError, match=r"modules must be a non-empty list of submodule names .* got 'backbone'"):
        thin(model, SCHEME, x, modules="backbone")


def test_a_part_that_is_never_called_is_refused():
    model, x = _detector()
    model.spare = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"modules \['spare'\] were not called when Detector ran"):
        thin(model, SCHEME, x, modules=["backbone", "spare"])


def test_a_torchvision_detector_thins_its_parts_and_keeps_its_detections():
    bench = _bench_detection()
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    model, images = bench.build(name)
    small = thin(model, SCHEME, (images,), modules=bench.MODELS[name][1])
    assert params(model) / params(small) >= 1.5  # thin checked the whole model's detections (it raises if not)
    assert type(small) is type(model) and isinstance(small.roi_heads.box_head, torch.fx.GraphModule)


class ReadsWidth(Detector):
    """Code between the parts reads a width inside a part: the whole-model check catches it."""

    def forward(self, images):
        out = super().forward(images)
        return {k: v * self.backbone.get_submodule("0").out_channels for k, v in out.items()}


def test_the_whole_model_check_catches_code_that_reads_a_thinned_width():
    torch.manual_seed(0)
    model = ReadsWidth().eval()
    with pytest.raises(ThinningCheckError, match=r"with the parts \['backbone'\] thinned, ReadsWidth's outputs differ"):
        thin(model, SCHEME, torch.randn(1, 3, 8, 8), modules=["backbone"])


def test_auto_thins_the_whole_model_when_it_captures():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    small = thin(model, SCHEME, torch.randn(1, 3, 8, 8), modules="auto")  # the ordinary thin: its own class
    assert isinstance(small, nn.Sequential) and small.get_submodule("0").out_channels == 4

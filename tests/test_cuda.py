"""The GPU path, on a real CUDA device: thin / compress, save / load across devices, export, latency.

Every test is marked ``cuda``: tests/conftest.py skips them where ``torch.cuda.is_available()`` is False (no
CI machine has a GPU); ``bench/gpu.sh`` runs ``pytest -m cuda -x`` first on a GPU machine. L-C on CUDA is
in tests/test_opt_device.py. TF32 is left at PyTorch's defaults: the library must cope with whatever the
user has set, so a test turns it on where it matters.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxcondensa
from fxcondensa.files import export
from fxcondensa.files.recipe import thinning_record
from fxcondensa.models import LeNet5
from fxcondensa.schemes import Prune, StructurePrune

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v2": torchvision.models.mobilenet_v2}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so that buffers matter
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True)
def _tf32_on():
    """TF32 on, as many GPU users have it: the checks must not be fooled by it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", list(MODELS))
def test_thin_and_compress_on_cuda_match_the_cpu(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    on_gpu = _model(name).to(CUDA)
    small = fxcondensa.thin(on_gpu, StructurePrune(0.5), x.to(CUDA))
    dense = fxcondensa.compress(on_gpu, StructurePrune(0.5), x.to(CUDA))
    assert all(t.device.type == "cuda" for t in [*small.parameters(), *small.buffers()])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    cpu_small = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert [tuple(p.shape) for p in small.parameters()] == [tuple(p.shape) for p in cpu_small.parameters()]
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.testing.assert_close(small(x.to(CUDA)), dense(x.to(CUDA)), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(small(x.to(CUDA)).cpu(), cpu_small(x), rtol=1e-3, atol=1e-4)


def test_thin_without_example_inputs_on_cuda():
    small = fxcondensa.thin(LeNet5().to(CUDA), StructurePrune(0.5))
    assert small(torch.randn(1, 1, 28, 28, device=CUDA)).device.type == "cuda"


@pytest.mark.parametrize("saved_on,loaded_on", [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")])
def test_save_and_load_thinned_across_devices(tmp_path, saved_on, loaded_on):
    x = torch.randn(1, 3, 64, 64)
    small = fxcondensa.thin(_model("resnet18").to(saved_on), StructurePrune(0.5), x.to(saved_on))
    path = tmp_path / "r18.thin"
    fxcondensa.save_thinned(small, path)
    loaded = fxcondensa.load_thinned(path, _model("resnet18").to(loaded_on))
    assert next(loaded.parameters()).device.type == loaded_on
    assert torch.equal(thinning_record(loaded).keep, thinning_record(small).keep.cpu())
    for (n, a), (_, b) in zip(small.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b.cpu()), n


def test_save_and_load_compressed_across_devices(tmp_path):
    w = fxcondensa.compress(LeNet5().to(CUDA), Prune(0.1))
    fxcondensa.save_compressed(w, tmp_path / "w.fxc")
    assert fxcondensa.footprint(w, "stored") == (tmp_path / "w.fxc").stat().st_size
    back = fxcondensa.load_compressed(tmp_path / "w.fxc", LeNet5)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(w.state_dict().values(), back.state_dict().values(),
                                                         strict=True))


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_export_of_a_cuda_model(tmp_path, suffix):
    small = fxcondensa.thin(_model("resnet18").to(CUDA), StructurePrune(0.5), torch.randn(2, 3, 64, 64, device=CUDA))
    path = export.export(small, tmp_path / f"r18{suffix}", torch.randn(2, 3, 64, 64, device=CUDA))
    assert path.is_file()


def test_measure_latency_on_cuda():
    lat = fxcondensa.measure_latency(LeNet5().to(CUDA), torch.randn(8, 1, 28, 28, device=CUDA), warmup=2, repeat=5)
    assert lat.device == "cuda:0" and lat.repeat == 5 and lat.min_ms > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_measure_latency_on_a_second_device():
    lat = fxcondensa.measure_latency(LeNet5().to("cuda:1"), torch.randn(8, 1, 28, 28, device="cuda:1"), repeat=5)
    assert lat.device == "cuda:1" and lat.min_ms > 0

"""Every export format reloads to the model's outputs; existing files are refused; failures leave no file."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import fxcondensa
from fxcondensa import export
from fxcondensa.export import ExportCheckError
from fxcondensa.models import LeNet5
from fxcondensa.schemes import Prune

X = torch.randn(2, 1, 28, 28)


def load_and_run(path, x):
    suffix = os.path.splitext(path)[1]
    if suffix == ".pt":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(x)
    if suffix == ".pt2":
        return torch.export.load(str(path)).module()(x)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


FORMATS = [".pt", ".pt2", ".onnx"]


def _needs(suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")


@pytest.mark.parametrize("suffix", FORMATS)
def test_reloaded_file_matches_the_model(tmp_path, suffix):
    _needs(suffix)
    model = fxcondensa.compress(LeNet5(), Prune(0.2))  # a compressed GraphModule, as the CLI exports
    path = export.export(model, tmp_path / f"m{suffix}", X)
    assert path == tmp_path / f"m{suffix}" and path.is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_and_run(path, X), model.eval()(X), rtol=1e-4, atol=1e-5)
    assert os.listdir(tmp_path) == [f"m{suffix}"]  # no temporary or external-data file left over
    assert os.stat(path).st_mode & 0o444 == 0o444 & ~_umask()  # a normal file mode, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("fn", [export.torchscript, export.torch_export])
def test_named_functions_write_their_format(tmp_path, fn):
    path = fn(LeNet5(), tmp_path / "lenet", X)  # the format comes from the function, not the suffix
    assert path.is_file()


@pytest.mark.parametrize("suffix", FORMATS)
def test_existing_file_refused_unless_overwrite(tmp_path, suffix):
    _needs(suffix)
    path = tmp_path / f"m{suffix}"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"overwrite=True") as info:
        export.export(LeNet5(), path, X)
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"keep me"
    export.export(LeNet5(), path, X, overwrite=True)
    assert path.read_bytes() != b"keep me"


class Noisy(nn.Module):
    """Different outputs on every call: no exported file can match it."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("suffix", FORMATS)
def test_failed_check_leaves_no_file(tmp_path, suffix):
    _needs(suffix)
    with pytest.raises(ExportCheckError, match="differs from the model's.*not written"):
        export.export(Noisy(), tmp_path / f"n{suffix}", torch.zeros(2, 3))
    assert os.listdir(tmp_path) == []


def test_failed_check_keeps_the_old_file(tmp_path):
    path = tmp_path / "n.pt2"
    path.write_bytes(b"old")
    with pytest.raises(ExportCheckError):
        export.torch_export(Noisy(), path, torch.zeros(2, 3), overwrite=True)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["n.pt2"]


def test_failed_write_leaves_no_file(tmp_path):
    class NotTraceable(nn.Module):
        def forward(self, x):
            return {"a": x, "n": 3}  # torch.jit.trace refuses non-tensor outputs

    with pytest.raises(Exception):  # noqa: B017 - whatever the tracer raises, nothing may be written
        export.torchscript(NotTraceable(), tmp_path / "x.pt", X)
    assert os.listdir(tmp_path) == []


def test_torchscript_warnings_stay_inside(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.torchscript(LeNet5(), tmp_path / "m.pt", X)
        warnings.warn("still on", FutureWarning, stacklevel=1)  # the caller's filters are untouched
    assert [str(w.message) for w in caught] == ["still on"]


def test_model_not_changed_and_training_mode_kept(tmp_path):
    model = LeNet5().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export.torch_export(model, tmp_path / "m.pt2", X)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_suffix_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export.export(LeNet5(), tmp_path / "m.bin", X)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.torchscript(LeNet5(), tmp_path / "nope" / "m.pt", X)

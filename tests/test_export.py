"""Every export format reloads to the model's outputs; existing files are refused; failures leave no file."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import fxcondensa
from fxcondensa.files import export
from fxcondensa.files.export import ExportCheckError
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
    import onnxruntime as ort  # the onnx extra is part of `make test`'s set-up: no skip when it is missing

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


FORMATS = [".pt", ".pt2", ".onnx"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_reloaded_file_matches_the_model(tmp_path, suffix):
    model = fxcondensa.compress(LeNet5(), Prune(0.2), output="graph")  # a compressed GraphModule, as the CLI exports
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


# -- dynamic shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("batch", [1, 3])
def test_files_take_other_batch_sizes_by_default(tmp_path, suffix, batch):
    """An example of batch 1 (which torch.export would specialise) or 3; the file runs at 1, 2 and 5."""
    model = fxcondensa.compress(LeNet5(), Prune(0.2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", export.StaticShapeWarning)
        path = export.export(model, tmp_path / f"m{suffix}", torch.randn(batch, 1, 28, 28))
    for n in (1, 2, 5):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(load_and_run(path, x), model(x), rtol=1e-4, atol=1e-5)


class Tokens(nn.Module):
    """Token ids in, one vector per sequence out: batch and sequence length both vary in deployment."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


@pytest.mark.parametrize("fn", [export.torch_export, export.onnx])
def test_token_inputs_take_other_sequence_lengths(tmp_path, fn):
    model = Tokens().eval()
    path = fn(model, tmp_path / "t", torch.randint(0, 50, (1, 6)))
    if fn is export.torch_export:
        run = torch.export.load(str(path)).module()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(ids):
            return torch.from_numpy(session.run(None, {name: ids.numpy()})[0])
    for shape in ((1, 6), (4, 3), (2, 11)):
        ids = torch.randint(0, 50, shape)
        with torch.no_grad():
            torch.testing.assert_close(run(ids), model(ids), rtol=1e-4, atol=1e-5)


class FixedBatch(nn.Module):
    """Code that fixes the batch size: no file of it can take another batch."""

    def forward(self, x):
        return x.reshape(2, 12).sum(1)  # x is 2x3x4: fails at any other batch size


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_model_that_fixes_its_batch_falls_back_to_static_shapes_with_a_warning(tmp_path, suffix):
    x = torch.randn(2, 3, 4)
    with pytest.warns(export.StaticShapeWarning, match=r"FixedBatch could not be exported with a dynamic batch "
                                                        r"size \(.+\); the file is fixed to .*2x3x4.*dynamic=False") as rec:
        path = export.export(FixedBatch(), tmp_path / f"f{suffix}", x)
    assert rec[0].filename == __file__  # attributed to the caller's line
    torch.testing.assert_close(load_and_run(path, x), FixedBatch()(x))


@pytest.mark.parametrize("suffix", FORMATS)
def test_dynamic_false_keeps_static_shapes_silently(tmp_path, suffix):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no StaticShapeWarning either
        path = export.export(FixedBatch(), tmp_path / f"f{suffix}", torch.randn(2, 3, 4), dynamic=False)
    assert path.is_file()
    if suffix == ".pt2":  # the program is specialised: another batch size is refused
        with pytest.raises(Exception, match="2"):  # noqa: B017 - torch.export's guard error
            torch.export.load(str(path)).module()(torch.randn(3, 3, 4))


def test_dynamic_spec_marks_the_batch_and_the_sequence_of_token_inputs():
    spec = export.dynamic_spec((torch.zeros(2, 3), torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7),
                                torch.tensor(1.0)))
    assert [sorted(s) if s else None for s in spec] == [[0], [0, 1], [0], None]
    assert spec[0][0] is spec[1][0]  # one batch dimension shared by every input

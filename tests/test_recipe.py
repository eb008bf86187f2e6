"""save_thinned / load_thinned: exact round trips, atomic writes, and refusal of every bad file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from _models import LeNet5, bench_coverage, state_hash

import fxcondensa
from fxcondensa.errors import FileFormatError
from fxcondensa.files.recipe import reference_tolerance, thinning_record
from fxcondensa.schemes import StructurePrune

CASES = {
    "lenet5": (LeNet5, (2, 1, 28, 28), 0.3),
    "resnet18": (torchvision.models.resnet18, (1, 3, 32, 32), 0.5),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, (1, 3, 32, 32), 0.5),
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CASES[name][0]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so that buffers matter
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def thinned(request, tmp_path_factory):
    """(name, dense model, its hash before thinning, thinned model, saved file)."""
    name = request.param
    model = _build(name)
    before = state_hash(model)
    small = fxcondensa.thin(model, StructurePrune(CASES[name][2]), torch.randn(CASES[name][1]), output="graph")
    path = tmp_path_factory.mktemp(name) / f"{name}.thin"
    fxcondensa.save_thinned(small, path)
    return name, model, before, small, path


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    small = fxcondensa.thin(_build("lenet5"), StructurePrune(0.3), torch.randn(2, 1, 28, 28), output="graph")
    path = tmp_path_factory.mktemp("lenet") / "lenet5.thin"
    fxcondensa.save_thinned(small, path)
    return small, path


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta = dict([*a.named_parameters(remove_duplicate=False), *a.named_buffers(remove_duplicate=False)])
    tb = dict([*b.named_parameters(remove_duplicate=False), *b.named_buffers(remove_duplicate=False)])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        assert type(ta[k]) is type(tb[k]), k  # parameters stay parameters, buffers buffers


def test_round_trip_is_exact(thinned):
    """One load per model (they are the slow part): exact state, code, outputs; the user's models untouched."""
    name, model, before, small, path = thinned
    arch = model if name != "lenet5" else CASES[name][0]  # a model, or a factory
    loaded = fxcondensa.load_thinned(path, arch)
    _same_state(small, loaded)
    x = torch.randn(CASES[name][1])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), small.eval()(x))
    for (n1, m1), (n2, m2) in zip(small.named_modules(), loaded.named_modules(), strict=True):
        assert n1 == n2 and type(m1).__name__ == type(m2).__name__
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features"):
            assert getattr(m1, attr, None) == getattr(m2, attr, None), (n1, attr)
    assert loaded.code == small.code  # rewritten view / reshape / split sizes included
    a, b = thinning_record(loaded), thinning_record(small)
    assert (a.frozen, a.groups, a.target, a.input_shapes, a.input_dtypes, a.rule_failures, a.capture) == \
        (b.frozen, b.groups, b.target, b.input_shapes, b.input_dtypes, b.rule_failures, b.capture)
    assert torch.equal(a.keep, b.keep)
    assert state_hash(model) == before, "the user's model changed"
    assert not ({t.data_ptr() for t in model.state_dict().values()}
                & {t.data_ptr() for t in loaded.state_dict().values() if t.numel()})


def test_a_loaded_model_saves_and_loads_again(lenet_file, tmp_path):
    small, path = lenet_file
    again = tmp_path / "again.thin"
    fxcondensa.save_thinned(fxcondensa.load_thinned(path, LeNet5), again)
    _same_state(small, fxcondensa.load_thinned(again, LeNet5()))


def test_training_flags_survive(tmp_path):
    model = _build("lenet5").train()
    small = fxcondensa.thin(model, StructurePrune(0.3), torch.randn(2, 1, 28, 28))
    assert small.training
    fxcondensa.save_thinned(small, tmp_path / "t.thin")
    loaded = fxcondensa.load_thinned(tmp_path / "t.thin", LeNet5().eval())
    assert [m.training for m in loaded.modules()] == [m.training for m in small.modules()]


def test_file_exists_and_overwrite(lenet_file, tmp_path):
    small, _ = lenet_file
    path = tmp_path / "x.thin"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fxcondensa.save_thinned(small, path)
    assert path.read_bytes() == b"keep me"
    assert fxcondensa.save_thinned(small, path, overwrite=True) == path.stat().st_size
    assert os.listdir(tmp_path) == ["x.thin"], "no temporary file is left behind"


def test_a_failed_write_leaves_nothing(lenet_file, tmp_path, monkeypatch):
    small, _ = lenet_file

    def broken(obj, f, *a, **k):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        fxcondensa.save_thinned(small, tmp_path / "y.thin")
    assert os.listdir(tmp_path) == []


def test_save_refuses_models_without_a_recipe(tmp_path):
    with pytest.raises(ValueError, match="no thinning recipe.*save_compressed"):
        fxcondensa.save_thinned(LeNet5(), tmp_path / "a.thin")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxcondensa.save_thinned("model", tmp_path / "a.thin")
    assert not (tmp_path / "a.thin").exists()


def test_bad_architecture_arguments(lenet_file):
    _, path = lenet_file
    with pytest.raises(TypeError, match="model_or_factory"):
        fxcondensa.load_thinned(path, 42)
    with pytest.raises(TypeError, match="factory returned a str"):
        fxcondensa.load_thinned(path, lambda: "LeNet5")
    with pytest.raises(FileNotFoundError):
        fxcondensa.load_thinned(path.parent / "missing.thin", LeNet5)


# -- refusals: each with FileFormatError naming the path ------------------------------------------------
def _refused(path, match: str, model=LeNet5) -> None:
    arch = model() if callable(model) else model
    before = state_hash(arch)
    with pytest.raises(FileFormatError, match=match) as info:
        fxcondensa.load_thinned(path, arch)
    assert str(path) in str(info.value)
    assert state_hash(arch) == before


def test_truncated_file(lenet_file, tmp_path):
    _, path = lenet_file
    data = path.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.thin"
        cut.write_bytes(data[:n])
        _refused(cut, "not a readable fxcondensa file")


def test_foreign_files(lenet_file, tmp_path):
    state = tmp_path / "state.pt"
    torch.save(LeNet5().state_dict(), state)
    _refused(state, "not an fxcondensa thinned-model file")
    text = tmp_path / "notes.txt"
    text.write_text("conv1: 20 filters\n")
    _refused(text, "not a readable fxcondensa file")
    compressed = tmp_path / "c.fxc"
    fxcondensa.save_compressed(LeNet5(), compressed)
    _refused(compressed, "not an fxcondensa thinned-model file")
    # and the other way round
    with pytest.raises(FileFormatError, match="not an fxcondensa compressed-model file"):
        fxcondensa.load_compressed(lenet_file[1], LeNet5())


class _Payload:
    """Unpickling this would write a marker file: the loaders must never do it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "inside a valid-looking payload"])
def test_crafted_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "PWNED"
    evil = _Payload()
    evil.marker = str(marker)
    path = tmp_path / "evil.thin"
    if how == "pickle":
        path.write_bytes(pickle.dumps(evil))
    elif how == "torch.save":
        torch.save(evil, path)
    else:
        torch.save({"magic": "fxcondensa-thinned", "version": 1, "keep": evil}, path)
    _refused(path, "not a readable fxcondensa file")
    with pytest.raises(FileFormatError):
        fxcondensa.load_compressed(path, LeNet5())
    assert not marker.exists()


def _tampered(lenet_file, tmp_path, change) -> str:
    _, path = lenet_file
    payload = torch.load(path, weights_only=True)
    change(payload)
    out = tmp_path / "tampered.thin"
    torch.save(payload, out)
    return out


def test_other_version(lenet_file, tmp_path):
    _refused(_tampered(lenet_file, tmp_path, lambda p: p.update(version=99)),
             r"format version 99; this fxcondensa reads versions 1, 2; .*newer fxcondensa: upgrade")
    _refused(_tampered(lenet_file, tmp_path, lambda p: p.update(version=0)),
             r"format version 0; this fxcondensa reads versions 1, 2; write it again with fxcondensa.save_thinned")


def _as_version_1(p) -> None:
    """The payload as fxcondensa wrote it before the typed records: the record as a dict under "meta"
    (groups, frozen, the FLOP target under "target_flops"), an always-None "scheme", no reference device."""
    record = p.pop("record")
    p.pop("reference_device")
    target = record.pop("target")
    p["meta"] = {"groups": record["groups"], "frozen": record["frozen"]}
    if target is not None:
        p["meta"]["target_flops"] = {k: target[k] for k in ("target", "reached", "density")}
    p.update(version=1, scheme=None)


def test_a_file_of_format_version_1_still_loads(tmp_path):
    """Files written before this change (format 1) load, with the same record; this one had a FLOP target."""
    model = _build("lenet5")
    small = fxcondensa.thin(model, StructurePrune(target_flops=0.5), torch.randn(2, 1, 28, 28), output="graph")
    path = tmp_path / "new.thin"
    fxcondensa.save_thinned(small, path)
    old = _tampered((small, path), tmp_path, _as_version_1)
    payload = torch.load(old, weights_only=True)
    assert payload["version"] == 1 and "record" not in payload and payload["scheme"] is None
    loaded = fxcondensa.load_thinned(old, LeNet5)
    _same_state(small, loaded)
    a, b = thinning_record(loaded), thinning_record(small)
    assert (a.groups, a.frozen, a.target) == (b.groups, b.frozen, b.target)
    assert a.target is not None and a.target.kind == "flops"
    again = tmp_path / "again.thin"  # and it is written back in the current format
    fxcondensa.save_thinned(loaded, again)
    assert torch.load(again, weights_only=True)["version"] == fxcondensa.files.recipe.FORMAT_VERSION == 2


def test_the_recipe_has_no_scheme_field(lenet_file):
    assert "scheme" not in torch.load(lenet_file[1], weights_only=True)


@pytest.mark.parametrize("record,match", [
    ({"groups": [{"group": "conv1"}], "frozen": []}, "thinning record is malformed: KeyError"),
    ({"groups": [], "frozen": [], "rule_failures": "many"}, "thinning record is malformed: TypeError"),
    ([], "'record' is missing or not a dict"),
])
def test_malformed_record(lenet_file, tmp_path, record, match):
    _refused(_tampered(lenet_file, tmp_path, lambda p: p.update(record=record)), match)


def test_reference_tolerance_is_looser_when_cuda_computed_a_side():
    assert reference_tolerance(torch.float32, {"cpu"}) == (1e-3, 1e-4)
    assert reference_tolerance(torch.float32, {"cuda"}) == reference_tolerance(torch.float32, {"cpu", "cuda"})
    assert reference_tolerance(torch.float32, {"cuda"}) > reference_tolerance(torch.float32, {"cpu"})
    assert reference_tolerance(torch.bfloat16, {"cpu"})[0] == 8 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("field,value,match", [
    ("keep", torch.zeros(3), "'keep' is not a 1-D bool tensor"),
    ("inputs", [{"shape": [-1], "dtype": "float32"}], "input shapes are malformed"),
    ("inputs", [{"shape": [1], "dtype": "object"}], "input shapes are malformed"),
    ("graph", "conv1", "graph signature is malformed"),
    ("tensors", [], "'tensors' is missing"),
])
def test_malformed_fields(lenet_file, tmp_path, field, value, match):
    _refused(_tampered(lenet_file, tmp_path, lambda p: p.update({field: value})), match)


def test_malformed_tensor(lenet_file, tmp_path):
    def change(p):
        p["tensors"]["conv1.weight"]["shape"] = [1, 2, 3]
    _refused(_tampered(lenet_file, tmp_path, change), "tensor 'conv1.weight' is malformed")


def test_recipe_of_another_architecture(thinned):
    name, _, _, _, path = thinned
    if name == "lenet5":
        _refused(path, "recipe does not fit ResNet", torchvision.models.resnet18)
    else:
        _refused(path, "recipe does not fit LeNet5", LeNet5)


def test_recipe_of_another_size(lenet_file, tmp_path):
    """A keep vector of the wrong length, or one that keeps other channels than the saved tensors have."""
    _refused(_tampered(lenet_file, tmp_path, lambda p: p.update(keep=p["keep"][:-1])), "recipe does not fit LeNet5")

    def keep_more(p):
        p["keep"] = torch.ones_like(p["keep"])
    _refused(_tampered(lenet_file, tmp_path, keep_more), "recipe does not fit LeNet5.*shape")


def test_values_that_do_not_match_the_signature(lenet_file, tmp_path):
    def change(p):
        entry = p["tensors"]["ip2.bias"]
        entry["values"] = entry["values"] + 1
    _refused(_tampered(lenet_file, tmp_path, change), "differs from the saved model")


def test_graph_of_another_tracing(lenet_file, tmp_path):
    def change(p):
        p["graph"][1][0] = "renamed"
    _refused(_tampered(lenet_file, tmp_path, change), "graph differs at node 1.*leaf_modules")


def test_thinned_and_loaded_models_share_no_storage_with_the_original(lenet_file):
    model = _build("lenet5")
    small = fxcondensa.thin(model, StructurePrune(0.3), torch.randn(2, 1, 28, 28))
    loaded = fxcondensa.load_thinned(lenet_file[1], model)
    original = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for other in (small, loaded):
        mine = {t.untyped_storage().data_ptr() for t in [*other.parameters(), *other.buffers()] if t.numel()}
        assert not original & mine


def test_compressed_and_thinned_models_are_freed():
    import gc
    import weakref

    x = torch.randn(1, 1, 28, 28)
    refs = [weakref.ref(fxcondensa.compress(LeNet5(), StructurePrune(0.3), x)),
            weakref.ref(fxcondensa.thin(LeNet5(), StructurePrune(0.3), x))]
    gc.collect()
    assert [r() is None for r in refs] == [True, True]


# -- devices: fake CUDA tensors (no GPU needed) refuse any CPU/CUDA mix ------------------------------------
def _to_fake_cuda(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer replaced by a fake CUDA tensor (call inside a FakeTensorMode)."""
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = torch.nn.Parameter(p.detach().to("cuda"), requires_grad=p.requires_grad)
        for k, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[k] = b.to("cuda")
    return model


def test_reference_outputs_are_computed_on_the_models_device():
    """save_thinned of a CUDA model: the seeded reference inputs go where the model is (they were CPU tensors,
    so a CUDA model could not be saved), and the stored heads come back to the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxcondensa.files import recipe

    specs = [{"shape": [2, 1, 28, 28], "dtype": "float32"}]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _to_fake_cuda(LeNet5().eval())
        device = recipe._device_of(model)
        inputs = recipe._reference_inputs(specs, device)
        reference = recipe._run_reference(model, inputs)
    assert device.type == "cuda" and inputs[0].device.type == "cuda"
    assert reference[0]["shape"] == [2, 10] and reference[0]["head"].device.type == "cpu"


def test_reference_inputs_are_the_same_values_on_every_device():
    """Drawn on the CPU with one seed, then moved: a file saved on CUDA checks on the CPU against the same
    inputs."""
    from fxcondensa.files import recipe

    specs = [{"shape": [3, 4], "dtype": "float32"}, {"shape": [3], "dtype": "int64"}]
    a = recipe._reference_inputs(specs, torch.device("cpu"))
    b = recipe._reference_inputs(specs, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[1].dtype == torch.int64


def test_an_export_captured_model_with_keyword_inputs_saves_and_loads(tmp_path):
    """A Hugging Face model (torch.export capture, keyword inputs, a ModelOutput result) is rebuilt by
    load_thinned from its dense architecture: same outputs on fresh keyword inputs, same recipe and capture."""
    from fxcondensa.capture.records import thin_record

    torch.manual_seed(0)
    model, x, fresh, _ = bench_coverage().build_hf("bert")
    thinned = fxcondensa.thin(model, StructurePrune(0.5), x)
    fxcondensa.save_thinned(thinned, tmp_path / "bert.fxt")
    loaded = fxcondensa.load_thinned(tmp_path / "bert.fxt", model)
    assert thin_record(loaded).capture == "export"
    assert torch.equal(thin_record(loaded).keep, thin_record(thinned).keep)
    with torch.no_grad():
        got, want = loaded(**fresh), thinned(**fresh)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)

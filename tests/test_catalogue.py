"""The catalogue of bad inputs (docs/catalogue.md): each gets its exact error or documented behaviour, and the
user's model is unchanged afterwards (parameters and buffers hashed before and after)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from _models import LeNet5, state_hash
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.errors import ExampleInputError, FileFormatError, TraceError
from fxcondensa.schemes import FilterPrune, Prune, StructurePrune


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """The body must leave ``model``'s parameters, buffers and training flags exactly as they were."""
    before = state_hash(model)
    modes = [m.training for m in model.modules()]
    yield
    assert state_hash(model) == before, "the user's model was modified"
    assert [m.training for m in model.modules()] == modes, "the user's training flags were modified"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()


def assert_equivalent(model: nn.Module, scheme, thinned: nn.Module, *shape: int, ints: int = 0) -> None:
    """The thinned model equals the compressed dense one on fresh inputs (eval mode)."""
    x = torch.randint(0, ints, shape) if ints else torch.randn(*shape)
    dense = fxcondensa.compress(model, scheme, x) if scheme is not None else model
    with torch.no_grad():
        torch.testing.assert_close(thinned.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-5)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- models and schemes ---------------------------------------------------------------------------------
def test_a_model_without_parameters_thins_to_itself():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    x = torch.randn(2, 3, 4)
    with unchanged(model):
        small = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert n_params(small) == 0 and thin_record(small).groups == []
    torch.testing.assert_close(small(x), model(x))


def test_a_layer_pattern_that_matches_nothing():
    model = mlp()
    with unchanged(model), pytest.raises(ValueError, match=r"layers pattern 'conv\*' matches no layer; the layers "
                                                           r"it can name are: 0, 2, 4"):
        fxcondensa.thin(model, StructurePrune(0.5, layers={"conv*": 0.5}), torch.randn(2, 4))
    with unchanged(model), pytest.raises(ValueError, match="exclude pattern 'head' matches no layer"):
        fxcondensa.thin(model, StructurePrune(0.5, exclude="head"), torch.randn(2, 4))


def test_a_scheme_whose_layer_type_is_absent_prunes_nothing():
    model = mlp()  # FilterPrune prunes conv filters; an MLP has none
    with unchanged(model):
        small = fxcondensa.thin(model, FilterPrune(0.5), torch.randn(2, 4))
    assert n_params(small) == n_params(model)


@pytest.mark.parametrize("cls", [Prune, StructurePrune, FilterPrune])
@pytest.mark.parametrize("density", [0, 0.0, -0.5, float("nan"), 1.5, float("inf")])
def test_invalid_densities(cls, density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got " + str(density)):
        cls(density)


@pytest.mark.parametrize("density", ["0.5", None, True])
def test_densities_of_the_wrong_type(density):
    with pytest.raises((TypeError, ValueError), match="density"):
        StructurePrune(density)


def test_density_one_prunes_nothing():
    model = convnet()
    with unchanged(model):
        small = fxcondensa.thin(model, StructurePrune(1.0), torch.randn(2, 3, 8, 8))
    assert n_params(small) == n_params(model)
    assert all(g.kept == g.channels for g in thin_record(small).groups)
    assert_equivalent(model, None, small, 2, 3, 8, 8)


def test_a_density_that_would_prune_every_channel_keeps_one_per_group():
    model = convnet()
    scheme = StructurePrune(1e-9)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, torch.randn(2, 3, 8, 8))
    groups = thin_record(small).groups
    assert groups and all(g.kept >= 1 for g in groups)
    assert getattr(small, "0").out_channels == 1 and getattr(small, "3").out_channels == 1
    assert_equivalent(model, scheme, small, 2, 3, 8, 8)


# -- example inputs --------------------------------------------------------------------------------------
def test_example_inputs_of_the_wrong_shape():
    model = mlp()
    with unchanged(model), pytest.raises(ExampleInputError, match=r"example inputs \(\(2, 5\) torch.float32 on cpu\) "
                                                                   r"do not run through Sequential.*shapes cannot be "
                                                                   r"multiplied"):
        fxcondensa.thin(model, StructurePrune(0.5), torch.randn(2, 5))


def test_missing_example_inputs():
    model = mlp()
    with unchanged(model), pytest.raises(ValueError, match="thin needs example inputs"):
        fxcondensa.thin(model, StructurePrune(0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_example_inputs_of_the_wrong_dtype(dtype):
    model = mlp()
    with unchanged(model), pytest.raises(ExampleInputError, match="dtype"):
        fxcondensa.thin(model, StructurePrune(0.5), torch.zeros(2, 4, dtype=dtype))


class Bag(nn.Module):
    """Integer token ids -> embedding -> MLP: the example inputs are integers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


def test_integer_inputs():
    torch.manual_seed(0)
    model, scheme = Bag().eval(), StructurePrune(0.5)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, torch.randint(0, 10, (2, 5)))
    # the embedding's width is a channel dim too: its columns go with the channels fc1 no longer reads
    assert small.fc1.out_features < 16 and small.emb.weight.shape[0] == 10 and small.emb.weight.shape[1] <= 8
    assert_equivalent(model, scheme, small, 4, 5, ints=10)


def test_a_model_in_train_mode():
    """thin works; the check runs in eval mode (dropout would otherwise make it fail); flags are kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.9), nn.Linear(16, 3)).train()
    scheme = StructurePrune(0.5)
    with unchanged(model):  # BatchNorm running statistics included: no training-mode forward ran on them
        small = fxcondensa.thin(model, scheme, torch.randn(8, 4))
    assert small.training and all(m.training for m in small.modules())
    assert getattr(small, "0").out_features < 16
    assert_equivalent(model, scheme, small, 8, 4)
    assert model.training  # assert_equivalent put the copies in eval mode, never the user's model


@pytest.mark.parametrize("where", ["inputs", "model"])
def test_model_and_inputs_on_different_devices(where):
    """Without a second real device, the meta device stands in: the mismatch is an ExampleInputError."""
    model = mlp()
    x = torch.randn(2, 4)
    if where == "inputs":
        x = x.to("meta")
        expected = "Tensor on device cpu is not on the expected device meta"
    else:
        model = model.to("meta")
        expected = "Tensor on device meta is not on the expected device cpu"
    with pytest.raises(ExampleInputError, match=expected):
        fxcondensa.thin(model, StructurePrune(0.5), x)
    if where == "inputs":  # a meta model has no values to hash
        with unchanged(model), pytest.raises(ExampleInputError, match="on meta"):
            fxcondensa.thin(model, StructurePrune(0.5), x)


# -- graphs ----------------------------------------------------------------------------------------------
class TiedConvs(nn.Module):
    """conv3 shares conv2's weight (not its bias)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3.weight = self.conv2.weight
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.conv_out(torch.relu(self.conv3(x)))


def _thin_tied():
    torch.manual_seed(0)
    model, scheme = TiedConvs().eval(), StructurePrune(0.5)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, torch.randn(2, 3, 8, 8))
    assert model.conv3.weight is model.conv2.weight
    return model, scheme, small


def test_tied_weights_are_sliced_once_and_stay_equal():
    model, scheme, small = _thin_tied()
    assert small.conv2.weight.shape[0] < 8
    assert small.conv2.weight.data_ptr() == small.conv3.weight.data_ptr()
    assert_equivalent(model, scheme, small, 2, 3, 8, 8)


def test_tied_weights_stay_one_parameter():
    _, _, small = _thin_tied()
    assert small.conv3.weight is small.conv2.weight


class TiedLinears(nn.Module):
    """b reuses a's (square) weight; a reads the graph input, whose features cannot be removed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_whose_users_read_different_channels():
    torch.manual_seed(0)
    model, scheme = TiedLinears().eval(), StructurePrune(0.5)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, torch.randn(2, 6))
    assert_equivalent(model, scheme, small, 2, 6)


class Inplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.act(self.c1(x))
        y += self.c2(x)
        y = torch.relu_(y)
        return self.fc(self.c3(y).mean((2, 3)))


def test_inplace_ops():
    torch.manual_seed(0)
    model, scheme = Inplace().eval(), StructurePrune(0.5)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, torch.randn(2, 3, 8, 8))
    assert small.c1.out_channels == small.c2.out_channels < 8  # the inplace add joins the two producers
    assert_equivalent(model, scheme, small, 2, 3, 8, 8)


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_dynamic_control_flow_names_the_line():
    model = Dynamic()
    with unchanged(model), pytest.raises(TraceError, match=r"could not trace Dynamic \(inside Dynamic.forward, at "
                                                           r".*test_catalogue.py:\d+, in forward: \"if x.sum\(\) > 0:\""
                                                           r".*leaf_modules.*concrete_args"):
        fxcondensa.thin(model, StructurePrune(0.5), torch.randn(2, 4))


class Scale(nn.Module):
    """A custom module the channel analysis cannot know: per-channel scale."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.w.view(1, -1, 1, 1)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.scale = Scale(8)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.scale(self.c1(x)))).mean((2, 3)))


def test_unknown_custom_leaf_modules_freeze_their_groups():
    torch.manual_seed(0)
    model, scheme = WithCustom().eval(), StructurePrune(0.5)
    x = torch.randn(2, 3, 8, 8)
    with unchanged(model):
        small = fxcondensa.thin(model, scheme, x, leaf_modules=(Scale,))
    frozen = {f.group: f.reason for f in thin_record(small).frozen}
    assert frozen["c1"] == "module 'scale' (Scale) at node 'scale' is not known to the channel analysis"
    assert small.c1.out_channels == 8 and small.scale.w.shape == (8,)
    assert small.c2.out_channels < 8  # the rest of the graph is still thinned
    torch.testing.assert_close(small(x), fxcondensa.compress(model, scheme, x, leaf_modules=(Scale,))(x),
                               rtol=1e-4, atol=1e-5)


# -- files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    small = fxcondensa.thin(LeNet5(), StructurePrune(0.3), torch.randn(1, 1, 28, 28))
    fxcondensa.save_thinned(small, folder / "lenet.thin")
    fxcondensa.save_compressed(fxcondensa.compress(LeNet5(), Prune(0.1)), folder / "lenet.fxc")
    torch.save(LeNet5().state_dict(), folder / "state.pt")
    (folder / "notes.txt").write_text("not a model\n")
    for name in ("lenet.thin", "lenet.fxc"):
        data = (folder / name).read_bytes()
        (folder / f"truncated-{name}").write_bytes(data[: len(data) // 2])
        (folder / f"flipped-{name}").write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:300]) + data[300:])
    return folder


@pytest.mark.parametrize("loader", ["load_compressed", "load_thinned"])
@pytest.mark.parametrize("name,match", [
    ("truncated-lenet.thin", "not a readable fxcondensa file"),
    ("truncated-lenet.fxc", "not a readable fxcondensa file"),
    ("flipped-lenet.thin", "not a readable fxcondensa file"),
    ("flipped-lenet.fxc", "not a readable fxcondensa file"),
    ("state.pt", "not an fxcondensa"),
    ("notes.txt", "not a readable fxcondensa file"),
])
def test_corrupted_or_foreign_files(files, loader, name, match):
    model = LeNet5()
    with unchanged(model), pytest.raises(FileFormatError, match=match) as info:
        getattr(fxcondensa, loader)(files / name, model)
    assert str(files / name) in str(info.value)


@pytest.mark.parametrize("loader,name,match", [
    ("load_compressed", "lenet.thin", "not an fxcondensa compressed-model file"),
    ("load_thinned", "lenet.fxc", "not an fxcondensa thinned-model file"),
])
def test_the_other_loaders_file(files, loader, name, match):
    model = LeNet5()
    with unchanged(model), pytest.raises(FileFormatError, match=match):
        getattr(fxcondensa, loader)(files / name, model)

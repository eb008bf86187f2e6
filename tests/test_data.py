"""fxcondensa.data: where the data comes from, what it looks like, and that the fast paths equal the slow ones.

No test touches the network (every call that could download passes download=False) or the home folder
(FXCONDENSA_DATA points at a temporary cache).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset, TensorDataset
from torchvision import datasets, transforms

from fxcondensa import data
from fxcondensa.data import DatasetNotFoundError, as_tensors, load_dataset, split_train_val

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
GZ_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
# In CI the Makefile installs the package, so a missing file there is a failure, never a skip.
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / f).is_file() for f in GZ_FILES) and not os.environ.get("CI"),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


def _missing_debian() -> None:
    message = "Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module, so Fashion-MNIST is unpacked once rather than in every test."""
    cache = tmp_path_factory.mktemp("shared-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXCONDENSA_DATA", str(cache))
        yield cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FXCONDENSA_DATA", str(cache))
    return cache


@pytest.fixture(scope="module")
def testset(shared_cache):
    if not (DEBIAN / GZ_FILES[0]).is_file():
        _missing_debian()
    return load_dataset("fashion-mnist", train=False, download=False)


@pytest.fixture(scope="module")
def trainset(shared_cache):
    if not (DEBIAN / GZ_FILES[0]).is_file():
        _missing_debian()
    return load_dataset("fashion-mnist", train=True, download=False)


def _stack_items(dataset):
    """The reference as_tensors must equal: every item, one by one."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)


# --- where the data comes from --------------------------------------------------------------------------


@needs_debian
def test_debian_folder_gives_both_splits(trainset, testset, shared_cache):
    assert isinstance(trainset, datasets.FashionMNIST) and isinstance(testset, datasets.FashionMNIST)
    assert (len(trainset), len(testset)) == (60000, 10000)
    image, label = testset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int)
    for ds in (trainset, testset):
        assert ds.targets.min().item() == 0 and ds.targets.max().item() == 9
        assert torch.bincount(ds.targets, minlength=10).tolist() == [len(ds) // 10] * 10  # balanced classes
    # Staged into the temporary cache in torchvision's layout, never into the home folder.
    raw = shared_cache / "FashionMNIST" / "raw"
    assert all((raw / f.removesuffix(".gz")).is_file() for f in GZ_FILES)


@needs_debian
def test_unpacked_files_equal_the_debian_gz(testset):
    with gzip.open(DEBIAN / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    pixels = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(10000, 28, 28)
    assert torch.equal(testset.data, pixels)


@needs_debian
def test_normalised_pixels_have_mean_0_std_1(trainset):
    subset = Subset(
        trainset, torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:5000].tolist()
    )
    images, _ = as_tensors(subset)
    assert abs(images.mean().item()) < 0.02
    assert abs(images.std().item() - 1) < 0.02


@needs_debian
def test_items_use_the_published_mean_and_std(testset):
    # The constants everyone uses for Fashion-MNIST; a typo would shift every input the models see.
    expected = (testset.data[:5].float() / 255 - 0.2860) / 0.3530
    got = torch.stack([testset[i][0][0] for i in range(5)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@needs_debian
def test_normalize_false_gives_pixels_in_0_1(shared_cache):
    ds = load_dataset("fashion-mnist", train=False, download=False, normalize=False)
    images, _ = as_tensors(Subset(ds, range(2000)))
    assert images.min().item() == 0.0 and images.max().item() == 1.0
    assert abs(images.mean().item() - 0.2860) < 0.02


@needs_debian
def test_second_load_reuses_the_cache(shared_cache, testset):
    staged = shared_cache / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    before = staged.stat().st_mtime_ns
    load_dataset("fashion-mnist", train=False, download=False)
    assert staged.stat().st_mtime_ns == before


@needs_debian
def test_root_folder_of_gz_files(tmp_path, fresh_cache, testset):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in GZ_FILES:
        (flat / f).symlink_to(DEBIAN / f)
    ds = load_dataset("fashion-mnist", train=False, root=flat, download=False)
    assert len(ds) == 10000
    assert torch.equal(ds.data, testset.data) and torch.equal(ds.targets, testset.targets)
    assert sorted(p.name for p in flat.iterdir()) == sorted(GZ_FILES)  # the user's folder is only read
    train = load_dataset("fashion-mnist", train=True, root=flat, download=False)
    assert len(train) == 60000


@needs_debian
def test_root_folder_of_unpacked_files(tmp_path, fresh_cache, shared_cache, testset):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in GZ_FILES:
        name = f.removesuffix(".gz")
        (flat / name).symlink_to(shared_cache / "FashionMNIST" / "raw" / name)
    ds = load_dataset("fashion_mnist", train=False, root=flat, download=False)
    assert torch.equal(ds.data, testset.data)


@needs_debian
def test_root_in_torchvision_layout_is_used_in_place(tmp_path, fresh_cache, shared_cache, testset):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in GZ_FILES:
        name = f.removesuffix(".gz")
        (raw / name).symlink_to(shared_cache / "FashionMNIST" / "raw" / name)
    ds = load_dataset("fashion-mnist", train=False, root=tmp_path / "tv", download=False)
    assert Path(ds.root) == tmp_path / "tv"
    assert torch.equal(ds.targets, testset.targets)
    assert not fresh_cache.exists()  # nothing had to be staged


@needs_debian
@pytest.mark.parametrize(
    "name", ["fashion-mnist", "Fashion-MNIST", "fashion_mnist", "FASHIONMNIST", " fashionmnist "]
)
def test_name_aliases(name, shared_cache, testset):
    ds = load_dataset(name, train=False, download=False)
    assert type(ds) is datasets.FashionMNIST


@pytest.mark.parametrize("bad", ["cifar10", "fashion mnist", "", "kmnist"])
def test_bad_name_raises_valueerror_naming_valid_names(bad, fresh_cache):
    with pytest.raises(ValueError) as info:
        load_dataset(bad, download=False)
    message = str(info.value)
    assert repr(bad) in message
    for valid in ("'mnist'", "'fashion-mnist'", "'fashion_mnist'", "'fashionmnist'"):
        assert valid in message


def test_empty_root_without_download_says_how_to_get_the_data(tmp_path, fresh_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root=empty, download=False)
    assert isinstance(info.value, DatasetNotFoundError)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message
    assert "download=True" in message and "network" in message
    assert "root=" in message and "--data-root" in message
    assert str(empty) in message
    assert list(empty.iterdir()) == []  # a failed look leaves the folder as it was


def test_root_is_the_only_place_looked_when_given(tmp_path, fresh_cache):
    # Even with Debian's files installed, an explicit root that lacks the data is an error, not a fallback.
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_no_debian_folder_and_empty_cache(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.setitem(data._SYSTEM_FOLDERS, "fashion-mnist", (tmp_path / "not-installed",))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert str(tmp_path / "not-installed") in message


def test_mnist_is_only_by_download_or_root(fresh_cache):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", download=False)
    message = str(info.value)
    assert "apt-get" not in message  # Debian does not package MNIST; do not send people looking
    assert "download=True" in message and "root=" in message
    assert str(fresh_cache) in message


def test_incomplete_folder_is_not_used(tmp_path, fresh_cache):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in GZ_FILES[:3]:
        (partial / f).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", root=partial, download=False)


# --- as_tensors -------------------------------------------------------------------------------------------


@needs_debian
@pytest.mark.parametrize("normalize", [True, False])
def test_as_tensors_equals_stacking_items_on_a_subset(shared_cache, normalize):
    ds = load_dataset("fashion-mnist", train=False, download=False, normalize=normalize)
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:200].tolist()
    subset = Subset(ds, indices)
    images, labels = as_tensors(subset)
    ref_images, ref_labels = _stack_items(subset)
    assert images.shape == (200, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, ref_images)
    assert torch.equal(labels, ref_labels)


@needs_debian
def test_as_tensors_on_nested_subsets(testset):
    _, val = split_train_val(testset, 300, seed=3)
    nested = Subset(val, [5, 0, 299, 17, 5])
    images, labels = as_tensors(nested)
    ref_images, ref_labels = _stack_items(nested)
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


@needs_debian
def test_as_tensors_whole_dataset(testset):
    images, labels = as_tensors(testset)
    assert images.shape == (10000, 1, 28, 28)
    assert torch.equal(labels, testset.targets)
    assert torch.equal(images[:50], _stack_items(Subset(testset, range(50)))[0])


@needs_debian
def test_as_tensors_unknown_transform_falls_back_to_the_loop(shared_cache):
    ds = load_dataset("fashion-mnist", train=False, download=False)
    # A transform the fast path cannot reproduce: as_tensors must apply it, not assume Normalize.
    ds.transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: 2 * x + 1)])
    subset = Subset(ds, range(30))
    images, labels = as_tensors(subset)
    ref_images, ref_labels = _stack_items(subset)
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    assert images.min().item() == 1.0


def test_as_tensors_generic_dataset():
    x = torch.randn(12, 1, 28, 28)
    y = torch.arange(12) % 10
    images, labels = as_tensors(TensorDataset(x, y))
    assert torch.equal(images, x) and torch.equal(labels, y) and labels.dtype == torch.int64


def test_as_tensors_rejects_non_tensor_items():
    class Strings(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return "not an image", 0

    with pytest.raises(TypeError, match="ToTensor"):
        as_tensors(Strings())


# --- split_train_val --------------------------------------------------------------------------------------


def test_split_sizes_disjoint_and_complete():
    ds = TensorDataset(torch.arange(100))
    train, val = split_train_val(ds, 30, seed=0)
    assert (len(train), len(val)) == (70, 30)
    assert sorted(list(train.indices) + list(val.indices)) == list(range(100))


def test_split_is_deterministic_per_seed_and_leaves_global_rng_alone():
    ds = TensorDataset(torch.arange(1000))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = split_train_val(ds, 100, seed=7)
    b = split_train_val(ds, 100, seed=7)
    c = split_train_val(ds, 100, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(a[1].indices) == list(b[1].indices)
    assert list(a[0].indices) == list(b[0].indices)
    assert list(a[1].indices) != list(c[1].indices)


@pytest.mark.parametrize("bad", [-1, 11, 2.5, "3", True])
def test_split_rejects_bad_val_size(bad):
    with pytest.raises(ValueError, match="val_size"):
        split_train_val(TensorDataset(torch.arange(10)), bad)


def test_split_edges():
    ds = TensorDataset(torch.arange(10))
    assert [len(s) for s in split_train_val(ds, 0)] == [10, 0]
    assert [len(s) for s in split_train_val(ds, 10)] == [0, 10]

"""MNIST and Fashion-MNIST without surprises: local files first, the network last, clear errors otherwise.

Where :func:`load_dataset` looks, in order:

1. ``root=`` when given, and only there: a folder in torchvision's layout (``ROOT/FashionMNIST/raw/...``) or a
   folder that directly holds the four idx files (``.gz`` or unpacked). With ``download=True`` and nothing
   there, torchvision downloads into it, as ``torchvision.datasets.FashionMNIST(root, download=True)`` would.
2. For Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
3. The cache folder (``$FXCONDENSA_DATA``, default ``~/.cache/fxcondensa/data``): what an earlier call
   unpacked there, else torchvision's download into it when ``download=True``.

Example::

    >>> from fxcondensa.data import as_tensors, load_dataset, split_train_val
    >>> trainset = load_dataset("fashion-mnist", train=True)     # Debian's files, no network needed
    >>> trainset, valset = split_train_val(trainset, 6000, seed=0)
    >>> len(trainset), len(valset)
    (54000, 6000)
    >>> images, labels = as_tensors(valset)                       # one tensor op, no per-item loop
    >>> images.shape, images.dtype, labels.dtype
    (torch.Size([6000, 1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torch.utils.data import Dataset, Subset, random_split
from torchvision import datasets, transforms

from .errors import FxCondensaError

__all__ = ["DatasetNotFoundError", "load_dataset", "split_train_val", "as_tensors", "DATASET_NAMES"]

#: The canonical dataset names :func:`load_dataset` accepts (aliases are listed in ``_ALIASES``).
DATASET_NAMES = ("mnist", "fashion-mnist")

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
}

# The four files every MNIST-like dataset has, unpacked names (torchvision's _check_exists wants these).
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Folders that system packages install the data into. A dict read at call time, so tests can empty it.
_SYSTEM_FOLDERS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


@dataclass(frozen=True)
class _Spec:
    key: str
    title: str
    cls: type[datasets.MNIST]
    mean: float  # pixel mean and std over the training set, after ToTensor's scaling to [0, 1]
    std: float
    apt_package: str | None  # the Debian package that ships the files, if any


_SPECS = {
    "mnist": _Spec("mnist", "MNIST", datasets.MNIST, 0.1307, 0.3081, None),
    "fashion-mnist": _Spec(
        "fashion-mnist", "Fashion-MNIST", datasets.FashionMNIST, 0.2860, 0.3530, "dataset-fashion-mnist"
    ),
}


class DatasetNotFoundError(FxCondensaError, FileNotFoundError):
    """The dataset's files are nowhere :func:`load_dataset` looked; the message says how to get them."""


def load_dataset(
    name: str = "fashion-mnist",
    train: bool = True,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    normalize: bool = True,
) -> datasets.MNIST:
    """Load MNIST or Fashion-MNIST as a torchvision dataset whose items are ``(image [1, 28, 28], label)``.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"`` (also ``"fashion_mnist"``, ``"fashionmnist"``; any case).
        train: the 60000-image training split if True, else the 10000-image test split.
        root: a folder holding the data (torchvision's layout or the four idx files directly). When given,
            nothing else is searched.
        download: allow torchvision's download (needs network) when no local copy is found.
        normalize: images are ``ToTensor()`` then ``Normalize(mean, std)`` of the dataset if True, plain
            ``ToTensor()`` (pixels in [0, 1]) if False.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: no copy found and none could be downloaded (a ``FileNotFoundError``).

    Example::

        >>> testset = load_dataset("fashion-mnist", train=False)
        >>> image, label = testset[0]
        >>> image.shape, label
        (torch.Size([1, 28, 28]), 9)
    """
    key = _canonical_name(name)
    spec = _SPECS[key]
    steps: list[object] = [transforms.ToTensor()]
    if normalize:
        steps.append(transforms.Normalize((spec.mean,), (spec.std,)))
    transform = transforms.Compose(steps)

    def make(at: Path, download: bool = False) -> datasets.MNIST:
        return spec.cls(str(at), train=train, transform=transform, download=download)

    tried: list[str] = []
    if root is not None:
        root = Path(root).expanduser()
        if _unpacked_in(root / spec.cls.__name__ / "raw"):
            return make(root)
        # Gzipped files (or a flat folder) are unpacked into the cache rather than next to them: the user's
        # folder may be read-only (e.g. a system package) and we should not write into it uninvited.
        for folder in (root / spec.cls.__name__ / "raw", root / "raw", root):
            found = _idx_files_in(folder)
            if found is not None:
                digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
                staged = _cache_dir() / "from-root" / digest
                _stage(found, staged / spec.cls.__name__ / "raw")
                return make(staged)
        tried.append(f"root={str(root)!r}: no {spec.title} idx files (.gz or unpacked) there")
        if download:
            return _download(make, root, spec, tried)
        tried.append("download=False, so torchvision's download was not tried")
        raise DatasetNotFoundError(_not_found_message(spec, tried))

    cache = _cache_dir()
    if _unpacked_in(cache / spec.cls.__name__ / "raw"):
        return make(cache)
    for folder in _SYSTEM_FOLDERS.get(key, ()):
        found = _idx_files_in(folder)
        if found is None:
            tried.append(f"{folder}: not there or incomplete")
            continue
        # torchvision's own download() cannot be pointed at these files: Debian recompressed them, so their
        # md5 differs from the one torchvision checks and it would go to the network. We unpack them ourselves.
        try:
            _stage(found, cache / spec.cls.__name__ / "raw")
        except OSError as err:
            tried.append(f"{folder}: could not unpack into the cache {cache}: {err}")
            continue
        return make(cache)
    if download:
        return _download(make, cache, spec, tried)
    tried.append(f"cache {cache}: empty, and download=False so torchvision's download was not tried")
    raise DatasetNotFoundError(_not_found_message(spec, tried))


def split_train_val(dataset: Dataset, val_size: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split ``dataset`` into ``(train, val)`` at random, the same way for the same ``seed``.

    Example::

        >>> train, val = split_train_val(load_dataset("fashion-mnist"), 6000, seed=0)
        >>> len(train), len(val)
        (54000, 6000)
    """
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size <= n:
        raise ValueError(f"val_size must be an int in [0, {n}] (the dataset's length), got {val_size!r}")
    # A private generator: the split must not depend on, nor disturb, the global RNG state.
    generator = torch.Generator().manual_seed(seed)
    train, val = random_split(dataset, [n - val_size, val_size], generator=generator)
    return train, val


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as ``(images float32 [N, 1, 28, 28], labels int64 [N])``, equal to stacking its items.

    For the datasets :func:`load_dataset` returns, and ``Subset`` s of them, the images are read from the
    dataset's ``.data`` and normalised in one tensor operation (a second, not a minute, for 60000 images);
    any other dataset is read item by item.

    Example::

        >>> images, labels = as_tensors(load_dataset("fashion-mnist", train=False))
        >>> images.shape, labels[:3].tolist()
        (torch.Size([10000, 1, 28, 28]), [9, 2, 1])
    """
    fast = _as_tensors_fast(dataset)
    if fast is not None:
        return fast
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        image, label = dataset[i]
        if not isinstance(image, torch.Tensor):
            raise TypeError(
                f"as_tensors needs datasets whose images are tensors; item {i} is a {type(image).__name__} "
                "(add transforms.ToTensor() to the dataset's transform)"
            )
        images.append(image)
        labels.append(int(label))
    if not images:
        raise ValueError("as_tensors got an empty dataset; there is nothing to stack")
    return torch.stack(images).to(torch.float32), torch.tensor(labels, dtype=torch.int64)


def _as_tensors_fast(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`as_tensors` without the per-item loop, or None when the result could differ from the loop's."""
    indices: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        # Subset(Subset(base, a), b)[j] is base[a[b[j]]]: compose from the outside in.
        own = torch.as_tensor(dataset.indices, dtype=torch.int64)
        indices = own if indices is None else own[indices]
        dataset = dataset.dataset
    if not isinstance(dataset, datasets.MNIST) or dataset.target_transform is not None:
        return None
    if (
        not isinstance(dataset.data, torch.Tensor)
        or dataset.data.dtype != torch.uint8
        or dataset.data.ndim != 3
    ):
        return None
    affine = _pixel_affine(dataset.transform)
    if affine is None:
        return None
    pixels = dataset.data if indices is None else dataset.data[indices]
    targets = torch.as_tensor(dataset.targets)
    labels = (targets if indices is None else targets[indices]).to(torch.int64)
    # The same float32 operations, in the same order, as ToTensor (x / 255) and Normalize ((x - m) / s),
    # so the result is bit-for-bit what the per-item loop gives.
    images = pixels.unsqueeze(1).to(torch.float32).div_(255)
    mean, std = affine
    if (mean, std) != (0.0, 1.0):
        images.sub_(torch.tensor(mean, dtype=torch.float32)).div_(torch.tensor(std, dtype=torch.float32))
    return images, labels


def _pixel_affine(transform: object) -> tuple[float, float] | None:
    """``(mean, std)`` if ``transform`` is ``ToTensor()`` optionally followed by a 1-channel ``Normalize``."""
    steps = list(transform.transforms) if type(transform) is transforms.Compose else [transform]
    if not steps or type(steps[0]) is not transforms.ToTensor:
        return None
    if len(steps) == 1:
        return 0.0, 1.0
    norm = steps[1]
    if len(steps) != 2 or type(norm) is not transforms.Normalize:
        return None
    mean, std = torch.as_tensor(norm.mean).flatten(), torch.as_tensor(norm.std).flatten()
    if mean.numel() != 1 or std.numel() != 1:
        return None
    return float(mean), float(std)


def _canonical_name(name: str) -> str:
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        valid = ", ".join(repr(n) for n in _ALIASES)
        raise ValueError(f"unknown dataset name {name!r}; valid names (any case): {valid}")
    return key


def _cache_dir() -> Path:
    return Path(
        os.environ.get("FXCONDENSA_DATA") or Path.home() / ".cache" / "fxcondensa" / "data"
    ).expanduser()


def _unpacked_in(raw: Path) -> bool:
    return all((raw / stem).is_file() for stem in _IDX_FILES)


def _idx_files_in(folder: Path) -> dict[str, Path] | None:
    """The four idx files in ``folder``, unpacked preferred to ``.gz``; None unless all four are there."""
    found: dict[str, Path] = {}
    for stem in _IDX_FILES:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[stem] = candidate
                break
        else:
            return None
    return found


def _stage(found: dict[str, Path], raw: Path) -> None:
    """Make ``raw`` hold the four unpacked idx files: symlinks to unpacked sources, unpacked copies of .gz ones.

    Each file is written under a unique temporary name then renamed, so processes staging at the same time
    (pytest-xdist workers, parallel runs) never see a half-written file. A file older than its source
    (the source was replaced) is staged again.
    """
    raw.mkdir(parents=True, exist_ok=True)
    for stem, source in found.items():
        target = raw / stem
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        tmp = raw / f".{stem}.{uuid.uuid4().hex}.tmp"
        try:
            if source.suffix == ".gz":
                with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                try:
                    os.symlink(source.resolve(), tmp)
                except OSError:  # file systems without symlinks: a copy costs space, not correctness
                    shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()


def _download(
    make: Callable[[Path, bool], datasets.MNIST], at: Path, spec: _Spec, tried: list[str]
) -> datasets.MNIST:
    try:
        return make(at, True)
    except (RuntimeError, URLError, OSError) as err:
        # torchvision's message spans lines, one per mirror; one line keeps the list above readable.
        reason = " ".join(str(err).split())
        tried.append(f"torchvision's download into {at} failed: {reason[:400]}")
        raise DatasetNotFoundError(_not_found_message(spec, tried)) from err


def _not_found_message(spec: _Spec, tried: list[str]) -> str:
    lines = [f"{spec.title} not found. Tried:"]
    lines += [f"  - {line}" for line in tried]
    lines.append("Ways to get it:")
    if spec.apt_package is not None:
        folders = ", ".join(str(f) for f in _SYSTEM_FOLDERS.get(spec.key, ())) or "/usr/share/datasets"
        lines.append(
            f"  - Debian/Ubuntu: `sudo apt-get install {spec.apt_package}` puts the files in {folders}, "
            "used whenever no root is given"
        )
    lines.append(
        "  - torchvision's download (needs network): load_dataset(..., download=True) downloads into root "
        "if given, else into the cache folder ($FXCONDENSA_DATA, default ~/.cache/fxcondensa/data)"
    )
    lines.append(
        f"  - your own copy: root=DIR (--data-root DIR on the command line), DIR holding "
        f"{', '.join(_IDX_FILES)} (.gz or unpacked), or DIR/{spec.cls.__name__}/raw/ holding them"
    )
    return "\n".join(lines)

"""Atomic file writes shared by every writer (compressed models, thinned models, L-C checkpoints, exports,
the latency cache).

A file is written under a temporary name in the target's folder, flushed to disk, then renamed over the
target: a process killed at any moment leaves either the old file or the new one, whole, and never a
half-written file under the target's name.

Writers that check a file against the model's outputs compute those outputs under ``no_tf32``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import FileFormatError

__all__ = ["write_atomic", "save_atomic", "load_plain", "no_tf32"]


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None], *, overwrite: bool = True,
                 make_dirs: bool = False) -> int:
    """Have ``write(tmp)`` write a temporary sibling of ``path``, then rename it over ``path``; returns its bytes.

    The one atomic writer: compressed files, recipes, L-C checkpoints, exports and the latency cache all go
    through it. ``tmp`` ends in ``path``'s suffix (exporters that read the suffix see the right one) and
    anything ``write`` puts beside it under its name (ONNX's external data) is removed on failure. The file
    gets a normal file mode (``mkstemp`` makes it private) and is flushed to disk before the rename.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` (also when it appeared while we
    wrote). ``make_dirs`` creates a missing folder; otherwise a missing folder is a ``FileNotFoundError``.

    Example:
        >>> import os, pathlib, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text("hello"))
        5
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        if os.path.exists(path) and not overwrite:  # appeared while we wrote: still not ours to replace
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        os.replace(tmp, path)
    except BaseException:
        for leftover in glob.glob(glob.escape(tmp) + "*"):  # the name is unique: what starts with it is ours
            os.unlink(leftover)
        raise
    return size


def save_atomic(payload: Any, path: str | os.PathLike[str], *, overwrite: bool = True, make_dirs: bool = False) -> int:
    """``torch.save`` plain data (dicts, lists, strings, numbers, tensors) to ``path`` with ``write_atomic``.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> save_atomic({"a": 1}, path) > 0 and os.path.exists(path)
        True
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return write_atomic(path, write, overwrite=overwrite, make_dirs=make_dirs)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def load_plain(path: str, what: str, magic: str, version: int | tuple[int, ...], writer: str) -> dict[str, Any]:
    """Read a file written by ``save_atomic`` with ``torch.load(weights_only=True)``: no pickled code ever runs.

    A missing file is a ``FileNotFoundError`` naming ``what`` should be there; a truncated, foreign or
    crafted file, one without the ``magic`` marker or of a format version other than ``version`` (one, or a
    tuple of those this fxcondensa reads) is a ``FileFormatError`` naming ``path`` (and ``writer``, the
    function that writes such files). Callers check the other fields.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, text, foreign pickle, crafted pickle refused by weights_only
        first = (str(exc).splitlines() or [""])[0]
        raise FileFormatError(f"{path} is not a readable fxcondensa file (truncated, or another format): "
                              f"{type(exc).__name__}: {first}") from exc
    if not isinstance(payload, dict) or payload.get("magic") != magic:
        raise FileFormatError(f"{path} is not an fxcondensa {what} file (no '{magic}' marker); write it with {writer}")
    versions = (version,) if isinstance(version, int) else tuple(version)
    found = payload.get("version")
    if isinstance(found, bool) or found not in versions:
        newer = isinstance(found, int) and not isinstance(found, bool) and found > max(versions)
        raise FileFormatError(
            f"{path} has {what} format version {found!r}; this fxcondensa reads version"
            f"{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
            + ("; it was written by a newer fxcondensa: upgrade fxcondensa to read it" if newer else
               f"; write it again with {writer}"))
    return payload


@contextmanager
def no_tf32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full precision on CUDA for a while (TF32 keeps 10 mantissa bits:
    enough alone to fail a reference check). The previous settings are restored; no effect on the CPU.

    Example:
        >>> with no_tf32():
        ...     torch.backends.cuda.matmul.allow_tf32
        False
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

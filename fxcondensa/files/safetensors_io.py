"""Read and write safetensors files one tensor at a time, with plain reads and writes (no memory map).

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range), then the tensors' bytes back to back. Reading a tensor here is one ``readinto`` of its byte
range into a fresh tensor: the process holds that tensor and nothing else of the file. (A memory-mapped
reader keeps every page it has touched resident, and counted in the process's RSS, until the map closes:
reading a 16 GB checkpoint through one map can make the process look 16 GB large.) Writing streams each
tensor to the file as it is produced, after a header computed from the shapes announced in advance, so a
shard is never assembled in memory. The files are the format the ``safetensors`` package reads and writes.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    >>> write_safetensors(path, {"t": (t.shape, t.dtype)}, iter([("t", t)]))
    >>> torch.equal(SafetensorsFile(path).read("t"), t)
    True
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import FileFormatError

__all__ = ["SafetensorsFile", "write_safetensors", "DTYPES"]

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors package refuses larger headers too


class SafetensorsFile:
    """The header of one safetensors file, and its tensors read one at a time on request.

    ``shapes`` maps each tensor's name to ``(shape, dtype)``. A truncated or foreign file is a
    ``FileFormatError`` naming it.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < size <= _MAX_HEADER:
                raise FileFormatError(f"{self.path} is not a safetensors file (its first 8 bytes give no header "
                                      "length); write it again, e.g. with save_pretrained")
            try:
                header = json.loads(f.read(size))
            except ValueError as exc:
                raise FileFormatError(f"{self.path}: its safetensors header is not JSON ({exc}); the file is "
                                      "truncated or another format: write it again") from exc
        self._data_start = 8 + size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise FileFormatError(f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which "
                                      f"this reader does not know (it reads {sorted(DTYPES)})")
            begin, end = entry["data_offsets"]
            self._entries[name] = (dtype, tuple(int(s) for s in entry["shape"]), int(begin), int(end))

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (shape, dtype) for n, (dtype, shape, _, _) in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from disk into memory of its own."""
        dtype, shape, begin, end = self._entries[name]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            view, done = memoryview(out.numpy()), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise FileFormatError(f"{self.path} is truncated: tensor {name!r} ends past the end of the "
                                          "file; write it again")
                done += got
        return out.view(dtype).reshape(shape)


def _header(specs: Mapping[str, tuple[Sequence[int], torch.dtype]], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer does


def write_safetensors(path: str | os.PathLike[str], specs: Mapping[str, tuple[Sequence[int], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], *,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``path``: the header from ``specs`` (name -> (shape, dtype), in file order), then each tensor of
    ``tensors`` (``(name, tensor)`` pairs, produced lazily, in the same order) as it comes.

    A tensor whose name, shape or dtype is not the one announced raises ``ValueError`` (the file is then
    incomplete: write through ``fileio.write_atomic`` so that it never lands under its name).
    """
    header = _header(specs, {"format": "pt", **(metadata or {})})
    expected = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, tensor in tensors:
            want = next(expected, None)
            if want is None or want[0] != name or tuple(want[1][0]) != tuple(tensor.shape) \
                    or want[1][1] != tensor.dtype:
                raise ValueError(f"write_safetensors {path}: got tensor {name!r} {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, expected {want!r}")
            data = tensor.detach().to("cpu").contiguous()
            f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")
        missing = [n for n, _ in expected]
        if missing:
            raise ValueError(f"write_safetensors {path}: tensors {missing[:3]} were announced but never written")

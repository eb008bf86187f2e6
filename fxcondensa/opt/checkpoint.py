"""L-C checkpoints: plain-data files written atomically and read back with ``weights_only=True``.

A checkpoint is a ``torch.save`` of dicts, lists, strings, ints, floats and tensors only, so loading it
never runs pickled code. It is written to a temporary file in the same folder and renamed over the
old one: a process killed at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from torch import nn

from ..errors import FileFormatError
from ..files.fileio import save_atomic as write_atomic

__all__ = ["FORMAT", "VERSION", "save_atomic", "load_checkpoint", "model_fingerprint", "config_mismatch"]

FORMAT = "fxcondensa-lc-checkpoint"
VERSION = 1


def save_atomic(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    write_atomic(state, path, make_dirs=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors on the CPU); refuse anything else."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FileFormatError(f"cannot read L-C checkpoint {path!r}: {type(exc).__name__}: {exc}. "
                              "Delete it to start over, or pass another checkpoint path.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FileFormatError(f"{path!r} is not an fxcondensa L-C checkpoint (format tag missing); "
                              "pass another checkpoint path")
    if state.get("version") != VERSION:
        raise FileFormatError(f"L-C checkpoint {path!r} has version {state.get('version')!r}; this fxcondensa "
                              f"reads version {VERSION}. Delete it to start over.")
    return state


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): which model a run started from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_mismatch(saved: dict[str, Any], current: dict[str, Any],
                    defaults: dict[str, Any] | None = None) -> list[str]:
    """Human-readable differences between two configurations, one line per key. A key the checkpoint lacks
    (an argument added after it was written) counts as its default in ``defaults``, the value the run that
    wrote it used.

    Example:
        >>> config_mismatch({"lr": 0.1}, {"lr": 0.1, "warmup": 0.0}, {"warmup": 0.0})
        []
        >>> config_mismatch({"lr": 0.1}, {"lr": 0.2})
        ['lr: checkpoint has 0.1, this run has 0.2']
    """
    defaults = defaults or {}
    keys = sorted(set(saved) | set(current))
    then = {k: saved[k] if k in saved else defaults.get(k) for k in keys}
    return [f"{k}: checkpoint has {then[k]!r}, this run has {current.get(k)!r}"
            for k in keys if then[k] != current.get(k)]

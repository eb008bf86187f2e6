"""A Hugging Face checkpoint directory read tensor by tensor, and one written shard by shard.

Reading: ``config.json`` and the safetensors weights, one file (``model.safetensors``) or shards named by
``model.safetensors.index.json``; each tensor is read alone when asked for (``files.safetensors_io``). A missing
config, a shard the index names but the directory lacks, or a tensor no shard holds raise an error naming the
file and what to do.

Writing: ``write_checkpoint`` fills a temporary sibling of the target with the shards (each written atomically
as its tensors are produced), the index, ``config.json`` and the tokenizer and generation files of the source,
and only then puts it in place of the target (``overwrite=True`` is needed to replace an existing one). The
source directory is never written to.

Example:
    >>> import json, os, tempfile, torch
    >>> root = tempfile.mkdtemp()
    >>> units = [{"w": torch.ones(2, 2)}, {"b": torch.zeros(3)}]
    >>> specs = [{n: (t.shape, t.dtype) for n, t in u.items()} for u in units]
    >>> out = write_checkpoint(os.path.join(root, "out"), {"model_type": "demo"}, specs,
    ...                        lambda i: iter(units[i].items()), max_shard_bytes=16)
    >>> sorted(os.listdir(out))
    ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> HFCheckpoint(out).read("b")
    tensor([0., 0., 0.])
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .fileio import write_atomic
from .safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["HFCheckpoint", "write_checkpoint", "SIDE_FILES"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files beside the weights that describe the same model after thinning: the tokenizer and generation settings.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "chat_template.json")


class HFCheckpoint:
    """The config (a dict) and the tensors of a Hugging Face directory, read lazily.

    ``shapes``: tensor name -> (shape, dtype) from the shards' headers (nothing read yet); ``read(name)``
    reads one tensor.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a directory: give the folder that save_pretrained wrote "
                                    "(config.json and *.safetensors)")
        config = self.folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.folder} has no config.json: give a Hugging Face model directory (as "
                                    "save_pretrained writes it), or add the model's config.json to it")
        self.config: dict[str, Any] = json.loads(config.read_text())
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.folder / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise FileNotFoundError(
                        f"{index} names the shard {shard}, which is not in {self.folder} "
                        f"({sum(v == shard for v in weight_map.values())} tensors are in it): copy the missing "
                        "shard there, or save the model again")
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not names:
                raise FileNotFoundError(f"{self.folder} has no *.safetensors weights (nor {INDEX}): save the model "
                                        "with save_pretrained (safe_serialization, the default)")
        for shard in names:
            f = self._files[shard] = SafetensorsFile(self.folder / shard)
            for name in f.shapes:
                self._where[name] = shard

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: self._files[s].shapes[n] for n, s in self._where.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        shard = self._where.get(name)
        if shard is None:
            raise KeyError(f"{self.folder} holds no tensor {name!r} in any shard: the checkpoint is incomplete or "
                           "of another architecture than its config.json says")
        return self._files[shard].read(name)


def _nbytes(spec: Mapping[str, tuple[Sequence[int], torch.dtype]]) -> int:
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in spec.values())


def _plan(specs: Sequence[Mapping[str, tuple[Sequence[int], torch.dtype]]], max_bytes: int) -> list[list[int]]:
    """Consecutive units grouped into shards of at most ``max_bytes`` (a larger unit is a shard alone)."""
    shards: list[list[int]] = []
    size = 0
    for i, spec in enumerate(specs):
        n = _nbytes(spec)
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_checkpoint(dst: str | os.PathLike[str], config: Mapping[str, Any],
                     specs: Sequence[Mapping[str, tuple[Sequence[int], torch.dtype]]],
                     produce: Callable[[int], Iterator[tuple[str, torch.Tensor]]], *,
                     max_shard_bytes: int = 2**31, side_files_from: str | os.PathLike[str] | None = None,
                     overwrite: bool = False) -> Path:
    """Write a Hugging Face directory at ``dst`` and return its path.

    ``specs[i]`` announces the tensors of unit ``i`` (a layer, the embeddings, ...): name -> (shape, dtype);
    ``produce(i)`` yields them, in that order, when unit ``i``'s turn comes (units run in order, so a unit may
    use what the one before it computed). Units are grouped into shards of at most ``max_shard_bytes``.
    ``side_files_from``: a directory whose tokenizer and generation files are copied. Everything is written
    into a temporary sibling directory, which replaces ``dst`` at the end (an existing ``dst`` only with
    ``overwrite=True``); on any error the temporary directory is removed and ``dst`` is left as it was.
    """
    target = Path(dst)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it (it is replaced only "
                              "once the new checkpoint is complete)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        shards = _plan(specs, max_shard_bytes)
        names = [SINGLE] if len(shards) == 1 else \
            [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map: dict[str, str] = {}
        for units, name in zip(shards, names, strict=True):
            spec = {n: s for i in units for n, s in specs[i].items()}
            weight_map.update(dict.fromkeys(spec, name))

            def stream(units: list[int] = units) -> Iterator[tuple[str, torch.Tensor]]:
                for i in units:
                    yield from produce(i)

            write_atomic(tmp / name, lambda path, spec=spec, stream=stream: write_safetensors(path, spec, stream()))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(s) for s in specs)}, "weight_map": weight_map}
            write_atomic(tmp / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
        write_atomic(tmp / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
        if side_files_from is not None:
            for side in SIDE_FILES:
                source = Path(side_files_from) / side
                if source.is_file():
                    shutil.copyfile(source, tmp / side)
        os.chmod(tmp, 0o777 & ~_umask())
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target``: renames only, the old one removed last."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)

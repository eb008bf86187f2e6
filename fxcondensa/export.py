"""Write a model to a file others can load (TorchScript, torch.export, ONNX), and prove the file works.

Every exporter follows the same steps: refuse to replace an existing file unless ``overwrite=True``; export an
eval-mode copy of the model (the caller's model is not touched) to a temporary file next to the target;
reload that file with its own loader and compare its outputs with the model's on ``example_inputs``
(rtol 1e-4, atol 1e-5); only then rename it over the target. A failure at any step leaves no file behind.

TorchScript is deprecated upstream (PyTorch 2.x prints ``FutureWarning`` on every ``torch.jit`` call). It is
kept because many deployment stacks still load ``.pt`` files; its warnings are silenced inside this module
only (``warnings.catch_warnings``), never globally. Prefer ``torch_export`` for new work.

Example:
    >>> import torch, fxcondensa
    >>> model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    >>> fxcondensa.export.torchscript(model, "lenet5.pt", x)  # doctest: +SKIP
    PosixPath('lenet5.pt')
    >>> torch.jit.load("lenet5.pt")(x).shape  # doctest: +SKIP
    torch.Size([1, 10])
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FxCondensaError
from .graph import as_input_tuple, flatten_outputs

__all__ = ["torchscript", "torch_export", "onnx", "export", "ExportCheckError", "FORMATS", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5


class ExportCheckError(FxCondensaError, AssertionError):
    """The reloaded file computes something other than the model (the file is not written)."""


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """Silence TorchScript's deprecation and tracer warnings for the duration of one export, locally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _check(expected: Any, got: Any, fmt: str, path: Path) -> None:
    want, have = flatten_outputs(expected), [torch.as_tensor(t) for t in flatten_outputs(got)]
    if len(want) != len(have):
        raise ExportCheckError(f"{fmt} export to {path}: the reloaded file returns {len(have)} tensors, the model "
                               f"{len(want)}; the file was not written")
    for i, (w, h) in enumerate(zip(want, have, strict=True)):
        w = w.detach().cpu()
        h = h.detach().cpu().to(w.dtype) if h.shape == w.shape else h
        if h.shape != w.shape or not torch.allclose(h, w, rtol=RTOL, atol=ATOL, equal_nan=True):
            detail = (f"shape {tuple(h.shape)} instead of {tuple(w.shape)}" if h.shape != w.shape
                      else f"max abs difference {(h - w).abs().max().item():.3g}")
            raise ExportCheckError(
                f"{fmt} export to {path}: output {i} of the reloaded file differs from the model's "
                f"({detail}; rtol {RTOL}, atol {ATOL}); the file was not written. Export in float32 and eval "
                "mode, and check that the model is deterministic")


def _prepare(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any,
             overwrite: bool) -> tuple[nn.Module, tuple, Path, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {target.parent} does not exist")
    inputs = as_input_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = work(*inputs)
    return work, inputs, target, expected


def _write(target: Path, overwrite: bool, write: Callable[[str], None], check: Callable[[str], None]) -> Path:
    """Write to a temporary sibling, check it, then rename it over ``target`` (atomic on one file system)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        write(tmp)
        check(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        if target.exists() and not overwrite:  # appeared while we worked: still not ours to replace
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        os.replace(tmp, target)
    except BaseException:
        for leftover in (tmp, tmp + ".data"):  # ONNX may write external data beside the model
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def torchscript(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                overwrite: bool = False) -> Path:
    """Trace ``model`` with ``torch.jit.trace`` and save it; reload with ``torch.jit.load`` and check outputs.

    Tracing (not scripting) is used because fx-generated code carries annotations TorchScript cannot
    parse; a traced program is fixed to the control flow taken on ``example_inputs``, which for an fx graph
    is all there is.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.export.torchscript(fxcondensa.models.LeNet5(), "/tmp/lenet5.pt", x, overwrite=True)
        PosixPath('/tmp/lenet5.pt')
    """
    work, inputs, target, expected = _prepare(model, path, example_inputs, overwrite)

    def write(tmp: str) -> None:
        with _quiet_torchscript(), torch.no_grad():
            torch.jit.save(torch.jit.trace(work, inputs, check_trace=False), tmp)

    def check(tmp: str) -> None:
        with _quiet_torchscript(), torch.no_grad():
            loaded = torch.jit.load(tmp, map_location="cpu").eval()
            _check(expected, loaded(*[t.cpu() for t in inputs]), "TorchScript", target)

    return _write(target, overwrite, write, check)


def torch_export(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                 overwrite: bool = False) -> Path:
    """Export with ``torch.export.export`` and ``torch.export.save``; reload with ``torch.export.load``.

    The program is specialised to the example inputs' shapes (batch size included). Use a ``.pt2`` suffix.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.export.torch_export(fxcondensa.models.LeNet5(), "/tmp/lenet5.pt2", x, overwrite=True)
        PosixPath('/tmp/lenet5.pt2')
    """
    work, inputs, target, expected = _prepare(model, path, example_inputs, overwrite)

    def write(tmp: str) -> None:
        torch.export.save(torch.export.export(work, inputs), tmp)

    def check(tmp: str) -> None:
        with torch.no_grad():
            _check(expected, torch.export.load(tmp).module()(*inputs), "torch.export", target)

    return _write(target, overwrite, write, check)


def onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
         overwrite: bool = False) -> Path:
    """Export to ONNX with ``torch.onnx.export`` and check the file with onnxruntime (CPU).

    Needs the ``onnx`` extra: ``pip install 'fxcondensa[onnx]'`` (onnx, onnxruntime, onnxscript).

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.export.onnx(fxcondensa.models.LeNet5(), "/tmp/lenet5.onnx", x, overwrite=True)  # doctest: +SKIP
        PosixPath('/tmp/lenet5.onnx')
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: "
                          "pip install 'fxcondensa[onnx]'") from exc
    work, inputs, target, expected = _prepare(model, path, example_inputs, overwrite)

    def write(tmp: str) -> None:
        # The exporter reports its progress on stdout and warns about things we check ourselves.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # One self-contained file: external data would be named after the temporary file.
            torch.onnx.export(work, inputs, tmp, verbose=False, external_data=False)

    def check(tmp: str) -> None:
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=False)}
        got = [torch.from_numpy(o) for o in session.run(None, feeds)]
        _check(expected, got, "ONNX", target)

    return _write(target, overwrite, write, check)


FORMATS: dict[str, Callable[..., Path]] = {".pt": torchscript, ".pt2": torch_export, ".onnx": onnx}


def export(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
           overwrite: bool = False) -> Path:
    """Export in the format the file suffix names: ``.pt`` TorchScript, ``.pt2`` torch.export, ``.onnx`` ONNX.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.export.export(fxcondensa.models.LeNet5(), "/tmp/lenet5b.pt2", x, overwrite=True)
        PosixPath('/tmp/lenet5b.pt2')
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the export format of {path!s}: use a suffix among "
                         f"{', '.join(FORMATS)} (.pt TorchScript, .pt2 torch.export, .onnx ONNX)")
    return FORMATS[suffix](model, path, example_inputs, overwrite=overwrite)

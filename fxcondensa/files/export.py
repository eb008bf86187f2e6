"""Write a model to a file others can load (TorchScript, torch.export, ONNX), and prove the file works.

Every exporter follows the same steps: refuse to replace an existing file unless ``overwrite=True``; export an
eval-mode copy of the model (the caller's model is not touched) to a temporary file next to the target;
reload that file with its own loader and compare its outputs with the model's; only then rename it over the
target. A failure at any step leaves no file behind.

**Dynamic shapes.** By default (``dynamic=True``) a file takes any batch size, and integer token inputs
(2-D ``long``/``int`` tensors) any sequence length too: ``torch.export`` and ONNX get ``torch.export.Dim``
dimensions, TorchScript records the size arithmetic it traces. The reloaded file is checked at the example
inputs' sizes and at a second size (one more row; a different sequence length for token inputs). A model
that cannot be exported with a dynamic batch (its code fixes the batch size) is exported with static shapes
instead, with a ``StaticShapeWarning`` that names the reason. ``dynamic=False`` keeps the example's shapes.

**Devices.** The reference outputs are computed on the model's device with TF32 off (TF32 rounds float32
matmuls and convolutions to 10-bit mantissas, which alone can exceed the tolerance). The file is reloaded
on that device where its format allows (ONNX runs on onnxruntime's CPU provider); outputs are compared at
rtol 1e-4, atol 1e-5 on the CPU, and at rtol 1e-3, atol 1e-4 when a CUDA device computed either side
(other kernels, other summation orders). The reference runs ``nn.MultiheadAttention`` without its fused
eval-mode kernel, as the exported program does: the same math, without last-bit differences that a model
with int8 activations (``fxcondensa.compression.int8``, dynamic) would turn into different roundings.

TorchScript is deprecated upstream (PyTorch 2.x prints ``FutureWarning`` on every ``torch.jit`` call). It is
kept because many deployment stacks still load ``.pt`` files; its warnings are silenced inside this module
only (``warnings.catch_warnings``), never globally. Prefer ``torch_export`` for new work.

Example:
    >>> import torch, fxcondensa
    >>> model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    >>> path = fxcondensa.files.export.torch_export(model, "/tmp/lenet5_doc.pt2", x, overwrite=True)
    >>> torch.export.load(path).module()(torch.randn(4, 1, 28, 28)).shape  # another batch size
    torch.Size([4, 10])
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..capture.graph import as_input_tuple, flatten_outputs
from ..errors import FxCondensaError
from . import fileio
from .fileio import no_tf32, write_atomic

__all__ = ["torchscript", "torch_export", "onnx", "export", "ExportCheckError", "StaticShapeWarning", "FORMATS",
           "RTOL", "ATOL", "CUDA_RTOL", "CUDA_ATOL"]

RTOL, ATOL = 1e-4, 1e-5
CUDA_RTOL, CUDA_ATOL = 1e-3, 1e-4

Inputs = tuple[torch.Tensor, ...]
Spec = tuple[dict[int, Any] | None, ...]


class ExportCheckError(FxCondensaError, AssertionError):
    """The reloaded file computes something other than the model (the file is not written)."""


class StaticShapeWarning(UserWarning):
    """The model could not be exported with a dynamic batch; the file is fixed to the example's shapes."""


class _DynamicFailed(Exception):
    """The dynamic attempt failed for a reason a static export may not share (raised inside this module)."""


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """Silence TorchScript's deprecation and tracer warnings for the duration of one export, locally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


# -- shapes -----------------------------------------------------------------------------------------------
def _is_tokens(t: torch.Tensor) -> bool:
    """A 2-D integer tensor: token ids (batch x sequence), whose second dim varies in deployment too."""
    return t.dim() == 2 and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def dynamic_spec(inputs: Sequence[Any]) -> Spec:
    """``torch.export`` dynamic dims for ``inputs``: dim 0 is the batch, dim 1 of token inputs the sequence.

    Every input shares one batch dimension (a model's inputs are rows of the same samples).

    Example:
        >>> spec = dynamic_spec((torch.zeros(2, 3), torch.zeros(2, 7, dtype=torch.long), torch.tensor(1.0)))
        >>> [sorted(s) if s else s for s in spec]
        [[0], [0, 1], None]
    """
    batch, seq = Dim("batch", min=1), Dim("seq", min=1)
    return tuple(None if not isinstance(t, torch.Tensor) or t.dim() == 0
                 else {0: batch, 1: seq} if _is_tokens(t) else {0: batch} for t in inputs)


def _resized(t: torch.Tensor, dims: dict[int, Any] | None) -> torch.Tensor:
    """``t`` with one more row and, for token inputs, another sequence length, made of its own values
    (so that token ids stay valid ids)."""
    if not dims:
        return t
    t = torch.cat([t, t[:1]], 0)
    if 1 in dims:
        t = t[:, :-1] if t.shape[1] > 2 else torch.cat([t, t[:, :1]], 1)
    return t.contiguous()  # a strided slice would tie its stride to the old length in torch.export's guards


def _sizes(inputs: Inputs) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in inputs if isinstance(t, torch.Tensor))


# -- checking ---------------------------------------------------------------------------------------------
def _run(model: Callable[..., Any], inputs: Inputs) -> list[torch.Tensor]:
    with no_tf32(), torch.no_grad(), _no_mha_fastpath():
        return [t.detach() for t in flatten_outputs(model(*inputs))]


@contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """nn.MultiheadAttention without its fused eval-mode kernel for a while: an exported program never takes
    it (torch.export decomposes the module), and its last-bit differences, harmless in float, flip the
    rounding of activations that a dynamic int8 model quantizes after it (vit_b_16, dynamic int8: outputs 2%
    apart with the fused kernel, identical without it)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _check(want: list[torch.Tensor], got: Any, fmt: str, path: Path, inputs: Inputs) -> None:
    have = [torch.as_tensor(t) for t in flatten_outputs(got)] if not isinstance(got, list) else got
    if len(want) != len(have):
        raise ExportCheckError(f"{fmt} export to {path}: the reloaded file returns {len(have)} tensors, the model "
                               f"{len(want)} (inputs {_sizes(inputs)}); the file was not written")
    for i, (w, h) in enumerate(zip(want, have, strict=True)):
        cuda = w.device.type == "cuda" or h.device.type == "cuda"
        rtol, atol = (CUDA_RTOL, CUDA_ATOL) if cuda else (RTOL, ATOL)
        w = w.detach().cpu()
        h = h.detach().cpu().to(w.dtype) if h.shape == w.shape else h
        if h.shape != w.shape or not torch.allclose(h, w, rtol=rtol, atol=atol, equal_nan=True):
            detail = (f"shape {tuple(h.shape)} instead of {tuple(w.shape)}" if h.shape != w.shape
                      else f"max abs difference {(h - w).abs().max().item():.3g}")
            raise ExportCheckError(
                f"{fmt} export to {path}: output {i} of the reloaded file differs from the model's on inputs of "
                f"shape {_sizes(inputs)} ({detail}; rtol {rtol}, atol {atol}); the file was not written. Export in "
                "float32 and eval mode, and check that the model is deterministic")


# -- the common driver ------------------------------------------------------------------------------------
def _prepare(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any,
             overwrite: bool) -> tuple[nn.Module, Inputs, Path]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {target.parent} does not exist")
    if isinstance(example_inputs, dict) and example_inputs:  # keyword inputs (Hugging Face models)
        return _Keywords(copy.deepcopy(model).eval(), example_inputs), _input_values(example_inputs), target
    return copy.deepcopy(model).eval(), as_input_tuple(example_inputs), target


def _input_values(example_inputs: Any) -> Inputs:
    """The example inputs' values, positional or keyword."""
    if isinstance(example_inputs, dict) and example_inputs:
        return tuple(example_inputs.values())
    return as_input_tuple(example_inputs)


class _Keywords(nn.Module):
    """A model that takes keyword inputs, called positionally: the exported file takes the inputs in the order
    of the example dict (``{"input_ids": ..., "attention_mask": ...}`` -> ``f(input_ids, attention_mask)``) and
    returns the output's tensors as a tuple (a ``ModelOutput``'s fields in sorted order, as ONNX does anyway),
    which every format can hold."""

    def __init__(self, model: nn.Module, example_inputs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.keys = tuple(example_inputs)

    def forward(self, *args: Any) -> Any:
        return tuple(flatten_outputs(self.model(**dict(zip(self.keys, args, strict=True)))))


Writer = Callable[[str, nn.Module, Inputs, "Spec | None"], None]
Loader = Callable[[str], Callable[..., Any]]


def _export(fmt: str, model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, overwrite: bool,
            dynamic: bool, write: Writer, load: Loader) -> Path:
    """Write with ``write(tmp, model, inputs, spec)``, reload with ``load(tmp)``, check, then rename."""
    work, inputs, target = _prepare(model, path, example_inputs, overwrite)
    spec = dynamic_spec(inputs) if dynamic else None
    if spec is not None and not any(spec):
        spec = None  # only 0-d inputs: nothing can vary
    expected = _run(work, inputs)

    def attempt(tmp: str, dyn: Spec | None) -> None:
        if dyn is None:
            write(tmp, work, inputs, None)
            _check(expected, _run(load(tmp), inputs), fmt, target, inputs)
            return
        other = tuple(_resized(t, d) for t, d in zip(inputs, dyn, strict=True))
        # torch.export specialises a dim whose example size is 0 or 1: trace on sizes of at least 2.
        small = any(t.shape[d] < 2 for t, dims in zip(inputs, dyn, strict=True) if dims for d in dims)
        try:
            write(tmp, work, other if small else inputs, dyn)
            loaded = load(tmp)
        except Exception as exc:
            raise _DynamicFailed(_first_line(exc)) from exc
        try:
            _check(expected, _run(loaded, inputs), fmt, target, inputs)  # wrong at the example size: a real error
        except Exception as exc:
            if not small:
                raise
            # Written from inputs of another size, a file that fails the example's size kept that other size
            # (a TorchScript trace of a graph that reads sizes bakes them in): not dynamic.
            raise _DynamicFailed(f"the file keeps the size it was written at: {_first_line(exc)}") from exc
        try:
            _check(_run(work, other), _run(loaded, other), fmt, target, other)
        except Exception as exc:
            raise _DynamicFailed(f"the file does not compute the model at another size: {_first_line(exc)}") from exc

    def write_checked(tmp: str) -> None:
        reason = None
        if spec is not None:
            try:
                attempt(tmp, spec)
                return
            except _DynamicFailed as exc:
                reason = str(exc)
        attempt(tmp, None)
        if reason is not None:  # said once the static file is known to work
            _warn(f"{fmt} export to {target}: {type(model).__name__} could not be exported with a dynamic batch "
                  f"size ({reason}); the file is fixed to the example inputs' shapes ({_sizes(inputs)}). Pass "
                  "dynamic=False to ask for static shapes and silence this warning")

    write_atomic(target, write_checked, overwrite=overwrite)
    return target


def _warn(message: str) -> None:
    """A ``StaticShapeWarning`` attributed to the caller's line, whichever exporter it went through."""
    level, frame = 2, sys._getframe(1)  # level 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename in (__file__, fileio.__file__):  # ours, and the writer's
        level, frame = level + 1, frame.f_back
    warnings.warn(message, StaticShapeWarning, stacklevel=level)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _device(model: nn.Module, inputs: Inputs) -> torch.device:
    for t in [*inputs, *model.parameters(), *model.buffers()]:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


# -- the formats ------------------------------------------------------------------------------------------
def torchscript(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                overwrite: bool = False, dynamic: bool = True) -> Path:
    """Trace ``model`` with ``torch.jit.trace`` and save it; reload with ``torch.jit.load`` and check outputs.

    Tracing (not scripting) is used because fx-generated code carries annotations TorchScript cannot
    parse; a traced program is fixed to the control flow taken on ``example_inputs``, which for an fx graph
    is all there is. Sizes read with ``x.size(0)`` stay symbolic, so the file takes other batch sizes;
    ``dynamic=True`` checks that it does.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.files.export.torchscript(fxcondensa.models.LeNet5(), "/tmp/lenet5.pt", x, overwrite=True)
        PosixPath('/tmp/lenet5.pt')
    """
    def write(tmp: str, work: nn.Module, inputs: Inputs, spec: Spec | None) -> None:
        with _quiet_torchscript(), torch.no_grad(), no_tf32():
            torch.jit.save(torch.jit.trace(work, inputs, check_trace=False), tmp)

    def load(tmp: str) -> Callable[..., Any]:
        device = _device(model, _input_values(example_inputs))
        with _quiet_torchscript():
            loaded = torch.jit.load(tmp, map_location=device).eval()

        def run(*args: Any) -> Any:
            with _quiet_torchscript():
                return loaded(*args)
        return run

    return _export("TorchScript", model, path, example_inputs, overwrite, dynamic, write, load)


def torch_export(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                 overwrite: bool = False, dynamic: bool = True) -> Path:
    """Export with ``torch.export.export`` and ``torch.export.save``; reload with ``torch.export.load``.

    With ``dynamic=True`` the program takes any batch size (and sequence length for token inputs); with
    ``dynamic=False`` it is specialised to the example inputs' shapes. Use a ``.pt2`` suffix.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.files.export.torch_export(fxcondensa.models.LeNet5(), "/tmp/lenet5.pt2", x, overwrite=True)
        PosixPath('/tmp/lenet5.pt2')
    """
    def write(tmp: str, work: nn.Module, inputs: Inputs, spec: Spec | None) -> None:
        torch.export.save(torch.export.export(work, inputs, dynamic_shapes=spec), tmp)

    def load(tmp: str) -> Callable[..., Any]:
        return torch.export.load(tmp).module()

    return _export("torch.export", model, path, example_inputs, overwrite, dynamic, write, load)


def onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
         overwrite: bool = False, dynamic: bool = True) -> Path:
    """Export to ONNX with ``torch.onnx.export`` and check the file with onnxruntime (CPU).

    With ``dynamic=True`` the batch axis (and the sequence axis of token inputs) is symbolic in the file.
    Needs the ``onnx`` extra: ``pip install 'fxcondensa[onnx]'`` (onnx, onnxruntime, onnxscript).

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.files.export.onnx(fxcondensa.models.LeNet5(), "/tmp/lenet5.onnx", x, overwrite=True)  # doctest: +SKIP
        PosixPath('/tmp/lenet5.onnx')
    """
    try:  # imported here: onnxruntime takes a second to import, and only this exporter needs it
        import onnxruntime
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: "
                          "pip install 'fxcondensa[onnx]'") from exc

    def write(tmp: str, work: nn.Module, inputs: Inputs, spec: Spec | None) -> None:
        # The exporter reports its progress on stdout and warns about things we check ourselves.
        with warnings.catch_warnings(), no_tf32():
            warnings.simplefilter("ignore")
            # One self-contained file: external data would be named after the temporary file.
            torch.onnx.export(work, inputs, tmp, verbose=False, external_data=False, dynamic_shapes=spec)

    def load(tmp: str) -> Callable[..., Any]:
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])

        def run(*args: Any) -> list[torch.Tensor]:
            feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), args, strict=False)}
            return [torch.from_numpy(o) for o in session.run(None, feeds)]
        return run

    return _export("ONNX", model, path, example_inputs, overwrite, dynamic, write, load)


FORMATS: dict[str, Callable[..., Path]] = {".pt": torchscript, ".pt2": torch_export, ".onnx": onnx}


def export(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
           overwrite: bool = False, dynamic: bool = True) -> Path:
    """Export in the format the file suffix names: ``.pt`` TorchScript, ``.pt2`` torch.export, ``.onnx`` ONNX.

    Example:
        >>> import torch, fxcondensa
        >>> x = torch.randn(1, 1, 28, 28)
        >>> fxcondensa.files.export.export(fxcondensa.models.LeNet5(), "/tmp/lenet5b.pt2", x, overwrite=True)
        PosixPath('/tmp/lenet5b.pt2')
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the export format of {path!s}: use a suffix among "
                         f"{', '.join(FORMATS)} (.pt TorchScript, .pt2 torch.export, .onnx ONNX)")
    return FORMATS[suffix](model, path, example_inputs, overwrite=overwrite, dynamic=dynamic)

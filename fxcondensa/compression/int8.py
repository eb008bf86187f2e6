"""int8 quantization of a (thinned) model's Linear layers through torchao, the optional ``torchao`` extra.

Thinning removes channels; int8 then stores each remaining Linear weight in one byte per value instead of four.
``quantize_int8`` hands every Linear weight to torchao (``quantize_`` with ``Int8WeightOnlyConfig`` or
``Int8DynamicActivationInt8WeightConfig``, per-row symmetric scales) and leaves everything else as it was:

- ``mode="weight_only"``: int8 weights, dequantized inside the matmul; activations stay float. The outputs
  move by the rounding of the weights only (about 0.4% of a weight's row maximum per value).
- ``mode="dynamic"``: int8 weights and int8 activations, quantized per row at run time, multiplied in int32
  (``torch._int_mm``). Rounds the activations too: a larger error than weight-only.

**Convolutions stay float32** (a choice, stated): torchao's int8 configurations cover Linear layers, and
PyTorch has no int8 convolution on the CPU that a torch.export program could keep; a convolution network
(resnet50) gains int8 only in its classifier, while a transformer (ViT, BERT), nearly all Linear, shrinks
about 4x. Biases, norms and embeddings stay float32 as well.

Which layers: ``nn.Linear`` modules, and in a captured graph (what ``thin`` returns for a Hugging Face model:
no modules, only ``linear`` calls on parameters) every ``linear`` call whose weight is a parameter used by
linear calls only; a weight also read elsewhere (tied to an embedding, read by an attention function) is
left float, since torchao's int8 tensor supports little besides the matmul. Graph calls of
``torch.ops.aten.linear`` are rewritten to ``torch.nn.functional.linear`` (the same computation), which is
where torchao's tensor takes over.

The result computes through torchao's tensor subclass: ``weight.dtype`` still says float32 (the dtype it
computes in) while it stores int8; ``fxcondensa.passes.storage.storage_dtype`` and ``report`` show ``int8``.
Export it with ``fxcondensa.export.torch_export`` (``.pt2``): the program keeps the int8 values and
scales and is checked against the quantized model's own outputs (rtol 1e-4, atol 1e-5; the reference
runs ``nn.MultiheadAttention`` without its fused kernel, as the program does: with int8 activations,
last-bit float differences before a Linear layer flip roundings, and the eager fused kernel alone moved
vit_b_16's outputs by 2%); TorchScript and ONNX cannot hold torchao's tensors. ``save_thinned`` stores float values: save the thinned model before
quantizing and quantize again after ``load_thinned``.

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> x = torch.randn(1, 1, 28, 28)
    >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.5), x)
    >>> q = quantize_int8(small, mode="weight_only")
    >>> fxcondensa.passes.storage.storage_dtype(q.ip1.weight), fxcondensa.passes.storage.storage_dtype(q.conv1.weight)
    (torch.int8, torch.float32)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import FxCondensaError

__all__ = ["quantize_int8", "int8_candidates", "require_torchao", "MODES", "TorchaoMissingError"]

MODES = ("weight_only", "dynamic")
_LINEAR_CALLS = (torch.nn.functional.linear, torch.ops.aten.linear.default)


class TorchaoMissingError(FxCondensaError, ImportError):
    """int8 was asked for, and torchao (the ``torchao`` extra) is not installed."""


def _torchao() -> Any:
    try:
        import torchao.quantization as quantization
    except ImportError as exc:
        raise TorchaoMissingError(
            f"int8 quantization needs torchao, which cannot be imported here ({exc}); install it with "
            "pip install 'fxcondensa[torchao]' (or pip install torchao), or leave int8 out") from exc
    return quantization


def require_torchao() -> None:
    """Raise ``TorchaoMissingError`` (what to install) unless torchao imports: check before long work.

    Example:
        >>> require_torchao()
    """
    _torchao()


def _config(mode: str) -> Any:
    q = _torchao()
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings, a side
    # effect nobody asked for when quantizing one model.
    if mode == "weight_only":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _getattr_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _graph_candidates(gm: fx.GraphModule) -> tuple[list[str], dict[str, str]]:
    """Linear weights of a graph that only linear calls read, and why the other Linear weights are left."""
    uses: dict[str, list[bool]] = {}  # weight name -> for each use, whether it is a linear's weight
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
            uses.setdefault(f"{node.target}.weight" if node.target else "weight", []).append(True)
        elif node.op == "get_attr" and isinstance(_getattr_path(gm, str(node.target)), nn.Parameter):
            for user in node.users:
                linear = (user.op == "call_function" and user.target in _LINEAR_CALLS
                          and len(user.args) > 1 and user.args[1] is node)
                uses.setdefault(str(node.target), []).append(linear)
    chosen, left = [], {}
    for name, flags in uses.items():
        if not any(flags):
            continue
        if all(flags):
            chosen.append(name)
        else:
            left[name] = "also read by an op other than a linear call"
    return chosen, left


def int8_candidates(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The weights ``quantize_int8`` would quantize, and the Linear weights it leaves float with the reason.

    Example:
        >>> import fxcondensa
        >>> int8_candidates(fxcondensa.models.LeNet5())
        (['ip1.weight', 'ip2.weight'], {})
    """
    if isinstance(model, fx.GraphModule):
        chosen, left = _graph_candidates(model)
    else:
        chosen, left = [], {}
        for name, module in model.named_modules():
            if type(module) is not nn.Linear:  # subclasses (MultiheadAttention's out_proj) are read directly
                continue
            chosen.append(f"{name}.weight" if name else "weight")
    # A weight under two names (tied) or not float 2-D: torchao's per-row int8 does not apply.
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and (name in chosen or seen[id(p)] in chosen):
            for n in (name, seen[id(p)]):
                if n in chosen:
                    chosen.remove(n)
                    left[n] = f"shared with {seen[id(p)] if n == name else name}"
        seen.setdefault(id(p), name)
    for name in list(chosen):
        p = _getattr_path(model, name)
        if not isinstance(p, torch.Tensor) or p.ndim != 2 or not p.is_floating_point():
            chosen.remove(name)
            left[name] = "not a 2-D float weight"
        elif p.shape[1] < 2:  # torchao 0.18 fails to reshape the scales of a one-column weight
            chosen.remove(name)
            left[name] = "one input feature (torchao's per-row int8 cannot quantize a one-column weight)"
    return chosen, left


def quantize_int8(model: nn.Module, *, mode: str = "weight_only", exclude: Sequence[str] = (),
                  inplace: bool = False) -> nn.Module:
    """Store the Linear weights of ``model`` in int8 through torchao; convolutions and the rest stay float.

    ``mode`` is ``"weight_only"`` or ``"dynamic"`` (int8 activations too); ``exclude`` lists glob patterns of
    weight names to leave float (``["classifier.*"]``). The model is copied unless ``inplace=True``. Raises
    ``TorchaoMissingError`` when torchao cannot be imported. See the module's text for what is quantized.

    Example:
        >>> import fxcondensa
        >>> q = quantize_int8(fxcondensa.models.LeNet5(), mode="dynamic")
        >>> str(fxcondensa.passes.storage.storage_dtype(q.ip1.weight))
        'torch.int8'
    """
    if mode not in MODES:
        raise ValueError(f"quantize_int8(mode={mode!r}): mode must be one of {', '.join(map(repr, MODES))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        raise TypeError(f"quantize_int8(exclude={exclude!r}): pass a list of patterns, e.g. [{exclude!r}]")
    config = _config(mode)  # before copying: a missing torchao fails fast
    quantize_ = _torchao().quantize_
    target = model if inplace else copy.deepcopy(model)
    names, _ = int8_candidates(target)
    names = [n for n in names if not any(fnmatch(n, pat) for pat in exclude)]
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        owner = target.get_submodule(owner_path) if owner_path else target
        weight = getattr(owner, attr)
        # torchao quantizes modules: lend the weight to a bare Linear, then take the quantized weight back.
        carrier = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        carrier.weight = weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchao's notes on kernels it would pick on CUDA
            quantize_(carrier, config)
        setattr(owner, attr, carrier.weight)
    if isinstance(target, fx.GraphModule):
        chosen = set(names)
        for node in target.graph.nodes:
            # aten.linear dispatches below torchao's tensor (into aten.t, which it lacks); F.linear reaches it.
            if (node.op == "call_function" and node.target is torch.ops.aten.linear.default
                    and isinstance(node.args[1], fx.Node) and node.args[1].target in chosen):
                node.target = torch.nn.functional.linear
        target.recompile()
    return target

"""The compressed model without a compressed copy: masks kept as masks, applied on the fly.

``thin`` with a scheme that only records masks (the pruning schemes) captures the model sharing the user's
tensors (``capture.sharing``) and never writes to them. The compressed model is then that graph plus one
mask per pruned parameter (``set_masks``). Whatever reads the compressed values goes through here:

- the zero analysis reads ``masked_view(gm)``, a module tree whose masked parameters are computed
  (``weight * mask``) when a rule reads them, one at a time;
- the check runs ``MaskedInterpreter``: a masked weight is multiplied by its mask when the node that
  reads it runs, and the product is dropped after that node;
- slicing cuts the user's tensor and its mask the same way (``mask_sliced``) and multiplies the two small
  results, so a thinned tensor never passes through a dense masked copy; a tensor the pass left whole is
  copied (masked where it has a mask), so that the thinned model shares nothing with the user's.

The masks of the structured schemes are expanded views of one keep vector per tensor: they cost no memory.

Example:
    >>> import torch, fxcondensa
    >>> gm = fxcondensa.trace(torch.nn.Linear(3, 2, bias=False), torch.randn(1, 3))
    >>> set_masks(gm, {"weight": torch.tensor([[True], [False]]).expand(2, 3)})
    >>> MaskedInterpreter(gm).run(torch.ones(1, 3))[0, 1].item(), bool(gm.weight[1].abs().sum() > 0)
    (0.0, True)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.fx.node import map_aggregate

from .lean_reads import lean_call

__all__ = ["set_masks", "masks_of", "masked_view", "MaskedInterpreter", "mask_sliced"]

# Kept beside the graph, not in it: a deep copy of the graph (the thinned copy) must not inherit them.
_MASKS: weakref.WeakKeyDictionary[fx.GraphModule, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def set_masks(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> None:
    """Declare ``gm``'s compressed values to be its tensors times ``masks`` (qualified name -> bool mask of
    the tensor's shape). Tied tensors get the mask under each of their names."""
    by_id = {id(t): m for name, m in masks.items() if (t := _tensor(gm, name)) is not None}
    full = {name: by_id[id(t)] for name, t in _named_tensors(gm) if id(t) in by_id}
    if full:
        _MASKS[gm] = full
    else:
        _MASKS.pop(gm, None)


def masks_of(gm: Any) -> dict[str, torch.Tensor]:
    """The masks ``set_masks`` declared for ``gm`` (empty: its tensors are its compressed values)."""
    try:
        return _MASKS.get(gm, {})
    except TypeError:  # not weak-referenceable: no masks
        return {}


def _named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]


def _tensor(gm: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, attr = path.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` without its repeats: a dim it only repeats (stride 0: the structured schemes' masks are one
    keep vector expanded) becomes of size 1, and broadcasts back to the full shape."""
    if 0 not in mask.stride():
        return mask
    return mask[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in mask.stride())]


def _masked(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Multiplied in ``part``'s dtype by the compact mask: a bool multiplies as 0 or 1 in that dtype, so the
    # values are those of ``part * mask``, at the speed of a copy (an expanded bool mask costs four in bf16).
    return part * mask.to(device=part.device, dtype=part.dtype)


def _apply(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(t.detach(), _compact(mask))


class _MaskedParams(dict):
    """A module's ``_parameters`` whose masked entries are computed when read."""

    def __init__(self, params: dict[str, Any], masks: dict[str, torch.Tensor]):
        super().__init__(params)
        self.masks = masks

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        mask = self.masks.get(key)
        return value if mask is None or value is None else _apply(value, mask)


def masked_view(gm: fx.GraphModule) -> fx.GraphModule:
    """A read-only twin of ``gm`` (same graph, same tensors) whose masked parameters read as their masked
    values: what the zero analysis reads. ``gm`` itself when it has no masks."""
    masks = masks_of(gm)
    if not masks:
        return gm

    def twin(module: nn.Module, prefix: str) -> nn.Module:
        new = object.__new__(type(module))
        new.__dict__.update(module.__dict__)
        own = {k[len(prefix):]: m for k, m in masks.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        new.__dict__["_parameters"] = _MaskedParams(module._parameters, own) if own else module._parameters
        new.__dict__["_modules"] = {name: None if child is None else twin(child, f"{prefix}{name}.")
                                    for name, child in module._modules.items()}
        return new

    return twin(gm, "")  # type: ignore[return-value]


class MaskedInterpreter(fx.Interpreter):
    """Runs a graph on its masked values (``set_masks``) without materialising them: a masked tensor is
    multiplied by its mask as the node that reads it runs. Subclasses add to ``prepare`` (the precision
    re-check widens there too)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        masks = masks_of(gm)
        self._by_id = {id(t): masks[name] for name, t in _named_tensors(gm) if name in masks}

    def prepare(self, value: Any) -> Any:
        """A value as an op reads it: a masked tensor masked."""
        if not self._by_id:
            return value

        def one(v: Any) -> Any:
            mask = self._by_id.get(id(v)) if isinstance(v, torch.Tensor) else None
            return v if mask is None else _apply(v, mask)
        return map_aggregate(value, one)

    def cast(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor as an op reads it once masked (subclasses widen it)."""
        return value

    def read(self, t: torch.Tensor, index: Any) -> torch.Tensor:
        """Rows ``index`` of ``t`` as an op reads them: masked (its mask cut the same way), then ``cast``."""
        part = t.detach()[index]
        mask = self._by_id.get(id(t))
        if mask is not None:
            mask = _compact(mask)
            part = _masked(part, mask if mask.shape[0] == 1 else mask[index])
        return self.cast(part)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # A large linear or an embedding reads its weight a part at a time (lean_reads.py): no masked copy.
        out = lean_call(target, args, kwargs, self.read, self.prepare)
        if out is not NotImplemented:
            return out
        return super().call_function(target, self.prepare(args), self.prepare(kwargs))

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_method(target, self.prepare(args), self.prepare(kwargs))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        state = {k: self.prepare(v) for k, v in [*module.named_parameters(), *module.named_buffers()]}
        return functional_call(module, state, self.prepare(args), self.prepare(kwargs))

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self.prepare(super().output(target, args, kwargs))


def mask_sliced(gm: fx.GraphModule, thinned: fx.GraphModule, cut: Any) -> None:
    """Make ``thinned`` (a copy of ``gm`` whose tensors were cut from ``gm``'s by ``cut(name, tensor)``)
    hold the masked values and no tensor of ``gm``: a cut tensor is multiplied by its mask cut the same
    way; a tensor left whole is copied, masked where it has a mask."""
    masks = masks_of(gm)
    if not masks:
        return
    source = dict(_named_tensors(gm))
    done: dict[int, torch.Tensor] = {}
    for name, t in _named_tensors(thinned):
        if id(t) in done:
            new = done[id(t)]
        elif name in source and t is source[name]:  # left whole: still the user's tensor
            mask = masks.get(name)
            value = (_apply(t, mask) if mask is not None else t.detach().clone())
            new = done[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) \
                if isinstance(t, nn.Parameter) else value
        else:
            mask = masks.get(name)
            if mask is not None:
                small = cut(name, mask)
                if not bool(small.all()):
                    with torch.no_grad():
                        t.mul_(small.to(t.device))
            done[id(t)] = t
            continue
        owner, _, attr = name.rpartition(".")
        module = thinned.get_submodule(owner) if owner else thinned
        if isinstance(new, nn.Parameter):
            setattr(module, attr, new)
        else:
            module._buffers[attr] = new

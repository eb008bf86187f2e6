"""Thinning the user's own model in place, one tensor at a time: no second copy of the weights.

``thin(..., inplace=True)`` with a scheme that only records masks captures the model sharing its tensors
(``capture.sharing``). Cutting every tensor into a thinned copy first and releasing the dense ones at the end
would hold both at once. Here the work is split so that it never does:

1. ``remember_references``: the compressed model's outputs (in its dtype and in each wider dtype the check
   may re-run in) are computed first, masks applied on the fly, and kept (outputs only, a few small tensors);
2. ``deferred_cuts``: the thinning pass builds the thinned graph (analysis, sizes, rewrites, shapes) around
   shape-only stand-ins of the cut tensors (stride-0 views of one element: no memory); nothing is cut yet,
   so where the model's own class cannot follow, it is still untouched;
3. ``cut``: each tensor is cut from the user's, masked, and put in the thinned graph and in the user's model
   in its place; the dense one is then dropped from the user's model and from the capture (which keeps a
   meta tensor of its shape), so it is freed before the next one is cut. The peak is about the largest
   single tensor (an embedding, an output head) on top of the check's scratch.

A tensor the pass keeps whole stays the user's own object (multiplied by its mask in place where the mask
has zeros).

Example:
    >>> import torch, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> dense = model[0].weight
    >>> small = fxcondensa.thin(model, StructurePrune(0.5), torch.randn(2, 8), inplace=True)
    >>> small is model, model[0].weight.shape, model[0].weight is dense
    (True, torch.Size([8, 8]), False)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.modes import eval_mode
from .memo import remember
from .precision import compute_dtype, run_in, wider_dtypes
from .reference import mask_sliced, masks_of
from .slicing import DEFER_CUTS, SliceStep, _aliases, _cut, _cutter, _resolve, put_tensor
from .thin import _run

__all__ = ["mask_in_place", "remember_references", "deferred_cuts", "cut", "has_deferred", "return_free_memory"]


@dataclass
class _Deferred:
    source: fx.GraphModule  # the capture the cuts are taken from (its tensors are the user's)
    plan: list[SliceStep]  # as ``slicing._slice_plan`` made it (what ``_cutter`` reads)
    steps: dict[str, list[SliceStep]]  # canonical path -> its steps, in plan order


# Beside the thinned graph, not in it: its deep copies must not inherit a plan.
_PLANS: weakref.WeakKeyDictionary[fx.GraphModule, _Deferred] = weakref.WeakKeyDictionary()


def remember_references(compressed: fx.GraphModule, inputs: tuple[Any, ...]) -> bool:
    """Compute, inside ``memo.remembered()``, the compressed model's outputs that the thinning check compares
    with (its own dtype, then each wider dtype), under the keys the check reads. False where they cannot be
    computed (the caller then thins the usual way, whose check reports why)."""
    with eval_mode(compressed), torch.no_grad():
        try:
            remember((id(compressed), "outputs"), lambda: _run(compressed, inputs))
        except Exception:  # noqa: BLE001 - the check, run the usual way, names the error
            return False
        return_free_memory()  # each run's scratch, freed, is not left resident for the next
        for wider in wider_dtypes(compute_dtype(compressed, inputs)):
            remember((id(compressed), wider), lambda w=wider: run_in(compressed, inputs, w))
            return_free_memory()
    return True


def mask_in_place(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> None:
    """Multiply each of ``gm``'s tensors named in ``masks`` by its mask, in place (each tied tensor once): the
    capture shares the user's tensors, so the user's model becomes the compressed model, with no copy made."""
    done: set[int] = set()
    with torch.no_grad():
        for name, mask in masks.items():
            module, attr = _resolve(gm, name)
            t = getattr(module, attr)
            if id(t) not in done and not bool(mask.all()):
                _zero_masked(t, mask)
            done.add(id(t))


def _zero_masked(t: torch.Tensor, mask: torch.Tensor) -> None:
    """``t *= mask`` in place; a mask that varies along one dim only (a keep vector expanded) zeroes just the
    pruned rows or columns, without reading the rest."""
    compact = _compact(mask)
    varying = [d for d, size in enumerate(compact.shape) if size > 1]
    if len(varying) == 1:
        dim = varying[0]
        pruned = torch.nonzero(~compact.reshape(-1)).flatten().to(t.device)
        t.index_fill_(dim, pruned, 0)
    else:
        t.mul_(compact.to(device=t.device, dtype=t.dtype))


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with its broadcast dims (stride 0: a structured scheme's keep vector expanded) of size 1, so
    that converting it to the weight's dtype copies the vector, not a tensor of the weight's size."""
    sizes = [1 if stride == 0 else size for size, stride in zip(mask.shape, mask.stride(), strict=True)]
    return mask.as_strided(sizes, mask.stride())


def _stand_in(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tensor of ``shape`` with ``t``'s dtype and device that holds one element (every stride 0)."""
    value = torch.zeros((), dtype=t.dtype, device=t.device).expand(shape)
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


def _defer(gm: fx.GraphModule, thinned: fx.GraphModule, analysis: Any, plan: list[SliceStep]) -> None:
    """``slicing.apply_keep``'s cuts, deferred: shape-only stand-ins in ``thinned``, the plan kept for ``cut``."""
    if gm in _PLANS:
        raise RuntimeError("fxcondensa: a graph whose cuts are deferred was thinned again before they were made")
    # The check after ``cut`` reads the analysis of the dense capture, whose tensors are gone by then.
    remember((id(gm), "analysis"), lambda: analysis)
    steps: dict[str, list[SliceStep]] = {}
    for step in plan:
        steps.setdefault(step[0], []).append(step)
    aliases = _aliases(thinned)
    for path, todo in steps.items():
        module, attr = _resolve(thinned, path)
        t = getattr(module, attr)
        shape = t.detach().to("meta")
        for _path, dim, idx in todo:
            shape = _cut(shape, dim, idx)
        put_tensor(thinned, aliases.get(path, [path]), _stand_in(t, shape.shape))
    _PLANS[thinned] = _Deferred(gm, plan, steps)


@contextlib.contextmanager
def deferred_cuts() -> Iterator[None]:
    """Inside, the thinning pass leaves its cuts to ``cut`` (see the module text)."""
    token = DEFER_CUTS.set(_defer)
    try:
        yield
    finally:
        DEFER_CUTS.reset(token)


def has_deferred(thinned: fx.GraphModule) -> bool:
    """True while ``thinned`` holds stand-ins that ``cut`` has not replaced."""
    return thinned in _PLANS


_TRIM: list[Any] = []


def return_free_memory() -> None:
    """Hand the C allocator's free memory back to the system (glibc's ``malloc_trim``). Blocks freed by the
    work before and between the cuts (the reference runs' scratch, each dense tensor once cut) otherwise
    stay resident in the process, or not, depending on its allocation history (glibc raises its threshold for
    returning large blocks as they are freed, and each thread allocates from an arena of its own): the peak
    of an in-place thin varied from 0.14x to 0.96x the model's bytes from one process to the next without it.
    Nothing where the C library has no such call.

    Example:
        >>> return_free_memory()  # returns nothing; the process's resident memory may shrink
    """
    if not _TRIM:
        try:
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


def _holders(root: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id of each tensor of ``root`` -> every (module, attribute, is parameter) that holds it."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in root.modules():
        for attr, t in module._parameters.items():
            if t is not None:
                out.setdefault(id(t), []).append((module, attr, True))
        for attr, t in module._buffers.items():
            if t is not None:
                out.setdefault(id(t), []).append((module, attr, False))
    return out


def _replace(holders: dict[int, list[tuple[nn.Module, str, bool]]], old: int, new: torch.Tensor) -> None:
    """Every holder of the tensor whose id is ``old`` holds ``new`` instead."""
    for module, attr, is_param in holders.pop(old, []):
        if is_param:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new


def _numel(root: nn.Module, path: str) -> int:
    module, attr = _resolve(root, path)
    return getattr(module, attr).numel()


def _meta_twin(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype on the meta device (no data): what the capture keeps of a cut tensor."""
    twin = t.detach().to("meta")
    return nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin


def cut(model: nn.Module | None, thinned: fx.GraphModule, *, release: bool) -> None:
    """Replace ``thinned``'s stand-ins (``deferred_cuts``) by the real cut tensors, masked.

    ``release=True`` thins ``model`` (the user's, whose tensors the capture shares) in place as it goes: each
    cut tensor also replaces the dense one in ``model`` and in the capture (which keeps a meta tensor of the
    dense shape), so the dense one is freed before the next is cut; a tensor left whole stays the user's,
    masked in place. ``release=False`` leaves ``model`` and the capture as they were: the thinned graph gets
    tensors of its own (what ``apply_keep`` does without deferring)."""
    deferred = _PLANS.pop(thinned)
    if release:
        # What the capture left behind in reference cycles (torch.export's copies of the model's modules)
        # still holds the dense tensors: collected now, so that each is freed when its slice replaces it.
        gc.collect()
        return_free_memory()
    source = deferred.source
    aliases = _aliases(thinned)
    masks = masks_of(source)
    user = _holders(model) if release and model is not None else {}
    capture = _holders(source) if release else {}
    # Ids, not tensors: a table holding the dense tensors would keep them alive.
    by_name = {name: id(t) for name, t in [*model.named_parameters(remove_duplicate=False),
                                           *model.named_buffers(remove_duplicate=False)]} if user else {}
    dense = {name: id(t) for name, t in [*source.named_parameters(remove_duplicate=False),
                                         *source.named_buffers(remove_duplicate=False)]}
    whole = [(name, t) for name, t in [*thinned.named_parameters(), *thinned.named_buffers()]
             if dense.get(name) == id(t)]
    # Smallest first: by the time the largest (an embedding, an output head) is cut, the dense tensors freed
    # before it have made room for its slice.
    order = sorted(deferred.steps.items(), key=lambda kv: _numel(source, kv[0]))
    for path, todo in order:
        module, attr = _resolve(source, path)
        old = getattr(module, attr)
        new = old.detach()
        for _path, dim, idx in todo:
            new = _cut(new, dim, idx)
        mask = masks.get(path) if release else None  # without release, ``mask_sliced`` masks below
        if mask is not None:
            small = mask
            for _path, dim, idx in todo:
                small = _cut(small, dim, idx)
            if not bool(small.all()):
                new = new * small.to(new.device)
            del small
        new = new.contiguous()
        value = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        del new
        names = aliases.get(path, [path])
        put_tensor(thinned, names, value)
        if release:
            # Every holder of the dense tensor lets it go: the user's model (by the names the capture gives
            # it, and whatever ties it there), then the capture, which keeps its shape only.
            for name in names:
                if name in by_name:
                    _replace(user, by_name[name], value)
            _replace(user, id(old), value)
            _replace(capture, id(old), _meta_twin(old))
        del old, value
        if release:
            return_free_memory()
    if not release:
        mask_sliced(source, thinned, _cutter(source, deferred.plan))
        # Masks applied in place leave ``mask_sliced`` nothing to do: the tensors left whole are still the
        # user's, and the graph that comes back shares none of them.
        thinned_aliases = _aliases(thinned)
        for name, t in whole:
            module, attr = _resolve(thinned, name)
            if getattr(module, attr) is t:  # still the user's (``mask_sliced`` copies those it masks)
                copy = t.detach().clone()
                put_tensor(thinned, thinned_aliases.get(name, [name]),
                     nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy)
        return
    # Tensors left whole are the user's own: their masked values written in place.
    with torch.no_grad():
        for name, t in whole:
            mask = masks.get(name)
            if mask is not None and not bool(mask.all()):
                _zero_masked(t, mask)

"""The capture's copy of the user's model: structure copied, tensors copied or shared.

``trace`` works on a copy of the model so that the user's object is never touched. By default that copy
holds its own tensors (a scheme may then zero them in place). Inside ``shared_tensors()`` the copy shares
every parameter and buffer with the user's model instead: modules are new objects, tensors are not, so a
capture of an 8 GB model costs no second 8 GB. Whoever asks for that promises never to write to those
tensors; ``thin`` does so for schemes that only record masks (``passes/reference.py`` masks on the fly).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> with shared_tensors():
    ...     twin = copy_model(model)
    >>> twin is model, twin.weight is model.weight, copy_model(model).weight is model.weight
    (False, True, False)
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator

from torch import nn

__all__ = ["shared_tensors", "sharing", "copy_model", "adopt_tensors"]

_SHARED: contextvars.ContextVar[bool] = contextvars.ContextVar("fxcondensa_shared_tensors", default=False)


@contextlib.contextmanager
def shared_tensors() -> Iterator[None]:
    """Captures made inside share the user's parameters and buffers (see the module text)."""
    token = _SHARED.set(True)
    try:
        yield
    finally:
        _SHARED.reset(token)


def sharing() -> bool:
    """True inside ``shared_tensors()``."""
    return _SHARED.get()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``; inside ``shared_tensors()`` its tensors are the model's own objects."""
    if not sharing():
        return copy.deepcopy(model)
    memo = {id(t): t for _, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)]}
    return copy.deepcopy(model, memo)


def adopt_tensors(gm: nn.Module, source: nn.Module) -> None:
    """Make every parameter and buffer of ``gm`` the tensor object ``source`` holds under the same name (two
    captures of one model name their tensors alike): a second capture then computes what the first one,
    compressed in place, computes, without a copy. Names ``source`` lacks keep their tensor.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> adopt_tensors(a, b)
        >>> a.weight is b.weight, a.bias is b.bias
        (True, True)
    """
    theirs = dict([*source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)])
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        tensor = theirs.get(name)
        if tensor is None:
            continue
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor

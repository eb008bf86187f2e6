"""Reference outputs computed once per ``thin`` call: the compressed model's outputs on the example inputs, in
its own dtype and in each wider dtype the check re-runs in.

``thin`` may check two candidates against the same compressed model (the user's class, then the graph when
the first does not pass); running the compressed reference again for the second costs a forward pass of the
whole model per dtype. Inside ``remembered()`` the first computation of each is kept (the outputs only, a few
small tensors) and the second reads it; outside, nothing is kept.

Example:
    >>> calls = []
    >>> with remembered():
    ...     a = remember("key", lambda: calls.append(1) or 2)
    ...     b = remember("key", lambda: calls.append(1) or 3)
    >>> a, b, len(calls), remember("key", lambda: 4)
    (2, 2, 1, 4)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator
from typing import Any

__all__ = ["remembered", "remember"]

_MEMO: contextvars.ContextVar[dict[Hashable, Any] | None] = contextvars.ContextVar("fxcondensa_memo", default=None)


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Inside, ``remember`` keeps what it computes (see the module text)."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def remember(key: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, or what it returned for ``key`` earlier inside the same ``remembered()``."""
    memo = _MEMO.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]

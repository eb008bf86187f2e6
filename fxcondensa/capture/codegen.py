"""Generated ``forward`` code that looks each submodule container up once per call instead of once per node.

torch.fx writes a ``call_module`` node as its full path from ``self``:
``getattr(getattr(getattr(self.features, "2").conv, "0"), "0")(x)``. Every step is ``nn.Module.__getattr__``,
a Python function (1.4 us each on the 2-core machine of BENCHMARKS.md), so a thinned MobileNetV2 paid 1,019
of them per forward where Torch-Pruning's eager model of the same MACs pays 385, and ran 1.03x its latency at
batch 1 and 224x224 (1.09-1.11x at 32x32 and 64x64, where the convolutions cost little). With this transformer:
578 calls, 0.99x. Deeper names (Hugging Face models) pay more. A thinned model should not be slower than the
layers it runs.

``hoist_module_paths`` is a body transformer (``torch.fx.Graph.on_generate_code``) that binds every container
on a ``call_module`` / ``get_attr`` path to a local once, at the top of ``forward``, and rewrites each
node's expression to start from its parent's local::

    _fxc_m0 = self.features
    _fxc_m1 = getattr(_fxc_m0, "2")
    ...
    features_2_conv_0_0 = getattr(_fxc_m3, "0")(features_1_conv_2)

The lookups still happen on every call, through ``getattr`` as before, so a submodule replaced after the
model was built (``gm.features[2] = ...``, or a quantization pass writing ``_modules``) is the one that runs.
A line the transformer does not recognise (another torch version's format, another transformer's output)
is left as torch.fx wrote it: slower, never different.

Example:
    >>> import torch, fxcondensa
    >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    >>> "self.conv1(" in gm.code  # conv1 sits at the top level: nothing to hoist
    True
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable

import torch.fx as fx

__all__ = ["hoist_module_paths", "LOCAL_PREFIX"]

LOCAL_PREFIX = "_fxc_m"
_COUNTER = re.compile(r"^# COUNTER: (\d+)\n$")  # torch.fx's per-node marker in the body it hands transformers


def _attr(base: str, name: str) -> str:
    """``base.name`` where ``name`` is an identifier, else ``getattr(base, "name")`` (torch.fx's spelling)."""
    return f"{base}.{name}" if name.isidentifier() and not keyword.iskeyword(name) else f'getattr({base}, "{name}")'


def _fx_path(target: str, root: str = "self") -> str:
    r = root
    for part in target.split("."):
        r = f'getattr({r}, "{part}")' if not part.isidentifier() else f"{r}.{part}"
    return r


def hoist_module_paths(graph: fx.Graph) -> Callable[[list[str]], list[str]]:
    """A body transformer for ``graph``: containers on the paths of its ``call_module`` and ``get_attr`` nodes
    become locals bound once at the top of ``forward`` (see the module docstring).

    ``graph.on_generate_code(lambda prev: ...)`` installs it; ``RecordedGraphModule.recompile`` does so for
    every module ``trace``, ``compress`` and ``thin`` return.
    """
    nodes = list(graph.nodes)
    taken = {n.name for n in nodes}
    locals_: dict[str, str] = {}  # container path -> local name
    prologue: list[str] = []

    def local(path: str) -> str:
        if path not in locals_:
            parent, _, name = path.rpartition(".")
            base = local(parent) if parent else "self"
            i = len(locals_)
            while f"{LOCAL_PREFIX}{i}" in taken:
                i += 1
            var = f"{LOCAL_PREFIX}{i}"
            taken.add(var)
            prologue.append(f"{var} = {_attr(base, name)}\n")
            locals_[path] = var
        return locals_[path]

    rewrites: dict[int, tuple[str, str]] = {}  # node index -> (torch.fx's expression, ours)
    for i, node in enumerate(nodes):
        if node.op not in ("call_module", "get_attr") or not isinstance(node.target, str) or "." not in node.target:
            continue
        parent, _, name = node.target.rpartition(".")
        rewrites[i] = (_fx_path(node.target), _attr(local(parent), name))

    def transform(body: list[str]) -> list[str]:
        out, current, done = [], None, 0
        for fragment in body:
            m = _COUNTER.match(fragment)
            if m is not None:
                current = int(m.group(1))
            elif current in rewrites:
                old, new = rewrites[current]
                # The node's own statement: "name[: type] = <path>(args)" or "name[: type] = <path>"
                head, sep, tail = fragment.partition(" = ")
                if sep and (tail.startswith(old + "(") or tail == old):
                    fragment = f"{head} = {new}{tail[len(old):]}"
                    current, done = None, done + 1
            out.append(fragment)
        return prologue + out if done else body  # nothing recognised: torch.fx's code as it was

    return transform

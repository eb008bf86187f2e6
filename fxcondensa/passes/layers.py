"""The weight layers (Linear, convolutions) of a captured graph, whichever way the capture recorded them.

torch.fx keeps ``nn.Linear`` and ``nn.Conv2d`` as module calls; torch.export records the same layers as
``aten.linear`` / ``aten.conv2d`` calls on parameters whose owners are plain containers. Schemes that pick
layers by type (``Prune``, ``Quantize``, ``BlockPrune``) and the density figures must see both, so a layer is
found here by the registry entry of the op that uses it (its ``kind``), never by a module's class name.

Example:
    >>> import torch, fxcondensa
    >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5())
    >>> list(weight_layers(gm, ("linear",)))
    ['ip1', 'ip2']
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from ..rules.registry import rule_for

__all__ = ["weight_layers", "LAYER_KINDS"]

#: The registry kinds of weight layers: what unstructured schemes prune by default.
LAYER_KINDS = ("linear", "conv", "conv_transpose")


def _functional_owner(node: fx.Node) -> str | None:
    """The owner of a functional layer's weight, when that weight is a module's ``weight`` parameter."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(w.target, str) and w.target.endswith(".weight"):
        return w.target[: -len(".weight")]
    return None


def weight_layers(gm: fx.GraphModule, kinds: Iterable[str] = LAYER_KINDS) -> dict[str, nn.Module]:
    """Called weight layers of the given registry kinds, by qualified name, in graph order.

    A module call counts when its class's entry has one of ``kinds``; a functional or ATen call
    (``F.linear(x, self.fc.weight)``, ``aten.conv2d``) counts when its weight is a module's ``weight``
    parameter, and is named by that module. Modules marked ``condensa_nocompress`` (Condensa's opt-out
    attribute) are skipped.
    """
    kinds = set(kinds)
    found: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            name, mod = node.target, gm.get_submodule(node.target)
            rule = rule_for(node, mod)
        elif node.op == "call_function":
            rule = rule_for(node)
            name = _functional_owner(node) if rule is not None and rule.kind in kinds else None
            if name is None:
                continue
            mod = gm.get_submodule(name)
        else:
            continue
        if (rule is not None and rule.kind in kinds and name not in found
                and not hasattr(mod, "condensa_nocompress")
                and isinstance(getattr(mod, "weight", None), nn.Parameter)):
            found[name] = mod
    return found

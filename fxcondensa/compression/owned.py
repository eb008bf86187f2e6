"""The compressed model as the user's own class: a copy of the model whose tensors are the compressed graph's.

``compress`` and ``Compressor.run`` work on a captured graph (the schemes annotate its nodes). Compression
changes values only (zeros, rounding to storage dtypes), never shapes or code, so the user's class can
always hold the result: a deep copy of the model that **shares** the graph's tensors (no second copy of the
weights), with the annotated graph kept beside it (``capture.records.compressed_graph``), where
``footprint``, ``save_compressed``, ``report`` and ``thin`` find the masks and storage dtypes. The copy
keeps every method the class has (``generate``, ``forward_features``, ``save_pretrained``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import nn as fxnn
from ..capture.records import graph_record, set_compressed_graph, work_copy

__all__ = ["OUTPUTS", "check_output", "own_compressed", "own_blocker"]

OUTPUTS = ("auto", "module", "graph")


def check_output(where: str, output: Any) -> str:
    """``output`` when it is one of ``OUTPUTS``, else a ValueError naming ``where`` it was passed."""
    if output not in OUTPUTS:
        raise ValueError(f"{where}: output must be one of {OUTPUTS}, got {output!r}")
    return output


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def own_blocker(model: nn.Module, gm: fx.GraphModule) -> str | None:
    """Why ``model``'s class cannot hold ``gm``'s tensors (one line), or None when it can."""
    if isinstance(model, fx.GraphModule):
        return "the model is a GraphModule: the compressed graph is its own class"
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fxnn.mask_experts:
            # Removed experts are at -inf after the router, which the class's own forward does not compute
            # (a zero router row would still be routed to); thin removes them, and its result is the class.
            return (f"experts {list(node.args[1])} of the router at node '{node.args[0].name}' are removed: "
                    f"their router logits are -inf in the compressed graph, which {type(model).__name__}'s "
                    "forward does not compute")
    mine = _tensors(model)
    for name, t in _tensors(gm).items():
        if name not in mine:
            return f"the captured graph holds '{name}', which {type(model).__name__} has no tensor for"
        if mine[name].shape != t.shape:
            return (f"'{name}' is {tuple(t.shape)} in the captured graph but {tuple(mine[name].shape)} in "
                    f"{type(model).__name__}")
    return None


def own_compressed(model: nn.Module, gm: fx.GraphModule, *, output: str, where: str = "compress") -> nn.Module:
    """``gm`` as ``model``'s class (``output`` "auto" or "module"), or ``gm`` itself ("graph", or "auto" where
    the class cannot hold it: the reason is in ``graph_record(gm).reason``). "module" raises ValueError with
    the reason instead. The result shares ``gm``'s tensors: training one trains the other."""
    record = graph_record(gm)
    if output == "graph":
        return gm
    reason = own_blocker(model, gm)
    if reason is not None:
        if output == "module":
            raise ValueError(f"{where}(output='module'): {type(model).__name__} cannot hold the compressed model: "
                             f"{reason}. Use output='auto' or 'graph' for the compressed GraphModule")
        record.returns, record.reason = "graph", reason
        return gm
    new = _tensors(gm)
    memo: dict[int, Any] = {}
    for name, t in _tensors(model).items():
        if name in new:
            memo[id(t)] = new[name]
    with work_copy():  # what was beside the model (an earlier compress) is replaced below
        result = copy.deepcopy(model, memo)
    _follow_device(result, new)  # train/eval flags: the model's own, copied module by module
    record.returns, record.reason = "module", ""
    set_compressed_graph(result, gm)
    return result


def _follow_device(result: nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Tensors the graph does not use (unused modules) were copied where the model lives: move them to where
    the graph's tensors live, so the copy sits on one device."""
    device = next((t.device for t in shared.values()), None)
    if device is None:
        return
    ids = {id(t) for t in shared.values()}
    for module in result.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) not in ids and p.device != device:
                module._parameters[key] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for key, b in list(module._buffers.items()):
            if b is not None and id(b) not in ids and b.device != device:
                module._buffers[key] = b.to(device)

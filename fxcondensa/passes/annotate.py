"""Parameter annotations in node metadata, and the pass that applies them.

A scheme writes, for each parameter it compresses, a ``ParamAnnotation`` (a keep-mask and/or a storage
dtype) into ``node_record(node).params[attr]`` of the node that owns the parameter: the
``call_module`` node of its module, or the ``get_attr`` node that reads it. ``apply_annotations`` then
makes the weights agree with the annotations (zeros where masked, values rounded to the dtype). Applying
twice changes nothing, so schemes compose by annotating and applying in turn.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..capture.records import META, ParamAnnotation, compressed_graph, node_record
from ..functional import round_trip

__all__ = ["META", "ParamAnnotation", "param_owners", "annotations", "annotate_param", "apply_annotations"]

def param_owners(gm: fx.GraphModule) -> dict[str, tuple[fx.Node, str]]:
    """Qualified parameter name -> (node that owns it, attribute path relative to that node's target).

    Parameters of modules the forward never calls have no node and are left out: they cannot change
    the model's outputs.
    """
    owners: dict[str, tuple[fx.Node, str]] = {}
    params = dict(gm.named_parameters())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for attr, _ in module.named_parameters(recurse=True):
                owners.setdefault(f"{node.target}.{attr}" if node.target else attr, (node, attr))
        elif node.op == "get_attr" and node.target in params:
            owners.setdefault(node.target, (node, ""))
    return owners


def annotations(gm: nn.Module) -> dict[str, ParamAnnotation]:
    """Every annotated parameter of ``gm`` by qualified name, in graph order (``gm`` a compressed graph, or a
    compressed model of the user's class: the graph kept beside it; empty for any other module)."""
    found: dict[str, ParamAnnotation] = {}
    graph = compressed_graph(gm)
    for node in (graph.graph.nodes if graph is not None else ()):
        rec = node_record(node, create=False)
        for attr, ann in (rec.params.items() if rec is not None else ()):
            name = f"{node.target}.{attr}" if attr else node.target
            found.setdefault(name, ann)
    return found


def annotate_param(
    gm: fx.GraphModule,
    name: str,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    owners: dict[str, tuple[fx.Node, str]] | None = None,
) -> None:
    """Record a mask and/or dtype for parameter ``name``, merged with what earlier schemes recorded."""
    owners = param_owners(gm) if owners is None else owners
    if name not in owners:
        raise KeyError(f"parameter '{name}' is not used by any node of the graph")
    node, attr = owners[name]
    store = node_record(node).params
    if mask is not None:
        param = gm.get_parameter(name)
        if mask.shape != param.shape or mask.dtype is not torch.bool:
            raise ValueError(f"mask for '{name}' must be bool of shape {tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    store[attr] = store.get(attr, ParamAnnotation()).merged(mask, dtype)


@torch.no_grad()
def apply_annotations(gm: fx.GraphModule) -> fx.GraphModule:
    """Zero masked entries and round values to their storage dtype, in place; returns ``gm``."""
    for name, ann in annotations(gm).items():
        param = gm.get_parameter(name)
        if ann.mask is not None:
            # A mask made on another device moves once; one made next to its weight is used as it is.
            mask = ann.mask if ann.mask.device == param.device else ann.mask.to(param.device)
            param.mul_(mask)
        if ann.dtype is not None and ann.dtype != param.dtype:
            param.copy_(round_trip(param, ann.dtype))
    return gm

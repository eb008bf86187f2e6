"""``thin``: compress a copy of the model with a scheme, then remove the pruned channels and check the result.

The verb does what a user asks for in one call (capture, compress, thin, check); the graph work is the
thinning pass's (``fxcondensa.passes.thin``), which knows nothing of schemes.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import nn as fxnn
from ..capture.exported import capture_notes, capture_of, example_shapes, graph_inputs, split_inputs
from ..capture.graph import trace
from ..capture.records import compressed_graph, graph_record, set_thin_record, thin_record
from ..capture.repeated import faithful, repeated_once
from ..capture.sharing import adopt_tensors, shared_tensors
from ..errors import ThinningCheckError
from ..passes.analysis import analyze
from ..passes.annotate import annotations
from ..passes.inplace import (
    cut,
    deferred_cuts,
    has_deferred,
    mask_in_place,
    remember_references,
    return_free_memory,
)
from ..passes.memo import remember, remembered
from ..passes.own import (
    blocking_edits,
    blocking_reason,
    check_own,
    graph_edits,
    install,
    own_model,
    suspect_edits,
)
from ..passes.own_graphs import swap_blocking, swapped_note
from ..passes.reference import masks_of, set_masks
from ..passes.thin import _check, thin_graph
from ..schemes import check_scheme
from .parts import thin_modules

__all__ = ["thin", "OUTPUTS"]

OUTPUTS = ("auto", "module", "graph")


def _example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The example inputs as the model takes them (tensor, tuple, or dict of keyword inputs)."""
    if example_inputs is not None:
        split_inputs(example_inputs)  # a bad container fails here, with the message saying what to pass
        return example_inputs
    # A compressed model of the user's class keeps its graph beside it; a torch.fx capture's placeholders are
    # the model's own positional inputs (a torch.export capture's are flat leaves: no use here).
    graph = compressed_graph(model)
    if graph is not None and (graph is model or capture_of(graph) == "fx"):
        metas = [n.meta.get("tensor_meta") for n in graph.graph.nodes if n.op == "placeholder"]
        if metas and all(m is not None and hasattr(m, "shape") for m in metas):
            # Made where the model lives: a CUDA model gets CUDA inputs.
            device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
            return tuple(torch.randn(m.shape, dtype=m.dtype, device=device) if m.dtype.is_floating_point
                         else torch.zeros(m.shape, dtype=m.dtype, device=device) for m in metas)
    raise ValueError("thin needs example inputs to learn the tensor shapes, e.g. "
                     "thin(model, scheme, example_inputs=torch.randn(1, 3, 224, 224))")



def thin(
    model: nn.Module,
    scheme: Any = None,
    example_inputs: Any = None,
    *,
    check: bool = True,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
    output: str = "auto",
    inplace: bool = False,
    modules: Sequence[str] | str | None = None,
) -> nn.Module:
    """Return a smaller model with pruned channels physically removed: the user's own class, or a ``GraphModule``.

    With a ``scheme`` (e.g. ``StructurePrune(0.5)``) the model is compressed first; without one, the
    channels that are already zero across their whole group are removed (e.g. the output of L-C with a
    structured scheme; ``compress``'s result, of the user's class, thins by its zeros with ``example_inputs``
    taken from the graph kept beside it). The model is never modified (unless ``inplace=True``). ``check=True`` compares the
    thinned model with the compressed dense one on ``example_inputs`` in eval mode: in the model's dtype with
    that dtype's tolerance (float32 rtol 1e-4, atol 1e-5; bfloat16 and float16 looser, see
    ``fxcondensa.passes.precision``), and, where rounding may explain a difference, again in float32 and
    float64 at rtol 1e-4 (a bfloat16 or float16 model compares in float32 first); it passes when one of
    these agrees, else raises ``ThinningCheckError`` naming the first node that differs.
    ``strict=True`` raises ``UnknownOpError`` at the first op the channel analysis has no rule for
    (``RuleFailedError`` where an op's rule fails on a call), instead of keeping its channels whole (see
    ``fxcondensa.register_rule``). ``leaf_modules``, ``concrete_args`` and ``capture`` are passed to ``trace``:
    a model torch.fx cannot trace symbolically is captured with ``torch.export`` (``capture="auto"``), and
    ``example_inputs`` may be a dict of keyword inputs (``{"input_ids": ids, "attention_mask": mask}``);
    the thinned module takes the inputs the model takes.

    ``output`` says what comes back. ``"auto"`` (the default): the user's class where it can follow and
    passes the check, else the graph, with the reason in the record. ``"module"``: a copy of ``model``, of
    its own class, with its modules resized (sliced weights, size attributes such as ``out_features`` or
    ``num_heads``, a Hugging Face ``config``, width-preserving norms swapped in): its methods (``generate``, ``forward_features``,
    ``save_pretrained``) and its own forward stay, and that forward is what the check runs. Where thinning
    needs a graph rewrite that module attributes cannot express (a literal size in the model's code),
    ``"module"`` raises ``ValueError`` naming the module and the literal. ``"graph"``: the thinned
    ``GraphModule`` (what the capture recorded; a torch.export capture takes other batch sizes and lengths,
    what it could not generalise is in the record's ``input_constraints``).
    ``modules`` (a list of submodule names, or ``"auto"``) thins only those parts of a model whose end cannot
    be captured (a detector's post-processing): each is captured on the inputs it receives, thinned and put
    back as a graph in a copy of the model, and the whole is checked (``fxcondensa.compression.parts``).
    ``inplace=True`` (with ``"auto"`` or ``"module"``) makes ``model`` itself the thinned model when its
    class comes back, instead of a copy: the input is then changed. With a pruning scheme its weights are
    zeroed where pruned and then cut one at a time, each dense tensor freed before the next is cut
    (``fxcondensa.passes.inplace``); when a graph comes back nothing is cut and ``model`` is left compressed
    (pruned weights zero, same shapes); a check that fails after the cut raises ``ThinningCheckError``.

    What was removed, which channel groups were frozen and why, the recipe, and what came back (``returns``,
    ``reason``) are in ``fxcondensa.capture.records.thin_record(thinned)`` (a ``ThinRecord``).

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(1, 1, 28, 28))
        >>> small.conv1.out_channels < 20 and small.ip1.out_features < 500, type(small).__name__
        (True, 'LeNet5')
    """
    if output not in OUTPUTS:
        raise ValueError(f"thin: output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"thin: inplace must be True or False, got {inplace!r}")
    if inplace and output == "graph" and modules is None:
        raise ValueError("thin: inplace=True thins the model object itself, which output='graph' does "
                         "not return; pass output='auto' or 'module', or drop inplace")
    if scheme is not None:
        check_scheme(scheme)
    if modules is not None:  # parts of the model, each thinned on its own (compression/parts.py)
        parts = thin_modules(model, scheme, example_inputs, modules, check=check, strict=strict,
                             leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture, inplace=inplace)
        if parts is not None:
            return parts
    example = _example_inputs(model, example_inputs)
    # A scheme that only records masks compresses nothing in place: the capture shares the model's tensors
    # and the masks stay aside (passes/reference.py), so no second dense copy of the weights is made.
    lean = getattr(scheme, "masks_only", False) is True
    # The user's class takes any shape whatever the capture fixed: a torch.export capture with the example's
    # shapes costs a fraction of one with dynamic dims, which is made only when the graph comes back.
    static = output != "graph" and not isinstance(model, fx.GraphModule)
    # A stack of identical blocks (decoder layers) is traced two blocks deep and copied (capture/repeated.py):
    # only where the user's class is checked against that graph; where the check fails, it is captured whole.
    once = static and check and not inplace and not _WHOLE.get()
    with (shared_tensors() if lean else contextlib.nullcontext(),
          example_shapes() if static else contextlib.nullcontext(),
          repeated_once() if once else contextlib.nullcontext()):
        compressed = trace(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    try:
        return _thin_rest(model, scheme, example, compressed, lean=lean, static=static, check=check, strict=strict,
                          leaf_modules=leaf_modules, concrete_args=concrete_args, output=output, inplace=inplace)
    except _Recapture:
        token = _WHOLE.set(True)
        try:
            return thin(model, scheme, example_inputs, check=check, strict=strict, leaf_modules=leaf_modules,
                        concrete_args=concrete_args, capture=capture, output=output, inplace=inplace)
        finally:
            _WHOLE.reset(token)


class _Recapture(Exception):
    """The user's class did not pass its check against a graph whose repeated blocks were copied. (Where the
    class cannot follow for another reason, the graph that comes back is captured again in full and checked.)"""


# Set while thin runs again on a whole capture after a copied one failed its check.
_WHOLE: contextvars.ContextVar[bool] = contextvars.ContextVar("fxcondensa_whole_capture", default=False)


def _thin_rest(model: nn.Module, scheme: Any, example: Any, compressed: fx.GraphModule, *, lean: bool, static: bool,
               check: bool, strict: bool, leaf_modules: Sequence[type[nn.Module]],
               concrete_args: dict[str, Any] | None, output: str, inplace: bool) -> nn.Module:
    """``thin`` after the capture: the scheme, the thinning pass, the user's class or the graph, the check."""
    static = static and capture_of(compressed) == "export"
    inputs = graph_inputs(compressed, example)  # the placeholder values, in graph order
    if strict:  # fail before spending time on the scheme
        analyze(compressed, strict=True)
    own = output != "graph"
    deferred = False
    if lean:
        with torch.no_grad():
            scheme.annotate(compressed)
        if inplace:  # the scores' scratch, freed, leaves the process before the reference runs
            return_free_memory()
        masks = {k: a.mask for k, a in annotations(compressed).items() if a.mask is not None}
        # In place, the user's tensors are cut one at a time after the graph work and the reference run, each
        # dense one freed as its slice replaces it (passes/inplace.py). Their masks are applied to them in
        # place first, so that nothing reads a masked copy: the model is its compressed self from here on.
        deferred = (inplace and own and not isinstance(model, fx.GraphModule)
                    and graph_record(compressed).head_dim_columns is not True and not _removes_experts(compressed))
        if deferred:
            mask_in_place(compressed, masks)
        else:
            set_masks(compressed, masks)
        del masks
    elif scheme is not None:
        with torch.no_grad():
            scheme.pi(compressed)
            scheme.delta(compressed)
    # A scheme that prunes head_dim columns says so on the graph record (as it annotates); without a scheme the
    # pass decides.
    columns = graph_record(compressed).head_dim_columns if scheme is not None else None
    if own:
        with remembered():  # the own class and then the graph are checked against one reference run
            deferred = deferred and (not check or remember_references(compressed, inputs))
            with deferred_cuts() if deferred else contextlib.nullcontext():
                thinned = thin_graph(compressed, inputs, check=False, strict=strict, columns=columns)
            result = _own(model, compressed, thinned, inputs, example=example, check=check, output=output, inplace=inplace,
                          check_graph=not static)
        if result is not None:
            return result
        if static:
            thinned = _dynamic_graph(model, example, compressed, thinned, check=check, strict=strict,
                                     columns=columns, leaf_modules=leaf_modules, concrete_args=concrete_args)
    else:
        thinned = thin_graph(compressed, inputs, check=check, strict=strict, columns=columns)
    for note in capture_notes(compressed):
        warnings.warn(f"thin: {type(model).__name__} was {note}", stacklevel=2)
    return thinned


def _removes_experts(compressed: fx.GraphModule) -> bool:
    """A scheme removed whole experts: their cuts (``passes/experts.py``) read the tensors, so none is deferred."""
    return any(n.op == "call_function" and n.target is fxnn.mask_experts for n in compressed.graph.nodes)


def _dynamic_graph(model: nn.Module, example: Any, compressed: fx.GraphModule, static: fx.GraphModule, *,
                   check: bool, strict: bool, columns: bool | None, leaf_modules: Sequence[type[nn.Module]],
                   concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    """The graph that comes back, captured again with dynamic batch and sequence dims (the first capture fixed
    the example's shapes for the user's class), holding the compressed values of the first (its tensors and
    masks, shared, not copied), thinned and checked; its record says why the user's class did not come back."""
    with shared_tensors():  # the user's tensors, then the compressed capture's in their place
        dynamic = trace(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args, capture="export")
    adopt_tensors(dynamic, compressed)
    set_masks(dynamic, dict(masks_of(compressed)))
    first, record = graph_record(compressed), graph_record(dynamic)
    record.target, record.head_dim_columns = first.target, first.head_dim_columns
    thinned = thin_graph(dynamic, graph_inputs(dynamic, example), check=check, strict=strict, columns=columns)
    thin_record(thinned).reason = thin_record(static).reason
    return thinned


def _own(model: nn.Module, compressed: fx.GraphModule, thinned: fx.GraphModule, inputs: tuple[Any, ...], *, example: Any,
         check: bool, output: str, inplace: bool, check_graph: bool = True) -> nn.Module | None:
    """The user's class thinned, checked; None (the graph is returned, checked) with the reason recorded."""
    record = thin_record(thinned)
    deferred = has_deferred(thinned)  # its cuts are ours to make (passes/inplace.py)
    swapped: list[tuple[str, str]] = []
    if isinstance(model, fx.GraphModule):
        reason = "the model is a GraphModule: its thinned graph is its own class"
    else:
        edits = graph_edits(model, compressed, thinned)
        reason = blocking_reason(model, edits)
        # "auto" may give the user's class back with the modules that block run as their thinned graphs. Not
        # after in-place cuts were deferred: those graphs would read tensors not cut yet.
        hybrid = reason is not None and output == "auto" and capture_of(compressed) == "fx" and not deferred
        if reason is None or hybrid:
            if deferred:  # the own class can follow: the user's model is cut now, tensor by tensor
                cut(model, thinned, release=True)
            result = own_model(model, compressed, thinned, edits)
            if hybrid:
                got = swap_blocking(result, model, compressed, thinned, blocking_edits(edits))
                swapped, reason = (got, None) if isinstance(got, list) else ([], f"{reason}; {got}")
            if reason is None:
                reason = check_own(compressed, result, record.keep, inputs) if check else None
                if reason is not None and graph_record(compressed).repeated and not faithful(
                        compressed, model, *split_inputs(example)):
                    # The class's own forward disagrees with a graph whose blocks were copied: capture it whole.
                    raise _Recapture(reason)
            if reason is not None and output == "auto" and capture_of(compressed) == "fx" and (swapped or not hybrid):
                # The forward computes an edited size otherwise: its modules run as their graphs, checked again.
                more = swap_blocking(result, model, compressed, thinned, suspect_edits(edits))
                if isinstance(more, list) and more and check_own(compressed, result, record.keep, inputs) is None:
                    swapped, reason = swapped + more, None
            if reason is not None and not (hybrid and not swapped):
                suspects = [f"node '{e.node}' in '{e.owner or type(model).__name__}': {e.before} -> {e.after}"
                            for e in edits if not e.form][:3]
                if suspects:
                    reason += "; edits it may compute otherwise: " + "; ".join(suspects)
                if deferred:
                    install(model, result)  # its tensors are cut already: its sizes follow them
                    raise ThinningCheckError(
                        f"thin(inplace=True): {reason}. {type(model).__name__} was thinned in place before the "
                        "check (its weights are sliced to the kept channels and its sizes follow them), so it "
                        "is changed but does not compute the compressed model's outputs: do not use it. Load "
                        "the model again and call thin without inplace=True (output='auto' then returns the "
                        "checked thinned GraphModule and leaves your model as it was)")
    if reason is None:
        record.returns, record.reason = "module", swapped_note(model, swapped) if swapped else ""
        record.input_constraints = []  # the capture's shapes: the user's forward takes any
        record.input_names = [n.target.lstrip("*") for n in compressed.graph.nodes if n.op == "placeholder"]
        if inplace:
            install(model, result)
            result = model
        set_thin_record(result, record)
        return result
    if output == "module":
        state = (f" (inplace=True: {type(model).__name__} is now the compressed model, its pruned weights zeroed "
                 "in place and none cut)") if deferred else ""
        raise ValueError(f"thin(output='module'): {type(model).__name__} cannot come back as its own class: {reason}"
                         f"{state}. Use output='auto' or 'graph' for the thinned GraphModule, or keep these "
                         "channels (exclude the layers involved from the scheme)")
    record.reason = reason
    if deferred and check_graph:  # nothing was cut: the graph gets tensors of its own, the user's model stays
        cut(model, thinned, release=False)
    if check and check_graph:
        analysis = remember((id(compressed), "analysis"), lambda: analyze(compressed))
        _check(compressed, thinned, analysis, record.keep[:analysis.num_channels], inputs)
    return None

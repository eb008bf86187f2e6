"""Network thinning: physically remove pruned channels and emit a smaller ``GraphModule``.

A channel can go when it is exactly zero wherever it enters a layer that sums over channels (see
``rules/api.py``). Removing it slices every parameter and buffer that carries it, updates the module
attributes that describe those sizes, rewrites literal sizes in ``view`` / ``reshape`` / ``split`` calls,
and recompiles. By construction the thinned model computes the same outputs as the compressed dense one;
``check=True`` verifies that on the example inputs and names the first node where they part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.exported import capture_notes, capture_of, graph_inputs, split_inputs
from ..capture.graph import propagate_shapes, trace
from ..capture.modes import eval_mode
from ..capture.records import META, FrozenGroup, GroupRecord, ThinRecord, graph_record
from ..errors import ExampleInputError, ThinningCheckError
from ..rules.api import ChanInfo, ChannelAnalysis
from ..rules.heads import has_attention_products, head_channels, head_dim_channels
from .analysis import analyze, balance_grouped, removable_channels
from .experts import remove_experts, thin_experts
from .memo import remember
from .precision import WidenedInterpreter, compute_dtype, run_in, tolerance, wider_dtypes
from .reference import MaskedInterpreter, masks_of
from .slicing import _kept, apply_keep

__all__ = ["thin_graph", "rethin", "rethin_pair", "apply_keep", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5


def _outputs_close(a: Any, b: Any, rtol: float = RTOL, atol: float = ATOL) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _outputs_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_close(a[k], b[k], rtol, atol) for k in a)
    return a == b


def _run(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Call ``gm`` on its placeholder values. A graph captured by torch.export takes the model's own
    (possibly keyword, nested) inputs; the interpreter feeds its placeholders directly."""
    if masks_of(gm):  # the compressed values are the tensors times masks kept aside: masked as read
        return MaskedInterpreter(gm).run(*inputs)
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        return fx.Interpreter(gm).run(*inputs)
    return gm(*inputs)


class _Recorder(WidenedInterpreter):
    """Runs a graph in float64 (see ``precision.run_in``) and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, torch.float64)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _first_divergence(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis,
                      keep: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> str:
    ref, new = _Recorder(compressed), _Recorder(thinned)
    ref.run(*inputs)
    new.run(*inputs)
    for node in compressed.graph.nodes:
        a, b = ref.values.get(node.name), new.values.get(node.name)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        info = analysis.infos.get(node.name)
        if isinstance(info, ChanInfo):
            a = a.index_select(info.dim, _kept(analysis, keep, info.atoms).to(a.device))
        if a.shape != b.shape:
            return f"node '{node.name}' ({node.op} {node.target}): shape {tuple(b.shape)}, expected {tuple(a.shape)}"
        if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            return (f"node '{node.name}' ({node.op} {node.target}): max abs difference "
                    f"{float((a - b).abs().max()):.3g}")
    return "the graph outputs"


def _check(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
           inputs: tuple[torch.Tensor, ...], *, locate: bool = True) -> None:
    """Compare the thinned graph with the compressed one on ``inputs``: in the model's own dtype with the
    tolerance of that dtype, and again in wider dtypes (``precision``) with float32's; it passes when one
    of these comparisons does. ``locate=False``: a failure names the outputs, not the first node that differs
    (finding it runs both models again keeping every node's value).

    The order saves forward passes, never changes the verdict (any one comparison that agrees passes, and
    each runs the same whatever ran before it). A float32 model compares in float32 first. A bfloat16 or
    float16 one compares in float32 first and in its own dtype last: reordered sums at a language model's
    width exceed that dtype's tolerance almost always, and the compressed model's run in its own dtype is
    the dearest of all (dense, masked on the fly, in a dtype the CPU computes slowly), so it is made only
    when the wider ones did not settle the check. The thinned model still runs in its own dtype first:
    that run records its shapes and shows it computes in its dtype."""
    def reference() -> Any:
        try:
            # The same reference for every candidate checked in one ``thin`` (passes/memo.py).
            return remember((id(compressed), "outputs"), lambda: _run(compressed, inputs))
        except Exception as exc:  # shapes passed on fake tensors, but real arithmetic refuses the inputs
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs if isinstance(t, torch.Tensor))
            raise ExampleInputError(
                f"the example inputs ({shapes}) do not run through {type(compressed).__name__}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Pass inputs of the shape, dtype and "
                "device the model expects.") from exc

    with eval_mode(compressed, thinned), torch.no_grad():
        dtype = compute_dtype(compressed, inputs)
        wider = wider_dtypes(dtype)
        narrow = torch.float32 in wider  # bfloat16, float16: their own comparison goes last
        if not narrow:
            expected = reference()
        # The thinned model runs through shape propagation: one real run both gives the outputs to
        # compare and records its shapes, which ``apply_keep(..., shapes=False)`` left to it.
        try:
            got = propagate_shapes(thinned, inputs)
        except Exception:
            if narrow:
                reference()  # inputs the compressed model refuses too: that is the error to report
            raise
        if not narrow:
            if _outputs_close(expected, got, *tolerance(dtype)):
                return
            del expected, got
        # Removing zero channels changes the order of sums; in a deep net with large activations (or in
        # bfloat16 at any width) that rounding alone can exceed the tolerance. The same comparison in a
        # wider dtype tells rounding (it vanishes) from a wrong model (it does not).
        failed: Exception | None = None
        for w in wider:
            try:
                widened = remember((id(compressed), w), lambda w=w: run_in(compressed, inputs, w))
                if _outputs_close(widened, run_in(thinned, inputs, w)):
                    return
            except Exception as exc:
                if not narrow:
                    raise
                failed = exc  # the own dtype's comparison may still pass, as it did when it ran first
                break
        if narrow:
            if _outputs_close(reference(), got, *tolerance(dtype)):
                return
            if failed is not None:
                raise failed
        where = _first_divergence(compressed, thinned, analysis, keep, inputs) if locate else "the graph outputs"
        rtol, atol = tolerance(dtype)
        tried = " and ".join(f"{str(d).removeprefix('torch.')}" for d in wider_dtypes(dtype))
        raise ThinningCheckError(
            f"the thinned model differs from the compressed model beyond rtol={rtol}, atol={atol} in "
            f"{str(dtype).removeprefix('torch.')}"
            + (f" and beyond rtol={RTOL}, atol={ATOL} in {tried}" if tried else "")
            + f", first at {where}. This is a bug in fxcondensa's channel analysis: please report it with "
            "the model; meanwhile make the module involved a leaf (thin(..., leaf_modules=[...])) to freeze it.")


def thin_graph(compressed: fx.GraphModule, inputs: tuple[Any, ...], *, check: bool = True,
               strict: bool = False, columns: bool | None = None) -> fx.GraphModule:
    """The thinning pass: remove the channels of ``compressed`` that are zero across their whole group.

    ``compressed`` is a captured, shape-annotated graph whose weights already hold the compressed values
    (``fxcondensa.thin`` captures and compresses, then calls this); ``inputs`` are its placeholder values in
    graph order. ``columns`` says whether the head_dim column stage runs: True where a scheme asked for
    columns, False where it did not, None (nobody said) where heads or attention products are found.
    ``check=True`` runs both graphs on ``inputs`` and raises ``ThinningCheckError`` at the first node that
    differs. The result carries its ``ThinRecord`` (``fxcondensa.capture.records.thin_record``).

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.capture.exported import graph_inputs
        >>> x = torch.randn(1, 1, 28, 28)
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), x)
        >>> with torch.no_grad():
        ...     gm.conv1.weight[:5] = 0
        ...     gm.conv1.bias[:5] = 0
        >>> thin_graph(gm, graph_inputs(gm, x)).conv1.out_channels
        15
    """
    analysis = analyze(compressed, strict=strict)
    keep = balance_grouped(analysis, ~removable_channels(compressed, analysis))
    # The check runs the thinned model for real and records its shapes then (see ``_check``); the head_dim
    # stage analyses the thinned graph before that, so it needs them from ``apply_keep``.
    # A scheme that prunes columns gets the stage whatever the first analysis found: a multi-query attention's
    # one key/value head freezes its heads there, and its columns still go here. Where nobody said (weights
    # from anywhere) it runs where heads were found or attention products are (multi-query again).
    head_dim_stage = columns if columns is not None else (bool(head_channels(compressed, analysis).any())
                                                          or has_attention_products(compressed))
    thinned = apply_keep(compressed, analysis, keep, inputs, shapes=not check or head_dim_stage)
    column_analysis = None
    if head_dim_stage:
        thinned, column_analysis, column_keep = _thin_head_dim(thinned, inputs)
    # Whole experts a scheme put at -inf go last: their router rows and expert slices are no channels.
    experts = thin_experts(thinned, inputs)
    if check:
        _check(compressed, thinned, analysis, keep, inputs)
    groups = [GroupRecord(g.name, tuple(g.producers), int(g.channels.numel()), int(keep[g.channels].sum()),
                          "; ".join(g.frozen)) for g in analysis.groups]
    frozen = analysis.frozen_report()
    recipe = keep.clone()
    if column_analysis is not None and (column_keep is not None or columns is not None):
        # Shown when columns went or the scheme asked for them: a frozen head_dim says why it stayed whole.
        found = head_dim_channels(column_analysis)
        column_groups = [g for g in column_analysis.groups if bool(found[g.channels].any())]
        kept = column_keep if column_keep is not None else torch.ones(column_analysis.num_channels, dtype=torch.bool)
        groups += [GroupRecord(f"{g.name} (head_dim)", tuple(g.producers), int(g.channels.numel()),
                               int(kept[g.channels].sum()), "; ".join(g.frozen)) for g in column_groups]
        frozen += [FrozenGroup(f"{g.name} (head_dim)", tuple(g.layers) or tuple(g.producers), "; ".join(g.frozen))
                   for g in column_groups if g.frozen]
        if column_keep is not None:
            recipe = torch.cat([recipe, column_keep])
    thinned.meta[META] = ThinRecord(
        # The recipe: which channels stayed (by channel id of the analysis, which is deterministic for an
        # architecture and input shapes), then, when head_dim columns went, which channels of the second
        # stage's analysis stayed. ``rethin`` rebuilds the same thinned graph from it.
        keep=recipe,
        input_shapes=[list(t.shape) if isinstance(t, torch.Tensor) else [] for t in inputs],
        input_dtypes=[str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__
                      for t in inputs],
        groups=groups,
        frozen=frozen,
        target=graph_record(compressed).target,  # e.g. the FLOP target a scheme searched for, and what it reached
        rule_failures=len(analysis.rule_failures),
        capture=capture_of(compressed),
        notes=capture_notes(compressed),
        input_constraints=list(graph_record(compressed).input_constraints),
        experts=experts,
    )
    return thinned


def _thin_head_dim(gm: fx.GraphModule, inputs: tuple[Any, ...]
                   ) -> tuple[fx.GraphModule, ChannelAnalysis, torch.Tensor | None]:
    """The second stage of ``thin``: head_dim columns (column ``j`` of every head of one attention) that are
    zero wherever they are read go, each attention keeping its dense softmax scale. A channel is either a
    head or a head_dim column in one analysis, so heads went in the first stage and columns go here, on its
    result; nothing else changes. Returns the graph, the column analysis and its keep (None: nothing went)."""
    analysis = analyze(gm, head_dim=True)
    removable = removable_channels(gm, analysis) & head_dim_channels(analysis)
    if not bool(removable.any()):
        return gm, analysis, None
    keep = balance_grouped(analysis, ~removable)
    return apply_keep(gm, analysis, keep, inputs), analysis, keep


def rethin(model: nn.Module, keep: torch.Tensor, example_inputs: Any, *,
           leaf_modules: Sequence[type[nn.Module]] = (), concrete_args: dict[str, Any] | None = None,
           capture: str = "auto") -> fx.GraphModule:
    """Rebuild the thinned architecture of ``model`` from a recipe (``thin_record(thinned).keep``).

    The values are those of ``model`` sliced; load the thinned weights afterwards. Raises ``ValueError``
    when the recipe does not fit the architecture.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> x = torch.randn(1, 1, 28, 28)
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), x)
        >>> from fxcondensa.capture.records import thin_record
        >>> again = rethin(fxcondensa.models.LeNet5(), thin_record(small).keep, x)
        >>> again.conv1.weight.shape == small.conv1.weight.shape
        True
    """
    return rethin_pair(model, keep, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       capture=capture)[1]


def rethin_pair(model: nn.Module, keep: torch.Tensor, example_inputs: Any, *,
                leaf_modules: Sequence[type[nn.Module]] = (), concrete_args: dict[str, Any] | None = None,
                capture: str = "auto", experts: dict[str, list[int]] | None = None
                ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``rethin``, also returning the dense capture it sliced (what ``passes/own.py`` compares with).
    ``experts`` (``thin_record(thinned).experts``) replays a removal of whole experts."""
    split_inputs(example_inputs)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture)
    inputs = graph_inputs(gm, example_inputs)
    analysis = analyze(gm)
    n = analysis.num_channels
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() < n:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"the thinning recipe does not fit {type(model).__name__}: it needs a bool tensor of "
                         f"{n} channels, got {got}")
    thinned = apply_keep(gm, analysis, balance_grouped(analysis, keep[:n]), inputs)
    if keep.numel() == n:
        if experts:
            remove_experts(thinned, experts, inputs)
        return gm, thinned
    columns = analyze(thinned, head_dim=True)  # the rest: which head_dim columns stayed (see ``thin``)
    if keep.numel() != n + columns.num_channels:
        raise ValueError(f"the thinning recipe does not fit {type(model).__name__}: it needs a bool tensor of "
                         f"{n} channels, or {n + columns.num_channels} with head_dim columns, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    thinned = apply_keep(thinned, columns, balance_grouped(columns, keep[n:]), inputs)
    if experts:
        remove_experts(thinned, experts, inputs)
    return gm, thinned

"""Structured schemes: ``NeuronPrune``, ``FilterPrune`` and ``StructurePrune`` act on channel groups.

A channel's score aggregates every producer row that creates it (all the convs summed into one residual
stream, the squeeze-excitation conv multiplied into it, ...). The kept channels are chosen with one global
threshold over the scores (Condensa's rule) or per layer; the masks then zero, for each pruned channel,
the producers' rows, their biases and the per-channel parameters of the norm layers in the group, so that
the channel is exactly zero everywhere and ``thin`` can remove it without changing any output.

Example:
    >>> import torch, torchvision, fxcondensa
    >>> from fxcondensa.schemes import StructurePrune
    >>> w = fxcondensa.compress(torchvision.models.resnet18(), StructurePrune(0.5), torch.randn(1, 3, 64, 64))
    >>> fxcondensa.thin(w, example_inputs=torch.randn(1, 3, 64, 64)).fc.in_features < 512
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import nn as fxnn
from ..capture.records import graph_record
from ..passes.analysis import analyze
from ..passes.annotate import annotate_param, param_owners
from ..rules.api import ChanInfo, ChannelAnalysis, host
from ..rules.heads import head_channels, head_dim_channels
from .base import Scheme, _LayerSelection, _match, validate_density
from .calibration import CALIBRATED_CRITERIA, Calibration, calibrated_scores, measure
from .latency_model import validate_target_latency
from .scores import channel_scores, check_criteria, row_norms
from .selection import Channels, Target, select, select_channels

__all__ = ["NeuronPrune", "FilterPrune", "StructurePrune", "select_channels", "ATTENTION_CHOICES"]

ATTENTION_CHOICES = (None, "heads", "head_dim", "both", "keep")



class _ChannelPrune(Scheme, _LayerSelection):
    """Shared machinery; subclasses choose which producers define the channels they may prune.

    Arguments are Condensa's (``density``, ``align``, ``criteria``, ``prune_bias``) plus ``layers`` /
    ``exclude`` (per-layer densities, layers left alone), ``target_flops`` (a MAC budget instead of a
    density) and ``normalize``. One global threshold ranks all candidate channels. With ``normalize=True``
    (the default) each layer's scores are divided by their mean first: raw filter norms of different
    layers are not comparable (initialisation scales differ, and BatchNorm makes the scale of the conv
    before it arbitrary), and ranking them raw sends whole layers down to one channel, which is slow and
    inaccurate. ``normalize=False`` ranks raw scores, exactly Condensa's rule.

    Without ``align``, the kept count of every group at least 64 channels wide (and not given a density of
    its own) goes to its nearest multiple of 8, the total kept count staying within 4 channels of the
    density's (``schemes.threshold``): CPU and GPU kernels pad channel counts to such multiples, so 33
    channels run like 40. Ties go to rounding down memory-bound groups (activation elements per MAC).
    ``align=N`` instead rounds every group up to a multiple of N; ``align="auto"`` starts from the rounded
    counts and rounds up to the multiple a measured latency model predicts fastest.

    ``criteria`` defaults to ``"bn_or_l2norm"``: a channel whose group has a trained BatchNorm is scored by
    its BatchNorm scales (network slimming), every other channel by its producer rows (Condensa's
    ``"l2norm"``), so networks without BatchNorm (LeNet-5, transformers) are ranked exactly as by
    ``"l2norm"``. ``"l2norm"`` alone, ``"bn_scale"`` (any norm's scales), ``"group_l2"`` (every tensor
    carrying the channel: producer rows, biases, norm affines, consumer columns) and the row criteria
    (``"sum"``, ``"mean"``, ``"max"``, ``"min"``) remain available. Measured on a ResNet-20 trained on
    Fashion-MNIST, pruned to half its MACs and fine-tuned identically, and on the LeNet-5 demo
    (``bench/quality.py --criteria``, BENCHMARKS.md).

    ``attention`` says what happens to attention heads (q/k/v projections reshaped into heads, and
    ``nn.MultiheadAttention``): ``None`` (the default) prunes whole heads like any other channel where the
    analysis finds them, ``"heads"`` does the same but raises ``ValueError`` when the model has none, and
    ``"keep"`` keeps every head. A head is scored over everything it owns: its query, key and value rows
    and its out-projection columns. ``"head_dim"`` keeps every head and prunes columns inside them instead:
    column ``j`` of every head of one attention goes together (q's and k's columns pair in ``q @ k^T``, v's
    with the out-projection's), a ``density`` fraction of the columns stays, and the softmax keeps the dense
    scale ``1 / sqrt(head_dim)``. ``"both"`` prunes heads and columns, each attention keeping
    ``sqrt(density)`` of its heads (at least two, or two key/value heads, where it has them: a single head
    left of a fused ``qkv`` reshape could not lose columns in ``thin``) and of their columns (about ``density`` of its width). A column
    is scored over all its rows and columns, in every head. Where the model's pattern does not allow it
    (rotary embeddings that mix columns, a scale computed from the width at run time) head_dim stays whole
    and the thinning record says why. Both take a ``density`` or a ``target_flops``: the MAC search picks columns,
    heads and every other channel at one global density, and its MAC model counts the kept columns in the
    q/k/v projections' rows, in ``q @ k^T`` and ``attn @ v`` and in the out-projection's input columns.
    ``target_latency`` is refused with them (the latency model has no timings of head_dim widths): give
    ``target_flops``, or ``attention=None`` for a latency target.

    ``uniform=True`` keeps the same share of every channel group (each layer's MLP channels, heads and
    key/value groups), so that equal layers keep equal counts and a stock config describes the result
    (``thin`` then returns a Hugging Face model whose ``save_pretrained`` loads with ``from_pretrained``).
    A residual stream normalised by LayerNorm stays whole, with the heads (a stock LayerNorm over fewer
    channels is another function, and those configs derive the head width from the hidden size); an
    RMSNorm stream is cut (the norms fold the dense width into their weight and epsilon). It takes a density.

    Example:
        >>> StructurePrune(0.5, attention="head_dim")
        StructurePrune(density=0.5, align=None, criteria='bn_or_l2norm', prune_bias=True, layers={}, exclude=[], target_flops=None, target_latency=None, normalize=True, attention='head_dim', calibration=None, uniform=False)
        >>> StructurePrune(target_flops=0.5, attention="both").target_flops
        0.5
    """

    _producer_kinds: tuple[str, ...] = ()  # which producers' channels this scheme may prune
    masks_only = True  # annotate records masks and nothing else (thin then keeps them aside: no copy)

    def __init__(self, density: float | None = None, align: int | None = None, criteria: Any = "bn_or_l2norm",
                 prune_bias: bool = True, layers: Mapping[str, float] | None = None,
                 exclude: Sequence[str] | str | None = None, *, target_flops: float | None = None,
                 target_latency: float | None = None,
                 normalize: bool = True, attention: str | None = None, calibration: Any = None,
                 uniform: bool = False):
        if sum(v is not None for v in (density, target_flops, target_latency)) != 1:
            raise ValueError(f"give exactly one of density (fraction of channels kept), target_flops (fraction "
                             f"of the dense MACs kept) and target_latency (fraction of the dense latency), got "
                             f"density={density!r}, target_flops={target_flops!r}, target_latency={target_latency!r}")
        self.target_latency = (validate_target_latency(target_latency) if target_latency is not None else None)
        self.density = validate_density(density) if density is not None else None
        self.target_flops = validate_density(target_flops, "target_flops") if target_flops is not None else None
        if align is not None and align != "auto" and (isinstance(align, bool) or not isinstance(align, int)
                                                       or align < 1):
            raise ValueError(f"align must be a positive int (e.g. 8), 'auto' (the counts the device runs fastest, "
                             f"from a measured latency model) or None, got {align!r}")
        self.align = align
        self.calibration = None if calibration is None else Calibration(calibration)
        if self.calibration is not None and criteria == "bn_or_l2norm":
            criteria = "activation"  # the default criterion, given calibration batches, ranks by them
        if criteria in CALIBRATED_CRITERIA:
            if self.calibration is None:
                raise ValueError(f"criteria={criteria!r} scores channels on calibration batches: pass "
                                 "calibration= a DataLoader, a list of input tensors (or tuples of positional "
                                 "inputs) or a list of keyword-input dicts, e.g. "
                                 f"{type(self).__name__}(0.5, criteria={criteria!r}, calibration=[x1, x2])")
        else:
            check_criteria(criteria)
            if self.calibration is not None:
                raise ValueError(f"calibration is read only by criteria {list(CALIBRATED_CRITERIA)}; "
                                 f"criteria={criteria!r} ranks by weights alone. Drop calibration, or use "
                                 "criteria='activation' (the default with calibration) or 'taylor'")
        self.criteria = criteria
        if not isinstance(prune_bias, bool):
            raise TypeError(f"prune_bias must be True or False, got {prune_bias!r}")
        self.prune_bias = prune_bias
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES} (None: prune whole heads where "
                             f"found, 'heads': the same but the model must have attention, 'head_dim': keep "
                             f"every head and prune columns inside them, 'both': heads and columns, 'keep': "
                             f"keep every head), got {attention!r}")
        if attention in ("head_dim", "both") and target_latency is not None:
            # The latency model times the layers of the channel analysis at thinned widths; head_dim columns
            # live in a second analysis whose widths (inside q @ k^T, attn @ v) it has no tables for.
            raise ValueError(f"attention={attention!r} cannot take target_latency={target_latency!r}: the latency "
                             f"search does not see head_dim columns. Give target_flops={target_latency!r} (a MAC "
                             f"budget, which counts them) or a density instead, or attention=None to prune whole "
                             f"heads for a latency target")
        self.attention = attention
        if not isinstance(uniform, bool):
            raise TypeError(f"uniform must be True or False, got {uniform!r}")
        if uniform and density is None:
            raise ValueError("uniform=True keeps the same share of every group, which a density gives; got "
                             f"target_flops={target_flops!r}, target_latency={target_latency!r}: pass a density")
        self.uniform = uniform
        self._init_selection(layers, exclude)


    def annotate(self, gm: fx.GraphModule) -> None:
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            raise ValueError(f"{type(self).__name__} needs shapes: give example inputs, e.g. "
                             "fxcondensa.compress(model, scheme, torch.randn(1, 3, 224, 224))")
        analysis = analyze(gm)
        frozen = analysis.frozen_channels()
        names = [p for g in analysis.groups for p in g.producers]
        excluded = {n for pat in self.exclude for n in _match(names, pat, "exclude pattern")}
        own: dict[int, float] = {}
        for pat, d in self.layers.items():
            hits = set(_match(names, pat, "layers pattern"))
            for g in analysis.groups:
                if hits & set(g.producers):
                    own.setdefault(g.id, d)
        candidate = ~frozen
        for g in analysis.groups:
            if not set(g.kinds) & set(self._producer_kinds) or excluded & set(g.producers):
                candidate[g.channels] = False
                own.pop(g.id, None)
        stats = None
        if self.criteria in CALIBRATED_CRITERIA:  # one pass over the calibration batches for both analyses
            stats = measure(gm, self.criteria, self.calibration, type(self).__name__)  # type: ignore[arg-type]
            score = calibrated_scores(gm, analysis, self.criteria, stats, self.normalize,
                                      channel_scores(gm, analysis, "l2norm", self.normalize))
        else:
            score = channel_scores(gm, analysis, self.criteria, self.normalize)
        heads = head_channels(gm, analysis)
        # head_dim columns live in an analysis of their own (multi-query attention has columns, no heads)
        columns = analyze(gm, head_dim=True) if self.attention in ("head_dim", "both") else None
        if columns is not None:
            graph_record(gm).head_dim_columns = True  # thin's column stage runs whatever the first analysis found
        found = bool(heads.any()) or (columns is not None and bool(head_dim_channels(columns).any()))
        if self.attention in ("heads", "head_dim", "both") and not found:
            raise ValueError(
                f"{type(self).__name__}(attention={self.attention!r}): the model {type(gm).__name__} has no attention "
                "heads the channel analysis recognises. It looked for q/k/v projections reshaped into "
                "(..., heads, head_dim) and multiplied (matmul, scaled_dot_product_attention), and for "
                "nn.MultiheadAttention modules. Use attention=None to prune without requiring heads.")
        if columns is not None:
            # A channel is pruned one way: a head_dim column that is no head here (multi-query attention's one
            # key/value head, an unsqueeze in this analysis) goes with the columns, not also as a channel.
            candidate &= ~(head_dim_channels(columns, into=analysis) & ~heads)
        if self.uniform:
            # Widths a stock config describes: a LayerNorm over fewer channels of the stream is another
            # function (its width-preserving form is no stock module), and configs of LayerNorm models (GPT-2,
            # BERT) derive the head width from the hidden size, so both stay whole there.
            stream = _layer_norm_channels(gm, analysis)
            if bool(stream.any()):
                candidate &= ~stream & ~heads
            # A group outside the repeated layers (BERT's pooler) has no size field of its own in a stock config,
            # which sizes it from one it shares (hidden_size): it stays whole where the model has layers.
            inside = [_in_layers(g.producers) for g in analysis.groups]
            if any(inside):
                for g, layered in zip(analysis.groups, inside, strict=True):
                    if not layered:
                        candidate[g.channels] = False
        if self.attention in ("keep", "head_dim"):
            candidate &= ~heads
        elif bool(heads.any()) and self.criteria in ("l2norm", "bn_or_l2norm"):
            score = torch.where(heads, _owned_scores(gm, analysis, self.normalize, only=heads), score)
        # With "both" each attention keeps sqrt(density) of its heads (and of its columns, below): about
        # density of its width. A group given a density of its own through ``layers`` keeps that one. At least
        # two heads (key/value heads) stay where there were two: thin's second stage finds head_dim columns
        # where a reshape splits two or more heads (or inserts a heads dim of 1 that an attention product
        # reads, multi-query's view), so a single head left of a fused qkv reshape, (B, T, 3, 1, d), would keep
        # its zeroed columns and the thinned model more MACs than the search counted.
        head_groups = {g.id: min(1.0, 2 / n) for g in analysis.groups
                       if (n := int((heads & candidate)[g.channels].sum())) and g.id not in own} \
            if self.attention == "both" else {}
        candidate &= ~torch.isnan(score)
        if self.uniform:  # every group keeps the same share: equal layers keep equal counts
            own = {**{g.id: self.density for g in analysis.groups if bool(candidate[g.channels].any())}, **own}
        chosen = [Channels(analysis, score, candidate, own, sqrt_groups=head_groups, hardware_multiples=True)]
        if columns is not None and (cols := self._columns(gm, columns, excluded, stats)) is not None:
            chosen.append(cols)
        sel = select(gm, chosen, Target(self.density, self.target_flops, self.target_latency, self.align))
        if sel.record is not None:
            graph_record(gm).target = sel.record  # the report shows the target and the fraction reached
        for c, keep in zip(chosen, sel.keeps, strict=True):
            self._annotate_masks(gm, c.analysis, keep)

    def _columns(self, gm: fx.GraphModule, analysis: ChannelAnalysis, excluded: set[str],
                 stats: dict[str, torch.Tensor] | None = None) -> Channels | None:
        """The head_dim columns as a selection sees them (None when every head_dim is frozen: the thinning
        record says why).

        The columns are the channels of a second analysis of the same graph, in which column ``j`` of every
        head of an attention is one channel (``analyze(gm, head_dim=True)``; ``thin`` removes them in its
        second stage). Scored over every row and column they own, one threshold over all attentions keeps
        ``density`` of them (``sqrt(density)`` with ``attention="both"``, whose heads keep the other factor).
        """
        candidate = head_dim_channels(analysis) & ~analysis.frozen_channels()
        for g in analysis.groups:
            if excluded & set(g.producers):
                candidate[g.channels] = False
        score = _owned_scores(gm, analysis, self.normalize)
        if stats is not None:  # calibration statistics where a column has them
            score = calibrated_scores(gm, analysis, self.criteria, stats, self.normalize, score)
        candidate &= ~torch.isnan(score)
        if not bool(candidate.any()):
            return None
        return Channels(analysis, score, candidate, power=0.5 if self.attention == "both" else 1.0)

    def _annotate_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
        params = dict(gm.named_parameters())
        owners = param_owners(gm)
        roles = ("producer", "norm", "bias") if self.prune_bias else ("producer", "norm")
        for s in analysis.slices:
            if s.role not in roles or s.path not in params or s.path not in owners:
                continue
            k = analysis.kept(keep, s.atoms)
            if bool(k.all()):
                continue
            shape = [1] * params[s.path].dim()
            shape[s.dim] = -1
            # Masks live with their parameter, so that applying them never moves a weight off its device; an
            # expanded view of the keep vector costs no memory (a full bool mask is half a bfloat16 weight).
            param = params[s.path]
            mask = param.new_empty(k.shape, dtype=torch.bool).copy_(k).view(shape).expand(param.shape)
            annotate_param(gm, s.path, mask=mask, owners=owners)


def _in_layers(producers: Sequence[str]) -> bool:
    """Whether a group has a producer inside a numbered layer (``encoder.layer.0.intermediate.dense``)."""
    return any(part.isdigit() for p in producers for part in p.split("."))


def _layer_norm_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> torch.Tensor:
    """Bool per channel: True where it enters a LayerNorm (module or functional) over the channel dim."""
    out = torch.zeros(analysis.num_channels, dtype=torch.bool)
    modules = dict(gm.named_modules())
    functions = (nn.functional.layer_norm, torch.ops.aten.layer_norm.default, fxnn.layer_norm_width)
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(m, (nn.LayerNorm, fxnn.WidthLayerNorm)) or (node.op == "call_function" and node.target in functions)):
            continue
        info = analysis.infos.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(info, ChanInfo):
            out[analysis.channel_of[info.atoms]] = True
    return out


def _owned_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, normalize: bool,
                  only: torch.Tensor | None = None) -> torch.Tensor:
    """Root mean square per channel over every row (producers) and column (consumers) it owns: for a head,
    its q, k and v rows and its out-projection columns. With ``normalize`` each tensor's scores are first
    divided by their mean, as in ``channel_scores``. ``only`` (bool per channel): the channels wanted; a
    tensor carrying none of them is not read (their scores are then unspecified)."""
    n = analysis.num_channels
    acc, count = torch.zeros(n), torch.zeros(n)
    params = dict(gm.named_parameters())
    for s in analysis.slices:
        if s.role not in ("producer", "consumer") or s.path not in params:
            continue
        ch = analysis.channel_of[s.atoms]
        if only is not None and not bool(only[ch].any()):  # e.g. the residual stream's rows, for heads
            continue
        r = host(row_norms(params[s.path], s.dim))
        if normalize:
            r = r / r.mean().clamp(min=torch.finfo(torch.float32).tiny)
        acc.index_add_(0, ch, r.pow(2))
        count.index_add_(0, ch, torch.ones(len(ch)))
    return torch.where(count > 0, (acc / count.clamp(min=1)).sqrt(), torch.full((n,), float("nan")))


class NeuronPrune(_ChannelPrune):
    """Prune neurons (output features) of Linear layers, with the channels tied to them.

    Example:
        >>> NeuronPrune(0.5, align=8).align
        8
    """

    _producer_kinds = ("linear",)


class FilterPrune(_ChannelPrune):
    """Prune filters (output channels) of Conv layers, with the channels tied to them."""

    _producer_kinds = ("conv",)


class StructurePrune(_ChannelPrune):
    """Prune neurons and filters with one threshold (Condensa's ``StructurePrune``).

    ``StructurePrune(0.3)`` keeps 30% of the prunable channels; ``StructurePrune(target_flops=0.5)`` finds
    the global threshold whose thinned model keeps at most half of the dense MACs;
    ``StructurePrune(target_flops=0.5, attention="head_dim")`` does so removing head_dim columns inside the
    heads instead of whole heads. ``graph_record(gm).target`` (shown by the report and kept in the thinning
    record) holds the target and the MAC fraction the search reached.

    Example:
        >>> import torch, torchvision, fxcondensa
        >>> from fxcondensa.passes.costs import profile_costs
        >>> from fxcondensa.capture.records import thin_record
        >>> vit = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = fxcondensa.thin(vit.eval(), StructurePrune(target_flops=0.5, attention="head_dim"), x, output="graph")
        >>> macs = lambda m: sum(c.macs for c in profile_costs(m, x))
        >>> record = thin_record(small).target
        >>> record.target, record.reached <= 0.5, abs(macs(small) / macs(vit) - record.reached) < 1e-6
        (0.5, True, True)
    """

    _producer_kinds = ("linear", "conv")

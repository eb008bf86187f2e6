"""What the user's own modules change when they follow thinning, so that ``thin`` can return the user's class.

The thinning pass cuts tensors and edits a captured graph (``passes/slicing.py``). The user's model follows
without that graph where every edit is local to one of its modules (``passes/own.py`` applies this table):

- its tensors are cut: they are taken from the thinned graph by name;
- its size attributes agree with them: each op registry entry's ``resize`` for torch's layers
  (``out_features``, ``num_features``, ...), and ``ATTRIBUTES`` below for modules of timm, torchvision and
  transformers whose forward reads sizes from attributes (``num_heads``, ``split_size``, ``attn_dim``): a
  literal size inside such a module's traced forward is one of these attributes;
- an op the pass rewrote has a module form (``module_form``): a LayerNorm that keeps dividing by its dense
  width becomes a ``WidthLayerNorm`` (a swap), and an RMSNorm written out
  (``w * x * rsqrt(mean(x^2) + eps)``, Hugging Face's Llama family) keeps its class: over ``C'`` of ``C``
  channels, dividing by ``C`` is exactly the stock norm with weight ``w * sqrt(C / C')`` and epsilon
  ``eps * C / C'``.

Anything else is a size written into the graph that the user's forward would compute differently; the
graph result is returned instead, with that edit as the reason. ``update_config`` makes a Hugging Face
config describe the thinned model where every layer has the same sizes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.BatchNorm1d(8)
    >>> m.weight, m.bias = nn.Parameter(m.weight[:5].detach()), nn.Parameter(m.bias[:5].detach())
    >>> m.running_mean, m.running_var = m.running_mean[:5], m.running_var[:5]
    >>> follow_tensors(m)
    >>> m.num_features
    5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import nn as fxnn
from . import registry

__all__ = ["ATTRIBUTES", "follow_tensors", "has_attributes", "module_form", "update_config", "config_fields",
           "fold_rms_norm", "exact_value"]


# (dense, thinned) literal sizes of the reshapes the pass rewrote inside a module: ``(3, 3, 64)`` -> ``(3, 3, 32)``
Shapes = Sequence[tuple[tuple[Any, ...], tuple[Any, ...]]]


def _conv1d(m: nn.Module, shapes: Shapes = ()) -> None:  # transformers' Conv1D: weight (in, out), ``nf`` outputs
    m.nf = int(m.weight.shape[1])


def _gpt2_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    if not getattr(m, "is_cross_attention", False):
        m.split_size = int(m.c_attn.weight.shape[1]) // 3  # q, k, v of equal width, split by this size
        m.num_heads = m.split_size // m.head_dim


def _bert_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    m.all_head_size = int(m.query.weight.shape[0])
    m.num_attention_heads = m.all_head_size // m.attention_head_size


def _llama_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    # Each layer's own head counts: q and k/v rows are heads * head_dim (head_dim whole), and the forward
    # repeats each key/value head ``num_key_value_groups`` times to meet the query heads.
    q, k = int(m.q_proj.weight.shape[0]), int(m.k_proj.weight.shape[0])
    if k and q % k == 0:
        m.num_key_value_groups = q // k


def _timm_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    qkv = getattr(m, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        return
    # The rows are 3 * heads * head_dim: which of the two shrank, the rewritten (..., 3, heads, head_dim)
    # reshape says; without one only heads went.
    found = next(((int(a[-2]), int(a[-1])) for d, a in shapes if len(d) == len(a) >= 3
                  and tuple(d[-3:]) == (3, m.num_heads, m.head_dim) and all(isinstance(v, int) for v in a[-2:])),
                 None)
    if found is not None and found[1] != m.head_dim:
        m.num_heads, m.head_dim = found
        # The compressed model scales scores by the dense head width: the unfused path multiplies by
        # ``scale`` (kept), where the fused kernel would take the new width's.
        m.fused_attn = False
    else:
        m.num_heads = int(qkv.weight.shape[0]) // (3 * m.head_dim)
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * m.head_dim


def _hiera_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    m.heads = int(m.qkv.weight.shape[0]) // (3 * m.head_dim)  # fused q, k, v: 3 * heads * head_dim rows
    m.dim_out = m.heads * m.head_dim  # the output reshape's width


def _sliced_by(name: str) -> Callable[[nn.Module, Shapes], None]:
    """The entry of a module whose forward keeps the first ``getattr(m, name)`` channels of a tensor
    (``x[:, :self.out_chs]``; DPN's residual path, the first ``num_1x1_c`` channels of two summed tensors,
    so both keep one count): the rewritten slice gives the kept count."""
    def follow(m: nn.Module, shapes: Shapes = ()) -> None:
        for dense, thinned in shapes:
            for d, a in zip(dense, thinned, strict=False):
                if isinstance(d, slice) and isinstance(a, slice) and d.start is None \
                        and d.stop == getattr(m, name) and isinstance(a.stop, int):
                    setattr(m, name, a.stop)
                    return
    return follow


def _timm_window_attention(m: nn.Module, shapes: Shapes = ()) -> None:
    m.num_heads = int(m.relative_position_bias_table.shape[-1])  # one bias column per head, cut with it


def _torchvision_vit(m: nn.Module, shapes: Shapes = ()) -> None:
    m.hidden_dim = int(m.conv_proj.weight.shape[0])  # _process_input reshapes patches to this width


# Module class (a class, or its "module.QualName" where importing the library just to name it would cost)
# -> a function that sets the attributes its forward reads sizes from, from its (thinned) tensors and the
# reshapes the pass rewrote inside it.
ATTRIBUTES: dict[Any, Callable[[nn.Module, Shapes], None]] = {
    "transformers.pytorch_utils.Conv1D": _conv1d,
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _gpt2_attention,
    "transformers.models.bert.modeling_bert.BertSelfAttention": _bert_attention,
    "transformers.models.roberta.modeling_roberta.RobertaSelfAttention": _bert_attention,
    "transformers.models.llama.modeling_llama.LlamaAttention": _llama_attention,
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": _llama_attention,
    "transformers.models.mistral.modeling_mistral.MistralAttention": _llama_attention,
    "timm.layers.attention.Attention": _timm_attention,
    "timm.models.swin_transformer.WindowAttention": _timm_window_attention,
    "timm.models.hiera.MaskUnitAttention": _hiera_attention,
    "timm.models.dpn.DualPathBlock": _sliced_by("num_1x1_c"),
    "timm.models.ghostnet.GhostModule": _sliced_by("out_chs"),
    "timm.models.ghostnet.GhostModuleV2": _sliced_by("out_chs"),
    "timm.models.ghostnet.GhostModuleV3": _sliced_by("out_chs"),
    "torchvision.models.vision_transformer.VisionTransformer": _torchvision_vit,
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _attributes_entry(m: nn.Module) -> Callable[[nn.Module, Shapes], None] | None:
    for cls in type(m).__mro__:
        entry = ATTRIBUTES.get(cls) or ATTRIBUTES.get(_qualname(cls))
        if entry is not None:
            return entry
    return None


def has_attributes(m: nn.Module) -> bool:
    """Whether ``m``'s forward reads its sizes from attributes this table keeps up to date."""
    return _attributes_entry(m) is not None


def _width(m: nn.Module) -> int | None:
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def follow_tensors(m: nn.Module, shapes: Shapes = ()) -> None:
    """Make ``m``'s size attributes agree with its tensors: the registry entry's ``resize`` (a torch layer)
    and the ``ATTRIBUTES`` entry (a library module that reads sizes from attributes), which may read
    ``shapes``, the (dense, thinned) literal sizes of the reshapes the pass rewrote inside ``m``."""
    rule = registry.rule_for_key(type(m))
    if rule is not None and rule.resize is not None:
        rule.resize(m, _width(m) if isinstance(m, _PER_CHANNEL) else None)
    entry = _attributes_entry(m)
    if entry is not None:
        entry(m, shapes)
    if isinstance(getattr(m, "num_experts", None), int):
        _experts(m)


def _set_int(m: nn.Module, name: str, value: int) -> None:
    if isinstance(getattr(m, name, None), int) and not isinstance(getattr(m, name), bool):
        setattr(m, name, int(value))


def _experts(m: nn.Module) -> None:
    """A mixture-of-experts module of transformers' layout, whose forward reads its sizes from attributes:
    experts stored ``(experts, out, in)`` (``gate_up_proj``, ``down_proj``; ``(experts, in, out)`` where
    ``is_transposed``), or a router whose ``weight`` is ``(experts, hidden)``."""
    down, up = getattr(m, "down_proj", None), getattr(m, "gate_up_proj", getattr(m, "up_proj", None))
    three = [t for t in (up, down) if isinstance(t, torch.Tensor) and t.dim() == 3]
    if three:
        _set_int(m, "num_experts", three[0].shape[0])
        if isinstance(down, torch.Tensor) and down.dim() == 3:
            hidden, inner = (down.shape[2], down.shape[1]) if getattr(m, "is_transposed", False) is True \
                else (down.shape[1], down.shape[2])
            _set_int(m, "hidden_dim", hidden)
            _set_int(m, "intermediate_dim", inner)
        return
    weight = getattr(m, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        _set_int(m, "num_experts", weight.shape[0])
        _set_int(m, "hidden_dim", weight.shape[1])


_PER_CHANNEL = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


# ------------------------------------------------------------------------------- module forms of rewrites

def _channels_first(m: nn.Module) -> int:  # a norm with both layouts, permuted to channels-last for channels_first
    return 1 if getattr(m, "data_format", "channels_last") == "channels_first" else -1


# LayerNorm subclass -> the channel dim of its forward: an int, or a function of the module
_LAYER_NORMS: dict[Any, Any] = {
    nn.LayerNorm: -1, "timm.layers.norm.LayerNorm": -1, "timm.layers.norm.LayerNorm2d": 1,
    "torchvision.models.convnext.LayerNorm2d": 1,
    "transformers.models.convnext.modeling_convnext.ConvNextLayerNorm": _channels_first,
}


def _layer_norm_dim(m: nn.Module) -> int | None:
    """The channel dim of a LayerNorm whose forward is ``F.layer_norm`` over its last dim (after a permute
    to channels-last for timm's LayerNorm2d), or None for any other module."""
    if type(m) is nn.LayerNorm:
        return -1
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return None
    dim = _LAYER_NORMS.get(_qualname(type(m)))
    return dim(m) if callable(dim) else dim


def module_form(owner: nn.Module, op: Any, width: int) -> nn.Module | None:
    """The module that expresses a rewrite of ``op`` inside ``owner`` over fewer channels of a dense
    ``width``: a replacement module, ``owner`` itself changed in place (an RMSNorm's weight and epsilon
    folded), or None when the rewrite has no module form. ``owner``'s tensors are already the thinned ones."""
    kept = _width(owner)
    if kept is None or kept >= width:
        return None
    if op is fxnn.layer_norm_width:
        dim = _layer_norm_dim(owner)
        if dim is None:
            return None
        new = fxnn.WidthLayerNorm(kept, width=width, eps=owner.eps, weight=owner.weight, bias=owner.bias, dim=dim)
        return new.train(owner.training)
    if op is fxnn.rms_norm_width and isinstance(owner, getattr(nn, "RMSNorm", ())):
        eps = owner.eps if owner.eps is not None else float(torch.finfo(owner.weight.dtype).eps)
        return fxnn.WidthRMSNorm(kept, width=width, eps=eps, weight=owner.weight).train(owner.training)
    if op is fxnn.mean_width:  # an RMSNorm written out: fold the dense width into weight and epsilon
        name = next((n for n in ("variance_epsilon", "eps") if isinstance(getattr(owner, n, None), float)), None)
        weight = getattr(owner, "weight", None)
        if name is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            return None
        # A new tensor: the thinned graph (returned instead if the check fails) shares the old one.
        folded, eps = fold_rms_norm(weight.detach(), getattr(owner, name), width, kept)
        owner.weight = nn.Parameter(folded, requires_grad=weight.requires_grad)
        if folded.dtype != torch.float64:  # rounded once: the wider re-check reads the exact product
            _EXACT[owner.weight] = fold_rms_norm(weight.detach(), 0.0, width, kept, dtype=torch.float64)[0]
        setattr(owner, name, eps)
        return owner
    return None


# A folded weight -> its unrounded float64 value, for as long as the weight lives.
_EXACT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def exact_value(t: torch.Tensor) -> torch.Tensor | None:
    """The unrounded (float64) value of a tensor ``module_form`` rounded after folding a factor into it, or
    None for any other tensor. The thinning check's re-run in a wider dtype reads it: the fold's one rounding
    is the model dtype's, like the changed order of a sum, and must not count as a difference there."""
    return _EXACT.get(t)


def fold_rms_norm(weight: torch.Tensor, eps: float, width: int, kept: int, *,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """The weight and epsilon of a stock RMSNorm over ``kept`` channels that equals one dividing by the dense
    ``width`` (its other channels zero): ``weight * sqrt(width / kept)`` and ``eps * width / kept``.

    ``weight`` holds the kept channels' weights; the product is formed in float64 and rounded once to
    ``dtype`` (``weight``'s own by default).

    Example:
        >>> fold_rms_norm(torch.ones(2), 1e-6, 8, 2)
        (tensor([2., 2.]), 4e-06)
    """
    ratio = width / kept
    folded = (weight.double() * math.sqrt(ratio)).to(dtype or weight.dtype)
    return folded, eps * ratio


# ---------------------------------------------------------------------------------- Hugging Face configs

def _llama_like(model: nn.Module) -> dict[str, list[Any]]:
    layers = model.get_submodule("model.layers")
    return {**_attention_fields(model), "intermediate_size": [layer.mlp.up_proj.weight.shape[0] for layer in layers]}


def _attention_fields(model: nn.Module) -> dict[str, list[Any]]:
    layers = model.get_submodule("model.layers")
    attn = [layer.self_attn for layer in layers]
    head_dim = [a.head_dim for a in attn]
    norm = model.get_submodule("model.norm")
    return {
        "hidden_size": [model.get_input_embeddings().weight.shape[1]],
        "num_attention_heads": [a.q_proj.weight.shape[0] // d for a, d in zip(attn, head_dim, strict=True)],
        "num_key_value_heads": [a.k_proj.weight.shape[0] // d for a, d in zip(attn, head_dim, strict=True)],
        "head_dim": head_dim,
        "rms_norm_eps": [m.variance_epsilon for m in [norm, *(x for layer in layers for x in
                                                             (layer.input_layernorm, layer.post_attention_layernorm))]],
    }


def _mixtral(model: nn.Module) -> dict[str, list[Any]]:
    experts = [layer.mlp.experts for layer in model.get_submodule("model.layers")]
    return {**_attention_fields(model),
            "intermediate_size": [e.down_proj.shape[2] for e in experts],
            "num_local_experts": [e.down_proj.shape[0] for e in experts]}


def _qwen2_moe(model: nn.Module) -> dict[str, list[Any]]:
    mlps = [layer.mlp for layer in model.get_submodule("model.layers")]
    return {**_attention_fields(model),
            "moe_intermediate_size": [m.experts.down_proj.shape[2] for m in mlps],
            "shared_expert_intermediate_size": [m.shared_expert.up_proj.weight.shape[0] for m in mlps],
            "num_experts": [m.experts.down_proj.shape[0] for m in mlps]}


def _gpt2(model: nn.Module) -> dict[str, list[Any]]:
    blocks = model.get_submodule("transformer.h")
    return {
        "n_embd": [model.get_input_embeddings().weight.shape[1]],
        "n_inner": [b.mlp.c_fc.weight.shape[1] for b in blocks],
        "n_head": [b.attn.num_heads for b in blocks],
    }


def _bert(model: nn.Module) -> dict[str, list[Any]]:
    base = getattr(model, "bert", None) or getattr(model, "roberta", None) or model  # a task head's encoder
    layers = base.get_submodule("encoder.layer")
    hidden = int(model.get_input_embeddings().weight.shape[1])
    attn = [layer.attention.self for layer in layers]
    return {
        "hidden_size": [hidden],
        "intermediate_size": [layer.intermediate.dense.weight.shape[0] for layer in layers],
        # A stock config derives the head width as hidden_size // heads: a count it would divide otherwise is
        # one it cannot state (None).
        "num_attention_heads": [a.num_attention_heads if a.attention_head_size * a.num_attention_heads == hidden
                                else None for a in attn],
    }


# config.model_type -> the config fields that describe sizes, read from the model (one value per layer)
CONFIGS: dict[str, Callable[[nn.Module], dict[str, list[Any]]]] = {
    "llama": _llama_like, "qwen2": _llama_like, "mistral": _llama_like, "gpt2": _gpt2, "bert": _bert,
    "roberta": _bert, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
}


def config_fields(model: nn.Module) -> dict[str, list[Any]] | None:
    """The size fields of ``model.config`` as the model's modules have them now (one value per layer), or
    None when the model has no config this table knows."""
    config = getattr(model, "config", None)
    read = CONFIGS.get(getattr(config, "model_type", None))
    if read is None:
        return None
    try:
        return read(model)
    except (AttributeError, TypeError):  # a variant whose modules are laid out otherwise
        return None


def update_config(model: nn.Module) -> list[str]:
    """Set the size fields of ``model.config`` (a Hugging Face config) from the thinned modules; returns
    the fields whose layers differ (a stock config cannot describe them; they keep their dense values)."""
    fields = config_fields(model)
    if fields is None:
        return []
    config = model.config
    differ = []
    for name, values in fields.items():
        if any(v is None for v in values):  # a layer whose size the stock config cannot state
            differ.append(name)
            continue
        values = [float(v) if isinstance(v, float) else int(v) for v in values]
        if len(set(values)) != 1:
            differ.append(name)
        elif getattr(config, name, None) != values[0] or name == "head_dim":
            setattr(config, name, values[0])  # head_dim stated: a derived one would divide the new sizes
    return differ

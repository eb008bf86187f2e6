"""The channel groups of a Llama-family checkpoint (llama, mistral, qwen2), from its tensor names and config.

A decoder of this family has four kinds of channel groups, and every tensor carries them along known dims:

- ``stream``: the residual stream (``hidden_size``): the embedding's columns, every RMSNorm's weight, the
  input columns of q/k/v/gate/up and of ``lm_head``, the output rows (and biases) of ``o_proj`` and ``down_proj``;
- ``mlp``: one layer's MLP units (``intermediate_size``): rows of gate/up, columns of down;
- ``q``: one layer's query heads (rows of q, columns of ``o_proj``, ``head_dim`` of them per head);
- ``kv``: one layer's key/value heads (rows of k and v). Query head ``h`` reads key/value head
  ``h // (heads / kv_heads)``, so heads are kept by key/value group: whole groups, and the same number of
  query heads in each kept group (order kept, so that the grouping still holds after the cut).

Channels are scored from the weights alone: each tensor's per-channel sum of squares along the channel's dim,
divided by its mean over the channels (tensors of different shapes weigh alike), summed over the tensors that
carry the channel. Every layer keeps the same counts, so that a stock config describes the result.

Example:
    >>> import torch
    >>> sizes = Sizes(hidden=8, intermediate=16, heads=4, kv_heads=2, head_dim=2)
    >>> keep = LayerKeep(stream=torch.arange(6), mlp=torch.tensor([1, 5]), q_heads=torch.tensor([0, 2]),
    ...                  kv_heads=torch.tensor([0, 1]), head_dim=2)
    >>> cut("mlp.down_proj.weight", torch.ones(8, 16), keep).shape
    torch.Size([6, 2])
    >>> keep.index("q")
    tensor([0, 1, 4, 5])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SUPPORTED", "LAYER", "GLOBAL", "NORMS", "Sizes", "LayerKeep", "dense_sizes", "target_sizes",
           "channel_scores", "select_layer", "top", "cut", "mask"]

SUPPORTED = ("llama", "mistral", "qwen2")

Dims = tuple[tuple[int, str], ...]  # (tensor dim, group kind) for each dim that carries a channel group

# Suffix after "model.layers.{i}." -> the dims its channels live on.
LAYER: dict[str, Dims] = {
    "input_layernorm.weight": ((0, "stream"),),
    "post_attention_layernorm.weight": ((0, "stream"),),
    "self_attn.q_proj.weight": ((0, "q"), (1, "stream")),
    "self_attn.q_proj.bias": ((0, "q"),),
    "self_attn.k_proj.weight": ((0, "kv"), (1, "stream")),
    "self_attn.k_proj.bias": ((0, "kv"),),
    "self_attn.v_proj.weight": ((0, "kv"), (1, "stream")),
    "self_attn.v_proj.bias": ((0, "kv"),),
    "self_attn.o_proj.weight": ((0, "stream"), (1, "q")),
    "self_attn.o_proj.bias": ((0, "stream"),),
    "mlp.gate_proj.weight": ((0, "mlp"), (1, "stream")),
    "mlp.gate_proj.bias": ((0, "mlp"),),
    "mlp.up_proj.weight": ((0, "mlp"), (1, "stream")),
    "mlp.up_proj.bias": ((0, "mlp"),),
    "mlp.down_proj.weight": ((0, "stream"), (1, "mlp")),
    "mlp.down_proj.bias": ((0, "stream"),),
}
GLOBAL: dict[str, Dims] = {
    "model.embed_tokens.weight": ((1, "stream"),),
    "model.norm.weight": ((0, "stream"),),
    "lm_head.weight": ((1, "stream"),),
}
# RMSNorm weights of the stream: cut, then folded (rules.owners.fold_rms_norm) when the stream is cut.
NORMS = frozenset({"input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight"})


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The widths of a Llama-family decoder (one value for every layer)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def dense_sizes(config: Mapping[str, Any]) -> Sizes:
    """The sizes a Llama-family ``config.json`` states (``head_dim`` derived where it is not)."""
    heads = int(config["num_attention_heads"])
    return Sizes(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]), heads=heads,
                 kv_heads=int(config.get("num_key_value_heads") or heads),
                 head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads))


def _size(field: str, value: Any, dense: int, where: str) -> int:
    if value is None:
        return dense
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dense:
        raise ValueError(f"{field}={value!r}: {where} has {field} {dense}; give an int from 1 to {dense} "
                         "(or None to keep it)")
    return value


def target_sizes(dense: Sizes, where: str, *, hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None) -> Sizes:
    """The thinned sizes, checked against ``dense`` (``where`` names the config in errors).

    Without ``num_attention_heads``, each kept key/value group keeps all its query heads.
    """
    hidden = _size("hidden_size", hidden_size, dense.hidden, where)
    intermediate = _size("intermediate_size", intermediate_size, dense.intermediate, where)
    kv = _size("num_key_value_heads", num_key_value_heads, dense.kv_heads, where)
    group = dense.heads // dense.kv_heads
    heads = _size("num_attention_heads", num_attention_heads, dense.heads, where) \
        if num_attention_heads is not None else kv * group
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: each kept "
                         f"key/value head serves the same number of query heads; give num_attention_heads a "
                         f"multiple of {kv} (e.g. {kv * max(1, heads // kv)})")
    if heads // kv > group:
        raise ValueError(f"num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query "
                         f"heads per key/value group, and {where} has {group} per group; give at most "
                         f"num_attention_heads={kv * group}, or keep more key/value heads")
    return Sizes(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv, head_dim=dense.head_dim)


@dataclasses.dataclass
class LayerKeep:
    """The kept channels of one layer (sorted indices): stream channels, MLP units, query and key/value heads."""

    stream: torch.Tensor
    mlp: torch.Tensor
    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    head_dim: int

    def index(self, kind: str) -> torch.Tensor:
        """Kept indices along a dim of group ``kind`` (heads expanded to their rows)."""
        if kind in ("q", "kv"):
            heads = self.q_heads if kind == "q" else self.kv_heads
            return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)
        return self.stream if kind == "stream" else self.mlp


_ROWS = 4096  # rows squared at a time: a float32 copy of a whole 128k x 4096 embedding would be 2 GB


def channel_scores(name: str, t: torch.Tensor, dims: Dims, head_dim: int) -> dict[str, torch.Tensor]:
    """The tensor's normalised score of each channel, per group kind it carries (one float32 pass over
    ``t``, a block of rows at a time, for all its dims)."""
    per = {dim: torch.zeros(t.shape[dim], dtype=torch.float64) for dim, _ in dims}
    if t.dim() == 1:
        per[0] = t.double().square()
    else:
        flat = t.reshape(t.shape[0], -1)
        for start in range(0, flat.shape[0], _ROWS):
            # a copy even for a float32 tensor: squared in place, it must not be the caller's
            sq = flat[start:start + _ROWS].to(torch.float32, copy=True).square_().reshape(-1, *t.shape[1:])
            for dim in per:
                reduced = sq.sum(dim=[d for d in range(t.dim()) if d != dim]).double()
                if dim == 0:
                    per[0][start:start + sq.shape[0]] = reduced
                else:
                    per[dim] += reduced
    out = {}
    for dim, kind in dims:
        score = per[dim]
        if kind in ("q", "kv"):
            score = score.reshape(-1, head_dim).sum(1)
        out[kind] = score / score.mean().clamp_min(1e-300)
    return out


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring indices, sorted (ties to the lower index)."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def select_layer(scores: Mapping[str, torch.Tensor], dense: Sizes, target: Sizes,
                 stream: torch.Tensor) -> LayerKeep:
    """One layer's kept MLP units and heads from its summed scores (``scores[kind]``)."""
    group, kept_group = dense.heads // dense.kv_heads, target.heads // target.kv_heads
    q = scores.get("q", torch.zeros(dense.heads, dtype=torch.float64)).reshape(dense.kv_heads, group)
    kv = scores.get("kv", torch.zeros(dense.kv_heads, dtype=torch.float64))
    kv_heads = top(kv + q.mean(1), target.kv_heads)
    q_heads = torch.cat([g * group + top(q[g], kept_group) for g in kv_heads.tolist()])
    mlp = top(scores.get("mlp", torch.zeros(dense.intermediate, dtype=torch.float64)), target.intermediate)
    return LayerKeep(stream=stream, mlp=mlp, q_heads=q_heads, kv_heads=kv_heads, head_dim=dense.head_dim)


def cut(name: str, t: torch.Tensor, keep: LayerKeep, dims: Dims | None = None) -> torch.Tensor:
    """``t`` (tensor ``name`` of a layer, or a global one) restricted to its kept channels, as a new tensor."""
    dims = _dims(name) if dims is None else dims
    for dim, kind in dims:
        idx = keep.index(kind)
        if idx.numel() != t.shape[dim]:
            t = t.index_select(dim, idx)
    return t.contiguous()


def mask(name: str, t: torch.Tensor, keep: LayerKeep, dims: Dims | None = None, *,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` with every pruned channel zeroed along every dim that carries one (the compressed dense tensor),
    as a new tensor (of ``dtype``, by default ``t``'s)."""
    dims = _dims(name) if dims is None else dims
    t = t.to(dtype or t.dtype, copy=True)
    for dim, kind in dims:
        gone = torch.ones(t.shape[dim], dtype=torch.bool)
        gone[keep.index(kind)] = False
        t.index_fill_(dim, gone.nonzero().reshape(-1), 0)
    return t


def _dims(name: str) -> Dims:
    if name in GLOBAL:
        return GLOBAL[name]
    return LAYER[name.split(".", 3)[3] if name.startswith("model.layers.") else name]

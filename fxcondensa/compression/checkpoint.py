"""``thin_pretrained``: thin a Hugging Face checkpoint on disk without ever holding the dense model.

The model is built from its config on the meta device (no weights), which gives its tensor names, shapes and
module classes. The channel groups are those of the Llama family's decoder layout (``checkpoint_layout``:
llama, mistral and qwen2 configs). Every tensor is then read alone from the safetensors shards:

1. scores, when the residual stream is cut (its choice needs every layer's weights before any layer is
   written): one pass over the checkpoint, keeping only per-channel score vectors;
2. the cut: unit by unit (the embedding, each decoder layer, the final norm and ``lm_head``), each unit's dense
   tensors are read, cut to the kept channels (RMSNorm weights folded as ``rules.owners.fold_rms_norm`` does
   for in-memory models), checked against the masked dense unit (``checkpoint_check``) and streamed into the
   output shard (``files.hf_checkpoint``). At most one unit's dense tensors are in memory at a time.

Every layer keeps the same counts, so the output's ``config.json`` is a stock one and
``AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..files.hf_checkpoint import HFCheckpoint, write_checkpoint
from ..rules.owners import fold_rms_norm
from . import checkpoint_layout as layout
from .checkpoint_check import LayerChecker

__all__ = ["thin_pretrained", "ThinnedCheckpoint"]


@dataclasses.dataclass
class ThinnedCheckpoint:
    """What ``thin_pretrained`` wrote: the directory, the dense and thinned sizes, the kept channels of every
    layer (``layers[i]``: ``stream``, ``mlp``, ``q_heads``, ``kv_heads`` index tensors) and the check's
    largest difference per unit (empty with ``check=False``)."""

    path: Path
    dense: layout.Sizes
    sizes: layout.Sizes
    layers: list[layout.LayerKeep]
    checked: list[tuple[str, float]]


def _meta_model(config: Any) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _check_names(ckpt: HFCheckpoint, model: torch.nn.Module, tied: bool) -> None:
    """Every tensor of the model is in the checkpoint with the model's shape, and every tensor has a layout."""
    have = ckpt.shapes
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in want.items():
        if name not in have:
            if name == "lm_head.weight" and tied:
                continue
            raise KeyError(f"{ckpt.folder}: no shard holds {name!r}, which its config.json's model has; the "
                           "checkpoint is incomplete (a shard missing from the index?) or of another architecture")
        if tuple(have[name][0]) != shape:
            raise ValueError(f"{ckpt.folder}: tensor {name!r} is {tuple(have[name][0])} in the shards but "
                             f"{shape} in the model config.json describes; config and weights disagree")
    for name in have:
        if name not in want:
            raise ValueError(f"{ckpt.folder}: tensor {name!r} is not part of the {type(model).__name__} that "
                             "config.json describes; thin_pretrained knows the stock Llama-family layout only")
        try:
            layout._dims(name)
        except KeyError:
            raise ValueError(f"{ckpt.folder}: thin_pretrained does not know where tensor {name!r} carries "
                             f"channels; it supports the stock decoder of {', '.join(layout.SUPPORTED)}") from None


def _calibration(ids: Any, vocab: int) -> torch.Tensor:
    if ids is None:
        return torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0 \
            or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"calibration must be token ids, an integer tensor (batch, tokens) with values in "
                         f"[0, {vocab}) (the config's vocab_size), got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def _layer_names(i: int, have: dict[str, Any]) -> list[str]:
    prefix = f"model.layers.{i}."
    return [n for n in have if n.startswith(prefix)]


def thin_pretrained(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], *,
                    hidden_size: int | None = None, intermediate_size: int | None = None,
                    num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                    calibration: Any = None, check: bool = True, overwrite: bool = False,
                    max_shard_size: int = 2 * 2**30) -> ThinnedCheckpoint:
    """Thin the Hugging Face checkpoint ``src_dir`` to the given sizes and write it to ``dst_dir``.

    ``src_dir`` holds ``config.json`` and safetensors weights (one file, or shards with their index) of a
    llama, mistral or qwen2 causal language model. Each size left ``None`` stays dense; every layer keeps the
    same counts, chosen by weight magnitude (each tensor's per-channel sum of squares over its mean, summed
    over the tensors carrying the channel). ``hidden_size`` cuts the residual stream: the RMSNorms fold the
    dense width into their weight (times ``sqrt(C / C')``) and ``rms_norm_eps`` (times ``C / C'``), exactly.
    ``num_key_value_heads`` keeps whole key/value groups; ``num_attention_heads`` (a multiple of it) the
    same number of query heads in each kept group. ``head_dim`` stays.

    The dense model is never in memory: tensors are read one at a time, each unit (embedding, decoder layer,
    final norm and ``lm_head``) is cut, checked and streamed into shards of at most ``max_shard_size`` bytes.
    ``check=True`` runs ``calibration`` token ids ``(batch, tokens)`` (16 random ids by default) through the
    thinned model as it is written and compares each unit with its dense unit whose pruned channels are zeroed
    (float32, rtol 1e-4); a mismatch raises ``ThinningCheckError`` naming the unit, and nothing is written.
    ``dst_dir`` is written beside itself under a temporary name and renamed at the end; an existing one is
    replaced only with ``overwrite=True``. ``src_dir`` is only read. Tokenizer and generation files are copied.

    Returns a ``ThinnedCheckpoint`` (the path, sizes, kept channels, the check's differences).

    Example:
        >>> import tempfile, torch, transformers, fxcondensa
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp() + "/small"
        >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
        >>> out = fxcondensa.thin_pretrained(src, dst, hidden_size=24, intermediate_size=32)
        >>> small = transformers.AutoModelForCausalLM.from_pretrained(dst)
        >>> small.config.hidden_size, small.model.layers[0].mlp.up_proj.out_features
        (24, 32)
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("thin_pretrained builds the model from its config with transformers, which is not "
                          "installed: pip install 'fxcondensa[hf]'") from exc

    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    ckpt = HFCheckpoint(src)
    if dst == src or src in dst.parents:
        raise ValueError(f"dst_dir {dst} is inside src_dir {src}: the source is never written to; give an "
                         "output directory outside it")
    if dst.exists() and not overwrite:  # before any work: the whole checkpoint would be read for nothing
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it (it is replaced only once "
                              "the new checkpoint is complete)")
    raw = ckpt.config
    model_type = raw.get("model_type")
    if model_type not in layout.SUPPORTED:
        raise ValueError(f"{src / 'config.json'}: model_type {model_type!r} is not supported by thin_pretrained "
                         f"(it knows the decoder layout of {', '.join(layout.SUPPORTED)}); for other models load "
                         "them and use fxcondensa.thin")
    if not isinstance(max_shard_size, int) or isinstance(max_shard_size, bool) or max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    dense = layout.dense_sizes(raw)
    sizes = layout.target_sizes(dense, str(src / "config.json"), hidden_size=hidden_size,
                                intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                                num_key_value_heads=num_key_value_heads)
    config = transformers.AutoConfig.from_pretrained(src)
    model = _meta_model(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    _check_names(ckpt, model, tied)
    have = ckpt.shapes
    n_layers = int(raw["num_hidden_layers"])
    ids = _calibration(calibration, int(raw["vocab_size"]))
    cut_stream = sizes.hidden < dense.hidden

    # the thinned config, which transformers' config class must accept
    thin_raw = copy.deepcopy(raw)
    thin_raw.update(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                    num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads, head_dim=sizes.head_dim)
    eps = float(raw.get("rms_norm_eps", 1e-6))
    if cut_stream:
        _, thin_raw["rms_norm_eps"] = fold_rms_norm(torch.ones(1), eps, dense.hidden, sizes.hidden)
    try:
        thin_config = type(config).from_dict({k: v for k, v in thin_raw.items() if k != "model_type"})
    except Exception as exc:  # the config classes validate their sizes (LlamaConfig: hidden_size % heads)
        cause = exc.__cause__ or exc
        raise ValueError(
            f"{src / 'config.json'} thinned to hidden_size={sizes.hidden}, intermediate_size={sizes.intermediate}, "
            f"num_attention_heads={sizes.heads}, num_key_value_heads={sizes.kv_heads}: transformers' "
            f"{type(config).__name__} refuses these sizes ({cause}); choose sizes it accepts (llama: hidden_size "
            f"a multiple of num_attention_heads)") from exc

    # 1. scores: the stream's over the whole checkpoint (and each layer's on the way), when the stream is cut
    layer_scores: list[dict[str, torch.Tensor] | None] = [None] * n_layers
    stream_score = torch.zeros(dense.hidden, dtype=torch.float64)

    def score_layer(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            for kind, s in layout.channel_scores(name, t, layout._dims(name), dense.head_dim).items():
                total[kind] = total[kind] + s if kind in total else s
        return total

    if cut_stream:
        for name in layout.GLOBAL:
            if name in have:
                stream_score += layout.channel_scores(name, ckpt.read(name), layout.GLOBAL[name],
                                                      dense.head_dim)["stream"]
        for i in range(n_layers):
            scores = score_layer(i, {n: ckpt.read(n) for n in _layer_names(i, have)})
            stream_score += scores.pop("stream")
            layer_scores[i] = scores
    stream = layout.top(stream_score, sizes.hidden) if cut_stream else torch.arange(dense.hidden)
    everything = layout.LayerKeep(stream=stream, mlp=torch.arange(dense.intermediate),
                                  q_heads=torch.arange(dense.heads), kv_heads=torch.arange(dense.kv_heads),
                                  head_dim=dense.head_dim)

    float_dtypes = {d for _, d in have.values() if d.is_floating_point}
    compute = torch.float64 if torch.float64 in float_dtypes else torch.float32
    checker = None
    if check:
        checker = LayerChecker(model, copy.deepcopy(config), thin_config, ids, stream, compute)
    del model

    def fold(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A cut RMSNorm weight: as written (the checkpoint's dtype), as checked (``compute``)."""
        if not cut_stream:
            return t, t
        checked, _ = fold_rms_norm(t, eps, dense.hidden, sizes.hidden, dtype=compute)
        return checked.to(t.dtype), checked

    # 2. the units, in file order: the embedding, each layer, the final norm with lm_head
    keeps: list[layout.LayerKeep] = []
    units: list[list[str]] = [["model.embed_tokens.weight"]]
    units += [_layer_names(i, have) for i in range(n_layers)]
    units.append([n for n in ("model.norm.weight", "lm_head.weight") if n in have])

    def keep_of(i: int) -> layout.LayerKeep:
        while len(keeps) <= i:
            keeps.append(layout.select_layer(layer_scores[len(keeps)] or {}, dense, sizes, stream))
        return keeps[i]

    def produce(u: int) -> Iterator[tuple[str, torch.Tensor]]:
        if u == 0:
            name = units[0][0]
            t = ckpt.read(name)
            small = layout.cut(name, t, everything)
            if checker is not None:
                checker.embeddings(name, t, small)
            del t
            yield name, small
            return
        if u == len(units) - 1:
            norm_name = "model.norm.weight"
            norm = ckpt.read(norm_name)
            written, checked = fold(layout.cut(norm_name, norm, everything))
            yield norm_name, written
            head_name = "lm_head.weight"
            head = ckpt.read(head_name if head_name in have else "model.embed_tokens.weight")
            small_head = layout.cut(head_name, head, everything)
            if checker is not None:
                checker.head(layout.mask(norm_name, norm, everything), checked, head, small_head)
            del head
            if head_name in have:
                yield head_name, small_head
            return
        i = u - 1
        dense_t = {n: ckpt.read(n) for n in units[u]}
        if layer_scores[i] is None and (sizes.intermediate < dense.intermediate or sizes.heads < dense.heads):
            layer_scores[i] = score_layer(i, dense_t)
        keep = keep_of(i)
        prefix = f"model.layers.{i}."
        written: dict[str, torch.Tensor] = {}
        checked: dict[str, torch.Tensor] = {}
        for name, t in dense_t.items():
            small = layout.cut(name, t, keep)
            if name.removeprefix(prefix) in layout.NORMS:
                written[name], checked[name] = fold(small)
            else:
                written[name] = checked[name] = small
        if checker is not None:
            masked = {n.removeprefix(prefix): layout.mask(n, dense_t.pop(n), keep, dtype=compute)
                      for n in list(dense_t)}  # each dense tensor let go as soon as its masked copy exists
            checker.layer(f"model.layers.{i}", i, masked, {n.removeprefix(prefix): t for n, t in checked.items()})
        del dense_t, checked
        yield from written.items()

    def spec(u: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for name in units[u]:
            shape, dtype = have[name]
            shape = list(shape)
            for dim, kind in layout._dims(name):
                shape[dim] = {"stream": sizes.hidden, "mlp": sizes.intermediate,
                              "q": sizes.heads * sizes.head_dim, "kv": sizes.kv_heads * sizes.head_dim}[kind]
            out[name] = (tuple(shape), dtype)
        return out

    path = write_checkpoint(dst, thin_raw, [spec(u) for u in range(len(units))], produce,
                            max_shard_bytes=max_shard_size, side_files_from=src, overwrite=overwrite)
    return ThinnedCheckpoint(path=path, dense=dense, sizes=sizes, layers=[keep_of(i) for i in range(n_layers)],
                             checked=list(checker.report) if checker is not None else [])

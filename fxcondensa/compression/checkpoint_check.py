"""The layer-by-layer check of a thinned checkpoint: each thinned layer against its masked dense layer.

Calibration token ids go through the thinned model as it is written: the thinned embedding gives the hidden
states, each thinned decoder layer the next ones. At every step the dense layer (its weights alone, every
pruned channel zeroed: the compressed dense layer) runs on the same hidden states, zero on the pruned stream
channels, and its output must equal the thinned layer's on the kept channels (and be zero on the others).
Both run in float32 (float64 for a float64 checkpoint) with the float32 tolerance of ``passes.precision``;
the dense layer and the thinned layer are stock modules of the model's own classes (built on the meta device,
then given the weights), so the check runs the code that ``from_pretrained`` will run.

The RMSNorm weights are compared as the fold computes them in float32; a bfloat16 or float16 checkpoint
stores them rounded once more to its dtype (one rounding, as any weight of that dtype is).

Example: see ``fxcondensa.thin_pretrained`` (``check=True``, the default, runs this).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ThinningCheckError
from ..passes.precision import tolerance

__all__ = ["LayerChecker"]

_VOCAB_CHUNK = 16384  # lm_head rows compared at a time: a float32 copy of a 128k x 4096 head is 2 GB


def _build(module_cls: type[nn.Module], state: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        module = module_cls(*args, **kwargs)
    module.load_state_dict(dict(state), strict=True, assign=True)
    return module.eval()


class LayerChecker:
    """Runs the calibration tokens through the thinned model unit by unit, comparing with the dense one.

    ``model`` is the dense model built on the meta device (its classes are used, never its weights);
    ``dense_config`` / ``thin_config`` the two transformers configs; ``ids`` the calibration token ids
    ``(batch, tokens)``; ``dtype`` the dtype both sides compute in.
    """

    def __init__(self, model: nn.Module, dense_config: Any, thin_config: Any, ids: torch.Tensor,
                 stream: torch.Tensor, dtype: torch.dtype):
        self.layer_cls = type(model.model.layers[0])
        self.norm_cls = type(model.model.norm)
        self.dense_config, self.thin_config = dense_config, thin_config
        for config in (dense_config, thin_config):
            config._attn_implementation = "eager"  # the same attention code on both sides, whatever is installed
        self.ids, self.stream, self.dtype = ids, stream, dtype
        self.rtol, self.atol = tolerance(torch.float32)
        self.width = int(dense_config.hidden_size)
        batch, tokens = ids.shape
        positions = torch.arange(tokens).expand(batch, tokens)
        probe = torch.zeros(1, dtype=dtype)
        rotary = type(model.model.rotary_emb)
        self.pe_dense = rotary(config=dense_config)(probe, positions)
        self.pe_thin = rotary(config=thin_config)(probe, positions)
        causal = torch.full((tokens, tokens), torch.finfo(dtype).min, dtype=dtype).triu(1)
        self.mask = causal.expand(batch, 1, tokens, tokens)
        self.hidden: torch.Tensor | None = None  # the thinned model's hidden states so far
        self.report: list[tuple[str, float]] = []  # (unit, max abs difference)

    def _dense_input(self) -> torch.Tensor:
        assert self.hidden is not None
        full = self.hidden.new_zeros(*self.hidden.shape[:-1], self.width)
        full[..., self.stream] = self.hidden
        return full

    def _compare(self, where: str, dense: torch.Tensor, thin: torch.Tensor, *, stream: bool = True) -> None:
        if stream:
            gone = self._gone()
            leak = float(dense[..., gone].abs().max()) if bool(gone.any()) else 0.0
            if leak != 0.0:
                raise ThinningCheckError(f"thin_pretrained: the masked dense {where} writes {leak:.3g} into a "
                                         "pruned stream channel; its pruned channels are not all zero")
            dense = dense[..., self.stream]
        diff = float((dense - thin).abs().max()) if dense.numel() else 0.0
        if not torch.allclose(thin, dense, rtol=self.rtol, atol=self.atol):
            raise ThinningCheckError(
                f"thin_pretrained: the thinned {where} differs from the masked dense one by up to {diff:.3g} "
                f"(rtol {self.rtol}, atol {self.atol}, computed in {self.dtype}); the output was not written. "
                "Please report it with the model's config.json")
        self.report.append((where, diff))

    def _gone(self) -> torch.Tensor:
        gone = torch.ones(self.width, dtype=torch.bool)
        gone[self.stream] = False
        return gone

    def embeddings(self, name: str, dense: torch.Tensor, thin: torch.Tensor) -> None:
        """The thinned embedding's rows against the dense rows (``dense`` unmasked: the rows the ids pick are
        masked here); starts the hidden states."""
        rows = F.embedding(self.ids, dense).to(self.dtype)
        rows[..., self._gone()] = 0
        self.hidden = F.embedding(self.ids, thin).to(self.dtype)
        self._compare(name, rows, self.hidden)

    def layer(self, where: str, index: int, dense: Mapping[str, torch.Tensor], thin: Mapping[str, torch.Tensor]) -> None:
        """Decoder layer ``index``: ``dense`` its masked weights, ``thin`` the thinned ones (keys as in the layer)."""
        with torch.no_grad():
            d = _build(self.layer_cls, {k: v.to(self.dtype) for k, v in dense.items()}, self.dense_config, index)
            out_dense = d(self._dense_input(), attention_mask=self.mask, position_embeddings=self.pe_dense)
            del d
            t = _build(self.layer_cls, {k: v.to(self.dtype) for k, v in thin.items()}, self.thin_config, index)
            out_thin = t(self.hidden, attention_mask=self.mask, position_embeddings=self.pe_thin)
        self._compare(where, out_dense, out_thin)
        self.hidden = out_thin

    def head(self, dense_norm: torch.Tensor, thin_norm: torch.Tensor, dense_head: torch.Tensor,
             thin_head: torch.Tensor) -> None:
        """The final norm and ``lm_head`` (their logits compared a block of the vocabulary at a time;
        ``dense_head`` unmasked: each block is masked as it is read)."""
        with torch.no_grad():
            nd = _build(self.norm_cls, {"weight": dense_norm.to(self.dtype)}, self.width,
                        eps=self.dense_config.rms_norm_eps)
            nt = _build(self.norm_cls, {"weight": thin_norm.to(self.dtype)}, int(thin_norm.shape[0]),
                        eps=self.thin_config.rms_norm_eps)
            hd, ht = nd(self._dense_input()), nt(self.hidden)
            self._compare("model.norm", hd, ht)
            worst = 0.0
            for start in range(0, dense_head.shape[0], _VOCAB_CHUNK):
                rows = slice(start, start + _VOCAB_CHUNK)
                block = dense_head[rows].to(self.dtype)
                block[:, self._gone()] = 0
                ld = F.linear(hd, block)
                lt = F.linear(ht, thin_head[rows].to(self.dtype))
                self._compare(f"lm_head (rows {start}-{start + ld.shape[-1] - 1})", ld, lt, stream=False)
                worst = max(worst, self.report.pop()[1])
            self.report.append(("lm_head", worst))

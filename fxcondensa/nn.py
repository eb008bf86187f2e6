"""Layers that thinning swaps in where a layer over fewer channels must still compute the dense function.

A normalisation over ``C`` channels of which some are exactly zero equals one over the kept channels that
still divides by ``C``: the zero channels add nothing to ``sum(x)`` or to ``sum((x - mean)^2)`` except the
``mean^2`` each of them contributes to the variance, which is added back in closed form. An attention whose
heads or head dims were removed keeps the softmax scale of the dense one. Everything is written with plain
torch ops, so the thinned model still traces, scripts and exports (TorchScript, ``torch.export``, ONNX).

Example:
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.LayerNorm(6).eval()
    >>> x = torch.randn(2, 6)
    >>> x[:, 4:] = 0                                  # the last two channels are exactly zero
    >>> thin = WidthLayerNorm(4, width=6, eps=dense.eps, weight=dense.weight[:4], bias=dense.bias[:4])
    >>> torch.allclose(thin(x[:, :4]), dense(x)[:, :4], atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["WidthLayerNorm", "WidthRMSNorm", "ThinMultiheadAttention", "layer_norm_width", "rms_norm_width",
           "mean_width", "window_attention", "grouped_mm_aligned", "mask_experts"]


def mask_experts(logits: torch.Tensor, removed: tuple[int, ...]) -> torch.Tensor:
    """Router ``logits`` (experts on the last dim) with the ``removed`` experts' logits at ``-inf``.

    What a compressed mixture-of-experts layer computes in place of its router's output: an expert at
    ``-inf`` gets zero probability after a softmax and is never among the top-k, so the layer equals one
    whose router rows and expert weights of ``removed`` are gone (a zero logit would still be routed to).

    Example:
        >>> import torch
        >>> p = torch.softmax(mask_experts(torch.tensor([[1.0, 2.0, 3.0]]), (2,)), -1)
        >>> p[0, 2].item(), torch.allclose(p[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), -1))
        (0.0, True)
    """
    index = torch.tensor(removed, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def grouped_mm_aligned(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(x, weight, offs)`` for widths its kernel refuses (rows not a multiple of 16 bytes:
    a thinned bfloat16 expert): both widths are padded with zero columns, which add exact zeros to every sum,
    and the padded output columns are cut off again.

    Example:
        >>> import torch
        >>> x, w = torch.randn(6, 5, dtype=torch.bfloat16), torch.randn(2, 5, 3, dtype=torch.bfloat16)
        >>> offs = torch.tensor([4, 6], dtype=torch.int32)
        >>> y = grouped_mm_aligned(x, w, offs)
        >>> y.shape, torch.equal(y[:4], x[:4] @ w[0])
        (torch.Size([6, 3]), True)
    """
    step = max(1, 16 // x.element_size())
    k, n = weight.shape[-2], weight.shape[-1]
    pk, pn = -k % step, -n % step
    if pk == pn == 0:
        return torch._grouped_mm(x, weight, offs)
    x = torch.nn.functional.pad(x, (0, pk)).contiguous()
    weight = torch.nn.functional.pad(weight, (0, pn, 0, pk)).contiguous()
    return torch._grouped_mm(x, weight, offs)[:, :n]


def layer_norm_width(x: torch.Tensor, width: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float, dim: int = -1) -> torch.Tensor:
    """LayerNorm over ``dim`` of ``x`` as if ``width - x.shape[dim]`` more channels, all zero, were there.

    The variance is summed around the mean (not ``E[x^2] - mean^2``, which cancels badly in float32), and
    each missing zero channel adds ``mean^2`` to it.
    """
    missing = width - x.shape[dim]
    total = x.sum(dim, keepdim=True)
    centred = torch.add(x, total, alpha=-1.0 / width)
    # Written for speed, measured on vit_b_32's 8x50x368 stream (CPU fp32, torch 2.14): one pass for the
    # sum of squares (vector_norm) and one for the affine (addcmul), and no out-of-place arithmetic with a
    # Python number (``t * 0.5`` costs about 30 us of scalar wrapping even on a [8, 50, 1] tensor; ``alpha=``
    # and ``value=`` arguments do not). Alternating in one process: 574 us per call against 803 us for the
    # plain form; a native LayerNorm over the kept channels (a different function) takes 275 us.
    norm = torch.linalg.vector_norm(centred, 2, dim, keepdim=True)
    squares = torch.addcmul(norm * norm, total, total, value=missing / (width * width))  # + missing * mean^2
    rstd = torch.rsqrt(torch.add(squares.new_full((), eps), squares, alpha=1.0 / width))
    y = centred * rstd
    if weight is not None and bias is not None:
        return torch.addcmul(_along(bias, dim, x.dim()), y, _along(weight, dim, x.dim()))
    if weight is not None:
        y = y * _along(weight, dim, x.dim())
    if bias is not None:
        y = y + _along(bias, dim, x.dim())
    return y


def rms_norm_width(x: torch.Tensor, width: int, weight: torch.Tensor | None, eps: float,
                   dim: int = -1) -> torch.Tensor:
    """RMSNorm over ``dim`` of ``x`` as if ``width - x.shape[dim]`` more zero channels were there."""
    norm = torch.linalg.vector_norm(x, 2, dim, keepdim=True)  # one pass; no Python-number arithmetic (above)
    y = x * torch.rsqrt(torch.addcmul(norm.new_full((), eps), norm, norm, value=1.0 / width))
    if weight is not None:
        y = y * _along(weight, dim, x.dim())
    return y


def mean_width(x: torch.Tensor, dim: int, keepdim: bool, width: int) -> torch.Tensor:
    """``x.mean(dim, keepdim)`` as if ``width - x.shape[dim]`` more zero channels were there (Llama's
    ``hidden.pow(2).mean(-1, keepdim=True)`` over a thinned stream)."""
    return x.sum(dim, keepdim=keepdim) / width


def _along(t: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``dim`` of an ``ndim``-dim tensor."""
    d = dim % ndim
    shape = [1] * ndim
    shape[d] = -1
    return t.reshape(shape)


class WidthLayerNorm(nn.Module):
    """LayerNorm over the kept channels of a thinned model that still divides by the dense ``width``.

    ``dim`` is the channel dim (-1 channels-last, 1 for a channels-first LayerNorm2d).

    Example:
        >>> m = WidthLayerNorm(3, width=8)
        >>> m(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, channels: int, *, width: int, eps: float = 1e-5, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, dim: int = -1):
        super().__init__()
        if width < channels:
            raise ValueError(f"WidthLayerNorm keeps {channels} channels of a dense width of {width}: the width "
                             "must be at least the kept count")
        self.channels, self.width, self.eps, self.dim = int(channels), int(width), float(eps), int(dim)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_width(x, self.width, self.weight, self.bias, self.eps, self.dim)

    def extra_repr(self) -> str:
        return f"{self.channels}, width={self.width}, eps={self.eps}, dim={self.dim}"


class WidthRMSNorm(nn.Module):
    """RMSNorm over the kept channels of a thinned model that still divides by the dense ``width``.

    Example:
        >>> WidthRMSNorm(3, width=8, eps=1e-6)(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, channels: int, *, width: int, eps: float = 1e-6, weight: torch.Tensor | None = None,
                 dim: int = -1):
        super().__init__()
        if width < channels:
            raise ValueError(f"WidthRMSNorm keeps {channels} channels of a dense width of {width}: the width "
                             "must be at least the kept count")
        self.channels, self.width, self.eps, self.dim = int(channels), int(width), float(eps), int(dim)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_width(x, self.width, self.weight, self.eps, self.dim)

    def extra_repr(self) -> str:
        return f"{self.channels}, width={self.width}, eps={self.eps}, dim={self.dim}"


class ThinMultiheadAttention(nn.Module):
    """Self-attention of a thinned ``nn.MultiheadAttention``: ``num_heads`` heads of ``head_dim`` each, input
    and output widths of their own, and the dense model's softmax ``scale`` (``1 / sqrt(dense head_dim)``).

    Called like the module it replaces (``attn(x, x, x, need_weights=False)``) and returns ``(output,
    None)``; the analysis only swaps it in where the attention weights are not used.

    Example:
        >>> m = ThinMultiheadAttention(torch.randn(6, 5), torch.zeros(6), torch.randn(4, 2), torch.zeros(4),
        ...                            num_heads=1, head_dim=2, scale=0.5, batch_first=True)
        >>> m(torch.randn(3, 7, 5), None, None)[0].shape
        torch.Size([3, 7, 4])
    """

    def __init__(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, out_weight: torch.Tensor,
                 out_bias: torch.Tensor | None, *, num_heads: int, head_dim: int, scale: float, batch_first: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = int(num_heads), int(head_dim), float(scale)
        self.batch_first = bool(batch_first)
        self.in_proj_weight = nn.Parameter(in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(in_proj_bias.detach().clone()) if in_proj_bias is not None else None
        self.out_weight = nn.Parameter(out_weight.detach().clone())
        self.out_bias = nn.Parameter(out_bias.detach().clone()) if out_bias is not None else None

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = query if self.batch_first else query.transpose(0, 1)
        b, n = x.shape[0], x.shape[1]
        qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        mask: torch.Tensor | None = None
        if attn_mask is not None:
            mask = _float_mask(attn_mask, q.dtype)
        if key_padding_mask is not None:
            pad = _float_mask(key_padding_mask, q.dtype).reshape(b, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        # The fused kernel with the dense model's scale (head_dim is the dense one, but say it explicitly).
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        out = torch.nn.functional.linear(out, self.out_weight, self.out_bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.6g}, "
                f"batch_first={self.batch_first}")


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``nn.MultiheadAttention``'s mask convention: True (or a bool) masks out; a float mask is added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def default_scale(head_dim: int) -> float:
    """The softmax scale of a dense attention with heads of ``head_dim``."""
    return 1.0 / math.sqrt(head_dim)


def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                     shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                     logit_scale: torch.Tensor | None = None, training: bool = True,
                     head_dim: int = 0, scale: float | None = None) -> torch.Tensor:
    """Swin's shifted-window self-attention (torchvision's ``shifted_window_attention``, channels last) with
    ``num_heads`` heads of an explicit ``head_dim``, so that its input and output widths, head count and
    head_dim can differ after thinning. ``scale`` is the softmax scale of the dense model (``1 / sqrt(dense
    head_dim)``; None: ``head_dim ** -0.5``, right while head_dim is the dense one); Swin V2's cosine
    attention (``logit_scale`` given) has no such scale, and its key bias is zeroed as torchvision does.

    Example:
        >>> x = torch.randn(1, 4, 4, 6)
        >>> out = window_attention(x, torch.randn(12, 6), torch.randn(5, 4), torch.zeros(1, 2, 4, 4), [2, 2],
        ...                        2, [0, 0], head_dim=2, scale=0.5)   # 2 heads of 2 columns, 6 -> 5 channels
        >>> out.shape
        torch.Size([1, 4, 4, 5])
    """
    b, h, w, c = input.shape
    ws0, ws1 = window_size[0], window_size[1]
    x = torch.nn.functional.pad(input, (0, 0, 0, (ws1 - w % ws1) % ws1, 0, (ws0 - h % ws0) % ws0))
    ph, pw = x.shape[1], x.shape[2]
    s0 = 0 if ws0 >= ph else shift_size[0]
    s1 = 0 if ws1 >= pw else shift_size[1]
    shifted = s0 + s1 > 0
    if shifted:
        x = torch.roll(x, shifts=(-s0, -s1), dims=(1, 2))
    nh, nw, n = ph // ws0, pw // ws1, ws0 * ws1
    x = x.view(b, nh, ws0, nw, ws1, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
    if logit_scale is not None and qkv_bias is not None:  # Swin V2 uses no key bias, whatever the parameter holds
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    qkv = torch.nn.functional.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.shape[0], n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # Swin V2's cosine attention: zero columns add nothing to the norms
        attn = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (head_dim ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if shifted:
        mask = _shift_mask(ph, pw, ws0, ws1, s0, s1, x)
        attn = attn.view(b, nh * nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = torch.nn.functional.dropout(torch.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], n, num_heads * head_dim)
    x = torch.nn.functional.dropout(torch.nn.functional.linear(x, proj_weight, proj_bias), p=dropout,
                                    training=training)
    c_out = proj_weight.shape[0]
    x = x.view(b, nh, nw, ws0, ws1, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if shifted:
        x = torch.roll(x, shifts=(s0, s1), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _shift_mask(ph: int, pw: int, ws0: int, ws1: int, s0: int, s1: int, like: torch.Tensor) -> torch.Tensor:
    """-100 between tokens of one window that came from different regions of the rolled image, else 0.

    Regions are assigned with Python's slice semantics on the same bounds as torchvision (a zero shift makes
    ``-0`` a start of 0), so the mask is the dense model's exactly."""
    ids = like.new_zeros((ph, pw))
    count = 0
    for h0, h1 in ((0, -ws0), (-ws0, -s0), (-s0, None)):
        for w0, w1 in ((0, -ws1), (-ws1, -s1), (-s1, None)):
            ids[h0:h1, w0:w1] = count
            count += 1
    ids = ids.view(ph // ws0, ws0, pw // ws1, ws1).permute(0, 2, 1, 3).reshape(-1, ws0 * ws1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

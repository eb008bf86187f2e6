"""Fuzzing ``thin`` over randomly composed architectures.

A hypothesis strategy stacks building blocks into small random networks: convs of every kind (plain, grouped,
depthwise, dilated, transposed, grouped transposed; 1d, 2d and 3d), norms (BatchNorm, GroupNorm, LayerNorm
over channels, InstanceNorm), gates (``x * sigmoid(conv(x))``, squeeze-excitation, a GLU over ``chunk``),
channel cats and splits, attention (``nn.MultiheadAttention``, hand-written q/k/v heads, SDPA), pools, pads,
tied weights (one conv applied twice, one Linear shared by two heads), residual adds and one, two (tuple) or
two named (dict) outputs. For each network and a random ``StructurePrune`` (density, attention option),
``thin`` must not raise, its result must equal the compressed model on fresh inputs (any channel group it
could not thin is frozen with a reason in the record), and the result must pickle and compute the same after
``pickle.loads``. Both ``output="graph"`` and ``thin``'s default output are checked (and ``"auto"``, the
user's class where it can follow, while the default is the graph).

The number of examples comes from the hypothesis profile in conftest.py: few in CI, many with ``make fuzz``.
The networks complement ``test_fuzz.py`` (the save/load/export pipeline on conv nets) and
``test_thin_properties.py`` (random masks and criteria on a 2d conv menu).
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.passes.own_graphs import ThinnedForward
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
SIZES = {1: 12, 2: 6, 3: 3}  # spatial size of the inputs per dimensionality: few tokens, cheap convs
ATTENTION = ("mha", "qkv", "sdpa")
BLOCKS = ("conv", "grouped", "depthwise", "dilated", "convT", "convT_grouped", "residual", "tied", "gate", "se",
          "glu", "cat", "split", "pool", "pad", "attention")
NORMS = ("bn", "gn", "ln", "in", "none")


def conv_cls(dim: int, transposed: bool = False) -> type[nn.Module]:
    return getattr(nn, f"ConvTranspose{dim}d" if transposed else f"Conv{dim}d")


class ChannelNorm(nn.Module):
    """One of the norms over the channel dim (dim 1) of an N-d map; ``ln`` is a LayerNorm over channels,
    applied channels-last as ConvNeXt does."""

    def __init__(self, kind: str, dim: int, c: int):
        super().__init__()
        self.kind = kind
        if kind == "bn":
            self.norm = getattr(nn, f"BatchNorm{dim}d")(c)
        elif kind == "gn":
            self.norm = nn.GroupNorm(next(g for g in (2, 1) if c % g == 0), c)
        elif kind == "ln":
            self.norm = nn.LayerNorm(c)
        elif kind == "in":
            self.norm = getattr(nn, f"InstanceNorm{dim}d")(c, affine=True)
        else:
            self.norm = nn.Identity()

    def forward(self, x):
        if self.kind == "ln":
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self.norm(x)


class Attention(nn.Module):
    """Self-attention over the positions of a map, pre-norm and residual, in one of three codings."""

    def __init__(self, kind: str, c: int, heads: int):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.width = heads * max(1, c // heads)  # the attention's inner width: whole heads
        self.norm = nn.LayerNorm(c)
        if kind == "mha":
            self.pre = nn.Linear(c, self.width)
            self.mha = nn.MultiheadAttention(self.width, heads, batch_first=True)
            self.out = nn.Linear(self.width, c)
        else:
            self.q, self.k, self.v = (nn.Linear(c, self.width) for _ in range(3))
            self.out = nn.Linear(self.width, c)

    def forward(self, x):
        t = self.norm(x.flatten(2).transpose(1, 2))  # (batch, positions, channels)
        if self.kind == "mha":
            u = self.pre(t)
            a = self.mha(u, u, u)[0]
        else:
            b, n, _ = t.shape
            hd = self.width // self.heads
            q, k, v = (p(t).reshape(b, n, self.heads, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
            if self.kind == "sdpa":
                a = F.scaled_dot_product_attention(q, k, v)
            else:
                a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
            a = a.transpose(1, 2).reshape(b, n, self.width)
        return x + self.out(a).transpose(1, 2).reshape_as(x)


class Block(nn.Module):
    """One building block; ``kind`` and ``variant`` are fixed at construction, so capture sees straight-line
    code. ``self.cout`` is its number of output channels."""

    def __init__(self, kind: str, dim: int, cin: int, width: int, norm: str, variant: int, size: int):
        super().__init__()
        self.kind, self.dim, self.variant = kind, dim, variant
        conv, half = conv_cls(dim), max(1, width // 2)
        self.cout = width
        if kind in ("conv", "dilated"):
            d = 2 if kind == "dilated" else 1
            self.conv, self.norm = conv(cin, width, 3, padding=d, dilation=d), ChannelNorm(norm, dim, width)
        elif kind == "grouped":  # a 1x1 conv makes the input a multiple of the groups
            self.pre = conv(cin, 2 * half, 1)
            self.conv = conv(2 * half, 2 * width, 3, padding=1, groups=2)
            self.norm, self.cout = ChannelNorm(norm, dim, 2 * width), 2 * width
        elif kind == "depthwise":
            self.conv, self.norm, self.cout = conv(cin, cin, 3, padding=1, groups=cin), ChannelNorm(norm, dim, cin), cin
        elif kind == "convT":
            self.conv, self.norm = conv_cls(dim, True)(cin, width, 3, padding=1), ChannelNorm(norm, dim, width)
        elif kind == "convT_grouped":
            self.pre = conv(cin, 2 * half, 1)
            self.conv = conv_cls(dim, True)(2 * half, 2 * width, 3, padding=1, groups=2)
            self.norm, self.cout = ChannelNorm(norm, dim, 2 * width), 2 * width
        elif kind == "residual":
            self.a, self.na = conv(cin, width, 3, padding=1), ChannelNorm(norm, dim, width)
            self.b, self.nb = conv(width, cin, 3, padding=1), ChannelNorm(norm, dim, cin)
            self.cout = cin
        elif kind == "tied":  # one conv applied twice
            self.conv, self.cout = conv(cin, cin, 3, padding=1), cin
        elif kind == "gate":
            self.a, self.b = conv(cin, width, 1), conv(cin, width, 3, padding=1)
        elif kind == "se":
            self.s1, self.s2, self.cout = conv(cin, half, 1), conv(half, cin, 1), cin
        elif kind == "glu":  # a 2w-channel conv whose halves gate each other
            self.conv = conv(cin, 2 * width, 1)
        elif kind == "cat":
            self.a, self.b, self.cout = conv(cin, width, 1), conv(cin, half, 3, padding=1), width + half
        elif kind == "split":  # a part of the channels goes through a conv, the rest passes
            self.pre, self.conv = conv(cin, width + half, 1), conv(width, width, 3, padding=1)
            self.cout = width + half
        elif kind == "pool":
            self.cout = cin
        elif kind == "pad":
            pads = [nn.ZeroPad2d(1) if dim == 2 else getattr(nn, f"ConstantPad{dim}d")(1, 0.0),
                    getattr(nn, f"ReflectionPad{dim}d")(1), getattr(nn, f"ReplicationPad{dim}d")(1), None]
            # reflection needs more positions than the pad: a map pooled down to one position is replicated
            self.pad = pads[variant % 4] if size > 1 or variant % 4 != 1 else pads[2]
            self.conv, self.norm = conv(cin, width, 3), ChannelNorm(norm, dim, width)
        elif kind == "attention":
            self.attn, self.cout = Attention(ATTENTION[variant % 3], cin, 1 + variant % 2), cin
        else:  # pragma: no cover - the strategy draws only BLOCKS
            raise AssertionError(kind)

    def forward(self, x):
        k = self.kind
        if k in ("conv", "dilated", "depthwise", "convT"):
            return F.relu(self.norm(self.conv(x)))
        if k in ("grouped", "convT_grouped"):
            return F.silu(self.norm(self.conv(F.relu(self.pre(x)))))
        if k == "residual":
            return F.relu(x + self.nb(self.b(F.relu(self.na(self.a(x))))))
        if k == "tied":
            return self.conv(F.relu(self.conv(x)))
        if k == "gate":
            return self.a(x) * torch.sigmoid(self.b(x))
        if k == "se":
            s = x.mean(tuple(range(2, 2 + self.dim)), keepdim=True)
            return x * torch.sigmoid(self.s2(F.relu(self.s1(s))))
        if k == "glu":
            a, b = self.conv(x).chunk(2, dim=1)
            return a * torch.sigmoid(b)
        if k == "cat":
            return torch.cat([self.a(x), F.gelu(self.b(x))], dim=1)
        if k == "split":
            a, b = torch.split(F.relu(self.pre(x)), [self.conv.in_channels, self.cout - self.conv.in_channels], 1)
            return torch.cat([self.conv(a), b], dim=1)
        if k == "pool":
            return self._pool(x)
        if k == "pad":
            x = F.pad(x, [1] * 2 * self.dim) if self.pad is None else self.pad(x)
            return F.relu(self.norm(self.conv(x)))
        return self.attn(x)

    def _pool(self, x):
        d, v = self.dim, self.variant % 4
        if v == 0:
            return getattr(F, f"max_pool{d}d")(x, 2, ceil_mode=True)
        if v == 1:
            return getattr(F, f"avg_pool{d}d")(x, 3, stride=1, padding=1)
        if v == 2:  # an adaptive pool to the input's own size keeps every position
            return getattr(F, f"adaptive_max_pool{d}d")(x, SIZES[d])
        return getattr(F, f"adaptive_avg_pool{d}d")(x, 2)


def pooled_size(size: int, variant: int, dim: int) -> int:
    """The spatial size after ``Block._pool`` of this ``variant``."""
    return [-(-size // 2), size, SIZES[dim], 2][variant % 4]


class Net(nn.Module):
    """A stem, the blocks, and one head or two (``outputs``: "tensor", "tuple" or "dict"); with two heads the
    class head's Linear is shared by both (``tied_head``) or each has its own."""

    def __init__(self, dim: int, stem: int, blocks: list[tuple[str, int, str, int]], outputs: str,
                 tied_head: bool, hidden: int, *, export: bool = False):
        super().__init__()
        self.outputs, self.tied_head, self.dim, self.export = outputs, tied_head, dim, export
        self.stem = conv_cls(dim)(3, stem, 3, padding=1)
        c, size, layers = stem, SIZES[dim], []
        for kind, width, norm, variant in blocks:
            layers.append(Block(kind, dim, c, width, norm, variant, size))
            c = layers[-1].cout
            size = pooled_size(size, variant, dim) if kind == "pool" else size
        self.blocks = nn.Sequential(*layers)
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, 3)
        if outputs != "tensor":
            self.other = self.fc1 if tied_head else nn.Linear(c, hidden)
            self.map = conv_cls(dim)(c, 2, 1)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        # ``export``: the positions counted at run time, which torch.fx cannot trace (range of a Proxy), so that
        # ``thin`` captures the model with torch.export instead
        positions = tuple(range(2, x.dim() if self.export else 2 + self.dim))
        pooled = x.mean(positions)
        logits = self.fc2(F.relu(self.fc1(pooled)))
        if self.outputs == "tensor":
            return logits
        # the second head: the max over positions through the (maybe shared) Linear, plus a 1x1 conv map
        peak = self.other(x.amax(positions))
        second = self.map(x) * peak.mean(1).reshape([-1] + [1] * (len(positions) + 1))
        return (logits, second) if self.outputs == "tuple" else {"logits": logits, "map": second}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random norm affines, statistics and biases, so that no channel is special by construction."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if not isinstance(t, torch.Tensor) or isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and name == "weight":
                    continue
                r = torch.rand(t.shape, generator=g)
                t.copy_(r + 0.5 if name in ("weight", "running_var") else (r - 0.5))
    return model.eval()


@st.composite
def architectures(draw):
    dim = draw(st.sampled_from([2, 2, 2, 1, 3]))
    stem = draw(st.integers(2, 6))
    blocks = draw(st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(1, 6), st.sampled_from(NORMS),
                                     st.integers(0, 11)), min_size=1, max_size=4))
    outputs = draw(st.sampled_from(["tensor", "tuple", "dict"]))
    tied_head, hidden, seed = draw(st.booleans()), draw(st.integers(2, 6)), draw(st.integers(0, 2**16))
    export = draw(st.sampled_from([False, False, True]))
    note(f"Net(dim={dim}, stem={stem}, blocks={blocks}, outputs={outputs!r}, tied_head={tied_head}, "
         f"hidden={hidden}, export={export}), seed={seed}")
    torch.manual_seed(seed)
    model = randomize(Net(dim, stem, blocks, outputs, tied_head, hidden, export=export), seed)
    return model, (1, 3) + (SIZES[dim],) * dim


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat(out[k])]
    return [t for o in out for t in flat(o)]


def same(got, want, what: str) -> None:
    got, want = flat(got), flat(want)
    assert len(got) == len(want), f"{what}: {len(got)} outputs vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"{what}, output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), f"{what}, output {i}: max abs difference {(a - b).abs().max():.3g}"


def run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def thin_outputs() -> list[str | None]:
    """``output="graph"``, the default (None), and ``"auto"`` while the default is still the graph."""
    default = inspect.signature(fxcondensa.thin).parameters["output"].default
    return ["graph", None] + (["auto"] if default == "graph" else [])


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, Attention) for m in model.modules())


def has_mha(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# A few examples in CI (each captures, compresses and thins a model three times: about 2-5 s on a loaded
# 2-core machine); ``make fuzz`` (HYPOTHESIS_PROFILE=long) runs the long profile's count.
EXAMPLES = settings().max_examples if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 6


@settings(max_examples=EXAMPLES)
@given(architectures(), st.floats(0.05, 1.0), st.sampled_from([None, "keep", "heads", "head_dim", "both"]),
       st.integers(0, 999))
def test_random_architectures_thin_exact_or_frozen_with_a_reason_and_pickle(drawn, density, attention, seed):
    model, shape = drawn
    if attention in ("heads", "head_dim", "both") and not has_attention(model):
        attention = None  # these refuse a model without attention heads, by design (tests of their own cover it)
    # a known gap, not a crash of this property: see the xfail test below
    assume(not (attention in ("head_dim", "both") and model.export and has_mha(model)))
    scheme = StructurePrune(density, attention=attention)
    note(f"scheme={scheme!r}")
    gen = torch.Generator().manual_seed(seed)
    x, fresh = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 2
    want = run(fxcondensa.compress(model, scheme, x), fresh)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for output in thin_outputs():
        kwargs = {} if output is None else {"output": output}
        small = fxcondensa.thin(model, scheme, x, **kwargs)
        what = f"thin(output={output!r})"
        same(run(small, fresh), want, f"{what} vs compressed")
        record = thin_record(small)
        assert record is not None, what
        for frozen in record.frozen:
            assert frozen.reason.strip(), f"{what}: group {frozen.group} frozen without a reason"
        for group in record.groups:
            assert 1 <= group.kept <= group.channels, group
        assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in model.parameters()), what
        carved = [name for name, m in small.named_modules() if isinstance(m, ThinnedForward)]
        if carved:
            # Submodules that run as their thinned graphs are generated code: pickle refuses them by design,
            # naming one and the way to save; save_thinned / load_thinned rebuild them from the dense model.
            with pytest.raises(TypeError, match="save_thinned"):
                pickle.dumps(small)
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "small.pt")
                fxcondensa.save_thinned(small, path)
                again = fxcondensa.load_thinned(path, model)
            same(run(again, fresh), want, f"{what}, saved and loaded")
        else:
            same(run(pickle.loads(pickle.dumps(small)), fresh), want, f"{what}, pickled and loaded")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "thin changed the user's model"


# -- regressions found by the fuzzer -----------------------------------------------------------------------
class MovedimNorm(nn.Module):
    """A LayerNorm over channels applied channels-last through ``movedim`` (tuple and int forms), between convs."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.LayerNorm(6), nn.Conv2d(6, 4, 1)
        self.c = nn.Conv1d(4, 5, 1)

    def forward(self, x):
        y = self.b(F.relu(self.norm(self.a(x).movedim(1, -1)).movedim(-1, 1)))
        y = torch.movedim(y.flatten(2), (1, 2), (2, 1))  # (batch, positions, channels)
        return self.c(F.relu(y).moveaxis(2, 1))


def test_movedim_moves_the_channel_dim_instead_of_freezing_it():
    """``movedim`` was read as a reshape: the channel dim "mixed", every conv around it frozen."""
    model = randomize(MovedimNorm(), 0)
    x = torch.randn(1, 3, 5, 5)
    scheme = StructurePrune(0.5)
    small = fxcondensa.thin(model, scheme, x, output="graph")
    same(run(small, x * 2), run(fxcondensa.compress(model, scheme, x), x * 2), "thinned vs compressed")
    record = thin_record(small)
    assert not any("mixes the channel dim" in f.reason for f in record.frozen), record.frozen
    assert next(g for g in record.groups if "b" in g.producers).kept < 4


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "known gap: under torch.export capture, nn.MultiheadAttention is decomposed and its packed in-projection "
    "reshape (unflatten to (3, embed)) is read as mixing the channel dim, so attention='head_dim'/'both' "
    "find no heads and raise ValueError (torch.fx keeps the module whole and thins its heads)"))
def test_head_dim_on_multihead_attention_captured_by_export():
    torch.manual_seed(0)
    model = randomize(Net(2, 4, [("attention", 4, "none", 0)], "tensor", False, 4, export=True), 0)
    x = torch.randn(1, 3, SIZES[2], SIZES[2])
    small = fxcondensa.thin(model, StructurePrune(0.5, attention="head_dim"), x)
    same(run(small, x), run(fxcondensa.compress(model, StructurePrune(0.5, attention="head_dim"), x), x), "thin")

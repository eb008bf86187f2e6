"""Fuzzing: random models from the supported ops, random schemes, random inputs.

compress, thin, save/load (compressed and thinned) and TorchScript export of a valid random model with a
valid random scheme return models whose outputs equal the compressed model's. docs/catalogue.md documents
no error for such inputs (its errors are for bad densities, inputs, files and untraceable code), so any
exception fails the test; the loaders given random bytes raise ``FileFormatError`` with the message the
catalogue gives for a foreign or truncated file. The number of examples comes from the hypothesis profile
in conftest.py (bounded in CI; ``make fuzz`` runs the long profile).
"""

from __future__ import annotations

import os
import re
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa.schemes import Compose, FilterPrune, NeuronPrune, Prune, StructurePrune

RTOL, ATOL = 1e-4, 1e-5


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    """One block of a random network; ``kind`` is fixed at construction, so tracing sees straight-line code."""

    def __init__(self, kind: str, cin: int, width: int):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.body = conv_bn(cin, width, 3)
            self.cout = width
        elif kind == "residual":
            self.a = conv_bn(cin, cin, 3)
            self.b = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.BatchNorm2d(cin))
            self.cout = cin
        elif kind == "cat":
            self.a = conv_bn(cin, width, 1)
            self.b = conv_bn(cin, max(1, width // 2), 3)
            self.cout = width + max(1, width // 2)
        elif kind == "depthwise":
            self.body = conv_bn(cin, cin, 3, groups=cin)
            self.cout = cin
        elif kind == "se":
            self.fc1 = nn.Conv2d(cin, max(1, cin // 2), 1)
            self.fc2 = nn.Conv2d(max(1, cin // 2), cin, 1)
            self.cout = cin
        elif kind == "pool":
            self.cout = cin
        else:  # pragma: no cover - the strategy only draws the kinds above
            raise AssertionError(kind)

    def forward(self, x):
        if self.kind in ("conv", "depthwise"):
            return self.body(x)
        if self.kind == "residual":
            return F.relu(self.b(self.a(x)) + x)
        if self.kind == "cat":
            return torch.cat([self.a(x), self.b(x)], 1)
        if self.kind == "se":
            gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            return x * gate
        return F.max_pool2d(x, 2, ceil_mode=True)


class Net(nn.Module):
    def __init__(self, kinds: list[str], widths: list[int], head: str, size: int, hidden: int):
        super().__init__()
        self.stem = conv_bn(3, widths[0], 3)
        blocks, c = [], widths[0]
        for kind, w in zip(kinds, widths[1:], strict=False):
            blocks.append(Block(kind, c, w))
            c = blocks[-1].cout
            size = -(-size // 2) if kind == "pool" else size
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        features = c * size * size if head == "flatten" else c
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.flatten(x, 1) if self.head == "flatten" else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


KINDS = ["conv", "residual", "cat", "depthwise", "se", "pool"]


@st.composite
def models(draw):
    n = draw(st.integers(0, 4))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=n, max_size=n))
    widths = draw(st.lists(st.integers(1, 8), min_size=n + 1, max_size=n + 1))
    head = draw(st.sampled_from(["gap", "flatten"]))
    size = draw(st.integers(2, 6))
    hidden = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = Net(kinds, widths, head, size, hidden)
    with torch.no_grad():  # moved BatchNorm statistics, so that buffers matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    batch = draw(st.integers(1, 3))
    note(f"kinds={kinds} widths={widths} head={head} size={size} hidden={hidden} seed={seed} batch={batch}")
    return model.eval(), (batch, 3, size, size)


densities = st.floats(0.01, 1.0, allow_nan=False)
aligns = st.one_of(st.none(), st.integers(1, 4))


def structured(cls):
    return st.builds(cls, densities, aligns)


schemes = st.one_of(
    st.builds(Prune, densities),
    structured(StructurePrune),
    structured(FilterPrune),
    structured(NeuronPrune),
    st.builds(lambda a, b: Compose([a, b]), structured(StructurePrune), st.builds(Prune, densities)),
)


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), f"{what}: max abs difference {(a - b).abs().max():.3g}"


def pipeline(model: nn.Module, scheme, shape: tuple[int, ...], folder: str) -> None:
    x = torch.randn(shape)
    fresh = torch.randn(shape)
    compressed = fxcondensa.compress(model, scheme, x)
    small = fxcondensa.thin(model, scheme, x)
    with torch.no_grad():
        ref = compressed.eval()(fresh)
        same(small.eval()(fresh), ref, "thinned vs compressed")

        fxcondensa.save_compressed(compressed, os.path.join(folder, "m.fxc"))
        same(fxcondensa.load_compressed(os.path.join(folder, "m.fxc"), model).eval()(fresh), ref, "load_compressed")

        fxcondensa.save_thinned(small, os.path.join(folder, "m.thin"))
        loaded = fxcondensa.load_thinned(os.path.join(folder, "m.thin"), model)
        same(loaded.eval()(fresh), ref, "load_thinned")

        # The exporter reloads the file and checks it against the thinned model, which equals ``ref``.
        fxcondensa.files.export.torchscript(small, os.path.join(folder, "m.pt"), x)


@given(models(), schemes)
def test_pipeline_raises_nothing_and_keeps_outputs(drawn, scheme):
    model, shape = drawn
    note(f"scheme={scheme!r}")
    with tempfile.TemporaryDirectory() as folder:
        pipeline(model, scheme, shape, folder)


@given(st.binary(max_size=2048), st.sampled_from(["load_compressed", "load_thinned"]))
def test_loaders_refuse_random_bytes(data, loader):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "random.bin")
        with open(path, "wb") as f:
            f.write(data)
        what = "thinned-model" if loader == "load_thinned" else "compressed-model"
        expected = (rf"^{re.escape(path)} is not a readable fxcondensa file \(truncated, or another format\): "
                    rf"|^{re.escape(path)} is not an fxcondensa {what} file")
        with pytest.raises(fxcondensa.FileFormatError, match=expected):
            getattr(fxcondensa, loader)(path, fxcondensa.models.LeNet5())


# -- regressions found by the fuzzer -----------------------------------------------------------------------
class CatSE(nn.Module):
    """A concat whose channels are then gated (squeeze-excitation): a, b and fc2 are one channel group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 1, 1)
        self.fc1 = nn.Conv2d(5, 2, 1)
        self.fc2 = nn.Conv2d(2, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], 1)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x.mean((2, 3)))


def test_a_concat_input_whose_channels_all_go():
    torch.manual_seed(0)
    model = CatSE().eval()
    with torch.no_grad():
        model.b.weight.mul_(0.01)  # b's single filter scores lowest in its group
    x = torch.randn(1, 3, 4, 4)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    same(small(x), fxcondensa.compress(model, StructurePrune(0.5), x)(x), "thinned vs compressed")

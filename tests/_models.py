"""Small models shared by the foundation tests (plain helpers, no fixtures).

LeNet5 comes from ``fxcondensa.models`` (the tutorial's network); the others are tiny graphs that cover
buffers (BatchNorm running statistics), convolutions and parameter sharing.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fxcondensa.models import LeNet5

__all__ = ["Crash", "crashing_criterion", "LeNet5", "MLP", "ConvBN", "Tied", "state_hash", "lenet_input", "make_mlp", "make_convnet"]


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear, so that buffers travel with the parameters."""

    def __init__(self, sizes: tuple[int, ...] = (8, 16, 4)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pooled Linear head."""

    def __init__(self, cin: int = 3, cmid: int = 8, k: int = 3, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(cin, cmid, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(cmid)
        self.head = nn.Linear(cmid, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class Tied(nn.Module):
    """Two Linear layers sharing one weight: the state dict names the same tensor twice."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, n)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def make_mlp(sizes: tuple[int, ...], seed: int = 0) -> MLP:
    """An MLP with random weights and non-trivial BatchNorm statistics (a few training-mode passes)."""
    torch.manual_seed(seed)
    model = MLP(sizes)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, sizes[0]))
    return model.eval()


def make_convnet(cin: int, cmid: int, k: int, seed: int = 0) -> ConvBN:
    """A ConvBN with random weights and moved BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ConvBN(cin, cmid, k)
    with torch.no_grad():
        model(torch.randn(4, cin, 6, 6))
    return model.eval()


def lenet_input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28)


def state_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, bytes): equal iff the state is equal."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def bench_coverage() -> ModuleType:
    """``bench/coverage.py`` (the zoos, their builders and randomisation), loaded by path: a package named
    ``coverage`` (pytest-cov) may already be imported under that name."""
    spec = importlib.util.spec_from_file_location(
        "fxcondensa_bench_coverage", Path(__file__).resolve().parent.parent / "bench" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Crash(Exception):
    """Raised by ``crashing_criterion``: a process killed in the middle of training, for resume tests."""


def crashing_criterion(at: int):
    """Cross-entropy that raises ``Crash`` on its ``at``-th call (counting every evaluation and SGD step)."""
    calls = 0

    def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == at:
            raise Crash
        return nn.functional.cross_entropy(out, y)

    return criterion


def small_llama(dtype: torch.dtype, *, hidden: int = 64, layers: int = 1) -> nn.Module:
    """A ``LlamaForCausalLM`` from a small GQA config (4 heads, 2 key/value heads, vocabulary 96), random
    weights with every constant randomised, in ``dtype``."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    bench_coverage().randomize_constants(model)
    return model.to(dtype)


def llama_tokens(length: int = 8) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``small_llama``: one sequence of ``length`` token ids, nothing masked."""
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 96, (1, length), generator=g),
            "attention_mask": torch.ones(1, length, dtype=torch.long)}

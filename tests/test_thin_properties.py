"""Property-based tests: random small conv graphs, random schemes and random masks; thinned == compressed.

Graphs are built from a fixed menu of supported ops (conv + BatchNorm, residual add/sub, elementwise mul,
concat, depthwise and grouped convs, squeeze-excitation, GroupNorm, transposed conv, pooling, and three
heads: pooled Linear, flattened Linear, conv). ``HYPOTHESIS_PROFILE=long`` runs many more examples
(profiles are registered in ``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st
from test_channels import randomize
from torch import nn

import fxcondensa
from fxcondensa import compress, thin
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import FilterPrune, NeuronPrune, StructurePrune

RTOL, ATOL = 1e-4, 1e-5
SIZE = 4  # spatial size of the inputs

ACTS = {
    "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish,
    "tanh": torch.tanh, "leaky_relu": F.leaky_relu, "identity": lambda x: x, "method_relu": lambda x: x.relu(),
}
BLOCKS = ["conv", "add", "sub", "mul", "cat", "dw", "grouped", "grouped_unequal", "se", "gn", "convT", "pool"]
HEADS = ["gap", "flatten", "conv"]


class Block(nn.Module):
    """One block of the menu; ``self.cout`` is its number of output channels."""

    def __init__(self, kind: str, cin: int, out: int, bn: bool, act: str):
        super().__init__()
        self.kind, self.act = kind, act
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        half = max(1, out // 2)
        if kind == "conv":
            self.conv, self.bn, self.cout = nn.Conv2d(cin, out, 3, padding=1), norm(out), out
        elif kind in ("add", "sub"):
            self.conv, self.bn, self.cout = nn.Conv2d(cin, cin, 3, padding=1), norm(cin), cin
        elif kind == "mul":
            self.a, self.b, self.cout = nn.Conv2d(cin, out, 1), nn.Conv2d(cin, out, 3, padding=1), out
        elif kind == "cat":
            self.a, self.b, self.cout = nn.Conv2d(cin, out, 1), nn.Conv2d(cin, half, 3, padding=1), out + half
        elif kind == "dw":
            self.conv, self.bn, self.cout = nn.Conv2d(cin, cin, 3, padding=1, groups=cin), norm(cin), cin
        elif kind == "grouped":
            self.pre = nn.Conv2d(cin, 2 * half, 1)
            self.conv, self.bn, self.cout = nn.Conv2d(2 * half, 2 * half, 3, padding=1, groups=2), norm(2 * half), 2 * half
        elif kind == "grouped_unequal":
            self.pre = nn.Conv2d(cin, 2 * half, 1)
            self.conv, self.bn = nn.Conv2d(2 * half, 2 * half + 2, 3, padding=1, groups=2), norm(2 * half + 2)
            self.cout = 2 * half + 2
        elif kind == "se":
            r = max(1, cin // 2)
            self.s1, self.s2, self.cout = nn.Conv2d(cin, r, 1), nn.Conv2d(r, cin, 1), cin
        elif kind == "gn":
            self.conv, self.gn, self.cout = nn.Conv2d(cin, 2 * half, 3, padding=1), nn.GroupNorm(half, 2 * half), 2 * half
        elif kind == "convT":
            self.conv, self.bn, self.cout = nn.ConvTranspose2d(cin, out, 3, padding=1), norm(out), out
        elif kind == "pool":
            self.cout = cin
        else:  # pragma: no cover - the menu is fixed
            raise AssertionError(kind)

    def forward(self, x):
        act = ACTS[self.act]
        k = self.kind
        if k in ("conv", "dw", "convT"):
            return act(self.bn(self.conv(x)))
        if k == "add":
            return act(x + self.bn(self.conv(x)))
        if k == "sub":
            return act(self.bn(self.conv(x)) - x)
        if k == "mul":
            return act(self.a(x) * torch.sigmoid(self.b(x)))
        if k == "cat":
            return act(torch.cat([self.a(x), self.b(x)], dim=1))
        if k in ("grouped", "grouped_unequal"):
            return act(self.bn(self.conv(F.relu(self.pre(x)))))
        if k == "se":
            s = F.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.s2(F.relu(self.s1(s))))
        if k == "gn":
            return act(self.gn(self.conv(x)))
        return F.max_pool2d(x, 3, stride=1, padding=1) if self.act == "relu" else F.avg_pool2d(x, 3, 1, 1)


class RandNet(nn.Module):
    def __init__(self, stem: int, blocks: list[tuple[str, int, bool, str]], head: str, hidden: int):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        c = stem
        self.blocks = nn.ModuleList()
        for kind, out, bn, act in blocks:
            b = Block(kind, c, out, bn, act)
            self.blocks.append(b)
            c = b.cout
        self.head = head
        if head == "gap":
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, 3)
        elif head == "flatten":
            self.fc1 = nn.Linear(c * SIZE * SIZE, 3)
        else:
            self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        if self.head == "gap":
            return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        if self.head == "flatten":
            return self.fc1(torch.flatten(x, 1))
        return self.out(x)


@st.composite
def nets(draw) -> RandNet:
    stem = draw(st.integers(2, 6))
    blocks = draw(st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(2, 7), st.booleans(),
                                     st.sampled_from(sorted(ACTS))), min_size=1, max_size=4))
    head = draw(st.sampled_from(HEADS))
    hidden = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**16))
    note(f"RandNet(stem={stem}, blocks={blocks}, head={head!r}, hidden={hidden}), seed={seed}")
    torch.manual_seed(seed)
    return randomize(RandNet(stem, blocks, head, hidden), seed)


def inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CRITERIA = ["l2norm", "max", "min", "mean", "sum"]


@given(model=nets(), density=st.floats(0.05, 1.0), criteria=st.sampled_from(CRITERIA),
       align=st.sampled_from([None, 2, 4, 8]), prune_bias=st.booleans(),
       cls=st.sampled_from([StructurePrune, StructurePrune, FilterPrune, NeuronPrune]), seed=st.integers(0, 999))
def test_random_graphs_random_schemes(model, density, criteria, align, prune_bias, cls, seed):
    scheme = cls(density, align=align, criteria=criteria, prune_bias=prune_bias)
    x = inputs(2, seed)
    thinned = thin(model, scheme, x)
    compressed = compress(model, scheme, x)
    for xi in (inputs(3, seed + 1), inputs(1, seed + 2) * 4):
        torch.testing.assert_close(outputs(thinned, xi), outputs(compressed, xi), rtol=RTOL, atol=ATOL)
    assert n_params(thinned) <= n_params(model)
    for g in thin_record(thinned).groups:
        assert 1 <= g.kept <= g.channels, g
        if align and not g.frozen and g.kept < g.channels and g.producers and cls is StructurePrune:
            # a group that kept fewer than all its channels kept a multiple of align (grouped convs may
            # add channels to balance their conv groups, which are then whole multiples again)
            assert g.kept % align == 0 or any(isinstance(m, nn.Conv2d) and m.groups > 1
                                                 for m in model.modules()), g


def _zero_channels(model: RandNet, draw) -> list[str]:
    """Zero random output channels of random producers by hand (with their bias and BatchNorm)."""
    done = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
                continue
            if not draw(st.booleans()):
                continue
            n = m.weight.shape[1] if isinstance(m, nn.ConvTranspose2d) else m.weight.shape[0]
            idx = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
            what = draw(st.sampled_from(["all", "all", "weight_only"]))
            if isinstance(m, nn.ConvTranspose2d):
                m.weight[:, idx] = 0
            else:
                m.weight[idx] = 0
            if m.bias is not None and what == "all":
                m.bias[idx] = 0
            done.append(f"{name}{idx}:{what}")
            # the BatchNorm right after a conv of a block, with it
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            bn = getattr(parent, "bn", None)
            if what == "all" and isinstance(bn, nn.BatchNorm2d) and name.endswith(".conv") and bn.num_features == n:
                bn.weight[idx] = 0
                bn.bias[idx] = 0
    return done


@given(model=nets(), data=st.data(), seed=st.integers(0, 999))
def test_random_graphs_random_masks(model, data, seed):
    done = _zero_channels(model, data.draw)
    note(f"zeroed: {done}")
    x = inputs(2, seed)
    before = n_params(model)
    thinned = thin(model, example_inputs=x)
    for xi in (inputs(3, seed + 1), inputs(1, seed + 2) * 4):
        torch.testing.assert_close(outputs(thinned, xi), outputs(model, xi), rtol=RTOL, atol=ATOL)
    assert n_params(thinned) <= before
    # Thinning again never grows the model and still computes the same. It can remove more: a tied grouped
    # conv left with one conv group becomes a plain conv, whose input channels can then go on their own.
    again = thin(thinned, example_inputs=x)
    assert n_params(again) <= n_params(thinned)
    torch.testing.assert_close(outputs(again, x), outputs(thinned, x), rtol=RTOL, atol=ATOL)


@given(model=nets(), seed=st.integers(0, 999))
def test_thin_without_scheme_after_compress_matches_thin_with_scheme(model, seed):
    x = inputs(2, seed)
    scheme = StructurePrune(0.5)
    compressed = compress(model, scheme, x)
    assert n_params(thin(compressed, example_inputs=x)) == n_params(thin(model, scheme, x))


def test_the_menu_builds_every_block_and_head():
    """The strategies can reach every block and head: build each once, thin it, compare."""
    for head in HEADS:
        for kind in BLOCKS:
            torch.manual_seed(0)
            model = randomize(RandNet(4, [(kind, 5, True, "relu"), ("conv", 3, False, "silu")], head, 4))
            x = inputs(2, 0)
            thinned = thin(model, StructurePrune(0.4), x)
            torch.testing.assert_close(outputs(thinned, inputs(3, 1)),
                                       outputs(compress(model, StructurePrune(0.4), x), inputs(3, 1)),
                                       rtol=RTOL, atol=ATOL)
            # the thinned graph traces again, and the retrace computes the same
            retraced = fxcondensa.trace(thinned, x)
            torch.testing.assert_close(outputs(retraced, inputs(3, 1)), outputs(thinned, inputs(3, 1)))


@pytest.mark.parametrize("kind", ["add", "mul", "cat", "dw", "grouped", "se", "gn", "convT"])
def test_menu_blocks_are_thinned(kind):
    """Each thinnable block really loses channels (so the properties above are not vacuous)."""
    torch.manual_seed(0)
    model = randomize(RandNet(6, [(kind, 6, True, "relu"), ("conv", 6, True, "relu")], "gap", 6))
    thinned = thin(model, StructurePrune(0.3, layers={"*": 0.3}), inputs(2, 0))
    assert n_params(thinned) < n_params(model)


def test_align_holds_when_a_concatenated_part_gets_its_channel_back():
    """Found by the property above: a cat of a 3-channel and a 1-channel conv at density 0.5 kept the 1-channel
    part's channel after the rounding to ``align`` (it cannot keep none), so the group kept 3, not a multiple
    of 2. The part's channel is now restored before the rounding."""
    torch.manual_seed(0)
    model = randomize(RandNet(2, [("cat", 3, False, "gelu"), ("add", 2, False, "gelu")], "gap", 2), 0)
    scheme = StructurePrune(0.5, align=2, criteria="l2norm", prune_bias=True)
    thinned = thin(model, scheme, inputs(2, 0))
    torch.testing.assert_close(outputs(thinned, inputs(3, 1)), outputs(compress(model, scheme, inputs(2, 0)), inputs(3, 1)),
                               rtol=RTOL, atol=ATOL)
    cat_group = next(g for g in thin_record(thinned).groups if "blocks.0.b" in g.producers)
    assert cat_group.kept % 2 == 0, cat_group

"""Reach of the channel analysis: layers and call forms it used to crash on, freeze without a reason, or treat
differently under the two capture frontends. Each thinned model is compared with the compressed dense one."""

from __future__ import annotations

import io
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from _models import state_hash
from torch import nn

import fxcondensa
from fxcondensa import thin, trace
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, norm affines and biases included (no parameter is left at its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + 0.5 if "var" in name else torch.randn(b.shape, generator=g))
    return model.eval()


def _thin_exact(model: nn.Module, x, *, capture: str = "auto", scheme=None) -> torch.fx.GraphModule:
    """Thin ``model`` and check it against the compressed dense model on fresh inputs (the reference)."""
    scheme = scheme or StructurePrune(0.5)
    before = state_hash(model)
    small = thin(model, scheme, x, capture=capture)
    assert state_hash(model) == before, "the input model was modified"
    dense = trace(model, x, capture=capture)
    with torch.no_grad():
        scheme.pi(dense)
        scheme.delta(dense)
        fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(small(fresh), dense(fresh), rtol=RTOL, atol=ATOL)
    return small


# -- crashes found by random architectures -------------------------------------------------------------

@pytest.mark.parametrize("cin,cout,groups", [(8, 24, 2), (8, 8, 8), (6, 12, 3)])
def test_grouped_transposed_conv_thins_exactly(cin, cout, groups):
    # Its weight holds out_channels // groups on dim 1: scoring used to index it with every output channel.
    model = _randomized(nn.Sequential(nn.Conv2d(4, cin, 1), nn.ReLU(),
                                      nn.ConvTranspose2d(cin, cout, 3, padding=1, groups=groups), nn.ReLU(),
                                      nn.Conv2d(cout, 4, 1)))
    small = _thin_exact(model, torch.randn(1, 4, 8, 8))
    t = small.get_submodule("2")
    assert t.out_channels < cout and t.in_channels <= cin
    if cin == cout == groups:  # depthwise: whole conv groups go
        assert t.groups == t.out_channels == t.in_channels
    else:  # every conv group keeps the same count
        assert t.groups == groups and t.out_channels % groups == 0 and t.in_channels % groups == 0
    assert _params(small) < _params(model)


def test_the_grouped_transposed_conv_of_the_report_thins():
    model = _randomized(nn.Sequential(nn.ConvTranspose2d(8, 24, 3, padding=1, groups=2), nn.ReLU(),
                                      nn.Conv2d(24, 4, 1)))
    small = _thin_exact(model, torch.randn(1, 8, 8, 8))
    assert small.get_submodule("0").out_channels < 24


class MaxPools(nn.Module):
    """Calls the pooling functions torch builds with a factory (``boolean_dispatch``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv1d(8, 4, 1)

    def forward(self, x):
        y = F.adaptive_max_pool2d(F.max_pool2d(self.a(x), 2), 2)
        return self.b(F.max_pool1d(y.flatten(2), 2, return_indices=False))


@pytest.mark.parametrize("kind", ["trace", "compress", "thin"])
def test_a_model_calling_max_pool_functions_pickles(kind):
    model, x = _randomized(MaxPools()), torch.randn(1, 3, 12, 12)
    gm = {"trace": lambda: trace(model, x),
          "compress": lambda: fxcondensa.compress(model, StructurePrune(0.5), x, output="graph"),
          "thin": lambda: thin(model, StructurePrune(0.5), x, output="graph")}[kind]()
    buf = io.BytesIO()
    torch.save(gm, buf)
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    twice = pickle.loads(pickle.dumps(gm))
    with torch.no_grad():
        torch.testing.assert_close(again(x), gm(x))
        torch.testing.assert_close(twice(x), gm(x))
    # Reloaded graphs call the same functions, so the channel analysis still knows them.
    assert [n.target for n in again.graph.nodes] == [n.target for n in gm.graph.nodes]
    if kind == "thin":
        assert thin_record(again).frozen == thin_record(gm).frozen


# -- a linear layer written as a matmul -----------------------------------------------------------------

class MatLinear(nn.Linear):
    """transformers' ``FalconLinear``: ``nn.Linear``'s parameters, applied as a matmul."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Transposes(nn.Module):
    """The other spellings of ``x @ W.T`` and ``x @ W`` (a weight stored as ``(in, out)``)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.w1 = nn.Parameter(torch.randn(6, 16) if form == "x @ W" else torch.randn(16, 6))
        self.w2 = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        w = {"x @ W": self.w1, "W.t()": self.w1.t(), "transpose": self.w1.transpose(0, 1),
             "mT": self.w1.mT, "permute": self.w1.permute(1, 0), "matmul": self.w1.T}[self.form]
        h = torch.relu(torch.matmul(x, w) if self.form == "matmul" else x @ w)
        return h @ self.w2.transpose(-1, -2)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_linear_written_as_a_matmul_thins(capture):
    model = _randomized(nn.Sequential(MatLinear(6, 16), nn.ReLU(), MatLinear(16, 4)))
    small = _thin_exact(model, torch.randn(3, 5, 6), capture=capture)
    rec = thin_record(small)
    assert [g.group for g in rec.groups] == ["0", "2"] and rec.groups[0].kept < 16
    assert _params(small) == 16 // 2 * (6 + 1) + 4 * (16 // 2 + 1)  # half of the hidden layer goes


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", ["x @ W", "W.t()", "transpose", "mT", "permute", "matmul"])
def test_every_spelling_of_a_matmul_by_a_weight_thins(form, capture):
    model = _randomized(Transposes(form))
    small = _thin_exact(model, torch.randn(3, 6), capture=capture)
    assert small.w1.numel() < model.w1.numel() and small.w2.shape == (4, 8)


class ScaledWeight(nn.Module):
    """A matmul by a weight computed in forward: not a layer the analysis can slice."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 6))
        self.s = nn.Parameter(torch.rand(16, 1) + 0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(x @ (self.w * self.s).T))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_matmul_by_a_computed_weight_is_frozen_with_its_reason(capture):
    model = _randomized(ScaledWeight())
    small = thin(model, StructurePrune(0.5), torch.randn(3, 6), capture=capture)
    rec = thin_record(small)
    assert rec.whole_reason is not None and re.search(r"computed in forward from parameter '[ws]'", rec.whole_reason)
    assert any("matmul" in f.reason and "its output channels are kept" in f.reason for f in rec.frozen)


def test_register_rule_refuses_a_bad_creates():
    def fn(x):
        return x

    with pytest.raises(TypeError, match=r"creates for fn must be True, False or a function\(node\) -> bool, got 'yes'"):
        fxcondensa.register_rule(fn, creates="yes")


# -- a one-channel gate broadcast over many ------------------------------------------------------------

class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a gated MLP scaled by ``sigmoid(Linear(d, 1)(x))``, added to the stream."""

    def __init__(self, d: int = 16, hidden: int = 24):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x)
        expert = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        gated = torch.sigmoid(self.shared_expert_gate(h)) * expert
        gated = gated + expert * torch.sigmoid(self.shared_expert_gate(h))  # either operand order
        return self.head(h + gated)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_channel_gate_broadcast_over_the_stream_thins_the_rest(capture, dtype):
    model = _randomized(SharedExpert()).to(dtype)
    x = torch.randn(2, 5, 8, dtype=dtype)
    small = thin(model, StructurePrune(0.5), x, capture=capture, strict=True)  # no rule fails on the way
    rec = thin_record(small)
    assert rec.rule_failures == 0
    assert small.gate_proj.weight.shape[0] < 24 and small.embed.weight.shape[0] < 16
    assert small.shared_expert_gate.weight.shape == (1, small.embed.weight.shape[0])
    dense = trace(model, x, capture=capture)
    scheme = StructurePrune(0.5)
    with torch.no_grad():
        scheme.pi(dense)
        scheme.delta(dense)
        tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(small(x), dense(x), **tol)


# -- the two capture frontends agree --------------------------------------------------------------------

class TwoLayers(nn.Module):
    """``first`` makes 8 channels, ``op`` acts on them, ``last`` reads them."""

    def __init__(self, op, first=None, last=None):
        super().__init__()
        self.first = first or nn.Conv2d(4, 8, 3, padding=1)
        self.op = op
        self.last = last or nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.first(x)
        return self.last(self.op(y) if isinstance(self.op, nn.Module) else self.op(self, y))


def _split_and_join(self, y):
    a, b = torch.tensor_split(y, 2, dim=2)
    return torch.cat([a, b.relu()], 2)


def _stack_and_sum(self, y):
    return torch.stack([y, y.relu()], 1).sum(1)


PARITY = {
    "conv_transpose2d": lambda: TwoLayers(nn.ReLU(), nn.ConvTranspose2d(4, 8, 3, padding=1),
                                          nn.ConvTranspose2d(8, 3, 3, padding=1)),
    "reshape_as": lambda: TwoLayers(lambda self, y: y.reshape(1, -1).relu().reshape_as(y)),
    "instance_norm": lambda: TwoLayers(nn.InstanceNorm2d(8, affine=True)),
    "adaptive_avg_pool3d": lambda: TwoLayers(nn.AdaptiveAvgPool3d((2, 3, 3)), nn.Conv3d(4, 8, 3, padding=1),
                                             nn.Conv3d(8, 3, 3, padding=1)),
    "dropout_": lambda: TwoLayers(lambda self, y: F.dropout(y, 0.5, False, inplace=True)),
    "ZeroPad2d": lambda: TwoLayers(nn.ZeroPad2d(1)),
    "ReflectionPad2d": lambda: TwoLayers(nn.ReflectionPad2d((1, 0, 2, 1))),
    "stack": lambda: TwoLayers(_stack_and_sum),
    "tensor_split": lambda: TwoLayers(_split_and_join),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_both_captures_thin_two_layer_models_alike(name):
    model = _randomized(PARITY[name]())
    x = torch.randn(1, 4, 4, 6, 6) if name.endswith("3d") else torch.randn(1, 4, 6, 6)
    counts = {}
    for capture in ("fx", "export"):
        small = _thin_exact(model, x, capture=capture)
        counts[capture] = _params(small)
        assert [f.reason for f in thin_record(small).frozen] == ["reaches the graph output ('output')"]
    assert counts["fx"] == counts["export"] < _params(model)


def test_an_instance_norm_with_running_statistics_uses_them():
    # In eval mode it maps a zero channel to bias - weight * mean / std, not to its bias: that channel is not
    # zero after the norm, so it cannot go (it used to, and the thinned model differed).
    norm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
    model = _randomized(TwoLayers(norm))
    with torch.no_grad():
        norm.bias.zero_()
        model.first.weight[:4] = 0
        model.first.bias[:4] = 0
    x = torch.randn(1, 4, 6, 6)
    for capture in ("fx", "export"):
        small = thin(model, None, x, capture=capture)  # raises ThinningCheckError if a live channel went
        assert _params(small) == _params(model)


class Gather(nn.Module):
    """Picks positions along the tokens with ``torch.gather``: every channel reads its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("order", torch.tensor([[3, 1, 4, 1, 0]]).unsqueeze(-1).expand(2, 5, 8).clone())

    def forward(self, x):
        return self.b(torch.gather(torch.relu(self.a(x)), 1, self.order))


def test_both_captures_thin_a_gather_alike():
    model = _randomized(Gather())
    with torch.no_grad():
        model.order.copy_(torch.randint(0, 5, model.order.shape, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(2, 5, 4)
    counts = [_params(_thin_exact(model, x, capture=capture)) for capture in ("fx", "export")]
    assert counts[0] == counts[1] == 8 // 2 * 5 + 3 * (8 // 2 + 1)


class LinearOfComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 6))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.w / self.w.norm(dim=1, keepdim=True))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_linear_of_a_computed_weight_is_frozen_with_its_reason(capture):
    small = thin(_randomized(LinearOfComputedWeight()), StructurePrune(0.5), torch.randn(3, 6), capture=capture)
    assert "uses a weight computed in forward" in (thin_record(small).whole_reason or "")


# -- ATen parity: every op the fx path knows, its export form known too ----------------------------------

# fx-level names whose torch.export capture records another op (or none), with the reason.
EXPORT_FORMS = {
    "concat": "an alias: export records aten.cat", "concatenate": "an alias: export records aten.cat",
    "multiply": "an alias: export records aten.mul", "subtract": "an alias: export records aten.sub",
    "true_divide": "an alias: export records aten.div", "swapaxes": "an alias: export records aten.transpose",
    "moveaxis": "an alias: export records aten.movedim (or aten.permute)",
    "hardtanh_": "functionalized: export records the out-of-place aten.hardtanh",
    "dim": "a shape query: a Python int in an export graph, no op",
    "numel": "a shape query: a symbolic int in an export graph, no op",
    "size": "a shape query: aten.sym_size, which the shape-query entry covers",
    "requires_grad_": "autograd state: no op in an inference graph",
}


def _fx_level_names() -> set[str]:
    from fxcondensa.rules import registry

    names = set(registry._METHODS)
    for key in registry._CALLABLES:
        if not isinstance(key, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            name = getattr(key, "__name__", None)
            if name:
                names.add(name.strip("_") if name.startswith("__") else name)
    return names


def test_every_fx_level_entry_has_its_aten_form_or_a_reason():
    from fxcondensa.rules import register_optional_rules
    from fxcondensa.rules.registry import rule_for_key

    register_optional_rules()
    missing = sorted(n for n in _fx_level_names() if hasattr(torch.ops.aten, n)
                     and rule_for_key(getattr(torch.ops.aten, n)) is None and n not in EXPORT_FORMS)
    assert not missing, f"fx-level entries without their ATen form: {missing}"
    stale = sorted(n for n in EXPORT_FORMS if rule_for_key(getattr(torch.ops.aten, n)) is not None)
    assert not stale, f"listed as exported in another form, but registered: {stale}"

"""The generated forward of trace / compress / thin results looks each submodule container up once per call
(``fxcondensa.capture.codegen``), computes what torch.fx's own code computes, and follows submodules replaced later."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import fxcondensa
from fxcondensa.capture.codegen import LOCAL_PREFIX
from fxcondensa.capture.records import RecordedGraphModule
from fxcondensa.schemes import StructurePrune


class Nested(nn.Module):
    """Containers with identifier and non-identifier names, and a parameter read through ``get_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(8, 8, 1))
        self.head = nn.Module()
        self.head.proj = nn.Linear(8, 4)
        self.head.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).mean((2, 3))
        return self.head.proj(y) * self.head.scale


def plain(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph and modules under torch.fx's own code generation."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def getattr_calls(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> int:
    calls = 0
    original = nn.Module.__getattr__

    def counting(self: nn.Module, name: str) -> object:
        nonlocal calls
        calls += 1
        return original(self, name)

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(nn.Module, "__getattr__", counting)
        model(x)
    return calls


def test_same_outputs_and_locals_in_code() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    gm = fxcondensa.trace(Nested(), x)
    assert isinstance(gm, RecordedGraphModule)
    assert f"{LOCAL_PREFIX}0 = self.body" in gm.code
    assert 'getattr(getattr(self.body, "0"), "0")' not in gm.code  # torch.fx's spelling is gone
    assert torch.equal(gm(x), plain(gm)(x))


def test_each_container_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.fx's code pays one ``Module.__getattr__`` per path component per node; ours one per node and
    one per distinct container. The modules' own forwards (weights, buffers) are the same in both."""
    x = torch.randn(1, 3, 64, 64)
    gm = fxcondensa.trace(torchvision.models.mobilenet_v2().eval(), x)
    paths = [n.target.split(".") for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    containers = {tuple(p[:i]) for p in paths for i in range(1, len(p))}
    saved = sum(len(p) - 1 for p in paths) - len(containers)
    assert saved > 400  # MobileNetV2's nodes sit three to five levels deep
    assert getattr_calls(plain(gm), x, monkeypatch) - getattr_calls(gm, x, monkeypatch) == saved


def test_thinned_model_hoists_and_matches_fx_code() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    small = fxcondensa.thin(torchvision.models.mobilenet_v2().eval(), StructurePrune(0.5), x, output="graph")
    assert f"{LOCAL_PREFIX}0" in small.code
    with torch.no_grad():
        assert torch.equal(small(x), plain(small)(x))


def test_replaced_submodule_is_the_one_that_runs() -> None:
    """Lookups happen on every call: a submodule swapped after tracing (by ``setattr`` or by writing
    ``_modules``, as quantization passes do) runs, exactly as under torch.fx's code."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    gm = fxcondensa.trace(Nested(), x)
    before = gm(x)
    setattr(gm.get_submodule("body.0"), "0", nn.Conv2d(3, 8, 3))
    gm.head._modules["proj"] = nn.Linear(8, 4)
    after = gm(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, plain(gm)(x))


def test_pickle_and_deepcopy_keep_the_code() -> None:
    x = torch.randn(2, 3, 12, 12)
    gm = fxcondensa.trace(Nested(), x)
    for again in (pickle.loads(pickle.dumps(gm)), copy.deepcopy(gm)):
        assert again.code == gm.code
        assert torch.equal(again(x), gm(x))


def test_users_transformer_still_runs() -> None:
    x = torch.randn(2, 3, 12, 12)
    gm = fxcondensa.trace(Nested(), x)
    gm.graph.on_generate_code(lambda prev: (lambda body: ["# user's line\n", *body]))
    gm.recompile()
    assert "# user's line" in gm.code and f"{LOCAL_PREFIX}0" in gm.code
    assert torch.equal(gm(x), plain(gm)(x))


def test_local_names_avoid_node_names() -> None:
    """A node already named like a local keeps its name; the local takes the next free one."""
    graph = fx.Graph()
    inp = graph.placeholder(f"{LOCAL_PREFIX}0")
    graph.output(graph.call_module("body.1", (graph.call_module("body.0.0", (inp,)),)))
    root = nn.Module()
    root.body = Nested().body
    gm = RecordedGraphModule(root, graph)
    x = torch.randn(1, 3, 8, 8)
    assert f"{LOCAL_PREFIX}1 = self.body" in gm.code
    assert torch.equal(gm(x), root.body[1](root.body[0][0](x)))


def test_unrecognised_body_is_left_as_fx_wrote_it() -> None:
    """Another torch version's format (here: no per-node markers) gets no prologue and no rewrite."""
    x = torch.randn(2, 3, 12, 12)
    gm = fxcondensa.trace(Nested(), x)
    from fxcondensa.capture.codegen import hoist_module_paths

    body = ["body_0_0 = getattr(getattr(self.body, \"0\"), \"0\")(x)\n", "return body_0_0\n"]
    assert hoist_module_paths(gm.graph)(body) == body

"""The op registry: one entry per op family, used by the analysis, the cost model and thin; users extend it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import state_hash
from torch import nn

import fxcondensa
from fxcondensa import RuleFailedError, UnknownOpError, compress, register_rule, thin, unregister_rule
from fxcondensa.capture.records import thin_record
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.costs import profile_costs
from fxcondensa.rules.registry import refine_rule, registered_ops, rule_for_key, unrefine_rule
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5


class ChannelScale(nn.Module):
    """A per-channel scale the analysis cannot see into when it is a leaf."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


def scale_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), ChannelScale(16), nn.ReLU(), nn.Conv2d(16, 8, 3))


@pytest.fixture
def scale_rule():
    rule = register_rule(ChannelScale, channels="elementwise", zeros="preserve", params={"weight": 0})
    yield rule
    unregister_rule(ChannelScale)


def _bn_random(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_custom_leaf_module_is_frozen_without_a_rule():
    x = torch.randn(2, 3, 12, 12)
    small = thin(_bn_random(scale_net()), StructurePrune(0.5), x, leaf_modules=[ChannelScale])
    rec = thin_record(small)
    assert small.get_submodule("0").out_channels == 16
    assert any("ChannelScale" in f.reason and "not known" in f.reason for f in rec.frozen), rec.frozen


def test_registered_custom_module_thins_exactly(scale_rule):
    model = _bn_random(scale_net())
    before = state_hash(model)
    x, fresh = torch.randn(2, 3, 12, 12), torch.randn(3, 3, 12, 12)
    scheme = StructurePrune(0.5)
    small = thin(model, scheme, x, leaf_modules=[ChannelScale])
    assert state_hash(model) == before
    assert small.get_submodule("0").out_channels < 16
    assert small.get_submodule("2").weight.numel() == small.get_submodule("0").out_channels
    ref = compress(model, scheme, x, leaf_modules=[ChannelScale]).eval()
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(fresh), ref(fresh), rtol=RTOL, atol=ATOL)
    assert not thin_record(small).frozen[:-1] or all("output" in f.reason for f in thin_record(small).frozen)


def test_registered_rule_is_used_by_the_cost_model(scale_rule):
    costs = {c.layer: c for c in profile_costs(scale_net(), torch.randn(1, 3, 12, 12), leaf_modules=[ChannelScale])}
    assert costs["2"].kind == "elementwise" and costs["2"].macs == 16 * 10 * 10


def test_rule_with_a_custom_cost_and_kind():
    def cost(call):
        return 7 * call.out_numel

    register_rule(ChannelScale, channels="elementwise", zeros="preserve", params={"weight": 0}, cost=cost, kind="norm")
    try:
        costs = {c.layer: c for c in profile_costs(scale_net(), torch.randn(1, 3, 12, 12), leaf_modules=[ChannelScale])}
    finally:
        unregister_rule(ChannelScale)
    assert costs["2"].kind == "norm" and costs["2"].macs == 7 * 16 * 10 * 10


def test_registering_a_rule_invalidates_cached_analyses():
    gm = fxcondensa.trace(scale_net(), torch.randn(1, 3, 12, 12), leaf_modules=[ChannelScale])
    frozen_before = [g.frozen for g in analyze(gm).groups]
    register_rule(ChannelScale, channels="elementwise", zeros="preserve", params={"weight": 0})
    try:
        frozen_after = [g.frozen for g in analyze(gm).groups]
    finally:
        unregister_rule(ChannelScale)
    assert frozen_before[0] and not frozen_after[0]


def test_function_and_method_rules():
    def shifted_relu(x):
        return F.relu(x) * 2.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.b(torch.special.expm1(self.a(x)).relu())

    x = torch.randn(1, 3, 10, 10)
    rec = thin_record(thin(Net(), StructurePrune(0.5), x))
    assert any("expm1" in f.reason for f in rec.frozen)
    register_rule(torch.special.expm1, zeros="preserve")  # expm1(0) == 0
    try:
        small = thin(Net(), StructurePrune(0.5), x)
        assert small.a.out_channels < 8
    finally:
        unregister_rule(torch.special.expm1)
    # A method given as torch.Tensor.<name> or by name: one entry.
    assert rule_for_key(torch.Tensor.relu) is rule_for_key("relu") is not None
    assert rule_for_key(shifted_relu) is None


def test_aten_overloads_share_the_torch_level_rule():
    aten = torch.ops.aten
    assert rule_for_key(aten.relu.default) is rule_for_key(F.relu)
    assert rule_for_key(aten.conv2d.default) is rule_for_key(F.conv2d)
    assert rule_for_key(aten.add.Tensor) is rule_for_key(torch.add)
    assert rule_for_key(aten.view.default) is rule_for_key("view")
    assert rule_for_key(nn.ReLU6) is rule_for_key(nn.Hardtanh)  # subclasses use their base class's entry


def test_each_op_has_exactly_one_entry():
    names = [op for ops in registered_ops().values() for op in ops]
    assert len(names) == len(set(names)), "an op is listed under two rules"
    for op in (nn.Conv2d, nn.LPPool2d, nn.Threshold, nn.LocalResponseNorm, torch.matmul, F.batch_norm):
        assert rule_for_key(op) is not None, op


@pytest.mark.parametrize("layer", [nn.LPPool2d(2, 2), nn.Threshold(-0.5, 0.0), nn.Threshold(0.3, 0.0)])
def test_ops_the_cost_model_knew_now_thin_too(layer):
    # LPPool and Threshold were counted by the cost model but froze their channels: one entry now says both.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.Conv2d(8, 4, 3)).eval()
    x, fresh = torch.randn(1, 3, 16, 16), torch.randn(2, 3, 16, 16)
    small = thin(model, StructurePrune(0.5), x)
    ref = compress(model, StructurePrune(0.5), x).eval()
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(fresh), ref(fresh), rtol=RTOL, atol=ATOL)
    assert small.get_submodule("0").out_channels < 8
    kinds = {c.layer: c.kind for c in profile_costs(model, x)}
    assert kinds["1"] in ("pool", "elementwise")


def test_threshold_that_maps_zero_to_a_value_is_not_zero_preserving():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Threshold(0.5, 2.0), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    # 0 is below the threshold and becomes 2.0: a pruned channel is not zero at the next conv, so it stays.
    small = thin(model, StructurePrune(0.5), x)
    assert small.get_submodule("0").out_channels == 8


# -- strict mode -------------------------------------------------------------------------------------

class UsesErfcx(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.special.erfcx(self.a(x))
        return self.b(y)


def test_strict_raises_on_the_first_unknown_op_with_where_and_what_to_do():
    model = UsesErfcx()
    before = state_hash(model)
    with pytest.raises(UnknownOpError) as err:
        thin(model, StructurePrune(0.5), torch.randn(1, 3, 10, 10), strict=True)
    msg = str(err.value)
    assert "special_erfcx" in msg and "node 'special_erfcx'" in msg
    assert "test_registry.py" in msg and "torch.special.erfcx(self.a(x))" in msg  # the user's source line
    assert "register_rule" in msg and "strict=True" in msg
    assert state_hash(model) == before


def test_strict_names_an_unknown_leaf_module():
    with pytest.raises(UnknownOpError, match=r"ChannelScale"):
        thin(scale_net(), StructurePrune(0.5), torch.randn(1, 3, 12, 12), leaf_modules=[ChannelScale], strict=True)


def test_without_strict_the_unknown_op_freezes_its_group_with_a_reason():
    rec = thin_record(thin(UsesErfcx(), StructurePrune(0.5), torch.randn(1, 3, 10, 10)))
    assert any("special_erfcx" in f.reason and "not known" in f.reason for f in rec.frozen)


def test_strict_passes_where_every_op_is_known():
    import torchvision

    small = thin(torchvision.models.resnet18(), StructurePrune(0.5), torch.randn(1, 3, 32, 32), strict=True)
    assert thin_record(small).rule_failures == 0


def test_a_failing_rule_is_counted_and_strict_turns_it_into_an_error():
    def broken(ctx, node):
        raise RuntimeError("rule bug")

    register_rule(ChannelScale, channels=broken, zeros="custom")
    try:
        x = torch.randn(1, 3, 12, 12)
        rec = thin_record(thin(scale_net(), StructurePrune(0.5), x, leaf_modules=[ChannelScale]))
        assert rec.rule_failures == 1
        assert any("rule bug" in f.reason for f in rec.frozen)
        # The op is known: strict says which rule failed and how, not that the op is unknown.
        with pytest.raises(RuleFailedError, match=r"rule 'ChannelScale' .* failed: RuntimeError: rule bug") as err:
            thin(scale_net(), StructurePrune(0.5), x, leaf_modules=[ChannelScale], strict=True)
        assert not isinstance(err.value, UnknownOpError) and "is not known" not in str(err.value)
    finally:
        unregister_rule(ChannelScale)


# -- bad registrations ---------------------------------------------------------------------------------

def test_register_rule_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"channels for ChannelScale must be 'elementwise', 'freeze'.*'sideways'"):
        register_rule(ChannelScale, channels="sideways")
    with pytest.raises(ValueError, match=r"zeros for ChannelScale must be one of .*'maybe'"):
        register_rule(ChannelScale, zeros="maybe")
    with pytest.raises(TypeError, match=r"the class int, which is not an nn.Module"):
        register_rule(int)
    with pytest.raises(ValueError, match=r"params for relu name attributes of a module"):
        register_rule(F.relu, params={"weight": 0}, replace=True)
    with pytest.raises(ValueError, match=r"ReLU already has a rule .*replace=True"):
        register_rule(nn.ReLU)
    with pytest.raises(KeyError, match=r"ChannelScale has no registered rule"):
        unregister_rule(ChannelScale)
    with pytest.raises(ValueError, match=r"cost for ChannelScale must be 'elementwise', 'none' or a function"):
        register_rule(ChannelScale, cost="cheap")
    with pytest.raises(TypeError, match=r"needs at least one op"):
        register_rule()
    assert rule_for_key(ChannelScale) is None  # nothing was half-registered


# -- refinements ----------------------------------------------------------------------------------------

def test_a_refinement_is_consulted_before_the_entry_and_falls_back_to_it():
    """A refinement that handles a call replaces the entry's rule for it; one that declines leaves the
    analysis exactly as the entry alone makes it."""
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)), torch.randn(1, 3, 8, 8)
    entry = rule_for_key(torch.flatten)
    plain = analyze(fxcondensa.trace(model, x))
    seen = []

    def declines(ctx, node):
        seen.append(node.name)
        return False

    def freezes(ctx, node):
        ctx.freeze_inputs(node, "refined away (test)")
        ctx.output(node, None, None)
        return True

    for fn in (declines, freezes):
        refinement = refine_rule(torch.flatten, channels=fn, name=f"test {fn.__name__}")
        try:
            assert rule_for_key(torch.flatten).refinements[-1] is refinement
            assert rule_for_key("squeeze") is rule_for_key(torch.flatten)  # the whole entry is refined
            a = analyze(fxcondensa.trace(model, x))
        finally:
            unrefine_rule(refinement, torch.flatten)
        if fn is declines:
            assert seen and a.num_channels == plain.num_channels and [g.frozen for g in a.groups] == \
                [g.frozen for g in plain.groups]
        else:
            assert any("refined away (test)" in r for g in a.groups for r in g.frozen)
    assert rule_for_key(torch.flatten) == entry and rule_for_key("squeeze") is rule_for_key(torch.flatten)


def test_ops_refined_by_other_families_keep_one_shared_entry():
    view = rule_for_key("view")
    assert view is rule_for_key(torch.reshape) is rule_for_key(torch.ops.aten.view.default)
    assert [r.name for r in view.refinements] == ["split into heads"]
    assert [r.name for r in rule_for_key(torch.cat).refinements] == ["cat with parameter parts"]
    assert [r.name for r in rule_for_key(torch.mean).refinements] == ["mean over channels"]
    assert len(rule_for_key(torch.mean).rewrites()) == 1


def test_refine_rule_errors_name_the_op():
    def never(ctx, node):
        return False

    with pytest.raises(KeyError, match=r"ChannelScale has no rule to refine \('test'\): register its entry first"):
        refine_rule(ChannelScale, channels=never, name="test")
    refinement = refine_rule(torch.flatten, channels=never, name="test")
    unrefine_rule(refinement, torch.flatten)
    with pytest.raises(KeyError, match=r"flatten has no refinement 'test'"):
        unrefine_rule(refinement, torch.flatten)

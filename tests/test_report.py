"""Report numbers against hand counts on LeNet-5, JSON/CSV carry the table's data, frozen groups listed.

Thinning is stood in for by a LeNet-5 built with fewer channels under the same names (what ``thin``
produces), so these tests do not depend on the thinning pass.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from torch import nn

import fxcondensa
from fxcondensa.capture.records import FrozenGroup, GroupRecord, ThinRecord, thin_record
from fxcondensa.measure.report import Report, report
from fxcondensa.models import LeNet5
from fxcondensa.schemes import Prune

X = torch.randn(1, 1, 28, 28)


def small_lenet(c1: int = 10, c2: int = 25, hidden: int = 250) -> nn.Module:
    """LeNet-5 with fewer channels and neurons, same layer names: a hand-thinned LeNet-5."""
    m = LeNet5()
    m.conv1 = nn.Conv2d(1, c1, 5)
    m.conv2 = nn.Conv2d(c1, c2, 5)
    m.ip1 = nn.Linear(c2 * 16, hidden)
    m.ip2 = nn.Linear(hidden, 10)
    return m


FROZEN = [{"group": "ip2.out", "layers": ["ip2"], "reason": "graph output: the model's outputs keep their size"}]


def thinned_stand_in(groups: list[GroupRecord] | None = None) -> nn.Module:
    """The hand-thinned LeNet-5 with the record ``thin`` leaves (conv1 lost channels; ip2's group frozen)."""
    gm = fxcondensa.trace(small_lenet(), X)
    groups = groups if groups is not None else [GroupRecord("conv1", ("conv1",), 20, 10),
                                                GroupRecord("ip2.out", ("ip2",), 10, 10, FROZEN[0]["reason"])]
    gm.meta["fxcondensa"] = ThinRecord(
        keep=torch.ones(sum(g.channels for g in groups), dtype=torch.bool), input_shapes=[[1, 1, 28, 28]],
        input_dtypes=["float32"], groups=groups,
        frozen=[FrozenGroup(g["group"], tuple(g["layers"]), g["reason"]) for g in FROZEN])
    return gm


@pytest.fixture(scope="module")
def rep() -> Report:
    return report(LeNet5(), thinned_stand_in(), X, latency=False)


def test_rows_match_hand_counts(rep):
    rows = {r.layer: r for r in rep.rows}
    conv1, conv2, ip1, ip2 = rows["conv1"], rows["conv2"], rows["ip1"], rows["ip2"]
    assert (conv1.macs_before, conv1.macs_after) == (20 * 24 * 24 * 25, 10 * 24 * 24 * 25)
    assert (conv2.macs_before, conv2.macs_after) == (50 * 8 * 8 * 20 * 25, 25 * 8 * 8 * 10 * 25)
    assert (ip1.macs_before, ip1.macs_after) == (500 * 800, 250 * 400)
    assert (ip2.macs_before, ip2.macs_after) == (10 * 500, 10 * 250)
    assert (conv1.params_before, conv1.params_after) == (20 * 25 + 20, 10 * 25 + 10)
    assert conv1.density == pytest.approx((10 * 25 + 10) / (20 * 25 + 20))
    assert conv1.output_shape_before == (1, 20, 24, 24) and conv1.output_shape_after == (1, 10, 24, 24)
    assert conv2.input_shape_before == (1, 20, 12, 12) and conv2.input_shape_after == (1, 10, 12, 12)
    assert rows["view"].output_shape_after == (1, 400) and rows["view"].type == "view"
    assert conv1.type == "Conv2d" and conv1.kind == "conv"
    assert "size" not in rows  # x.size(0) is not a layer
    assert [r.layer for r in rep.rows][:3] == ["conv1", "relu_conv1", "pool1"]  # graph order


def test_totals_and_ratios(rep):
    t = rep.totals
    assert t["params_before"] == 431080
    params_after = sum(p.numel() for p in small_lenet().parameters())
    assert t["params_after"] == params_after
    assert t["params_ratio"] == pytest.approx(431080 / params_after)
    macs_before = 288000 + 11520 + 11520 + 1600000 + 3200 + 3200 + 400000 + 500 + 5000
    assert t["macs_before"] == macs_before
    assert t["macs_ratio"] == pytest.approx(macs_before / t["macs_after"])
    assert t["latency_before"] is None and t["speedup"] is None
    assert all(r.latency_before_ms is None for r in rep.rows)


def test_json_and_csv_carry_the_same_rows(rep):
    data = json.loads(rep.to_json())
    table = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [r["layer"] for r in table] == [r["layer"] for r in data["rows"]] + ["TOTAL"]
    for j, c in zip(data["rows"], table, strict=False):
        for key, value in j.items():
            if isinstance(value, list):
                assert c[key] == "x".join(map(str, value))
            elif value is None:
                assert c[key] == ""
            elif isinstance(value, float):
                assert float(c[key]) == pytest.approx(value)
            else:
                assert c[key] == str(value)
    total = table[-1]
    assert int(total["macs_before"]) == data["totals"]["macs_before"]
    assert int(total["params_after"]) == data["totals"]["params_after"]


def test_frozen_groups_listed_beneath_the_table_and_in_data(rep):
    text = str(rep)
    table_end = text.index("TOTAL")
    assert text.index("frozen channel groups") > table_end
    assert "ip2.out" in text and "graph output" in text
    assert json.loads(rep.to_json())["frozen"] == FROZEN
    assert {r.layer: r.frozen for r in rep.rows}["ip2"].startswith("graph output")
    assert "graph output" in rep.to_csv()


def test_a_model_left_whole_says_why_at_the_top():
    whole = thinned_stand_in([GroupRecord("ip2.out", ("ip2",), 10, 10, FROZEN[0]["reason"])])
    rep = report(LeNet5(), whole, X, latency=False)
    first = str(rep).splitlines()[0]
    assert first == f"left whole: every channel group is frozen: {FROZEN[0]['reason']}"
    assert json.loads(rep.to_json())["whole_reason"] == first.removeprefix("left whole: ")


def test_a_thinned_model_has_no_whole_reason(rep):
    assert rep.whole_reason is None and not str(rep).startswith("left whole")


def test_rendering_shows_before_and_after(rep):
    text = str(rep)
    assert "1x20x24x24 -> 1x10x24x24" in text
    assert "Conv2d" in text and "MACs" in text and "latency ms" in text


def test_compressed_model_report_density_and_latency():
    model = LeNet5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = report(model, fxcondensa.compress(model, Prune(0.1)), X, latency=True, warmup=1, repeat=2)
    assert rep.totals["density"] == pytest.approx(fxcondensa.density(fxcondensa.compress(model, Prune(0.1))),
                                                  abs=0.01)
    assert rep.totals["macs_before"] == rep.totals["macs_after"]  # zeros are still multiplied
    assert rep.totals["latency_before"]["repeat"] == 2 and rep.totals["speedup"] is not None
    assert all(r.latency_after_ms is not None for r in rep.rows)
    assert len(rep.notes) == 2 and "whole-model median" in rep.notes[0]
    assert "speed-up" in str(rep) and rep.frozen == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_on_a_real_thinned_model_lists_its_frozen_groups():
    from fxcondensa.schemes import StructurePrune

    model = LeNet5()
    thinned = fxcondensa.thin(model, StructurePrune(0.3), X)
    rep = report(model, thinned, X, latency=False)
    rows = {r.layer: r for r in rep.rows}
    kept = thinned.conv1.out_channels
    assert rows["conv1"].macs_after == kept * 24 * 24 * 25 and rows["conv1"].output_shape_after[1] == kept
    record = thin_record(thinned)
    assert rep.frozen == [{"group": f.group, "layers": list(f.layers), "reason": f.reason} for f in record.frozen]
    assert rep.frozen
    assert all(g["group"] in str(rep) and g["reason"] in str(rep) for g in rep.frozen)


def test_report_shows_the_mac_target_and_what_was_reached():
    import torch

    import fxcondensa
    from fxcondensa.schemes import StructurePrune

    model, x = fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28)
    small = fxcondensa.thin(model, StructurePrune(target_flops=0.4), x)
    r = fxcondensa.report(model, small, x, latency=False)
    target = r.totals["flop_target"]
    assert target["target"] == 0.4 and target["reached"] <= 0.4
    assert abs(r.totals["macs_after"] / r.totals["macs_before"] - target["reached"]) < 0.02
    assert "MAC target: 0.400" in str(r)

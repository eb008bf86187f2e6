"""MACs and parameter counts against hand counts; latency measurement structure (never its values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fxcondensa.measure.latency import Latency, compare_latency, measure_latency, node_latency
from fxcondensa.models import LeNet5
from fxcondensa.passes.costs import profile_costs


def by_layer(model: nn.Module, *shape: int) -> dict:
    return {c.layer: c for c in profile_costs(model, torch.randn(*shape))}


def test_lenet5_macs_and_params_match_hand_counts():
    c = by_layer(LeNet5(), 1, 1, 28, 28)
    assert c["conv1"].macs == 20 * 24 * 24 * (1 * 5 * 5)
    assert c["conv2"].macs == 50 * 8 * 8 * (20 * 5 * 5)
    assert c["ip1"].macs == 500 * 800
    assert c["ip2"].macs == 10 * 500
    assert c["relu_conv1"].macs == 20 * 24 * 24  # one per element
    assert c["pool1"].macs == 20 * 12 * 12 * 4  # output elements x 2x2 window
    assert c["view"].macs == 0 and c["view"].kind == "shape"
    assert c["conv1"].params == 20 * 25 + 20
    assert c["conv2"].params == 50 * 20 * 25 + 50
    assert c["ip1"].params == 800 * 500 + 500
    assert sum(x.params for x in c.values()) == sum(p.numel() for p in LeNet5().parameters())
    assert c["conv1"].input_shapes == ((1, 1, 28, 28),) and c["conv1"].output_shape == (1, 20, 24, 24)


def test_batch_size_scales_macs_not_params():
    one, four = by_layer(LeNet5(), 1, 1, 28, 28), by_layer(LeNet5(), 4, 1, 28, 28)
    assert four["conv2"].macs == 4 * one["conv2"].macs
    assert four["conv2"].params == one["conv2"].params


def test_grouped_and_depthwise_conv():
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    assert by_layer(nn.Sequential(grouped), 1, 8, 10, 10)["0"].macs == 16 * 10 * 10 * (2 * 3 * 3)
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    assert by_layer(nn.Sequential(depthwise), 2, 8, 6, 6)["0"].macs == 2 * 8 * 4 * 4 * 9


def test_conv_transpose_counts_input_elements_times_kernel():
    ct = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    c = by_layer(nn.Sequential(ct), 1, 4, 5, 5)["0"]
    assert c.kind == "conv_transpose" and c.macs == 4 * 5 * 5 * 3 * 9


def test_linear_on_3d_input():
    c = by_layer(nn.Sequential(nn.Linear(7, 3)), 2, 5, 7)["0"]
    assert c.macs == 2 * 5 * 3 * 7 and c.params == 7 * 3 + 3


class Functional(nn.Module):
    """Parameters read through get_attr by functional calls; matmul, bmm, norm and pooling."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.fc = nn.Parameter(torch.randn(4, 6))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x, a, b):
        y = F.conv2d(x, self.w)  # 1x6x6x6
        y = self.bn(y)
        y = F.max_pool2d(y, 2)  # 1x6x3x3
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)  # 1x6
        y = F.linear(y, self.fc)  # 1x4
        return y + torch.bmm(a, b).sum() + (a @ b).mean()


def test_functional_ops_and_matmul():
    x, a, b = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    c = {k.name: k for k in profile_costs(Functional(), (x, a, b))}
    assert c["conv2d"].macs == 6 * 6 * 6 * 27 and c["conv2d"].params == 6 * 27
    assert c["bn"].kind == "norm" and c["bn"].macs == 6 * 6 * 6
    assert c["max_pool2d"].macs == 6 * 3 * 3 * 4
    assert c["adaptive_avg_pool2d"].macs == 6 * 3 * 3
    assert c["linear"].macs == 4 * 6 and c["linear"].params == 24
    assert c["bmm"].macs == 2 * 3 * 5 * 4
    assert c["matmul"].macs == 2 * 3 * 5 * 4


def test_shared_module_parameters_counted_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    costs = profile_costs(Twice(), torch.randn(1, 4))
    assert [c.params for c in costs] == [20, 0] and [c.macs for c in costs] == [16, 16]


def test_nonzero_params_count_pruned_zeros():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight[0].zero_()
    c = by_layer(model, 1, 4)["0"]
    assert (c.params, c.nonzero_params) == (8, 4)


def test_profile_without_shapes_says_how_to_get_them():
    with pytest.raises(ValueError, match="example_inputs"):
        profile_costs(LeNet5())


def test_measure_latency_records_its_conditions_and_restores_training_mode():
    model = LeNet5().train()
    lat = measure_latency(model, torch.randn(3, 1, 28, 28), warmup=1, repeat=4)
    assert isinstance(lat, Latency)
    assert (lat.repeat, lat.warmup, lat.batch_size, lat.device) == (4, 1, 3, "cpu")
    assert lat.threads == torch.get_num_threads()
    assert lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms <= lat.max_ms
    assert lat.iqr_ms == lat.q3_ms - lat.q1_ms and "ms median" in str(lat)
    assert model.training and all(m.training for m in model.modules())


def _latency(median: float, q1: float, q3: float, repeat: int = 10) -> Latency:
    return Latency(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=q1, max_ms=q3, repeat=repeat, warmup=1, threads=1,
                   batch_size=1, device="cpu")


def test_noisy_means_an_iqr_above_a_quarter_of_the_median():
    assert _latency(1.0, 0.9, 1.1).noisy is False  # IQR 0.2 of the median
    assert _latency(1.0, 0.8, 1.3).noisy is True  # IQR 0.5
    assert _latency(1.0, 0.8, 1.3, repeat=3).noisy is False  # too few runs to judge
    assert _latency(2.0, 1.5, 2.5).iqr_ms == 1.0


@pytest.mark.parametrize("kw", [{"repeat": 0}, {"warmup": -1}, {"repeat": 2.5}])
def test_measure_latency_rejects_bad_counts(kw):
    with pytest.raises(ValueError, match="warmup|repeat"):
        measure_latency(LeNet5(), torch.randn(1, 1, 28, 28), **kw)


def test_node_latency_times_every_computing_node():
    lat = node_latency(LeNet5(), torch.randn(1, 1, 28, 28), warmup=1, repeat=2)
    assert {"conv1", "conv2", "ip1", "ip2", "view"} <= set(lat.per_node_ms)
    assert "x" not in lat.per_node_ms and "output" not in lat.per_node_ms
    assert lat.sum_ms == pytest.approx(sum(lat.per_node_ms.values()))
    assert lat.whole.repeat == 2 and "whole-model median" in lat.note()


def test_compare_latency_alternates_and_keeps_order():
    calls: list[str] = []

    class Tag(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    a, b = compare_latency([Tag("a"), Tag("b")], torch.zeros(2, 3), warmup=1, repeat=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up each, then alternate, rotating
    assert a.repeat == b.repeat == 3 and a.batch_size == 2

    # Regression: the order rotates, so no model always runs right after the same one (a thinned model timed
    # after its dense model always met the caches the dense one left; it read up to 10% slower than alone).
    calls.clear()
    timed = compare_latency([Tag("dense"), Tag("thin"), Tag("peer")], torch.zeros(1, 3), warmup=0, repeat=3)
    assert calls == ["dense", "thin", "peer", "dense", "peer", "thin", "thin", "dense", "peer"]
    assert [t.repeat for t in timed] == [3, 3, 3]
    before = {m: {calls[i - 1] for i in range(1, len(calls)) if calls[i] == m} for m in ("dense", "thin", "peer")}
    assert all(p - {m} == {"dense", "thin", "peer"} - {m} for m, p in before.items())  # follows both others


# -- CUDA timing without a GPU: the events must be recorded on the inputs' device -------------------------
class _CudaLog:
    """Stands in for torch.cuda's device context, streams, events and synchronisation; logs each call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        log = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self, stream=None):
                log.calls.append(("record", stream))

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 1.5

        class Device:
            def __init__(self, device):
                self.device = torch.device(device)

            def __enter__(self):
                log.current = self.device
                log.calls.append(("enter", self.device))

            def __exit__(self, *exc):
                log.current = torch.device("cuda:0")

        self.current = torch.device("cuda:0")  # the process's current device
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", torch.device(device or self.current)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.calls.append(("sync", device)))


class _Passthrough(nn.Module):
    def forward(self, x):
        return x


def _on_cuda1() -> tuple[FakeTensorMode, torch.Tensor]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x = torch.empty(4, 3, device="cuda:1")  # a fake tensor: no GPU needed
    return mode, x


def test_cuda_events_are_recorded_on_the_inputs_device(monkeypatch):
    log = _CudaLog(monkeypatch)
    mode, x = _on_cuda1()
    with mode:
        lat = measure_latency(_Passthrough(), x, warmup=0, repeat=2)
    assert (lat.device, lat.median_ms) == ("cuda:1", 1.5)
    records = [c for c in log.calls if c[0] == "record"]
    assert records == [("record", ("stream", torch.device("cuda:1")))] * 4
    assert ("sync", torch.device("cuda:1")) in log.calls and ("enter", torch.device("cuda:1")) in log.calls


def test_node_timer_records_on_the_inputs_device(monkeypatch):
    log = _CudaLog(monkeypatch)
    mode, x = _on_cuda1()
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with mode:
        lat = node_latency(gm, x, warmup=0, repeat=1, whole=_latency(1.0, 1.0, 1.0))
    assert set(lat.per_node_ms) == {"_0", "_1"} and lat.per_node_ms["_0"] == 1.5
    streams = {c[1] for c in log.calls if c[0] == "record"}
    assert streams == {("stream", torch.device("cuda:1"))}


# ------------------------------------------------------------------ deployment backends (structure, never values)

def test_deployment_latency_names_the_fastest_backend():
    from fxcondensa.measure.latency import deployment_latency

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = deployment_latency(model, torch.randn(2, 1, 28, 28), backends=("eager", "channels_last"), warmup=0,
                           repeat=2)
    assert list(d.latency) == ["eager", "channels_last"] and d.skipped == {}
    assert d.fastest in d.latency and d.latency[d.fastest].median_ms == min(v.median_ms for v in d.latency.values())
    assert all(v.repeat == 2 and v.batch_size == 2 for v in d.latency.values())
    assert f"fastest: {d.fastest}" in d.note() and "eager" in d.note()
    assert d.to_dict()["fastest"] == d.fastest
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed


def test_deployment_latency_rejects_unknown_backend():
    from fxcondensa.measure.latency import deployment_latency

    with pytest.raises(ValueError, match="unknown deployment backend 'tensorrt'"):
        deployment_latency(LeNet5(), torch.randn(1, 1, 28, 28), backends=("eager", "tensorrt"))


def test_deployment_failure_is_reported_not_raised():
    """A backend that fails on a model is skipped with the reason (channels_last on a model that calls
    .view on what channels_last makes non-contiguous)."""
    from fxcondensa.measure.latency import deployment_latency

    class Flat(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1)

    d = deployment_latency(Flat(), torch.randn(1, 2, 3, 4), backends=("eager", "channels_last"), warmup=0, repeat=1)
    assert list(d.latency) == ["eager"]
    assert d.skipped["channels_last"].startswith("failed: RuntimeError: view size is not compatible")


def test_report_deployment_line():
    import fxcondensa

    model, x = LeNet5(), torch.randn(1, 1, 28, 28)
    r = fxcondensa.report(model, model, x, warmup=0, repeat=2, deployment=("eager", "onnxruntime"))
    dep = r.totals["deployment"]
    assert "eager" in dep["latency_ms"] and ("onnxruntime" in dep["latency_ms"]) != ("onnxruntime" in dep["skipped"])
    assert any(n.startswith("deployment (batch 1, ") and "fastest: " in n for n in r.notes)
    assert fxcondensa.report(model, model, x, latency=False).totals["deployment"] is None


def test_report_shows_latency_target():
    import fxcondensa
    from fxcondensa.capture.records import TargetRecord, thin_record
    from fxcondensa.schemes import StructurePrune

    x = torch.randn(1, 1, 28, 28)
    small = fxcondensa.thin(LeNet5(), StructurePrune(0.5), x)
    thin_record(small).target = TargetRecord("latency", 0.5, 0.48, 0.7)
    r = fxcondensa.report(LeNet5(), small, x, latency=False)
    assert r.totals["latency_target"] == {"target": 0.5, "reached": 0.48, "density": 0.7}
    assert r.totals["flop_target"] is None
    assert "latency target: 0.500 of the dense latency; measured when the scheme selected the channels: 0.480" in str(r)


def test_compare_latency_copies_times_each_fresh_copy_once():
    from fxcondensa.measure.latency import compare_latency_copies

    made = []

    def fresh(m):
        made.append(m)
        return torch.nn.Linear(4, 4)  # a new object per copy

    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    runs = compare_latency_copies([a, b], torch.randn(2, 4), copies=3, warmup=0, repeat=2, fresh=fresh)
    assert made == [a, b] * 3
    assert [len(r) for r in runs] == [3, 3] and all(lat.repeat == 2 for r in runs for lat in r)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_compare_latency_copies_rejects_bad_copies(bad):
    from fxcondensa.measure.latency import compare_latency_copies

    with pytest.raises(ValueError, match=rf"copies must be an int >= 1 \(fresh copies of the models to time\), got {bad!r}"):
        compare_latency_copies([torch.nn.Linear(4, 4)], torch.randn(2, 4), copies=bad, repeat=1)

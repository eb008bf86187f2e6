"""The latency model and latency-target selection, with injected fake timers: nothing here is timed.

A fake timer returns a deterministic latency computed from the layer's shapes (MACs, plus a penalty for
channel counts that are not multiples of 8 where a test wants one), and a fake whole-model measurement does
the same for the thinned graph, so that selection, feedback, caching, alignment and warnings are checked
exactly.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxcondensa
import fxcondensa.measure.latency
import fxcondensa.schemes.latency_model as lmod
import fxcondensa.schemes.latency_select as lsel
from fxcondensa.measure.latency import Latency
from fxcondensa.passes.analysis import analyze
from fxcondensa.passes.costs import profile_costs
from fxcondensa.passes.thin import apply_keep
from fxcondensa.schemes.latency_model import (
    CACHE_ENV,
    LatencyModel,
    LatencyWarning,
    cache_dir,
    validate_target_latency,
)
from fxcondensa.schemes.latency_select import auto_align, select_for_latency
from fxcondensa.schemes.scores import channel_scores


class Net(nn.Module):
    """Conv-BN-ReLU x3, a residual add, global pooling and a classifier: groups of different costs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv4, self.bn4 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = torch.relu(self.bn3(self.conv3(x)))
        x = x + self.bn4(self.conv4(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(2, 3, 16, 16)


def _macs(module: nn.Module, x: torch.Tensor) -> float:
    if isinstance(module, nn.Linear):
        return x.numel() / x.shape[-1] * module.in_features * module.out_features
    hw = x.shape[2] * x.shape[3] // (module.stride[0] * module.stride[1])
    return x.shape[0] * hw * module.out_channels * module.in_channels // module.groups * math.prod(module.kernel_size)


class FakeTimer:
    """ms = MACs / 1e6, times ``odd`` for an input count and again for an output count that is not a multiple
    of 8; counts calls."""

    def __init__(self, odd: float = 1.0):
        self.odd, self.calls = odd, 0

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        self.calls += 1
        out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        cin = x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1]
        return _macs(module, x) / 1e6 * (self.odd if out % 8 else 1.0) * (self.odd if cin % 8 else 1.0) + 0.001


def _lat(ms: float, iqr: float = 0.0) -> Latency:
    return Latency(median_ms=ms, q1_ms=ms - iqr / 2, q3_ms=ms + iqr / 2, min_ms=ms - iqr, max_ms=ms + iqr,
                   repeat=7, warmup=0, threads=1, batch_size=2, device="cpu")


def true_ms(gm: fx.GraphModule, power: float = 1.0) -> float:
    """The fake machine: conv/linear MACs raised to ``power`` (a machine the model mispredicts) plus a fixed
    overhead per node."""
    costs = profile_costs(gm)
    return sum((c.macs / 1e6) ** power for c in costs if c.kind in ("conv", "linear")) + 0.002 * len(costs)


class FakeMeasure:
    def __init__(self, power: float = 1.0, iqr: float = 0.0, fraction: float | None = None):
        self.power, self.iqr, self.fraction, self.calls = power, iqr, fraction, 0

    def __call__(self, dense, thinned, inputs):
        self.calls += 1
        d = true_ms(dense, self.power)
        t = d * self.fraction if self.fraction is not None else true_ms(thinned, self.power)
        return _lat(d, self.iqr * d), _lat(t, self.iqr * t)


def setup(model: nn.Module | None = None, x: torch.Tensor = X):
    gm = fxcondensa.trace(model or Net(), x)
    a = analyze(gm)
    score = channel_scores(gm, a, "l2norm", True)
    cand = ~a.frozen_channels() & ~torch.isnan(score)
    return gm, a, score, cand


def build(gm, a, x=X, timer=None, **kw):
    kw.setdefault("cache", False)
    return LatencyModel.build(gm, a, x, timer=timer or FakeTimer(), node_times=kw.pop("node_times", {}), **kw)


@pytest.fixture(autouse=True)
def no_real_node_timing(monkeypatch):
    """Dense per-node timing goes through this fake everywhere in this file: nothing is timed."""
    calls = []

    def fake(gm, inputs, warmup, repeat):
        calls.append(1)
        return {n.name: 0.01 for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}

    monkeypatch.setattr(lmod, "_node_times", fake)
    return calls


# ------------------------------------------------------------------------------------------- prediction

def test_dense_prediction_is_the_sum_of_measured_points():
    gm, a, _, _ = setup()
    lm = build(gm, a, node_times={"bn1": 0.5, "relu": 0.25})
    timer = FakeTimer()
    want = sum(timer(*t.module(t.cin, t.cout)[:1], torch.zeros(t.module(t.cin, t.cout)[1])) for t in lm.layers)
    assert lm.predict(torch.ones(a.num_channels, dtype=torch.bool)) == pytest.approx(want + 0.75)
    assert sorted(t.node for t in lm.layers) == ["conv1", "conv2", "conv3", "conv4", "fc"]


def test_bilinear_interpolation_is_exact_for_a_bilinear_cost():
    """A conv costs about a + b*cin + c*cout + d*cin*cout: piecewise-bilinear interpolation reproduces it
    exactly between grid points."""
    gm, a, _, _ = setup()

    def bilinear(module, x):
        cin, cout = x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1], (
            module.out_features if isinstance(module, nn.Linear) else module.out_channels)
        return 0.3 + 0.01 * cin + 0.02 * cout + 0.001 * cin * cout

    lm = build(gm, a, timer=bilinear, probes=0)
    conv3 = next(t for t in lm.layers if t.node == "conv3")
    for cin, cout in [(40, 24), (56, 8), (64, 48), (17, 33)]:
        assert lm.layer_ms(conv3, cin, cout) == pytest.approx(0.3 + 0.01 * cin + 0.02 * cout + 0.001 * cin * cout)


def test_unaligned_counts_pay_the_measured_penalty():
    gm, a, _, _ = setup()
    lm = build(gm, a, timer=FakeTimer(odd=2.0))
    assert lm.penalty["out"][1] == pytest.approx(2.0, rel=0.05)
    assert lm.penalty["in"][1] == pytest.approx(2.0, rel=0.05)
    assert lm.penalty["out"][8] == pytest.approx(1.0, rel=0.05)
    conv3 = next(t for t in lm.layers if t.node == "conv3")
    assert lm.layer_ms(conv3, 32, 31) > 1.8 * lm.layer_ms(conv3, 32, 32)


def test_depthwise_conv_is_timed_along_one_count():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=32),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1))
    gm, a, _, _ = setup(model)
    timer = FakeTimer()
    lm = build(gm, a, timer=timer)
    (dw,) = [t for t in lm.layers if t.spec.get("groups") == 32]
    assert dw.tied and all(i == o for i, o in dw.points)
    module, shape = dw.module(16, 16)
    assert module.groups == 16 and shape[1] == 16


# --------------------------------------------------------------------------------------------- selection

@pytest.mark.parametrize("power", [1.0, 1.3])
def test_latency_target_is_reached_as_measured(power):
    """The fake machine either matches the model (power 1) or not (1.3): the feedback steps correct it."""
    gm, a, score, cand = setup()
    measure = FakeMeasure(power=power)
    sel = select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=measure,
                             tolerance=0.05, steps=4)
    assert abs(sel.measured - 0.5) <= 0.05 and sel.met
    # what is reported is what the fake machine measures on the model thinned to the returned keep vector
    thinned = apply_keep(gm, a, sel.keep, (X,))
    assert sel.measured == pytest.approx(true_ms(thinned, power) / true_ms(gm, power))
    assert sel.history[-1]["measured"] == pytest.approx(sel.measured)
    rec = sel.target_record()
    assert (rec.kind, rec.target, rec.reached) == ("latency", 0.5, sel.measured)
    assert not bool((~sel.keep & ~cand).any())  # frozen channels are never dropped


def test_selection_prefers_cheap_channels():
    """Scores drawn alike for every group: the channels of the costlier group (conv3's, whose input and output both shrink the
    64x64 conv4 input) go first, conv1's (a 3-channel input) stay longest."""
    gm, a, _, cand = setup()
    score = torch.rand(a.num_channels, generator=torch.Generator().manual_seed(0)) + 0.5
    sel = select_for_latency(gm, a, score, cand, {}, 0.6, (X,), model=build(gm, a), measure=FakeMeasure(),
                             min_density=0.0)
    g = {grp.name: grp.channels for grp in a.groups}
    frac = {name: float(sel.keep[ch].float().mean()) for name, ch in g.items()}
    assert frac["conv1"] > frac["conv3"]


def test_min_density_keeps_every_group_alive():
    gm, a, score, cand = setup()
    sel = select_for_latency(gm, a, score, cand, {}, 0.2, (X,), model=build(gm, a), measure=FakeMeasure(),
                             min_density=0.25)
    for grp in a.groups:
        ch = grp.channels[cand[grp.channels]]
        if ch.numel():
            assert int(sel.keep[ch].sum()) >= math.ceil(0.25 * ch.numel())


def test_auto_align_rounds_to_fast_counts():
    gm, a, score, cand = setup()
    lm = build(gm, a, timer=FakeTimer(odd=2.0))
    keep = torch.ones(a.num_channels, dtype=torch.bool)
    for grp in a.groups:
        ch = grp.channels[cand[grp.channels]]
        keep[ch[: max(1, ch.numel() // 2 - 3)]] = False  # odd kept counts everywhere
    aligned, chosen = auto_align(lm, a, keep, score, cand)
    for grp in a.groups:
        if grp.name in chosen:
            assert int(aligned[grp.channels].sum()) % 8 == 0, grp.name
    assert bool((aligned | ~keep).all())  # only adds channels
    # without a penalty, rounding up buys nothing: counts stay as they were (or grow within the tie margin)
    plain, _ = auto_align(build(gm, a, timer=FakeTimer(odd=1.0)), a, keep, score, cand, margin=0.0)
    assert torch.equal(plain, keep)


def test_auto_align_inside_selection():
    gm, a, score, cand = setup()
    sel = select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a, timer=FakeTimer(odd=3.0)),
                             measure=FakeMeasure(), align="auto", steps=4)
    convs = [t for t in build(gm, a).layers if t.out_ch is not None]
    assert all(int(sel.keep[t.out_ch].sum()) % 8 == 0 for t in convs if t.node != "fc")


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_target_latency_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="target_latency must be a fraction") as e:
        validate_target_latency(bad)
    assert repr(bad) in str(e.value)


def test_select_rejects_bad_target_before_timing_anything():
    gm, a, score, cand = setup()
    timer = FakeTimer()
    with pytest.raises(ValueError, match=r"got 1\.5"):
        select_for_latency(gm, a, score, cand, {}, 1.5, (X,), timer=timer, cache=False)
    assert timer.calls == 0


@pytest.mark.parametrize("kw, msg", [({"tolerance": 0}, "tolerance"), ({"steps": 0}, "steps"),
                                     ({"align": "fast"}, "align"), ({"min_density": 2}, "min_density")])
def test_select_rejects_bad_options(kw, msg):
    gm, a, score, cand = setup()
    with pytest.raises(ValueError, match=msg):
        select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=FakeMeasure(), **kw)


def test_noisy_timing_warns_with_what_was_measured():
    gm, a, score, cand = setup()
    measure = FakeMeasure(iqr=0.2)
    with pytest.warns(LatencyWarning, match=r"too noisy to meet target_latency=0.5 within \+-0.05: dense [0-9.]+ ms "
                                            r"\(IQR [0-9.]+\), thinned"):
        select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=measure, steps=1)
    assert measure.calls == 2  # measured once more before giving up on the step


def test_unreachable_target_warns_with_the_closest_measurement():
    gm, a, score, cand = setup()
    measure = FakeMeasure(fraction=0.9)  # a machine where thinning never pays
    with pytest.warns(LatencyWarning, match=r"not met within \+-0.05 after 3 measured step\(s\): closest measured "
                                            r"fraction 0.900"):
        sel = select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=measure, steps=3)
    assert measure.calls == 3 and sel.measured == pytest.approx(0.9) and not sel.met


def test_met_target_does_not_warn():
    gm, a, score, cand = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyWarning)
        select_for_latency(gm, a, score, cand, {}, 0.7, (X,), model=build(gm, a), measure=FakeMeasure(), steps=4)


# ------------------------------------------------------------------------------------------------ cache

def test_second_build_reuses_the_cache(tmp_path, no_real_node_timing):
    gm, a, _, _ = setup()
    first, second = FakeTimer(), FakeTimer()
    lm1 = LatencyModel.build(gm, a, X, timer=first, directory=tmp_path)
    lm2 = LatencyModel.build(gm, a, X, timer=second, directory=tmp_path)
    assert first.calls > 0 and second.calls == 0
    assert len(no_real_node_timing) == 1  # the dense per-node times were cached too
    assert lm1.cache_misses > 0 and lm2.cache_misses == 0 and lm2.cache_hits > 0
    full = torch.ones(a.num_channels, dtype=torch.bool)
    assert lm2.predict(full) == lm1.predict(full)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json"]  # atomic writes leave no temporary file behind
    data = json.loads(files[0].read_text())
    assert data["key"]["torch"] == torch.__version__ and data["key"]["threads"] == torch.get_num_threads()


def test_identical_layers_are_timed_once():
    gm, a, _, _ = setup()
    timer = FakeTimer()
    build(gm, a, timer=timer, probes=0)
    conv3, conv4 = (next(t for t in build(gm, a).layers if t.node == n) for n in ("conv3", "conv4"))
    assert conv3.key == conv4.key
    assert timer.calls == sum(len(t.grid(lmod.GRID)) for t in build(gm, a).layers) - len(conv4.grid(lmod.GRID))


def test_other_shapes_miss_the_cache(tmp_path):
    gm, a, _, _ = setup()
    LatencyModel.build(gm, a, X, timer=FakeTimer(), directory=tmp_path)
    x4 = torch.randn(4, 3, 16, 16)
    gm4, a4, _, _ = setup(x=x4)
    timer = FakeTimer()
    LatencyModel.build(gm4, a4, x4, timer=timer, directory=tmp_path)
    assert timer.calls > 0


def test_key_change_invalidates(tmp_path, monkeypatch):
    gm, a, _, _ = setup()
    LatencyModel.build(gm, a, X, timer=FakeTimer(), directory=tmp_path)
    real = lmod.cache_key
    for change in ({"torch": "0.0.0"}, {"threads": 99}, {"device": "cpu:another"}, {"dtype": "torch.float64"}):
        monkeypatch.setattr(lmod, "cache_key", lambda d, t, change=change: {**real(d, t), **change})
        timer = FakeTimer()
        LatencyModel.build(gm, a, X, timer=timer, directory=tmp_path)
        assert timer.calls > 0, change
    assert len(list(tmp_path.iterdir())) == 5  # one file per key


def test_corrupt_cache_is_remeasured_and_rewritten(tmp_path):
    gm, a, _, _ = setup()
    LatencyModel.build(gm, a, X, timer=FakeTimer(), directory=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_text('{"format": 1, "key": ')
    timer = FakeTimer()
    LatencyModel.build(gm, a, X, timer=timer, directory=tmp_path)
    assert timer.calls > 0 and json.loads(path.read_text())["layers"]


def test_cache_dir_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    gm, a, _, _ = setup()
    lm = LatencyModel.build(gm, a, X, timer=FakeTimer())
    assert lm.cache_path is not None and lm.cache_path.startswith(str(tmp_path / "here"))
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fxcondensa"


def test_cache_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    gm, a, _, _ = setup()
    assert LatencyModel.build(gm, a, X, timer=FakeTimer(), cache=False).cache_path is None
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- bench/speedup.py's new rows

def _bench():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_speedup", Path(__file__).resolve().parents[1] / "bench" / "speedup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_latency_target_row(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(lmod, "_default_timer", lambda warmup, repeat: FakeTimer())
    monkeypatch.setattr(lsel, "_default_measure", lambda warmup, repeat: FakeMeasure())
    speedup = _bench()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        row = speedup.latency_target_row("lenet5", 0.5, batch=2, size=28, warmup=0, repeat=1, log=lambda *a: None)
    assert row["input"] == [2, 1, 28, 28] and row["target_latency"] == 0.5
    assert 0 < row["macs_fraction"] < 1 and row["goal"] in ("met", f"missed: {row['measured_after']:.3f}")
    assert row["measured_after"] == pytest.approx(row["thinned_ms"] / row["dense_ms"])
    assert len(row["load_before"]) == 3
    json.dumps(row)
    assert "| lenet5 |" in speedup.latency_table([row]).replace("  ", " ")


def test_bench_latency_target_row_over_copies(tmp_path, monkeypatch):
    """--copies 3: measured_after is the median of three fresh-copy measurements (fake, fixed fractions)."""
    from fxcondensa.measure.latency import Latency

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(lmod, "_default_timer", lambda warmup, repeat: FakeTimer())
    monkeypatch.setattr(lsel, "_default_measure", lambda warmup, repeat: FakeMeasure())
    speedup = _bench()
    thinned_ms = iter([6.0, 4.0, 5.8])

    def fake_compare(models, x, *, warmup, repeat):
        return [Latency(ms, ms, ms, ms, ms, repeat, warmup, 1, 2, "cpu") for ms in (10.0, next(thinned_ms))]

    monkeypatch.setattr(fxcondensa.measure.latency, "compare_latency", fake_compare)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        row = speedup.latency_target_row("lenet5", 0.5, batch=2, size=28, warmup=0, repeat=1, copies=3,
                                         log=lambda *a: None)
    assert row["copies"] == 3 and row["measured_after_copies"] == pytest.approx([0.6, 0.4, 0.58])
    assert row["measured_after"] == pytest.approx(0.58) and row["goal"] == "missed: 0.580"
    assert row["thinned_ms"] == 5.8 and row["dense_ms"] == 10.0


def test_bench_auto_align_thins(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(lmod, "_default_timer", lambda warmup, repeat: FakeTimer(odd=3.0))
    speedup = _bench()
    model, _ = speedup.build("resnet18")
    shapes = {1: (3, 32, 32), 4: (3, 24, 24)}
    variants = speedup.thinned_variants(model, 0.5, "auto", [1, 4], shapes, torch.randn(1, 3, 32, 32))
    # One thinned model per row, each chosen with a latency model measured at that row's input shape.
    assert [v[3] for v in variants] == [[1], [4]]
    assert [v[1] for v in variants] == ["latency model at 1x3x32x32", "latency model at 4x3x24x24"]
    for small, _, _, (b,) in variants:
        x = torch.randn(b, *shapes[b])
        assert small.fc.in_features < 512 and small(x).shape == (b, 1000)
    (plain, via, _, batches), = speedup.thinned_variants(model, 0.5, None, [1, 4], shapes, torch.randn(1, 3, 32, 32))
    assert via is None and batches == [1, 4]  # a fixed align thins once for every row


def test_placeholder_inputs_follow_the_traced_shapes():
    gm, _, _, _ = setup(x=torch.randn(3, 3, 16, 16))
    (x,) = lmod.placeholder_inputs(gm)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32


def test_placeholder_inputs_need_shapes():
    gm = torch.fx.symbolic_trace(Net())
    with pytest.raises(ValueError, match="placeholder 'x' of Net has no shape metadata"):
        lmod.placeholder_inputs(gm)


class BurstMeasure(FakeMeasure):
    """Noisy on the calls listed in ``noisy_calls`` (1-based), clean otherwise."""

    def __init__(self, noisy_calls, noisy_scale=0.5, **kw):
        super().__init__(**kw)
        self.noisy_calls, self.noisy_scale = set(noisy_calls), noisy_scale

    def __call__(self, dense, thinned, inputs):
        d, t = super().__call__(dense, thinned, inputs)
        if self.calls in self.noisy_calls:
            return _lat(d.median_ms, d.median_ms), _lat(t.median_ms * self.noisy_scale, t.median_ms)
        return d, t


def test_a_noisy_measurement_is_repeated_once():
    gm, a, score, cand = setup()
    measure = BurstMeasure({1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyWarning)
        sel = select_for_latency(gm, a, score, cand, {}, 0.6, (X,), model=build(gm, a), measure=measure, steps=4)
    assert not sel.history[0]["noisy"] and sel.met


def test_noisy_steps_never_win_over_trusted_ones_inside_the_band():
    """Step 1 is trusted and inside the band (0.54 for 0.5 +- 0.05); step 2 is noisy both times and lands
    (falsely) right on target: step 1 is kept."""
    gm, a, score, cand = setup()
    measure = BurstMeasure({2, 3}, noisy_scale=0.5 / 0.54, fraction=0.54)
    with pytest.warns(LatencyWarning, match="too noisy"):
        sel = select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=measure, steps=2)
    assert [h["noisy"] for h in sel.history] == [False, True]
    assert sel.measured == pytest.approx(0.54) and sel.history[1]["measured"] == pytest.approx(0.5)


def test_a_noisy_step_near_the_target_beats_a_trusted_one_far_off():
    """Regression (mobilenet_v2 on a busy machine): a trusted step far outside the band was returned over
    noisy steps near the target."""
    gm, a, score, cand = setup()
    measure = BurstMeasure({2, 3}, noisy_scale=0.52 / 0.3, fraction=0.3)
    with pytest.warns(LatencyWarning):
        sel = select_for_latency(gm, a, score, cand, {}, 0.5, (X,), model=build(gm, a), measure=measure, steps=2)
    assert sel.measured == pytest.approx(0.52)


def test_next_target_moves_at_most_a_factor_of_1_5():
    """Regression: two noisy steps with a nearly flat slope extrapolated the aim from 0.39 to 0.001."""
    h = [{"internal_target": 0.5, "measured": 0.537, "noisy": True},
         {"internal_target": 0.393, "measured": 0.531, "noisy": True}]
    assert lsel._next_target(h, 0.393, 0.5) == pytest.approx(0.393 / 1.5)


def test_next_target_interpolates_between_trusted_steps():
    h = [{"internal_target": 0.5, "measured": 0.7, "noisy": False},
         {"internal_target": 0.3, "measured": 0.5, "noisy": False}]
    assert lsel._next_target(h, 0.3, 0.45) == pytest.approx(0.25)
    # one trusted step: scale by target / measured
    assert lsel._next_target(h[:1], 0.5, 0.49) == pytest.approx(0.35)
    # with two trusted steps a noisy one is left out of the interpolation
    three = [*h, {"internal_target": 0.35, "measured": 0.45, "noisy": True}]
    assert lsel._next_target(three, 0.35, 0.45) == pytest.approx(0.25)


def test_next_target_uses_noisy_steps_when_fewer_than_two_are_trusted():
    h = [{"internal_target": 0.5, "measured": 0.8, "noisy": False},
         {"internal_target": 0.3, "measured": 0.2, "noisy": True}]
    assert lsel._next_target(h, 0.3, 0.4) == pytest.approx(0.3 + 0.2 / 3)
    # one noisy step after one trusted one and no slope (same internal target): scale from the trusted one
    flat = [h[0], {**h[1], "internal_target": 0.5}]
    assert lsel._next_target(flat, 0.5, 0.7) == pytest.approx(0.5 * 0.7 / 0.8)


def test_unwritable_cache_warns_and_still_builds(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    gm, a, _, _ = setup()
    with pytest.warns(LatencyWarning, match=f"could not write the latency cache {blocker}/latency-"):
        lm = LatencyModel.build(gm, a, X, timer=FakeTimer(), directory=blocker)
    assert lm.predict(torch.ones(a.num_channels, dtype=torch.bool)) > 0


def test_graph_signature_is_the_same_in_every_process():
    """Regression: str() of a builtin target (torch.relu, torch.flatten) holds its memory address, so the
    cached per-node times were never found again by another process."""
    import subprocess
    import sys

    code = ("import torch, sys; sys.path.insert(0, 'tests'); from test_latency_model import Net, X; "
            "import fxcondensa; from fxcondensa.schemes.latency_model import _graph_signature; "
            "print(_graph_signature(fxcondensa.trace(Net(), X), (X,)))")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sigs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
            .stdout.strip() for _ in range(2)}
    assert len(sigs) == 1 and len(next(iter(sigs))) == 40
    assert "0x" not in lmod._target_name(torch.relu) and lmod._target_name(torch.relu).endswith("relu")


def test_structure_prune_target_latency_is_recorded_and_thin_checks_it(tmp_path, monkeypatch):
    from fxcondensa.capture.records import thin_record
    from fxcondensa.schemes import StructurePrune

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(lmod, "_default_timer", lambda warmup, repeat: FakeTimer())
    monkeypatch.setattr(lsel, "_default_measure", lambda warmup, repeat: FakeMeasure(power=1.2))
    model = Net()
    small = fxcondensa.thin(model, StructurePrune(target_latency=0.5), X, output="graph")  # the graph the search timed
    rec = thin_record(small).target
    assert rec.kind == "latency" and rec.target == 0.5 and abs(rec.reached - 0.5) <= 0.05
    dense = fxcondensa.trace(model, X)
    assert true_ms(small, 1.2) / true_ms(dense, 1.2) == pytest.approx(rec.reached)
    r = fxcondensa.report(model, small, X, latency=False)
    assert r.totals["latency_target"]["reached"] == rec.reached


def test_structure_prune_align_auto(tmp_path, monkeypatch):
    from fxcondensa.capture.records import thin_record
    from fxcondensa.schemes import StructurePrune

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(lmod, "_default_timer", lambda warmup, repeat: FakeTimer(odd=3.0))
    small = fxcondensa.thin(Net(), StructurePrune(0.3, align="auto"), X)
    assert all(g.kept % 8 == 0 for g in thin_record(small).groups if g.kept < g.channels)


@pytest.mark.parametrize("kw", [{"target_latency": 0.0}, {"target_latency": 1.5}])
def test_structure_prune_rejects_bad_target_latency(kw):
    from fxcondensa.schemes import StructurePrune

    with pytest.raises(ValueError, match=f"target_latency must be a fraction .* got {kw['target_latency']!r}"):
        StructurePrune(**kw)


def test_structure_prune_one_budget_only():
    from fxcondensa.schemes import StructurePrune

    with pytest.raises(ValueError, match="give exactly one of density"):
        StructurePrune(0.5, target_latency=0.5)


def test_default_measure_times_fresh_copies_and_keeps_the_median_fraction(monkeypatch):
    """A feedback step times MEASURE_COPIES fresh copies of dense and thinned (where a model lands in memory
    moves its latency), about ``repeat`` runs in all, and returns the pair whose fraction is the median."""
    dense, thinned = nn.Linear(4, 4), nn.Linear(4, 2)
    calls = []
    thinned_ms = iter([7.0, 4.0, 5.0])

    def fake_compare(models, inputs, *, warmup, repeat):
        calls.append((models, warmup, repeat))
        ms = next(thinned_ms)
        return [Latency(10.0, 9, 11, 9, 11, repeat, warmup, 1, 1, "cpu"),
                Latency(ms, ms, ms, ms, ms, repeat, warmup, 1, 1, "cpu")]

    monkeypatch.setattr(fxcondensa.measure.latency, "compare_latency", fake_compare)
    a, b = lsel._default_measure(2, 7)(dense, thinned, (torch.zeros(1, 4),))
    assert lsel.MEASURE_COPIES == 3 and len(calls) == 3
    assert b.median_ms == 5.0 and a.median_ms == 10.0  # fractions 0.7, 0.4, 0.5: the median copy
    assert all(r == 3 and w == 2 for _, w, r in calls)  # ceil(7 / 3) runs per copy, each after its warm-up
    copies = [m for models, _, _ in calls for m in models]
    assert len({id(m) for m in copies}) == 6 and not {id(dense), id(thinned)} & {id(m) for m in copies}
    assert all(torch.equal(c.weight, dense.weight) for c in copies[0::2])

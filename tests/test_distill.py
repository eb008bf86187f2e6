"""Distill: masked recovery by distillation from the dense model. The loss equals a reference computation, it
brings the compressed model closer to the teacher than direct compression and than fine-tuning on the labels
alone, it resumes from a checkpoint as if uninterrupted, it runs on a causal LM (bf16 teacher, hidden states),
and bad arguments are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import Crash
from _models import crashing_criterion as _crashing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lc import run, tiny_model, tiny_problem
from torch import nn

import fxcondensa as condensa
from fxcondensa.opt import Direct, Distill, FineTune
from fxcondensa.opt.distill import kd_loss
from fxcondensa.opt.training import as_batches, evaluate
from fxcondensa.schemes import Prune, StructurePrune

SMALL = dict(iterations=60, evaluations=2, l_batch_size=64, lr=0.05, device="cpu", progress=False)


def reference_kd(s: torch.Tensor, t: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    s, t = s.float().movedim(dim, -1), t.float().movedim(dim, -1)
    v = s.shape[-1]
    log_s = F.log_softmax(s.reshape(-1, v) / temperature, -1)
    log_t = F.log_softmax(t.reshape(-1, v) / temperature, -1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(5, 3), (2, 4, 7), (3, 6, 2, 2)]), temperature=st.floats(0.25, 8.0),
       dim=st.sampled_from([-1, 1]), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_kd_loss_equals_the_reference_kl_divergence(shape, temperature, dim, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    if bf16:
        s, t = s.bfloat16(), t.bfloat16()
    got = kd_loss(s, t, temperature, dim)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_kd(s, t, temperature, dim), rtol=1e-5, atol=1e-6)
    assert kd_loss(t, t, temperature, dim).abs().item() < 1e-6


def test_minibatch_loss_equals_kl_plus_task_plus_hidden_reference():
    model = tiny_model()
    x, y = tiny_problem()[0].tensors
    x, y = x[:32], y[:32]
    kd = Distill(iterations=2, evaluations=1, temperature=2.5, task_weight=0.3, hidden=["1"], hidden_weight=0.7,
                 device="cpu")
    kd._teacher = kd._build_teacher(model, x[:2])
    student = condensa.compress(model, Prune(0.2), output="graph")  # the compressed graph, as the L step sees it
    got = kd.l_loss(student, x, y, nn.CrossEntropyLoss())
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.get_submodule("1").register_forward_hook(lambda _m, _i, o, k=k: seen.__setitem__(k, o))
             for k, m in (("s", student), ("t", model))]
    s_out, t_out = student(x), model(x)
    for h in hooks:
        h.remove()
    hidden = (seen["s"] - seen["t"]).pow(2).mean() / seen["t"].pow(2).mean()
    want = reference_kd(s_out, t_out, 2.5, -1) + 0.3 * F.cross_entropy(s_out, y) + 0.7 * hidden
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()  # gradients reach the student's own parameters, never the teacher's
    assert student.get_parameter("0.weight").grad is not None
    assert all(p.grad is None and not p.requires_grad for p in kd._teacher.parameters())


def gap(student: nn.Module, teacher: nn.Module) -> float:
    """KL divergence from the teacher's predictions to the student's on the validation inputs."""
    x = tiny_problem()[1].tensors[0]
    with torch.no_grad():
        return kd_loss(student(x), teacher(x)).item()


def test_distillation_brings_the_compressed_model_back_to_the_teacher():
    model = tiny_model()
    direct, _ = run(Direct(), Prune(0.2), model)
    distilled, stats = run(Distill(**SMALL, temperature=2.0), Prune(0.2), model)
    assert gap(distilled, model) < 0.5 * gap(direct, model)
    assert stats["optimizer"] == "Distill" and stats["budget"] == 60 and stats["density"] == pytest.approx(0.2, abs=1e-3)
    for p in model.parameters():
        assert p.grad is None


def test_distillation_keeps_whole_channels_of_a_structured_scheme():
    model = tiny_model(batchnorm=True)
    result, _ = run(Distill(**SMALL), StructurePrune(0.5), model)
    w = result.get_parameter("0.weight")
    rows = (w != 0).any(dim=1)
    assert rows.sum() == 32 and not w[~rows].any()


def test_crashed_run_resumes_to_the_uninterrupted_result(tmp_path):
    train, val, test = tiny_problem()
    model = tiny_model(batchnorm=True)
    make = lambda ckpt: Distill(**{**SMALL, "evaluations": 3}, task_weight=0.5, checkpoint=ckpt)  # noqa: E731
    full = condensa.Compressor(make(None), Prune(0.1), model, train, test, val, nn.CrossEntropyLoss())
    expected = full.run()
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):  # the task loss is one criterion call per SGD step, after the evaluations
        condensa.Compressor(make(ckpt), Prune(0.1), model, train, test, val, _crashing(40)).run()
    assert torch.load(ckpt, weights_only=True)["next_iteration"] >= 1
    resumed = condensa.Compressor(make(ckpt), Prune(0.1), model, train, test, val, nn.CrossEntropyLoss())
    result = resumed.run()
    for (k, a), b in zip(expected.state_dict().items(), result.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in e.items() if k != "elapsed"} for e in h]  # noqa: E731
    assert strip(full.statistics["history"]) == strip(resumed.statistics["history"])
    with pytest.raises(ValueError, match="temperature"):  # other distillation arguments refuse the checkpoint
        condensa.Compressor(Distill(**{**SMALL, "evaluations": 3}, task_weight=0.5, temperature=3.0,
                                    checkpoint=ckpt), Prune(0.1), model, train, test, val).run()


def _tiny_llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      use_cache=False, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


def _lm_loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


@pytest.mark.parametrize("teacher_dtype", [None, "bfloat16"])
def test_causal_lm_distills_from_its_model_output_logits(teacher_dtype):
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (64, 17), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    data = as_batches(torch.utils.data.TensorDataset(x, y), 8)
    traced = condensa.trace(model, x[:8])
    # an intermediate state of the residual stream: the last (8, 16, 32) value before the final norm
    hidden = [n.name for n in traced.graph.nodes if n.op == "call_function"
              and getattr(n.meta.get("tensor_meta"), "shape", None) == torch.Size([8, 16, 32])][-3]
    kd = Distill(iterations=12, evaluations=1, l_batch_size=8, val_batch_size=8, lr=0.05, device="cpu",
                 progress=False, teacher_dtype=teacher_dtype, hidden=hidden)
    scheme = StructurePrune(0.5)
    result, stats = kd.compress(model, scheme, data, None, None, _lm_loss, x[:8])  # no val: the last is returned
    direct, _ = Direct().compress(model, scheme, data, None, None, _lm_loss, x[:8])
    with torch.no_grad():
        t = model(x[:8]).logits
        gap = lambda m: kd_loss(m(x[:8]).logits, t).item()  # noqa: E731
        assert gap(result) < gap(direct)
    assert stats["history"][-1]["l_loss"] < stats["history"][1]["l_loss"] * 1.5
    loss, accuracy = evaluate(result, data, _lm_loss)  # token accuracy, from the ModelOutput's logits
    assert 0 < accuracy < 100 and loss == pytest.approx(_lm_loss(result(x[:8]), y[:8]).item(), rel=0.2)


def test_distill_gets_closer_to_the_teacher_than_fine_tuning():
    model = tiny_model()
    ft, _ = run(FineTune(**SMALL), Prune(0.2), model)
    kd, _ = run(Distill(**SMALL, temperature=2.0), Prune(0.2), model)
    assert gap(kd, model) < gap(ft, model)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), r"Distill: temperature must be a finite number in \(0"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(task_weight=-1.0), "task_weight must be a finite number in \\[0"),
    (dict(hidden_weight=-0.5), "hidden_weight must be"),
    (dict(hidden=3), "hidden must be a node name or a list of node names"),
    (dict(hidden=["ok", ""]), "hidden must be a node name"),
    (dict(teacher_dtype="int8"), "teacher_dtype must be None .* got 'int8'"),
    (dict(dim="last"), "dim must be an int"),
    (dict(iterations=3, evaluations=4), "evaluations=4 exceeds iterations=3"),
    (dict(warmup=1.5), r"Distill: warmup must be a finite number in \[0.0, 1.0\), got 1.5"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Distill(**kw)


def test_defaults_warm_up_to_a_larger_rate_than_fine_tuning():
    # The KL term's gradient is smaller than the task loss's: distillation's default rate is 3x FineTune's,
    # reached after a linear warm-up over the first 10% of the budget (FineTune: none).
    kd, ft = Distill(iterations=100, evaluations=2), FineTune(iterations=100, evaluations=2)
    assert (kd.lr, kd.warmup, kd.warmup_iterations) == (0.15, 0.1, 10)
    assert (ft.lr, ft.warmup, ft.warmup_iterations) == (0.05, 0.0, 0)
    flat = [lr for j in range(kd.steps) for lr in kd.step_lrs(j)]
    assert flat[:10] == pytest.approx([0.015 * (i + 1) for i in range(10)]) and max(flat) == pytest.approx(0.15)
    assert all(a >= b for a, b in zip(flat[9:], flat[10:], strict=False)) and flat[-1] < 0.001
    assert kd.config["warmup"] == 0.1 and kd.config["lr"] == 0.15


def test_unknown_hidden_state_is_named_with_examples():
    with pytest.raises(ValueError, match=r"hidden='nowhere' names no computed value .* e\.g\. \["):
        run(Distill(**SMALL, hidden="nowhere"), Prune(0.1))


def test_hidden_states_are_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="hidden-state matching .* does not run under torchrun"):
        Distill(**SMALL, hidden="1").compress(tiny_model(), Prune(0.1), None, None, None, None, None)


def test_output_without_logits_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="Distill: the model returned tuple, which is neither a tensor"):
        kd = Distill(iterations=1, evaluations=1, device="cpu")
        kd._teacher = Pair()
        kd.l_loss(Pair(), torch.randn(2, 3), None, None)


def test_logits_of_different_shapes_are_named():
    with pytest.raises(ValueError, match=r"student's logits have shape \(2, 3\) and the teacher's \(2, 4\)"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_config_and_repr_record_every_argument():
    kd = Distill(iterations=12, evaluations=2, temperature=2.0, teacher_dtype=torch.bfloat16, device="cpu")
    assert kd.config["temperature"] == 2.0 and kd.config["teacher_dtype"] == "bfloat16"
    assert kd.config["hidden"] == [] and kd.config["iterations"] == 12
    assert repr(kd).startswith("Distill(iterations=12, evaluations=2,")

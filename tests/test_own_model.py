"""thin returns the user's own class: resized modules, methods intact, checked against the compressed model."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import bench_coverage, state_hash
from torch import nn

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

_bench = bench_coverage()


def _compressed_dense(model: nn.Module, scheme, x) -> nn.Module:
    """The compressed model as the user's class (the reference the thinned one must equal)."""
    dense = copy.deepcopy(model)
    # A symbolic trace may hold constants of its own (``_tensor_constant0``): only the model's keys load.
    missing, _ = dense.load_state_dict(fxcondensa.compress(model, scheme, x).state_dict(), strict=False)
    assert not missing
    return dense.eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet_comes_back_as_its_class_with_record_and_the_input_untouched():
    torch.manual_seed(0)
    model, x = fxcondensa.models.LeNet5(), torch.randn(2, 1, 28, 28)
    before = state_hash(model)
    small = fxcondensa.thin(model, StructurePrune(0.3), x, output="auto")
    assert type(small) is fxcondensa.models.LeNet5 and state_hash(model) == before
    assert small.conv1.out_channels == small.conv1.weight.shape[0] < 20
    assert small.ip1.in_features == small.ip1.weight.shape[1]
    rec = thin_record(small)
    assert rec.returns == "module" and rec.reason == ""
    with torch.no_grad():
        torch.testing.assert_close(small(x), _compressed_dense(model, StructurePrune(0.3), x)(x), rtol=1e-4, atol=1e-5)
    graph = fxcondensa.thin(model, StructurePrune(0.3), x, output="graph")
    assert isinstance(graph, torch.fx.GraphModule) and thin_record(graph).returns == "graph"


class _Literal(nn.Module):
    """A block whose forward holds a literal channel count (64), which no attribute carries."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        y = self.conv(x).relu()
        return self.head(y.view(y.shape[0], 64, -1).mean(-1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Literal()

    def forward(self, x):
        return self.body(x)


def test_a_literal_size_blocks_the_own_class_named_in_the_error_and_the_record():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(1, 3, 8, 8)
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"module 'body' \(_Literal\).*literal size 64"):
        fxcondensa.thin(model, StructurePrune(0.5), x, output="module")
    assert state_hash(model) == before
    # "auto" gives the class back with that module run as its thinned graph, and says so.
    small = fxcondensa.thin(model, StructurePrune(0.5), x, output="auto")
    rec = thin_record(small)
    assert type(small) is _Net and isinstance(small.body, torch.fx.GraphModule) and rec.returns == "module"
    assert rec.reason.startswith("1 submodule as a graph (first: 'body' (_Literal)") and "literal size 64" in rec.reason


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(output="modul"), ValueError, "output must be one of"),
    (dict(output="graph", inplace=True), ValueError, "inplace=True thins the model object itself"),
    (dict(inplace=True, output="graph"), ValueError, "inplace=True thins the model object itself"),
    (dict(inplace=1), TypeError, "inplace must be True or False"),
])
def test_bad_output_options_say_what_to_pass(kwargs, error, match):
    with pytest.raises(error, match=match):
        fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.5), torch.randn(1, 1, 28, 28), **kwargs)


def test_uniform_needs_a_density():
    with pytest.raises(ValueError, match="uniform=True keeps the same share"):
        StructurePrune(target_flops=0.5, uniform=True)
    with pytest.raises(TypeError, match="uniform must be True or False"):
        StructurePrune(0.5, uniform="yes")


def test_inplace_thins_the_model_object_itself_and_it_trains():
    torch.manual_seed(0)
    model, x = fxcondensa.models.LeNet5(), torch.randn(4, 1, 28, 28)
    ref = _compressed_dense(model, StructurePrune(0.5), x)
    out = fxcondensa.thin(model, StructurePrune(0.5), x, output="auto", inplace=True)
    assert out is model and model.ip1.weight.shape[0] < 500 and thin_record(model).returns == "module"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    # A training step: gradients reach every parameter and the optimizer changes them.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------------------------------- Hugging Face

LMS = ["gpt2-lm", "llama", "qwen2-gqa"]


def _lm(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model, x, _, _ = _bench.build_hf(name)
    return model.to(dtype), x


@pytest.mark.parametrize("name", LMS)
def test_uniform_lm_keeps_its_class_generate_shapes_and_stock_round_trip(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x = _lm(name, torch.float32)
    scheme = StructurePrune(0.5, uniform=True)
    small = fxcondensa.thin(model, scheme, x, output="module")
    assert type(small) is type(model) and thin_record(small).returns == "module"
    assert _params(small) < _params(model)
    ref = _compressed_dense(model, scheme, x)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch in (1, 2):
            for length in (3, 8, 13):
                ids = torch.randint(0, 128, (batch, length), generator=g)
                torch.testing.assert_close(small(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        ids = torch.randint(0, 128, (2, 5), generator=g)
        tokens = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        assert torch.equal(tokens, ref.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True))
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", LMS)
def test_bf16_lm_comes_back_as_its_class_and_generates_like_the_compressed_one(name):
    model, x = _lm(name, torch.bfloat16)
    scheme = StructurePrune(0.5, uniform=True)
    # The full check: bf16 rounding that exceeds bf16's tolerance is told from a wrong model by re-running
    # the model's own forward widened (and the folded RMSNorm weights unrounded).
    small = fxcondensa.thin(model, scheme, x, output="module")
    assert type(small) is type(model) and next(small.parameters()).dtype == torch.bfloat16
    ref = _compressed_dense(model, scheme, x)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0.05, atol=0.05)
        tokens = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        assert torch.equal(tokens, ref.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True))


@pytest.mark.parametrize("name", ["llama", "qwen2-gqa"])
def test_non_uniform_lm_is_its_class_and_trains(name):
    model, x = _lm(name, torch.float32)
    small = fxcondensa.thin(model, StructurePrune(0.5), x, output="auto")
    assert type(small) is type(model) and thin_record(small).returns == "module"
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    small.train()
    loss = small(input_ids=ids, labels=ids).loss
    loss.backward()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    w = small.lm_head.weight.detach().clone()
    opt.step()
    assert not torch.equal(w, small.lm_head.weight)


# ---------------------------------------------------------------------------------------------- vision zoo

def _timm(name: str, **kwargs):
    import timm

    return timm.create_model(name, **kwargs)


def _tv(name: str, **kwargs):
    import torchvision

    return getattr(torchvision.models, name)(**kwargs)


VISION = {
    "timm_resnet50": (lambda: _timm("resnet50", layers=(1, 1, 1, 1)), 32),
    "timm_vit_small": (lambda: _timm("vit_small_patch16_224", img_size=32, depth=2), 32),
    "timm_convnext_tiny": (lambda: _timm("convnext_tiny", depths=(1, 1, 1, 1)), 32),
    "timm_swin_tiny": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(1, 1, 1, 1)),
                       32),
    "timm_hiera_tiny": (lambda: _timm("hiera_tiny_224", img_size=(64, 64), stages=(1, 1, 1, 1)), 64),
    "timm_dpn": (lambda: _timm("dpn48b", k_sec=(1, 1, 1, 1)), 32),  # a residual path sliced by an attribute
    "timm_ghostnet": (lambda: _timm("ghostnet_050"), 32),  # x[:, :self.out_chs]
    "tv_resnet50": (lambda: _tv("resnet50"), 32),
    "tv_vit_b_16": (lambda: _tv("vit_b_16", image_size=32), 32),
    "tv_mobilenet_v3": (lambda: _tv("mobilenet_v3_small"), 32),
    "tv_shufflenet_v2": (lambda: _tv("shufflenet_v2_x0_5"), 32),  # chunk(2) into equal halves
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_models_come_back_as_their_class_exact(name):
    build, size = VISION[name]
    torch.manual_seed(0)
    model = build()
    _bench.randomize_constants(model)
    model.eval()
    x = torch.randn(1, 3, size, size)
    small = fxcondensa.thin(model, StructurePrune(0.5), x, output="auto")
    assert type(small) is type(model), thin_record(small).reason
    assert _params(small) < _params(model)
    ref = _compressed_dense(model, StructurePrune(0.5), x)
    y = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(small(y), ref(y), rtol=1e-4, atol=1e-4)
        if hasattr(model, "forward_features"):
            assert small.forward_features(y).shape[0] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", LMS)
def test_non_uniform_lm_is_its_class_checked_generates_and_round_trips(name, dtype, tmp_path):
    """Layers of different widths (no ``uniform``): the same class comes back through the full check (in
    bfloat16 too: its re-check in wider dtypes runs the model's own forward widened), each attention with
    its own head counts, equal to the compressed model at other batch sizes and lengths and in generate."""
    model, x = _lm(name, dtype)
    scheme = StructurePrune(0.5)
    small = fxcondensa.thin(model, scheme, x, output="module")
    assert type(small) is type(model) and thin_record(small).returns == "module"
    assert next(small.parameters()).dtype == dtype and _params(small) < _params(model)
    if name != "gpt2-lm":
        for layer in small.model.layers:
            attn = layer.self_attn
            assert attn.num_key_value_groups * attn.k_proj.weight.shape[0] == attn.q_proj.weight.shape[0]
    ref = _compressed_dense(model, scheme, x)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch, length in ((1, 3), (2, 8), (2, 13)):
            ids = torch.randint(0, 128, (batch, length), generator=g)
            torch.testing.assert_close(small(input_ids=ids).logits, ref(input_ids=ids).logits, **tol)
        ids = torch.randint(0, 128, (2, 5), generator=g)
        tokens = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        assert torch.equal(tokens, ref.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True))
    fxcondensa.save_thinned(small, tmp_path / "small.pt")
    back = fxcondensa.load_thinned(tmp_path / "small.pt", model)
    assert type(back) is type(model) and thin_record(back).returns == "module"
    assert next(back.parameters()).dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, small.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


class _Branchy(nn.Module):
    """torch.fx cannot trace it (a branch on a size), torch.export can; it counts the live copies of itself
    while it runs."""

    seen: list[int] = []

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        import gc

        gc.collect()  # garbage in cycles does not count: only what something still holds
        _Branchy.seen.append(sum(type(o) is _Branchy for o in gc.get_objects()))
        return self.fc(x) if x.shape[0] > 1 else x


def test_a_failed_symbolic_trace_leaves_no_copy_alive_while_export_captures():
    model = _Branchy()
    _Branchy.seen.clear()
    fxcondensa.trace(model, torch.randn(2, 4))
    # the user's model and the copy torch.export runs (the failed symbolic trace's copy is gone)
    assert _Branchy.seen and max(_Branchy.seen) <= 2, _Branchy.seen


class _TiedWidth(nn.Module):
    """An attention-like block that sizes its output by its input's width (``B, N, C = x.shape``, then
    ``reshape(B, N, C)`` on a tensor of its own width), as BEiT's and CaiT's attention do."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        B, N, C = x.shape
        h = self.up(x).relu()
        return self.out(h.reshape(B * N, C).reshape(B, N, C))


class _TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.block = _TiedWidth()

    def forward(self, x):
        return self.block(self.stem(x).relu())


def test_a_size_read_from_a_tensor_that_thins_otherwise_blocks_with_the_module_and_sizes_named():
    torch.manual_seed(0)
    model, x = _TiedNet(), torch.randn(2, 3, 4)
    with torch.no_grad():  # the stream keeps 2 of 8 channels, the block's own width 5 of 8
        model.stem.weight[2:] = 0
        model.stem.bias[2:] = 0
        model.block.up.weight[5:] = 0
        model.block.up.bias[5:] = 0
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"module 'block' \(_TiedWidth\).*read from a tensor's shape "
                                         r"\(thinned: 2\) where the thinned model needs 5"):
        fxcondensa.thin(model, None, x, output="module")
    assert state_hash(model) == before
    small = fxcondensa.thin(model, None, x)  # the class back, that module run as its thinned graph
    assert type(small) is _TiedNet and "'block' (_TiedWidth)" in thin_record(small).reason
    assert "thinned: 2" in thin_record(small).reason
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_hf_convnext_comes_back_as_its_class_with_its_layer_norms_swapped():
    """ConvNextLayerNorm (both layouts) over a thinned stream becomes a width-preserving LayerNorm."""
    torch.manual_seed(0)
    model, x, fresh, _ = _bench.build_hf("convnext")
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    assert type(small) is type(model), thin_record(small).reason
    assert any(isinstance(m, fxcondensa.nn.WidthLayerNorm) for m in small.modules())
    ref = _compressed_dense(model, StructurePrune(0.5), x)
    with torch.no_grad():
        torch.testing.assert_close(small(**fresh).logits, ref(**fresh).logits, rtol=1e-4, atol=1e-5)

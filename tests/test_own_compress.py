"""compress and Compressor.run return the user's own class: compressed tensors shared with the annotated graph
kept beside it, methods intact (generate, forward_features), the same footprint, report and thinning."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _models import bench_coverage, state_hash
from test_lc import run, tiny_model, tiny_problem

import fxcondensa
from fxcondensa.capture.records import compressed_graph, graph_record, thin_record
from fxcondensa.opt import LC, FineTune
from fxcondensa.schemes import Compose, Prune, Quantize, StructurePrune

_bench = bench_coverage()


def test_compress_returns_its_class_sharing_the_graph_tensors_and_the_input_untouched():
    model = fxcondensa.models.LeNet5()
    before = state_hash(model)
    x = torch.randn(2, 1, 28, 28)
    small = fxcondensa.compress(model, Compose([StructurePrune(0.5), Quantize(fxcondensa.float16)]), x)
    graph = compressed_graph(small)
    assert type(small) is fxcondensa.models.LeNet5 and isinstance(graph, torch.fx.GraphModule)
    assert graph_record(graph).returns == "module" and state_hash(model) == before
    assert all(a is b for a, b in zip(small.parameters(), graph.parameters(), strict=True))
    assert torch.equal(small(x), graph(x))
    for accounting in ("values", "stored"):
        assert fxcondensa.footprint(small, accounting) == fxcondensa.footprint(graph, accounting)
    assert fxcondensa.footprint(small) < fxcondensa.footprint(model) // 3  # half the channels, in float16
    totals = fxcondensa.report(model, small, x, latency=False).totals
    assert totals == fxcondensa.report(model, graph, x, latency=False).totals
    thinned = fxcondensa.thin(small)  # example inputs from the graph beside it
    assert type(thinned) is fxcondensa.models.LeNet5 and thinned.ip1.out_features < 500


def test_output_graph_returns_the_annotated_graph():
    gm = fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.1), output="graph")
    assert isinstance(gm, torch.fx.GraphModule) and compressed_graph(gm) is gm
    assert round(fxcondensa.density(gm), 2) == 0.1


def test_output_module_on_a_graph_module_says_why_and_auto_returns_the_graph():
    gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"compress\(output='module'\).*GraphModule.*output='auto' or 'graph'"):
        fxcondensa.compress(gm, Prune(0.1), output="module")
    back = fxcondensa.compress(gm, Prune(0.1))
    assert isinstance(back, torch.fx.GraphModule)
    assert "GraphModule" in graph_record(back).reason and graph_record(back).returns == "graph"


@pytest.mark.parametrize("where", ["compress", "Compressor"])
def test_bad_output_names_the_value(where):
    with pytest.raises(ValueError, match=rf"{where}: output must be one of .* got 'own'"):
        if where == "compress":
            fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.1), output="own")
        else:
            fxcondensa.Compressor(fxcondensa.opt.Direct(), Prune(0.1), tiny_model(), [], output="own")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_gpt2_is_its_class_and_generates(dtype):
    torch.manual_seed(0)
    model, x, _, _ = _bench.build_hf("gpt2-lm")
    model = model.to(dtype)
    before = state_hash(model)
    small = fxcondensa.compress(model, StructurePrune(0.5), x)
    assert type(small) is type(model) and small.config is not model.config and state_hash(model) == before
    graph = compressed_graph(small)
    zeros = {k: float((v == 0).float().mean()) for k, v in small.state_dict().items() if k.endswith("c_fc.weight")}
    assert zeros and all(z > 0.2 for z in zeros.values())  # the scheme's zeros, in place
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in graph.state_dict().items())
    assert not small.training  # the model's eval mode, module by module (no dropout where it had none)
    with torch.no_grad():
        assert torch.equal(small(**x).logits, dict(graph(**x))["logits"])
    assert next(small.parameters()).dtype == dtype
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        again = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert tokens.shape == (2, 13) and torch.equal(tokens, again)


def test_compressed_timm_model_keeps_forward_features():
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    small = fxcondensa.compress(model, StructurePrune(0.5), x)
    assert type(small) is type(model)
    with torch.no_grad():
        assert torch.equal(small.forward_head(small.forward_features(x)), small(x))


@pytest.mark.parametrize("opt", [
    FineTune(iterations=20, evaluations=1, l_batch_size=64, lr=0.05, device="cpu", progress=False),
    LC(steps=2, l_batch_size=64, sgd_iterations_per_l=10, sgd_iterations_first_l=10, device="cpu", progress=False),
], ids=["FineTune", "LC"])
def test_compressor_returns_the_trained_model_as_its_class(opt):
    model = tiny_model()
    result, stats = run(opt, Prune(0.1), model)
    assert type(result) is type(model) and graph_record(compressed_graph(result)).returns == "module"
    assert stats["density"] == pytest.approx(fxcondensa.density(result))
    assert fxcondensa.footprint(result) == stats["footprint_values_after"]
    graph = compressed_graph(result)
    x = torch.randn(8, 16)
    assert torch.equal(result(x), graph(x))


def test_compressor_output_graph_returns_the_graph():
    c = fxcondensa.Compressor(fxcondensa.opt.Direct(), Prune(0.1), tiny_model(), tiny_problem()[0],
                              output="graph")
    assert isinstance(c.run(), torch.fx.GraphModule)


def _pickled(m):
    return pickle.loads(pickle.dumps(m))


def _torch_saved(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a whole module is code: the user's explicit choice


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _torch_saved}


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copied_compressed_model_keeps_its_graph_sharing_the_copy_tensors(how, tmp_path):
    """The graph beside a compressed model travels with copies and pickles of it: shared with the copy's
    tensors (not the original's), with its masks and storage dtypes, so footprint, save and thin still work."""
    torch.manual_seed(0)
    model, x = fxcondensa.models.LeNet5(), torch.randn(2, 1, 28, 28)
    small = fxcondensa.compress(model, Compose([StructurePrune(0.5), Quantize(fxcondensa.float16)]), x)
    again = COPIES[how](small)
    graph = compressed_graph(again)
    assert type(again) is type(small) and isinstance(graph, torch.fx.GraphModule) and graph is not compressed_graph(small)
    assert all(a is b for a, b in zip(again.parameters(), graph.parameters(), strict=True))
    assert all(a is not b for a, b in zip(again.parameters(), small.parameters(), strict=True))
    assert fxcondensa.footprint(again) == fxcondensa.footprint(small) < fxcondensa.footprint(model) // 3
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    fxcondensa.save_compressed(again, tmp_path / "m.pt")  # read back with weights_only loads
    loaded = fxcondensa.load_compressed(tmp_path / "m.pt", fxcondensa.models.LeNet5())
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    thinned = fxcondensa.thin(again, example_inputs=x)
    assert type(thinned) is type(model) and thinned.ip1.out_features < 500
    assert compressed_graph(thinned) is None  # a thinned model: the dense graph did not come along


def test_a_copied_thinned_model_keeps_its_record_and_saves():
    torch.manual_seed(0)
    model, x = fxcondensa.models.LeNet5(), torch.randn(2, 1, 28, 28)
    small = fxcondensa.thin(model, StructurePrune(0.5), x)
    for how, make in COPIES.items():
        again = make(small)
        rec = thin_record(again)
        assert rec is not None and rec.returns == "module" and rec is not thin_record(small), how
        assert torch.equal(rec.keep, thin_record(small).keep)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_compressed_gpt2_keeps_its_export_graph_and_generates(how):
    torch.manual_seed(0)
    model, x, _, _ = _bench.build_hf("gpt2-lm")
    small = fxcondensa.compress(model.to(torch.bfloat16), StructurePrune(0.5), x)
    again = COPIES[how](small)
    graph = compressed_graph(again)
    assert isinstance(graph, torch.fx.GraphModule)
    assert all(a is b for a, b in zip(again.parameters(), graph.parameters(), strict=True))
    assert fxcondensa.footprint(again) == fxcondensa.footprint(small)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again.generate(ids, max_new_tokens=4, do_sample=False),
                           small.generate(ids, max_new_tokens=4, do_sample=False))
        assert torch.equal(dict(graph(**x))["logits"], again(**x).logits)

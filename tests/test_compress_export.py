"""Unstructured schemes on graphs captured by torch.export, whose layers are ATen calls, not module calls."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from fxcondensa.capture.graph import trace
from fxcondensa.compression.apply import compress, density, layer_densities
from fxcondensa.passes.annotate import annotations
from fxcondensa.passes.layers import weight_layers
from fxcondensa.schemes import BlockPrune, Prune, Quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    return model, {"input_ids": torch.randint(0, 64, (1, 8))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_reaches_export_captured_layers(dtype):
    model, x = _llama(dtype)
    gm = compress(model, Prune(0.5), x, output="graph")
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())  # the layers are ATen calls here
    densities = layer_densities(gm)
    assert {n.rsplit(".", 2)[-2] for n in densities} == {*PROJECTIONS, "lm_head"}
    assert density(gm) == pytest.approx(0.5, abs=0.01)
    assert density(model) == 1.0  # the user's model is left alone
    assert density(compress(model, Prune(0.5), x)) == pytest.approx(0.5, abs=0.01)  # the user's class back
    with torch.no_grad():
        out = gm(**x)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert not torch.equal(logits, model(**x).logits)


def test_quantize_and_block_prune_reach_export_captured_layers():
    model, x = _llama(torch.float32)
    q = compress(model, Quantize(torch.bfloat16), x, output="graph")
    dtypes = {name: a.dtype for name, a in annotations(q).items()}
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert len(dtypes) == len(weight_layers(q))  # one storage dtype per layer weight (Llama's have no biases)
    b = compress(model, BlockPrune(0.5, 2), x)
    assert density(b) == pytest.approx(0.5, abs=0.01)


class FunctionalHead(nn.Module):
    """A classifier whose last layer is applied with ``F.linear`` on its own module's weight."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.body(x)), self.head.weight, self.head.bias)


def test_functional_layer_is_found_and_named_by_its_module():
    gm = trace(FunctionalHead())
    assert list(weight_layers(gm)) == ["body", "head"]
    w = compress(FunctionalHead(), Prune(0.5))
    assert set(layer_densities(w)) == {"body.weight", "head.weight"}


def test_opted_out_layer_is_skipped():
    model = FunctionalHead()
    model.body.condensa_nocompress = True
    assert list(weight_layers(trace(model))) == ["head"]


def test_compressed_export_graph_saves_as_pruned_hugging_face_directory(tmp_path):
    from fxcondensa.files.pretrained import save_pretrained_like

    model, x = _llama(torch.float32)
    folder = save_pretrained_like(compress(model, Prune(0.3), x), model, tmp_path / "pruned")
    again = transformers.LlamaForCausalLM.from_pretrained(folder)
    assert density(again) == pytest.approx(0.3, abs=0.01)


def test_compress_takes_the_capture_option_of_trace():
    from fxcondensa.capture.exported import capture_of
    from fxcondensa.capture.records import compressed_graph
    from fxcondensa.models import LeNet5
    from fxcondensa.schemes import StructurePrune

    model, x = LeNet5(), torch.randn(2, 1, 28, 28)
    w = compress(model, StructurePrune(0.3), x, capture="export")
    assert capture_of(compressed_graph(w)) == "export"
    with pytest.raises(ValueError, match="capture must be one of"):
        compress(model, Prune(0.5), x, capture="jit")

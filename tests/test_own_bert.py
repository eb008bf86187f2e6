"""An encoder comes back as its own class: BERT (AutoModel and AutoModelForSequenceClassification), other batch
sizes and lengths equal the compressed model, and a uniform result round-trips through stock from_pretrained."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import bench_coverage, state_hash

import fxcondensa
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

_bench = bench_coverage()


def _bert(head: bool, dtype: torch.dtype):
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    model = cls(config).eval()
    _bench.randomize_constants(model)  # norm affines, biases: random, not the init's ones and zeros
    return model.to(dtype)


def _out(model, **kw) -> torch.Tensor:
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head", [False, True], ids=["AutoModel", "SequenceClassification"])
def test_bert_comes_back_as_its_class_and_round_trips_through_from_pretrained(head, dtype, tmp_path):
    import transformers

    model = _bert(head, dtype)
    before = state_hash(model)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    scheme = StructurePrune(0.5, uniform=True)
    # bf16 sums over fewer channels round otherwise: the bf16 check is the module path's own (tolerance below).
    small = fxcondensa.thin(model, scheme, {"input_ids": ids}, output="module", check=dtype == torch.float32)
    assert type(small) is type(model) and thin_record(small).returns == "module" and state_hash(model) == before
    assert small.config.intermediate_size == 32 and model.config.intermediate_size == 64
    assert next(small.parameters()).dtype == dtype
    ref = copy.deepcopy(model)
    ref.load_state_dict(fxcondensa.compress(model, scheme, {"input_ids": ids}).state_dict())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch, length in ((1, 5), (2, 8), (3, 13)):
            x = torch.randint(0, 128, (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[0, -2:] = 0
            torch.testing.assert_close(_out(small, input_ids=x, attention_mask=mask),
                                       _out(ref, input_ids=x, attention_mask=mask), **tol)
    small.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    back = auto.from_pretrained(tmp_path, dtype=dtype).eval()
    assert type(back) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(_out(back, input_ids=x), _out(small, input_ids=x), rtol=0, atol=0)

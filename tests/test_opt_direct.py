"""Direct compression: Pi(w) once, no training, same result as fxcondensa.compress."""

from __future__ import annotations

import torch
from test_lc import tiny_model, tiny_problem
from torch import nn

import fxcondensa as condensa
from fxcondensa.opt import Direct
from fxcondensa.opt.training import as_batches
from fxcondensa.schemes import Compose, Prune, Quantize


def test_direct_equals_compress_and_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val, test = tiny_problem()
    example = train.tensors[0][:2]
    scheme = Compose([Prune(0.1), Quantize(condensa.float16)])
    result, stats = Direct().compress(model, scheme, as_batches(train, 64), as_batches(val, 64), None,
                                      nn.CrossEntropyLoss(), example)
    expected = condensa.compress(model, scheme, example)
    assert isinstance(result, torch.fx.GraphModule)
    assert result.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(result.state_dict().values(), expected.state_dict().values(), strict=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert stats["elapsed_optimizer"] >= 0


def test_direct_has_no_hyper_parameters():
    assert Direct().config == {} and repr(Direct()) == "Direct()"


def test_direct_through_the_compressor_needs_no_training():
    model = tiny_model()
    train, val, test = tiny_problem()
    c = condensa.Compressor(Direct(), Prune(0.2), model, train, test, val, nn.CrossEntropyLoss())
    w = c.run()
    assert c.statistics["optimizer"] == "Direct" and c.statistics["optimizer_config"] == {}
    assert c.statistics["density"] == condensa.density(w) == 0.2
    assert "history" not in c.statistics

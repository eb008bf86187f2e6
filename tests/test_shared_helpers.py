"""The helpers every layer shares, each written once: eval mode with every training flag restored, the atomic
writer, the reader of a node's shape, speculative rule visits, and MAC terms stated by registry entries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcondensa
from fxcondensa.capture.modes import eval_mode
from fxcondensa.files.fileio import save_atomic, write_atomic
from fxcondensa.opt.training import TensorBatches, evaluate
from fxcondensa.passes.costs import node_cost, node_cost_terms
from fxcondensa.rules.api import ChanInfo, RuleContext
from fxcondensa.rules.registry import node_shape


def _mixed() -> nn.Module:
    """A model in training mode with one BatchNorm frozen in eval mode (fine-tuning with frozen statistics)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    model[1].eval()
    return model


def test_eval_mode_restores_each_submodule_flag():
    model, other = _mixed(), nn.Linear(2, 2)
    with eval_mode(model, other):
        assert not any(m.training for m in [*model.modules(), *other.modules()])
        model[2].train()  # a caller may switch parts back (BatchNorm recalibration)
    assert [m.training for m in model.modules()] == [True, True, False, True] and other.training


def test_eval_mode_restores_flags_after_an_error():
    model = _mixed()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_evaluate_keeps_a_frozen_batchnorm_frozen():
    """``evaluate`` used to restore ``model.train(was_training)``: a frozen BatchNorm came back training."""
    model = _mixed()
    evaluate(model, TensorBatches(torch.randn(8, 4), torch.randint(0, 3, (8,)), 4), nn.CrossEntropyLoss())
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_write_atomic_cleans_up_what_the_writer_left_beside_the_file(tmp_path):
    target = tmp_path / "model.onnx"

    def write(tmp: str) -> None:
        Path(tmp).write_text("model")
        Path(tmp + ".data").write_text("weights")  # external data, as ONNX writes it
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, write)
    assert os.listdir(tmp_path) == []


def test_write_atomic_refuses_an_existing_file_and_a_missing_folder(tmp_path):
    (tmp_path / "x.pt").write_text("old")
    with pytest.raises(FileExistsError, match=r"x\.pt already exists; pass overwrite=True"):
        write_atomic(tmp_path / "x.pt", lambda tmp: None, overwrite=False)
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        write_atomic(tmp_path / "missing" / "x.pt", lambda tmp: None)


def test_saved_files_get_a_normal_file_mode(tmp_path):
    path = tmp_path / "x.pt"
    save_atomic({"a": 1}, path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_node_shape_reads_shape_propagation():
    gm = fxcondensa.trace(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 8, 8))
    assert [node_shape(n) for n in gm.graph.nodes] == [(2, 3, 8, 8), (2, 4, 6, 6), (2, 4, 6, 6)]
    assert node_shape(3) is None


def test_speculation_is_rewound_unless_kept():
    gm = fxcondensa.trace(nn.Sequential(nn.Linear(3, 4)), torch.randn(2, 3))
    ctx = RuleContext(gm)
    node = list(gm.graph.nodes)[1]
    before = ctx.analysis.state()
    with ctx.speculate():
        atoms = ctx.new_channels(4, "x", "other")
        ctx.output(node, ChanInfo(1, atoms), None)
        ctx.analysis.head_dim_atoms.append(atoms)
    assert ctx.analysis.state() == before and ctx.analysis.infos == {}
    with ctx.speculate() as attempt:
        ctx.new_channels(4, "x", "other")
        attempt.keep()
    assert ctx.analysis.num_atoms == 4
    with pytest.raises(ValueError), ctx.speculate():
        ctx.new_channels(2, "y", "other")
        raise ValueError("a rule failed")
    assert ctx.analysis.num_atoms == 4


def test_attention_costs_are_terms_of_its_entry():
    """MultiheadAttention's MACs: in-projection, out-projection and the two products, each with its dims."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    gm = fxcondensa.trace(Block(), torch.randn(1, 5, 8))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    kind, terms = node_cost_terms(gm, node)
    tokens, inner, seq = 5, 8, 5
    assert kind == "matmul" and [t.macs for t in terms] == [tokens * 3 * inner * 8, tokens * inner * 8,
                                                            tokens * 2 * seq * inner]
    assert node_cost(gm, node) == ("matmul", sum(t.macs for t in terms))
    assert all(t.scales[0].value == "attn.in_proj_weight" for t in terms)

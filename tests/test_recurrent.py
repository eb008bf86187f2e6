"""Recurrent layers thinned exactly: nn.LSTM, nn.GRU, nn.RNN, multi-layer and bidirectional; input features
and hidden units."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa import compress, thin
from fxcondensa.capture.records import thin_record
from fxcondensa.schemes import StructurePrune

RTOL, ATOL = 1e-4, 1e-5
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Tagger(nn.Module):
    """Linear features -> recurrent layer -> linear head on the outputs and on the final state."""

    def __init__(self, cell: str, layers: int = 2, bidirectional: bool = True, batch_first: bool = True,
                 hidden: int = 8, features: int = 6):
        super().__init__()
        self.cell, self.batch_first = cell, batch_first
        self.embed = nn.Linear(4, features)
        self.rnn = CELLS[cell](features, hidden, num_layers=layers, bidirectional=bidirectional,
                               batch_first=batch_first)
        dirs = 2 if bidirectional else 1
        self.out = nn.Linear(dirs * hidden, 3)
        self.state = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.embed(x))
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.cell == "lstm":
            y, (h, c) = self.rnn(x)
            s = self.state(h[-1] + c[-1])
        else:
            y, h = self.rnn(x)
            s = self.state(h[-1])
        y = y.mean(1 if self.batch_first else 0)
        return self.out(y) + s


def _exact(model: nn.Module, x: torch.Tensor, scheme=None) -> nn.Module:
    scheme = scheme or StructurePrune(0.5)
    model = model.eval()
    compressed = compress(model, scheme, x)
    small = thin(model, scheme, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressed(x), rtol=RTOL, atol=ATOL)
    return small


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_are_thinned_exactly(cell, bidirectional):
    torch.manual_seed(0)
    small = _exact(Tagger(cell, bidirectional=bidirectional), torch.randn(2, 5, 4))
    rnn = small.rnn
    assert rnn.hidden_size < 8 and rnn.input_size < 6 and rnn.input_size == small.embed.out_features
    assert rnn.weight_hh_l1.shape[1] == rnn.hidden_size
    assert small.out.in_features == (2 if bidirectional else 1) * rnn.hidden_size


def test_sequence_first_layout():
    torch.manual_seed(1)
    small = _exact(Tagger("lstm", batch_first=False), torch.randn(2, 5, 4))
    assert small.rnn.hidden_size < 8


class _WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x, h0)[0])


def test_initial_state_keeps_the_layer_with_reason():
    x, h0 = torch.randn(2, 5, 4), torch.randn(1, 2, 6)
    small = thin(_WithState().eval(), StructurePrune(0.5), (x, h0))
    assert small.rnn.hidden_size == 6
    frozen = " ".join(g.frozen for g in thin_record(small).groups)
    assert "GRU 'rnn' is called with an initial state" in frozen


def test_nonzero_unit_is_kept():
    """Regression: a hidden unit whose output columns downstream are zero still feeds the other units."""
    torch.manual_seed(2)
    model = Tagger("gru", layers=1, bidirectional=False).eval()
    with torch.no_grad():
        model.out.weight[:, 3] = 0
        model.state.weight[:, 3] = 0
    x = torch.randn(2, 5, 4)
    small = thin(model, example_inputs=x)
    assert small.rnn.hidden_size == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)


@settings(max_examples=10, deadline=None)
@given(cell=st.sampled_from(list(CELLS)), layers=st.integers(1, 3), bidirectional=st.booleans(),
       hidden=st.integers(2, 8), density=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_recurrent_width_property(cell, layers, bidirectional, hidden, density, seed):
    torch.manual_seed(seed)
    _exact(Tagger(cell, layers, bidirectional, hidden=hidden), torch.randn(2, 4, 4), StructurePrune(density))


def test_thinned_lstm_exports(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 4)
    small = thin(Tagger("lstm").eval(), StructurePrune(0.5), x)
    fxcondensa.files.export.torch_export(small, tmp_path / "l.pt2", x)

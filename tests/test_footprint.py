"""footprint: Condensa's values-only bytes, computed by hand, and the real size of the compact file."""

from __future__ import annotations

import os

import pytest
import torch
from _models import LeNet5, make_convnet

from fxcondensa import save_compressed
from fxcondensa.compression.apply import compress
from fxcondensa.measure.footprint import footprint, storage_dtypes
from fxcondensa.schemes import Compose, Prune, Quantize

LENET_PARAMS = 431080  # 500+20 + 25000+50 + 400000+500 + 5000+10
LENET_WEIGHTS = 430500
LENET_BIASES = 580


def _mem(seed: int = 0):
    torch.manual_seed(seed)
    return compress(LeNet5(), Compose([Prune(0.007), Quantize(torch.float16)]))


def test_dense_lenet_values_and_dtypes():
    model = LeNet5()
    assert footprint(model) == LENET_PARAMS * 4
    assert set(storage_dtypes(model).values()) == {torch.float32}


def test_lenet_mem_values_by_hand():
    w = _mem()
    kept_weights = round(0.007 * LENET_WEIGHTS)  # 3014: Prune keeps round(density * n) weights
    assert kept_weights == 3014
    # random-init biases are all non-zero and Prune leaves them; Quantize stores everything in 2 bytes
    assert all(int(w.get_parameter(n).count_nonzero()) == w.get_parameter(n).numel()
               for n in ["conv1.bias", "conv2.bias", "ip1.bias", "ip2.bias"])
    assert footprint(w, "values") == (kept_weights + LENET_BIASES) * 2 == 7188
    assert footprint(LeNet5()) / footprint(w) == pytest.approx(239.9, abs=0.05)  # the tutorial's 239x


def test_values_follow_storage_dtype_per_parameter():
    torch.manual_seed(0)
    w = compress(LeNet5(), Quantize(torch.bfloat16, exclude=["ip1"]))
    ip1 = 400000 + 500
    assert storage_dtypes(w)["ip1.weight"] == torch.float32
    assert footprint(w) == ip1 * 4 + (LENET_PARAMS - ip1) * 2


def test_stored_is_the_real_file_size(tmp_path):
    w = _mem()
    path = tmp_path / "w.fxc"
    written = save_compressed(w, path)
    assert written == os.path.getsize(path) == footprint(w, "stored")


def test_stored_sparse_is_smaller_than_dense():
    dense = LeNet5()
    w = _mem()
    stored = footprint(w, "stored")
    assert stored < footprint(dense, "values") / 50
    assert stored < footprint(dense, "stored") / 50
    assert stored > footprint(w, "values")  # indices and the file format cost something: never flattering


def test_dense_model_stored_costs_about_its_values():
    dense = LeNet5()
    stored = footprint(dense, "stored")
    assert LENET_PARAMS * 4 < stored < LENET_PARAMS * 4 + 8192


def test_stored_counts_buffers_but_values_do_not():
    model = make_convnet(3, 8, 3)
    values = footprint(model)
    assert values == sum(int(p.count_nonzero()) for p in model.parameters()) * 4  # BN bias starts at 0
    with_buffers = footprint(model, "stored")
    model.bn.register_buffer("extra", torch.randn(4096))
    assert footprint(model) == values
    assert footprint(model, "stored") >= with_buffers + 4096 * 4


def test_unknown_accounting():
    with pytest.raises(ValueError, match="'bytes'"):
        footprint(LeNet5(), "bytes")

"""save_compressed / load_compressed: exact round trips, a compact file, and refusal of every bad file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from _models import MLP, ConvBN, LeNet5, Tied, lenet_input, make_convnet, make_mlp, state_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcondensa
from fxcondensa import FileFormatError, load_compressed, save_compressed
from fxcondensa.compression.apply import compress
from fxcondensa.files.serialize import FORMAT_VERSION, MAGIC, decode_tensor, encode_tensor, index_dtype
from fxcondensa.schemes import Compose, Prune, Quantize


def _mem(seed: int = 0):
    torch.manual_seed(seed)
    return compress(LeNet5(), Compose([Prune(0.007), Quantize(torch.float16)]))


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---- round trips -------------------------------------------------------------------------------------


def test_lenet_mem_round_trip_exact(tmp_path):
    w = _mem()
    path = tmp_path / "mem.fxc"
    n = save_compressed(w, path)
    assert n == os.path.getsize(path)
    target = LeNet5()
    before = state_hash(target)
    loaded = load_compressed(path, target)
    assert loaded is not target and type(loaded) is LeNet5
    assert state_hash(target) == before  # the argument is never mutated
    _same_state(loaded, w)
    x = lenet_input(4)
    torch.testing.assert_close(loaded(x), w(x), rtol=0, atol=0)


def test_load_into_the_compressed_graph_module_itself(tmp_path):
    w = _mem()
    save_compressed(w, tmp_path / "w.fxc")
    again = load_compressed(tmp_path / "w.fxc", w)
    assert again is not w
    _same_state(again, w)
    assert fxcondensa.footprint(again) == fxcondensa.footprint(w)  # annotations travel with the copy


def test_buffers_round_trip(tmp_path):
    model = make_convnet(3, 8, 3)
    assert int(model.bn.num_batches_tracked) == 1 and bool((model.bn.running_mean != 0).any())
    w = compress(model, Compose([Prune(0.3), Quantize(torch.bfloat16)]))
    save_compressed(w, tmp_path / "c.fxc")
    loaded = load_compressed(tmp_path / "c.fxc", ConvBN(3, 8, 3))
    _same_state(loaded, w)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded.eval()(x), w.eval()(x), rtol=0, atol=0)


def test_values_come_back_in_the_models_dtype(tmp_path):
    w = _mem()
    save_compressed(w, tmp_path / "w.fxc")
    loaded = load_compressed(tmp_path / "w.fxc", LeNet5().double())
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert torch.equal(loaded.ip1.weight, w.ip1.weight.double())


def test_tied_weights_stored_once_and_still_tied(tmp_path):
    torch.manual_seed(0)
    model = Tied(64)
    save_compressed(model, tmp_path / "t.fxc")
    payload = torch.load(tmp_path / "t.fxc", weights_only=True)
    assert payload["tensors"]["b.weight"] == {"kind": "alias", "of": "a.weight"}
    loaded = load_compressed(tmp_path / "t.fxc", Tied(64))
    _same_state(loaded, model)
    assert loaded.a.weight is loaded.b.weight


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    d=st.floats(0.01, 1.0),
    dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_random_mlps_round_trip(tmp_path_factory, sizes, d, dtype, seed):
    model = make_mlp(tuple(sizes), seed)
    scheme = Prune(d) if dtype is None else Compose([Prune(d), Quantize(dtype)])
    w = compress(model, scheme)
    path = tmp_path_factory.mktemp("mlp") / "m.fxc"
    save_compressed(w, path)
    loaded = load_compressed(path, MLP(tuple(sizes)))
    _same_state(loaded, w)
    x = torch.randn(3, sizes[0])
    torch.testing.assert_close(loaded.eval()(x), w.eval()(x), rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(cin=st.integers(1, 4), cmid=st.integers(1, 12), k=st.sampled_from([1, 3, 5]), d=st.floats(0.02, 1.0),
       seed=st.integers(0, 1000))
def test_random_convnets_round_trip(tmp_path_factory, cin, cmid, k, d, seed):
    model = make_convnet(cin, cmid, k, seed)
    w = compress(model, Compose([Prune(d), Quantize(torch.float16)]))
    path = tmp_path_factory.mktemp("conv") / "c.fxc"
    save_compressed(w, path)
    _same_state(load_compressed(path, ConvBN(cin, cmid, k)), w)


# ---- the encoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cols", "dtype"), [(1, torch.uint8), (255, torch.uint8), (256, torch.int16),
                                             (32767, torch.int16), (32768, torch.int32)])
def test_index_dtype_is_the_smallest_that_holds_cols(cols, dtype):
    assert index_dtype(cols) == dtype


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 300), min_size=0, max_size=3).filter(lambda s: torch.Size(s).numel() < 20000),
       keep=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
       seed=st.integers(0, 1000))
def test_encode_decode_exact_and_smaller_choice(shape, keep, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < keep)
    t = (t * 100).to(dtype)
    e = encode_tensor(t)
    back = decode_tensor(e)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    dense_bytes = t.numel() * t.element_size()
    if e["kind"] == "csr":
        idx = e["cols"].dtype
        rows = shape[0] if len(shape) >= 2 else 1
        cols = t.numel() // rows if rows else 0
        assert idx == index_dtype(cols) and e["counts"].dtype == idx
        nnz = int((t != 0).sum())
        assert (rows + nnz) * idx.itemsize + nnz * t.element_size() < dense_bytes
    else:
        assert e["values"].numel() == t.numel()


def test_encode_in_storage_dtype_and_layout():
    t = torch.zeros(20, 3, 5, 5)
    t[2, 1, 3, 4] = 1.5
    t[7, 0, 0, 0] = -2.0
    t[7, 2, 4, 4] = 1e-9  # rounds to zero in float16: a zero of the file too
    e = encode_tensor(t, torch.float16)
    assert e["kind"] == "csr" and e["shape"] == [20, 3, 5, 5]
    assert e["values"].dtype == torch.float16 and e["values"].tolist() == [1.5, -2.0]
    assert e["cols"].dtype == torch.uint8 and e["cols"].tolist() == [1 * 25 + 3 * 5 + 4, 0]
    assert e["counts"].tolist() == [0, 0, 1, 0, 0, 0, 0, 1] + [0] * 12
    assert encode_tensor(torch.randn(10, 10), torch.float16)["kind"] == "dense"


def test_lenet_file_layout(tmp_path):
    w = _mem()
    save_compressed(w, tmp_path / "w.fxc")
    payload = torch.load(tmp_path / "w.fxc", weights_only=True)
    assert payload["magic"] == MAGIC and payload["version"] == FORMAT_VERSION
    assert payload["model_class"] == "LeNet5"
    table = payload["tensors"]
    assert list(table) == list(LeNet5().state_dict())
    ip1 = table["ip1.weight"]
    assert ip1["kind"] == "csr" and ip1["cols"].dtype == torch.int16 and ip1["values"].dtype == torch.float16
    assert ip1["values"].numel() == int(w.ip1.weight.count_nonzero())
    assert table["ip1.bias"]["kind"] == "dense" and table["ip1.bias"]["values"].dtype == torch.float16


def test_unquantized_tensors_keep_their_own_dtype(tmp_path):
    torch.manual_seed(0)
    w = compress(LeNet5(), Prune(0.5))
    save_compressed(w, tmp_path / "w.fxc")
    table = torch.load(tmp_path / "w.fxc", weights_only=True)["tensors"]
    assert all(e["values"].dtype == torch.float32 for e in table.values())


# ---- writing safely ----------------------------------------------------------------------------------------


def test_no_overwrite_without_flag(tmp_path):
    path = tmp_path / "w.fxc"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError) as info:
        save_compressed(LeNet5(), path)
    assert str(path) in str(info.value) and "overwrite=True" in str(info.value)
    assert path.read_bytes() == b"precious"
    save_compressed(LeNet5(), path, overwrite=True)
    assert path.read_bytes() != b"precious"
    assert os.listdir(tmp_path) == ["w.fxc"]  # no temporary file left behind


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "w.fxc"
    path.write_bytes(b"old")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(LeNet5(), path, overwrite=True)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.fxc"]


def test_save_argument_checks(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_compressed({"a": torch.zeros(1)}, tmp_path / "x.fxc")
    with pytest.raises(FileNotFoundError):
        save_compressed(LeNet5(), tmp_path / "no" / "such" / "dir.fxc")


# ---- refusing bad files ---------------------------------------------------------------------------------


def _refused(path, model=None, match: str | None = None) -> str:
    model = model if model is not None else LeNet5()
    before = state_hash(model)
    with pytest.raises(FileFormatError) as info:
        load_compressed(path, model)
    msg = str(info.value)
    assert str(path) in msg
    if match:
        assert match in msg, msg
    assert state_hash(model) == before
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.fxc"):
        load_compressed(tmp_path / "nothing.fxc", LeNet5())


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file(tmp_path, fraction):
    save_compressed(_mem(), tmp_path / "w.fxc")
    data = (tmp_path / "w.fxc").read_bytes()
    (tmp_path / "cut.fxc").write_bytes(data[: int(len(data) * fraction)])
    _refused(tmp_path / "cut.fxc")


def test_plain_state_dict_refused(tmp_path):
    torch.save(LeNet5().state_dict(), tmp_path / "sd.pth")
    _refused(tmp_path / "sd.pth", match=MAGIC)


def test_text_file_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("conv1.weight: 0.5\n")
    _refused(tmp_path / "notes.txt")


class _Exploit:
    """Unpickling this would create a marker file: what a malicious model file does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.fxc"
    payload = {"magic": MAGIC, "version": FORMAT_VERSION, "model_class": "LeNet5", "tensors": _Exploit(str(marker))}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    _refused(path)
    assert not marker.exists()


def test_wrong_version(tmp_path):
    torch.save({"magic": MAGIC, "version": 99, "model_class": "LeNet5", "tensors": {}}, tmp_path / "v.fxc")
    _refused(tmp_path / "v.fxc", match="version 99")


def test_malformed_entry_named(tmp_path):
    save_compressed(_mem(), tmp_path / "w.fxc")
    payload = torch.load(tmp_path / "w.fxc", weights_only=True)
    payload["tensors"]["conv2.weight"]["cols"][0] = 500  # conv2 rows have 20 * 5 * 5 = 500 columns
    torch.save(payload, tmp_path / "bad.fxc")
    _refused(tmp_path / "bad.fxc", match="'conv2.weight'")
    payload = torch.load(tmp_path / "w.fxc", weights_only=True)
    payload["tensors"]["ip1.weight"] = {"kind": "dense", "shape": [500, 800], "values": torch.zeros(7)}
    torch.save(payload, tmp_path / "bad2.fxc")
    _refused(tmp_path / "bad2.fxc", match="'ip1.weight'")


def test_other_architecture_names_first_bad_key(tmp_path):
    save_compressed(make_mlp((8, 16, 4)), tmp_path / "mlp.fxc")
    _refused(tmp_path / "mlp.fxc", MLP((8, 16, 5)), match="'net.3.weight'")  # shape differs
    msg = _refused(tmp_path / "mlp.fxc", LeNet5(), match="'conv1.weight'")  # key missing
    assert "'MLP'" in msg and "LeNet5" in msg


def test_extra_key_in_file_named(tmp_path):
    model = make_convnet(3, 8, 3)
    model.bn.register_buffer("extra", torch.ones(3))
    save_compressed(model, tmp_path / "x.fxc")
    _refused(tmp_path / "x.fxc", ConvBN(3, 8, 3), match="'bn.extra'")


def test_load_argument_checks(tmp_path):
    save_compressed(LeNet5(), tmp_path / "w.fxc")
    with pytest.raises(TypeError, match="str"):
        load_compressed(tmp_path / "w.fxc", "LeNet5")

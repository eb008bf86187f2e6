"""The fxcondensa command: exit codes and messages, the safe scheme parser, and the LeNet-5 / ResNet flows.

The command runs in-process through ``main(argv)`` (fast); one subprocess test covers ``python -m``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

import fxcondensa
from fxcondensa import schemes
from fxcondensa.cli import SchemeSyntaxError, build_model, main, parse_scheme

HAS_THIN = hasattr(fxcondensa, "thin") and hasattr(schemes, "StructurePrune")
needs_thin = pytest.mark.skipif(not HAS_THIN, reason="fxcondensa.thin / StructurePrune not available yet")


def seeded(spec, shape, seed=0):
    """The command's model and example input: the model built after torch.manual_seed(seed), the input drawn
    from its own generator of that seed."""
    torch.manual_seed(seed)
    model = build_model(spec)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------- scheme parser

def test_parse_scheme_builds_scheme_objects():
    s = parse_scheme("Compose([Prune(0.02), Quantize(float16)])")
    assert isinstance(s, schemes.Compose)
    assert isinstance(s.schemes[0], schemes.Prune) and s.schemes[0].density == 0.02
    assert s.schemes[1].dtype is torch.float16
    p = parse_scheme("Prune(0.1, layers={'conv*': 0.5}, exclude=['ip2'])")
    assert p.layers == {"conv*": 0.5} and p.exclude == ["ip2"]
    assert parse_scheme("Quantize(bfloat16)").dtype is torch.bfloat16
    assert parse_scheme("BlockPrune(0.5, (2, 2))").block_size == (2, 2)


@needs_thin
def test_parse_scheme_structured():
    assert isinstance(parse_scheme("StructurePrune(0.5)"), schemes.StructurePrune)
    assert isinstance(parse_scheme("FilterPrune(0.5)"), schemes.FilterPrune)
    assert isinstance(parse_scheme("NeuronPrune(0.5)"), schemes.NeuronPrune)


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "Prune.__init__",
    "fxcondensa.schemes.Prune(0.1)",
    "Prune(0.1).__class__",
    "torch.float16",
    "Quantize(torch.float16)",
    "Prune(open('/etc/passwd'))",
    "Prune(*[0.1])",
    "Prune(**{'density': 0.1})",
    "Prune(x)",
    "(lambda: Prune(0.1))()",
    "[Prune(0.1)]",
    "Prune(0.1) if True else 0",
    "Prune(1 / 10)",
    "Prune(0.1); import os",
    "Prune(",
    "Compose([" * 400 + "Prune(0.1)" + "])" * 400,
])
def test_parse_scheme_refuses_anything_but_scheme_calls_with_literals(text):
    with pytest.raises(SchemeSyntaxError):
        parse_scheme(text)


def test_scheme_errors_say_what_is_allowed():
    with pytest.raises(SchemeSyntaxError, match="'__import__' is not a scheme.*StructurePrune"):
        parse_scheme("__import__('os')")
    with pytest.raises(SchemeSyntaxError, match="attribute"):
        parse_scheme("os.system('x')")
    with pytest.raises(SchemeSyntaxError, match="did you mean Prune"):
        parse_scheme("Prun(0.1)")
    with pytest.raises(SchemeSyntaxError, match=r"density must be in \(0, 1\]"):
        parse_scheme("Prune(2.0)")


# ------------------------------------------------------------------------------------------- bad args

def test_bad_scheme_exits_2_with_usage(capsys):
    code, out, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--scheme", "__import__('os')")
    assert code == 2 and "usage: fxcondensa compress" in err and "not a scheme" in err and out == ""


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["compress", "--scheme", "Prune(0.1)"], "--model"),
    (["compress", "--model", "fxcondensa:LeNet5"], "--scheme"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(2.0)"], "density must be in"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--input-shape", "1,a"], "not a shape"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--input-shape", "0,1,28,28"],
     "positive"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--report", "--json"],
     "not allowed with"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--export", "m.bin"], ".pt2"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--input-shape", "1,3,28,28"],
     "--input-shape 1,3,28,28"),
    (["frobnicate"], "invalid choice"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--leaf-module", "Linear"],
     "'Linear': name the class with its module"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--leaf-module", "torch.nn.Nope"],
     "'torch.nn.Nope': cannot import it"),
    (["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--leaf-module", "torch.nn.init"],
     "not a torch.nn.Module class"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err and message in err


@pytest.mark.parametrize("spec, close", [
    ("torchvision:resnet19", "torchvision:resnet18"),
    ("fxcondensa:LeNet", "fxcondensa:LeNet5"),
    ("resnet18", "torchvision:resnet18"),
    ("lenet5", None),
])
def test_unknown_model_says_how_models_are_named_and_lists_close_matches(capsys, spec, close):
    code, _, err = run(capsys, "compress", "--model", spec, "--scheme", "Prune(0.1)", "--input-shape", "1,1,28,28")
    assert code == 2
    assert "torchvision:NAME" in err and "path/to/file.py:factory" in err
    if close:
        assert "close matches" in err and close in err


def test_existing_export_refused_without_overwrite(capsys, tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"keep")
    code, _, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)",
                       "--export", str(path), "--quiet")
    assert code == 2 and "--overwrite" in err and path.read_bytes() == b"keep"


def test_model_from_file(capsys, tmp_path):
    src = tmp_path / "mine.py"
    src.write_text("from fxcondensa.models import LeNet5\n\ndef make_lenet():\n    return LeNet5()\n\n"
                   "def broken():\n    raise RuntimeError('no weights here')\n")
    assert type(build_model(f"{src}:make_lenet")).__name__ == "LeNet5"
    code, _, err = run(capsys, "compress", "--model", f"{src}:make_lenet5", "--scheme", "Prune(0.1)",
                       "--input-shape", "1,1,28,28")
    assert code == 2 and "no function 'make_lenet5'" in err and "make_lenet" in err
    code, _, err = run(capsys, "compress", "--model", f"{src}:make_lenet", "--scheme", "Prune(0.1)")
    assert code == 2 and "--input-shape is needed" in err
    code, _, err = run(capsys, "compress", "--model", f"{src}:broken", "--scheme", "Prune(0.1)",
                       "--input-shape", "1,1,28,28", "--quiet")
    assert code == 1 and "error: RuntimeError: no weights here" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------- flows

def test_compress_lenet5_prints_density_and_footprint(capsys):
    code, out, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5",
                         "--scheme", "Compose([Prune(0.007), Quantize(float16)])")
    assert code == 0
    assert "compressed: parameters 431080 -> 431080" in out and "footprint" in out
    assert "[1/2] building fxcondensa:LeNet5" in err  # progress, on stderr


def test_report_lenet5_json(capsys):
    code, out, _ = run(capsys, "report", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)",
                       "--json", "--no-latency", "--quiet")
    assert code == 0
    data = json.loads(out)
    rows = {r["layer"]: r for r in data["rows"]}
    assert rows["conv1"]["macs_before"] == 20 * 24 * 24 * 25 and rows["ip1"]["macs_after"] == 500 * 800
    assert data["totals"]["density"] == pytest.approx(0.1, abs=0.01)


def test_report_lenet5_table_with_latency(capsys):
    code, out, _ = run(capsys, "report", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.5)",
                       "--repeat", "1", "--quiet")
    assert code == 0 and "conv1" in out and "TOTAL" in out and "latency before" in out


def test_compress_exports_a_checked_file(capsys, tmp_path):
    path = tmp_path / "lenet.pt2"
    code, _, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)",
                       "--export", str(path), "--quiet")
    assert code == 0 and path.is_file() and f"wrote {path}" in err
    model, x = seeded("fxcondensa:LeNet5", (1, 1, 28, 28))
    expected = fxcondensa.compress(model, schemes.Prune(0.1), x)(x)
    torch.testing.assert_close(torch.export.load(str(path)).module()(x), expected, rtol=1e-4, atol=1e-5)


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


@needs_thin
def test_thin_lenet5_json(capsys):
    code, out, _ = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--scheme", "StructurePrune(0.3)",
                       "--json", "--no-latency", "--quiet")
    assert code == 0
    data = json.loads(out)
    rows = {r["layer"]: r for r in data["rows"]}
    assert rows["conv1"]["output_shape_after"][1] < 20
    assert data["totals"]["macs_after"] < data["totals"]["macs_before"]
    assert any("ip2" in g["layers"] for g in data["frozen"])  # the output layer keeps its 10 classes


@needs_thin
def test_thin_resnet18_report_and_torchscript_export(capsys, tmp_path):
    """The issue's 'done when', at 64x64 to stay fast."""
    path = tmp_path / "r18.pt"
    code, out, err = run(capsys, "thin", "--model", "torchvision:resnet18", "--scheme", "StructurePrune(0.5)",
                         "--input-shape", "1,3,64,64", "--report", "--export", str(path), "--repeat", "1")
    assert code == 0, err
    assert "layer1.0.conv1" in out and "MACs" in out and "latency ms" in out and "TOTAL" in out
    assert "frozen channel groups" in out
    assert "thinning with StructurePrune" in err and f"wrote {path}" in err
    model, x = seeded("torchvision:resnet18", (1, 3, 64, 64))
    thinned = fxcondensa.thin(model, schemes.StructurePrune(0.5), x)
    with torch.no_grad():
        torch.testing.assert_close(_jit_load(path)(x), thinned.eval()(x), rtol=1e-4, atol=1e-5)


def test_python_m_help():
    result = subprocess.run([sys.executable, "-m", "fxcondensa", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "thin" in result.stdout and "report" in result.stdout and "compress" in result.stdout


def test_help_and_version_exit_0(capsys):
    assert run(capsys, "thin", "--help")[0] == 0
    code, out, _ = run(capsys, "--version")
    assert code == 0 and fxcondensa.__version__ in out


def test_leaf_module_keeps_the_layer_whole(capsys):
    """--leaf-module reaches thin: a block kept opaque freezes the channels flowing through it."""
    code, out, _ = run(capsys, "thin", "--model", "torchvision:resnet18", "--scheme", "StructurePrune(0.5)",
                       "--input-shape", "1,3,32,32", "--leaf-module", "torchvision.models.resnet.BasicBlock",
                       "--quiet")
    assert code == 0 and "'layer1.0' (BasicBlock)" in out and "frozen channel groups" in out


# ------------------------------------------------------------------------------- the user's model: sources

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Small Hugging Face directories written with save_pretrained: a masked LM, a causal LM, an image classifier."""
    import transformers
    from _models import bench_coverage

    randomize = bench_coverage().randomize_constants
    root = tmp_path_factory.mktemp("hf")
    text = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64}
    made = {
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(**text)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(**text, num_key_value_heads=2)),
        "vit": transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, num_labels=5)),
    }
    for name, model in made.items():
        torch.manual_seed(0)
        randomize(model)
        model.save_pretrained(root / name)
    return root


def _auto(folder):
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder).eval()


def test_hf_directory_thins_and_saves_a_reloadable_file(capsys, hf_dirs, tmp_path):
    """The issue's 'done when' for hf:DIR, at sequence length 16."""
    path = tmp_path / "out.fxt"
    code, out, err = run(capsys, "thin", "--model", f"hf:{hf_dirs / 'bert'}", "--scheme", "StructurePrune(0.5)",
                         "--seq-len", "16", "--save", str(path), "--quiet")
    assert code == 0, err
    assert "thinned: parameters" in out and f"wrote {path} (save_thinned" in err
    again = fxcondensa.load_thinned(path, lambda: _auto(hf_dirs / "bert"))
    torch.manual_seed(0)
    x = {"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))}
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    thinned = fxcondensa.thin(_auto(hf_dirs / "bert"), schemes.StructurePrune(0.5), x)
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, thinned(**x).logits)


def test_hf_inputs_come_from_the_config(capsys, hf_dirs):
    from fxcondensa.files.sources import load_source

    text, image = load_source(f"hf:{hf_dirs / 'llama'}"), load_source(f"hf:{hf_dirs / 'vit'}")
    assert (text.input_kind, text.input_shape, text.vocab_size) == ("tokens", (1, 64), 128)  # max positions 64
    assert type(text.model).__name__ == "LlamaForCausalLM" and type(image.model).__name__ == "ViTForImageClassification"
    assert (image.input_kind, image.input_shape) == ("float", (1, 3, 32, 32))
    code, out, _ = run(capsys, "report", "--model", f"hf:{hf_dirs / 'vit'}", "--scheme", "StructurePrune(0.5)",
                       "--thin", "--json", "--no-latency", "--quiet")
    assert code == 0 and json.loads(out)["input_shapes"] == [[1, 3, 32, 32]]


def test_save_pretrained_writes_what_a_config_can_describe(capsys, hf_dirs, tmp_path):
    folder = tmp_path / "same"
    # thin without a scheme removes only channels that are already zero (none here): every shape stays
    code, _, err = run(capsys, "thin", "--model", f"hf:{hf_dirs / 'vit'}", "--save-pretrained", str(folder),
                       "--quiet")
    assert code == 0, err
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_auto(folder)(x).logits, _auto(hf_dirs / "vit")(x).logits)
    code, _, err = run(capsys, "thin", "--model", f"hf:{hf_dirs / 'vit'}", "--scheme", "StructurePrune(0.5)",
                       "--save-pretrained", str(tmp_path / "thin"), "--quiet")
    assert code == 1 and "thinning changed" in err and "--save out.fxt" in err and not (tmp_path / "thin").exists()
    code, _, err = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--save-pretrained", str(tmp_path / "x"))
    assert code == 2 and "only a model loaded with --model hf:DIR" in err


def test_hf_bad_directories_exit_2_naming_the_value(capsys, hf_dirs, tmp_path):
    def fails(spec, *message):
        code, _, err = run(capsys, "thin", "--model", spec, "--quiet")
        assert code == 2 and "usage:" in err, err
        for m in message:
            assert m in err, err

    fails(f"hf:{hf_dirs / 'bertt'}", f"no directory {hf_dirs / 'bertt'}", f"hf:{hf_dirs}/bert", "nothing is downloaded")
    fails("hf:bert-base-uncased", "no directory bert-base-uncased", "huggingface-cli download")
    (tmp_path / "empty").mkdir()
    fails(f"hf:{tmp_path / 'empty'}", "has no config.json", "save_pretrained")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bertt"}))
    fails(f"hf:{odd}", "model_type 'bertt'", "close matches: bert")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dirs / "bert" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    fails(f"hf:{pickled}", "pytorch_model.bin", "safetensors")
    code, _, err = run(capsys, "thin", "--model", f"hf:{hf_dirs / 'vit'}", "--seq-len", "8", "--quiet")
    assert code == 2 and "--seq-len 8" in err and "float inputs" in err


def test_timm_model_random_weights_and_default_shape(capsys, tmp_path):
    from fxcondensa.files.sources import load_source

    assert load_source("timm:resnet10t").input_shape == (1, 3, 176, 176)  # the size its pretrained_cfg names
    path = tmp_path / "r.fxt"
    code, out, err = run(capsys, "thin", "--model", "timm:resnet10t", "--scheme", "StructurePrune(0.5)",
                         "--input-shape", "1,3,32,32", "--report", "--no-latency", "--save", str(path), "--quiet")
    assert code == 0, err
    assert "TOTAL" in out and path.is_file()
    code, _, err = run(capsys, "thin", "--model", "timm:resnet10tt", "--quiet")
    assert code == 2 and "unknown timm model 'resnet10tt'" in err and "timm:resnet10t" in err
    code, _, err = run(capsys, "thin", "--model", "convnext_atto", "--quiet")
    assert code == 2 and "timm:convnext_atto" in err


# ------------------------------------------------------------------------------------------------ weights

def trained_lenet():
    """A LeNet-5 after a few SGD steps on random data: weights that no constructor produces."""
    torch.manual_seed(1)
    model = fxcondensa.models.LeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_weights_give_the_same_report_as_the_python_api(capsys, tmp_path):
    trained = trained_lenet()
    path = tmp_path / "lenet.pt"
    torch.save(trained.state_dict(), path)
    code, out, err = run(capsys, "report", "--model", "fxcondensa:LeNet5", "--weights", str(path), "--scheme",
                         "StructurePrune(0.3)", "--thin", "--json", "--no-latency", "--quiet")
    assert code == 0, err
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    want = fxcondensa.report(trained, fxcondensa.thin(trained, schemes.StructurePrune(0.3), x), x, latency=False)
    assert json.loads(out) == json.loads(want.to_json())


def test_weights_in_other_forms_load(tmp_path):
    from safetensors.torch import save_file

    from fxcondensa.files.sources import load_source

    trained = trained_lenet()
    state = trained.state_dict()
    forms = {"wrapped.pt": {"state_dict": state, "epoch": 3},
             "ddp.pt": {f"module.{k}": v for k, v in state.items()}}
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file(state, tmp_path / "w.safetensors")
    for name in (*forms, "w.safetensors"):
        model = load_source("fxcondensa:LeNet5", weights=str(tmp_path / name)).model
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), name


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_weights_exit_2_naming_what_does_not_fit(capsys, tmp_path):
    torch.save(fxcondensa.models.ResNet20().state_dict(), tmp_path / "resnet20.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": _Payload()}, tmp_path / "code.pt")
    (tmp_path / "text.pt").write_text("hello")
    cases = {
        "resnet20.pt": ["does not fit fxcondensa:LeNet5 (LeNet5)", "missing keys (conv1.bias, conv2.weight",
                        "unexpected keys (bn1.weight", "shape mismatches (conv1.weight (file 16x1x3x3, model 20x1x5x5)",
                        "the --model the weights were trained with"],
        "list.pt": ["holds list, not a state dict of tensors", "torch.save(model.state_dict(), FILE)"],
        "code.pt": ["cannot be read with torch.load(weights_only=True)"],
        "text.pt": ["cannot be read with torch.load(weights_only=True)"],
        "missing.pt": ["no such file"],
    }
    for name, messages in cases.items():
        code, out, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--weights", str(tmp_path / name),
                             "--scheme", "Prune(0.5)", "--quiet")
        assert code == 2 and f"--weights {tmp_path / name}" in err, err
        assert "this must never run" not in out + err
        for m in messages:
            assert m in err, (name, err)


# ---------------------------------------------------------------------------------------- inputs, saving

def test_token_inputs_for_a_model_from_a_file(capsys, tmp_path):
    src = tmp_path / "text.py"
    src.write_text("import torch\nfrom torch import nn\n\n"
                   "def make():\n    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), "
                   "nn.Linear(32, 4))\n\n"
                   "def dense():\n    return nn.Sequential(nn.Linear(16, 4))\n")
    code, out, err = run(capsys, "thin", "--model", f"{src}:make", "--scheme", "StructurePrune(0.5)",
                         "--input-kind", "tokens", "--input-shape", "1,128", "--report", "--no-latency", "--quiet")
    assert code == 0, err
    assert "1x128x16" in out
    code, _, err = run(capsys, "thin", "--model", f"{src}:dense", "--input-kind", "tokens", "--seq-len", "8",
                       "--quiet")
    assert code == 2 and "has no nn.Embedding" in err and "--input-kind float" in err
    code, _, err = run(capsys, "thin", "--model", f"{src}:make", "--seq-len", "8", "--input-shape", "1,8")
    assert code == 2 and "give one" in err


def test_save_compressed_and_refuse_to_overwrite(capsys, tmp_path):
    path = tmp_path / "lenet.fxc"
    code, _, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)",
                       "--save", str(path), "--quiet")
    assert code == 0 and "save_compressed" in err
    again = fxcondensa.load_compressed(str(path), fxcondensa.models.LeNet5())
    assert fxcondensa.density(again) == pytest.approx(0.1, abs=0.01)
    code, _, err = run(capsys, "compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)",
                       "--save", str(path), "--quiet")
    assert code == 2 and f"--save {path} already exists" in err


# ------------------------------------------------------------------------------------------------- int8

def test_thin_then_int8_report_save_and_export(capsys, tmp_path):
    save, export = tmp_path / "l.fxt", tmp_path / "l.pt2"
    code, out, err = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--scheme", "StructurePrune(0.5)",
                         "--int8", "dynamic", "--report", "--no-latency", "--save", str(save), "--export",
                         str(export), "--quiet")
    assert code == 0, err
    assert "float32 -> int8" in out and "parameter bytes as stored" in out
    assert "int8 (dynamic): 2 Linear weights stored in int8" in out
    assert "apply quantize_int8 again after loading" in err and "checked against the int8 thinned model" in err
    # the .fxt file holds the float thinned model; the .pt2 program the int8 one
    small = fxcondensa.load_thinned(save, fxcondensa.models.LeNet5)
    assert small.ip1.weight.dtype == torch.float32
    x = torch.randn(3, 1, 28, 28)
    from fxcondensa.compression.int8 import quantize_int8

    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(export)).module()(x),
                                   quantize_int8(small, mode="dynamic")(x), rtol=1e-4, atol=1e-5)


def test_int8_errors_exit_2(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--int8", "dynamic",
                       "--export", str(tmp_path / "l.onnx"))
    assert code == 2 and "int8 models export to .pt2 only" in err
    code, _, err = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--int8", "int4")
    assert code == 2 and "invalid choice: 'int4'" in err
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    code, _, err = run(capsys, "thin", "--model", "fxcondensa:LeNet5", "--int8", "weight_only")
    assert code == 2 and "--int8 weight_only: int8 quantization needs torchao" in err
    assert "pip install 'fxcondensa[torchao]'" in err

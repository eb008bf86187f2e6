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

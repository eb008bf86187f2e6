"""The ``fxcondensa`` command: thin, compress and report on a model from the shell.

Examples::

    fxcondensa thin --model torchvision:resnet18 --scheme "StructurePrune(0.5)" \\
        --input-shape 1,3,224,224 --report --export r18.pt
    fxcondensa compress --model fxcondensa:LeNet5 --scheme "Compose([Prune(0.007), Quantize(float16)])"
    fxcondensa report --model fxcondensa:LeNet5 --scheme "StructurePrune(0.3)" --thin --json

``--scheme`` is parsed with ``ast`` into calls of the scheme classes with literal arguments; nothing in it
is evaluated as Python. ``--model`` names a torchvision model (built with ``weights=None``: no download),
a model of ``fxcondensa.models``, or a factory function in a Python file (that file is imported: it is your
code, run as such).

Exit codes: 0 done; 1 the work failed (the message says why); 2 bad arguments (with the usage line).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import __version__, models, schemes
from .compression.apply import compress
from .compression.thinning import thin
from .errors import ExampleInputError
from .files import export as exporting
from .measure.footprint import footprint
from .measure.report import frozen_groups, report
from .passes.costs import profile_costs

__all__ = ["main", "parse_scheme", "parse_input_shape", "build_model", "SCHEME_NAMES", "SchemeSyntaxError"]

SCHEME_NAMES = ("Prune", "Quantize", "BlockPrune", "Compose", "StructurePrune", "FilterPrune", "NeuronPrune")
_CONSTANT_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_SCHEME_LENGTH = 2000
_MODEL_FORMS = "torchvision:NAME (e.g. torchvision:resnet18), fxcondensa:NAME (e.g. fxcondensa:LeNet5) or " \
               "path/to/file.py:factory"
_DEFAULT_SHAPES = {"fxcondensa:LeNet5": (1, 1, 28, 28)}


class SchemeSyntaxError(ValueError):
    """A ``--scheme`` expression that is not a call of the scheme classes with literal arguments."""


class ModelSpecError(ValueError):
    """A ``--model`` that names no model we can build."""


# ----------------------------------------------------------------------------------------------- schemes

def _scheme_error(node: ast.AST | None, what: str) -> SchemeSyntaxError:
    where = f" at column {node.col_offset + 1}" if node is not None and hasattr(node, "col_offset") else ""
    return SchemeSyntaxError(
        f"{what}{where}. A scheme is a call of {', '.join(SCHEME_NAMES)} with literal arguments (numbers, "
        "strings, lists, dicts, float16, bfloat16), e.g. \"StructurePrune(0.5)\" or "
        "\"Compose([Prune(0.02), Quantize(float16)])\"")


def _build(node: ast.AST) -> Any:
    """Turn an allowed AST node into a value; anything else is refused, never evaluated."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_build(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _scheme_error(node, "'**' unpacking is not allowed")
        return {_build(k): _build(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Name):
        if node.id in _CONSTANT_NAMES:
            return _CONSTANT_NAMES[node.id]
        raise _scheme_error(node, f"the name {node.id!r} is not allowed")
    if isinstance(node, ast.Call):
        return _call(node)
    raise _scheme_error(node, f"{type(node).__name__} expressions are not allowed")


def _call(node: ast.Call) -> Any:
    if not isinstance(node.func, ast.Name):
        raise _scheme_error(node, "only plain scheme names can be called (no attribute access)")
    name = node.func.id
    if name not in SCHEME_NAMES:
        close = difflib.get_close_matches(name, SCHEME_NAMES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise _scheme_error(node, f"{name!r} is not a scheme{hint}")
    cls = getattr(schemes, name, None)
    if cls is None:
        raise _scheme_error(node, f"the scheme {name} is not available in this version of fxcondensa")
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise _scheme_error(node, "'*' and '**' arguments are not allowed")
    args = [_build(a) for a in node.args]
    kwargs = {k.arg: _build(k.value) for k in node.keywords}
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SchemeSyntaxError(f"{name}(...): {exc}") from exc


def parse_scheme(text: str) -> Any:
    """Parse a scheme expression safely: only scheme constructors and literals, never ``eval``.

    Example:
        >>> parse_scheme("Compose([Prune(0.02), Quantize(float16)])")
        Compose([Prune(density=0.02, layers={}, exclude=[]), Quantize(dtype=torch.float16, exclude=[])])
        >>> parse_scheme("__import__('os')")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxcondensa.cli.SchemeSyntaxError: '__import__' is not a scheme at column 1. ...
    """
    if len(text) > _MAX_SCHEME_LENGTH:
        raise SchemeSyntaxError(f"the scheme expression is {len(text)} characters long; the limit is "
                                f"{_MAX_SCHEME_LENGTH}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError) as exc:
        raise _scheme_error(None, f"{text!r} is not a valid expression ({type(exc).__name__})") from exc
    if not isinstance(tree.body, ast.Call):
        raise _scheme_error(tree.body, "the scheme must be a call such as StructurePrune(0.5)")
    try:
        return _build(tree.body)
    except RecursionError as exc:
        raise _scheme_error(None, "the scheme expression is nested too deeply") from exc


# ------------------------------------------------------------------------------------------------ models

def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def _fxcondensa_names() -> list[str]:
    return list(models.__all__)


def _unknown(kind: str, name: str, known: list[str], prefix: str) -> ModelSpecError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(prefix + c for c in close)}" if close else ""
    return ModelSpecError(f"unknown {kind} model {name!r}{hint}. Models are named {_MODEL_FORMS}")


def build_model(spec: str) -> nn.Module:
    """Build the model a ``--model`` argument names, in eval mode.

    Example:
        >>> type(build_model("fxcondensa:LeNet5")).__name__
        'LeNet5'
    """
    head, sep, name = spec.rpartition(":")
    if head == "torchvision":
        known = _torchvision_names()
        if name not in known:
            raise _unknown("torchvision", name, known, "torchvision:")
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    if head == "fxcondensa":
        known = _fxcondensa_names()
        if name not in known:
            raise _unknown("fxcondensa", name, known, "fxcondensa:")
        return getattr(models, name)().eval()
    if sep and head.endswith(".py"):
        return _from_file(Path(head), name).eval()
    # A bare name: guess what was meant from every model we know.
    known = [f"torchvision:{n}" for n in _torchvision_names()] + [f"fxcondensa:{n}" for n in _fxcondensa_names()]
    close = difflib.get_close_matches(spec, known, n=5, cutoff=0.5)
    close += [k for k in known if k.split(":", 1)[1] == spec and k not in close]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ModelSpecError(f"cannot tell which model {spec!r} is{hint}. Models are named {_MODEL_FORMS}")


def _from_file(path: Path, factory: str) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"no file {path} (from --model {path}:{factory}); models are named {_MODEL_FORMS}")
    spec = importlib.util.spec_from_file_location(f"_fxcondensa_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(factory, found, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelSpecError(f"{path} has no function {factory!r}{hint}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; argparse turns errors into exit 2."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write e.g. 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive integer")
    return shape


# ---------------------------------------------------------------------------------------------- commands

class _Progress:
    """Progress over the steps of a command, on stderr: a tqdm line on a terminal, plain lines in a log
    (where tqdm's carriage returns would garble the file); nothing with --quiet."""

    def __init__(self, steps: int, quiet: bool):
        self.total, self.done, self.quiet = steps, 0, quiet
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=steps, file=sys.stderr, leave=False, bar_format="{desc} [{n_fmt}/{total_fmt}, {elapsed}]",
                        disable=quiet or not self.tty)

    @contextmanager
    def step(self, desc: str) -> Iterator[None]:
        self.bar.set_description_str(desc)
        if not (self.quiet or self.tty):
            print(f"[{self.done + 1}/{self.total}] {desc} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _summary(before: nn.Module, after: nn.Module, x: torch.Tensor, what: str) -> str:
    a, b = profile_costs(before, x), profile_costs(after, x)
    pa, pb = sum(c.params for c in a), sum(c.params for c in b)
    nza, nzb = sum(c.nonzero_params for c in a), sum(c.nonzero_params for c in b)
    ma, mb = sum(c.macs for c in a), sum(c.macs for c in b)
    return (f"{what}: parameters {pa} -> {pb} (non-zero {nza} -> {nzb}, density {nzb / max(nza, 1):.4f}), "
            f"MACs {ma} -> {mb} ({ma / max(mb, 1):.2f}x fewer)")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    shape = args.input_shape or _DEFAULT_SHAPES.get(args.model)
    if shape is None and args.model.startswith("torchvision:"):
        shape = (1, 3, 224, 224)
    if shape is None:
        parser.error(f"--input-shape is needed for {args.model} (e.g. --input-shape 1,3,224,224)")
    args.input_shape = shape
    if args.export:
        if Path(args.export).suffix.lower() not in exporting.FORMATS:
            parser.error(f"--export {args.export}: use a suffix among {', '.join(exporting.FORMATS)} "
                         "(.pt TorchScript, .pt2 torch.export, .onnx ONNX)")
        if Path(args.export).exists() and not args.overwrite:
            parser.error(f"--export {args.export} already exists; pass --overwrite to replace it")
    thinning = args.command == "thin" or getattr(args, "thin", False)
    want_report = args.command == "report" or args.report or args.json

    steps = 2 + int(want_report) + int(bool(args.export))
    progress = _Progress(steps, args.quiet)
    torch.manual_seed(args.seed)
    x = torch.randn(shape)
    try:
        with progress.step(f"building {args.model}"):
            model = build_model(args.model)
        leaf_modules = tuple(args.leaf_module)
        if thinning:
            with progress.step(f"thinning with {type(args.scheme).__name__ if args.scheme else 'the zeros in the model'}"):
                result = thin(model, args.scheme, x, check=not args.no_check, leaf_modules=leaf_modules)
        else:
            with progress.step(f"compressing with {type(args.scheme).__name__}"):
                result = compress(model, args.scheme, x, leaf_modules=leaf_modules)
        rep = None
        if want_report:
            with progress.step("measuring layers" + ("" if args.no_latency else " and latency")):
                rep = report(model, result, x, latency=not args.no_latency, repeat=args.repeat,
                             leaf_modules=leaf_modules)
        if args.export:
            with progress.step(f"exporting to {args.export}"):
                written = exporting.export(result, args.export, x, overwrite=args.overwrite)
    finally:
        progress.close()

    if args.json:
        print(rep.to_json())
    elif rep is not None:
        print(rep)
    else:
        print(_summary(model, result, x, "thinned" if thinning else "compressed"))
        if args.command == "compress":
            fa, fb = footprint(model), footprint(result)
            print(f"footprint (non-zero values x storage bytes): {fa} -> {fb} bytes ({fa / max(fb, 1):.1f}x smaller)")
        frozen = frozen_groups(result)
        if frozen:
            print(f"{len(frozen)} frozen channel groups (kept whole): "
                  + "; ".join(f"{g.get('group')}: {g.get('reason')}" for g in frozen[:5])
                  + ("; ..." if len(frozen) > 5 else ""))
    if args.export:
        print(f"wrote {written} (checked against the {'thinned' if thinning else 'compressed'} model's outputs)",
              file=sys.stderr)
    return 0


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="fxcondensa", description="Compress and thin PyTorch models on torch.fx.",
        epilog="Example: fxcondensa thin --model torchvision:resnet18 --scheme \"StructurePrune(0.5)\" "
               "--input-shape 1,3,224,224 --report --export r18.pt")
    parser.add_argument("--version", action="version", version=f"fxcondensa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{thin,report,compress}")
    helps = {
        "thin": "compress with a structured scheme and physically remove the pruned channels",
        "report": "per-layer table of shapes, parameters, MACs and latency: original vs compressed (or --thin)",
        "compress": "apply a scheme (zeros and storage dtypes; shapes unchanged)",
    }
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, text in helps.items():
        p = subs[name] = sub.add_parser(name, help=text, description=text)
        p.add_argument("--model", required=True, metavar="SPEC", help=f"the model: {_MODEL_FORMS}")
        p.add_argument("--scheme", required=name != "thin", type=_scheme_arg, metavar="EXPR",
                       help=f"scheme expression over {', '.join(SCHEME_NAMES)}, e.g. \"StructurePrune(0.5)\""
                       + (" (without one, thin removes the channels that are already zero)" if name == "thin"
                          else ""))
        p.add_argument("--input-shape", type=parse_input_shape, metavar="N,C,H,W",
                       help="shape of the random example input (default: 1,1,28,28 for fxcondensa:LeNet5, "
                            "1,3,224,224 for torchvision models)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random example input (default 0)")
        p.add_argument("--leaf-module", action="append", default=[], type=_module_class, metavar="MODULE.CLASS",
                       help="a module class torch.fx keeps as one opaque call (its channels are frozen), e.g. "
                            "torchvision.ops.misc.SqueezeExcitation; repeat for several")
        if name == "report":
            p.add_argument("--thin", action="store_true", help="compare with the thinned model")
            p.add_argument("--json", action="store_true", help="print the report as JSON")
            p.set_defaults(report=True, export=None, overwrite=False)
        else:
            shown = p.add_mutually_exclusive_group()
            shown.add_argument("--report", action="store_true", help="print the per-layer table")
            shown.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
            p.add_argument("--export", metavar="PATH",
                           help="write the result: .pt TorchScript, .pt2 torch.export, .onnx ONNX")
            p.add_argument("--overwrite", action="store_true", help="replace an existing --export file")
        if name in ("thin", "report"):
            p.add_argument("--no-check", action="store_true",
                           help="skip thin's check that the thinned model matches the compressed one")
        p.add_argument("--no-latency", action="store_true", help="report without timing (faster)")
        p.add_argument("--repeat", type=_positive_int, default=10, help="timed runs per model (default 10)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser, subs


def _scheme_arg(text: str) -> Any:
    try:
        return parse_scheme(text)
    except SchemeSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _module_class(text: str) -> type[nn.Module]:
    """``--leaf-module torch.nn.MultiheadAttention`` -> the class; the module named is imported (your code)."""
    module_name, _, name = text.rpartition(".")
    if not module_name:
        raise argparse.ArgumentTypeError(f"{text!r}: name the class with its module, e.g. torch.nn.MultiheadAttention")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise argparse.ArgumentTypeError(f"{text!r} is a {type(cls).__name__}, not a torch.nn.Module class")
    return cls


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse's usage errors give 2).

    Example:
        >>> main(["compress", "--model", "fxcondensa:LeNet5", "--scheme", "Prune(0.1)", "--quiet"])  # doctest: +ELLIPSIS
        compressed: parameters 431080 -> 431080 (non-zero ..., density 0.1...), MACs 2322940 -> 2322940 (1.00x fewer)
        footprint (non-zero values x storage bytes): 1724320 -> ... bytes (...x smaller)
        0
    """
    parser, subs = _parser()
    args = None
    try:
        args = parser.parse_args(argv)
        sub = subs[args.command]  # errors found after parsing still print that command's usage
        try:
            return _run(args, sub)
        except ModelSpecError as exc:
            sub.error(str(exc))
        except ExampleInputError as exc:
            sub.error(f"--input-shape {','.join(map(str, args.input_shape))}: {exc}")
    except SystemExit as exc:  # argparse reports usage errors (2) and --help (0) by exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("fxcondensa: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the work failed: one clear line, not a traceback
        command = f" {args.command}" if args is not None else ""
        print(f"fxcondensa{command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


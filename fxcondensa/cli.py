"""The ``fxcondensa`` command: thin, compress and report on a model from the shell.

Examples::

    fxcondensa thin --model torchvision:resnet18 --scheme "StructurePrune(0.5)" \\
        --input-shape 1,3,224,224 --report --export r18.pt
    fxcondensa compress --model fxcondensa:LeNet5 --scheme "Compose([Prune(0.007), Quantize(float16)])"
    fxcondensa report --model fxcondensa:LeNet5 --scheme "StructurePrune(0.3)" --thin --json
    fxcondensa thin --model timm:convnext_tiny --scheme "StructurePrune(0.5)" --report --save c.fxt
    fxcondensa thin --model hf:my-bert/ --scheme "StructurePrune(0.5)" --seq-len 64 --int8 dynamic \\
        --save bert.fxt --export bert.pt2

``--scheme`` is parsed with ``ast`` into calls of the scheme classes with literal arguments; nothing in it
is evaluated as Python. ``--model`` names a torchvision or timm model (random weights: nothing is
downloaded), a local Hugging Face directory, a model of ``fxcondensa.models``, or a factory function in a
Python file (that file is imported: it is your code, run as such); ``--weights`` loads a state dict into it
(``fxcondensa.files.sources``). The example input is random: the model is built after ``torch.manual_seed(seed)``,
then the input is drawn from ``torch.Generator().manual_seed(seed)``.

``--int8`` quantizes the result's Linear layers with torchao (``fxcondensa.compression.int8``); ``--save`` then writes
the float result (``save_thinned`` / ``save_compressed``: quantize again after loading), ``--export`` (.pt2
only) the int8 one.

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

from . import __version__, schemes
from .compression import int8 as int8_
from .compression.apply import compress
from .compression.thinning import thin
from .errors import ExampleInputError
from .files import export as exporting
from .files.pretrained import save_pretrained_like
from .files.recipe import save_thinned
from .files.serialize import save_compressed
from .files.sources import (
    INPUT_KINDS,
    MODEL_FORMS,
    ModelSpecError,
    Source,
    build_model,
    example_inputs,
    load_source,
)
from .measure.footprint import footprint
from .measure.report import frozen_groups, report
from .passes.costs import profile_costs
from .passes.storage import stored_bytes

__all__ = ["main", "parse_scheme", "parse_input_shape", "build_model", "SCHEME_NAMES", "SchemeSyntaxError",
           "ModelSpecError"]

SCHEME_NAMES = ("Prune", "Quantize", "BlockPrune", "Compose", "StructurePrune", "FilterPrune", "NeuronPrune")
_CONSTANT_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_SCHEME_LENGTH = 2000


class SchemeSyntaxError(ValueError):
    """A ``--scheme`` expression that is not a call of the scheme classes with literal arguments."""


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


# ------------------------------------------------------------------------------------------------ inputs

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


def _check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before any work, what would fail once the model is thinned: formats, existing files, extras."""
    if args.export:
        if Path(args.export).suffix.lower() not in exporting.FORMATS:
            parser.error(f"--export {args.export}: use a suffix among {', '.join(exporting.FORMATS)} "
                         "(.pt TorchScript, .pt2 torch.export, .onnx ONNX)")
        if args.int8 and Path(args.export).suffix.lower() != ".pt2":
            parser.error(f"--export {args.export} with --int8: int8 models export to .pt2 only (torch.export keeps "
                         "torchao's int8 tensors; TorchScript and ONNX cannot hold them)")
    for flag in ("export", "save", "save_pretrained"):
        path = getattr(args, flag, None)
        if path and Path(path).exists() and not args.overwrite:
            parser.error(f"--{flag.replace('_', '-')} {path} already exists; pass --overwrite to replace it")
    if getattr(args, "save_pretrained", None) and not args.model.startswith("hf:"):
        parser.error(f"--save-pretrained {args.save_pretrained}: only a model loaded with --model hf:DIR can be "
                     f"written back with save_pretrained (--model is {args.model}); use --save or --export")
    if args.seq_len and args.input_shape:
        parser.error(f"--seq-len {args.seq_len} and --input-shape {','.join(map(str, args.input_shape))}: give "
                     "one (for token inputs, --input-shape N,L is batch N of sequence length L)")
    if args.int8:
        try:
            int8_.require_torchao()
        except int8_.TorchaoMissingError as exc:
            parser.error(f"--int8 {args.int8}: {exc}")


def _inputs(args: argparse.Namespace, source: Source, parser: argparse.ArgumentParser) -> Any:
    # An hf: model says what it takes; for other models --seq-len means token inputs.
    known = source.input_kind if source.keywords else None
    kind = args.input_kind or known or ("tokens" if args.seq_len else source.input_kind)
    if args.seq_len and kind != "tokens":
        parser.error(f"--seq-len {args.seq_len}: {args.model} takes {kind} inputs, not token ids; give --input-shape")
    shape = args.input_shape or ((1, args.seq_len) if args.seq_len else None)
    if shape is None and kind == source.input_kind:
        shape = source.input_shape
    if shape is None:
        example = "--seq-len 128 (or --input-shape 1,128)" if kind == "tokens" else "--input-shape 1,3,224,224"
        parser.error(f"--input-shape is needed for {args.model} (e.g. {example})")
    args.input_shape = shape
    return example_inputs(source, shape, kind=kind, generator=torch.Generator().manual_seed(args.seed))


def _int8_line(result: nn.Module, quantized: nn.Module, mode: str, what: str) -> str:
    names, left = int8_.int8_candidates(result)
    before = sum(stored_bytes(p) for p in result.parameters())
    after = sum(stored_bytes(p) for p in quantized.parameters())
    others = f", {len(left)} Linear weights left float ({'; '.join(f'{k}: {v}' for k, v in list(left.items())[:3])})" \
        if left else ""
    return (f"int8 ({mode}): {len(names)} Linear weights stored in int8{others}; convolutions and other layers "
            f"stay float; the {what} model's parameter bytes {before} -> {after} ({before / max(after, 1):.2f}x "
            "smaller)")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_outputs(args, parser)
    thinning = args.command == "thin" or getattr(args, "thin", False)
    want_report = args.command == "report" or args.report or args.json
    save, save_pretrained = getattr(args, "save", None), getattr(args, "save_pretrained", None)

    steps = 2 + sum(map(bool, (want_report, args.export, args.int8, save, save_pretrained)))
    progress = _Progress(steps, args.quiet)
    torch.manual_seed(args.seed)
    written: list[str] = []
    try:
        with progress.step(f"building {args.model}"):
            source = load_source(args.model, weights=args.weights)
        model = source.model
        if source.note:
            print(f"note: {source.note}", file=sys.stderr)
        x = _inputs(args, source, parser)
        leaf_modules = tuple(args.leaf_module)
        if thinning:
            with progress.step(f"thinning with {type(args.scheme).__name__ if args.scheme else 'the zeros in the model'}"):
                # The command writes files and a report: the graph is what they are made from.
                result = thin(model, args.scheme, x, check=not args.no_check, leaf_modules=leaf_modules,
                              output="graph")
        else:
            with progress.step(f"compressing with {type(args.scheme).__name__}"):
                result = compress(model, args.scheme, x, leaf_modules=leaf_modules, output="graph")
        floating = result
        if args.int8:
            with progress.step(f"quantizing Linear layers to int8 ({args.int8})"):
                result = int8_.quantize_int8(floating, mode=args.int8)
        rep = None
        if want_report:
            with progress.step("measuring layers" + ("" if args.no_latency else " and latency")):
                rep = report(model, result, x, latency=not args.no_latency, repeat=args.repeat,
                             leaf_modules=leaf_modules)
        if save_pretrained:  # first: it is the output most likely to be refused (a thinned width)
            with progress.step(f"writing {save_pretrained} with save_pretrained"):
                save_pretrained_like(floating, model, save_pretrained, overwrite=args.overwrite)
            written.append(f"wrote {save_pretrained} (save_pretrained; load it with from_pretrained)")
        if save:
            with progress.step(f"saving to {save}"):
                writer = save_thinned if thinning else save_compressed
                writer(floating, save, overwrite=args.overwrite)
            loader = "fxcondensa.load_thinned(path, factory)" if thinning else "fxcondensa.load_compressed(path, model)"
            written.append(f"wrote {save} ({writer.__name__}; load it with {loader}"
                           + ("; the float model: apply quantize_int8 again after loading)" if args.int8 else ")"))
        if args.export:
            with progress.step(f"exporting to {args.export}"):
                exporting.export(result, args.export, x, overwrite=args.overwrite)
            what = f"int8 {'thinned' if thinning else 'compressed'}" if args.int8 else \
                ("thinned" if thinning else "compressed")
            written.append(f"wrote {args.export} (checked against the {what} model's outputs)")
    finally:
        progress.close()

    if args.json:
        print(rep.to_json())
    elif rep is not None:
        print(rep)
    else:
        print(_summary(model, floating, x, "thinned" if thinning else "compressed"))
        if args.command == "compress":
            fa, fb = footprint(model), footprint(floating)
            print(f"footprint (non-zero values x storage bytes): {fa} -> {fb} bytes ({fa / max(fb, 1):.1f}x smaller)")
        frozen = frozen_groups(floating)
        if frozen:
            print(f"{len(frozen)} frozen channel groups (kept whole): "
                  + "; ".join(f"{g.get('group')}: {g.get('reason')}" for g in frozen[:5])
                  + ("; ..." if len(frozen) > 5 else ""))
    if args.int8 and not args.json:
        print(_int8_line(floating, result, args.int8, "thinned" if thinning else "compressed"))
    for line in written:
        print(line, file=sys.stderr)
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
        p.add_argument("--model", required=True, metavar="SPEC", help=f"the model: {MODEL_FORMS}")
        p.add_argument("--scheme", required=name != "thin", type=_scheme_arg, metavar="EXPR",
                       help=f"scheme expression over {', '.join(SCHEME_NAMES)}, e.g. \"StructurePrune(0.5)\""
                       + (" (without one, thin removes the channels that are already zero)" if name == "thin"
                          else ""))
        p.add_argument("--weights", metavar="FILE",
                       help="a state dict to load into the model: torch.save file (read with weights_only=True) "
                            "or .safetensors")
        p.add_argument("--input-shape", type=parse_input_shape, metavar="N,C,H,W",
                       help="shape of the random example input (default: the model's own: 1,1,28,28 for "
                            "fxcondensa:LeNet5, 1,3,224,224 for torchvision, the pretrained_cfg size for timm, "
                            "from the config for hf); N,L for token ids")
        p.add_argument("--input-kind", choices=INPUT_KINDS,
                       help="float: random normal values (the default); tokens: random token ids below the "
                            "vocabulary size (hf: text models take them by default)")
        p.add_argument("--seq-len", type=_positive_int, metavar="L",
                       help="token inputs of one sequence of length L (default for hf text models: 128, or the "
                            "model's maximum if smaller)")
        p.add_argument("--int8", choices=int8_.MODES,
                       help="then quantize the result's Linear layers to int8 with torchao (weight_only, or "
                            "dynamic int8 activations too); convolutions stay float. Needs the torchao extra")
        p.add_argument("--seed", type=int, default=0, help="seed of the random example input (default 0)")
        p.add_argument("--leaf-module", action="append", default=[], type=_module_class, metavar="MODULE.CLASS",
                       help="a module class torch.fx keeps as one opaque call (its channels are frozen), e.g. "
                            "torchvision.ops.misc.SqueezeExcitation; repeat for several")
        if name == "report":
            p.add_argument("--thin", action="store_true", help="compare with the thinned model")
            p.add_argument("--json", action="store_true", help="print the report as JSON")
            p.set_defaults(report=True, export=None, overwrite=False, save=None, save_pretrained=None)
        else:
            shown = p.add_mutually_exclusive_group()
            shown.add_argument("--report", action="store_true", help="print the per-layer table")
            shown.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
            p.add_argument("--export", metavar="PATH",
                           help="write the result: .pt TorchScript, .pt2 torch.export, .onnx ONNX")
            p.add_argument("--save", metavar="PATH",
                           help="save the float result in fxcondensa's reloadable format: save_thinned (thin; "
                                "e.g. out.fxt) or save_compressed (compress; e.g. out.fxc)")
            p.add_argument("--save-pretrained", metavar="DIR",
                           help="hf: models only: write the result as a Hugging Face directory (save_pretrained); "
                                "refused where thinning changed layer widths, which a config cannot describe")
            p.add_argument("--overwrite", action="store_true", help="replace existing --export/--save files")
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
            shape = ",".join(map(str, args.input_shape or ()))
            kind = f" (--input-kind {args.input_kind})" if args.input_kind else ""
            sub.error(f"--input-shape {shape}{kind}: {exc}")
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


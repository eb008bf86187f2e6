"""Where the command's models come from, and the example inputs they take.

``--model`` names a model in one of these forms; nothing is ever downloaded:

- ``torchvision:NAME``: a torchvision model, built with ``weights=None`` (random weights);
- ``timm:NAME``: a timm model, built with ``pretrained=False`` (random weights); its example input is the
  input size of its ``pretrained_cfg``;
- ``hf:DIR``: a local Hugging Face directory (``config.json`` and ``*.safetensors``, as ``save_pretrained``
  writes it), loaded in float32 with the Auto class of its head (causal LM, masked LM, image or sequence
  classification; the bare encoder otherwise); example inputs from the config: token ids and an attention
  mask, or pixel values. Pickled ``pytorch_model.bin`` weights are not loaded;
- ``fxcondensa:NAME``: a model of ``fxcondensa.models``;
- ``path/to/file.py:factory``: a function in your Python file (the file is imported: your code runs).

``--weights FILE`` then loads a state dict into the model: a ``torch.save`` file read with
``torch.load(weights_only=True)`` (no pickled code runs), or a ``.safetensors`` file. A file for another
architecture is refused with the missing, unexpected and mis-shaped keys named.

Example:
    >>> source = load_source("fxcondensa:LeNet5")
    >>> type(source.model).__name__, source.input_shape
    ('LeNet5', (1, 1, 28, 28))
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from ..errors import FxCondensaError

__all__ = ["MODEL_FORMS", "ModelSpecError", "Source", "load_source", "build_model", "load_weights",
           "example_inputs", "INPUT_KINDS"]

MODEL_FORMS = ("torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:convnext_tiny), hf:DIR (a "
               "local Hugging Face directory), fxcondensa:NAME (e.g. fxcondensa:LeNet5) or path/to/file.py:factory")
INPUT_KINDS = ("float", "tokens")
_DEFAULT_SHAPES = {"fxcondensa:LeNet5": (1, 1, 28, 28), "fxcondensa:ResNet20": (1, 1, 28, 28)}
_DEFAULT_SEQ_LEN = 128
# The head named in config.json's "architectures" -> the Auto class that builds it.
_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
          ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForImageClassification", "AutoModelForImageClassification"),
          ("ForSequenceClassification", "AutoModelForSequenceClassification"))


class ModelSpecError(FxCondensaError, ValueError):
    """A ``--model`` or ``--weights`` that names no model we can build or load."""


@dataclass
class Source:
    """A built model and what its example inputs look like.

    ``input_shape`` is the default shape (``None``: the user must give one); ``input_kind`` is ``"float"``
    (random normal values) or ``"tokens"`` (token ids below ``vocab_size``); ``keywords`` says the model takes
    keyword inputs (Hugging Face); ``hf_dir`` is the directory an ``hf:`` model came from.
    """

    model: nn.Module
    spec: str
    input_shape: tuple[int, ...] | None = None
    input_kind: str = "float"
    vocab_size: int | None = None
    keywords: bool = False
    hf_dir: Path | None = None
    note: str = ""


def _close(name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    return f"; close matches: {', '.join(prefix + c for c in close)}" if close else ""


def _unknown(kind: str, name: str, known: list[str], prefix: str) -> ModelSpecError:
    return ModelSpecError(f"unknown {kind} model {name!r}{_close(name, known, prefix)}. Models are named {MODEL_FORMS}")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError(f"timm: models need the timm package, which cannot be imported ({exc}); "
                             "install it with pip install timm") from exc
    return timm


def load_source(spec: str, *, weights: str | None = None) -> Source:
    """Build the model ``spec`` names (eval mode), load ``weights`` into it when given.

    Example:
        >>> load_source("torchvision:resnet18").input_shape
        (1, 3, 224, 224)
    """
    head, sep, name = spec.partition(":") if spec.startswith(("hf:", "timm:")) else spec.rpartition(":")
    if head == "torchvision":
        known = _torchvision_names()
        if name not in known:
            raise _unknown("torchvision", name, known, "torchvision:")
        import torchvision

        source = Source(torchvision.models.get_model(name, weights=None), spec, (1, 3, 224, 224))
    elif head == "timm":
        source = _timm_source(spec, name)
    elif head == "hf":
        source = _hf_source(spec, Path(name))
    elif head == "fxcondensa":
        known = list(models.__all__)
        if name not in known:
            raise _unknown("fxcondensa", name, known, "fxcondensa:")
        source = Source(getattr(models, name)(), spec, _DEFAULT_SHAPES.get(spec))
    elif sep and head.endswith(".py"):
        source = Source(_from_file(Path(head), name), spec)
    else:  # a bare name: guess what was meant from every model we know
        known = [f"torchvision:{n}" for n in _torchvision_names()] + [f"fxcondensa:{n}" for n in models.__all__]
        close = difflib.get_close_matches(spec, known, n=5, cutoff=0.5)
        close += [k for k in known if k.split(":", 1)[1] == spec and k not in close]
        if importlib.util.find_spec("timm") is not None and _timm().is_model(spec):
            close.append(f"timm:{spec}")
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelSpecError(f"cannot tell which model {spec!r} is{hint}. Models are named {MODEL_FORMS}")
    if weights is not None:
        load_weights(source.model, weights, spec=spec)
    source.model.eval()
    return source


def build_model(spec: str) -> nn.Module:
    """The model a ``--model`` argument names, in eval mode.

    Example:
        >>> type(build_model("fxcondensa:LeNet5")).__name__
        'LeNet5'
    """
    return load_source(spec).model


def _timm_source(spec: str, name: str) -> Source:
    timm = _timm()
    if not timm.is_model(name):  # is_model also takes a tagged name (convnext_tiny.fb_in1k)
        raise _unknown("timm", name, timm.list_models(), "timm:")
    model = timm.create_model(name, pretrained=False)  # random weights, nothing downloaded
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return Source(model, spec, (1, *size) if size else None)


def _from_file(path: Path, factory: str) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"no file {path} (from --model {path}:{factory}); models are named {MODEL_FORMS}")
    spec = importlib.util.spec_from_file_location(f"_fxcondensa_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSpecError(f"{path} has no function {factory!r}{_close(factory, found)}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


# -- Hugging Face directories -----------------------------------------------------------------------------
@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars for a while (loading, saving): the command shows its own progress."""
    import transformers

    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _hf_dir_error(folder: Path) -> ModelSpecError:
    """A missing directory: most often a Hub name, which we do not download."""
    parent = folder.parent if str(folder.parent) else Path(".")
    siblings = [p.name for p in parent.iterdir() if (p / "config.json").is_file()] if parent.is_dir() else []
    hint = _close(folder.name, siblings, f"hf:{parent}/" if str(parent) != "." else "hf:")
    return ModelSpecError(
        f"--model hf:{folder}: no directory {folder}{hint}. hf: takes a local directory written by "
        "save_pretrained (config.json and *.safetensors); nothing is downloaded. For a Hub model, download it "
        f"first (huggingface-cli download NAME --local-dir DIR) and pass hf:DIR")


def _hf_build(auto: Any, folder: Path, config: Any) -> tuple[nn.Module, str]:
    """The model with the directory's safetensors weights, or random weights (and a note) for a config alone."""
    if any(folder.glob("*.safetensors")):
        return auto.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False, dtype=torch.float32), ""
    # a config alone: the architecture with random weights, as for torchvision: and timm:
    return auto.from_config(config, dtype=torch.float32), f"{folder} has no *.safetensors weights: random weights"


def _hf_source(spec: str, folder: Path) -> Source:
    if not folder.is_dir():
        raise _hf_dir_error(folder)
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"--model {spec}: {folder} has no config.json, so it is not a Hugging Face model "
                             "directory; write one with model.save_pretrained(DIR) (it writes config.json and "
                             "model.safetensors)")
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError(f"hf: models need the transformers package ({exc}); pip install transformers") from exc
    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.get("model_type")
    known = sorted(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        raise ModelSpecError(f"--model {spec}: {folder}/config.json has model_type {model_type!r}, which "
                             f"transformers {transformers.__version__} does not know{_close(str(model_type), known)}"
                             ". Fix the model_type, or upgrade transformers")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [""])[0]
    auto_name = next((auto for suffix, auto in _HEADS if arch.endswith(suffix)), "AutoModel")
    auto = getattr(transformers, auto_name)
    pickled = [p.name for p in folder.glob("*.bin")]
    if pickled and not any(folder.glob("*.safetensors")):
        raise ModelSpecError(
            f"--model {spec}: {folder} holds weights only as {', '.join(pickled)} (pickles, which fxcondensa "
            "does not load); save them as safetensors (model.save_pretrained(DIR)), or pass --weights FILE")
    try:
        with quiet_transformers():
            model, note = _hf_build(auto, folder, config)
    except ValueError as exc:  # the config's head is not one the Auto class builds
        raise ModelSpecError(f"--model {spec}: {auto_name} cannot build {arch or config.model_type} from "
                             f"{folder}/config.json ({(str(exc).splitlines() or [''])[0]})") from exc
    if auto_name == "AutoModel" and arch:
        note = (note + "; " if note else "") + f"{arch} is loaded as its bare model (AutoModel), without the head"
    image = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    if image:
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        shape: tuple[int, ...] = (1, int(getattr(config, "num_channels", 3)), int(h), int(w))
    else:
        shape = (1, min(_DEFAULT_SEQ_LEN, int(getattr(config, "max_position_embeddings", None) or _DEFAULT_SEQ_LEN)))
    return Source(model, spec, shape, "float" if image else "tokens", getattr(config, "vocab_size", None),
                  keywords=True, hf_dir=folder, note=note)


# -- weights ----------------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelSpecError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelSpecError(f"--weights {path}: not a readable safetensors file ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0]})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it is refused here: weights_only never runs it
        raise ModelSpecError(
            f"--weights {path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}); save the weights with torch.save(model.state_dict(), FILE) "
            "or as .safetensors") from exc
    for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else type(obj).__name__
        raise ModelSpecError(f"--weights {path} holds {what}, not a state dict of tensors; save one with "
                             "torch.save(model.state_dict(), FILE)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_weights(model: nn.Module, path: str | Path, *, spec: str = "the model") -> None:
    """Load the state dict in ``path`` into ``model``; every key must fit (names and shapes).

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "lenet.pt")
        >>> torch.save(models.LeNet5().state_dict(), f)
        >>> load_weights(models.LeNet5(), f)
    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {'x'.join(map(str, state[k].shape)) or 'scalar'}, model "
              f"{'x'.join(map(str, v.shape)) or 'scalar'})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = ([f"{len(missing)} missing keys ({_listed(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({_listed(unexpected)})"] if unexpected else []) + \
                ([f"{len(shapes)} shape mismatches ({_listed(shapes)})"] if shapes else [])
        raise ModelSpecError(f"--weights {path} does not fit {spec} ({type(model).__name__}): {'; '.join(parts)}. "
                             "Pass the --model the weights were trained with")
    model.load_state_dict(state, strict=True)


# -- example inputs ---------------------------------------------------------------------------------------
def _vocab(source: Source) -> int:
    if source.vocab_size:
        return int(source.vocab_size)
    for module in source.model.modules():  # the first embedding is the token embedding in every model we know
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    raise ModelSpecError(f"--input-kind tokens: {source.spec} ({type(source.model).__name__}) has no nn.Embedding, "
                         "so there is no vocabulary to draw token ids from; use --input-kind float")


def example_inputs(source: Source, shape: tuple[int, ...], *, kind: str | None = None,
                   generator: torch.Generator | None = None) -> Any:
    """Random example inputs of ``shape``: normal values, or token ids (``kind="tokens"``) below the
    vocabulary size; keyword inputs for Hugging Face models (``input_ids`` and ``attention_mask``, or
    ``pixel_values``).

    Example:
        >>> example_inputs(load_source("fxcondensa:LeNet5"), (2, 1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """
    kind = kind or source.input_kind
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind {kind!r}: use one of {', '.join(INPUT_KINDS)}")
    if kind == "tokens":
        x = torch.randint(0, _vocab(source), shape, generator=generator)
    else:
        x = torch.randn(shape, generator=generator)
    if not source.keywords:
        return x
    if kind == "float":
        return {"pixel_values": x}
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if getattr(getattr(source.model, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = x.clone()
    return inputs

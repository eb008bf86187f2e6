"""The unstructured schemes and the scheme protocol, with Condensa's names and arguments.

A scheme is a pass over a traced ``GraphModule``: ``annotate(gm)`` reads the current weights and records,
per parameter, a keep-mask and/or a storage dtype in node metadata (see ``passes/annotate.py``). Condensa's
protocol is kept on top of it: ``pi(module)`` compresses in place, ``delta(module)`` decompresses. Any object
with ``pi`` and ``delta`` works as a custom scheme wherever a scheme is expected.

Example:
    >>> import fxcondensa
    >>> w = fxcondensa.compress(fxcondensa.models.LeNet5(), Prune(0.1, exclude=["ip2"]))
    >>> round(fxcondensa.layer_densities(w)["ip2.weight"], 2), round(fxcondensa.layer_densities(w)["ip1.weight"], 2) < 1
    (1.0, True)
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import functional as F
from ..capture.graph import trace
from ..passes.annotate import annotate_param, apply_annotations, param_owners
from ..passes.layers import LAYER_KINDS, weight_layers

__all__ = ["Scheme", "Prune", "Quantize", "BlockPrune", "Compose", "is_scheme", "check_scheme", "validate_density"]

LINEAR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def validate_density(density: Any, what: str = "density") -> float:
    """A density is a real number in (0, 1]; anything else (0, negatives, NaN, bools) is refused."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{what} must be a float in (0, 1], got {type(density).__name__} {density!r}")
    if not (0.0 < float(density) <= 1.0):  # also false for NaN
        raise ValueError(f"{what} must be in (0, 1], got {density}")
    return float(density)


def is_scheme(obj: Any) -> bool:
    """True for built-in schemes and for any custom object with Condensa's ``pi`` and ``delta``."""
    return not isinstance(obj, type) and callable(getattr(obj, "pi", None)) and callable(getattr(obj, "delta", None))


def check_scheme(scheme: Any) -> None:
    """Raise a TypeError that says what to pass when ``scheme`` is not a scheme (a class is a common slip)."""
    if isinstance(scheme, type) and callable(getattr(scheme, "pi", None)):
        raise TypeError(f"scheme must be an instance, got the class {scheme.__name__}; "
                        f"write e.g. {scheme.__name__}(0.5)")
    if not is_scheme(scheme):
        raise TypeError(f"scheme must be an fxcondensa scheme or an object with pi(module) and delta(module), "
                        f"got {type(scheme).__name__} {scheme!r}")


def _graph_module(module: nn.Module) -> fx.GraphModule:
    return module if isinstance(module, fx.GraphModule) else trace(module)


class Scheme:
    """Base of the built-in schemes: subclasses implement ``annotate``; ``pi``/``delta`` come from it.

    ``masks_only`` is True on schemes whose ``annotate`` records masks and nothing else (no storage dtype,
    no weight written): ``thin`` then keeps the masks aside instead of zeroing a copy of the weights."""

    masks_only = False

    def annotate(self, gm: fx.GraphModule) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def pi(self, module: nn.Module) -> None:
        """Compress ``module`` in place (Condensa's protocol): annotate, then apply the annotations."""
        gm = _graph_module(module)
        self.annotate(gm)
        apply_annotations(gm)
        if gm is not module:  # traced a copy: bring the compressed values back by name
            for name, p in module.named_parameters():
                p.copy_(gm.get_parameter(name))

    def delta(self, module: nn.Module) -> None:
        """Decompress in place. Values already live in float32 (dtypes are storage-only): nothing to do."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this scheme: ``type(s)(**s.config()) == s``."""
        params = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name, p in params.items()
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def __repr__(self) -> str:
        # The repr is the checkpoint's resume key and what users paste back: it must rebuild an equal scheme.
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash(repr(self))


def _match(names: Iterable[str], pattern: str, what: str) -> list[str]:
    """Layer names matching a name or fnmatch pattern; a pattern that matches nothing is an error."""
    names = list(names)
    hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"{what} {pattern!r} matches no layer; the layers it can name are: {shown or '(none)'}")
    return hits


class _LayerSelection:
    """Shared handling of ``layers={pattern: density}`` and ``exclude=[pattern, ...]``."""

    def _init_selection(self, layers: Mapping[str, float] | None, exclude: Sequence[str] | str | None) -> None:
        if layers is not None and not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a dict of layer name or pattern -> density, got {type(layers).__name__}")
        self.layers = {str(k): validate_density(v, f"density of layer {k!r}") for k, v in (layers or {}).items()}
        if isinstance(exclude, str):
            exclude = [exclude]
        self.exclude = list(exclude or [])

    def _split(self, candidates: dict[str, nn.Module]) -> tuple[list[str], dict[str, float]]:
        """(layers under the global rule, {layer: own density}) after exclusions."""
        excluded = {n for p in self.exclude for n in _match(candidates, p, "exclude pattern")}
        own: dict[str, float] = {}
        for pattern, d in self.layers.items():
            for n in _match(candidates, pattern, "layers pattern"):
                own.setdefault(n, d)
        rest = [n for n in candidates if n not in excluded and n not in own]
        return rest, {n: d for n, d in own.items() if n not in excluded}


class Prune(Scheme, _LayerSelection):
    """Unstructured magnitude pruning with one global threshold over Linear and Conv weights.

    ``layers`` gives some layers their own density (name or fnmatch pattern -> density), pruned with a
    threshold of their own; ``exclude`` leaves layers dense.

    Example:
        >>> Prune(0.1, layers={"conv*": 0.5}, exclude=["ip2"])
        Prune(density=0.1, layers={'conv*': 0.5}, exclude=['ip2'])
    """

    masks_only = True

    def __init__(self, density: float, layers: Mapping[str, float] | None = None,
                 exclude: Sequence[str] | str | None = None):
        self.density = validate_density(density)
        self._init_selection(layers, exclude)

    def annotate(self, gm: fx.GraphModule) -> None:
        candidates = weight_layers(gm, LAYER_KINDS)
        rest, own = self._split(candidates)
        owners = param_owners(gm)
        jobs = [(rest, self.density)] + [([n], d) for n, d in own.items()]
        for names, density in jobs:
            if not names:
                continue
            weights = [candidates[n].weight.detach() for n in names]
            threshold = F.magnitude_threshold(torch.cat([w.abs().reshape(-1) for w in weights]), density)
            for n, w in zip(names, weights, strict=True):
                annotate_param(gm, f"{n}.weight", mask=w.abs() >= threshold, owners=owners)


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    if dtype in QUANTIZABLE_DTYPES:
        return dtype
    raise ValueError(f"Quantize dtype must be fxcondensa.float16 or fxcondensa.bfloat16 "
                     f"(or one of {sorted(_DTYPE_NAMES)}), got {dtype!r}")


class Quantize(Scheme, _LayerSelection):
    """Store the parameters of Linear and Conv layers in ``dtype`` (float16 or bfloat16).

    The values become exactly representable in ``dtype`` and compact files store them in it
    (``save_compressed``); the model still computes in float32 unless you cast it yourself.

    Example:
        >>> Quantize(torch.bfloat16)
        Quantize(dtype=torch.bfloat16, exclude=[])
    """

    def __init__(self, dtype: Any = torch.float16, exclude: Sequence[str] | str | None = None):
        self.dtype = _as_dtype(dtype)
        self._init_selection(None, exclude)

    def annotate(self, gm: fx.GraphModule) -> None:
        rest, _ = self._split(weight_layers(gm, LAYER_KINDS))
        owners = param_owners(gm)
        for n in rest:
            for attr, p in gm.get_submodule(n).named_parameters(recurse=False):
                if p.is_floating_point():
                    annotate_param(gm, f"{n}.{attr}", dtype=self.dtype, owners=owners)


def _block(block_size: Any) -> tuple[int, int]:
    size = (block_size, block_size) if isinstance(block_size, int) and not isinstance(block_size, bool) else block_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"block_size must be a positive int or a (rows, cols) pair of positive ints, got {block_size!r}")
    return int(size[0]), int(size[1])


class BlockPrune(Scheme, _LayerSelection):
    """Zero whole ``block_size`` (rows x cols) blocks of Linear weights, ranked globally by ``criteria``.

    Example:
        >>> BlockPrune(0.5, (2, 2))
        BlockPrune(density=0.5, block_size=(2, 2), criteria='l2norm', layers={}, exclude=[])
    """

    masks_only = True

    def __init__(self, density: float, block_size: Any, criteria: Any = "l2norm",
                 layers: Mapping[str, float] | None = None, exclude: Sequence[str] | str | None = None):
        self.density = validate_density(density)
        self.block_size = _block(block_size)
        F.resolve_criteria(criteria)
        self.criteria = criteria
        self._init_selection(layers, exclude)

    def annotate(self, gm: fx.GraphModule) -> None:
        candidates = weight_layers(gm, ("linear",))
        rest, own = self._split(candidates)
        criteria = F.resolve_criteria(self.criteria)
        r, c = self.block_size
        for n in [*rest, *own]:
            rows, cols = candidates[n].weight.shape
            if rows % r or cols % c:
                raise ValueError(f"block_size {self.block_size} does not divide the weight of layer '{n}' "
                                 f"of shape {(rows, cols)}; choose a block that divides it or exclude the layer")
        owners = param_owners(gm)
        jobs = [(rest, self.density)] + [([n], d) for n, d in own.items()]
        for names, density in jobs:
            if not names:
                continue
            scores = [F.block_scores(candidates[n].weight.detach(), self.block_size, criteria) for n in names]
            threshold = F.magnitude_threshold(torch.cat([s.reshape(-1) for s in scores]), density)
            for n, s in zip(names, scores, strict=True):
                keep = (s >= threshold).repeat_interleave(r, 0).repeat_interleave(c, 1)
                annotate_param(gm, f"{n}.weight", mask=keep, owners=owners)


class Compose(Scheme):
    """Apply schemes in order; decompress in reverse (Condensa's ``Compose``).

    Example:
        >>> Compose([Prune(0.02), Quantize(torch.float16)])
        Compose([Prune(density=0.02, layers={}, exclude=[]), Quantize(dtype=torch.float16, exclude=[])])
    """

    def __init__(self, schemes: Sequence[Any]):
        if not isinstance(schemes, (list, tuple)):
            raise TypeError(f"Compose takes a list of schemes, got {type(schemes).__name__}")
        if not schemes:
            raise ValueError("Compose needs at least one scheme, got an empty list")
        for i, s in enumerate(schemes):
            if isinstance(s, type):
                raise TypeError(f"Compose item {i} is the class {s.__name__}, not a scheme: write e.g. {s.__name__}(0.5)")
            if not is_scheme(s):
                raise TypeError(f"Compose item {i} ({s!r}) is not a scheme: it needs pi(module) and delta(module)")
        self.schemes = list(schemes)

    def annotate(self, gm: fx.GraphModule) -> None:
        # Each scheme sees the weights as the previous ones left them, as with Condensa's in-place pi.
        for s in self.schemes:
            if isinstance(s, Scheme):
                s.annotate(gm)
                apply_annotations(gm)
            else:
                s.pi(gm)

    @torch.no_grad()
    def delta(self, module: nn.Module) -> None:
        for s in reversed(self.schemes):
            s.delta(module)

    def config(self) -> dict[str, Any]:
        return {"schemes": list(self.schemes)}

    def __repr__(self) -> str:
        return f"Compose({self.schemes!r})"

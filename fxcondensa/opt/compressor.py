"""``Compressor``: run an optimizer with a scheme on a model and collect statistics (Condensa's API).

Example (the tutorial's lines, with fxcondensa in place of condensa):
    >>> import torch, fxcondensa as condensa
    >>> from torch.utils.data import TensorDataset
    >>> from fxcondensa.schemes import Compose, Prune, Quantize
    >>> data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    >>> MEM = Compose([Prune(0.007), Quantize(condensa.float16)])
    >>> compressor = condensa.Compressor(condensa.opt.Direct(), MEM, condensa.models.LeNet5(),
    ...                                  data, data, data, torch.nn.CrossEntropyLoss())
    >>> w_MEM = compressor.run()
    >>> compressor.statistics["footprint_values_ratio"] > 200
    True
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..compression.apply import density, layer_densities
from ..compression.owned import check_output, own_compressed
from ..measure.footprint import footprint
from ..schemes import check_scheme
from . import distributed as dist_lc
from .training import Batches, as_batches, evaluate

__all__ = ["Compressor", "Statistics"]

logger = logging.getLogger("fxcondensa")

# Batch sizes when the optimizer has none (Direct): evaluation only.
DEFAULT_BATCH_SIZE = 256


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _footprints(model: nn.Module) -> dict[str, int | None]:
    sizes: dict[str, int | None] = {"values": footprint(model, "values")}
    try:
        sizes["stored"] = footprint(model, "stored")
    except ImportError:  # the compact file format is not available in this build
        sizes["stored"] = None
    return sizes


_METRICS = [f"{k}_{m}_{w}" for w in ("before", "after") for k in ("val", "test") for m in ("loss", "accuracy")]


@dataclass
class Statistics(Mapping[str, Any]):
    """What ``Compressor.run`` records, typed, and readable as the dict Condensa's tutorial prints.

    ``statistics["footprint_values_ratio"]``, ``statistics.items()``, ``dict(statistics)`` work as on
    Condensa's dict; the same values are attributes (``statistics.density``). Metrics of a missing val/test
    set are absent (None as attributes); ``optimizer_stats`` holds what the optimizer reports besides
    ``history`` and ``best_iteration`` (LC: ``elapsed_lc``, ``budget``, ...), flattened into the dict view.

    Example:
        >>> s = Statistics(optimizer="Direct", optimizer_config={}, scheme="Prune(density=0.1)", density=0.1,
        ...                layer_densities={}, test_accuracy_after=91.5)
        >>> s["test_accuracy_after"], "val_accuracy_after" in s, s.density
        (91.5, False, 0.1)
    """

    optimizer: str
    optimizer_config: dict[str, Any]
    scheme: str
    density: float
    layer_densities: dict[str, float]
    val_loss_before: float | None = None
    val_accuracy_before: float | None = None
    test_loss_before: float | None = None
    test_accuracy_before: float | None = None
    val_loss_after: float | None = None
    val_accuracy_after: float | None = None
    test_loss_after: float | None = None
    test_accuracy_after: float | None = None
    footprint_values_before: int | None = None
    footprint_values_after: int | None = None
    footprint_values_ratio: float | None = None
    footprint_stored_before: int | None = None
    footprint_stored_after: int | None = None
    footprint_stored_ratio: float | None = None
    history: list[dict[str, Any]] | None = None
    best_iteration: int | None = None
    optimizer_stats: dict[str, Any] = field(default_factory=dict)
    elapsed_seconds: float = 0.0

    def _keys(self) -> list[str]:
        keys = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "optimizer_stats":
                keys.extend(value)
            elif not (value is None and (f.name in _METRICS or f.name in ("history", "best_iteration"))):
                keys.append(f.name)
        return keys

    def __getitem__(self, key: str) -> Any:
        if key in self.optimizer_stats:
            return self.optimizer_stats[key]
        if key != "optimizer_stats" and key in self._keys():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for JSON)."""
        return dict(self.items())


class Compressor:
    """Compress ``model`` with ``scheme`` using optimizer ``opt``; ``run()`` returns the compressed model.

    Args:
        opt: ``fxcondensa.opt.Direct()``, ``FineTune(...)``, ``Gradual(...)`` or ``LC(...)`` (any object with
            their ``compress``).
        scheme: a scheme from ``fxcondensa.schemes`` or any object with ``pi(module)`` and ``delta(module)``.
        model: the trained model. It is never modified: the optimizer works on a traced copy.
        trainset, testset, valset: datasets or DataLoaders of ``(inputs, targets)``; ``testset`` and
            ``valset`` may be None. MNIST-sized datasets are held as tensors on the optimizer's device.
        criterion: the loss, e.g. ``torch.nn.CrossEntropyLoss()``.
        output: what ``run()`` returns, as for ``fxcondensa.compress``: ``"auto"`` (the default) a copy of
            the model's own class holding the compressed tensors (its methods stay; the annotated graph is
            kept beside it), ``"graph"`` the compressed ``GraphModule``, ``"module"`` the own class or a
            ValueError saying why not.

    After ``run()``, ``statistics`` (a :class:`Statistics`, readable as a dict) holds: ``optimizer`` and ``optimizer_config``, ``scheme`` (its repr),
    ``{val,test}_{loss,accuracy}_{before,after}`` (accuracy in percent), ``density`` and
    ``layer_densities`` of the result, ``footprint_{values,stored}_{before,after,ratio}`` (bytes; stored is
    None if ``save_compressed`` is unavailable), ``elapsed_seconds``, plus what the optimizer reports
    (for LC: ``history``, one dict per L-C iteration, and ``best_iteration``).
    """

    def __init__(self, opt: Any, scheme: Any, model: nn.Module, trainset: Any, testset: Any = None,
                 valset: Any = None, criterion: Any = None, *, output: str = "auto"):
        if not callable(getattr(opt, "compress", None)):
            raise TypeError(f"opt must be an optimizer such as fxcondensa.opt.Direct() or fxcondensa.opt.LC(...), "
                            f"got {type(opt).__name__} {opt!r}")
        check_scheme(scheme)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if trainset is None:
            raise ValueError("trainset is required: example inputs for tracing (and L-C training) come from it")
        if criterion is None:
            criterion = nn.CrossEntropyLoss()
        if not callable(criterion):
            raise TypeError(f"criterion must be a loss callable(outputs, targets), got {type(criterion).__name__}")
        self.output = check_output("Compressor", output)
        self.opt, self.scheme, self.model, self.criterion = opt, scheme, model, criterion
        self.trainset, self.testset, self.valset = trainset, testset, valset
        self._statistics: Statistics | None = None
        self._group: dist_lc.Group | None = None  # set during run() under torchrun

    @property
    def statistics(self) -> Statistics | None:
        """The statistics of the last ``run()`` (None before)."""
        return self._statistics

    def _device(self) -> torch.device:
        device = getattr(self.opt, "resolved_device", None)
        return torch.device(device) if device is not None else _model_device(self.model)

    def run(self) -> nn.Module:
        """Compress and return the compressed model (dense shapes, on the optimizer's device): a copy of the
        model's own class, or the ``GraphModule`` (``output="graph"``, or where the class cannot hold it).

        Under ``torchrun`` every rank calls ``run()`` with the same arguments; rank 0 alone evaluates and
        logs, and every rank returns the same model and statistics (see ``fxcondensa.opt.LC``).
        """
        device = self._device()
        with dist_lc.process_group(device) as group, dist_lc.quiet_followers(group):
            return self._run(device, group)

    def _run(self, device: torch.device, group: dist_lc.Group | None) -> nn.Module:
        start = time.perf_counter()
        self._group = group
        train_bs = int(getattr(self.opt, "l_batch_size", DEFAULT_BATCH_SIZE))
        eval_bs = int(getattr(self.opt, "val_batch_size", DEFAULT_BATCH_SIZE))
        train = as_batches(self.trainset, train_bs, device)
        val = as_batches(self.valset, eval_bs, device) if self.valset is not None else None
        test = as_batches(self.testset, eval_bs, device) if self.testset is not None else None
        # Tracing needs a real batch from the training data: structured schemes read shapes from it.
        example_inputs = train.first(2).to(_model_device(self.model))

        stats: dict[str, Any] = {
            "optimizer": type(self.opt).__name__,
            "optimizer_config": dict(getattr(self.opt, "config", {})),
            "scheme": repr(self.scheme),
        }
        before = self._baseline(device, val, test)
        stats.update({f"{k}_before": v for k, v in before.items()})
        fp_before = _footprints(self.model)

        result, opt_stats = self.opt.compress(self.model, self.scheme, train, val, test, self.criterion,
                                              example_inputs)
        # The optimizer may hand back the metrics it already measured on exactly this model.
        after = opt_stats.pop("result_metrics", None) or self._metrics(result, val, test)
        result.train(self.model.training)
        stats.update({f"{k}_after": v for k, v in after.items()})
        stats["density"] = density(result)
        stats["layer_densities"] = layer_densities(result)
        fp_after = _footprints(result)
        for kind in ("values", "stored"):
            b, a = fp_before[kind], fp_after[kind]
            stats[f"footprint_{kind}_before"] = b
            stats[f"footprint_{kind}_after"] = a
            stats[f"footprint_{kind}_ratio"] = (b / a) if (a and b is not None) else None
        for key in ("history", "best_iteration"):
            if key in opt_stats:
                stats[key] = opt_stats.pop(key)
        stats["optimizer_stats"] = opt_stats
        stats["elapsed_seconds"] = time.perf_counter() - start
        self._statistics = Statistics(**stats)
        stats = self._statistics
        for key in ("val", "test"):
            if f"{key}_accuracy_after" in stats:
                logger.info("[fxcondensa] %s accuracy: %.2f%% before, %.2f%% after", key.upper(),
                            stats[f"{key}_accuracy_before"], stats[f"{key}_accuracy_after"])
        return own_compressed(self.model, result, output=self.output, where="Compressor")

    def _baseline(self, device: torch.device, val: Batches | None, test: Batches | None) -> dict[str, float]:
        group = self._group
        if group is not None and not group.lead:  # rank 0 evaluates, the others receive its numbers
            return dist_lc.broadcast_object(group, None)
        metrics = self._baseline_lead(device, val, test)
        return metrics if group is None else dist_lc.broadcast_object(group, metrics)

    def _baseline_lead(self, device: torch.device, val: Batches | None, test: Batches | None) -> dict[str, float]:
        # Evaluate in place when the model is already on the device (evaluate restores its train/eval flag
        # and runs under no_grad, so nothing in it changes); otherwise a temporary copy on the device.
        model = self.model if _model_device(self.model) == device else copy.deepcopy(self.model).to(device)
        metrics = self._metrics_here(model, val, test)
        say = getattr(self.opt, "say", None)  # the optimizer's own words (LC: Condensa's "w VAL ...")
        for key in ("val", "test"):
            if f"{key}_loss" in metrics:
                loss, acc = metrics[f"{key}_loss"], metrics[f"{key}_accuracy"]
                line = (say("baseline", key=key.upper(), loss=loss, acc=acc) if say is not None
                        else f"uncompressed model {key.upper()}: loss {loss:.5f}, top1 {acc:.2f}%")
                logger.info("[fxcondensa] %s", line)
        return metrics

    def _metrics(self, model: nn.Module, val: Batches | None, test: Batches | None) -> dict[str, float]:
        group = self._group
        if group is not None:
            return dist_lc.broadcast_object(group, self._metrics_here(model, val, test) if group.lead else None)
        return self._metrics_here(model, val, test)

    def _metrics_here(self, model: nn.Module, val: Batches | None, test: Batches | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, data in (("val", val), ("test", test)):
            if data is not None:
                metrics[f"{key}_loss"], metrics[f"{key}_accuracy"] = evaluate(model, data, self.criterion)
        return metrics

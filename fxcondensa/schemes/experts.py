"""``ExpertPrune``: remove whole experts of mixture-of-experts layers, with their router rows.

Each layer keeps the same number of experts (a stock config then describes the thinned model): the
``density`` share of them, or ``experts`` of them. An expert is scored by the norm of all its weights
(``criteria="l2norm"``) or, given calibration batches, by the mean router probability it receives on them
(``criteria="routing"``); the lowest-scoring ones go. In the compressed model a removed expert's router
logit is ``-inf`` (``fxcondensa.nn.mask_experts`` after the router) and its weights and router row are zero,
so it is never routed to and ``thin`` removes it exactly (``passes/experts.py``). It composes with the
channel schemes: ``Compose([ExpertPrune(0.5), StructurePrune(0.5)])`` removes experts, then channels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ..capture.tap import tap
from ..passes.annotate import annotate_param, param_owners
from ..passes.experts import Router, mask_router, routers
from .base import Scheme, validate_density
from .calibration import Calibration

__all__ = ["ExpertPrune", "EXPERT_CRITERIA"]

EXPERT_CRITERIA = ("l2norm", "routing")


class ExpertPrune(Scheme):
    """Remove the lowest-scoring experts of every mixture-of-experts layer, each layer keeping the same share.

    ``density`` is the fraction of each layer's experts kept (rounded to the nearest count), ``experts``
    the count kept; give one. A layer must keep at least its top-k experts. ``criteria``: ``"l2norm"`` (the
    norm of an expert's weights in every expert tensor) or ``"routing"`` (the mean router probability of the
    expert over ``calibration`` batches; the default when calibration is given). ``exclude`` names router
    weights (or fnmatch patterns) whose layers keep every expert.

    Example:
        >>> ExpertPrune(0.5)
        ExpertPrune(density=0.5, experts=None, criteria='l2norm', calibration=None, exclude=[])
        >>> ExpertPrune(experts=6).experts
        6
    """

    masks_only = True  # masks and a -inf mask node: thin keeps the masks aside

    def __init__(self, density: float | None = None, *, experts: int | None = None, criteria: str | None = None,
                 calibration: Any = None, exclude: Sequence[str] | str | None = None):
        if (density is None) == (experts is None):
            raise ValueError(f"ExpertPrune: give exactly one of density (fraction of each layer's experts kept) "
                             f"and experts (the count kept per layer), got density={density!r}, experts={experts!r}")
        self.density = validate_density(density) if density is not None else None
        if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int) or experts < 1):
            raise ValueError(f"ExpertPrune: experts must be a positive int (the experts each layer keeps), "
                             f"got {experts!r}")
        self.experts = experts
        self.calibration = None if calibration is None else Calibration(calibration)
        criteria = criteria if criteria is not None else ("routing" if calibration is not None else "l2norm")
        if criteria not in EXPERT_CRITERIA:
            raise ValueError(f"ExpertPrune: criteria must be one of {EXPERT_CRITERIA}, got {criteria!r}")
        if criteria == "routing" and self.calibration is None:
            raise ValueError("ExpertPrune(criteria='routing') scores experts by their router probability on "
                             "calibration batches: pass calibration=[x1, x2, ...] (inputs the model takes)")
        if criteria == "l2norm" and self.calibration is not None:
            raise ValueError("ExpertPrune: calibration is read only by criteria='routing'; drop calibration or "
                             "use criteria='routing'")
        self.criteria = criteria
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])

    def config(self) -> dict[str, Any]:
        return {"density": self.density, "experts": self.experts, "criteria": self.criteria,
                "calibration": self.calibration, "exclude": self.exclude}

    def _kept(self, r: Router) -> int:
        n = self.experts if self.experts is not None else max(1, round(self.density * r.num_experts))
        what = f"experts={self.experts}" if self.experts is not None else \
            f"density={self.density} ({n} of {r.num_experts})"
        if n > r.num_experts:
            raise ValueError(f"ExpertPrune: {what} keeps more experts than the layer of router '{r.weight}' has "
                             f"({r.num_experts}); give experts <= {r.num_experts}")
        if n < r.top_k:
            raise ValueError(f"ExpertPrune: {what} would leave {n} experts in the layer of router '{r.weight}', "
                             f"which routes each token to its top {r.top_k}; keep at least {r.top_k} "
                             f"(experts={r.top_k} or density >= {r.top_k / r.num_experts:.3g})")
        return n

    def _scores(self, gm: fx.GraphModule, found: list[Router]) -> dict[str, torch.Tensor]:
        if self.criteria == "l2norm":
            out = {}
            for r in found:
                total = torch.zeros(r.num_experts, dtype=torch.float64)
                for path in r.experts:
                    w = gm.get_parameter(path).detach()
                    total += w.double().pow(2).reshape(r.num_experts, -1).sum(1).cpu()
                out[r.weight] = total.sqrt()
            return out
        sums: dict[str, torch.Tensor] = {}

        def observe(r: Router) -> Any:
            def fn(v: torch.Tensor) -> None:
                p = torch.softmax(v.detach().double(), -1).reshape(-1, r.num_experts).sum(0).cpu()
                sums[r.weight] = sums[r.weight] + p if r.weight in sums else p
            return fn
        tapped = tap(gm, {r.logits.name: observe(r) for r in found}, "ExpertPrune")
        was = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                for args, kwargs, _ in self.calibration.batches(gm, "ExpertPrune"):  # type: ignore[union-attr]
                    tapped(*args, **kwargs)
        finally:
            gm.train(was)
        return sums

    def annotate(self, gm: fx.GraphModule) -> None:
        found = [r for r in routers(gm)
                 if not any(fnmatch.fnmatchcase(r.weight, p) or r.weight == p for p in self.exclude)]
        usable = [r for r in found if not r.blocked]
        if not usable:
            why = "; ".join(dict.fromkeys(r.blocked for r in found if r.blocked))
            raise ValueError(
                f"ExpertPrune: {type(gm).__name__} has no mixture-of-experts layer whose experts can be removed"
                + (f" ({why})" if why else "") + ". It looks for a linear router ranked by a top-k (optionally "
                "after a softmax) whose ids drive a grouped matmul over expert weights stored (experts, ...) or "
                "index such per-expert tensors (transformers' Mixtral, Qwen2-MoE)" +
                (f"; exclude={self.exclude!r} left out the others" if self.exclude else ""))
        counts = {r.weight: self._kept(r) for r in usable}
        scores = self._scores(gm, usable)
        owners = param_owners(gm)
        for r in usable:
            score = scores[r.weight].clone()
            if r.mask is not None:  # experts removed before (a second projection) stay removed
                score[list(r.mask.args[1])] = -1.0
            order = torch.argsort(score, descending=True, stable=True)
            keep = torch.zeros(r.num_experts, dtype=torch.bool)
            keep[order[:counts[r.weight]]] = True
            removed = tuple(int(e) for e in torch.nonzero(~keep).flatten())
            for path in [r.weight, *([r.bias] if r.bias else []), *r.experts]:
                t = gm.get_parameter(path)
                if path in owners:
                    shape = (r.num_experts,) + (1,) * (t.dim() - 1)
                    annotate_param(gm, path, mask=keep.to(t.device).view(shape).expand(t.shape), owners=owners)
            mask_router(gm, r, removed)
        gm.graph.lint()
        gm.recompile()


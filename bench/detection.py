"""torchvision detectors thinned part by part (``thin(..., modules=[...])``): backbone, feature pyramid and
heads are captured and thinned, the post-processing stays torchvision's code, and thin checks the whole
model's detections against the model with the same parts compressed.

    python bench/detection.py [names...]        # table on stdout, JSON in bench/results/detection.json

Random weights (fan-in scaled, so that scores are not all tied), eval mode, one small image.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision

from fxcondensa import thin
from fxcondensa.schemes import StructurePrune

# name -> (constructor options, parts to thin)
MODELS = {
    "fasterrcnn_mobilenet_v3_large_fpn": (dict(min_size=128, max_size=128),
                                          ["backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"]),
    "ssdlite320_mobilenet_v3_large": ({}, ["backbone", "head"]),
    "retinanet_resnet50_fpn": (dict(min_size=128, max_size=128), ["backbone", "head"]),
}


def build(name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    options, _ = MODELS[name]
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=5,
                                                         **options).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = (2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for n, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + 0.5 if "var" in n else torch.randn(b.shape, generator=g) * 0.1)
    return model, [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    rows = []
    for name in sys.argv[1:] or list(MODELS):
        model, images = build(name)
        t = time.perf_counter()
        small = thin(model, StructurePrune(0.5), (images,), modules=MODELS[name][1])
        seconds = time.perf_counter() - t
        rows.append({"model": name, "parts": MODELS[name][1], "params": params(model), "params_thinned": params(small),
                     "ratio": params(model) / params(small), "thin_s": seconds, "load": os.getloadavg()[0]})
        print(f"{name}: {params(model) / 1e6:.2f}M -> {params(small) / 1e6:.2f}M parameters "
              f"({params(model) / params(small):.2f}x), detections checked, thin {seconds:.0f} s", flush=True)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "detection.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": rows},
                              indent=1))
    tmp.replace(out)  # atomic: a reader never sees half a file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Thinning coverage over torchvision's classification models.

For every model in ``torchvision.models`` (random weights, eval mode, BatchNorm statistics randomised so
that nothing is trivially zero), apply ``StructurePrune(0.5)``, thin, check the thinned model against the
compressed one (``thin(check=True)``), and record parameters and MACs before and after, or why the model
cannot be thinned. Each model runs in its own process, so one failure or one large model cannot affect
the others.

    python bench/coverage.py                      # all models, table to stdout, JSON to bench/results/
    python bench/coverage.py resnet18 vit_b_32    # some models
    python bench/coverage.py --jobs 2             # two models at a time
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Convolutional nets run at 128x128 (MAC ratios barely depend on the resolution, and the run stays short on
# a small machine); transformers need their native 224x224, inception_v3 its 299x299.
FIXED_SIZE = {"inception_v3": 299}
NATIVE_224 = ("vit_", "swin_", "maxvit_")


def input_size(name: str) -> int:
    return FIXED_SIZE.get(name, 224 if name.startswith(NATIVE_224) else 128)


def run_one(name: str, density: float) -> dict:
    import torch
    import torchvision

    import fxcondensa
    from fxcondensa.passes.profile import profile_costs
    from fxcondensa.schemes import StructurePrune

    torch.manual_seed(0)
    size = input_size(name)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, size, size)
    row: dict = {"model": name, "input": f"1x3x{size}x{size}"}
    start = time.perf_counter()
    try:
        thinned = fxcondensa.thin(model, StructurePrune(density), x)
    except Exception as exc:  # the table records why, that is the point of this script
        row.update(status="not thinned", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    dense = fxcondensa.trace(model, x)
    macs0 = sum(c.macs for c in profile_costs(dense))
    macs1 = sum(c.macs for c in profile_costs(thinned))
    p0 = sum(p.numel() for p in model.parameters())
    p1 = sum(p.numel() for p in thinned.parameters())
    frozen = thinned.meta["fxcondensa"]["frozen"]
    row.update(status="thinned" if p1 < p0 else "no reduction", params=p0, params_thinned=p1, param_ratio=round(p0 / p1, 2),
               macs=macs0, macs_thinned=macs1, mac_ratio=round(macs0 / max(macs1, 1), 2),
               frozen_groups=len(frozen), frozen_reasons=sorted({f["reason"].split(" at node")[0][:80] for f in frozen})[:3])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="torchvision model names (default: all classification models)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel (each in its own process)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.models[0], args.density)))
        return
    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)

    def one(name: str) -> dict:
        cmd = [sys.executable, __file__, "--one", "--density", str(args.density), name]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            return {"model": name, "status": "timeout", "reason": f"over {args.timeout}s on this machine"}
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {
            "model": name, "status": "error", "reason": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(one, names):
            rows.append(row)
            print(_line(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.json").write_text(json.dumps({"density": args.density, "rows": rows}, indent=1))
    ok = sum(r["status"] == "thinned" for r in rows)
    print(f"\n{ok}/{len(rows)} models thinned at StructurePrune({args.density}); JSON in {RESULTS / 'coverage.json'}")


def _line(r: dict) -> str:
    if r["status"] in ("thinned", "no reduction"):
        return (f"| {r['model']} | {r['params'] / 1e6:.1f}M -> {r['params_thinned'] / 1e6:.1f}M ({r['param_ratio']}x) "
                f"| {r['macs'] / 1e9:.2f}G -> {r['macs_thinned'] / 1e9:.2f}G ({r['mac_ratio']}x) | {r['frozen_groups']} |")
    return f"| {r['model']} | {r['status']} | {r.get('reason', '')} | |"


if __name__ == "__main__":
    main()

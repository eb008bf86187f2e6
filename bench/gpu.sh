#!/usr/bin/env bash
# The GPU check, in one run that fits a 15-minute device budget with time to rerun it (under 7 minutes on
# one H200, every step under its own `timeout -k`):
#   1. `pytest -m cuda -x`: the CUDA tests (tests/test_cuda.py, tests/test_opt_device.py);
#   2. dense vs thinned (vs torch-pruning) latency rows with CUDA events, fp32 and bf16 autocast, cuDNN
#      benchmark mode and TF32 on (recorded in the JSON), 224x224 inputs;
#   3. an align study (channels multiples of 8 for tensor cores, and align="auto" from the latency model,
#      channels_last, bf16) on two conv nets;
#   4. latency-target rows: StructurePrune(target_latency=0.5) in bf16 and channels_last, measured afterwards.
# torch.compile is left out: compiling dense and thinned models alike takes minutes, more than the budget.
# Runs from the repository root of a fresh copy. speedup.py rewrites its JSON after every row, so a time
# limit keeps what was measured. Output is unbuffered (python -u, PYTHONUNBUFFERED) and goes to the
# terminal and to the logs without a pipe that would hold it back.
# Results: $OUT/gpu_*.json and gpu_*.log (or bench/results/ when OUT is unset).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$SECONDS

# What the run needs: fxcondensa from this tree, and torch-pruning (the `bench` extra) for its columns.
# Wheels shipped in .whl/ (see /work/.library/device/README.md) are installed first; else pip tries the
# index; without either, the rows are measured without torch-pruning and the run says so loudly.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import torch_pruning" 2>/dev/null || timeout -k 5 30 "$PY" -m pip install -q "torch-pruning>=1.4" 2>/dev/null
TP_FLAG=""
if ! "$PY" -c "import torch_pruning" 2>/dev/null; then
    printf '\n%s\nWARNING: torch-pruning is not installed and could not be installed: the tp_* columns will be\nempty. Ship its wheel in .whl/ (pip download torch-pruning) to fill them.\n%s\n\n' \
        "$(printf '!%.0s' {1..100})" "$(printf '!%.0s' {1..100})" | tee "$OUT_DIR/gpu_WARNING.txt"
    TP_FLAG="--no-torch-pruning"
fi
"$PY" -u - <<'PYEOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "torch_pruning", importlib.util.find_spec("torch_pruning") is not None)
PYEOF
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true

step() {  # name, limit (s), command...: output to the terminal and to $OUT_DIR/gpu_<name>.log, unbuffered
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed): $*"
    timeout -k 10 --signal=INT "$limit" "$@" > >(tee "$OUT_DIR/gpu_$name.log") 2>&1
    local rc=$?
    echo "== $name: exit $rc$( [ $rc = 124 ] && echo ' (time limit: the JSON holds the rows measured so far)')"
}

# 1. The CUDA tests first: a broken GPU path makes the rows meaningless.
#    Every `cuda`-marked test of the suite (tests/test_cuda.py, tests/test_opt_device.py, ...).
step tests 110 "$PY" -u -m pytest -m cuda -x -q -p no:cacheprovider tests
# 2. The table: fp32 and bf16 on the same thinned models; torch-pruning matched in 5 bisection steps.
step main 150 "$PY" -u bench/speedup.py --device cuda --out "$OUT_DIR/gpu_main.json" --amp fp32 bf16 \
    --warmup 10 --repeat 30 --tp-steps 5 --densities 0.5 0.3 $TP_FLAG \
    --models lenet5 resnet18 resnet50 mobilenet_v2 vit_b_32
# 3. Align on tensor cores: bf16 convs want channel counts that are multiples of 8; channels_last is cuDNN's
#    fast layout for them.
#    "auto" builds a latency model per model (cached under $FXCONDENSA_CACHE_DIR) and rounds each group's count
#    to the multiple it predicts fastest.
export FXCONDENSA_CACHE_DIR="$OUT_DIR/latency_cache"
step align 70 "$PY" -u bench/speedup.py --device cuda --out "$OUT_DIR/gpu_align.json" --amp bf16 --channels-last \
    --align 0 8 auto --densities 0.5 --models resnet50 mobilenet_v2 --throughput-only --no-torch-pruning \
    --warmup 10 --repeat 30
# 4. Latency target 0.5 at batch 64, 224x224, bf16 weights, channels_last: the per-layer latency model is
#    measured on the GPU, the selection corrects itself from measurements, and each row is measured again after.
step target 75 "$PY" -u bench/speedup.py --device cuda --out "$OUT_DIR/gpu_target.json" --amp bf16 --channels-last \
    --target-latency 0.5 --models resnet50 mobilenet_v2 --batch 64 --thr-size 224 --warmup 10 --repeat 30
echo "== done in $((SECONDS - START))s"
ls -l "$OUT_DIR"/gpu_* 2>/dev/null

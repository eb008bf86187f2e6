#!/usr/bin/env bash
# Dense vs thinned (vs torch-pruning) latency on a CUDA GPU: CUDA-event timing, fp32 and bf16 autocast,
# the same rows as the CPU table (LeNet-5 at 0.3; resnet18, resnet50, mobilenet_v2, vgg11_bn, vit_b_32 at
# densities 0.7 0.5 0.3; batch 1 and 32 (256 for LeNet-5), all at 224x224 on CUDA).
# Runs from the repository root of a fresh copy; at most ~8 minutes in all (each step has its own timeout,
# and speedup.py rewrites its JSON after every model, so a timeout keeps what was measured).
# Results: $OUT/gpu_*.json (or bench/results/ when OUT is unset), logs beside them.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
"$PY" -c "import fxcondensa" 2>/dev/null || "$PY" -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
"$PY" - <<'PYEOF'
import torch, importlib.util
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "torch_pruning", importlib.util.find_spec("torch_pruning") is not None)
PYEOF
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true

run() {  # name, timeout (s), speedup.py args...
    local name=$1 limit=$2; shift 2
    echo "== $name: $* (limit ${limit}s)"
    timeout --signal=INT "$limit" "$PY" bench/speedup.py --device cuda --out "$OUT_DIR/gpu_$name.json" "$@" \
        2>&1 | tee "$OUT_DIR/gpu_$name.log" | grep -v '^  torch-pruning failed' || true
}

# 1. The table: fp32 and bf16 on the same thinned models; torch-pruning matched in 6 bisection steps.
run main 330 --amp fp32 bf16 --warmup 10 --repeat 30 --tp-steps 6 \
    --models lenet5 resnet18 resnet50 mobilenet_v2 vgg11_bn vit_b_32
# 2. Align on tensor cores: bf16 convs want channel counts that are multiples of 8; channels_last is cuDNN's
#    fast layout for them.
run align 80 --amp bf16 --channels-last --align 0 8 32 --densities 0.5 --models resnet50 mobilenet_v2 \
    --throughput-only --no-torch-pruning --warmup 10 --repeat 30
# 3. torch.compile (inductor) of dense and thinned alike, one model, if time is left.
run compile 60 --amp bf16 --compile --densities 0.5 --models resnet50 --throughput-only --no-torch-pruning \
    --warmup 5 --repeat 30
ls -l "$OUT_DIR"/gpu_* 2>/dev/null

#!/usr/bin/env bash
# Proves fastserve's GPU path on one CUDA machine in under 8 minutes (see docs/gpu.md):
#   1. train a tiny recipe a few hundred steps in bf16 on the GPU;
#   2. export it to ONNX and check parity on onnxruntime's CUDA execution provider;
#   3. serve it on CUDA (torch backend, fp32 and bf16) and compare throughput with
#      `transformers serve --continuous-batching` on the same GPU (scripts/bench_serve.py);
#   4. train with DeepSpeed ZeRO-2 on one GPU.
# Usage, from the repository root:  bash scripts/gpu_check.sh [WORK_DIR]
# It builds its own environment (WORK_DIR/venv: a CUDA torch, the `gpu` extra = onnxruntime-gpu, deepspeed)
# unless FASTSERVE_GPU_PYTHON names a Python that already has them. Each step prints PASS/FAIL; exit 1 on a FAIL.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing); run this on a CUDA machine" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/fastserve-gpu-check}"
mkdir -p "$WORK"
cd "$ROOT"
START=$SECONDS
FAILED=0
step() { echo; echo "== [$((SECONDS - START))s] $*"; }
result() { if [ "$1" -eq 0 ]; then echo "PASS: $2"; else echo "FAIL: $2"; FAILED=1; fi; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

PY="${FASTSERVE_GPU_PYTHON:-}"
if [ -z "$PY" ]; then
    step "environment: $WORK/venv (CUDA torch, onnxruntime-gpu, deepspeed, transformers[serving])"
    python3 -m venv "$WORK/venv"
    PY="$WORK/venv/bin/python"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch>=2.6,<2.14"   # the default index serves CUDA builds on Linux
    "$PY" -m pip install -q -e ".[gpu,deepspeed,dev]" "transformers[serving]"
fi
"$PY" - <<'EOF'
import torch, onnxruntime as ort
assert torch.cuda.is_available(), "this torch has no CUDA"
print("torch", torch.__version__, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu without the CUDA provider"
EOF
FS="$PY -m fastserve_cli"

RECIPE="$WORK/gpu.yaml"
cat > "$RECIPE" <<EOF
name: gpu-check
run_dir: $WORK/run
data: {paths: ["{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/asyncio/*.py"], block_size: 128}
tokenizer: {vocab_size: 2048}
model: {architecture: gpt2, size: tiny, config: {n_layer: 4}}
train: {max_steps: 300, per_device_train_batch_size: 32, learning_rate: 3.0e-3, warmup_steps: 30,
        mixed_precision: bf16, eval_steps: 100, eval_max_batches: 8, save_steps: 300, sample_prompts: []}
export: {parity_steps: 32}
EOF

step "1. train 300 steps in bf16 on the GPU"
set +e
$FS run "$RECIPE" --until train
result $? "bf16 training on CUDA"

step "2. export to ONNX; parity on onnxruntime's CUDA execution provider"
$FS export "$RECIPE"
"$PY" - "$WORK/run" <<'EOF'
import sys, torch
from pathlib import Path
from fastserve_cli.export.onnx_graph import check_parity, load_for_export
from fastserve_cli.models.onnx import OnnxCausalLM
run = Path(sys.argv[1])
session = OnnxCausalLM(run / "onnx", providers_=["CUDAExecutionProvider", "CPUExecutionProvider"])
used = session.session.get_providers()
model = load_for_export(run / "model")
parity = check_parity(model, session, steps=32, atol=1e-3)
print("providers:", used, "parity:", parity)
sys.exit(0 if used[0] == "CUDAExecutionProvider" and parity.get("passed") else 1)
EOF
result $? "ONNX parity on CUDAExecutionProvider"

step "3. serve on CUDA (fp32 and bf16) vs transformers serve --continuous-batching"
"$PY" - "$WORK/run" <<'EOF'
import sys
from pathlib import Path
from fastserve_cli.serve.backends import TorchBackend
for dtype in ("fp32", "bf16"):
    backend = TorchBackend(Path(sys.argv[1]) / "model", dtype=dtype)
    assert backend.device == "cuda", backend.device
    print(dtype, "torch backend on", backend.device, next(backend.model.parameters()).dtype)
EOF
result $? "torch serve backend loads on CUDA (fp32, bf16)"
"$PY" scripts/bench_serve.py --model-dir "$WORK/gpt2-124m" --requests 64 --rate 16 --max-out 128 \
    --max-batch-size 32 --skip hf1 hf8 --out "$WORK/bench_serve_gpu.json"
result $? "bench_serve on CUDA: fastserve vs transformers serve --continuous-batching ($WORK/bench_serve_gpu.json)"

step "4. DeepSpeed ZeRO-2 on one GPU"
$FS run "$RECIPE" --until train --set train.deepspeed.stage=2 --set train.max_steps=50 --set train.mixed_precision=bf16 \
    --set run_dir="$WORK/run-zero2"
result $? "DeepSpeed ZeRO-2 training on one GPU"
set -e

echo
echo "gpu_check finished in $((SECONDS - START))s; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')"
exit $FAILED

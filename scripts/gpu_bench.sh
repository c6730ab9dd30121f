#!/usr/bin/env bash
# GPT-2 small (124 M, seq 1024, batch 8, bf16; recipes/gpt2_small.toml) on one CUDA GPU:
# training tokens/s and MFU of metamix on libtorch and on wgpu, and of PyTorch eager on the
# same machine in the same run (scripts/pytorch_bench.py, the same model and step).
# MFU is nanoGPT's estimate: 6 FLOPs per non-position parameter per token plus attention's
# 12·layers·d_model·seq_len, over the GPU's dense bf16 peak (PEAK_TFLOPS, default 989: H100
# SXM; 989 also for H200).
#
# Binaries (default: built here):  BIN_TCH  --features tch     BIN_WGPU  --features wgpu
# PyTorch and libtorch: scripts/setup_libtorch.sh's venv (METAMIX_TORCH_DIR), CUDA wheel.
# Usage: scripts/gpu_bench.sh [steps]     (writes results/gpu_bench.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results; exec > >(tee results/gpu_bench.txt) 2>&1
STEPS=${1:-20}
PEAK=${PEAK_TFLOPS:-989}
R=recipes/gpt2_small.toml
TORCH_ENV="${METAMIX_TORCH_DIR:-$HOME/.cache/metamix/torch}/env.sh"
[ -f "$TORCH_ENV" ] || scripts/setup_libtorch.sh
# shellcheck disable=SC1090
source "$TORCH_ENV"
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${BIN_TCH:-}" ]; then
  cargo build --release --features tch --quiet; BIN_TCH=$TARGET/release/metamix
  cp "$BIN_TCH" /tmp/metamix-tch; BIN_TCH=/tmp/metamix-tch
fi
if [ -z "${BIN_WGPU:-}" ]; then
  cargo build --release --features wgpu --quiet; BIN_WGPU=$TARGET/release/metamix
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# GPT-2 small's FLOPs per token (as pytorch_bench.py and nanoGPT count them).
FLOPS_PER_TOKEN=$(python3 -c '
v, d, l, t = 50304, 768, 12, 1024
params = v * d + l * (12 * d * d + 13 * d) + 2 * d   # tied head; no position table
print(6 * params + 12 * l * d * t)')

report() { # report <label> <tokens/s or "failed">
  local tps=$2
  if [ "$tps" = failed ]; then printf '%-28s failed\n' "$1"; return; fi
  python3 -c "tps=$tps; tf=$FLOPS_PER_TOKEN*tps/1e12; print(f'%-28s {tps:>10,.0f} tokens/s  {tf:7.1f} TFLOP/s  MFU {tf/$PEAK:.1%%}' % '$1')"
}

metamix() { # metamix <label> <binary> <flags...>
  local label=$1 bin=$2; shift 2
  local out tps
  out=$("$bin" bench "$R" --warmup 3 --steps "$STEPS" "$@" 2>&1) || true
  tps=$(grep -oE '[0-9]+ tokens/s \(' <<<"$out" | grep -oE '^[0-9]+' | head -1) || true
  report "$label" "${tps:-failed}"
  # A run that failed says why (its last lines), rather than only "failed".
  [ -n "$tps" ] || tail -n 5 <<<"$out" | sed 's/^/    /'
}

metamix "metamix libtorch bf16" "$BIN_TCH" --backend libtorch --device 0 --precision bf16
metamix "metamix wgpu f16" "$BIN_WGPU" --backend wgpu --device 0 --precision f16
metamix "metamix wgpu f32" "$BIN_WGPU" --backend wgpu --device 0 --precision f32
out=$(python scripts/pytorch_bench.py --device cuda --vocab 50304 --d-model 768 --layers 12 \
        --heads 12 --seq-len 1024 --batch 8 --precision bf16 --warmup 3 --steps "$STEPS" --json 2>&1) || true
tps=$(python3 -c 'import json,sys; print(round(json.loads(sys.stdin.readlines()[-1])["tokens_per_s"]))' \
      <<<"$out" 2>/dev/null) || tps=failed
report "pytorch eager bf16" "$tps"
[ "$tps" != failed ] || tail -n 5 <<<"$out" | sed 's/^/    /'

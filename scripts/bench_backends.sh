#!/usr/bin/env bash
# Training tokens/s of nanoGPT's shakespeare_char model (6 layers, 6 heads, d_model 384,
# seq_len 256, batch 8, dropout 0) per backend and precision, side by side with PyTorch 2.9
# eager on the same machine in the same run (scripts/pytorch_bench.py).
#
# Binaries (each a `cargo build --release` with the features named; default: ./target):
#   BIN_CPU   any build             BIN_WGPU  --features wgpu   BIN_TCH  --features tch
# PyTorch and libtorch come from scripts/setup_libtorch.sh's venv (METAMIX_TORCH_DIR).
# Usage: scripts/bench_backends.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything printed is also kept in results/bench_backends.txt, where the README's figures come from.
mkdir -p results; exec > >(tee results/bench_backends.txt) 2>&1
STEPS=${1:-10}
BIN=target/release/metamix
BIN_CPU=${BIN_CPU:-$BIN}; BIN_WGPU=${BIN_WGPU:-}; BIN_TCH=${BIN_TCH:-}
TORCH_ENV="${METAMIX_TORCH_DIR:-$HOME/.cache/metamix/torch}/env.sh"
R=recipes/nanogpt_shakespeare_char.toml
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}"; mkdir -p -m 700 "$XDG_RUNTIME_DIR"

bench() { # bench <label> <binary> <metamix flags...>
  local label=$1 bin=$2; shift 2
  local tps
  tps=$("$bin" bench "$R" --warmup 2 --steps "$STEPS" --set model.dropout=0.0 "$@" 2>&1 |
        grep -oE '[0-9]+ tokens/s \(' | tr -d ' (' | sed 's/tokens/ tokens/' | head -1) || tps="failed"
  printf '%-34s %s\n' "$label" "$tps"
}

# A binary built with `tch` loads libtorch at start, whichever backend it runs: its env
# first (the same one builds all three rows when BIN_WGPU and BIN_TCH are one binary).
if [ -f "$TORCH_ENV" ]; then
  # shellcheck disable=SC1090
  source "$TORCH_ENV"
fi
for p in f32 bf16 f16; do bench "metamix cpu (flex) $p" "$BIN_CPU" --precision $p; done
if [ -n "$BIN_WGPU" ]; then
  for p in f32 f16; do bench "metamix wgpu $p" "$BIN_WGPU" --backend wgpu --precision $p; done
fi
if [ -f "$TORCH_ENV" ]; then
  if [ -n "$BIN_TCH" ]; then
    for p in f32 bf16; do bench "metamix libtorch cpu $p" "$BIN_TCH" --backend libtorch --device cpu --precision $p; done
  fi
  for p in f32 bf16; do
    tps=$(python scripts/pytorch_bench.py --precision $p --warmup 2 --steps "$STEPS" --json 2>/dev/null |
          python -c 'import json,sys; print("%.0f tokens/s" % json.loads(sys.stdin.readlines()[-1])["tokens_per_s"])')
    printf '%-34s %s\n' "pytorch 2.9 eager $p" "$tps"
  done
else
  echo "(no PyTorch: run scripts/setup_libtorch.sh for the PyTorch and libtorch rows)"
fi

#!/usr/bin/env bash
# Training throughput of nanoGPT's shakespeare_char model (6 layers, 6 heads, d_model 384,
# seq_len 256, batch 8) on the CPU backend (flex), dropout off as in a pure speed test.
# Usage: scripts/bench_train.sh [STEPS] [extra metamix --set overrides...]
# Runs 3 times and prints each; the machine is shared, so compare runs of one session.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything printed is also kept in results/bench_train.txt, where the README's figures come from.
mkdir -p results; exec > >(tee results/bench_train.txt) 2>&1
steps="${1:-10}"; shift || true
BIN=${BIN:-}
if [ -z "$BIN" ]; then cargo build --release --quiet; BIN=${CARGO_TARGET_DIR:-target}/release/metamix; fi
for i in 1 2 3; do
  "$BIN" bench recipes/nanogpt_shakespeare_char.toml \
    --warmup 2 --steps "$steps" --set model.dropout=0.0 "$@"
done

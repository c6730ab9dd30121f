#!/usr/bin/env bash
# Training throughput of nanoGPT's shakespeare_char model (6 layers, 6 heads, d_model 384,
# seq_len 256, batch 8) on the CPU backend (flex), dropout off as in a pure speed test.
# Usage: scripts/bench_train.sh [STEPS] [extra metamix --set overrides...]
# Runs 3 times and prints each; the machine is shared, so compare runs of one session.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-10}"; shift || true
cargo build --release --quiet
for i in 1 2 3; do
  ./target/release/metamix bench recipes/nanogpt_shakespeare_char.toml \
    --warmup 2 --steps "$steps" --set model.dropout=0.0 "$@"
done

#!/usr/bin/env bash
# Sequence parallelism: what the ring costs and what it saves.
#  1. Step time for N = 1, 2, 4 ranks on one CPU (flex, logical ranks): the same total work
#     plus the ring's own (block merges, transfers, smaller matmuls) — its overhead.
#  2. Peak memory per rank on wgpu, one device vs two (Mesa lavapipe gives two Vulkan
#     devices, `default` and `cpu`, each with its own memory pool), against a memory budget.
# Needs a build with wgpu: cargo build --release --features wgpu
# Usage: scripts/bench_sequence_parallel.sh [seq_len] [budget MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything printed is also kept in results/bench_sequence_parallel.txt, where the README's figures come from.
mkdir -p results; exec > >(tee results/bench_sequence_parallel.txt) 2>&1
BIN=${BIN:-target/release/metamix}
SEQ=${1:-2048}
BUDGET=${2:-256}
R=recipes/shakespeare_ring.toml
common=(--set training.seq_len="$SEQ" --set training.batch_size=1 --set model.n_layers=2)

echo "== flex, one CPU device, logical ranks, seq_len $SEQ"
"$BIN" bench "$R" --warmup 1 --steps 3 "${common[@]}" --set model.softmax.tiled=true \
  --set parallelism.sequence_parallel_degree=1 | sed "s/^/N=1 FlashAttention /"
for n in 1 2 4; do
  "$BIN" bench "$R" --warmup 1 --steps 3 "${common[@]}" \
    --set parallelism.sequence_parallel_degree=$n | sed "s/^/N=$n /"
done

echo "== wgpu (lavapipe), one rank per device, seq_len $SEQ, budget $BUDGET MiB per rank"
for n in 1 2; do
  devices='["default"]'
  [ $n = 2 ] && devices='["default","cpu"]'
  out=$("$BIN" bench "$R" --backend wgpu --warmup 1 --steps 2 "${common[@]}" \
    --set parallelism.sequence_parallel_degree=$n --set "parallelism.devices=$devices")
  echo "$out" | sed "s/^/N=$n /"
  echo "$out" | awk -v b="$BUDGET" -v n=$n '/peak memory per rank/ {
    split($0, a, ": "); m = split(a[2], v, " \\| "); worst = 0
    for (i = 1; i <= m; i++) if (v[i] + 0 > worst) worst = v[i] + 0
    printf "N=%d largest rank %.0f MiB: %s the %d MiB budget\n", n, worst, (worst <= b ? "fits" : "EXCEEDS"), b }'
done

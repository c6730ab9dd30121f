#!/usr/bin/env bash
# Sequence parallelism across processes: each rank is a `metamix serve` process on
# 127.0.0.1 hosting a CPU device (burn-remote over WebSocket), so each rank's memory is its
# own process's peak RSS (VmHWM), printed when the server stops. Compares one server holding
# the whole sequence with two servers holding half each.
# Needs: cargo build --release --features remote
# Usage: scripts/bench_remote.sh [seq_len]
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything printed is also kept in results/bench_remote.txt, where the README's figures come from.
mkdir -p results; exec > >(tee results/bench_remote.txt) 2>&1
BIN=${BIN:-target/release/metamix}
SEQ=${1:-2048}
export RUST_LOG=${RUST_LOG:-warn}
common=(--warmup 1 --steps 2 --set training.seq_len="$SEQ" --set training.batch_size=1 --set model.n_layers=2)

run() { # run <ranks> <port>...
  local n=$1; shift
  local pids=() devices="" logs=()
  for port in "$@"; do
    log=$(mktemp); logs+=("$log")
    "$BIN" serve --port "$port" >"$log" 2>&1 & pids+=($!)
    devices+="\"ws://127.0.0.1:$port\","
  done
  "$BIN" bench recipes/shakespeare_ring.toml "${common[@]}" \
    --set parallelism.sequence_parallel_degree="$n" --set "parallelism.devices=[${devices%,}]" |
    sed "s/^/N=$n /"
  for i in "${!pids[@]}"; do
    kill -TERM "${pids[$i]}"; wait "${pids[$i]}" || true
    echo "N=$n rank $i $(grep 'peak memory' "${logs[$i]}")"
    rm -f "${logs[$i]}"
  done
}
run 1 3301
run 2 3302 3303

#!/usr/bin/env python3
"""Ring attention's training memory, before and after its blocks use FlashAttention.

For seq_len 2048 and 8192 and 2 and 4 sequence-parallel ranks, one training step of the
model of recipes/shakespeare_ring.toml (2 layers, batch 1) with the ring's blocks in the
naive form (`model.softmax.tiled = false`: each block's probabilities are kept for
backward, quadratic in the chunk length) and as FlashAttention blocks (`tiled = true`,
block 128: only each block's output and log-sum-exp are kept, linear in the chunk length).

The ranks are logical ranks of one process on the CPU backend (flex has one device, and the
FlashAttention extension is registered for flex only), so the process's peak RSS holds every
rank's memory; the table gives it and its share per rank (÷ N). Writes OUT.md.

Usage: python3 scripts/bench_ring_memory.py [--out results/ring_memory] [--seq 2048 8192]
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
MS = re.compile(r"([\d.]+) ms/step")


def step(binary, seq, ranks, tiled):
    cmd = [str(binary), "bench", "recipes/shakespeare_ring.toml", "--warmup", "0", "--steps", "1",
           "--set", f"training.seq_len={seq}", "--set", "training.batch_size=1",
           "--set", "model.n_layers=2", "--set", f"parallelism.sequence_parallel_degree={ranks}",
           "--set", f"model.softmax.tiled={'true' if tiled else 'false'}",
           "--set", "model.softmax.block_size=128"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out}")
    m = MS.search(out)
    return usage.ru_maxrss / 1024, float(m[1]) / 1e3 if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/ring_memory")
    ap.add_argument("--seq", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    args = ap.parse_args()
    binary = metamix_build.binary()
    rows = ["| seq_len | ranks | ring blocks | process peak RSS | per rank (÷ N) | step time |",
            "|---:|---:|---|---:|---:|---:|"]
    for seq in args.seq:
        for n in args.ranks:
            for tiled in (False, True):
                mib, secs = step(binary, seq, n, tiled)
                form = "FlashAttention (after)" if tiled else "naive (before)"
                rows.append(f"| {seq} | {n} | {form} | {mib:,.0f} MiB | {mib / n:,.0f} MiB | {secs:.2f} s |")
                print(rows[-1], flush=True)
    table = ("One training step, model of recipes/shakespeare_ring.toml with 2 layers, batch 1, "
             "zigzag sharding, logical ranks of one CPU process (flex).\n\n" + "\n".join(rows) + "\n")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

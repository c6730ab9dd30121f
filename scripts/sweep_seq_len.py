#!/usr/bin/env python3
"""Sweep sequence length for each registered token mixer (and a few other forms) alone: forward+backward time and peak memory
(the process's peak RSS, one process per point), d_model 128, 4 heads, batch 1, CPU; plus
softmax attention forward-only (inference), naive and tiled.

Usage: python3 scripts/sweep_seq_len.py [--max 8192] [--out results/seq_len_sweep]
Writes OUT.md (table) and OUT.png (log-log plots; needs matplotlib). A mixer stops growing
once a point takes over --budget-s seconds or fails (e.g. out of memory).
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Beyond every registered mixer with its default options (from `metamix mixers`): the
# other forms worth seeing.
VARIANTS = {
    "softmax (tiled)": ["model.mixer=\"softmax\"", "model.softmax.tiled=true", "model.softmax.block_size=128"],
    "linear (chunkwise, chunk 64)": ["model.mixer=\"linear\"", "model.linear.form=\"chunkwise\"",
                                     "model.linear.chunk_size=64"],
    "gla (gated, fused)": ["model.mixer=\"linear\"", "model.linear.decay=\"gated\"",
                           "model.linear.normalize=false"],
    "gla (gated, chunkwise, chunk 64)": ["model.mixer=\"linear\"", "model.linear.decay=\"gated\"",
                                         "model.linear.normalize=false",
                                         "model.linear.form=\"chunkwise\"",
                                         "model.linear.chunk_size=64"],
    "mamba2 (chunked, chunk 64)": ["model.mixer=\"mamba2\"", "model.mamba2.form=\"chunked\"",
                                   "model.mamba2.chunk_size=64"],
    # Inference (no autodiff): the tiled form keeps one block of scores at a time.
    # The default softmax row takes the tiled form from 2048 tokens (`tiled` unset); these
    # keep the materialised weights at every length.
    "softmax (naive)": ["model.mixer=\"softmax\"", "model.softmax.tiled=false"],
    "softmax (naive), forward only": ["model.mixer=\"softmax\"", "model.softmax.tiled=false",
                                      "--forward-only"],
    "softmax (tiled), forward only": ["model.mixer=\"softmax\"", "model.softmax.tiled=true",
                                      "model.softmax.block_size=128", "--forward-only"],
}
MS = re.compile(r"([\d.]+) ms per forward")


def point(binary, sets, t):
    cmd = [str(binary), "bench-mixer", "recipes/shakespeare_char.toml", "--seq-len", str(t),
           "--warmup", "1", "--iters", "2"]
    for s in sets:
        cmd += [s] if s.startswith("--") else ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    m = MS.search(out)
    if os.waitstatus_to_exitcode(status) != 0 or not m:
        return None, out.strip().splitlines()[-1:] if out.strip() else ["failed"]
    return (float(m[1]), usage.ru_maxrss / 1024), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=30.0)
    ap.add_argument("--out", default="results/seq_len_sweep")
    args = ap.parse_args()
    binary = metamix_build.binary()
    registry = metamix_build.registry(binary)
    mixers = {name: [f"model.mixer=\"{name}\""] for name in registry} | VARIANTS
    lengths = [t for t in [256, 512, 1024, 2048, 4096, 8192, 16384] if t <= args.max]
    results = {}
    for name, sets in mixers.items():
        results[name] = {}
        for t in lengths:
            r, err = point(binary, sets, t)
            if r is None:
                print(f"{name} T={t}: stopped ({err})", flush=True)
                break
            results[name][t] = r
            print(f"{name} T={t}: {r[0]:.1f} ms, {r[1]:.0f} MiB", flush=True)
            if r[0] / 1e3 * 3 > args.budget_s:
                break
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    head = "| mixer | " + " | ".join(f"T={t}" for t in lengths) + " |"
    rows = [head, "|---|" + "---:|" * len(lengths)]
    for name, pts in results.items():
        cells = [f"{pts[t][0]:.0f} ms / {pts[t][1]:.0f} MiB" if t in pts else "-" for t in lengths]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = ("time per forward+backward (forward only where marked) / peak RSS of the process, "
             "d_model 128, 4 heads, batch 1\n\n") + "\n".join(rows) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return 0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in results.items():
        ts = sorted(pts)
        a1.plot(ts, [pts[t][0] for t in ts], marker="o", ms=3, label=name)
        a2.plot(ts, [pts[t][1] for t in ts], marker="o", ms=3, label=name)
    for ax, label in [(a1, "forward+backward, or forward only (ms)"), (a2, "peak RSS (MiB)")]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    a1.legend(fontsize=7)
    fig.suptitle("One token mixer alone, CPU (flex), 2 cores")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

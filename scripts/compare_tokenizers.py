#!/usr/bin/env python3
"""Train the default model (recipes/shakespeare_char.toml's size) on the same text with each
tokenizer — char, byte, bpe:4096, gpt2 — for the same wall time, and compare validation bits
per byte (the loss per byte of text, in bits: the one scale on which tokenizers compare).

Usage: python3 scripts/compare_tokenizers.py [--seconds 240] [--out results/tokenizers]
Each tokenizer's step budget is its measured steps/s (`metamix bench`) times --seconds, so
every run gets about the same wall time. Runs go to runs/tokenizers-<name> (replaced).
Writes <out>.md and <out>.json.
"""
import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = {
    "char": ("recipes/shakespeare_char.toml", []),
    "byte": ("recipes/shakespeare_char.toml", ["data.tokenizer=\"byte\""]),
    "bpe:4096": ("recipes/shakespeare_bpe4k.toml", []),
    "gpt2": ("recipes/shakespeare_gpt2.toml", []),
}
BENCH = re.compile(r"([\d.]+) ms/step")
DONE = re.compile(r"^done: step (\d+) \| train loss ([\d.]+) \| val loss ([\d.]+) \| val bits/byte ([\d.]+) \| (\d+) tokens/s \| ([\d.]+) s")
PARAMS = re.compile(r"\((\d+) parameters")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--out", default="results/tokenizers")
    args = ap.parse_args()
    binary = metamix_build.binary()
    rows = []
    for name, (recipe, extra) in RECIPES.items():
        sets = sum((["--set", s] for s in extra), [])
        bench = subprocess.run([str(binary), "bench", recipe, "--warmup", "2", "--steps", "5", *sets],
                               cwd=ROOT, capture_output=True, text=True)
        if bench.returncode != 0:
            sys.exit(f"{name}: bench failed:\n{bench.stderr}")
        ms = float(BENCH.search(bench.stdout)[1])
        steps = max(50, int(args.seconds * 1000 / ms))
        run = f"tokenizers-{name.replace(':', '')}"
        shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
        cmd = [str(binary), "train", recipe, *sets, "--set", f"name=\"{run}\"",
               "--set", f"training.steps={steps}", "--set", f"training.eval_interval={steps}",
               "--set", f"lr_scheduler.warmup_steps={min(100, steps // 10)}",
               "--set", "metrics.tensorboard=false", "--quiet"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            sys.exit(f"{name}: train failed:\n{proc.stderr}")
        done = next(m for line in proc.stdout.splitlines() if (m := DONE.match(line)))
        meta = json.loads((ROOT / "runs" / run / "data" / "meta.json").read_text())
        tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
        nbytes = meta["bytes"]["train"] + meta["bytes"]["val"]
        row = {"tokenizer": name, "vocab": meta["vocab_size"], "bytes_per_token": nbytes / tokens,
               "steps": int(done[1]), "val_loss": float(done[3]), "val_bpb": float(done[4]),
               "tokens_per_s": int(done[5]), "wall_s": wall}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = [f"Same model (d 128, 4 layers), same text, about {args.seconds:.0f} s of training each "
             f"(`python3 scripts/compare_tokenizers.py --seconds {args.seconds:.0f}`).", "",
             "| tokenizer | vocabulary | bytes/token | steps | tokens/s | val loss (nats/token) | val bits/byte | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['vocab']} | {r['bytes_per_token']:.2f} | {r['steps']} | "
                     f"{r['tokens_per_s']} | {r['val_loss']:.3f} | **{r['val_bpb']:.3f}** | {r['wall_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

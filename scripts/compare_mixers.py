#!/usr/bin/env python3
"""Train every mixer recipe on the Shakespeare task (same size, same step budget) and write
a table (val loss, tokens/s, peak memory, parameters, wall time) and a plot of val loss
against wall-clock time, so you can see which mixer learns best per second.

Usage: python3 scripts/compare_mixers.py [--steps N] [--out results/mixers] [--from-json F] [RECIPE ...]
Default recipes: for every registered mixer (`metamix mixers`), the recipes/shakespeare_*.toml
that uses it alone, then the other single-device character-level shakespeare recipes (GLA,
the hybrid, the Llama-shaped one); 2000 steps. Recipes with another tokenizer are another
task (`scripts/compare_tokenizers.py` compares those).
`--from-json results/mixers.json` writes the table and plot again from an earlier run's rows
(the default recipes' rows, or those named), without training.
Each run goes to runs/compare-<recipe> (replaced). The plot needs matplotlib
(pip install matplotlib); without it the table is still written.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL = re.compile(r"^step (\d+) \(([\d.]+) s\): train loss ([\d.]+), val loss ([\d.]+)")
DONE = re.compile(r"^done: step (\d+) \| train loss ([\d.]+) \| val loss ([\d.]+) \| (?:val bits/byte \S+ \| )?(\d+) tokens/s \| ([\d.]+) s")
PARAMS = re.compile(r"^training \S+ \((\d+) parameters, mixers (.*)\) for")


def run(recipe: pathlib.Path, steps: int, binary: pathlib.Path) -> dict:
    name = "compare-" + recipe.stem
    shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    cmd = [str(binary), "train", str(recipe), "--set", f"name={name}",
           "--set", f"training.steps={steps}", "--set", f"lr_scheduler.warmup_steps={min(100, steps // 10)}",
           "--set", "metrics.tensorboard=false"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    # Reap the child ourselves: wait4 returns its own resource usage (peak RSS in KiB).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{recipe}: metamix failed:\n{out}")
    row = {"recipe": recipe.stem, "curve": [], "wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}
    for line in out.replace("\r", "\n").splitlines():
        if m := EVAL.match(line):
            row["curve"].append((float(m[2]), float(m[4]), int(m[1])))
        elif m := DONE.match(line):
            row.update(step=int(m[1]), val=float(m[3]), tokens_per_s=int(m[4]), train_s=float(m[5]))
        elif m := PARAMS.match(line):
            row.update(params=int(m[1]), mixers=m[2].replace('"', ""))
    return row


def default_recipes(binary: pathlib.Path) -> list:
    """One shakespeare recipe per registered mixer, then the remaining single-device ones."""
    registry = metamix_build.registry(binary)
    candidates = {}
    for path in sorted((ROOT / "recipes").glob("shakespeare_*.toml")):
        recipe = tomllib.loads(path.read_text())
        if recipe.get("parallelism", {}).get("sequence_parallel_degree", 1) > 1:
            continue
        # One task for all: the character-level model (tokenizer recipes are compared apart).
        if recipe.get("data", {}).get("tokenizer", "char") != "char":
            continue
        candidates[path] = recipe.get("model", {})
    chosen = []
    for name in registry:
        alone = [p for p, m in candidates.items()
                 if m.get("mixer", "softmax") == name and "mixers" not in m and p not in chosen]
        if not alone:
            sys.exit(f"no recipes/shakespeare_*.toml trains the {name} mixer alone: add one")
        # The one named after it, else the plainest (fewest options set for its mixer).
        chosen.append(min(alone, key=lambda p: (p.stem != f"shakespeare_{name}", len(candidates[p].get(name, {})))))
    return chosen + [p for p in candidates if p not in chosen]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="results/mixers")
    ap.add_argument("--from-json", help="rows of an earlier run to write out again, untrained")
    ap.add_argument("recipes", nargs="*")
    args = ap.parse_args()
    binary = metamix_build.binary()
    recipes = [pathlib.Path(r) for r in args.recipes] or default_recipes(binary)
    rows = []
    if args.from_json:
        earlier = {r["recipe"]: r for r in json.loads(pathlib.Path(args.from_json).read_text())}
        rows = [earlier[r.stem] for r in recipes if r.stem in earlier]
    for r in [] if args.from_json else recipes:
        row = run(r, args.steps, binary)
        rows.append(row)
        print(f"{row['recipe']}: val {row['val']:.4f}, {row['tokens_per_s']} tok/s, {row['train_s']:.0f} s", flush=True)

    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"| recipe | mixers | parameters | val loss @ {args.steps} steps | tokens/s | train time (s) | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['mixers']} | {r['params']:,} | {r['val']:.4f} | "
            f"{r['tokens_per_s']:,} | {r['train_s']:.0f} | {r['peak_mib']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    # The raw rows (with each run's val-loss curve), so a plot can be redrawn without training.
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs = [c[0] for c in r["curve"]]
        ys = [c[1] for c in r["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['recipe']} ({r['val']:.3f})")
    ax.set_xlabel("wall-clock seconds (2 CPU cores)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Shakespeare char LM, {args.steps} steps per mixer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Train every mixer on each benchmark task at one CPU-sized budget and write
results/tasks.md, results/tasks.json and results/tasks.png: validation accuracy per mixer
and task, beside the published numbers the runs correspond to, and induction heads scored
at lengths beyond training (`metamix eval --set task.seq_len=N`).

Usage: python3 scripts/compare_tasks.py [--tasks listops,mqar,...] [--mixers softmax,...]
                                        [--steps N] [--out results/tasks]
Defaults: the recipes/<task>.toml of listops, mqar, selective_copy and induction_heads,
every registered mixer (`metamix mixers`), each recipe's own steps. One seed per cell.
Runs go to runs/compare-tasks/<task>-<mixer> (replaced). The plot needs matplotlib.
"""
import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ["listops", "mqar", "selective_copy", "induction_heads"]
DONE = re.compile(r"^done: step (\d+) \| train loss ([\d.]+) \| val loss ([\d.]+) \| val accuracy ([\d.]+)% \| (\d+) tokens/s \| ([\d.]+) s")
EVAL = re.compile(r"at seq_len (\d+): val loss ([\d.]+) \| accuracy ([\d.]+)%")
# Induction heads, scored at these lengths after training at the recipe's.
LENGTHS = [128, 256, 512]

# What the papers report for the runs these correspond to, and how the settings differ.
PUBLISHED = {
    "listops": ("LRA (Tay et al. 2021), Table 1: Transformer 36.37%, Linear Transformer "
                "16.13%, Performer 18.01%; chance 10%",
                "LRA: 2,000 tokens, depth 10, 10 arguments, 96k training examples, 5k steps; "
                "here {seq_len} tokens, depth {depth}, {args} arguments, {examples} fresh "
                "examples ({steps} steps × {batch})"),
    "mqar": ("Zoology (Arora et al. 2023), Fig. 2: attention solves MQAR (≈100%) at every "
             "width; gated convolutions and small-state recurrences fall with more pairs",
             "Zoology: up to 64 pairs, 512 tokens, vocabulary 8,192, 64 epochs of 100k "
             "examples; here {pairs} pairs, {seq_len} tokens, vocabulary {vocab}, {examples} "
             "examples"),
    "selective_copy": ("Mamba (Gu & Dao 2023), Table 1: S6 (Mamba) 99.8%, S4 18.3%, "
                       "H3 57.0%, Hyena 30.1%",
                       "Mamba: 16 tokens in 4,096 positions, 400k steps; here {tokens} "
                       "tokens in {seq_len} positions, {steps} steps"),
    "induction_heads": ("Mamba (Gu & Dao 2023), Fig. 1/Table 2: Mamba 100% from 2^6 up to "
                        "2^20 tokens; attention (RoPE, xPos) fails beyond 2× its training "
                        "length",
                        "Mamba: trained at 256 tokens; here at {seq_len}, scored at "
                        + ", ".join(map(str, LENGTHS))),
}


def run(binary, task, mixer, steps, folder):
    name = f"{task}-{mixer}"
    shutil.rmtree(folder / name, ignore_errors=True)
    cmd = [str(binary), "train", f"recipes/{task}.toml", "--quiet",
           "--set", f'model.mixer="{mixer}"', "--set", f'name="{name}"',
           "--set", f'checkpoint.folder="{folder}"', "--set", "metrics.tensorboard=false"]
    if steps:
        cmd += ["--set", f"training.steps={steps}"]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{task} × {mixer}: metamix failed:\n{out.stdout}{out.stderr}")
    m = next(filter(None, map(DONE.match, out.stdout.splitlines())))
    row = {"task": task, "mixer": mixer, "steps": int(m[1]), "val_loss": float(m[3]),
           "accuracy": float(m[4]), "tokens_per_s": int(m[5]), "wall_s": time.time() - start}
    if task == "induction_heads":
        row["longer"] = {}
        for n in LENGTHS:
            e = subprocess.run([str(binary), "eval", str(folder / name), "--set", f"task.seq_len={n}"],
                               cwd=ROOT, capture_output=True, text=True)
            m = EVAL.search(e.stdout)
            row["longer"][n] = float(m[3]) if m else None  # None: the model cannot run there
    print(f"{task:16} {mixer:8} {row['accuracy']:6.2f}%  {row['wall_s']:6.1f} s", flush=True)
    return row


def settings(task, steps):
    r = tomllib.loads((ROOT / "recipes" / f"{task}.toml").read_text())
    t, tr = r["task"], r["training"]
    o = t.get(task, {})
    steps = steps or tr["steps"]
    return PUBLISHED[task][1].format(
        seq_len=t["seq_len"], depth=o.get("max_depth"), args=o.get("max_args"),
        pairs=o.get("num_kv_pairs"), vocab=o.get("vocab_size"), tokens=o.get("num_tokens"),
        steps=steps, batch=tr["batch_size"], examples=steps * tr["batch_size"])


def cpu_name():
    """The CPU's model name and core count (Linux), else the platform's machine name."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        return f"{name}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.machine()


def write(rows, tasks, mixers, steps, out):
    cell = {(r["task"], r["mixer"]): r for r in rows}
    lines = ["# Every mixer on the efficient-transformer benchmarks, CPU-sized",
             "",
             f"Generated by `python3 scripts/compare_tasks.py` on {cpu_name()} "
             f"({time.strftime('%Y-%m-%d')}). Validation accuracy (%) after each recipe's budget, "
             "one seed per cell; each task's recipe (recipes/<task>.toml) fixes the model "
             "(2 layers; d_model 128 and 2 heads, ListOps 64 and 4) and every other setting, only `model.mixer` changes.",
             "",
             "| task | " + " | ".join(mixers) + " |",
             "|---|" + "---:|" * len(mixers)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(
            f"{cell[(task, m)]['accuracy']:.1f}" if (task, m) in cell else "-" for m in mixers) + " |")
    if "induction_heads" in tasks:
        for n in LENGTHS:
            vals = []
            for m in mixers:
                v = cell.get(("induction_heads", m), {}).get("longer", {}).get(n)
                vals.append("-" if v is None else f"{v:.1f}")
            lines.append(f"| induction_heads at {n} | " + " | ".join(vals) + " |")
    lines += ["", "Wall-clock seconds per run (training and its evaluations):", "",
              "| task | " + " | ".join(mixers) + " |", "|---|" + "---:|" * len(mixers)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(
            f"{cell[(task, m)]['wall_s']:.0f}" if (task, m) in cell else "-" for m in mixers) + " |")
    lines += ["", "## What the papers report, and how these runs differ", ""]
    for task in tasks:
        lines += [f"- **{task}** — {PUBLISHED[task][0]}.", f"  Settings: {settings(task, steps)}."]
    lines += ["", "These are small models on short budgets: a low number says the mixer did not "
              "learn the task within this budget, not that it cannot."]
    (out.parent).mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(mixers)
    for i, m in enumerate(mixers):
        ys = [cell.get((t, m), {}).get("accuracy", 0.0) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(mixers), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--mixers", default="")
    p.add_argument("--steps", type=int, default=0, help="override every recipe's training.steps")
    p.add_argument("--out", default="results/tasks")
    a = p.parse_args()
    binary = metamix_build.binary()
    mixers = a.mixers.split(",") if a.mixers else metamix_build.registry(binary)
    tasks = a.tasks.split(",")
    folder = ROOT / "runs" / "compare-tasks"
    rows = [run(binary, t, m, a.steps, folder) for t in tasks for m in mixers]
    write(rows, tasks, mixers, a.steps, ROOT / a.out)


if __name__ == "__main__":
    main()

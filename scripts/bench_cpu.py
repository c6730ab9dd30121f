#!/usr/bin/env python3
"""CPU training throughput of metamix against PyTorch eager, measured alternately in one run
(this machine is shared and noisy, and CPUs differ between machines: only the ratios mean
anything), and of the SSM, Mamba-2, linear attention and GLA models against the softmax model.

Usage: python3 scripts/bench_cpu.py [--rounds 3] [--out results/cpu_throughput]
Writes OUT.md and OUT.json: the CPU, its flags and cores, each figure's median over the
rounds, each ratio as the median of the rounds' ratios, the cores busy during the timed steps
(CPU time per second of them, every thread: 2.00 = two cores busy throughout; for metamix also
how much of that its pool threads spent spinning with no work), page faults of the whole
process (/usr/bin/time), and the ratios. Needs python with torch for the PyTorch side: $METAMIX_TORCH_PYTHON, the
venv of scripts/setup_libtorch.sh, or python3. The binary: $METAMIX_BIN or a release build.
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_PY = os.environ.get("METAMIX_TORCH_PYTHON") or next(
    (p for p in [pathlib.Path.home() / ".cache/metamix/torch/venv/bin/python"] if p.exists()), "python3")

# (name, metamix bench args, pytorch_bench.py args or None)
MODELS = [
    ("default (4 × 128, seq 64, batch 12)",
     ["recipes/shakespeare_char.toml", "--steps", "10"],
     ["--vocab", "83", "--d-model", "128", "--layers", "4", "--heads", "4", "--seq-len", "64",
      "--batch", "12", "--steps", "30", "--warmup", "10"]),
    ("nanoGPT 10.8 M (6 × 384, seq 256, batch 8)",
     ["recipes/nanogpt_shakespeare_char.toml", "--set", "model.dropout=0.0", "--steps", "4",
      "--warmup", "2"],
     ["--vocab", "83", "--steps", "8", "--warmup", "3"]),
    ("nanoGPT's model at seq 1024 (batch 2)",
     ["recipes/nanogpt_shakespeare_char.toml", "--set", "model.dropout=0.0", "--set",
      "training.seq_len=1024", "--set", "training.batch_size=2", "--steps", "4", "--warmup", "2"],
     ["--vocab", "83", "--seq-len", "1024", "--batch", "2", "--steps", "6", "--warmup", "2"]),
    ("nanoGPT as its recipe trains it (dropout 0.2)",
     ["recipes/nanogpt_shakespeare_char.toml", "--steps", "4", "--warmup", "2"],
     ["--vocab", "83", "--steps", "8", "--warmup", "3", "--dropout", "0.2"]),
    ("default in bf16 (autocast; seq 64)",
     ["recipes/shakespeare_char.toml", "--steps", "10", "--precision", "bf16"],
     ["--vocab", "83", "--d-model", "128", "--layers", "4", "--heads", "4", "--seq-len", "64",
      "--batch", "12", "--steps", "30", "--warmup", "10", "--precision", "bf16"]),
    ("nanoGPT in bf16 (autocast; dropout 0)",
     ["recipes/nanogpt_shakespeare_char.toml", "--set", "model.dropout=0.0", "--steps", "4",
      "--warmup", "2", "--precision", "bf16"],
     ["--vocab", "83", "--steps", "8", "--warmup", "3", "--precision", "bf16"]),
    ("ssm (Mamba, default size)", ["recipes/shakespeare_ssm.toml", "--steps", "10"], None),
    ("mamba2 (default size)", ["recipes/shakespeare_mamba2.toml", "--steps", "10"], None),
    ("linear attention (default size)", ["recipes/shakespeare_linear.toml", "--steps", "10"], None),
    ("gla (default size)", ["recipes/shakespeare_gla.toml", "--steps", "10"], None),
]
# A row's f32 model, for its last column: the default model unless named here.
F32_MODEL = {"nanoGPT in bf16 (autocast; dropout 0)": "nanoGPT 10.8 M (6 × 384, seq 256, batch 8)"}
TIME = ["/usr/bin/time", "-f", "TIME %P %R %S"]
# A row whose PyTorch run is skipped where PyTorch's bf16 autocast collapses on this CPU
# (no bf16 kernels: 61 tokens/s on nanoGPT's model on an AVX2 EPYC, minutes a round): its
# bf16 run of the default model, then f32's, and the fraction of f32 below which it skips.
TORCH_BF16_PROBE = {"nanoGPT in bf16 (autocast; dropout 0)":
                    ("default in bf16 (autocast; seq 64)", "default (4 × 128, seq 64, batch 12)", 0.25)}


def timed(cmd):
    out = subprocess.run(TIME + cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    cpu, faults, sys_s = re.search(r"TIME (\d+)% (\d+) ([\d.]+)", out.stderr).groups()
    return out.stdout, {"cpu_pct": int(cpu), "faults": int(faults), "sys_s": float(sys_s)}


def metamix(binary, args):
    text, usage = timed([str(binary), "bench"] + args)
    busy, waiting = re.search(r"([\d.]+) cores busy, ([\d.]+) of them waiting", text).groups()
    usage.update(step_cores=float(busy), waiting_cores=float(waiting))
    return float(re.search(r"([\d.]+) tokens/s \(", text).group(1)), usage


def pytorch(args):
    text, usage = timed([str(TORCH_PY), "scripts/pytorch_bench.py", "--json"] + args)
    out = json.loads(text.strip().splitlines()[-1])
    usage.update(step_cores=out["cpu_cores"])
    return out["tokens_per_s"], usage


def cpu_info():
    info = pathlib.Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*: (.*)", info).group(1)
    flags = set(re.search(r"flags\s*: (.*)", info).group(1).split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    return {"model": name, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="results/cpu_throughput")
    a = ap.parse_args()
    binary = metamix_build.binary()
    torch_version = subprocess.run([str(TORCH_PY), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or None
    runs = {name: {"metamix": [], "pytorch": [], "softmax beside": []} for name, _, _ in MODELS}
    skipped = {}

    def torch_bf16_collapsed(name):
        if name not in TORCH_BF16_PROBE:
            return False
        bf16, f32, fraction = TORCH_BF16_PROBE[name]
        ratio = runs[bf16]["pytorch"][0][0] / runs[f32]["pytorch"][0][0]
        if ratio < fraction:
            skipped[name] = (f"PyTorch not run: its bf16 autocast ran the default model at "
                             f"{ratio:.2f}× its f32 on this CPU (below {fraction}×: no bf16 kernels)")
        return name in skipped

    for r in range(a.rounds):
        for name, ours, theirs in MODELS:
            if theirs is None:
                # The softmax model again, right before: this model's ratio to it then spans
                # seconds, not the minutes since the round's first row (the machine drifts).
                runs[name]["softmax beside"].append(metamix(binary, MODELS[0][1]))
            runs[name]["metamix"].append(metamix(binary, ours))
            if theirs and torch_version and not torch_bf16_collapsed(name):
                runs[name]["pytorch"].append(pytorch(theirs))
            print(f"round {r + 1}: {name}: " + ", ".join(
                f"{k} {v[-1][0]:,.0f} tokens/s ({v[-1][1]['step_cores']:.2f} cores busy"
                + (f", {v[-1][1]['waiting_cores']:.2f} waiting)" if "waiting_cores" in v[-1][1] else ")") for k, v in runs[name].items() if v),
                flush=True)

    def summary(samples):
        if not samples:
            return None
        return {"tokens_per_s": statistics.median(s[0] for s in samples),
                "cpu_pct": statistics.median(s[1]["cpu_pct"] for s in samples),
                "step_cores": statistics.median(s[1]["step_cores"] for s in samples),
                "waiting_cores": (statistics.median(s[1]["waiting_cores"] for s in samples)
                                  if "waiting_cores" in samples[0][1] else None),
                "faults": statistics.median(s[1]["faults"] for s in samples),
                "all": [s[0] for s in samples]}

    def ratio(ours, theirs):
        # The median of each round's ratio: a round measures both back to back, so the
        # machine's drift between rounds (±20% here) cancels, where a ratio of medians keeps it.
        return round(statistics.median(a[0] / b[0] for a, b in zip(ours, theirs)), 3)

    result = {"cpu": cpu_info(), "torch": torch_version, "rounds": a.rounds, "models": {}}
    for name, _, _ in MODELS:
        ours, theirs = runs[name]["metamix"], runs[name]["pytorch"]
        beside = runs[name]["softmax beside"] or runs[F32_MODEL.get(name, MODELS[0][0])]["metamix"]
        result["models"][name] = {"metamix": summary(ours), "pytorch": summary(theirs),
                                  "ratio": theirs and ratio(ours, theirs),
                                  "to_default": ratio(ours, beside)}
    c = result["cpu"]
    lines = [
        f"CPU training throughput, f32 where a row does not say bf16, medians of {a.rounds} alternating rounds; each ratio "
        f"is the median of the rounds' ratios (a mixer's to the default model, to a run of "
        f"that model just before it; a bf16 row's to its f32 model) "
        f"(`python3 scripts/bench_cpu.py --rounds {a.rounds} --out {a.out}`): {c['model']}, {c['cores']} cores, flags "
        f"{', '.join(c['flags'])}; PyTorch {torch_version} eager (`scripts/pytorch_bench.py`).",
        "",
        "Cores busy: CPU time of every thread per second of the timed steps (spinning counts); "
        "for metamix, in brackets, how much of it its pool threads spent spinning with no work.",
        "",
        "| model | metamix tokens/s | cores busy (waiting) | page faults | PyTorch tokens/s | cores busy | metamix / PyTorch | / f32 model (default, or the row's own) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        m, p = r["metamix"], r["pytorch"]
        lines.append(
            f"| {name} | {m['tokens_per_s']:,.0f} | {m['step_cores']:.2f} ({m['waiting_cores']:.2f}) | "
            f"{m['faults']:,} | "
            + (f"{p['tokens_per_s']:,.0f} | {p['step_cores']:.2f} | {r['ratio']:.2f}× | " if p else "– | – | – | ")
            + (f"{r['to_default']:.2f}× |" if "seq 64" in name or "default size" in name
               or name in F32_MODEL else "– |"))
    if skipped:
        lines += [""] + [f"{name}: {why}." for name, why in skipped.items()]
    result["skipped"] = skipped
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

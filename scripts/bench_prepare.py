#!/usr/bin/env python3
"""`metamix prepare` and training from shards, measured against Python on this machine, in
one run (ratios mean something; absolute MB/s only on this CPU):

1. prepare throughput (MB/s, wall clock, reading + tokenising + writing) on the same
   --sample-mb JSONL file, every core: metamix `gpt2` vs OpenAI's `tiktoken` (its
   encode_ordinary_batch, the ranks read from tiktoken-rs's crate so nothing is
   downloaded), and metamix with a tokenizer.json vs Hugging Face `tokenizers`
   (encode_batch) on the same file;
2. peak RSS of prepare on a generated corpus of --corpus-gb;
3. training from that corpus: peak RSS and time from `train` start to the end of one step,
   next to the same from a 5 MB corpus.

Usage: python3 scripts/bench_prepare.py [--corpus-gb 1.0] [--sample-mb 100] [--keep]
Needs `pip install tiktoken tokenizers numpy`. The corpus is generated, seeded, from
data/shakespeare.txt into $TMPDIR (about --corpus-gb on disk, plus its prepared shards).
Writes results/prepare.md and results/prepare.json.
"""
import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

import metamix_build

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rss_run(cmd, **kw):
    """Run cmd; wall seconds, peak RSS in MiB (wait4 on the child), stdout."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err}")
    return wall, usage.ru_maxrss / 1024, out


def generate(path: pathlib.Path, mb: float, seed: int):
    """JSONL of documents: seeded slices (2-20 KB) of Shakespeare."""
    text = (ROOT / "data/shakespeare.txt").read_text()
    rng = random.Random(seed)
    written = 0
    with open(path, "w") as f:
        while written < mb * 1e6:
            n = rng.randrange(2000, 20000)
            o = rng.randrange(0, len(text) - n)
            line = json.dumps({"text": text[o:o + n]}) + "\n"
            f.write(line)
            written += len(line)


PY_TIKTOKEN = """
import json, sys, glob, os, numpy as np, tiktoken
from tiktoken.load import load_tiktoken_bpe
ranks = load_tiktoken_bpe(glob.glob(os.path.expanduser('~/.cargo/registry/src/*/tiktoken-rs-*/assets/r50k_base.tiktoken'))[0])
enc = tiktoken.Encoding('gpt2', pat_str=r"'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
                        mergeable_ranks=ranks, special_tokens={'<|endoftext|>': 50256})
texts = [json.loads(l)['text'] for l in open(sys.argv[1])]
ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())
out = np.concatenate([np.array(x + [50256], dtype=np.uint16) for x in ids])
out.tofile(sys.argv[2])
print(len(out))
"""

PY_TOKENIZERS = """
import json, sys, numpy as np
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[3])
texts = [json.loads(l)['text'] for l in open(sys.argv[1])]
ids = tok.encode_batch(texts, add_special_tokens=False)
out = np.concatenate([np.array(e.ids + [50256], dtype=np.uint16) for e in ids])
out.tofile(sys.argv[2])
print(len(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-gb", type=float, default=1.0)
    ap.add_argument("--sample-mb", type=float, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus")
    args = ap.parse_args()
    binary = str(metamix_build.binary())
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="metamix-prepare-bench-"))
    res = {"cores": os.cpu_count()}
    try:
        sample = tmp / "sample.jsonl"
        generate(sample, args.sample_mb, 1)
        mb = sample.stat().st_size / 1e6
        res["sample_mb"] = mb

        # 1. Throughput, same file, same cores.
        wall, rss, _ = rss_run([binary, "prepare", str(sample), "--tokenizer", "gpt2", "--out", str(tmp / "m_gpt2"), "--quiet"])
        res["metamix_gpt2_mb_s"] = mb / wall
        wall, rss, _ = rss_run([sys.executable, "-c", PY_TIKTOKEN, str(sample), str(tmp / "tiktoken.bin")])
        res["tiktoken_mb_s"] = mb / wall
        hf_json = tmp / "m_gpt2" / "tokenizer.json"  # GPT-2 as a Hugging Face tokenizer.json
        wall, rss, _ = rss_run([binary, "prepare", str(sample), "--tokenizer", str(hf_json), "--out", str(tmp / "m_hf"), "--quiet"])
        res["metamix_tokenizer_json_mb_s"] = mb / wall
        wall, rss, _ = rss_run([sys.executable, "-c", PY_TOKENIZERS, str(sample), str(tmp / "hf.bin"), str(hf_json)])
        res["tokenizers_mb_s"] = mb / wall
        # Same ids: metamix's shards (train+val) hold the same multiset of tokens as tiktoken's.
        meta = json.loads((tmp / "m_gpt2" / "meta.json").read_text())
        res["same_token_count"] = meta["tokens"]["train"] + meta["tokens"]["val"] == (tmp / "tiktoken.bin").stat().st_size // 2
        print(json.dumps(res), flush=True)

        # 2. Peak RSS of prepare on the big corpus.
        corpus = tmp / "corpus"
        corpus.mkdir()
        parts = max(1, round(args.corpus_gb * 1000 / 250))
        for i in range(parts):
            generate(corpus / f"part{i:03}.jsonl", args.corpus_gb * 1000 / parts, 100 + i)
        gb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e9
        wall, rss, _ = rss_run([binary, "prepare", str(corpus), "--tokenizer", "gpt2", "--out", str(tmp / "big"), "--quiet"])
        res.update(corpus_gb=gb, prepare_big_s=wall, prepare_big_mb_s=gb * 1000 / wall, prepare_big_peak_mib=rss)
        print(json.dumps(res), flush=True)

        # 3. Training from it vs from the 5 MB Shakespeare, one step and twenty.
        small = tmp / "small"
        subprocess.run([binary, "prepare", str(ROOT / "data/shakespeare.txt"), "--tokenizer", "gpt2", "--out", str(small), "--quiet"], check=True)
        for label, data in [("big", tmp / "big"), ("small", small)]:
            for steps in (1, 20):
                name = f"prepare-bench-{label}-{steps}"
                wall, rss, _ = rss_run([binary, "train", "recipes/shakespeare_gpt2.toml", "--quiet",
                                        "--set", f"data.path=\"{data}\"", "--set", "data.tokenizer=\"gpt2\"",
                                        "--set", f"name=\"{name}\"", "--set", f"checkpoint.folder=\"{tmp / 'runs'}\"",
                                        "--set", f"training.steps={steps}", "--set", "training.eval_batches=1",
                                        "--set", "lr_scheduler.warmup_steps=0", "--set", "metrics.tensorboard=false"], cwd=ROOT)
                res[f"train_{label}_{steps}_steps_s"] = wall
                res[f"train_{label}_{steps}_steps_peak_mib"] = rss
        print(json.dumps(res), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    out = ROOT / "results/prepare"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    r = res
    md = f"""`python3 scripts/bench_prepare.py --corpus-gb {args.corpus_gb} --sample-mb {args.sample_mb:.0f}` on {r['cores']} cores.

| prepare, {r['sample_mb']:.0f} MB JSONL (read + tokenise + write, wall) | MB/s | ratio |
|---|---|---|
| metamix `--tokenizer gpt2` (tiktoken-rs) | {r['metamix_gpt2_mb_s']:.1f} | {r['metamix_gpt2_mb_s'] / r['tiktoken_mb_s']:.2f}× tiktoken |
| Python `tiktoken` encode_ordinary_batch | {r['tiktoken_mb_s']:.1f} | 1 |
| metamix `--tokenizer tokenizer.json` (GPT-2's) | {r['metamix_tokenizer_json_mb_s']:.1f} | {r['metamix_tokenizer_json_mb_s'] / r['tokenizers_mb_s']:.2f}× tokenizers |
| Python `tokenizers` encode_batch | {r['tokenizers_mb_s']:.1f} | 1 |

| {r['corpus_gb']:.2f} GB corpus | |
|---|---|
| prepare (gpt2): wall, MB/s | {r['prepare_big_s']:.0f} s, {r['prepare_big_mb_s']:.1f} MB/s |
| prepare peak RSS | {r['prepare_big_peak_mib']:.0f} MiB |
| `train`, 1 step, start to exit: from it / from 5 MB | {r['train_big_1_steps_s']:.2f} s / {r['train_small_1_steps_s']:.2f} s |
| `train`, 20 steps, peak RSS: from it / from 5 MB | {r['train_big_20_steps_peak_mib']:.0f} / {r['train_small_20_steps_peak_mib']:.0f} MiB |
"""
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

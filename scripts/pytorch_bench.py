#!/usr/bin/env python3
"""Training throughput of recipes/nanogpt_shakespeare_char.toml's model in plain PyTorch eager:
the reference point for `metamix bench` (scripts/bench_train.sh).

The model mirrors metamix's defaults (src/model, src/mixers/softmax_attention.rs): learned
position embeddings, pre-norm GPT-2 blocks, LayerNorm and Linear with bias, separate q/k/v/out
projections, exact GELU MLP 4x, final LayerNorm, LM head tied to the token embedding. The step
is forward + cross-entropy + backward + grad-norm clip 1.0 + AdamW (lr 1e-3, betas 0.9/0.99,
decay 0.1 on Linear weights only), as metamix's train_step does. Dropout defaults to 0.0, as in
bench_train.sh (the recipe trains with 0.2). Batches are random tokens: no data loading.

Usage: python3 scripts/pytorch_bench.py --precision bf16 [--steps 30 --warmup 10 --json]
GPT-2 small on a GPU: --device cuda --vocab 50304 --d-model 768 --layers 12 --heads 12
    --seq-len 1024 --batch 8 --precision bf16 --peak-tflops 989
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, dropout, attn):
        super().__init__()
        self.heads, self.dropout, self.attn_kind = heads, dropout, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def attention(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        p = self.dropout if self.training else 0.0
        if self.attn_kind == "sdpa":  # nanoGPT's choice: fused (flash) attention
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # metamix's naive form: materialise the [t, t] scores
            s = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            y = F.dropout(s.masked_fill(mask, float("-inf")).softmax(-1), p, self.training) @ v
        return self.drop(self.o(y.transpose(1, 2).reshape(b, t, d)))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, seq_len, dropout, attn):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout, attn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for m in self.modules():  # GPT-2 init, as metamix's normal_linear
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for b in self.blocks:  # smaller init of the residual-stream writers
            for m in (b.o, b.fc2):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx, targets):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.tok.weight.t()  # tied head
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    # 83 = distinct characters of data/shakespeare.txt (metamix's corpus); nanoGPT's has 65.
    ap.add_argument("--vocab", type=int, default=83)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--attn", choices=["sdpa", "naive"], default="sdpa")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU, e.g. 989 (H100 bf16 dense)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    model = GPT(a.vocab, a.d_model, a.layers, a.heads, a.seq_len, a.dropout, a.attn).to(dev).train()
    decay, rest = [], []  # metamix decays Linear weights only: not norms, biases, embeddings
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 and not n.startswith(("tok.", "pos.")) else rest).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]
    # f16 needs loss scaling against gradient underflow; bf16 and f32 do not.
    scaler = torch.amp.GradScaler(a.device, enabled=a.precision == "f16")

    def step():
        idx = torch.randint(a.vocab, (a.batch, a.seq_len + 1), device=dev)
        with torch.autocast(a.device, dtype=dtype, enabled=dtype is not None):
            loss = model(idx[:, :-1], idx[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    # Every thread's CPU time over the timed steps, per second of them (metamix bench's
    # "cores busy"; OpenMP's threads spin between ops and count as busy, as metamix's do).
    cpu_cores = (time.process_time() - cpu_start) / elapsed
    tokens_per_s = a.batch * a.seq_len * a.steps / elapsed

    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    # nanoGPT's estimate_mfu: 6 FLOPs per non-position parameter per token, plus attention's
    # q·k and p·v matmuls (12·L·d·T forward+backward, not halved for the causal mask).
    flops_per_token = 6 * (n_params - model.pos.weight.numel()) + 12 * a.layers * a.d_model * a.seq_len
    tflops = flops_per_token * tokens_per_s / 1e12
    mfu = tflops / a.peak_tflops if a.peak_tflops else None
    result = {"impl": "pytorch", "precision": a.precision, "tokens_per_s": round(tokens_per_s, 1),
              "device": a.device, "threads": torch.get_num_threads(), "params": n_params,
              "tflops": round(tflops, 3), "mfu": mfu and round(mfu, 4), "torch": torch.__version__,
              "cpu_cores": round(cpu_cores, 2)}
    if a.json:
        print(json.dumps(result))
        return
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}: {n_params / 1e6:.2f}M params, {a.precision}, "
          f"batch {a.batch} x seq {a.seq_len}, attention {a.attn}, dropout {a.dropout}")
    print(f"{a.steps} steps after {a.warmup} warm-up: {elapsed / a.steps * 1e3:.1f} ms/step, "
          f"{tokens_per_s:,.0f} tokens/s, {tflops:.3f} TFLOP/s, CPU {cpu_cores:.2f} cores busy"
          + (f", MFU {mfu:.1%} of {a.peak_tflops} TFLOP/s" if mfu else "")
          + f", last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()

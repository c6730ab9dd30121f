#!/usr/bin/env python3
"""metamix's models in one PyTorch file: load an export folder (`metamix export runs/x --out
exports/x`) and run it — forward and greedy / top-k generation — for every mixer and option
metamix exports.

    python3 python/metamix_torch.py exports/x --prompt "ROMEO:" --max-new-tokens 200
    python3 python/metamix_torch.py exports/x --prompt "ROMEO:" --top-k 40 --temperature 0.8

    from metamix_torch import load
    model, tokenizer = load("exports/x")        # torch.nn.Module, tokenizers.Tokenizer (or None)
    logits = model(torch.tensor([[1, 2, 3]]))   # [batch, seq, vocab]

Everything here follows the export's config.json: `model` holds the recipe's keys, and
`conventions` the rules each part follows (this file is one reading of them). Each mixer is
written in its plainest form — a loop over time for the recurrent ones — to be read, not
to be fast. Needs: torch, safetensors; tokenizers for text in and out.
"""
import argparse
import json
import math
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


# --- the shared parts --------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight; never a bias."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg):
    if cfg["norm"] == "layer_norm":
        return nn.LayerNorm(cfg["d_model"], eps=cfg["norm_eps"], bias=cfg["bias"])
    return RMSNorm(cfg["d_model"], cfg["norm_eps"])


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "squared_relu": lambda x: F.relu(x) ** 2,
}


class MLP(nn.Module):
    """fc2(act(fc1(x))), or SwiGLU: fc2(silu(gate(x)) · fc1(x))."""

    def __init__(self, cfg):
        super().__init__()
        d, h, bias = cfg["d_model"], round(cfg["mlp_ratio"] * cfg["d_model"]), cfg["bias"]
        self.fc1, self.fc2 = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)
        self.swiglu = cfg["mlp"] == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(d, h, bias=bias)
        else:
            self.act = ACTIVATIONS[cfg["activation"]]

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.fc1(x) if self.swiglu else self.act(self.fc1(x))
        return self.fc2(h)


def heads(x, n):
    """[b, t, n·hd] → [b, n, t, hd]."""
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def merge(x):
    """[b, n, t, hd] → [b, t, n·hd]."""
    b, n, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, n * hd)


def rope(x, theta):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of [b, n, t, hd] by p·θ^(−2i/hd)."""
    t, hd = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(t, dtype=torch.float32)[:, None] * freq[None, :]  # [t, hd/2]
    cos, sin = angle.cos(), angle.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


def causal_conv(conv, u):
    """Depthwise causal conv of u [b, t, c]: left-padded, the first t outputs kept."""
    t = u.shape[1]
    return conv(u.transpose(1, 2))[..., :t].transpose(1, 2)


# --- the mixers --------------------------------------------------------------------------


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention, with grouped KV heads, RoPE and a sliding window."""

    def __init__(self, cfg, o):
        super().__init__()
        d, self.n, bias = cfg["d_model"], cfg["n_heads"], cfg["bias"]
        self.kv, self.hd = o["n_kv_heads"], d // self.n
        self.rotary, self.theta, self.window = o["rotary"], o["rope_theta"], o["window"]
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def heads(self, x):
        """The attention heads [b, n_heads, t, hd], before out_proj."""
        q, k, v = heads(self.q_proj(x), self.n), heads(self.k_proj(x), self.kv), heads(self.v_proj(x), self.kv)
        if self.rotary:
            q, k = rope(q, self.theta), rope(k, self.theta)
        group = self.n // self.kv  # query head i uses key/value head i // group
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        t = x.shape[1]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        hidden = j > i
        if self.window:
            hidden |= j <= i - self.window
        scores = (q @ k.transpose(-1, -2) / math.sqrt(self.hd)).masked_fill(hidden, float("-inf"))
        return scores.softmax(-1) @ v

    def forward(self, x):
        return self.out_proj(merge(self.heads(x)))


class LinearAttention(nn.Module):
    """S_t = g_t·S_(t−1) + φ(k_t) v_tᵀ, o_t = φ(q_t)ᵀ S_t [/ (φ(q_t)·z_t + 1e-6)]."""

    FEATURE_MAPS = {"elu_plus_one": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}

    def __init__(self, cfg, o):
        super().__init__()
        d, self.n, bias = cfg["d_model"], cfg["n_heads"], cfg["bias"]
        self.phi, self.normalize, self.decay = self.FEATURE_MAPS[o["feature_map"]], o["normalize"], o["decay"]
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        if self.decay == "gated":
            self.gate_proj = nn.Linear(d, self.n)  # always with a bias

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.phi(heads(self.q_proj(x), self.n)), self.phi(heads(self.k_proj(x), self.n)), heads(self.v_proj(x), self.n)
        if self.decay == "none":
            g = torch.ones(b, self.n, t)
        elif self.decay == "retnet":
            g = (1 - 2.0 ** (-5.0 - torch.arange(self.n, dtype=torch.float32)))[None, :, None].expand(b, self.n, t)
        else:
            g = torch.sigmoid(self.gate_proj(x)).pow(1 / 16).transpose(1, 2)  # [b, n, t]
        S = torch.zeros(b, self.n, q.shape[-1], v.shape[-1])
        z = torch.zeros(b, self.n, q.shape[-1])
        out = []
        for i in range(t):
            gi = g[:, :, i, None]
            S = S * gi[..., None] + k[:, :, i, :, None] * v[:, :, i, None, :]
            o = torch.einsum("bnd,bnde->bne", q[:, :, i], S)
            if self.normalize:
                z = z * gi + k[:, :, i]
                o = o / ((q[:, :, i] * z).sum(-1, keepdim=True) + 1e-6)
            out.append(o)
        return self.out_proj(merge(torch.stack(out, 2)))


class Mamba(nn.Module):
    """mamba_ssm's Mamba (S6) block: selective scan between a causal conv and a SiLU gate."""

    def __init__(self, cfg, o):
        super().__init__()
        d = cfg["d_model"]
        self.di, self.n, self.r = o["expand"] * d, o["d_state"], o["dt_rank"]
        self.in_proj = nn.Linear(d, 2 * self.di, bias=False)
        self.conv1d = nn.Conv1d(self.di, self.di, o["d_conv"], groups=self.di, padding=o["d_conv"] - 1)
        self.x_proj = nn.Linear(self.di, self.r + 2 * self.n, bias=False)
        self.dt_proj = nn.Linear(self.r, self.di)
        self.A_log = nn.Parameter(torch.zeros(self.di, self.n))
        self.D = nn.Parameter(torch.ones(self.di))
        self.out_proj = nn.Linear(self.di, d, bias=False)

    def forward(self, x):
        u, z = self.in_proj(x).split([self.di, self.di], -1)
        u = F.silu(causal_conv(self.conv1d, u))
        dt, B, C = self.x_proj(u).split([self.r, self.n, self.n], -1)
        delta = F.softplus(self.dt_proj(dt))  # [b, t, di]
        A = -torch.exp(self.A_log)  # [di, n]
        h = torch.zeros(x.shape[0], self.di, self.n)
        ys = []
        for i in range(x.shape[1]):
            h = torch.exp(delta[:, i, :, None] * A) * h + (delta[:, i] * u[:, i])[..., None] * B[:, i, None, :]
            ys.append((h * C[:, i, None, :]).sum(-1))
        y = torch.stack(ys, 1) + u * self.D
        return self.out_proj(y * F.silu(z))


class Mamba2(nn.Module):
    """mamba_ssm's Mamba2 (SSD) block: a scalar decay per head, grouped B and C, gated RMSNorm."""

    def __init__(self, cfg, o):
        super().__init__()
        d = cfg["d_model"]
        self.di, self.n, self.p, self.g = o["expand"] * d, o["d_state"], o["headdim"], o["ngroups"]
        self.h = self.di // self.p
        self.conv_dim = self.di + 2 * self.g * self.n
        self.in_proj = nn.Linear(d, self.di + self.conv_dim + self.h, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, o["d_conv"], groups=self.conv_dim, padding=o["d_conv"] - 1)
        self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.A_log = nn.Parameter(torch.zeros(self.h))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.di))
        self.out_proj = nn.Linear(self.di, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.di, self.conv_dim, self.h], -1)
        xbc = F.silu(causal_conv(self.conv1d, xbc))
        xs, B, C = xbc.split([self.di, self.g * self.n, self.g * self.n], -1)
        xs = xs.view(b, t, self.h, self.p)
        rep = self.h // self.g  # head i reads group i // rep
        B = B.view(b, t, self.g, self.n).repeat_interleave(rep, 2)
        C = C.view(b, t, self.g, self.n).repeat_interleave(rep, 2)
        delta = F.softplus(dt + self.dt_bias)  # [b, t, h]
        A = -torch.exp(self.A_log)
        state = torch.zeros(b, self.h, self.p, self.n)
        ys = []
        for i in range(t):
            decay = torch.exp(delta[:, i] * A)[..., None, None]
            state = decay * state + (delta[:, i, :, None] * xs[:, i])[..., None] * B[:, i, :, None, :]
            ys.append((state * C[:, i, :, None, :]).sum(-1) + self.D[:, None] * xs[:, i])
        y = torch.stack(ys, 1).reshape(b, t, self.di) * F.silu(z)
        groups = y.view(b, t, self.g, -1)
        y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(b, t, self.di)
        return self.out_proj(y * self.norm.weight)


class Pool(nn.Module):
    """PoolFormer, causal: the mean of the trailing pool_size tokens (fewer at the start) − x."""

    def __init__(self, cfg, o):
        super().__init__()
        self.k = o["pool_size"]

    def forward(self, x):
        t = x.shape[1]
        sums = F.pad(x.cumsum(1), (0, 0, 1, 0))  # sums[i] = x[0] + ... + x[i−1]
        end = torch.arange(1, t + 1)
        start = (end - self.k).clamp(min=0)
        counts = (end - start).to(x.dtype)[None, :, None]
        return (sums[:, end] - sums[:, start]) / counts - x


class MoH(nn.Module):
    """Mixture-of-head attention: shared and top-k routed heads, each scaled by a per-token gate."""

    def __init__(self, cfg, o):
        super().__init__()
        d, n = cfg["d_model"], cfg["n_heads"]
        self.shared, self.routed, self.top_k = o["shared_heads"], n - o["shared_heads"], o["top_k"]
        self.attention = SoftmaxAttention(cfg, o["attention"])
        if self.shared:
            self.shared_router = nn.Linear(d, self.shared, bias=False)
        if self.routed:
            self.routed_router = nn.Linear(d, self.routed, bias=False)
        if self.shared and self.routed:
            self.head_type_router = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        alpha = self.head_type_router(x).softmax(-1) if self.shared and self.routed else None
        gates = []
        if self.shared:
            g = self.shared_router(x).softmax(-1)
            gates.append(g * alpha[..., :1] if alpha is not None else g)
        if self.routed:
            p = self.routed_router(x).softmax(-1)
            kth = p.topk(min(self.top_k, self.routed), -1).values[..., -1:]
            g = p * (p >= kth)
            gates.append(g * alpha[..., 1:] if alpha is not None else g)
        gates = torch.cat(gates, -1).transpose(1, 2)[..., None]  # [b, n_heads, t, 1]
        return self.attention.out_proj(merge(self.attention.heads(x) * gates))


MIXERS = {
    "softmax": SoftmaxAttention,
    "linear": LinearAttention,
    "ssm": Mamba,
    "pool": Pool,
    "moh": MoH,
    "mamba2": Mamba2,
}


# --- the model ---------------------------------------------------------------------------


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


class Block(nn.Module):
    """x = x + ls1·mixer(norm1(x)); x = x + ls2·mlp(norm2(x))."""

    def __init__(self, cfg, mixer):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.mixer = MIXERS[mixer](cfg, cfg.get(mixer, {}))
        self.mlp = MLP(cfg)
        ls = (lambda: LayerScale(cfg["d_model"])) if cfg["layer_scale"] else nn.Identity
        self.layer_scale1, self.layer_scale2 = ls(), ls()

    def forward(self, x):
        x = x + self.layer_scale1(self.mixer(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class MetamixLM(nn.Module):
    def __init__(self, cfg, context=None):
        super().__init__()
        self.cfg, self.context = cfg, context
        d, v = cfg["d_model"], cfg["vocab_size"]
        self.token_embedding = nn.Embedding(v, d)
        if cfg["position"] == "learned":
            self.position_embedding = nn.Embedding(cfg["max_seq_len"], d)
        self.layers = nn.ModuleList(Block(cfg, m) for m in cfg["mixers"])
        self.final_norm = make_norm(cfg)
        if not cfg["tie_embeddings"]:
            self.lm_head = nn.Linear(d, v, bias=False)

    def forward(self, tokens):
        """tokens [b, t] → logits [b, t, vocab]."""
        x = self.token_embedding(tokens)
        if self.cfg["position"] == "learned":
            x = x + self.position_embedding(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        head = self.token_embedding.weight if self.cfg["tie_embeddings"] else self.lm_head.weight
        return x @ head.T

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, temperature=0.0, top_k=0, generator=None):
        """Continue `ids` (a list of token ids); greedy when temperature is 0. The context rule
        is `metamix sample`'s: the prompt keeps its last `context` tokens, and once `context`
        positions are filled, decoding restarts on the last context // 2 tokens."""
        ids = list(ids)
        n = self.context or float("inf")
        window = ids[-self.context:] if self.context else list(ids)
        for _ in range(max_new_tokens):
            logits = self(torch.tensor([window]))[0, -1]
            if top_k and top_k < logits.numel():
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = (logits / temperature).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(nxt)
            window = ids[-max(1, self.context // 2):] if len(window) >= n else window + [nxt]
        return ids


def load(folder):
    """An export folder → (MetamixLM in eval mode, tokenizers.Tokenizer or None)."""
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("architecture") != "metamix.MetaFormerLM":
        raise SystemExit(f"{folder}/config.json is not a metamix export (a --format hf folder loads with transformers)")
    if config.get("format_version") != 2:
        raise SystemExit(f"{folder}/config.json has format_version {config.get('format_version')}; this file reads 2")
    model = MetamixLM(config["model"], config["derived"]["context"])
    weights = load_file(str(folder / "model.safetensors"))
    # Checked here rather than by strict=True, for a message that names the folder.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{folder}: weights do not fit config.json: missing {missing}, unexpected {unexpected}")
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        try:
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except ImportError:
            pass
    return model.eval(), tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()
    model, tok = load(a.folder)
    if tok is None:
        raise SystemExit("needs the tokenizers package (pip install tokenizers) for text")
    ids = tok.encode(a.prompt, add_special_tokens=False).ids
    out = model.generate(ids, a.max_new_tokens, a.temperature, a.top_k, torch.Generator().manual_seed(a.seed))
    print(a.prompt + tok.decode(out[len(ids):]))


if __name__ == "__main__":
    main()

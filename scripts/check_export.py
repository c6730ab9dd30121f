#!/usr/bin/env python3
"""Rebuild an exported metamix model from its export folder and check it reproduces metamix's
own outputs: with numpy alone (this file's reimplementation, written from config.json), with
PyTorch (python/metamix_torch.py), or with Hugging Face transformers (a --format hf folder).

Usage: python3 scripts/check_export.py EXPORT_DIR EXPECTED.json [--impl numpy|torch|hf]

EXPECTED.json (written by the Rust test) holds `tokens` ([t] ints), `layer0` (the output of
block 0, [t][d]; numpy only), `logits` ([t][vocab]) and, for torch and hf, `greedy`:
{"prompt": [ids], "continuation": [ids]} from metamix's greedy decoding. Exit 0 when the
outputs match within 1e-4 and the continuations are equal, 1 otherwise.
Needs numpy and safetensors; torch for --impl torch; transformers too for --impl hf.
"""
import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file

_erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y + b if b is not None else y


def rms_norm(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def linear(W, prefix, x):
    """torch.nn.Linear: y = x @ W.T + b, W is [out, in]."""
    y = x @ W[prefix + ".weight"].T
    b = W.get(prefix + ".bias")
    return y + b if b is not None else y


def activation(name, x):
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "squared_relu":
        return np.maximum(x, 0.0) ** 2
    raise SystemExit(f"unknown activation {name}")


def norm(cfg, W, prefix, x):
    if cfg["norm"] == "layer_norm":
        return layer_norm(x, W[prefix + ".weight"], W.get(prefix + ".bias"), cfg["norm_eps"])
    return rms_norm(x, W[prefix + ".weight"], cfg["norm_eps"])


def rope(x, theta):
    """Rotary positions on [heads, t, hd], interleaved pairs (x[2i], x[2i+1]) rotated by
    position * theta^(-2i/hd), as LLaMA's original code and Burn's RotaryEncoding do."""
    _, t, hd = x.shape
    freq = theta ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    angle = np.arange(t)[:, None] * freq[None, :]  # [t, hd/2]
    cos, sin = np.cos(angle), np.sin(angle)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attention_heads(cfg, o, W, prefix, x):
    """Causal softmax attention heads [h, t, hd] before out_proj, with options `o`."""
    t, d = x.shape
    h = cfg["n_heads"]
    hd = d // h
    kvh = o["n_kv_heads"] or h
    heads = lambda y, n: y.reshape(t, n, hd).transpose(1, 0, 2)  # [n, t, hd]
    q = heads(linear(W, prefix + ".q_proj", x), h)
    k = heads(linear(W, prefix + ".k_proj", x), kvh)
    v = heads(linear(W, prefix + ".v_proj", x), kvh)
    if o["rotary"]:
        q, k = rope(q, o["rope_theta"]), rope(k, o["rope_theta"])
    # Grouped-query attention: query head i uses key/value head i // (h / kvh).
    k, v = np.repeat(k, h // kvh, axis=0), np.repeat(v, h // kvh, axis=0)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    hidden = j > i
    if o["window"]:
        hidden |= j <= i - o["window"]
    scores = np.where(hidden, -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    return p @ v


def softmax_mixer(cfg, W, prefix, x):
    heads = attention_heads(cfg, cfg["softmax"], W, prefix, x)
    return linear(W, prefix + ".out_proj", merge_heads(heads))


def split_heads(cfg, y):
    t, d = y.shape
    h = cfg["n_heads"]
    return y.reshape(t, h, d // h).transpose(1, 0, 2)  # [h, t, hd]


def merge_heads(y):
    h, t, hd = y.shape
    return y.transpose(1, 0, 2).reshape(t, h * hd)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax_last(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def linear_mixer(cfg, W, prefix, x):
    """Linear attention, recurrent form: S_t = g_t S_{t-1} + phi(k_t) v_t^T, o_t = phi(q_t)^T S_t."""
    o = cfg["linear"]
    t, _ = x.shape
    fm = {
        "elu_plus_one": lambda z: np.where(z > 0, z + 1.0, np.exp(np.minimum(z, 0.0))),
        "relu": lambda z: np.maximum(z, 0.0),
        "identity": lambda z: z,
    }[o["feature_map"]]
    q = fm(split_heads(cfg, linear(W, prefix + ".q_proj", x)))
    k = fm(split_heads(cfg, linear(W, prefix + ".k_proj", x)))
    v = split_heads(cfg, linear(W, prefix + ".v_proj", x))
    h, _, hd = q.shape
    if o["decay"] == "none":
        a = np.zeros((h, t))
    elif o["decay"] == "retnet":
        a = np.repeat(np.log(1.0 - 2.0 ** (-5.0 - np.arange(h)))[:, None], t, axis=1)
    else:  # gated: log sigmoid(gate_proj(x)) / 16
        a = (log_sigmoid(linear(W, prefix + ".gate_proj", x)) / 16.0).T
    S = np.zeros((h, hd, v.shape[2]))
    z = np.zeros((h, hd))
    outs = []
    for i in range(t):
        g = np.exp(a[:, i])
        S = S * g[:, None, None] + k[:, i, :, None] * v[:, i, None, :]
        oi = np.einsum("hd,hde->he", q[:, i], S)
        if o["normalize"]:
            z = z * g[:, None] + k[:, i]
            oi = oi / ((q[:, i] * z).sum(-1, keepdims=True) + 1e-6)
        outs.append(oi)
    return linear(W, prefix + ".out_proj", merge_heads(np.stack(outs, 1)))


def ssm_mixer(cfg, W, prefix, x):
    """Mamba (S6): in_proj, causal depthwise conv + SiLU, x_proj, dt_proj + softplus, scan, gate."""
    o = cfg["ssm"]
    t, d = x.shape
    di = o["expand"] * d
    n = o["d_state"]
    r = o["dt_rank"]
    xz = linear(W, prefix + ".in_proj", x)
    u, zg = xz[:, :di], xz[:, di:]
    w = W[prefix + ".conv1d.weight"][:, 0, :]  # [di, kernel]
    kernel = w.shape[1]
    up = np.concatenate([np.zeros((kernel - 1, di)), u], 0)
    u = silu(W[prefix + ".conv1d.bias"] + sum(up[i : i + t] * w[:, i] for i in range(kernel)))
    dbc = linear(W, prefix + ".x_proj", u)
    dt, B, C = dbc[:, :r], dbc[:, r : r + n], dbc[:, r + n :]
    delta = softplus(linear(W, prefix + ".dt_proj", dt))
    A = -np.exp(W[prefix + ".A_log"])
    h = np.zeros((di, n))
    ys = []
    for i in range(t):
        h = np.exp(delta[i][:, None] * A) * h + (delta[i] * u[i])[:, None] * B[i][None, :]
        ys.append(h @ C[i])
    y = (np.stack(ys) + u * W[prefix + ".D"]) * silu(zg)
    return linear(W, prefix + ".out_proj", y)


def mamba2_mixer(cfg, W, prefix, x):
    """Mamba-2 (SSD): in_proj -> [z | xBC | dt], causal depthwise conv + SiLU over xBC, a scalar
    decay per head, h = exp(dt A) h + dt x B^T, y = h C + D x, gated RMSNorm, out_proj."""
    o = cfg["mamba2"]
    t, d = x.shape
    di, n, p, g = o["expand"] * d, o["d_state"], o["headdim"], o["ngroups"]
    h = di // p
    conv_dim = di + 2 * g * n
    zxbcdt = linear(W, prefix + ".in_proj", x)
    z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di : di + conv_dim], zxbcdt[:, di + conv_dim :]
    w = W[prefix + ".conv1d.weight"][:, 0, :]  # [conv_dim, kernel]
    kernel = w.shape[1]
    xp = np.concatenate([np.zeros((kernel - 1, conv_dim)), xbc], 0)
    xbc = silu(W[prefix + ".conv1d.bias"] + sum(xp[i : i + t] * w[:, i] for i in range(kernel)))
    xs = xbc[:, :di].reshape(t, h, p)
    B = xbc[:, di : di + g * n].reshape(t, g, n).repeat(h // g, axis=1)  # head i reads group i // (h/g)
    C = xbc[:, di + g * n :].reshape(t, g, n).repeat(h // g, axis=1)
    delta = softplus(dt + W[prefix + ".dt_bias"])  # [t, h]
    A = -np.exp(W[prefix + ".A_log"])  # [h]
    state = np.zeros((h, p, n))
    ys = []
    for i in range(t):
        state = np.exp(delta[i] * A)[:, None, None] * state + (delta[i][:, None] * xs[i])[:, :, None] * B[i][:, None, :]
        ys.append((state * C[i][:, None, :]).sum(-1) + W[prefix + ".D"][:, None] * xs[i])
    y = np.stack(ys).reshape(t, di) * silu(z)
    groups = y.reshape(t, g, di // g)
    y = (groups / np.sqrt((groups**2).mean(-1, keepdims=True) + 1e-5)).reshape(t, di) * W[prefix + ".norm.weight"]
    return linear(W, prefix + ".out_proj", y)


def pool_mixer(cfg, W, prefix, x):
    """PoolFormer, causal: mean of the trailing window (padding not counted) minus x."""
    k = cfg["pool"]["pool_size"]
    means = np.stack([x[max(0, i + 1 - k) : i + 1].mean(0) for i in range(len(x))])
    return means - x


def moh_mixer(cfg, W, prefix, x):
    """Mixture-of-head attention: per-token two-stage head gates on causal softmax attention."""
    o = cfg["moh"]
    h = cfg["n_heads"]
    heads = attention_heads(cfg, o["attention"], W, prefix + ".attention", x)  # [h, t, hd]
    shared, routed = o["shared_heads"], h - o["shared_heads"]
    alpha = softmax_last(linear(W, prefix + ".head_type_router", x)) if shared and routed else None
    parts = []
    if shared:
        g = softmax_last(linear(W, prefix + ".shared_router", x))
        parts.append(g * alpha[:, :1] if alpha is not None else g)
    if routed:
        p = softmax_last(linear(W, prefix + ".routed_router", x))
        kth = np.sort(p, -1)[:, -min(o["top_k"], routed)][:, None]
        g = p * (p >= kth)
        parts.append(g * alpha[:, 1:2] if alpha is not None else g)
    gates = np.concatenate(parts, 1).T[:, :, None]  # [h, t, 1]
    return linear(W, prefix + ".attention.out_proj", merge_heads(heads * gates))


MIXERS = {
    "softmax": softmax_mixer,
    "linear": linear_mixer,
    "ssm": ssm_mixer,
    "pool": pool_mixer,
    "moh": moh_mixer,
    "mamba2": mamba2_mixer,
}


def block(cfg, W, i, x):
    p = f"layers.{i}"
    ls = lambda name, y: y * W[f"{p}.{name}.scale"] if cfg["layer_scale"] else y
    mixer = MIXERS[cfg["mixers"][i]]
    x = x + ls("layer_scale1", mixer(cfg, W, p + ".mixer", norm(cfg, W, p + ".norm1", x)))
    h = norm(cfg, W, p + ".norm2", x)
    if cfg["mlp"] == "swiglu":
        h = activation("silu", linear(W, p + ".mlp.gate", h)) * linear(W, p + ".mlp.fc1", h)
    else:
        h = activation(cfg["activation"], linear(W, p + ".mlp.fc1", h))
    h = linear(W, p + ".mlp.fc2", h)
    return x + ls("layer_scale2", h)


def forward(cfg, W, tokens):
    x = W["token_embedding.weight"][tokens]
    if cfg["position"] == "learned":
        x = x + W["position_embedding.weight"][: len(tokens)]
    layer0 = None
    for i in range(cfg["n_layers"]):
        x = block(cfg, W, i, x)
        if i == 0:
            layer0 = x
    x = norm(cfg, W, "final_norm", x)
    head = W["token_embedding.weight"] if cfg["tie_embeddings"] else W["lm_head.weight"]
    return layer0, x @ head.T


def compare(pairs):
    ok = True
    for name, ours, theirs in pairs:
        err = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.array(theirs, dtype=np.float64))))
        print(f"{name}: max abs difference {err:.2e}")
        ok &= err < 1e-4
    return ok


def check_numpy(folder, exp):
    cfg = json.loads((folder / "config.json").read_text())["model"]
    W = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    layer0, logits = forward(cfg, W, np.array(exp["tokens"], dtype=np.int64))
    return compare([("layer0", layer0, exp["layer0"]), ("logits", logits, exp["logits"])])


def check_greedy(name, ours, exp):
    want = exp["greedy"]["continuation"]
    print(f"{name} greedy continuation: " + ("same" if ours == want else f"DIFFERENT: {ours} vs {want}"))
    return ours == want


def check_torch(folder, exp):
    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "python"))
    from metamix_torch import load

    model, _ = load(folder)
    with torch.no_grad():
        logits = model(torch.tensor([exp["tokens"]]))[0]
    ok = compare([("logits", logits.numpy(), exp["logits"])])
    prompt, want = exp["greedy"]["prompt"], exp["greedy"]["continuation"]
    out = model.generate(prompt, len(want))[len(prompt):]
    return check_greedy("metamix_torch", out, exp) and ok


def check_hf(folder, exp):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    print(f"loaded {type(model).__name__}")
    with torch.no_grad():
        logits = model(torch.tensor([exp["tokens"]])).logits[0]
        prompt, want = exp["greedy"]["prompt"], exp["greedy"]["continuation"]
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=len(want), min_new_tokens=len(want),
            do_sample=False, pad_token_id=0,
        )[0, len(prompt):].tolist()
    ok = compare([("logits", logits.numpy(), exp["logits"])])
    return check_greedy("transformers", out, exp) and ok


def main() -> int:
    args = sys.argv[1:]
    impl = "numpy"
    if "--impl" in args:
        i = args.index("--impl")
        impl = args[i + 1]
        del args[i : i + 2]
    folder, expected = pathlib.Path(args[0]), json.loads(pathlib.Path(args[1]).read_text())
    ok = {"numpy": check_numpy, "torch": check_torch, "hf": check_hf}[impl](folder, expected)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

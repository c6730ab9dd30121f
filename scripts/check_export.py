#!/usr/bin/env python3
"""Rebuild an exported metamix model from model.safetensors + config.json with numpy alone,
and check it reproduces metamix's own outputs.

Usage: python3 scripts/check_export.py EXPORT.safetensors EXPECTED.json

EXPECTED.json (written by the Rust test) holds `tokens` ([t] ints), `layer0` (the output of
block 0, [t][d]) and `logits` ([t][vocab]). Exit 0 when both match within 1e-4, 1 otherwise.
Needs: numpy, safetensors (pip install numpy safetensors).
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


def softmax_mixer(cfg, W, prefix, x):
    t, d = x.shape
    h = cfg["n_heads"]
    hd = d // h
    split = lambda y: y.reshape(t, h, hd).transpose(1, 0, 2)  # [h, t, hd]
    q = split(linear(W, prefix + ".q_proj", x))
    k = split(linear(W, prefix + ".k_proj", x))
    v = split(linear(W, prefix + ".v_proj", x))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    scores = np.where(np.triu(np.ones((t, t), dtype=bool), 1), -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    y = (p @ v).transpose(1, 0, 2).reshape(t, d)
    return linear(W, prefix + ".out_proj", y)


MIXERS = {"softmax": softmax_mixer}


def block(cfg, W, i, x):
    p = f"layers.{i}"
    ls = lambda name, y: y * W[f"{p}.{name}.scale"] if cfg["layer_scale"] else y
    mixer = MIXERS[cfg["mixers"][i]]
    x = x + ls("layer_scale1", mixer(cfg, W, p + ".mixer", norm(cfg, W, p + ".norm1", x)))
    h = norm(cfg, W, p + ".norm2", x)
    h = linear(W, p + ".mlp.fc2", activation(cfg["activation"], linear(W, p + ".mlp.fc1", h)))
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


def main() -> int:
    weights_path, expected_path = map(pathlib.Path, sys.argv[1:3])
    cfg = json.loads((weights_path.parent / "config.json").read_text())
    W = {k: v.astype(np.float64) for k, v in load_file(str(weights_path)).items()}
    exp = json.loads(expected_path.read_text())
    tokens = np.array(exp["tokens"], dtype=np.int64)
    layer0, logits = forward(cfg, W, tokens)
    ok = True
    for name, ours, theirs in [("layer0", layer0, exp["layer0"]), ("logits", logits, exp["logits"])]:
        err = float(np.max(np.abs(ours - np.array(theirs, dtype=np.float64))))
        print(f"{name}: max abs difference {err:.2e}")
        ok &= err < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

//! `--format hf`: the models that are exactly a `transformers` class, both ways.
//! - softmax attention, learned positions, LayerNorm, the standard MLP → `GPT2LMHeadModel`
//!   (Conv1D weights are `[in, out]`, q, k and v fused in `c_attn`);
//! - softmax attention with RoPE, RMSNorm, SwiGLU (and GQA) → `LlamaForCausalLM` (q_proj
//!   and k_proj rows permuted per head: metamix rotates interleaved pairs, `rotate_half`
//!   pairs x[i] with x[i + head_dim/2]).
//!
//! Anything else is refused, naming the option that does not map.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::tensors::{Tensor, Tensors};
use crate::mixers::MixerKind;
use crate::model::{Activation, LanguageModelConfig, MlpKind, NormKind, PositionKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    Gpt2,
    Llama,
}

impl HfArch {
    pub fn class(self) -> &'static str {
        match self {
            HfArch::Gpt2 => "GPT2LMHeadModel",
            HfArch::Llama => "LlamaForCausalLM",
        }
    }
}

/// The `transformers` class this model is exactly, or why none is (naming the option).
pub fn architecture(c: &LanguageModelConfig) -> anyhow::Result<HfArch> {
    let m = &c.model;
    if let Some((i, k)) = c
        .mixers
        .iter()
        .enumerate()
        .find(|(_, k)| **k != MixerKind::Softmax)
    {
        bail!(
            "--format hf: layer {i} has mixer {k}; only softmax attention maps onto a \
             transformers class (GPT2LMHeadModel, LlamaForCausalLM); export it without --format"
        );
    }
    let refuse = |key: &str, why: &str| -> anyhow::Result<HfArch> {
        bail!("--format hf: {key} {why}; export it without --format")
    };
    let o = &m.mixer_options.softmax;
    if m.layer_scale_init.is_some() {
        return refuse(
            "model.layer_scale_init",
            "(layer scale) has no GPT-2 or Llama form",
        );
    }
    if o.window > 0 {
        return refuse(
            "model.softmax.window",
            "(a sliding window) has no GPT-2 or Llama form",
        );
    }
    match m.position {
        PositionKind::Learned => {
            if o.rotary {
                return refuse(
                    "model.softmax.rotary",
                    "with learned positions is neither GPT-2 nor Llama",
                );
            }
            if m.norm != NormKind::LayerNorm {
                return refuse(
                    "model.norm",
                    "must be layer_norm for GPT-2 (learned positions)",
                );
            }
            if m.mlp != MlpKind::Standard {
                return refuse(
                    "model.mlp",
                    "must be standard for GPT-2 (learned positions)",
                );
            }
            if o.kv_heads(m.n_heads) != m.n_heads {
                return refuse(
                    "model.softmax.n_kv_heads",
                    "(grouped-query attention) has no GPT-2 form",
                );
            }
            Ok(HfArch::Gpt2)
        }
        PositionKind::None => {
            if !o.rotary {
                return refuse(
                    "model.position",
                    "= none without model.softmax.rotary has no positions GPT-2 or Llama would use",
                );
            }
            if m.norm != NormKind::RmsNorm {
                return refuse(
                    "model.norm",
                    "must be rms_norm for Llama (rotary positions)",
                );
            }
            if m.mlp != MlpKind::Swiglu {
                return refuse("model.mlp", "must be swiglu for Llama (rotary positions)");
            }
            Ok(HfArch::Llama)
        }
    }
}

/// GPT-2's `activation_function` for ours.
fn gpt2_activation(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Relu => "relu",
        Activation::Silu => "silu",
        Activation::SquaredRelu => "relu2",
    }
}

/// The `config.json` `transformers` reads.
pub fn config(c: &LanguageModelConfig, arch: HfArch, eot: Option<u32>) -> Value {
    let m = &c.model;
    let mut v = match arch {
        HfArch::Gpt2 => json!({
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.max_seq_len,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.mlp_hidden(),
            "activation_function": gpt2_activation(m.activation),
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "scale_attn_weights": true,
        }),
        HfArch::Llama => {
            let o = &m.mixer_options.softmax;
            json!({
                "model_type": "llama",
                "vocab_size": c.vocab_size,
                "hidden_size": m.d_model,
                "intermediate_size": m.mlp_hidden(),
                "num_hidden_layers": m.n_layers,
                "num_attention_heads": m.n_heads,
                "num_key_value_heads": o.kv_heads(m.n_heads),
                "head_dim": m.d_model / m.n_heads,
                "hidden_act": "silu",
                "max_position_embeddings": c.max_seq_len,
                "rms_norm_eps": m.norm_eps,
                "rope_theta": o.rope_theta,
                "rope_scaling": null,
                "attention_bias": m.bias,
                "mlp_bias": m.bias,
                "attention_dropout": m.dropout,
            })
        }
    };
    let obj = v.as_object_mut().expect("an object");
    obj.insert("architectures".into(), json!([arch.class()]));
    obj.insert("tie_word_embeddings".into(), json!(m.tie_embeddings));
    obj.insert("initializer_range".into(), json!(m.init_std));
    obj.insert("torch_dtype".into(), json!("float32"));
    obj.insert("use_cache".into(), json!(true));
    obj.insert("bos_token_id".into(), json!(eot));
    obj.insert("eos_token_id".into(), json!(eot));
    v
}

/// Rows of a `[n_heads·hd, ..]` projection reordered per head from interleaved RoPE pairs
/// (2i, 2i+1) to halves (i, i + hd/2); `inverse` undoes it.
fn rope_rows(t: &Tensor, n_heads: usize, inverse: bool) -> Tensor {
    let hd = t.shape[0] / n_heads;
    let mut order = Vec::with_capacity(t.shape[0]);
    for h in 0..n_heads {
        for r in 0..hd {
            // Half-split row r holds interleaved row `to_interleaved(r)`.
            let interleaved = if r < hd / 2 {
                2 * r
            } else {
                2 * (r - hd / 2) + 1
            };
            order.push(
                h * hd
                    + if inverse {
                        half_split(r, hd)
                    } else {
                        interleaved
                    },
            );
        }
    }
    t.gather_rows(&order)
}

/// Where interleaved row `r` sits in the half-split order.
fn half_split(r: usize, hd: usize) -> usize {
    if r.is_multiple_of(2) {
        r / 2
    } else {
        hd / 2 + r / 2
    }
}

/// Take `name` out of `w`, with a clear error when it is not there.
fn take(w: &mut Tensors, name: &str, origin: &str) -> anyhow::Result<Tensor> {
    w.remove(name)
        .with_context(|| format!("{origin}: no tensor `{name}`"))
}

/// metamix tensors (PyTorch layout, as `weights` writes them) → the class's tensors.
pub fn to_hf(c: &LanguageModelConfig, arch: HfArch, mut w: Tensors) -> anyhow::Result<Tensors> {
    let m = &c.model;
    let d = m.d_model;
    let origin = "the model";
    let mut out = Tensors::new();
    let mut put = |name: String, t: Tensor| {
        out.insert(name, t);
    };
    // A bias the model does not have is zero in formats that always carry one.
    let bias_or_zero = |w: &mut Tensors, name: &str, n: usize| {
        w.remove(name).unwrap_or_else(|| Tensor::zeros(vec![n]))
    };
    match arch {
        HfArch::Gpt2 => {
            let p = "transformer";
            put(
                format!("{p}.wte.weight"),
                take(&mut w, "token_embedding.weight", origin)?,
            );
            put(
                format!("{p}.wpe.weight"),
                take(&mut w, "position_embedding.weight", origin)?,
            );
            for i in 0..m.n_layers {
                let (l, h) = (format!("layers.{i}"), format!("{p}.h.{i}"));
                for (ours, theirs) in [("norm1", "ln_1"), ("norm2", "ln_2")] {
                    put(
                        format!("{h}.{theirs}.weight"),
                        take(&mut w, &format!("{l}.{ours}.weight"), origin)?,
                    );
                    put(
                        format!("{h}.{theirs}.bias"),
                        bias_or_zero(&mut w, &format!("{l}.{ours}.bias"), d),
                    );
                }
                let q = take(&mut w, &format!("{l}.mixer.q_proj.weight"), origin)?;
                let k = take(&mut w, &format!("{l}.mixer.k_proj.weight"), origin)?;
                let v = take(&mut w, &format!("{l}.mixer.v_proj.weight"), origin)?;
                put(
                    format!("{h}.attn.c_attn.weight"),
                    Tensor::cat_rows(&[&q, &k, &v]).transposed(),
                );
                let qb = bias_or_zero(&mut w, &format!("{l}.mixer.q_proj.bias"), d);
                let kb = bias_or_zero(&mut w, &format!("{l}.mixer.k_proj.bias"), d);
                let vb = bias_or_zero(&mut w, &format!("{l}.mixer.v_proj.bias"), d);
                put(
                    format!("{h}.attn.c_attn.bias"),
                    Tensor::cat_rows(&[&qb, &kb, &vb]),
                );
                for (ours, theirs, n) in [
                    ("mixer.out_proj", "attn.c_proj", d),
                    ("mlp.fc1", "mlp.c_fc", m.mlp_hidden()),
                    ("mlp.fc2", "mlp.c_proj", d),
                ] {
                    put(
                        format!("{h}.{theirs}.weight"),
                        take(&mut w, &format!("{l}.{ours}.weight"), origin)?.transposed(),
                    );
                    put(
                        format!("{h}.{theirs}.bias"),
                        bias_or_zero(&mut w, &format!("{l}.{ours}.bias"), n),
                    );
                }
            }
            put(
                format!("{p}.ln_f.weight"),
                take(&mut w, "final_norm.weight", origin)?,
            );
            put(
                format!("{p}.ln_f.bias"),
                bias_or_zero(&mut w, "final_norm.bias", d),
            );
        }
        HfArch::Llama => {
            let kv = m.mixer_options.softmax.kv_heads(m.n_heads);
            put(
                "model.embed_tokens.weight".into(),
                take(&mut w, "token_embedding.weight", origin)?,
            );
            for i in 0..m.n_layers {
                let (l, h) = (format!("layers.{i}"), format!("model.layers.{i}"));
                let mut rename = |w: &mut Tensors,
                                  ours: &str,
                                  theirs: &str,
                                  rope_heads: Option<usize>|
                 -> anyhow::Result<()> {
                    for suffix in ["weight", "bias"] {
                        if let Some(t) = w.remove(&format!("{l}.{ours}.{suffix}")) {
                            let t = match rope_heads {
                                Some(n) => rope_rows(&t, n, false),
                                None => t,
                            };
                            put(format!("{h}.{theirs}.{suffix}"), t);
                        } else if suffix == "weight" {
                            bail!("{origin}: no tensor `{l}.{ours}.weight`");
                        }
                    }
                    Ok(())
                };
                rename(&mut w, "norm1", "input_layernorm", None)?;
                rename(&mut w, "mixer.q_proj", "self_attn.q_proj", Some(m.n_heads))?;
                rename(&mut w, "mixer.k_proj", "self_attn.k_proj", Some(kv))?;
                rename(&mut w, "mixer.v_proj", "self_attn.v_proj", None)?;
                rename(&mut w, "mixer.out_proj", "self_attn.o_proj", None)?;
                rename(&mut w, "norm2", "post_attention_layernorm", None)?;
                rename(&mut w, "mlp.gate", "mlp.gate_proj", None)?;
                rename(&mut w, "mlp.fc1", "mlp.up_proj", None)?;
                rename(&mut w, "mlp.fc2", "mlp.down_proj", None)?;
            }
            put(
                "model.norm.weight".into(),
                take(&mut w, "final_norm.weight", origin)?,
            );
        }
    }
    if let Some(head) = w.remove("lm_head.weight") {
        put("lm_head.weight".into(), head);
    }
    if let Some(left) = w.keys().next() {
        bail!(
            "--format hf: tensor `{left}` has no place in {}",
            arch.class()
        );
    }
    Ok(out)
}

/// Whether a field's value is one metamix cannot honour.
type Refused = fn(&Value) -> bool;

/// A Hugging Face `config.json`'s class, if it is one metamix reads.
pub fn detect(config: &Value, origin: &str) -> anyhow::Result<HfArch> {
    match config.get("model_type").and_then(Value::as_str) {
        Some("gpt2") => Ok(HfArch::Gpt2),
        Some("llama") => Ok(HfArch::Llama),
        Some(other) => bail!(
            "{origin}: model_type \"{other}\" cannot be read; metamix reads gpt2 and llama \
             folders (and its own exports)"
        ),
        None => bail!(
            "{origin}: no model_type; metamix reads gpt2 and llama folders (and its own exports)"
        ),
    }
}

/// Check a Hugging Face config against the model a recipe builds: each field metamix
/// honours must agree with the recipe (the error names both and the `--set` that fixes
/// it), and fields metamix cannot honour are refused by name.
pub fn check_config(
    config: &Value,
    arch: HfArch,
    c: &LanguageModelConfig,
    origin: &str,
) -> anyhow::Result<()> {
    let m = &c.model;
    let get = |k: &str| config.get(k).filter(|v| !v.is_null());
    let vocab = "the vocabulary size (model.vocab_size or the tokenizer's)";
    let hidden = "model.mlp_ratio · d_model";
    // (their field, our key, our value)
    let fields: Vec<(&str, &str, Value)> = match arch {
        HfArch::Gpt2 => vec![
            ("n_embd", "model.d_model", json!(m.d_model)),
            ("n_layer", "model.n_layers", json!(m.n_layers)),
            ("n_head", "model.n_heads", json!(m.n_heads)),
            ("vocab_size", vocab, json!(c.vocab_size)),
            ("n_positions", "model.max_seq_len", json!(c.max_seq_len)),
            ("layer_norm_epsilon", "model.norm_eps", json!(m.norm_eps)),
            ("n_inner", hidden, json!(m.mlp_hidden())),
            (
                "activation_function",
                "model.activation",
                json!(gpt2_activation(m.activation)),
            ),
            (
                "tie_word_embeddings",
                "model.tie_embeddings",
                json!(m.tie_embeddings),
            ),
        ],
        HfArch::Llama => {
            let o = &m.mixer_options.softmax;
            vec![
                ("hidden_size", "model.d_model", json!(m.d_model)),
                ("num_hidden_layers", "model.n_layers", json!(m.n_layers)),
                ("num_attention_heads", "model.n_heads", json!(m.n_heads)),
                (
                    "num_key_value_heads",
                    "model.softmax.n_kv_heads",
                    json!(o.kv_heads(m.n_heads)),
                ),
                (
                    "head_dim",
                    "model.d_model / model.n_heads",
                    json!(m.d_model / m.n_heads),
                ),
                ("intermediate_size", hidden, json!(m.mlp_hidden())),
                ("vocab_size", vocab, json!(c.vocab_size)),
                (
                    "max_position_embeddings",
                    "model.max_seq_len",
                    json!(c.max_seq_len),
                ),
                ("rms_norm_eps", "model.norm_eps", json!(m.norm_eps)),
                (
                    "rope_theta",
                    "model.softmax.rope_theta",
                    json!(o.rope_theta),
                ),
                ("attention_bias", "model.bias", json!(m.bias)),
                ("mlp_bias", "model.bias", json!(m.bias)),
                (
                    "tie_word_embeddings",
                    "model.tie_embeddings",
                    json!(m.tie_embeddings),
                ),
            ]
        }
    };
    // transformers 5 keeps θ in `rope_parameters`, 4 at the top level.
    let value = |field: &str| {
        get(field).or_else(|| {
            (field == "rope_theta")
                .then(|| get("rope_parameters").and_then(|p| p.get("rope_theta")))
                .flatten()
        })
    };
    let mut problems = Vec::new();
    for (field, key, ours) in fields {
        let same = match (value(field), &ours) {
            (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Some(a), b) => a == b,
            // Absent: transformers' default, which the tensors' shapes settle.
            (None, _) => true,
        };
        if !same {
            let theirs = value(field).cloned().unwrap_or(Value::Null);
            problems.push(format!(
                "{field} = {theirs} needs {key} = {theirs} (this recipe: {ours})"
            ));
        }
    }
    let mut refuse = Vec::new();
    if let Err(e) = architecture(c).and_then(|a| match a == arch {
        true => Ok(()),
        false => bail!("it maps onto {}", a.class()),
    }) {
        refuse.push(format!("this recipe is not {}'s shape: {e}", arch.class()));
    }
    let unscaled = |p: &Value| {
        p.get("rope_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "default")
    };
    let cannot: Vec<(&str, Refused, &str)> = match arch {
        HfArch::Gpt2 => vec![
            (
                "scale_attn_by_inverse_layer_idx",
                |v| v == &json!(true),
                "scores are scaled by 1/√head_dim only",
            ),
            (
                "scale_attn_weights",
                |v| v == &json!(false),
                "scores are scaled by 1/√head_dim",
            ),
            (
                "add_cross_attention",
                |v| v == &json!(true),
                "there is no encoder to attend to",
            ),
        ],
        HfArch::Llama => vec![
            (
                "hidden_act",
                |v| v.as_str() != Some("silu"),
                "metamix's swiglu gate is silu",
            ),
            ("rope_scaling", |_| true, "metamix's RoPE is unscaled"),
            ("rope_parameters", unscaled, "metamix's RoPE is unscaled"),
        ],
    };
    for (field, bad, why) in cannot {
        if let Some(v) = get(field).filter(|v| bad(v)) {
            refuse.push(format!("{field} = {v} ({why})"));
        }
    }
    if !refuse.is_empty() {
        bail!(
            "{origin}: fields metamix cannot honour: {}",
            refuse.join("; ")
        );
    }
    if !problems.is_empty() {
        bail!(
            "{origin} describes another model than this recipe: {}; set those keys in the \
             recipe (or --set KEY=VALUE) to load it",
            problems.join("; ")
        );
    }
    Ok(())
}

/// The class's tensors → metamix's (PyTorch layout). Biases the recipe has none of must be
/// zero there, or they would be lost.
pub fn from_hf(
    c: &LanguageModelConfig,
    arch: HfArch,
    mut w: Tensors,
    origin: &str,
) -> anyhow::Result<Tensors> {
    let m = &c.model;
    let d = m.d_model;
    let mut out = Tensors::new();
    let bias = m.bias;
    // Old checkpoints carry the causal mask as a buffer; it holds no weights.
    w.retain(|k, _| !(k.ends_with(".attn.bias") || k.ends_with(".attn.masked_bias")));
    let put_bias = |out: &mut Tensors,
                    name: String,
                    t: Tensor,
                    theirs: &str|
     -> anyhow::Result<()> {
        if bias {
            out.insert(name, t);
        } else if !t.is_zero() {
            bail!(
                "{origin}: `{theirs}` is not zero, but this recipe has model.bias = false: set model.bias = true"
            );
        }
        Ok(())
    };
    match arch {
        HfArch::Gpt2 => {
            // GPT2LMHeadModel saves under `transformer.`, GPT2Model (the hub's gpt2) without.
            let p = if w.contains_key("transformer.wte.weight") {
                "transformer."
            } else {
                ""
            };
            out.insert(
                "token_embedding.weight".into(),
                take(&mut w, &format!("{p}wte.weight"), origin)?,
            );
            out.insert(
                "position_embedding.weight".into(),
                take(&mut w, &format!("{p}wpe.weight"), origin)?,
            );
            for i in 0..m.n_layers {
                let (l, h) = (format!("layers.{i}"), format!("{p}h.{i}"));
                for (ours, theirs) in [("norm1", "ln_1"), ("norm2", "ln_2")] {
                    out.insert(
                        format!("{l}.{ours}.weight"),
                        take(&mut w, &format!("{h}.{theirs}.weight"), origin)?,
                    );
                    let name = format!("{h}.{theirs}.bias");
                    let t = take(&mut w, &name, origin)?;
                    put_bias(&mut out, format!("{l}.{ours}.bias"), t, &name)?;
                }
                let qkv = take(&mut w, &format!("{h}.attn.c_attn.weight"), origin)?.transposed();
                let name = format!("{h}.attn.c_attn.bias");
                let qkv_b = take(&mut w, &name, origin)?;
                for (j, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(format!("{l}.mixer.{proj}.weight"), qkv.rows(j * d, d));
                    put_bias(
                        &mut out,
                        format!("{l}.mixer.{proj}.bias"),
                        qkv_b.rows(j * d, d),
                        &name,
                    )?;
                }
                for (ours, theirs) in [
                    ("mixer.out_proj", "attn.c_proj"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ] {
                    out.insert(
                        format!("{l}.{ours}.weight"),
                        take(&mut w, &format!("{h}.{theirs}.weight"), origin)?.transposed(),
                    );
                    let name = format!("{h}.{theirs}.bias");
                    let t = take(&mut w, &name, origin)?;
                    put_bias(&mut out, format!("{l}.{ours}.bias"), t, &name)?;
                }
            }
            out.insert(
                "final_norm.weight".into(),
                take(&mut w, &format!("{p}ln_f.weight"), origin)?,
            );
            let name = format!("{p}ln_f.bias");
            let t = take(&mut w, &name, origin)?;
            put_bias(&mut out, "final_norm.bias".into(), t, &name)?;
        }
        HfArch::Llama => {
            let kv = m.mixer_options.softmax.kv_heads(m.n_heads);
            out.insert(
                "token_embedding.weight".into(),
                take(&mut w, "model.embed_tokens.weight", origin)?,
            );
            for i in 0..m.n_layers {
                let (l, h) = (format!("layers.{i}"), format!("model.layers.{i}"));
                for (ours, theirs, rope_heads) in [
                    ("norm1", "input_layernorm", None),
                    ("mixer.q_proj", "self_attn.q_proj", Some(m.n_heads)),
                    ("mixer.k_proj", "self_attn.k_proj", Some(kv)),
                    ("mixer.v_proj", "self_attn.v_proj", None),
                    ("mixer.out_proj", "self_attn.o_proj", None),
                    ("norm2", "post_attention_layernorm", None),
                    ("mlp.gate", "mlp.gate_proj", None),
                    ("mlp.fc1", "mlp.up_proj", None),
                    ("mlp.fc2", "mlp.down_proj", None),
                ] {
                    let unrope = |t: Tensor| match rope_heads {
                        Some(n) => rope_rows(&t, n, true),
                        None => t,
                    };
                    let wt = take(&mut w, &format!("{h}.{theirs}.weight"), origin)?;
                    out.insert(format!("{l}.{ours}.weight"), unrope(wt));
                    let name = format!("{h}.{theirs}.bias");
                    if let Some(t) = w.remove(&name) {
                        put_bias(&mut out, format!("{l}.{ours}.bias"), unrope(t), &name)?;
                    }
                }
            }
            out.insert(
                "final_norm.weight".into(),
                take(&mut w, "model.norm.weight", origin)?,
            );
        }
    }
    match w.remove("lm_head.weight") {
        Some(head) if !m.tie_embeddings => {
            out.insert("lm_head.weight".into(), head);
        }
        // A tied model may save its head too: it must be the embedding.
        Some(head) if head != out["token_embedding.weight"] => bail!(
            "{origin}: lm_head.weight differs from the token embedding, but this recipe ties \
             them (model.tie_embeddings = true): set model.tie_embeddings = false"
        ),
        _ => {}
    }
    if let Some(left) = w.keys().next() {
        bail!("{origin}: tensor `{left}` has no place in this recipe's model");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permutation and its inverse undo each other, and move row 2i to i, 2i+1 to hd/2+i.
    #[test]
    fn rope_rows_round_trip() {
        let (heads, hd) = (2, 6);
        let t = Tensor::new(
            vec![heads * hd, 1],
            (0..heads * hd).map(|x| x as f32).collect(),
        );
        let split = rope_rows(&t, heads, false);
        assert_eq!(
            split.data,
            vec![0., 2., 4., 1., 3., 5., 6., 8., 10., 7., 9., 11.]
        );
        assert_eq!(rope_rows(&split, heads, true), t);
    }
}

//! An export's `config.json`: every field that changes what the model computes, under the
//! names the recipe uses (serialised from the option types, so they cannot drift), and the
//! conventions a reimplementation must follow, generated from the options actually used.

use serde_json::{Map, Value, json};

use crate::mixers::MixerKind;
use crate::model::{LanguageModelConfig, MlpKind, NormKind, PositionKind};

/// The architecture string a metamix export's `config.json` carries.
pub const ARCHITECTURE: &str = "metamix.MetaFormerLM";
/// Bumped when `config.json`'s layout changes.
pub const FORMAT_VERSION: u64 = 2;

/// `[model]` keys that shape training (regularisation, init) but not the computation.
const TRAINING_ONLY: &[&str] = &["dropout", "init_std"];

/// The `model` object: `[model]` and each used mixer's `[model.<name>]`, resolved (vocabulary,
/// table length and "0 = derived" values filled in), without training-only keys.
pub fn model_json(c: &LanguageModelConfig) -> Value {
    let m = &c.model;
    let mut model = serde_json::to_value(m).expect("the model config serialises");
    let obj = model.as_object_mut().expect("a table");
    for key in TRAINING_ONLY {
        obj.remove(*key);
    }
    // `mixer` is the default of `mixers`, which is given resolved, one per layer.
    obj.remove("mixer");
    obj.insert("mixers".into(), json!(c.mixers));
    obj.insert("vocab_size".into(), json!(c.vocab_size));
    obj.insert("max_seq_len".into(), json!(c.max_seq_len));
    // Its value only initialises; whether the scales exist is what a loader needs.
    obj.remove("layer_scale_init");
    obj.insert("layer_scale".into(), json!(m.layer_scale_init.is_some()));
    if m.mlp == MlpKind::Swiglu {
        obj.remove("activation");
    }
    let ctx = m.mixer_context(c.max_seq_len);
    for kind in used_mixers(c) {
        obj.insert(kind.name().into(), m.mixer_options.export_json(kind, &ctx));
    }
    model
}

/// The mixers the layers use, each once, in registry order.
fn used_mixers(c: &LanguageModelConfig) -> Vec<MixerKind> {
    MixerKind::ALL
        .iter()
        .copied()
        .filter(|k| c.mixers.contains(k))
        .collect()
}

/// The whole `config.json` of a model whose decoding context (the longest sequence its
/// position tables cover) is `context`.
pub fn config_json(c: &LanguageModelConfig, context: Option<usize>) -> Value {
    let m = &c.model;
    json!({
        "architecture": ARCHITECTURE,
        "format_version": FORMAT_VERSION,
        "model": model_json(c),
        "derived": {
            "head_dim": m.d_model / m.n_heads,
            "mlp_hidden": m.mlp_hidden(),
            "context": context,
        },
        "conventions": conventions(c, context),
    })
}

fn conventions(c: &LanguageModelConfig, context: Option<usize>) -> Value {
    let m = &c.model;
    let d = m.d_model;
    let mut out = Map::new();
    let mut rule = |k: &str, v: String| {
        out.insert(k.to_string(), Value::String(v));
    };
    rule(
        "linear",
        "y = x @ weight.T + bias: weights are [out, in] (torch.nn.Linear)".into(),
    );
    rule(
        "embedding",
        match m.position {
            PositionKind::Learned => "x = token_embedding.weight[token] + \
                                      position_embedding.weight[p], p the absolute position from 0"
                .into(),
            PositionKind::None => "x = token_embedding.weight[token]; no position embedding".into(),
        },
    );
    rule(
        "block",
        if m.layer_scale_init.is_some() {
            "x = x + layer_scale1.scale ⊙ mixer(norm1(x)); x = x + layer_scale2.scale ⊙ mlp(norm2(x))"
        } else {
            "x = x + mixer(norm1(x)); x = x + mlp(norm2(x))"
        }
        .into(),
    );
    let eps = m.norm_eps;
    rule(
        "norm",
        match m.norm {
            NormKind::LayerNorm if m.bias => format!(
                "norm1, norm2, final_norm: (x − mean(x)) / √(var(x) + {eps:e}) · weight + bias over \
                 the {d} channels, var biased (÷ {d}), eps inside the root (torch.nn.LayerNorm)"
            ),
            NormKind::LayerNorm => format!(
                "norm1, norm2, final_norm: (x − mean(x)) / √(var(x) + {eps:e}) · weight over the {d} \
                 channels, var biased (÷ {d}), eps inside the root, no bias \
                 (torch.nn.LayerNorm(bias=False))"
            ),
            NormKind::RmsNorm => format!(
                "norm1, norm2, final_norm: x / √(mean(x²) + {eps:e}) · weight over the {d} channels, \
                 eps inside the root, never a bias (torch.nn.RMSNorm)"
            ),
        },
    );
    let biases = if m.bias {
        "with biases"
    } else {
        "without biases"
    };
    rule(
        "mlp",
        match m.mlp {
            MlpKind::Standard => format!(
                "fc2(act(fc1(x))), {biases}; act: {}",
                m.activation.formula()
            ),
            MlpKind::Swiglu => format!(
                "SwiGLU: fc2(silu(gate(x)) ⊙ fc1(x)), {biases} (Llama's down(silu(gate(x)) ⊙ up(x)))"
            ),
        },
    );
    rule(
        "lm_head",
        if m.tie_embeddings {
            "logits = final_norm(x) @ token_embedding.weight.T (tied; no lm_head tensor)".into()
        } else {
            "logits = final_norm(x) @ lm_head.weight.T, no bias".into()
        },
    );
    rule(
        "decoding",
        match context {
            Some(n) => format!(
                "the context is {n} tokens (the length of the learned position table or of RoPE's): \
                 a prompt keeps its last {n} tokens; once generation has filled {n} positions, decoding restarts from an \
                 empty state on the last {} tokens (re-read at positions 0..), then goes on; greedy \
                 = argmax, top_k keeps the logits ≥ the k-th largest, temperature divides the \
                 logits (metamix sample)",
                (n / 2).max(1)
            ),
            None => "unbounded: each mixer's state carries the whole past, nothing is cropped; \
                     greedy = argmax, top_k keeps the logits ≥ the k-th largest, temperature \
                     divides the logits (metamix sample)"
                .into(),
        },
    );
    let ctx = m.mixer_context(c.max_seq_len);
    for kind in used_mixers(c) {
        out.insert(
            kind.name().into(),
            json!(m.mixer_options.conventions(kind, &ctx)),
        );
    }
    Value::Object(out)
}

/// Where `found` (another config's `model` object) differs from `expected`, as
/// `model.key: X there, Y here` lines.
pub fn differences(expected: &Value, found: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff("model", expected, found, &mut out);
    out
}

fn diff(path: &str, expected: &Value, found: &Value, out: &mut Vec<String>) {
    match (expected, found) {
        (Value::Object(e), Value::Object(f)) => {
            let keys: std::collections::BTreeSet<&String> = e.keys().chain(f.keys()).collect();
            for k in keys {
                let sub = format!("{path}.{k}");
                match (e.get(k), f.get(k)) {
                    (Some(a), Some(b)) => diff(&sub, a, b, out),
                    (Some(a), None) => out.push(format!("{sub}: missing there, {a} here")),
                    (None, Some(b)) => out.push(format!("{sub}: {b} there, absent here")),
                    (None, None) => {}
                }
            }
        }
        // 1 and 1.0 are the same value (a float option written as an integer).
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {b} there, {a} here")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixers::MixerOptionsSet;
    use crate::model::ModelConfig;

    fn config(edit: impl Fn(&mut ModelConfig)) -> LanguageModelConfig {
        let mut model = ModelConfig::default();
        edit(&mut model);
        LanguageModelConfig {
            mixers: model.layer_mixers(),
            model,
            vocab_size: 65,
            max_seq_len: 64,
            classes: None,
        }
    }

    fn rules(c: &LanguageModelConfig, key: &str) -> String {
        let v = &config_json(c, Some(64))["conventions"][key];
        match v {
            Value::Array(lines) => lines
                .iter()
                .map(|l| l.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("\n"),
            other => other.as_str().unwrap_or_default().to_string(),
        }
    }

    /// Each mixer's list of training-only keys names keys its options have.
    #[test]
    fn training_only_keys_exist() {
        assert_eq!(
            MixerOptionsSet::unknown_training_only_keys(),
            Vec::<String>::new()
        );
    }

    /// The conventions state what the options in use do, and nothing about options not in use.
    #[test]
    fn conventions_follow_the_options_in_use() {
        let plain = config(|_| {});
        let s = rules(&plain, "softmax");
        assert!(
            !s.contains("RoPE") && !s.contains("grouped-query") && !s.contains("window"),
            "{s}"
        );
        assert!(s.contains("carry biases"));
        assert!(rules(&plain, "embedding").contains("position_embedding"));
        assert!(rules(&plain, "norm").contains("+ bias"));

        let llama = config(|m| {
            m.position = PositionKind::None;
            m.norm = NormKind::RmsNorm;
            m.bias = false;
            m.mlp = MlpKind::Swiglu;
            m.n_heads = 4;
            m.mixer_options.softmax.rotary = true;
            m.mixer_options.softmax.rope_theta = 500.0;
            m.mixer_options.softmax.n_kv_heads = 2;
            m.mixer_options.softmax.window = 8;
        });
        let s = rules(&llama, "softmax");
        assert!(s.contains("θ = rope_theta = 500"), "{s}");
        assert!(s.contains("query head i uses key/value head i // 2"), "{s}");
        assert!(s.contains("> p − 8"), "{s}");
        assert!(s.contains("have no biases"), "{s}");
        assert!(!rules(&llama, "embedding").contains("position_embedding"));
        assert!(rules(&llama, "norm").contains("never a bias"));
        assert!(rules(&llama, "mlp").contains("SwiGLU"));
        let model = model_json(&llama);
        assert!(
            model.get("activation").is_none(),
            "swiglu has no activation key: {model}"
        );
        assert_eq!(model["softmax"]["n_kv_heads"], 2);

        let ssm = config(|m| m.mixer = crate::mixers::MixerKind::Ssm);
        let s = rules(&ssm, "ssm");
        assert!(s.contains("x_proj(u) → [dt (8) | B (16) | C (16)]"), "{s}");
        assert!(s.contains("no biases whatever model.bias"), "{s}");
        assert_eq!(
            model_json(&ssm)["ssm"]["dt_rank"],
            8,
            "0 = ⌈d_model/16⌉ is stated resolved"
        );
        assert!(model_json(&ssm).get("softmax").is_none());
    }

    #[test]
    fn differences_name_each_key() {
        let a = model_json(&config(|_| {}));
        let b = model_json(&config(|m| {
            m.d_model = 64;
            m.mixer_options.softmax.rope_theta = 5.0;
        }));
        let d = differences(&a, &b);
        assert!(
            d.contains(&"model.d_model: 64 there, 128 here".to_string()),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|l| l.starts_with("model.softmax.rope_theta: 5.0 there")),
            "{d:?}"
        );
        assert!(differences(&a, &a).is_empty());
    }
}

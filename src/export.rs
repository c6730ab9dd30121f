//! `export`: a checkpoint's weights as PyTorch-layout safetensors, with a `config.json`
//! beside it that describes the architecture completely (enough to rebuild the model in
//! another framework; `scripts/check_export.py` does so with numpy).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::json;

use crate::data::{TOKENIZER_FILE, Tokenizer};
use crate::mixers::MixerKind;
use crate::model::LanguageModelConfig;
use crate::run::Run;

/// Write `out`, and `config.json` and `tokenizer.json` in the same folder; returns the
/// config path.
/// Existing files are refused unless `force`.
pub fn export(run: &Run, step: Option<u64>, out: &Path, force: bool) -> anyhow::Result<PathBuf> {
    let config_path = out.with_file_name("config.json");
    let tokenizer_path = out.with_file_name(TOKENIZER_FILE);
    let existing: Vec<&Path> = [out, &config_path, &tokenizer_path]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    if !existing.is_empty() && !force {
        bail!(
            "{} already exist{}; pass --force to replace, or export to another --out (its \
             folder also gets config.json and tokenizer.json)",
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if existing.len() == 1 { "s" } else { "" }
        );
    }
    let (model, ckpt) = run.load_model(step, &burn::prelude::Device::flex())?;
    for p in existing {
        std::fs::remove_file(p).with_context(|| format!("replacing {}", p.display()))?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    crate::weights::save(&model, out)?;
    let mut config = config_json(&run.model_config());
    if let Tokenizer::Char(chars) = &run.tokenizer {
        config["vocab"] = json!(
            chars
                .chars
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
        );
    }
    config["tokenizer"] = json!(run.recipe.data.tokenizer);
    run.tokenizer.save(&tokenizer_path)?;
    config["trained_steps"] = json!(ckpt.step);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(config_path)
}

/// Every field needed to rebuild the model. Conventions a reimplementation must follow are
/// spelled out rather than implied.
pub fn config_json(c: &LanguageModelConfig) -> serde_json::Value {
    let m = &c.model;
    // The options of every mixer, serialised from the options types themselves so that the
    // config cannot drift from what the model computes.
    let mixer_options: serde_json::Map<String, serde_json::Value> = MixerKind::ALL
        .iter()
        .map(|&k| (k.name().to_string(), m.mixer_options.to_json(k)))
        .collect();
    json!({
        "architecture": "metamix.MetaFormerLM",
        "vocab_size": c.vocab_size,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "head_dim": m.d_model / m.n_heads,
        "mlp_hidden": (m.mlp_ratio * m.d_model as f64).round() as usize,
        "activation": m.activation,
        "norm": m.norm,
        "norm_eps": m.norm_eps,
        "bias": m.bias,
        "layer_scale": m.layer_scale_init.is_some(),
        "position": m.position,
        "max_seq_len": c.max_seq_len,
        "tie_embeddings": m.tie_embeddings,
        "mixers": c.mixers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "mixer_options": mixer_options,
        "ssm_dt_rank": m.mixer_options.ssm.dt_rank(m.d_model),
        "conventions": {
            "block": "x = x + layer_scale1 * mixer(norm1(x)); x = x + layer_scale2 * mlp(norm2(x))",
            "linear": "y = x @ weight.T + bias, weight is [out, in] (torch.nn.Linear)",
            "embedding": "token_embedding.weight [vocab, d]; position_embedding.weight [max_seq_len, d] added at positions 0..t",
            "lm_head": "logits = final_norm(x) @ token_embedding.weight.T when tie_embeddings, else lm_head.weight",
            "softmax_mixer": "q,k,v = q_proj(x),k_proj(x),v_proj(x) split into n_heads; causal softmax(q k^T / sqrt(head_dim)) v; out_proj",
            "linear_mixer": "S_t = g_t S_(t-1) + phi(k_t) v_t^T, o_t = phi(q_t)^T S_t [/ (phi(q_t)^T z_t + 1e-6)]; g: 1, 1 - 2^(-5-h) (retnet), or sigmoid(gate_proj(x))^(1/16) (gated)",
            "ssm_mixer": "mamba_ssm's Mamba block: in_proj -> (x, z); x = silu(causal depthwise conv1d(x)); x_proj -> (dt, B, C); delta = softplus(dt_proj(dt)); A = -exp(A_log); h_t = exp(delta A) h + delta B x; y = C h + D x; out_proj(y * silu(z))",
            "pool_mixer": "mean over the trailing pool_size tokens (fewer at the start) minus x",
            "moh_mixer": "softmax attention heads weighted per token: shared heads alpha1*softmax(shared_router(x)), routed heads alpha2*softmax(routed_router(x)) kept for the top_k, [alpha1, alpha2] = softmax(head_type_router(x))",
            "mlp": "fc2(activation(fc1(x)))",
            "gelu": "exact erf gelu; gelu_tanh is the tanh approximation"
        }
    })
}

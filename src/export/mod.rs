//! `export`: a checkpoint as a folder others load without guessing — `model.safetensors`
//! (PyTorch names and layout), `config.json` (every field that changes the computation and
//! the conventions behind it, see [`config`]), `tokenizer.json` and a `README.md` model
//! card; or, with `--format hf`, the same model as a `transformers` class ([`hf`]).
//! And the way back: `train --init-from` reads such folders ([`init_from`]).

pub mod config;
pub mod hf;
pub mod model_card;
pub mod tensors;

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use burn::module::Module;

use crate::components::staged_folder;
use crate::data::{TOKENIZER_FILE, Tokenizer};
use crate::model::{LanguageModel, LanguageModelConfig};
use crate::run::Run;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const CARD_FILE: &str = "README.md";
/// What `transformers`' `AutoTokenizer` reads beside `tokenizer.json` (hf format only).
pub const HF_TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Every file an export folder may hold: `--force` replaces only a folder of these.
pub const EXPORT_FILES: &[&str] = &[
    WEIGHTS_FILE,
    CONFIG_FILE,
    TOKENIZER_FILE,
    CARD_FILE,
    HF_TOKENIZER_CONFIG_FILE,
];

/// Which layout an export folder has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// metamix's names and `config.json` (read by `python/metamix_torch.py`).
    #[default]
    Metamix,
    /// A `transformers` class: `GPT2LMHeadModel` or `LlamaForCausalLM`.
    Hf,
}

/// How the model did on validation data, for the model card.
#[derive(Debug, Clone, Copy)]
pub struct CardMetrics {
    pub val_loss: f64,
    pub bits_per_byte: Option<f64>,
    pub batches: usize,
}

/// Write the export folder `out` for checkpoint `step` (the newest intact one by default).
/// `measure` evaluates the loaded model for the card (None: not measured). An existing
/// `out` is refused unless `force`, and then replaced only if it holds nothing but export
/// files. The folder is built beside `out` and renamed into place ([`staged_folder`]), so
/// `out` is never half written. Returns the files written.
pub fn export(
    run: &Run,
    step: Option<u64>,
    out: &Path,
    format: Format,
    force: bool,
    measure: &dyn Fn(&LanguageModel) -> Option<CardMetrics>,
) -> anyhow::Result<Vec<&'static str>> {
    if out.extension().is_some_and(|e| e == "safetensors") {
        bail!(
            "--out {} names a file; an export is a folder (model.safetensors, config.json, \
             tokenizer.json, README.md): give a folder such as {}",
            out.display(),
            out.with_extension("").display()
        );
    }
    // A task run's classifier head and bidirectional mixers are not in the export formats.
    let tokenizer = run.text_tokenizer("export")?;
    check_replaceable(out, force)?;
    let c = run.model_config();
    let arch = match format {
        Format::Hf => Some(hf::architecture(&c)?),
        Format::Metamix => None,
    };
    let (model, ckpt) = run.load_model(step, &burn::prelude::Device::flex())?;
    let metrics = measure(&model);

    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a folder name", out.display()))?
        .to_string_lossy()
        .to_string();
    let partial = staged_folder::start(out)?;
    let written = (|| -> anyhow::Result<Vec<&'static str>> {
        let weights = crate::weights::to_bytes(&model)?;
        let mut files = vec![WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE];
        let config = match arch {
            None => {
                crate::weights::write_file(&partial.join(WEIGHTS_FILE), &weights)?;
                let mut config = config::config_json(&c, model.max_seq_len());
                config["tokenizer"] = json!(run.recipe.data.tokenizer);
                config["trained_steps"] = json!(ckpt.step);
                config
            }
            Some(arch) => {
                let ours = tensors::read(&weights, "the model")?;
                let theirs = hf::to_hf(&c, arch, ours)?;
                let bytes = tensors::write(&theirs, &[("format", "pt"), ("producer", "metamix")])?;
                crate::weights::write_file(&partial.join(WEIGHTS_FILE), &bytes)?;
                write_json(
                    &partial.join(HF_TOKENIZER_CONFIG_FILE),
                    &hf_tokenizer_config(tokenizer, &c),
                )?;
                files.push(HF_TOKENIZER_CONFIG_FILE);
                hf::config(&c, arch, tokenizer.eot())
            }
        };
        write_json(&partial.join(CONFIG_FILE), &config)?;
        tokenizer.save(&partial.join(TOKENIZER_FILE))?;
        let card = model_card::render(&model_card::Card {
            name: &name,
            path: &out.display().to_string(),
            run,
            config: &c,
            step: ckpt.step,
            format,
            hf_class: arch.map(hf::HfArch::class),
            metrics,
            parameters: model.num_params(),
        });
        std::fs::write(partial.join(CARD_FILE), card)?;
        Ok(files)
    })();
    let files = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    staged_folder::finish(&partial, out)?;
    Ok(files)
}

/// Refuse an existing `out` unless `force`; with `force`, refuse one that holds anything
/// an export does not write (it is not ours to delete).
fn check_replaceable(out: &Path, force: bool) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        bail!(
            "{} already exists; pass --force to replace it, or export to another --out",
            out.display()
        );
    }
    if !out.is_dir() {
        bail!(
            "{} is a file, not an export folder; --force replaces only export folders",
            out.display()
        );
    }
    for name in staged_folder::file_names(out)? {
        if !EXPORT_FILES.contains(&name.as_str()) {
            bail!(
                "{} holds {name}, which an export does not write; --force replaces only a folder \
                 of export files ({}): move it, or export to another --out",
                out.display(),
                EXPORT_FILES.join(", ")
            );
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What `AutoTokenizer.from_pretrained` needs to wrap `tokenizer.json`.
fn hf_tokenizer_config(t: &Tokenizer, c: &LanguageModelConfig) -> Value {
    let mut v = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": c.max_seq_len,
    });
    if t.eot().is_some() {
        for k in ["bos_token", "eos_token"] {
            v[k] = json!(crate::data::tokenizer::EOT);
        }
    }
    v
}

/// `train --init-from PATH`: weights for the model `c` describes (built as `model`), from a
/// safetensors file, a metamix export folder (its `config.json` must describe this model)
/// or a Hugging Face GPT-2 / Llama folder of the same shape.
pub fn init_from(
    model: LanguageModel,
    c: &LanguageModelConfig,
    path: &Path,
) -> anyhow::Result<LanguageModel> {
    if path.is_file() {
        return crate::weights::load(model, path);
    }
    if !path.is_dir() {
        bail!("{}: no such file or folder", path.display());
    }
    let config_path = path.join(CONFIG_FILE);
    let weights_path = path.join(WEIGHTS_FILE);
    for p in [&config_path, &weights_path] {
        if !p.is_file() {
            bail!(
                "{}: missing {}; an export folder holds {WEIGHTS_FILE} and {CONFIG_FILE} (metamix \
                 export, or a Hugging Face gpt2/llama folder; sharded checkpoints are not read)",
                path.display(),
                p.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    let origin = config_path.display().to_string();
    let config: Value = serde_json::from_slice(&std::fs::read(&config_path)?)
        .with_context(|| format!("{origin}: not JSON"))?;
    if config.get("architecture").and_then(Value::as_str) == Some(config::ARCHITECTURE) {
        let found = config.get("model").cloned().unwrap_or(Value::Null);
        let diffs = config::differences(&config::model_json(c), &found);
        if !diffs.is_empty() {
            bail!(
                "{origin} holds another model than this recipe's: {}; set those keys in the \
                 recipe (or --set model.KEY=VALUE) as the export has them",
                diffs.join("; ")
            );
        }
        return crate::weights::load(model, &weights_path);
    }
    let arch = hf::detect(&config, &origin)?;
    hf::check_config(&config, arch, c, &origin)?;
    let wpath = weights_path.display().to_string();
    let theirs = tensors::read(&std::fs::read(&weights_path)?, &wpath)?;
    let ours = hf::from_hf(c, arch, theirs, &wpath)?;
    let bytes = tensors::write(&ours, &[("format", "pt")])?;
    crate::weights::load_bytes(model, bytes, &wpath)
}

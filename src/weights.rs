//! Model weights on disk: safetensors with PyTorch's layout and names (Linear weights
//! `[out, in]`, norms `weight`/`bias`, no enum variant in paths), for checkpoints and
//! exports alike, so there is one format to trust and a checkpoint loads in PyTorch as is.

use std::path::Path;

use anyhow::{Context, bail};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};

use crate::model::LanguageModel;

pub fn save(model: &LanguageModel, path: &Path) -> anyhow::Result<()> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .metadata("format", "pt")
        .metadata("producer", "metamix");
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Load weights into `model` (which fixes the architecture). Every parameter must be in the
/// file with its shape; anything missing, extra or mis-shaped is an error naming it.
pub fn load(mut model: LanguageModel, path: &Path) -> anyhow::Result<LanguageModel> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .skip_enum_variants(true)
        .allow_partial(true);
    let result = model.load_from(&mut store).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("Mismatch") {
            anyhow::anyhow!(
                "{} does not fit this model's architecture: {}",
                path.display(),
                shorten(&msg, 600)
            )
        } else {
            anyhow::anyhow!(
                "{}: cannot read weights: {}",
                path.display(),
                shorten(&msg, 600)
            )
        }
    })?;
    let mut problems = Vec::new();
    for e in &result.errors {
        problems.push(format!("{e:?}"));
    }
    for (p, _) in &result.missing {
        problems.push(format!("missing tensor `{p}`"));
    }
    for p in &result.unused {
        problems.push(format!("unexpected tensor `{p}`"));
    }
    if !problems.is_empty() {
        bail!(
            "{} does not fit this model's architecture: {}",
            path.display(),
            shorten(&problems.join("; "), 600)
        );
    }
    Ok(model)
}

/// Check a file parses as safetensors at all (catches truncation) without a model.
pub fn check_file(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    Ok(())
}

/// Long burn-store reports (one entry per tensor) cut to a readable length.
fn shorten(msg: &str, max: usize) -> String {
    match msg.char_indices().nth(max) {
        Some((i, _)) => format!("{} … ({} more characters)", &msg[..i], msg.len() - i),
        None => msg.to_string(),
    }
}

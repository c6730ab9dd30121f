//! Model weights on disk: safetensors with PyTorch's layout and names (Linear weights
//! `[out, in]`, norms `weight`/`bias`, no enum variant in paths), for checkpoints and
//! exports alike, so there is one format to trust and a checkpoint loads in PyTorch as is.

use std::path::Path;

use anyhow::{Context, bail};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};

use crate::model::LanguageModel;

pub fn save(model: &LanguageModel, path: &Path) -> anyhow::Result<()> {
    let bytes = to_bytes(model)?;
    write_file(path, &bytes)
}

/// The model's weights as the bytes of a safetensors file, its header's keys sorted
/// (burn-store writes them in hash order) so the same weights give the same bytes.
pub fn to_bytes(model: &LanguageModel) -> anyhow::Result<Vec<u8>> {
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .metadata("format", "pt")
        .metadata("producer", "metamix");
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("serialising weights: {e}"))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| anyhow::anyhow!("serialising weights: {e}"))?;
    canonicalise(&bytes)
}

/// Write `bytes` to `path` through a temporary file, with the permissions of an ordinary
/// file (0644), so a reader never sees half a file and others can read it.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A safetensors file's bytes with the header's keys sorted at every level.
fn canonicalise(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let damaged = || anyhow::anyhow!("not a safetensors file");
    let len = u64::from_le_bytes(bytes.get(..8).ok_or_else(damaged)?.try_into()?) as usize;
    let header = bytes.get(8..8 + len).ok_or_else(damaged)?;
    // serde_json's map is ordered by key: parsing and writing back sorts every level.
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|_| damaged())?;
    let mut sorted = serde_json::to_vec(&value)?;
    // The data section stays 8-byte aligned, padded with spaces as the format allows.
    sorted.resize(sorted.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// Load weights into `model` (which fixes the architecture). Every parameter must be in the
/// file with its shape; anything missing, extra or mis-shaped is an error naming it.
pub fn load(model: LanguageModel, path: &Path) -> anyhow::Result<LanguageModel> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    load_bytes(model, bytes, &path.display().to_string())
}

/// [`load`] from a safetensors file's bytes; `origin` names them in errors.
pub fn load_bytes(
    mut model: LanguageModel,
    bytes: Vec<u8>,
    origin: &str,
) -> anyhow::Result<LanguageModel> {
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .skip_enum_variants(true)
        .allow_partial(true);
    let result = model.load_from(&mut store).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("Mismatch") {
            anyhow::anyhow!(
                "{origin} does not fit this model's architecture: {}",
                shorten(&msg, 600)
            )
        } else {
            anyhow::anyhow!("{origin}: cannot read weights: {}", shorten(&msg, 600))
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
            "{origin} does not fit this model's architecture: {}",
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

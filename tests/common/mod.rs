//! Shared helpers for the integration tests: a tiny recipe whose run lives in a temp dir.

#![allow(dead_code)]

use std::path::Path;

use metamix::recipe::Recipe;
use metamix::train::TrainOptions;

/// A model small enough to train a few steps in well under a second.
pub const TINY: &str = include_str!("tiny.toml");

/// The tiny recipe with its run folder under `dir`, plus overrides.
pub fn tiny_recipe(dir: &Path, overrides: &[&str]) -> Recipe {
    let mut all = vec![format!("checkpoint.folder=\"{}\"", dir.display())];
    all.extend(overrides.iter().map(|s| s.to_string()));
    Recipe::from_toml_str(TINY, "tiny.toml", "tiny", &all).expect("tiny recipe is valid")
}

/// Every tensor of a safetensors file as (name, dtype, shape, raw bytes), sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Train without a progress bar or log lines.
pub fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// Quietly continue from the newest intact checkpoint (`--resume`).
pub fn resuming() -> TrainOptions {
    TrainOptions {
        resume: true,
        ..quiet()
    }
}

/// Quietly train, stopping after `step` as if killed there.
pub fn killed_after(step: u64) -> TrainOptions {
    TrainOptions {
        stop_after: Some(step),
        ..quiet()
    }
}

/// The names and bytes of every tensor of checkpoint `step`'s model and optimizer files, for
/// bitwise comparison.
pub fn final_files(run_dir: &Path, step: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = run_dir.join("checkpoints").join(format!("step-{step}"));
    let flat = |f: &str| {
        tensors(&dir.join(f))
            .into_iter()
            .flat_map(|(n, _, _, b)| n.into_bytes().into_iter().chain(b))
            .collect::<Vec<u8>>()
    };
    (flat("model.safetensors"), flat("optimizer.safetensors"))
}

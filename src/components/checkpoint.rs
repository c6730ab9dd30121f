//! Checkpoints: `<run>/checkpoints/step-N/` holding the model, the optimizer state and the
//! trainer state (step, tokens seen, data sampler RNG), with a SHA-256 of every file.
//!
//! A checkpoint is written into a hidden temporary folder and renamed into place, so a
//! crash mid-save leaves no `step-N` that resume would trust. Resume verifies the hashes
//! and falls back to the previous checkpoint when one is damaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::loss_scaler::LossScaler;
use super::optimizer::AdamW;
use crate::data::WindowSampler;
use crate::model::LanguageModel;
use crate::options::{OptionError, fail};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub sampler: WindowSampler,
    /// The f16 loss scaler, when the run uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// SHA-256 of each tensor file in the folder.
    pub files: BTreeMap<String, String>,
}

/// A checkpoint folder on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
}

/// The checkpoint policy of a run: where checkpoints go, when one is due, how many are
/// kept, and where a run resumes from.
pub struct CheckpointManager {
    run_dir: PathBuf,
    config: CheckpointConfig,
    last_saved: Option<u64>,
}

impl CheckpointManager {
    pub fn new(run_dir: &Path, config: &CheckpointConfig) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            config: config.clone(),
            last_saved: None,
        }
    }

    /// Where the run starts. With `resume`, the newest intact checkpoint (none yet: fresh;
    /// some but none intact: refuse, since they may be recoverable by hand). Without it, a
    /// run folder that holds checkpoints is refused rather than trained over.
    pub fn resume_point(
        &mut self,
        resume: bool,
        quiet: bool,
    ) -> anyhow::Result<Option<(Checkpoint, TrainerState)>> {
        let existing = Checkpoint::list(&self.run_dir)?;
        if !resume {
            if let Some(newest) = existing.first() {
                bail!(
                    "{} already holds checkpoints (newest: step-{}); pass --resume to continue it, or \
                     pick another run name with --set name=...",
                    self.run_dir.display(),
                    newest.step
                );
            }
            return Ok(None);
        }
        let found = Checkpoint::latest_valid(&self.run_dir)?;
        if found.is_none() && !existing.is_empty() {
            bail!(
                "none of the {} checkpoints in {} is intact (see the warnings above); move \
                 them away to start this run fresh",
                existing.len(),
                checkpoints_dir(&self.run_dir).display()
            );
        }
        if found.is_none() && !quiet {
            eprintln!(
                "note: {} has no checkpoint yet; starting fresh",
                self.run_dir.display()
            );
        }
        self.last_saved = found.as_ref().map(|(c, _)| c.step);
        Ok(found)
    }

    /// A checkpoint is due after `step` (every `interval` steps, and at the last step).
    pub fn due(&self, step: u64, last_step: u64) -> bool {
        (self.config.interval > 0 && step.is_multiple_of(self.config.interval)) || step == last_step
    }

    /// Save `state.step`'s checkpoint and prune to `keep_latest_k`.
    pub fn save(
        &mut self,
        model: &LanguageModel,
        optimizer: &AdamW,
        state: &TrainerState,
    ) -> anyhow::Result<Checkpoint> {
        let ckpt = Checkpoint::save(
            &self.run_dir,
            model,
            optimizer,
            state,
            self.config.keep_latest_k,
        )?;
        self.last_saved = Some(ckpt.step);
        Ok(ckpt)
    }

    /// What a user who must stop now can rely on.
    pub fn last_good(&self) -> String {
        match self.last_saved {
            Some(s) => format!(
                "the last good checkpoint, step-{s} in {}, is intact",
                checkpoints_dir(&self.run_dir).display()
            ),
            None => "no checkpoint had been written yet".to_string(),
        }
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

impl Checkpoint {
    /// Write a checkpoint for `state.step`, then prune all but the newest `keep_latest_k`.
    pub fn save(
        run_dir: &Path,
        model: &LanguageModel,
        optimizer: &AdamW,
        state: &TrainerState,
        keep_latest_k: usize,
    ) -> anyhow::Result<Checkpoint> {
        let root = checkpoints_dir(run_dir);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let final_dir = root.join(format!("step-{}", state.step));
        let tmp = root.join(format!(".tmp-step-{}", state.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;

        crate::weights::save(model, &tmp.join(MODEL_FILE))?;
        optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
        let mut state = state.clone();
        state.files = [MODEL_FILE, OPTIMIZER_FILE]
            .into_iter()
            .map(|f| Ok((f.to_string(), sha256_file(&tmp.join(f))?)))
            .collect::<anyhow::Result<_>>()?;
        let json = serde_json::to_string_pretty(&state)?;
        write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
        for f in [MODEL_FILE, OPTIMIZER_FILE] {
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("moving checkpoint into {}", final_dir.display()))?;
        if let Ok(d) = std::fs::File::open(&root) {
            let _ = d.sync_all();
        }

        for old in Self::list(run_dir)?.into_iter().skip(keep_latest_k) {
            std::fs::remove_dir_all(&old.dir)
                .with_context(|| format!("pruning {}", old.dir.display()))?;
        }
        Ok(Checkpoint {
            dir: final_dir,
            step: state.step,
        })
    }

    /// Complete checkpoints of a run, newest first (temporary folders are ignored).
    pub fn list(run_dir: &Path) -> anyhow::Result<Vec<Checkpoint>> {
        let root = checkpoints_dir(run_dir);
        if !root.is_dir() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
                found.push(Checkpoint {
                    dir: entry.path(),
                    step,
                });
            }
        }
        found.sort_by_key(|c| std::cmp::Reverse(c.step));
        Ok(found)
    }

    /// Read the trainer state and check every file against its recorded hash.
    pub fn verify(&self) -> anyhow::Result<TrainerState> {
        let state_path = self.dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?;
        let state: TrainerState = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", state_path.display()))?;
        if state.step != self.step {
            bail!(
                "{} says step {} but the folder is step-{}",
                state_path.display(),
                state.step,
                self.step
            );
        }
        for f in [MODEL_FILE, OPTIMIZER_FILE] {
            let expected = state
                .files
                .get(f)
                .with_context(|| format!("{} lists no hash for {f}", state_path.display()))?;
            let path = self.dir.join(f);
            let actual = sha256_file(&path)?;
            if &actual != expected {
                bail!(
                    "{} is corrupt or truncated (SHA-256 {actual}, expected {expected})",
                    path.display()
                );
            }
        }
        Ok(state)
    }

    /// The newest checkpoint that verifies, warning about each damaged one skipped.
    pub fn latest_valid(run_dir: &Path) -> anyhow::Result<Option<(Checkpoint, TrainerState)>> {
        for ckpt in Self::list(run_dir)? {
            match ckpt.verify() {
                Ok(state) => return Ok(Some((ckpt, state))),
                Err(e) => eprintln!(
                    "warning: skipping checkpoint {}: {e:#}; falling back to the previous one",
                    ckpt.dir.display()
                ),
            }
        }
        Ok(None)
    }
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// `[checkpoint]`: where and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Runs live in `<folder>/<name>`.
    pub folder: PathBuf,
    /// Save every this many steps (and at the end); 0 = only at the end.
    pub interval: u64,
    /// Keep this many newest checkpoints; older ones are deleted.
    pub keep_latest_k: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            folder: PathBuf::from("runs"),
            interval: 500,
            keep_latest_k: 3,
        }
    }
}

impl CheckpointConfig {
    /// Checks of `[checkpoint]` (keys relative to it).
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.keep_latest_k == 0 {
            return fail(
                "keep_latest_k",
                "must be at least 1: resume needs a checkpoint",
            );
        }
        Ok(())
    }
}

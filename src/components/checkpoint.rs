//! Checkpoints: `<run>/checkpoints/step-N/` holding what every [`Stateful`] piece of the
//! trainer writes — the model and the optimizer as safetensors, the step, tokens seen, the
//! data sampler's RNG and the loss scaler in `trainer_state.json` — with a SHA-256 of every
//! tensor file.
//!
//! A checkpoint is written into a hidden temporary folder and renamed into place, so a
//! crash mid-save leaves no `step-N` that resume would trust. Resume verifies the hashes
//! and falls back to the previous checkpoint when one is damaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::loss_scaler::LossScaler;
use crate::model::LanguageModel;
use crate::options::{OptionError, fail};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
/// Written last: the SHA-256 of every other file. A checkpoint without it is not one.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The key of `trainer_state.json` that lists each tensor file's SHA-256.
const FILES_KEY: &str = "files";

/// A piece of training state that a checkpoint saves and a resume restores: the model, the
/// optimizer, the data sampler, the loss scaler, the step counters. The trainer saves and
/// restores itself by calling each piece, so adding state to a run is one impl.
pub trait Stateful {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()>;
    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()>;
}

/// A checkpoint being written: tensor files in its folder, and entries of
/// `trainer_state.json`.
pub struct CheckpointWriter {
    dir: PathBuf,
    entries: serde_json::Map<String, serde_json::Value>,
    files: Vec<String>,
}

impl CheckpointWriter {
    /// Where to write the tensor file `name`; it is hashed once the pieces are written.
    pub fn tensor_file(&mut self, name: &str) -> PathBuf {
        self.files.push(name.to_string());
        self.dir.join(name)
    }

    /// Store `value` under `key` in `trainer_state.json`.
    pub fn entry<T: Serialize>(&mut self, key: &str, value: &T) -> anyhow::Result<()> {
        self.entries
            .insert(key.to_string(), serde_json::to_value(value)?);
        Ok(())
    }
}

/// A verified checkpoint, to restore from.
#[derive(Debug)]
pub struct CheckpointReader {
    dir: PathBuf,
    entries: serde_json::Map<String, serde_json::Value>,
}

impl CheckpointReader {
    /// The tensor file `name` (its hash was checked).
    pub fn tensor_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The entry `key` of `trainer_state.json`, if present.
    pub fn entry<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        self.entries
            .get(key)
            .map(|v| {
                serde_json::from_value(v.clone()).with_context(|| {
                    format!(
                        "{}: `{key}` is damaged",
                        self.dir.join(STATE_FILE).display()
                    )
                })
            })
            .transpose()
    }

    /// The entry `key`, which every checkpoint has.
    pub fn required<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<T> {
        self.entry(key)?
            .with_context(|| format!("{} has no `{key}`", self.dir.join(STATE_FILE).display()))
    }

    /// The step the checkpoint was written after.
    pub fn step(&self) -> anyhow::Result<u64> {
        self.required("step")
    }
}

impl Stateful for LanguageModel {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()> {
        crate::weights::save(self, &into.tensor_file(MODEL_FILE))
    }

    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()> {
        *self = crate::weights::load(self.clone(), &from.tensor_file(MODEL_FILE))?;
        Ok(())
    }
}

/// The f16 loss scaler, when the run has one.
impl Stateful for Option<LossScaler> {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()> {
        match self {
            Some(scaler) => into.entry("loss_scaler", scaler),
            None => Ok(()),
        }
    }

    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()> {
        *self = from.entry("loss_scaler")?;
        Ok(())
    }
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
    ) -> anyhow::Result<Option<(Checkpoint, CheckpointReader)>> {
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

    /// Save the checkpoint of `step` from `state` and prune to `keep_latest_k`.
    pub fn save(&mut self, step: u64, state: &dyn Stateful) -> anyhow::Result<Checkpoint> {
        let ckpt = Checkpoint::save(&self.run_dir, step, state, self.config.keep_latest_k)?;
        self.last_saved = Some(ckpt.step);
        Ok(ckpt)
    }

    /// The step of the newest checkpoint this run has (saved or resumed from).
    pub fn last_saved(&self) -> Option<u64> {
        self.last_saved
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
    /// Write the checkpoint of `step` from `state`, then prune all but the newest
    /// `keep_latest_k`.
    pub fn save(
        run_dir: &Path,
        step: u64,
        state: &dyn Stateful,
        keep_latest_k: usize,
    ) -> anyhow::Result<Checkpoint> {
        let root = checkpoints_dir(run_dir);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let final_dir = root.join(format!("step-{step}"));
        let tmp = root.join(format!(".tmp-step-{step}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing the unfinished {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // A failed save (a full disk, say) leaves no temporary folder behind; the previous
        // checkpoints are untouched.
        let saved = Self::write_into(&tmp, step, state);
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("saving the checkpoint of step {step}")));
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)
                .with_context(|| format!("replacing {}", final_dir.display()))?;
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
            step,
        })
    }

    /// Every file of the checkpoint of `step`, into `tmp`; the manifest last.
    fn write_into(tmp: &Path, step: u64, state: &dyn Stateful) -> anyhow::Result<()> {
        let mut writer = CheckpointWriter {
            dir: tmp.to_path_buf(),
            entries: serde_json::Map::new(),
            files: Vec::new(),
        };
        state.save_state(&mut writer)?;
        writer.entry("step", &step)?;
        let files: BTreeMap<String, String> = writer
            .files
            .iter()
            .map(|f| Ok((f.clone(), sha256_file(&tmp.join(f))?)))
            .collect::<anyhow::Result<_>>()?;
        writer.entry(FILES_KEY, &files)?;
        let json = serde_json::to_string_pretty(&writer.entries)?;
        write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
        for f in files.keys() {
            let path = tmp.join(f);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let mut manifest = files.clone();
        manifest.insert(STATE_FILE.to_string(), sha256_file(&tmp.join(STATE_FILE))?);
        write_synced(
            &tmp.join(MANIFEST_FILE),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
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

    /// Check every file against the manifest (written last), then read
    /// `trainer_state.json`.
    pub fn verify(&self) -> anyhow::Result<CheckpointReader> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let manifest: BTreeMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).with_context(|| {
                format!(
                    "reading {} (written last: without it the save did not finish)",
                    manifest_path.display()
                )
            })?)
            .with_context(|| format!("{} is damaged", manifest_path.display()))?;
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            if !manifest.contains_key(f) {
                bail!("{} lists no hash for {f}", manifest_path.display());
            }
        }
        for (f, expected) in &manifest {
            let path = self.dir.join(f);
            let actual = sha256_file(&path)?;
            if &actual != expected {
                bail!(
                    "{} is corrupt or truncated (SHA-256 {actual}, expected {expected} in {MANIFEST_FILE})",
                    path.display()
                );
            }
        }
        let state_path = self.dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?;
        let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", state_path.display()))?;
        let reader = CheckpointReader {
            dir: self.dir.clone(),
            entries,
        };
        let step = reader.step()?;
        if step != self.step {
            bail!(
                "{} says step {step} but the folder is step-{}",
                state_path.display(),
                self.step
            );
        }
        Ok(reader)
    }

    /// The newest checkpoint that verifies, warning about each damaged one skipped.
    pub fn latest_valid(run_dir: &Path) -> anyhow::Result<Option<(Checkpoint, CheckpointReader)>> {
        for ckpt in Self::list(run_dir)? {
            match ckpt.verify() {
                Ok(reader) => return Ok(Some((ckpt, reader))),
                Err(e) => eprintln!(
                    "warning: skipping checkpoint {}: {e:#}; falling back to the previous one",
                    ckpt.dir.display()
                ),
            }
        }
        Ok(None)
    }
}

/// SHA-256 of a file, read in 1 MiB blocks (neither the whole file in memory nor, for a
/// memory-mapped shard, its pages left in this process's resident set).
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(format!("{:x}", hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
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

//! The recipe: a TOML file in sections, in the spirit of torchtitan's job config. Each
//! section's options live beside the code they configure (`[model]` in `model::config`,
//! `[model.<mixer>]` in the mixer's own file, `[optimizer]` in `components::optimizer`, ...);
//! this file composes them, keeps the run-level `[training]` section, parses, applies
//! `--set section.key=value` overrides and checks what spans sections. Every struct denies
//! unknown fields, so a typo fails before any work with the file, the key path and what
//! would be valid.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::components::checkpoint::CheckpointConfig;
pub use crate::components::loss_scaler::LossScalerConfig;
pub use crate::components::lr_schedule::{DecayKind, LrSchedulerConfig};
pub use crate::components::metrics::MetricsConfig;
pub use crate::components::optimizer::{OptimizerConfig, OptimizerKind};
pub use crate::data::DataConfig;
pub use crate::device::{BackendKind, DeviceSpec, Precision};
use crate::mixers::{MixerKind, MixerOptionsSet, ShardedForm};
pub use crate::model::ModelConfig;
use crate::options::{OptionError, divisors, fail, non_negative};
pub use crate::parallel::{ParallelismConfig, Sharding};
pub use crate::tasks::{TaskConfig, TaskKind};

/// `prefix.key = value` for every leaf of `table`.
fn flatten(
    prefix: &str,
    table: &toml::Table,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

/// A whole recipe. Sections may be left out; every key has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Run name: the run lives in `<checkpoint.folder>/<name>`. Default: the recipe's file stem.
    pub name: String,
    pub model: ModelConfig,
    /// What the run learns: next-token prediction on `[data]` (the default) or a task.
    pub task: TaskConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    pub optimizer: OptimizerConfig,
    pub lr_scheduler: LrSchedulerConfig,
    pub checkpoint: CheckpointConfig,
    pub metrics: MetricsConfig,
    pub parallelism: ParallelismConfig,
}

/// `[training]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Fixes initialisation, data order, dropout and sampling.
    pub seed: u64,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward; batch_size / micro_batch_size steps of gradient
    /// accumulation. 0 = batch_size (no accumulation).
    pub micro_batch_size: usize,
    pub seq_len: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Clip the global gradient norm to this; 0 disables.
    pub grad_clip: f64,
    /// Evaluate on the validation split every this many steps (and at the end); 0 = only at the end.
    pub eval_interval: u64,
    /// Batches averaged for each validation loss.
    pub eval_batches: usize,
    pub backend: BackendKind,
    /// Which of the backend's devices: `"default"`, `"cpu"` or a GPU index.
    pub device: DeviceSpec,
    /// `f32`, or mixed precision: `bf16` / `f16` working copies of f32 master weights.
    pub precision: Precision,
    /// Dynamic loss scaling, used with `precision = "f16"`.
    pub loss_scaler: LossScalerConfig,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            batch_size: 12,
            micro_batch_size: 0,
            seq_len: 64,
            steps: 2000,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_batches: 20,
            backend: BackendKind::Cpu,
            device: DeviceSpec::Default,
            precision: Precision::F32,
            loss_scaler: LossScalerConfig::default(),
        }
    }
}

impl TrainingConfig {
    /// Checks of this section alone (keys relative to `training`).
    fn validate(&self) -> Result<(), OptionError> {
        if self.batch_size == 0 {
            return fail("batch_size", "must be at least 1");
        }
        let micro = self.micro_batch_size();
        if micro > self.batch_size || !self.batch_size.is_multiple_of(micro) {
            return fail(
                "micro_batch_size",
                format!(
                    "{micro} does not divide batch_size = {}: use a divisor of {} (e.g. {}) or 0 for no accumulation",
                    self.batch_size,
                    self.batch_size,
                    divisors(self.batch_size)
                ),
            );
        }
        if self.seq_len < 2 {
            return fail(
                "seq_len",
                format!("must be at least 2 (got {})", self.seq_len),
            );
        }
        if self.steps == 0 {
            return fail("steps", "must be at least 1");
        }
        if !non_negative(self.grad_clip) {
            return fail(
                "grad_clip",
                format!(
                    "must be finite and >= 0 (got {}); 0 disables clipping",
                    self.grad_clip
                ),
            );
        }
        if self.eval_batches == 0 {
            return fail("eval_batches", "must be at least 1");
        }
        if self.backend == BackendKind::Cpu
            && let DeviceSpec::Gpu(k) = &self.device
        {
            return fail(
                "device",
                format!("the cpu backend has one device (got {k}): use \"default\""),
            );
        }
        self.loss_scaler
            .validate()
            .map_err(|e| e.within("loss_scaler"))
    }

    /// Micro-batch size after defaulting.
    pub fn micro_batch_size(&self) -> usize {
        match self.micro_batch_size {
            0 => self.batch_size,
            m => m,
        }
    }
}

/// A recipe that cannot be used: which file, which key, what is wrong and what would do.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct RecipeError {
    pub file: String,
    /// Dotted key path, e.g. `optimizer.lr`; `(file)` or `(toml)` when no key applies.
    pub key: String,
    pub message: String,
}

impl Recipe {
    /// Read, override, type-check and validate a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("cannot read the recipe: {e}"),
        })?;
        let default_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        Self::from_toml_str(&text, &file, &default_name, overrides)
    }

    /// Parse recipe text; `file` names it in errors.
    pub fn from_toml_str(
        text: &str,
        file: &str,
        default_name: &str,
        overrides: &[String],
    ) -> Result<Self, RecipeError> {
        let err = |key: &str, message: String| RecipeError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err("(toml)", one_line(&e.to_string())))?;
        for ov in overrides {
            apply_override(&mut table, ov).map_err(|m| err(&format!("--set {ov}"), m))?;
        }
        // `[model.<mixer>]` tables belong to the mixers: take them out of `[model]` and read
        // them as the registry's options, so every mixer's keys keep their full path in errors.
        let mut mixer_tables = toml::Table::new();
        if let Some(toml::Value::Table(model)) = table.get_mut("model") {
            for name in MixerKind::NAMES {
                if let Some(options) = model.remove(*name) {
                    mixer_tables.insert(name.to_string(), options);
                }
            }
        }
        let deserialize_error = |prefix: &str, e: serde_path_to_error::Error<toml::de::Error>| {
            let key = format!("{prefix}{}", e.path());
            let key = key.trim_end_matches('.');
            err(
                if key.is_empty() { "(top level)" } else { key },
                one_line(&e.inner().to_string()),
            )
        };
        let mut recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| deserialize_error("", e))?;
        recipe.model.mixer_options =
            serde_path_to_error::deserialize(toml::Value::Table(mixer_tables.clone()))
                .map_err(|e| deserialize_error("model.", e))?;
        if recipe.name.is_empty() {
            recipe.name = default_name.to_string();
        }
        // A short smoke run (`--set training.steps=30`) just works, as in nanoGPT.
        let (warmup, steps) = (recipe.lr_scheduler.warmup_steps, recipe.training.steps);
        if warmup > steps && steps > 0 {
            recipe.lr_scheduler.warmup_steps = steps / 10;
            eprintln!(
                "note: {file}: lr_scheduler.warmup_steps = {warmup} is longer than training.steps = \
                 {steps}; warming up over {} steps instead",
                steps / 10
            );
        }
        let written: Vec<MixerKind> = mixer_tables
            .keys()
            .filter_map(|name| MixerKind::from_name(name))
            .collect();
        recipe
            .validate(&written)
            .map_err(|e| err(&e.key, e.message))?;
        let attention = recipe
            .layer_mixers()
            .iter()
            .any(|m| matches!(m, MixerKind::Softmax | MixerKind::Moh));
        if attention
            && recipe.parallelism.sequence_parallel_degree > 1
            && recipe.model.dropout > 0.0
        {
            eprintln!(
                "note: {file}: ring attention (parallelism.sequence_parallel_degree > 1) does not \
                 drop attention weights; model.dropout = {} still acts on the residual stream \
                 and the MLP",
                recipe.model.dropout
            );
        }
        Ok(recipe)
    }

    /// The mixer of each layer.
    pub fn layer_mixers(&self) -> Vec<MixerKind> {
        self.model.layer_mixers()
    }

    /// Micro-batch size after defaulting.
    pub fn micro_batch_size(&self) -> usize {
        self.training.micro_batch_size()
    }

    /// Positions per training sequence: `training.seq_len`, or a task's own `task.seq_len`.
    pub fn seq_len(&self) -> usize {
        match self.task.kind {
            TaskKind::Lm => self.training.seq_len,
            _ => self.task.seq_len(self.training.seq_len),
        }
    }

    /// Folder of this run.
    pub fn run_dir(&self) -> PathBuf {
        self.checkpoint.folder.join(&self.name)
    }

    /// The resolved recipe as TOML (what the run directory keeps), with the options of the
    /// mixers in use and of any other mixer whose options differ from the defaults.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::try_from(self).expect("a recipe always serialises");
        let options = toml::Table::try_from(&self.model.mixer_options).expect("options serialise");
        let defaults =
            toml::Table::try_from(MixerOptionsSet::default()).expect("options serialise");
        let used = self.layer_mixers();
        if let Some(toml::Value::Table(model)) = table.get_mut("model") {
            for (name, value) in options {
                let in_use = used.iter().any(|k| k.name() == name);
                if in_use || defaults.get(&name) != Some(&value) {
                    model.insert(name, value);
                }
            }
        }
        toml::to_string_pretty(&table).expect("a recipe always serialises")
    }

    /// What in `new` builds another network than this recipe — keys of `[model]` and of the
    /// options of the mixers either uses (dropout aside), the learned position table's
    /// length, `data.tokenizer` — as `key: old → new`. A resume cannot change these.
    pub fn architecture_changes(&self, new: &Recipe) -> Vec<String> {
        let used: Vec<MixerKind> = self
            .layer_mixers()
            .into_iter()
            .chain(new.layer_mixers())
            .collect();
        let flat = |r: &Recipe| {
            let mut out = std::collections::BTreeMap::new();
            let table: toml::Table = r.to_toml().parse().expect("to_toml writes TOML");
            if let Some(toml::Value::Table(model)) = table.get("model") {
                flatten("model", model, &mut out);
            }
            out.retain(|k: &String, _| {
                let mixer = k.split('.').nth(1).and_then(MixerKind::from_name);
                k != "model.dropout" && mixer.is_none_or(|m| used.contains(&m))
            });
            out
        };
        let (old, now) = (flat(self), flat(new));
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(now.keys()).collect();
        let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
        let mut changes: Vec<String> = keys
            .into_iter()
            .filter(|k| old.get(*k) != now.get(*k))
            .map(|k| format!("{k}: {} → {}", show(old.get(k)), show(now.get(k))))
            .collect();
        let table_len = |r: &Recipe| match r.model.max_seq_len {
            0 => r.training.seq_len,
            n => n,
        };
        if self.model.position == crate::model::config::PositionKind::Learned
            && self.model.max_seq_len == 0
            && table_len(self) != table_len(new)
        {
            changes.push(format!(
                "training.seq_len (the length of the learned position table when \
                 model.max_seq_len = 0): {} → {}",
                table_len(self),
                table_len(new)
            ));
        }
        if let (Some(a), Some(b)) = (&self.data.tokenizer, &new.data.tokenizer)
            && a != b
        {
            changes.push(format!("data.tokenizer: {a} → {b}"));
        }
        if self.task.kind != new.task.kind {
            changes.push(format!(
                "task.kind: {} → {} (another head and vocabulary)",
                self.task.kind.name(),
                new.task.kind.name()
            ));
        }
        changes
    }

    /// Positions per chunk when sequence parallelism cuts each sequence, if it does.
    pub fn sharded_chunk_len(&self) -> Option<usize> {
        let p = &self.parallelism;
        (p.sequence_parallel_degree > 1).then(|| {
            let chunks = match p.sequence_sharding {
                Sharding::Zigzag => 2 * p.sequence_parallel_degree,
                Sharding::Contiguous => p.sequence_parallel_degree,
            };
            self.seq_len() / chunks
        })
    }

    /// Impossible values: each section checks its own keys; what spans sections is here.
    /// `written`: the mixers whose options table the recipe gave (checked even if unused).
    fn validate(&self, written: &[MixerKind]) -> Result<(), OptionError> {
        let t = &self.training;
        let p = &self.parallelism;
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return fail(
                "name",
                format!(
                    "{:?} is not a usable run name: use letters, digits, '-' or '_'",
                    self.name
                ),
            );
        }
        t.validate().map_err(|e| e.within("training"))?;
        self.validate_sequence_split()?;
        self.model
            .validate(written, self.sharded_chunk_len())
            .map_err(|e| e.within("model"))?;
        let m = &self.model;
        let seq_len = self.seq_len();
        if m.max_seq_len != 0 && m.max_seq_len < seq_len {
            return fail(
                "model.max_seq_len",
                format!(
                    "{} is shorter than the {seq_len} positions a training sequence has: use 0 \
                     (= that length) or at least {seq_len}",
                    m.max_seq_len
                ),
            );
        }
        if !m.causal && self.task.kind == TaskKind::Lm {
            return fail(
                "model.causal",
                "false lets every position see the tokens after it, which next-token \
                 prediction must not (it would read its own targets): keep true for \
                 task.kind = \"lm\", or pick a task such as \"classify\" or \"listops\"",
            );
        }
        if !m.causal && p.sequence_parallel_degree > 1 {
            return fail(
                "parallelism.sequence_parallel_degree",
                format!(
                    "{}: the bidirectional mixers (model.causal = false) have no \
                     sequence-parallel form yet; use 1, or data_parallel_degree for more ranks",
                    p.sequence_parallel_degree
                ),
            );
        }
        self.task.validate(seq_len).map_err(|e| e.within("task"))?;
        self.data.validate().map_err(|e| e.within("data"))?;
        self.optimizer
            .validate()
            .map_err(|e| e.within("optimizer"))?;
        self.lr_scheduler
            .validate(t.steps, self.optimizer.lr)
            .map_err(|e| e.within("lr_scheduler"))?;
        self.checkpoint
            .validate()
            .map_err(|e| e.within("checkpoint"))?;
        self.metrics.validate().map_err(|e| e.within("metrics"))?;
        p.validate(t.micro_batch_size(), t.backend)
            .map_err(|e| e.within("parallelism"))?;
        Ok(())
    }

    /// Sequence parallelism needs equal chunks and mixers that know how to run on them.
    fn validate_sequence_split(&self) -> Result<(), OptionError> {
        let p = &self.parallelism;
        let sp = p.sequence_parallel_degree;
        if sp <= 1 {
            return Ok(());
        }
        let chunks = match p.sequence_sharding {
            Sharding::Zigzag => 2 * sp,
            Sharding::Contiguous => sp,
        };
        let seq_len = self.seq_len();
        if !seq_len.is_multiple_of(chunks) {
            let sharding = match p.sequence_sharding {
                Sharding::Zigzag => "zigzag",
                Sharding::Contiguous => "contiguous",
            };
            let key = match self.task.kind {
                TaskKind::Lm => "training.seq_len",
                _ => "task.seq_len",
            };
            return fail(
                key,
                format!(
                    "{seq_len} does not split into {chunks} equal chunks ({sharding} sharding \
                     over {sp} ranks): use a multiple of {chunks}"
                ),
            );
        }
        if let Some(kind) = self
            .layer_mixers()
            .into_iter()
            .find(|k| k.sharded_form() == ShardedForm::Unsupported)
        {
            let able: Vec<&str> = MixerKind::ALL
                .iter()
                .filter(|k| k.sharded_form() != ShardedForm::Unsupported)
                .map(|k| k.name())
                .collect();
            return fail(
                "parallelism.sequence_parallel_degree",
                format!(
                    "{sp}: the {kind} mixer cannot run on a split sequence; use 1, or one of {}",
                    able.join(", ")
                ),
            );
        }
        Ok(())
    }
}

/// Apply `section.key=value` to a parsed recipe. The value is read as TOML (numbers,
/// booleans, arrays, quoted strings); anything else is taken as a bare string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE, e.g. optimizer.lr=3e-4".to_string())?;
    let path = path.trim();
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("{path:?} is not a key path like optimizer.lr"));
    }
    let (last, sections) = keys.split_last().expect("split yields one key at least");
    let mut node = table;
    for section in sections {
        node = node
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{section} is a value, not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let r = Recipe::from_toml_str("", "x.toml", "x", &[]).unwrap();
        assert_eq!(r.name, "x");
        let again = Recipe::from_toml_str(&r.to_toml(), "y.toml", "y", &[]).unwrap();
        assert_eq!(r, again);
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let r = Recipe::from_toml_str(
            "[optimizer]\nlr = 1e-3\n",
            "x.toml",
            "x",
            &[
                "optimizer.lr=3e-4".into(),
                "model.mixers=[\"softmax\",\"softmax\"]".into(),
                "model.n_layers=2".into(),
                "name=other".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.optimizer.lr, 3e-4);
        assert_eq!(r.model.n_layers, 2);
        assert_eq!(r.layer_mixers().len(), 2);
        assert_eq!(r.name, "other");
    }
}

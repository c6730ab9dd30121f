//! `train`: a run from start (or resume) to its last step — the loop that ties the
//! trainer's step to the checkpoint manager, evaluation and metrics.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use indicatif::{ProgressBar, ProgressStyle};

use super::Trainer;
use super::trainer::{evaluate, evaluate_task};
use crate::components::checkpoint::{CheckpointManager, Stateful};
use crate::components::metrics::{Metrics, StepMetrics};
use crate::components::{RunLock, stop_signal};
use crate::data::{Dataset, TOKENIZER_FILE};
use crate::recipe::Recipe;
use crate::run::{DATA_DIR, RECIPE_FILE};
use crate::tasks::{TaskData, TaskKind};

/// How `train` starts and how much it says.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest intact checkpoint of the run.
    pub resume: bool,
    /// Start from the weights of an export folder, a Hugging Face GPT-2/Llama folder or a
    /// safetensors file (see [`crate::export::init_from`]).
    pub init_from: Option<PathBuf>,
    /// Stop after this step as if killed (checkpoints written so far stay): for tests.
    pub stop_after: Option<u64>,
    /// No progress bar or log lines.
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_bits_per_byte: Option<f64>,
    /// Validation accuracy of a task run.
    pub val_accuracy: Option<f64>,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub run_dir: PathBuf,
}

/// Seed of the validation batches: fixed, so every eval scores the same windows.
pub const EVAL_SEED_SALT: u64 = 0x5eed_0e7a;

/// The run folder, locked for this process. If this command created the folder and fails
/// before the run starts, the folder is removed (while still locked), so a failed start
/// leaves nothing behind.
struct LockedRunFolder {
    dir: PathBuf,
    /// This command created the folder and the run has not started yet.
    armed: bool,
    lock: Option<RunLock>,
}

impl LockedRunFolder {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Only the process whose create_dir succeeds created it: two starting at once
        // cannot both think so.
        let created = match std::fs::create_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        };
        let lock = RunLock::acquire(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            armed: created,
            lock: Some(lock),
        })
    }
}

impl Drop for LockedRunFolder {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        drop(self.lock.take());
    }
}

pub fn train(recipe: &Recipe, opts: &TrainOptions) -> anyhow::Result<TrainSummary> {
    let run_dir = recipe.run_dir();
    let t = &recipe.training;
    let p = &recipe.parallelism;
    // One process per run: held until this function returns.
    let mut folder = LockedRunFolder::open(&run_dir)?;
    let mut checkpoints = CheckpointManager::new(&run_dir, &recipe.checkpoint);
    let resume_from = checkpoints.resume_point(opts.resume, opts.quiet)?;
    let saved_recipe = run_dir.join(RECIPE_FILE);
    if resume_from.is_some() && saved_recipe.is_file() {
        let saved = Recipe::load(&saved_recipe, &[]).map_err(anyhow::Error::from)?;
        let changes = saved.architecture_changes(recipe);
        if !changes.is_empty() {
            bail!(
                "--resume would change the architecture of {} ({}), which its checkpoints \
                 cannot load into; keep those keys as the run has them (its recipe.toml), or \
                 start a new run (--set name=...) from exported weights with --init-from",
                run_dir.display(),
                changes.join("; ")
            );
        }
    }

    let data = RunData::open(recipe, Some(&run_dir.join(DATA_DIR)), opts.quiet)?;
    let mut trainer = match &data {
        RunData::Text(d) => Trainer::new(recipe, d.tokenizer.vocab_size())?,
        RunData::Task(d) => Trainer::with_classes(recipe, d.vocab_size(), d.num_classes())?,
    };
    if let Some(path) = &opts.init_from {
        let model = crate::export::init_from(trainer.model().clone(), &trainer.config, path)
            .context("--init-from")?;
        trainer.set_model(model);
    }
    if let Some((ckpt, reader)) = &resume_from {
        trainer
            .load_state(reader)
            .with_context(|| format!("resuming from {}", ckpt.dir.display()))?;
        if !opts.quiet {
            eprintln!("resuming {} from step {}", run_dir.display(), ckpt.step);
        }
    }
    // Written only once everything the run needs has loaded, so a failed command leaves
    // them as they were; atomically, so a reader never sees half of one.
    let mut resolved = recipe.clone();
    if let RunData::Text(d) = &data {
        resolved.data.tokenizer = Some(d.spec.to_string());
    }
    crate::data::write_atomically(&run_dir.join(RECIPE_FILE), resolved.to_toml().as_bytes())?;
    if let RunData::Text(d) = &data {
        d.save_tokenizer(&run_dir.join(TOKENIZER_FILE))?;
    }
    folder.armed = false;

    let mut metrics = Metrics::new(
        &run_dir,
        &recipe.metrics,
        // The checkpoint's own step was logged before the kill and is not replayed.
        resume_from.as_ref().map(|(c, _)| c.step + 1),
    );
    let micro = recipe.micro_batch_size();
    let bar = if opts.quiet {
        ProgressBar::hidden()
    } else {
        eprintln!(
            "training {}{} ({} parameters, mixers {:?}) for {} steps on {:?} {}, {}{}",
            recipe.name,
            match recipe.task.kind {
                TaskKind::Lm => String::new(),
                k => format!(" on task {}", k.name()),
            },
            trainer.model().num_params(),
            trainer
                .config
                .mixers
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>(),
            t.steps,
            t.backend,
            t.device,
            format!("{:?}", t.precision).to_lowercase(),
            if p.ranks() > 1 {
                format!(
                    ", {} ranks (data {} x sequence {})",
                    p.ranks(),
                    p.data_parallel_degree,
                    p.sequence_parallel_degree
                )
            } else {
                String::new()
            }
        );
        ProgressBar::new(t.steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.progress.step);
    if trainer.progress.step >= t.steps && !opts.quiet {
        eprintln!(
            "{} is already trained to step {} (training.steps = {}): raise training.steps \
             (e.g. --set training.steps={}) to continue it",
            run_dir.display(),
            trainer.progress.step,
            t.steps,
            t.steps * 2
        );
    }

    let remote = recipe
        .parallelism
        .devices
        .iter()
        .any(|d| matches!(d, crate::device::DeviceSpec::Remote(_)));
    let start = Instant::now();
    let first_step = trainer.progress.step;
    let tokens_per_step = (t.batch_size * recipe.seq_len()) as u64;
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    let mut last_bpb = None;
    let mut last_accuracy = None;
    while trainer.progress.step < t.steps {
        if opts.stop_after.is_some_and(|s| trainer.progress.step >= s) {
            break;
        }
        let step = trainer.progress.step;
        // A remote rank that stops or restarts mid-step surfaces as a panic where a tensor
        // is read: stop with the step, the rank's cause, what was saved and what to do.
        let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &data {
            RunData::Text(d) => trainer.step(&d.train),
            RunData::Task(d) => trainer.step_task(d),
        })) {
            Ok(out) => out,
            Err(panic) if !remote => std::panic::resume_unwind(panic),
            Err(_) => {
                bar.abandon();
                bail!(
                    "step {}: a remote rank in parallelism.devices failed (its error is above); \
                     stopping. {}. Check that every `metamix serve` is running (a server whose \
                     peer restarted keeps a dead connection to it: restart them all), then \
                     continue with `metamix train <recipe> --resume`",
                    step + 1,
                    checkpoints.last_good()
                );
            }
        };
        let loss = out.loss;
        if out.skipped {
            let scale = trainer.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
            if scale < 1.0 {
                bar.abandon();
                bail!(
                    "step {}: f16 gradients overflow even with the loss scale backed off to \
                     {scale:e}; stopping without saving. Use training.precision = \"bf16\" \
                     or \"f32\", or a lower optimizer.lr",
                    step + 1
                );
            }
        } else if !out.finite() {
            bar.abandon();
            let what = if loss.is_finite() {
                "gradient norm"
            } else {
                "loss"
            };
            bail!(
                "step {}: the {what} is {} (loss {loss}); stopping without saving. {}. \
                 Try a lower optimizer.lr or training.grad_clip",
                step + 1,
                if loss.is_finite() {
                    out.grad_norm
                } else {
                    loss
                },
                checkpoints.last_good()
            );
        }
        last_loss = loss;
        let s = trainer.progress.step;
        bar.set_position(s);
        let reported = StepMetrics {
            loss,
            aux_loss: out.aux_loss,
            lr: out.lr,
            grad_norm: out.grad_norm,
            loss_scale: trainer
                .loss_scaler
                .as_ref()
                .map(|l| (l.scale, l.skipped_steps)),
        };
        if let Some(line) = metrics.step(s, t.steps, tokens_per_step, &reported) {
            bar.set_message(line);
        }
        if let Some(accuracy) = out.accuracy {
            metrics.scalar("train/accuracy", accuracy, s);
        }
        if (t.eval_interval > 0 && s % t.eval_interval == 0) || s == t.steps {
            let model = trainer.model().valid();
            let (val, bpb, accuracy) = match &data {
                RunData::Text(d) => {
                    let e = evaluate(
                        &model,
                        &d.val,
                        t.eval_batches,
                        micro,
                        t.seq_len,
                        t.seed ^ EVAL_SEED_SALT,
                        &trainer.ranks,
                    );
                    (e.loss, e.bits_per_byte, None)
                }
                RunData::Task(d) => {
                    // The last eval scores the whole validation set; earlier ones a sample.
                    let limit = (s < t.steps).then_some(t.eval_batches * micro);
                    let pad_to = Trainer::pad_to(recipe);
                    let e = evaluate_task(&model, d, micro, limit, pad_to, &trainer.ranks);
                    (e.loss, None, Some(e.accuracy))
                }
            };
            metrics.scalar("val/loss", val, s);
            if let Some(bpb) = bpb {
                metrics.scalar("val/bits_per_byte", bpb, s);
            }
            if let Some(accuracy) = accuracy {
                metrics.scalar("val/accuracy", accuracy, s);
            }
            metrics.flush();
            last_val = Some(val);
            last_bpb = bpb;
            last_accuracy = accuracy;
            if !opts.quiet {
                bar.suspend(|| {
                    eprintln!(
                        "step {s} ({:.1} s): train loss {loss:.4}, val loss {val:.4}{}{}",
                        start.elapsed().as_secs_f64(),
                        bpb.map_or(String::new(), |b| format!(", val {b:.4} bits/byte")),
                        accuracy.map_or(String::new(), |a| format!(
                            ", val accuracy {:.1}%",
                            100.0 * a
                        ))
                    )
                });
            }
        }
        let stop = stop_signal::requested();
        if checkpoints.due(s, t.steps) || (stop && checkpoints.last_saved() != Some(s)) {
            checkpoints.save(s, &trainer)?;
        }
        if stop && s < t.steps {
            bar.abandon();
            metrics.flush();
            bail!(
                "stopped by a signal after step {s}: checkpoint step-{s} is saved in {}; \
                 continue with `metamix train <recipe> --resume`",
                run_dir.join("checkpoints").display()
            );
        }
    }
    bar.finish_and_clear();
    metrics.flush();
    let wall_s = start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        step: trainer.progress.step,
        train_loss: last_loss,
        val_loss: last_val,
        val_bits_per_byte: last_bpb,
        val_accuracy: last_accuracy,
        tokens_per_s: ((trainer.progress.step - first_step) * tokens_per_step) as f64 / wall_s,
        wall_s,
        run_dir,
    })
}

/// What a run trains on: a tokenized corpus (`task.kind = "lm"`) or a task's examples.
pub enum RunData {
    Text(Dataset),
    Task(TaskData),
}

impl RunData {
    /// The data `recipe` names; a text file is prepared into `prepare_dir` (a run's data
    /// folder), or in memory without one.
    pub fn open(recipe: &Recipe, prepare_dir: Option<&Path>, quiet: bool) -> anyhow::Result<Self> {
        let t = &recipe.training;
        if recipe.task.kind == TaskKind::Lm {
            let data = Dataset::open(&recipe.data, t.seed, prepare_dir, quiet)?;
            data.check_seq_len(t.seq_len, &recipe.data.path)?;
            Ok(RunData::Text(data))
        } else {
            let data = TaskData::open(&recipe.task, recipe.seq_len(), t.seed, quiet)?;
            Ok(RunData::Task(data))
        }
    }
}

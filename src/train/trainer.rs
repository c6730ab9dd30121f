//! The step-based training loop: forward, loss, backward (accumulated over micro-batches),
//! global-norm clipping, AdamW, LR schedule, periodic eval, metrics and checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{Checkpoint, OPTIMIZER_FILE, TrainerState};
use super::loss_scaler::LossScaler;
use super::lr_schedule::LrSchedule;
use super::metrics::Metrics;
use super::optimizer::{AdamW, clip_factor, global_grad_norm};
use crate::data::{CharTokenizer, Corpus, WindowSampler};
use crate::mixed_precision::autocast;
use crate::model::LanguageModel;
use crate::parallel::Ranks;
use crate::recipe::{Precision, Recipe};
use crate::run::{RECIPE_FILE, VOCAB_FILE, model_config};

/// How `train` starts and how much it says.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest intact checkpoint of the run.
    pub resume: bool,
    /// Start from weights in a safetensors file (as `export` writes).
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
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub run_dir: PathBuf,
}

/// Seed of the validation batches: fixed, so every eval scores the same windows.
pub const EVAL_SEED_SALT: u64 = 0x5eed_0e7a;

pub fn train(recipe: &Recipe, opts: &TrainOptions) -> anyhow::Result<TrainSummary> {
    let run_dir = recipe.run_dir();
    let t = &recipe.training;
    let ranks = Ranks::from_recipe(recipe)?;
    let base_device = ranks.device(0).clone();
    let device = base_device.clone().autodiff();
    let p = &recipe.parallelism;

    // Where we start: fresh, or the newest intact checkpoint.
    let existing = super::Checkpoint::list(&run_dir)?;
    let resume_from = if opts.resume {
        let found = Checkpoint::latest_valid(&run_dir)?;
        if found.is_none() && !existing.is_empty() {
            // Never train over checkpoints that exist but could not be read: they may be
            // recoverable by hand, and starting fresh would overwrite them.
            bail!(
                "none of the {} checkpoints in {} is intact (see the warnings above); move \
                 them away to start this run fresh",
                existing.len(),
                super::checkpoint::checkpoints_dir(&run_dir).display()
            );
        }
        if found.is_none() && !opts.quiet {
            eprintln!(
                "note: {} has no checkpoint yet; starting fresh",
                run_dir.display()
            );
        }
        found
    } else if !existing.is_empty() {
        bail!(
            "{} already holds checkpoints (newest: step-{}); pass --resume to continue it, or \
             pick another run name with --set name=...",
            run_dir.display(),
            existing[0].step
        );
    } else {
        None
    };

    let tokenizer = match &resume_from {
        Some(_) => Some(CharTokenizer::load(&run_dir.join(VOCAB_FILE))?),
        None => None,
    };
    let corpus = Corpus::load(&recipe.data.path, recipe.data.val_fraction, tokenizer)?;
    corpus.check_seq_len(t.seq_len, &recipe.data.path)?;
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    std::fs::write(run_dir.join(RECIPE_FILE), recipe.to_toml())?;
    corpus.tokenizer.save(&run_dir.join(VOCAB_FILE))?;

    let config = model_config(recipe, corpus.tokenizer.vocab_size());
    let mut model = config.init_seeded(t.seed, &device);
    if let Some(path) = &opts.init_from {
        model = crate::weights::load(model, path).context("--init-from")?;
    }
    let (mut optimizer, mut state) = match &resume_from {
        Some((ckpt, state)) => {
            model = crate::weights::load(model, &ckpt.dir.join(super::checkpoint::MODEL_FILE))?;
            let opt = AdamW::load(
                recipe.optimizer.clone(),
                &ckpt.dir.join(OPTIMIZER_FILE),
                &base_device,
            )?;
            if !opts.quiet {
                eprintln!("resuming {} from step {}", run_dir.display(), state.step);
            }
            (opt, state.clone())
        }
        None => (
            AdamW::new(recipe.optimizer.clone()),
            TrainerState {
                step: 0,
                tokens_seen: 0,
                sampler: WindowSampler::new(t.seed),
                loss_scaler: None,
                files: Default::default(),
            },
        ),
    };

    // f16 needs loss scaling; a resumed run continues from the saved scale (and one resumed
    // in another precision drops it).
    if t.precision != Precision::F16 {
        state.loss_scaler = None;
    } else if state.loss_scaler.is_none() {
        state.loss_scaler = Some(LossScaler::new(&t.loss_scaler));
    }
    let schedule = LrSchedule::new(&recipe.lr_scheduler, recipe.optimizer.lr, t.steps);
    let mut metrics = Metrics::new(&run_dir, recipe.metrics.tensorboard);
    let micro = recipe.micro_batch_size();
    let tokens_per_step = (t.batch_size * t.seq_len) as u64;
    let n_params = model.num_params();

    let bar = if opts.quiet {
        ProgressBar::hidden()
    } else {
        eprintln!(
            "training {} ({} parameters, mixers {:?}) for {} steps on {:?} {}, {}{}",
            recipe.name,
            n_params,
            config.mixers.iter().map(|m| m.name()).collect::<Vec<_>>(),
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
    bar.set_position(state.step);

    if state.step >= t.steps && !opts.quiet {
        eprintln!(
            "{} is already trained to step {} (training.steps = {}): raise training.steps \
             (e.g. --set training.steps={}) to continue it",
            run_dir.display(),
            state.step,
            t.steps,
            t.steps * 2
        );
    }
    let start = Instant::now();
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    let mut last_saved: Option<u64> = resume_from.as_ref().map(|(c, _)| c.step);

    while state.step < t.steps {
        if opts.stop_after.is_some_and(|s| state.step >= s) {
            break;
        }
        let step = state.step;
        let lr = schedule.lr(step);
        if recipe.model.dropout > 0.0 {
            // Dropout draws from the backend's RNG: re-seed it per step so a resumed run
            // draws the same masks as an uninterrupted one.
            device.seed(t.seed ^ (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }

        let (next, out) = train_step(
            model,
            &mut optimizer,
            &mut state.sampler,
            &corpus.train,
            recipe,
            lr,
            &device,
            &ranks,
            state.loss_scaler.as_mut(),
        );
        model = next;
        let (loss, grad_norm) = (out.loss, out.grad_norm);
        if out.skipped {
            let scale = state.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
            if scale < 1.0 {
                bar.abandon();
                bail!(
                    "step {}: f16 gradients overflow even with the loss scale backed off to                      {scale:e}; stopping without saving. Use training.precision = \"bf16\" \
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
            let kept = match last_saved {
                Some(s) => format!(
                    "the last good checkpoint, step-{s} in {}, is intact",
                    super::checkpoint::checkpoints_dir(&run_dir).display()
                ),
                None => "no checkpoint had been written yet".to_string(),
            };
            bail!(
                "step {}: the {what} is {} (loss {loss}); stopping without saving. {kept}. \
                 Try a lower optimizer.lr or training.grad_clip",
                step + 1,
                if loss.is_finite() { grad_norm } else { loss }
            );
        }
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        window_tokens += tokens_per_step;
        last_loss = loss;
        bar.set_position(state.step);

        let s = state.step;
        if s % recipe.metrics.log_interval == 0 || s == t.steps {
            let tps = window_tokens as f64 / window_start.elapsed().as_secs_f64();
            window_start = Instant::now();
            window_tokens = 0;
            metrics.scalar("train/loss", loss, s);
            if out.aux_loss != 0.0 {
                metrics.scalar("train/aux_loss", out.aux_loss, s);
            }
            metrics.scalar("lr", lr, s);
            metrics.scalar("grad_norm", grad_norm, s);
            metrics.scalar("tokens_per_s", tps, s);
            if let Some(scaler) = &state.loss_scaler {
                metrics.scalar("loss_scale", scaler.scale, s);
                metrics.scalar("skipped_steps", scaler.skipped_steps as f64, s);
            }
            bar.set_message(format!("loss {loss:.4} | lr {lr:.2e} | {tps:.0} tok/s"));
        }
        let eval_now = (t.eval_interval > 0 && s % t.eval_interval == 0) || s == t.steps;
        if eval_now {
            let val = evaluate(
                &model.valid(),
                &corpus.val,
                t.eval_batches,
                micro,
                t.seq_len,
                t.seed ^ EVAL_SEED_SALT,
                &ranks,
            );
            metrics.scalar("val/loss", val, s);
            metrics.flush();
            last_val = Some(val);
            if !opts.quiet {
                bar.suspend(|| {
                    eprintln!(
                        "step {s} ({:.1} s): train loss {loss:.4}, val loss {val:.4}",
                        start.elapsed().as_secs_f64()
                    )
                });
            }
        }
        let interval = recipe.checkpoint.interval;
        if (interval > 0 && s % interval == 0) || s == t.steps {
            let ckpt = Checkpoint::save(
                &run_dir,
                &model,
                &optimizer,
                &state,
                recipe.checkpoint.keep_latest_k,
            )?;
            last_saved = Some(ckpt.step);
        }
    }
    bar.finish_and_clear();
    metrics.flush();
    let wall_s = start.elapsed().as_secs_f64();
    let summary = TrainSummary {
        step: state.step,
        train_loss: last_loss,
        val_loss: last_val,
        tokens_per_s: (state
            .step
            .saturating_sub(resume_from.map_or(0, |(c, _)| c.step))
            * tokens_per_step) as f64
            / wall_s,
        wall_s,
        run_dir,
    };
    Ok(summary)
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// Mean cross-entropy over the step's micro-batches.
    pub loss: f64,
    /// Mean auxiliary loss (MoH load balance; 0 without it), before its coefficient.
    pub aux_loss: f64,
    /// Global gradient norm before clipping (of the unscaled gradients).
    pub grad_norm: f64,
    /// The f16 loss scaler found an overflow: nothing was updated.
    pub skipped: bool,
}

impl StepOutput {
    pub fn finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// One optimizer step: forward/backward over `batch_size / micro_batch_size` micro-batches,
/// accumulate, clip to the global norm, update. A non-finite loss or gradient leaves the
/// model and optimizer untouched, so the caller can stop with nothing corrupted.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: LanguageModel,
    optimizer: &mut AdamW,
    sampler: &mut WindowSampler,
    tokens: &[u32],
    recipe: &Recipe,
    lr: f64,
    device: &Device,
    ranks: &Ranks,
    loss_scaler: Option<&mut LossScaler>,
) -> (LanguageModel, StepOutput) {
    let t = &recipe.training;
    let micro = recipe.micro_batch_size();
    let accum = t.batch_size / micro;
    let working = crate::device::working_dtype(t.precision);
    let loss_scale = loss_scaler.as_ref().map_or(1.0, |s| s.scale);
    let mut accumulator = GradientsAccumulator::<LanguageModel>::new();
    let (mut loss_sum, mut aux_sum) = (0.0, 0.0);
    for _ in 0..accum {
        let batch = sampler.batch(tokens, micro, t.seq_len, device);
        let loss = autocast(working, || {
            ranks.training_loss(&model, batch.inputs, batch.targets)
        });
        loss_sum += loss.cross_entropy.into_scalar::<f32>() as f64;
        if let Some(aux) = loss.aux {
            aux_sum += aux.into_scalar::<f32>() as f64;
        }
        let total = if loss_scale != 1.0 {
            loss.total.mul_scalar(loss_scale)
        } else {
            loss.total
        };
        let grads = GradientsParams::from_grads(total.backward(), &model);
        accumulator.accumulate(&model, grads);
    }
    let mut grads = accumulator.grads();
    let mut out = StepOutput {
        loss: loss_sum / accum as f64,
        aux_loss: aux_sum / accum as f64,
        // The gradient of the mean loss is the accumulated sum over accum (and the scale).
        grad_norm: global_grad_norm(&model, &grads) / accum as f64 / loss_scale,
        skipped: false,
    };
    if let Some(scaler) = loss_scaler
        && !scaler.update(out.grad_norm.is_finite(), &t.loss_scaler)
    {
        out.skipped = true;
        return (model, out);
    }
    if !out.finite() {
        return (model, out);
    }
    let scale = clip_factor(out.grad_norm, t.grad_clip) / accum as f64 / loss_scale;
    (optimizer.step(lr, model, &mut grads, scale), out)
}

/// Mean loss over `batches` windows drawn with a fresh sampler of `seed` (so the same
/// windows every call), on a model without autodiff, over `ranks` (one for a plain run).
pub fn evaluate(
    model: &LanguageModel,
    tokens: &[u32],
    batches: usize,
    batch_size: usize,
    seq_len: usize,
    seed: u64,
    ranks: &Ranks,
) -> f64 {
    let device = ranks.device(0);
    let mut sampler = WindowSampler::new(seed);
    let mut total = 0.0;
    for _ in 0..batches {
        let b = sampler.batch(tokens, batch_size, seq_len, device);
        let loss = ranks
            .training_loss(model, b.inputs, b.targets)
            .cross_entropy;
        total += loss.into_scalar::<f32>() as f64;
    }
    total / batches as f64
}

//! The trainer: one setup shared by `train`, `bench` and the tests — ranks, model,
//! optimizer, data sampler, loss scaler and LR schedule — and one optimizer step over them.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use serde::{Deserialize, Serialize};

use super::Ranks;
use crate::components::checkpoint::{CheckpointReader, CheckpointWriter, Stateful};
use crate::components::grad_clip::{clip_factor, global_grad_norm};
use crate::components::{AdamW, LossScaler, LrSchedule};
use crate::data::{TokenSplit, WindowSampler};
use crate::mixed_precision::autocast;
use crate::model::language_model::Targets;
use crate::model::{LanguageModel, LanguageModelConfig};
use crate::recipe::{Precision, Recipe};
use crate::run::task_model_config;
use crate::tasks::{TaskBatch, TaskData, batch_of};

/// Everything one optimizer step reads and updates.
pub struct Trainer {
    pub recipe: Recipe,
    pub ranks: Ranks,
    /// Rank 0's device, with autodiff: where the master weights live.
    pub device: Device,
    pub config: LanguageModelConfig,
    /// Taken out for the duration of a step (the optimizer consumes and returns it).
    model: Option<LanguageModel>,
    pub optimizer: AdamW,
    pub progress: Progress,
    /// Draws the training windows; its RNG state is checkpointed.
    pub sampler: WindowSampler,
    /// f16's dynamic loss scale (absent in f32 and bf16).
    pub loss_scaler: Option<LossScaler>,
    pub schedule: LrSchedule,
    /// The cpu backend's pool threads spinning for work while this trainer lives.
    _busy: crate::device::BusyPool,
}

/// How far a run has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
}

impl Stateful for Progress {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()> {
        into.entry("tokens_seen", &self.tokens_seen)
    }

    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()> {
        self.step = from.step()?;
        self.tokens_seen = from.required("tokens_seen")?;
        Ok(())
    }
}

/// A checkpoint holds every piece that carries state; the LR schedule has none (it is a
/// function of the step).
impl Stateful for Trainer {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()> {
        self.model().save_state(into)?;
        self.optimizer.save_state(into)?;
        self.progress.save_state(into)?;
        self.sampler.save_state(into)?;
        self.loss_scaler.save_state(into)
    }

    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()> {
        let mut model = self
            .model
            .take()
            .expect("the model is only out during a step");
        let loaded = model.load_state(from);
        self.model = Some(model);
        loaded?;
        self.optimizer.load_state(from)?;
        self.progress.load_state(from)?;
        self.sampler.load_state(from)?;
        self.loss_scaler.load_state(from)?;
        self.fit_loss_scaler();
        Ok(())
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// Mean cross-entropy over the step's micro-batches.
    pub loss: f64,
    /// Mean auxiliary loss (MoH load balance, weighted by its coefficient; 0 without one).
    pub aux_loss: f64,
    /// Mean accuracy over the step's micro-batches (tasks scored target by target).
    pub accuracy: Option<f64>,
    /// Global gradient norm before clipping (of the unscaled gradients).
    pub grad_norm: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// The f16 loss scaler found an overflow: nothing was updated.
    pub skipped: bool,
}

impl StepOutput {
    pub fn finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// Where a step's batches come from.
#[derive(Clone, Copy)]
pub enum Batches<'a> {
    /// Windows of a tokenized corpus (language modelling), drawn by the trainer's sampler.
    Text(&'a TokenSplit),
    /// A task's examples, batch `step · accumulation + micro-batch` of its stream.
    Task(&'a TaskData),
}

impl Trainer {
    /// A fresh start of `recipe` for a vocabulary of `vocab_size`: weights fixed by the seed,
    /// a new optimizer, sampler and (for f16) loss scaler.
    pub fn new(recipe: &Recipe, vocab_size: usize) -> anyhow::Result<Self> {
        Self::with_classes(recipe, vocab_size, None)
    }

    /// [`Self::new`] for a model with a classification head of `classes` (`None`: an LM).
    pub fn with_classes(
        recipe: &Recipe,
        vocab_size: usize,
        classes: Option<usize>,
    ) -> anyhow::Result<Self> {
        let t = &recipe.training;
        let ranks = Ranks::from_recipe(recipe)?;
        crate::mixed_precision::note_cpu_precision(t.backend, t.precision);
        let device = ranks.device(0).clone().autodiff();
        if recipe.model.vocab_size != 0 && recipe.model.vocab_size < vocab_size {
            anyhow::bail!(
                "model.vocab_size = {} is smaller than the {vocab_size} tokens of the data's \
                 tokenizer; set it to at least {vocab_size} (or 0 to take the tokenizer's; a \
                 multiple of 64 such as {} is faster)",
                recipe.model.vocab_size,
                vocab_size.div_ceil(64) * 64
            );
        }
        let config = task_model_config(recipe, vocab_size, classes);
        check_memory(&config, recipe)?;
        let model = config.init_seeded(t.seed, &device);
        let optimizer = AdamW::new(recipe.optimizer.clone(), &device);
        let busy = crate::device::BusyPool::for_devices((0..ranks.len()).map(|r| ranks.device(r)));
        let mut trainer = Self {
            recipe: recipe.clone(),
            ranks,
            device,
            config,
            model: Some(model),
            optimizer,
            progress: Progress::default(),
            sampler: WindowSampler::new(recipe.data.sampling, t.seed),
            loss_scaler: None,
            schedule: LrSchedule::new(&recipe.lr_scheduler, recipe.optimizer.lr, t.steps),
            _busy: busy,
        };
        trainer.fit_loss_scaler();
        Ok(trainer)
    }

    /// f16 needs loss scaling; a resumed run keeps its saved scale, and one resumed in
    /// another precision drops it.
    fn fit_loss_scaler(&mut self) {
        let t = &self.recipe.training;
        if t.precision != Precision::F16 {
            self.loss_scaler = None;
        } else if self.loss_scaler.is_none() {
            self.loss_scaler = Some(LossScaler::new(&t.loss_scaler));
        }
    }

    pub fn model(&self) -> &LanguageModel {
        self.model
            .as_ref()
            .expect("the model is only out during a step")
    }

    pub fn set_model(&mut self, model: LanguageModel) {
        self.model = Some(model);
    }

    pub fn into_model(self) -> LanguageModel {
        self.model.expect("the model is only out during a step")
    }

    /// One optimizer step on windows of `data`: forward/backward over `batch_size /
    /// micro_batch_size` micro-batches, accumulate, clip to the global norm, update at the
    /// schedule's learning rate. The step counts unless the loss or gradients are not finite;
    /// then model, optimizer and step are left as they were, so the caller can stop with
    /// nothing corrupted. (A step the f16 loss scaler skips counts, as in PyTorch.)
    pub fn step(&mut self, data: &TokenSplit) -> StepOutput {
        self.step_on(Batches::Text(data))
    }

    /// [`Self::step`] on a task's examples.
    pub fn step_task(&mut self, data: &TaskData) -> StepOutput {
        self.step_on(Batches::Task(data))
    }

    /// Sequences padded to a fixed length where sequence parallelism's layout needs one.
    pub fn pad_to(recipe: &Recipe) -> Option<usize> {
        (recipe.parallelism.sequence_parallel_degree > 1).then(|| recipe.seq_len())
    }

    fn step_on(&mut self, data: Batches) -> StepOutput {
        let t = &self.recipe.training;
        let step = self.progress.step;
        let lr = self.schedule.lr(step);
        if self.recipe.model.dropout > 0.0 {
            // Dropout draws from the backend's RNG: re-seed it per step so a resumed run
            // draws the same masks as an uninterrupted one.
            self.device
                .seed(t.seed ^ (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let model = self
            .model
            .take()
            .expect("the model is only out during a step");
        let micro = t.micro_batch_size();
        let accum = t.batch_size / micro;
        let working = crate::device::working_dtype(t.precision);
        let loss_scale = self.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        let mut accumulator = GradientsAccumulator::<LanguageModel>::new();
        let (mut loss_sum, mut aux_sum, mut accuracy_sum) = (0.0, 0.0, None);
        for i in 0..accum {
            let batch = match data {
                Batches::Text(split) => {
                    let b = self.sampler.batch(split, micro, t.seq_len, &self.device);
                    TaskBatch {
                        inputs: b.inputs,
                        targets: Targets::Next(b.targets),
                        padding: None,
                    }
                }
                Batches::Task(task) => batch_of(
                    &task.train_examples(step * accum as u64 + i as u64, micro),
                    Self::pad_to(&self.recipe),
                    &self.device,
                ),
            };
            let loss = autocast(working, || {
                self.ranks
                    .objective(&model, batch.inputs, &batch.targets, batch.padding.as_ref())
            });
            loss_sum += loss.cross_entropy.into_scalar::<f32>() as f64;
            if let Some(aux) = loss.aux {
                aux_sum += aux.into_scalar::<f32>() as f64;
            }
            if let Some(a) = loss.accuracy {
                *accuracy_sum.get_or_insert(0.0) += a.into_scalar::<f32>() as f64;
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
            accuracy: accuracy_sum.map(|a| a / accum as f64),
            // The gradient of the mean loss is the accumulated sum over accum (and the scale).
            grad_norm: global_grad_norm(&model, &grads) / accum as f64 / loss_scale,
            lr,
            skipped: false,
        };
        let overflow = self
            .loss_scaler
            .as_mut()
            .is_some_and(|s| !s.update(out.grad_norm.is_finite(), &t.loss_scaler));
        if overflow {
            out.skipped = true;
            self.model = Some(model);
        } else if !out.finite() {
            self.model = Some(model);
            return out;
        } else {
            let scale = clip_factor(out.grad_norm, t.grad_clip) / accum as f64 / loss_scale;
            self.model = Some(self.optimizer.step(lr, model, &mut grads, scale));
        }
        self.progress.step += 1;
        self.progress.tokens_seen += (t.batch_size * self.recipe.seq_len()) as u64;
        out
    }
}

/// Refuse a model and batch that cannot fit in this machine's memory (CPU backend; a GPU
/// reports its own out-of-memory), naming the estimate and the keys that set it.
fn check_memory(config: &LanguageModelConfig, recipe: &Recipe) -> anyhow::Result<()> {
    if recipe.training.backend != crate::device::BackendKind::Cpu {
        return Ok(());
    }
    let Some(total) = machine_memory_bytes() else {
        return Ok(());
    };
    let (params, state, activations) =
        config.training_bytes_estimate(recipe.micro_batch_size(), recipe.seq_len());
    if state + activations > total {
        let gib = |b: f64| b / f64::from(1u32 << 30);
        anyhow::bail!(
            "this model would need about {:.1} GiB to train — {:.3e} parameters with their \
             gradients and AdamW moments {:.1} GiB, activations of a micro-batch of {} × {} \
             tokens {:.1} GiB — but this machine has {:.1} GiB: lower model.d_model, \
             model.n_layers or model.mlp_ratio, or training.micro_batch_size or seq_len",
            gib(state + activations),
            params,
            gib(state),
            recipe.micro_batch_size(),
            recipe.training.seq_len,
            gib(activations),
            gib(total)
        );
    }
    Ok(())
}

/// Physical memory (Linux `/proc/meminfo`), if known.
fn machine_memory_bytes() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    /// Mean cross-entropy per token (nats).
    pub loss: f64,
    /// The same loss per byte of the text the targets stand for, in bits: comparable across
    /// tokenizers (`None` if the windows hold only special tokens).
    pub bits_per_byte: Option<f64>,
}

/// Loss over `batches` random windows drawn with a fresh sampler of `seed` (so the same
/// windows every call), on a model without autodiff, over `ranks` (one for a plain run).
pub fn evaluate(
    model: &LanguageModel,
    data: &TokenSplit,
    batches: usize,
    batch_size: usize,
    seq_len: usize,
    seed: u64,
    ranks: &Ranks,
) -> Evaluation {
    let device = ranks.device(0);
    let mut sampler = WindowSampler::new(crate::data::Sampling::Random, seed);
    let (mut total, mut bytes) = (0.0, 0u64);
    for _ in 0..batches {
        let b = sampler.batch(data, batch_size, seq_len, device);
        bytes += b.target_bytes;
        let loss = ranks
            .training_loss(model, b.inputs, b.targets)
            .cross_entropy;
        total += loss.into_scalar::<f32>() as f64;
    }
    let loss = total / batches as f64;
    let targets = (batches * batch_size * seq_len) as f64;
    Evaluation {
        loss,
        bits_per_byte: (bytes > 0).then(|| loss * targets / bytes as f64 / std::f64::consts::LN_2),
    }
}

/// What [`evaluate_task`] measured.
#[derive(Debug, Clone, Copy)]
pub struct TaskEvaluation {
    /// Mean cross-entropy per example (of its label, or of its scored tokens).
    pub loss: f64,
    /// Fraction of labels (or scored tokens) predicted right.
    pub accuracy: f64,
    pub examples: usize,
}

/// Loss and accuracy over a task's validation set (its first `limit` examples, if given) in
/// batches of `batch_size`, on a model without autodiff. Full batches spread over `ranks`;
/// a last, smaller one runs on rank 0 alone (data parallelism needs equal shares).
pub fn evaluate_task(
    model: &LanguageModel,
    data: &TaskData,
    batch_size: usize,
    limit: Option<usize>,
    pad_to: Option<usize>,
    ranks: &Ranks,
) -> TaskEvaluation {
    let device = ranks.device(0);
    let examples = &data.val[..limit.map_or(data.val.len(), |l| l.min(data.val.len()))];
    let (mut loss, mut accuracy) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size) {
        let b = batch_of(chunk, pad_to, device);
        let result = if chunk.len() == batch_size {
            ranks.objective(model, b.inputs, &b.targets, b.padding.as_ref())
        } else {
            model.objective(b.inputs, &b.targets, b.padding.as_ref())
        };
        let n = chunk.len() as f64;
        loss += result.cross_entropy.into_scalar::<f32>() as f64 * n;
        let hits = result.accuracy.expect("tasks are scored by accuracy");
        accuracy += hits.into_scalar::<f32>() as f64 * n;
    }
    let n = examples.len().max(1) as f64;
    TaskEvaluation {
        loss: loss / n,
        accuracy: accuracy / n,
        examples: examples.len(),
    }
}

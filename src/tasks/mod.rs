//! Tasks: what a run learns and how it is scored (`[task]`). `lm` is next-token prediction
//! on `[data]`'s corpus; the others hand the trainer batches of [`Example`]s — one label per
//! sequence (`classify` from files the user brings, `listops` generated) or tokens to predict
//! at some positions (`mqar`, `selective_copy`, `induction_heads`) — and are scored by
//! accuracy as well as loss.
//!
//! Every batch is a function of the seed and its index, so a resumed run draws the same
//! batches with nothing to checkpoint: generated tasks draw fresh examples per batch;
//! file-backed ones walk a seeded permutation of the training file, epoch after epoch.

pub mod classify_files;
pub mod example;
pub mod induction_heads;
pub mod listops;
pub mod mqar;
pub mod selective_copy;

use std::path::PathBuf;

use anyhow::Context;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::objective::Targets;
use crate::options::{OptionError, at_least_one, fail};
use crate::padding::Padding;
use classify_files::{LabeledText, TextTokenizer, Vocabulary};
pub use example::{Example, Target};
use induction_heads::InductionHeadsOptions;
use listops::ListOpsOptions;
use mqar::MqarOptions;
use selective_copy::SelectiveCopyOptions;

/// `[task] kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Next-token prediction on `[data]` (the default).
    #[default]
    Lm,
    /// One label per sequence, from LRA TSV or JSONL files (`[task.classify]`).
    Classify,
    /// LRA's ListOps, generated (`[task.listops]`).
    Listops,
    /// Zoology's multi-query associative recall (`[task.mqar]`).
    Mqar,
    /// The Mamba paper's selective copying (`[task.selective_copy]`).
    SelectiveCopy,
    /// The Mamba paper's induction heads (`[task.induction_heads]`).
    InductionHeads,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Lm => "lm",
            TaskKind::Classify => "classify",
            TaskKind::Listops => "listops",
            TaskKind::Mqar => "mqar",
            TaskKind::SelectiveCopy => "selective_copy",
            TaskKind::InductionHeads => "induction_heads",
        }
    }

    /// One label per sequence (a pooled classification head).
    pub fn classifies(self) -> bool {
        matches!(self, TaskKind::Classify | TaskKind::Listops)
    }
}

/// `[task]`: what the run learns. Each task's own options are its table (`[task.mqar]`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    pub kind: TaskKind,
    /// Length of a generated task's sequences, and the longest classification input (longer
    /// ones are cut); 0 = `training.seq_len`. `metamix eval --set task.seq_len=N` scores a
    /// trained model at another length.
    pub seq_len: usize,
    /// Examples in a generated task's validation set (drawn once, from its own seed).
    pub val_examples: usize,
    pub classify: ClassifyOptions,
    pub listops: ListOpsOptions,
    pub mqar: MqarOptions,
    pub selective_copy: SelectiveCopyOptions,
    pub induction_heads: InductionHeadsOptions,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            kind: TaskKind::Lm,
            seq_len: 0,
            val_examples: 512,
            classify: ClassifyOptions::default(),
            listops: ListOpsOptions::default(),
            mqar: MqarOptions::default(),
            selective_copy: SelectiveCopyOptions::default(),
            induction_heads: InductionHeadsOptions::default(),
        }
    }
}

/// `[task.classify]`: sequence classification from files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyOptions {
    /// Training examples: LRA's TSV (`Source\tTarget` header) or JSONL.
    pub train: PathBuf,
    /// Validation examples, in the same format.
    pub val: PathBuf,
    /// `byte` (LRA's byte-level text) or `word` (whitespace words, the vocabulary of the
    /// training file: ListOps' symbols).
    pub tokenizer: TextTokenizer,
    /// Classes; 0 = one more than the largest training label (and said so).
    pub num_classes: usize,
    /// Remove `(` and `)`, as LRA's ListOps pipeline does with its TSVs.
    pub strip_parens: bool,
    /// JSONL fields.
    pub text_field: String,
    pub label_field: String,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            val: PathBuf::new(),
            tokenizer: TextTokenizer::Byte,
            num_classes: 0,
            strip_parens: false,
            text_field: "text".into(),
            label_field: "label".into(),
        }
    }
}

impl TaskConfig {
    /// The sequence length of this task's examples under `[training] seq_len`.
    pub fn seq_len(&self, training_seq_len: usize) -> usize {
        match self.seq_len {
            0 => training_seq_len,
            n => n,
        }
    }

    /// Checks of `[task]` (keys relative to it) for sequences of `seq_len`.
    pub fn validate(&self, seq_len: usize) -> Result<(), OptionError> {
        at_least_one(&[("val_examples", self.val_examples)])?;
        fn within(table: &'static str) -> impl Fn(OptionError) -> OptionError {
            move |e| e.within(table)
        }
        match self.kind {
            TaskKind::Lm => Ok(()),
            TaskKind::Classify => {
                for (key, path) in [("train", &self.classify.train), ("val", &self.classify.val)] {
                    if path.as_os_str().is_empty() {
                        return fail(
                            &format!("classify.{key}"),
                            "is not set: name a .tsv (LRA's Source\\tTarget) or .jsonl file",
                        );
                    }
                }
                Ok(())
            }
            TaskKind::Listops => self.listops.validate(seq_len).map_err(within("listops")),
            TaskKind::Mqar => self.mqar.validate(seq_len).map_err(within("mqar")),
            TaskKind::SelectiveCopy => self
                .selective_copy
                .validate(seq_len)
                .map_err(within("selective_copy")),
            TaskKind::InductionHeads => self
                .induction_heads
                .validate(seq_len)
                .map_err(within("induction_heads")),
        }
    }
}

/// One batch, ready for the model.
pub struct TaskBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Targets,
    /// Positions after a shorter sequence's end; `None` when every sequence fills the batch.
    pub padding: Option<Padding>,
}

/// A non-LM task's examples: generated on demand, or read from files.
pub struct TaskData {
    pub kind: TaskKind,
    config: TaskConfig,
    seed: u64,
    seq_len: usize,
    source: Source,
    /// The validation set, fixed for the run.
    pub val: Vec<Example>,
    vocab_size: usize,
    num_classes: Option<usize>,
}

enum Source {
    Generated,
    Files {
        train: Vec<Example>,
        /// The last epoch's order, kept so a batch does not reshuffle the whole file.
        order: std::sync::Mutex<(u64, Vec<usize>)>,
    },
}

/// Seeds of the validation set and of training batches differ by this.
const VAL_SALT: u64 = 0x7a5c_0e7a_1d00_0001;

impl TaskData {
    /// The task `config` names, for sequences of `seq_len`, seeded by `seed`. Says on
    /// stderr (unless `quiet`) what it inferred.
    pub fn open(
        config: &TaskConfig,
        seq_len: usize,
        seed: u64,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        config
            .validate(seq_len)
            .map_err(|e| anyhow::anyhow!("task.{}: {}", e.key, e.message))?;
        let generated = |vocab_size: usize, num_classes: Option<usize>| {
            let mut data = TaskData {
                kind: config.kind,
                config: config.clone(),
                seed,
                seq_len,
                source: Source::Generated,
                val: Vec::new(),
                vocab_size,
                num_classes,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ VAL_SALT);
            data.val = (0..config.val_examples)
                .map(|_| data.generate(&mut rng))
                .collect();
            data
        };
        let data = match config.kind {
            TaskKind::Lm => anyhow::bail!("task.kind = \"lm\" reads [data], not a task"),
            TaskKind::Listops => generated(
                config.listops.vocab_size(),
                Some(config.listops.num_classes()),
            ),
            TaskKind::Mqar => generated(config.mqar.vocab_size(), None),
            TaskKind::SelectiveCopy => generated(config.selective_copy.vocab_size(), None),
            TaskKind::InductionHeads => generated(config.induction_heads.vocab_size(), None),
            TaskKind::Classify => Self::open_files(config, seq_len, seed, quiet)?,
        };
        Ok(data)
    }

    fn open_files(
        config: &TaskConfig,
        seq_len: usize,
        seed: u64,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        let o = &config.classify;
        let read = |path: &PathBuf| {
            classify_files::read_examples(path, &o.text_field, &o.label_field, o.strip_parens)
                .with_context(|| format!("task.classify: reading {}", path.display()))
        };
        let (train, val) = (read(&o.train)?, read(&o.val)?);
        let num_classes = match o.num_classes {
            0 => {
                let n = train
                    .iter()
                    .map(|e| e.label as usize + 1)
                    .max()
                    .unwrap_or(1);
                if !quiet {
                    eprintln!(
                        "task.classify.num_classes = 0: {n} classes, one more than the largest \
                         label of {}",
                        o.train.display()
                    );
                }
                n
            }
            n => n,
        };
        classify_files::check_labels(&train, num_classes, &o.train)?;
        classify_files::check_labels(&val, num_classes, &o.val)?;
        let vocabulary = Vocabulary::build(o.tokenizer, &train);
        let encode = |examples: Vec<LabeledText>, path: &PathBuf| {
            examples
                .into_iter()
                .map(|e| {
                    let mut tokens = vocabulary.encode(&e.text);
                    if tokens.is_empty() {
                        anyhow::bail!(
                            "{}, line {}: the text is empty after tokenizing; every example \
                             needs at least one token",
                            path.display(),
                            e.line
                        );
                    }
                    tokens.truncate(seq_len);
                    Ok(Example {
                        tokens,
                        target: Target::Label(e.label),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        Ok(TaskData {
            kind: config.kind,
            config: config.clone(),
            seed,
            seq_len,
            source: Source::Files {
                train: encode(train, &o.train)?,
                order: std::sync::Mutex::new((0, Vec::new())),
            },
            val: encode(val, &o.val)?,
            vocab_size: vocabulary.size(),
            num_classes: Some(num_classes),
        })
    }

    fn generate(&self, rng: &mut ChaCha8Rng) -> Example {
        let (t, config) = (self.seq_len, &self.config);
        match self.kind {
            TaskKind::Listops => config.listops.example(t, rng),
            TaskKind::Mqar => config.mqar.example(t, rng),
            TaskKind::SelectiveCopy => config.selective_copy.example(t, rng),
            TaskKind::InductionHeads => config.induction_heads.example(t, rng),
            TaskKind::Lm | TaskKind::Classify => unreachable!("not a generated task"),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Classes of a classification task; `None` for token targets.
    pub fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The seeded order of the training file's `n` examples in `epoch`.
    fn epoch_order(&self, epoch: u64, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03),
        ));
        perm
    }

    /// Training examples `index · size ..` of the run's stream: fresh draws seeded by the
    /// index (generated), or the next `size` of the epoch's seeded permutation (files).
    pub fn train_examples(&self, index: u64, size: usize) -> Vec<Example> {
        match &self.source {
            Source::Generated => {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    self.seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                (0..size).map(|_| self.generate(&mut rng)).collect()
            }
            Source::Files { train, order } => {
                let n = train.len() as u64;
                let mut order = order.lock().unwrap_or_else(|e| e.into_inner());
                (0..size as u64)
                    .map(|i| {
                        let at = index * size as u64 + i;
                        let epoch = at / n;
                        if order.1.is_empty() || order.0 != epoch {
                            *order = (epoch, self.epoch_order(epoch, train.len()));
                        }
                        train[order.1[(at % n) as usize]].clone()
                    })
                    .collect()
            }
        }
    }
}

/// `examples` as one batch: padded to the longest (or to `pad_to`, which sequence
/// parallelism's fixed layout needs), with the mask of the padding.
pub fn batch_of(examples: &[Example], pad_to: Option<usize>, device: &Device) -> TaskBatch {
    let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let t = pad_to.unwrap_or(longest).max(longest);
    let b = examples.len();
    let mut inputs = vec![0i64; b * t];
    for (i, e) in examples.iter().enumerate() {
        for (j, &tok) in e.tokens.iter().enumerate() {
            inputs[i * t + j] = i64::from(tok);
        }
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
    let padding = lengths
        .iter()
        .any(|&n| n < t)
        .then(|| Padding::from_lengths(&lengths, t, device));
    let targets = match &examples[0].target {
        Target::Label(_) => {
            let labels: Vec<i64> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Label(l) => i64::from(l),
                    Target::Tokens(_) => panic!("a batch mixes labels and token targets"),
                })
                .collect();
            Targets::Labels(Tensor::from_data(TensorData::new(labels, [b]), device))
        }
        Target::Tokens(_) => {
            let (mut tokens, mut weights) = (vec![0i64; b * t], vec![0f32; b * t]);
            for (i, e) in examples.iter().enumerate() {
                let Target::Tokens(scored) = &e.target else {
                    panic!("a batch mixes labels and token targets");
                };
                for &(p, tok) in scored {
                    tokens[i * t + p] = i64::from(tok);
                    weights[i * t + p] = 1.0;
                }
            }
            Targets::Masked {
                tokens: Tensor::from_data(TensorData::new(tokens, [b, t]), device),
                weights: Tensor::from_data(TensorData::new(weights, [b, t]), device),
            }
        }
    };
    TaskBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [b, t]), device),
        targets,
        padding,
    }
}

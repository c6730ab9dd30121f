//! A run directory: `runs/<name>/` with the resolved recipe, the vocabulary, TensorBoard
//! events and checkpoints. `export`, `sample` and `eval` open one.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::Device;

use crate::components::Checkpoint;
use crate::components::checkpoint::MODEL_FILE;
use crate::data::{Dataset, TOKENIZER_FILE, Tokenizer};
use crate::model::{LanguageModel, LanguageModelConfig};
use crate::recipe::Recipe;
use crate::tasks::{TaskData, TaskKind};

pub const RECIPE_FILE: &str = "recipe.toml";
/// Where a text file named by `data.path` is prepared.
pub const DATA_DIR: &str = "data";

pub struct Run {
    pub dir: PathBuf,
    pub recipe: Recipe,
    /// A language model's tokenizer; `None` for a task run (its ids are the task's own).
    pub tokenizer: Option<Tokenizer>,
    /// Vocabulary size and, for a classifier, its classes: the model's shape.
    vocab_size: usize,
    classes: Option<usize>,
}

/// The language model a recipe describes, for a vocabulary of `vocab_size`.
pub fn model_config(recipe: &Recipe, vocab_size: usize) -> LanguageModelConfig {
    task_model_config(recipe, vocab_size, None)
}

/// The model a recipe describes, for a vocabulary of `vocab_size`: a classifier of
/// `classes` classes, or a language model (`None`).
pub fn task_model_config(
    recipe: &Recipe,
    vocab_size: usize,
    classes: Option<usize>,
) -> LanguageModelConfig {
    let m = &recipe.model;
    LanguageModelConfig {
        model: m.clone(),
        vocab_size: if m.vocab_size == 0 {
            vocab_size
        } else {
            m.vocab_size
        },
        max_seq_len: if m.max_seq_len == 0 {
            recipe.seq_len()
        } else {
            m.max_seq_len
        },
        mixers: recipe.layer_mixers(),
        classes,
    }
}

impl Run {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: no such run directory (a run lives in <checkpoint.folder>/<name>, e.g. runs/shakespeare_char)",
                dir.display()
            );
        }
        let recipe = Recipe::load(&dir.join(RECIPE_FILE), &[]).map_err(anyhow::Error::from)?;
        if recipe.task.kind != TaskKind::Lm {
            // The task's data gives the shape: its vocabulary and classes.
            let data = TaskData::open(&recipe.task, recipe.seq_len(), recipe.training.seed, true)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                vocab_size: data.vocab_size(),
                classes: data.num_classes(),
                recipe,
                tokenizer: None,
            });
        }
        let spec = recipe.data.tokenizer_spec().with_context(|| {
            format!(
                "{}: data.tokenizer is not set",
                dir.join(RECIPE_FILE).display()
            )
        })?;
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE), spec.kind())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            vocab_size: tokenizer.vocab_size(),
            classes: None,
            recipe,
            tokenizer: Some(tokenizer),
        })
    }

    /// The language model's tokenizer, or an error saying that `what` needs one and a task
    /// run has none.
    pub fn text_tokenizer(&self, what: &str) -> anyhow::Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "{}: {what} needs a language model, but this run trained task.kind = \"{}\"; \
                 score it with `metamix eval {}`",
                self.dir.display(),
                self.recipe.task.kind.name(),
                self.dir.display()
            )
        })
    }

    /// The run's data (a text file's tokens from the run's own `data/` folder).
    pub fn dataset(&self) -> anyhow::Result<Dataset> {
        Dataset::open(
            &self.recipe.data,
            self.recipe.training.seed,
            Some(&self.dir.join(DATA_DIR)),
            true,
        )
    }

    pub fn model_config(&self) -> LanguageModelConfig {
        task_model_config(&self.recipe, self.vocab_size, self.classes)
    }

    /// The newest intact checkpoint's model (or the one of `step`), on `device`.
    pub fn load_model(
        &self,
        step: Option<u64>,
        device: &Device,
    ) -> anyhow::Result<(LanguageModel, Checkpoint)> {
        let ckpt = match step {
            Some(s) => {
                let c = Checkpoint::list(&self.dir)?
                    .into_iter()
                    .find(|c| c.step == s)
                    .with_context(|| format!("{}: no checkpoint step-{s}", self.dir.display()))?;
                c.verify()?;
                c
            }
            None => {
                Checkpoint::latest_valid(&self.dir)?
                    .with_context(|| {
                        format!("{}: no intact checkpoint to load", self.dir.display())
                    })?
                    .0
            }
        };
        let model = self
            .model_config()
            .init_seeded(self.recipe.training.seed, device);
        let model = crate::weights::load(model, &ckpt.dir.join(MODEL_FILE))?;
        Ok((model, ckpt))
    }
}

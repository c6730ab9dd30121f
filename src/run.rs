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

pub const RECIPE_FILE: &str = "recipe.toml";
/// Where a text file named by `data.path` is prepared.
pub const DATA_DIR: &str = "data";

pub struct Run {
    pub dir: PathBuf,
    pub recipe: Recipe,
    pub tokenizer: Tokenizer,
}

/// The model a recipe describes, for a vocabulary of `vocab_size`.
pub fn model_config(recipe: &Recipe, vocab_size: usize) -> LanguageModelConfig {
    let m = &recipe.model;
    LanguageModelConfig {
        model: m.clone(),
        vocab_size: if m.vocab_size == 0 {
            vocab_size
        } else {
            m.vocab_size
        },
        max_seq_len: if m.max_seq_len == 0 {
            recipe.training.seq_len
        } else {
            m.max_seq_len
        },
        mixers: recipe.layer_mixers(),
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
        let spec = recipe.data.tokenizer_spec().with_context(|| {
            format!(
                "{}: data.tokenizer is not set",
                dir.join(RECIPE_FILE).display()
            )
        })?;
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE), spec.kind())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            recipe,
            tokenizer,
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
        model_config(&self.recipe, self.tokenizer.vocab_size())
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

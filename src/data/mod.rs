//! Text corpus → token ids → seeded random windows.

pub mod char_tokenizer;
pub mod loader;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, fail};
pub use char_tokenizer::CharTokenizer;
pub use loader::{Batch, Corpus, WindowSampler};

/// `[data]`: the corpus and how it is split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file, relative to the working directory.
    pub path: PathBuf,
    pub tokenizer: TokenizerKind,
    /// Fraction of the text, taken from its end, held out for validation.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/shakespeare.txt"),
            tokenizer: TokenizerKind::Char,
            val_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Char,
}

impl DataConfig {
    /// Checks of `[data]` (keys relative to it).
    pub fn validate(&self) -> Result<(), OptionError> {
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return fail(
                "val_fraction",
                format!(
                    "must be in (0, 1) (got {}); 0.1 is usual",
                    self.val_fraction
                ),
            );
        }
        Ok(())
    }
}

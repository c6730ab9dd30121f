//! Corpus → tokenizer → token shards → seeded windows.
//!
//! `[data] path` is a prepared folder (`metamix prepare`), nanoGPT's `train.bin`/`val.bin`
//! folder, or a text file, which is prepared into the run's folder on first use.

pub mod byte_level;
pub mod char_tokenizer;
pub mod documents;
pub mod gpt2_tokenizer;
pub mod hf_tokenizer;
pub mod prepare;
pub mod sampler;
pub mod token_shards;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::options::{OptionError, fail};
pub use char_tokenizer::CharTokenizer;
pub use gpt2_tokenizer::Gpt2Tokenizer;
pub use prepare::{PrepareOptions, Prepared, prepare};
pub use sampler::{Batch, Sampling, TokenSplit, WindowSampler};
pub use token_shards::{Dtype, META_FILE, Meta, Split, TOKENIZER_FILE, TokenStore};
pub use tokenizer::{Tokenizer, TokenizerSpec};

/// `[data]`: the corpus, its tokenizer, the split and how windows are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A prepared folder, a nanoGPT `train.bin`/`val.bin` folder, or a text file
    /// (`.txt`, `.md`, `.jsonl`, optionally `.gz`/`.zst`), relative to the working directory.
    pub path: PathBuf,
    /// char, byte, gpt2, bpe:N or a tokenizer.json path. Unset: a prepared folder's own
    /// tokenizer, or char for a text file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Fraction held out for validation when a text file is prepared: whole documents by a
    /// seeded hash, or the end of a single document (nanoGPT's split).
    pub val_fraction: f64,
    pub sampling: Sampling,
    /// The JSONL field holding each document's text.
    pub text_field: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/shakespeare.txt"),
            tokenizer: None,
            val_fraction: 0.1,
            sampling: Sampling::Random,
            text_field: "text".into(),
        }
    }
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
        if let Some(t) = &self.tokenizer {
            t.parse::<TokenizerSpec>()
                .or_else(|e| fail("tokenizer", e))?;
        }
        Ok(())
    }

    pub fn tokenizer_spec(&self) -> Option<TokenizerSpec> {
        self.tokenizer
            .as_ref()
            .map(|t| t.parse().expect("validated"))
    }
}

/// A dataset ready to sample: its tokenizer and both splits.
pub struct Dataset {
    /// The tokenizer as `[data] tokenizer` names it (a prepared folder's own when unset).
    pub spec: TokenizerSpec,
    pub tokenizer: Tokenizer,
    pub train: TokenSplit,
    pub val: TokenSplit,
    /// The prepared folder it was read from (`None`: prepared in memory).
    pub dir: Option<PathBuf>,
}

/// nanoGPT's prepared files.
const NANOGPT_FILES: [&str; 2] = ["train.bin", "val.bin"];

impl Dataset {
    /// Open `config.path`. A text file is prepared into `prepare_dir` (the run's
    /// `data/` folder), or reused from there; without one, in memory.
    pub fn open(
        config: &DataConfig,
        seed: u64,
        prepare_dir: Option<&Path>,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        let path = &config.path;
        let spec = config.tokenizer_spec();
        if path.is_dir() {
            if path.join(META_FILE).is_file() {
                return Self::open_prepared(path, spec.as_ref());
            }
            if NANOGPT_FILES.iter().all(|f| path.join(f).is_file()) {
                return Self::open_nanogpt(path, spec.as_ref());
            }
            bail!(
                "data.path: {} has neither meta.json (a `metamix prepare` folder) nor nanoGPT's \
                 train.bin and val.bin; prepare it with `metamix prepare <inputs> --out {}`",
                path.display(),
                path.display()
            );
        }
        // A text file this run already prepared: its tokens, wherever the command runs from.
        if let Some(dir) = prepare_dir
            && dir.join(META_FILE).is_file()
        {
            let spec = spec.clone().unwrap_or(TokenizerSpec::Char);
            let meta = Meta::load(dir)?;
            let source = path.display().to_string();
            if meta.sources != [source.clone()] || meta.tokenizer != spec.to_string() {
                bail!(
                    "{}: this run prepared {:?} with tokenizer {}, the recipe now names {source:?} \
                     with {spec}; start a new run (another name) or delete {} to prepare again",
                    dir.display(),
                    meta.sources.join(", "),
                    meta.tokenizer,
                    dir.display()
                );
            }
            return Self::open_prepared(dir, None);
        }
        if !path.is_file() {
            bail!(
                "data.path: {}: no such file or folder (it is relative to the working directory {})",
                path.display(),
                std::env::current_dir().map_or("?".into(), |d| d.display().to_string())
            );
        }
        let spec = spec.unwrap_or(TokenizerSpec::Char);
        let opts = PrepareOptions {
            tokenizer: spec.clone(),
            out: prepare_dir.map(Path::to_path_buf),
            text_field: config.text_field.clone(),
            val_fraction: config.val_fraction,
            seed,
            quiet,
            ..PrepareOptions::default()
        };
        let inputs = [path.display().to_string()];
        let prepared =
            prepare(&inputs, &opts).with_context(|| format!("data.path: {}", path.display()))?;
        match prepared.memory {
            Some((train, val)) => {
                let token_bytes = Arc::new(prepared.tokenizer.token_bytes());
                let split = |split, tokens| TokenSplit {
                    split,
                    shards: vec![TokenStore::Memory(tokens)],
                    token_bytes: token_bytes.clone(),
                };
                Ok(Self {
                    spec,
                    train: split(Split::Train, train),
                    val: split(Split::Val, val),
                    tokenizer: prepared.tokenizer,
                    dir: None,
                })
            }
            None => Self::open_prepared(prepare_dir.expect("prepared on disk"), None),
        }
    }

    /// A `metamix prepare` folder, every shard checked against meta.json.
    pub fn open_prepared(dir: &Path, spec: Option<&TokenizerSpec>) -> anyhow::Result<Self> {
        let meta = Meta::load(dir)?;
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE), &meta.tokenizer_kind)?;
        if let Some(spec) = spec {
            let same = match spec {
                TokenizerSpec::File(path) => {
                    let theirs: serde_json::Value = serde_json::from_str(
                        &std::fs::read_to_string(path).with_context(|| {
                            format!("data.tokenizer: reading {}", path.display())
                        })?,
                    )
                    .with_context(|| format!("data.tokenizer: {} is not JSON", path.display()))?;
                    theirs == tokenizer.to_hf_json()
                }
                other => other.to_string() == meta.tokenizer,
            };
            if !same {
                bail!(
                    "data.tokenizer = {spec:?} but {} was prepared with {}; drop data.tokenizer to \
                     use the folder's, or prepare the corpus again with --tokenizer {spec}",
                    dir.display(),
                    meta.tokenizer,
                    spec = spec.to_string()
                );
            }
        }
        if tokenizer.vocab_size() != meta.vocab_size {
            bail!(
                "{}: tokenizer.json has {} tokens, meta.json says {}: the folder is damaged",
                dir.display(),
                tokenizer.vocab_size(),
                meta.vocab_size
            );
        }
        let token_bytes = Arc::new(tokenizer.token_bytes());
        let mut train = TokenSplit {
            split: Split::Train,
            shards: vec![],
            token_bytes: token_bytes.clone(),
        };
        let mut val = TokenSplit {
            split: Split::Val,
            shards: vec![],
            token_bytes,
        };
        for (split, store) in meta.open_shards(dir)? {
            match split {
                Split::Train => train.shards.push(store),
                Split::Val => val.shards.push(store),
            }
        }
        Ok(Self {
            spec: meta
                .tokenizer
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: tokenizer {e}", dir.join(META_FILE).display()))?,
            tokenizer,
            train,
            val,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// nanoGPT's `train.bin`/`val.bin` (raw uint16), with the tokenizer that made them.
    fn open_nanogpt(dir: &Path, spec: Option<&TokenizerSpec>) -> anyhow::Result<Self> {
        let tokenizer = match spec {
            Some(TokenizerSpec::Gpt2) => Tokenizer::Gpt2(Gpt2Tokenizer::new()?),
            Some(TokenizerSpec::File(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("data.tokenizer: reading {}", path.display()))?;
                Tokenizer::Hf(hf_tokenizer::HfTokenizer::from_json_text(&text, path)?)
            }
            other => bail!(
                "data.path: {} holds nanoGPT's train.bin/val.bin, which carry no vocabulary: set \
                 data.tokenizer to the one that made them — \"gpt2\" for nanoGPT's own prepare.py, \
                 or a tokenizer.json path{}",
                dir.display(),
                match other {
                    Some(s) => format!(" (not {s}: its ids depend on the corpus it was fitted to)"),
                    None => String::new(),
                }
            ),
        };
        let token_bytes = Arc::new(tokenizer.token_bytes());
        let mut splits = vec![];
        for (split, file) in [Split::Train, Split::Val].into_iter().zip(NANOGPT_FILES) {
            let path = dir.join(file);
            let store = TokenStore::map(&path, Dtype::Uint16)?;
            let max = store.max_id()?;
            if max as usize >= tokenizer.vocab_size() {
                bail!(
                    "{}: holds token id {max}, outside the {}-token vocabulary of data.tokenizer",
                    path.display(),
                    tokenizer.vocab_size()
                );
            }
            splits.push(TokenSplit {
                split,
                shards: vec![store],
                token_bytes: token_bytes.clone(),
            });
        }
        let val = splits.pop().expect("two splits");
        let train = splits.pop().expect("two splits");
        Ok(Self {
            spec: spec.expect("checked above").clone(),
            tokenizer,
            train,
            val,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// Write the tokenizer as `tokenizer.json` at `path`: a copy of the prepared folder's
    /// when there is one (GPT-2's Hugging Face form takes a second to build).
    pub fn save_tokenizer(&self, path: &Path) -> anyhow::Result<()> {
        match self.dir.as_ref().map(|d| d.join(TOKENIZER_FILE)) {
            Some(saved) if saved.is_file() => {
                let bytes = std::fs::read(&saved)
                    .with_context(|| format!("reading {}", saved.display()))?;
                write_atomically(path, &bytes)
            }
            _ => self.tokenizer.save(path),
        }
    }

    /// Both splits hold a window of `seq_len + 1` tokens.
    pub fn check_seq_len(&self, seq_len: usize, path: &Path) -> anyhow::Result<()> {
        for split in [&self.train, &self.val] {
            split
                .check_seq_len(seq_len)
                .map_err(|e| anyhow::anyhow!("data.path: {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a reader never sees
/// half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

//! A prepared dataset on disk: `train-NNNNN.bin` / `val-NNNNN.bin` shards of raw
//! little-endian token ids (`uint16` when the vocabulary fits, else `uint32` — nanoGPT's
//! `train.bin` layout), `tokenizer.json`, and `meta.json` describing them with a SHA-256
//! per shard. `meta.json` is written last: a folder without it is not prepared.
//!
//! Shards are memory-mapped, so what stays resident is what the sampler touches, not the
//! corpus.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::documents::Skipped;
use crate::components::checkpoint::sha256_file;

pub const META_FILE: &str = "meta.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const FORMAT: &str = "metamix-tokens/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Uint16,
    Uint32,
}

impl Dtype {
    /// The narrowest type that holds every id of a vocabulary of `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::Uint16
        } else {
            Self::Uint32
        }
    }

    pub fn width(self) -> usize {
        match self {
            Self::Uint16 => 2,
            Self::Uint32 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train: u64,
    pub val: u64,
}

impl SplitCounts {
    pub fn add(&mut self, split: Split, n: u64) {
        match split {
            Split::Train => self.train += n,
            Split::Val => self.val += n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub file: String,
    pub split: Split,
    pub tokens: u64,
    /// UTF-8 bytes of the text these tokens encode.
    pub bytes: u64,
    pub sha256: String,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    /// As `[data] tokenizer` names it: char, byte, gpt2, bpe:N, or the tokenizer.json path.
    pub tokenizer: String,
    /// How `tokenizer.json` is read back: char, byte, gpt2 or huggingface.
    pub tokenizer_kind: String,
    pub vocab_size: usize,
    pub eot_id: Option<u32>,
    pub dtype: Dtype,
    /// `document_hash` (each document to val with probability val_fraction, by a seeded
    /// hash of its text) or `tail` (one document: its last val_fraction, nanoGPT's split).
    pub split_rule: String,
    pub val_fraction: f64,
    pub seed: u64,
    pub sources: Vec<String>,
    pub documents: SplitCounts,
    pub tokens: SplitCounts,
    pub bytes: SplitCounts,
    pub skipped_documents: Skipped,
    /// Files in input folders that are not text.
    pub skipped_files: usize,
    pub shards: Vec<ShardMeta>,
}

/// One split's tokens.
pub enum TokenStore {
    /// Prepared in memory (a small text file for `bench` and tests).
    Memory(Vec<u32>),
    Mapped {
        map: Mmap,
        dtype: Dtype,
        path: PathBuf,
    },
}

impl TokenStore {
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(v) => v.len(),
            Self::Mapped { map, dtype, .. } => map.len() / dtype.width(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append tokens `start..start + n` to `out`.
    pub fn extend_into(&self, start: usize, n: usize, out: &mut Vec<i64>) {
        match self {
            Self::Memory(v) => out.extend(v[start..start + n].iter().map(|&t| t as i64)),
            Self::Mapped { map, dtype, .. } => {
                let w = dtype.width();
                let bytes = &map[start * w..(start + n) * w];
                match dtype {
                    Dtype::Uint16 => out.extend(
                        bytes
                            .chunks_exact(2)
                            .map(|b| u16::from_le_bytes([b[0], b[1]]) as i64),
                    ),
                    Dtype::Uint32 => out.extend(
                        bytes
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
                    ),
                }
            }
        }
    }

    /// Map a shard file of raw ids, for windows read anywhere in it.
    pub fn map(path: &Path, dtype: Dtype) -> anyhow::Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the shard is read-only data that metamix never writes after prepare;
        // another process truncating it under a running job is outside what we guard.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        if map.len() % dtype.width() != 0 {
            bail!(
                "{}: {} bytes is not a whole number of {dtype:?} tokens: the file is truncated",
                path.display(),
                map.len()
            );
        }
        // Windows land anywhere: do not read ahead around each.
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Self::Mapped {
            map,
            dtype,
            path: path.to_path_buf(),
        })
    }

    /// The largest id (checks nanoGPT files, which carry no vocabulary). A mapped shard is
    /// read as a file, so its pages do not stay in this process's memory.
    pub fn max_id(&self) -> anyhow::Result<u32> {
        let (path, dtype) = match self {
            Self::Memory(v) => return Ok(v.iter().copied().max().unwrap_or(0)),
            Self::Mapped { path, dtype, .. } => (path, *dtype),
        };
        use std::io::Read;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut max = 0;
        loop {
            // Fill the block, so it splits into whole ids (a read may return less).
            let mut n = 0;
            while n < buf.len() {
                let k = file
                    .read(&mut buf[n..])
                    .with_context(|| format!("reading {}", path.display()))?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                return Ok(max);
            }
            let block = match dtype {
                Dtype::Uint16 => buf[..n]
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                    .max(),
                Dtype::Uint32 => buf[..n]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .max(),
            };
            max = max.max(block.unwrap_or(0));
        }
    }
}

impl Meta {
    /// Read `dir/meta.json`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let meta: Meta = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged or not a metamix meta.json", path.display()))?;
        if meta.format != FORMAT {
            bail!(
                "{}: format {:?}, this metamix reads {FORMAT:?}; prepare the corpus again",
                path.display(),
                meta.format
            );
        }
        Ok(meta)
    }

    /// Map every shard of `dir`, checking each one's size and SHA-256 against this file
    /// (all shards hashed in parallel).
    pub fn open_shards(&self, dir: &Path) -> anyhow::Result<Vec<(Split, TokenStore)>> {
        self.shards
            .par_iter()
            .map(|s| {
                let path = dir.join(&s.file);
                if !path.is_file() {
                    bail!(
                        "{}: shard {} listed in meta.json is missing; prepare the corpus again",
                        dir.display(),
                        s.file
                    );
                }
                let store = TokenStore::map(&path, self.dtype)?;
                let TokenStore::Mapped { map, .. } = &store else {
                    unreachable!("mapped above")
                };
                let expected = s.tokens as usize * self.dtype.width();
                if map.len() != expected {
                    bail!(
                        "{}: {} bytes, but meta.json says {} tokens ({expected} bytes): the shard \
                         is truncated or was replaced; prepare the corpus again",
                        path.display(),
                        map.len(),
                        s.tokens
                    );
                }
                // Hashed by reading the file, not through the map: pages read through the
                // map would count as this process's memory for the whole run.
                if sha256_file(&path)? != s.sha256 {
                    bail!(
                        "{}: its SHA-256 does not match meta.json: the shard is damaged or was \
                         replaced; prepare the corpus again",
                        path.display()
                    );
                }
                Ok((s.split, store))
            })
            .collect()
    }
}

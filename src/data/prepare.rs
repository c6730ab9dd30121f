//! `metamix prepare`: a corpus → tokenizer → token shards + `meta.json`.
//!
//! Streaming in bounded memory: documents are read in batches of about 64 MiB, tokenised on
//! every core (rayon), and appended in input order to the current shard of their split.
//! Everything is written into a hidden sibling folder that is renamed into place once
//! `meta.json` is in it, so an interrupted prepare leaves nothing that looks prepared.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::documents::{self, InputFile, Piece, Skipped};
use super::hf_tokenizer::HfTokenizer;
use super::token_shards::{
    Dtype, FORMAT, META_FILE, Meta, ShardMeta, Split, SplitCounts, TOKENIZER_FILE,
};
use super::tokenizer::{Tokenizer, TokenizerSpec};
use super::{CharTokenizer, Gpt2Tokenizer};
use crate::components::staged_folder;

/// Text tokenised per parallel batch.
const BATCH_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub tokenizer: TokenizerSpec,
    /// The prepared folder; `None` keeps the tokens in memory (a small text file for
    /// `bench` and tests).
    pub out: Option<PathBuf>,
    /// The JSONL field holding a document's text.
    pub text_field: String,
    pub val_fraction: f64,
    /// Fixes the train/val assignment of documents.
    pub seed: u64,
    /// Tokens per shard file.
    pub shard_tokens: u64,
    /// Replace a prepared dataset already in `out`.
    pub force: bool,
    /// Text (from the training split's start) a `bpe:N` tokenizer is trained on.
    pub bpe_train_bytes: u64,
    pub quiet: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            tokenizer: TokenizerSpec::Char,
            out: None,
            text_field: "text".into(),
            val_fraction: 0.1,
            seed: 1337,
            shard_tokens: 100_000_000,
            force: false,
            bpe_train_bytes: 256 << 20,
            quiet: true,
        }
    }
}

/// What prepare made.
pub struct Prepared {
    pub meta: Meta,
    pub tokenizer: Tokenizer,
    /// With `out = None`: the train and val tokens.
    pub memory: Option<(Vec<u32>, Vec<u32>)>,
    pub seconds: f64,
    /// Input bytes read from disk (compressed).
    pub bytes_read: u64,
}

/// Which split each piece goes to: by document hash, or (one document) by byte position.
enum SplitRule {
    DocumentHash { seed: u64, val_fraction: f64 },
    Tail { boundary: u64 },
}

/// Applies a [`SplitRule`] to the pieces of a corpus, in order.
struct Splitter<'a> {
    rule: &'a SplitRule,
    /// The split of the document being read.
    document: Split,
    /// Bytes read so far (the tail rule's position).
    offset: u64,
    /// Documents finished, per split.
    documents: SplitCounts,
}

impl<'a> Splitter<'a> {
    fn new(rule: &'a SplitRule) -> Self {
        Self {
            rule,
            document: Split::Train,
            offset: 0,
            documents: SplitCounts::default(),
        }
    }

    /// `piece` with its split; the piece that crosses the tail boundary comes back as two.
    fn assign(&mut self, piece: Piece) -> Vec<(Split, Piece)> {
        match self.rule {
            SplitRule::DocumentHash { seed, val_fraction } => {
                if piece.first {
                    let h = documents::document_hash(*seed, piece.text.as_bytes());
                    self.document = if (h as f64 / u64::MAX as f64) < *val_fraction {
                        Split::Val
                    } else {
                        Split::Train
                    };
                }
                if piece.last {
                    self.documents.add(self.document, 1);
                }
                vec![(self.document, piece)]
            }
            SplitRule::Tail { boundary } => {
                let start = self.offset;
                self.offset += piece.text.len() as u64;
                if self.offset <= *boundary {
                    vec![(Split::Train, piece)]
                } else if start >= *boundary {
                    vec![(Split::Val, piece)]
                } else {
                    let mut cut = (*boundary - start) as usize;
                    while !piece.text.is_char_boundary(cut) {
                        cut += 1;
                    }
                    let (a, b) = piece.text.split_at(cut);
                    let (a, b) = (a.to_string(), b.to_string());
                    vec![
                        (Split::Train, Piece { text: a, ..piece }),
                        (Split::Val, Piece { text: b, ..piece }),
                    ]
                }
            }
        }
    }
}

pub fn prepare(inputs: &[String], opts: &PrepareOptions) -> anyhow::Result<Prepared> {
    let start = Instant::now();
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        bail!(
            "--val-fraction must be in (0, 1) (got {})",
            opts.val_fraction
        );
    }
    if opts.shard_tokens == 0 {
        bail!("--shard-tokens must be at least 1");
    }
    let (files, skipped_files) = documents::resolve(inputs)?;
    if let Some(out) = &opts.out {
        check_out(out, opts.force)?;
        if let Ok(out) = out.canonicalize()
            && let Some(inside) = files
                .iter()
                .find(|f| f.path.canonicalize().is_ok_and(|p| p.starts_with(&out)))
        {
            bail!(
                "--out {}: the input {} is inside it; write the dataset somewhere else",
                out.display(),
                inside.path.display()
            );
        }
    }
    let single_document = files.len() == 1 && files[0].format == documents::Format::Text;
    let rule = if single_document {
        SplitRule::Tail {
            boundary: ((1.0 - opts.val_fraction) * decompressed_len(&files[0])? as f64) as u64,
        }
    } else {
        SplitRule::DocumentHash {
            seed: opts.seed,
            val_fraction: opts.val_fraction,
        }
    };
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    let bar = progress_bar(opts.quiet, total_bytes);

    // Pass 1, for tokenizers fitted to the corpus.
    let tokenizer = match &opts.tokenizer {
        TokenizerSpec::Char => {
            bar.set_message("collecting characters");
            let mut chars = std::collections::BTreeSet::new();
            let mut skipped = Skipped::default();
            let read = Arc::new(AtomicU64::new(0));
            documents::for_each_piece(&files, &opts.text_field, read, &mut skipped, |p| {
                chars.extend(p.text.chars());
                Ok(true)
            })?;
            Tokenizer::Char(CharTokenizer::fit(chars, !single_document))
        }
        TokenizerSpec::Byte => Tokenizer::Byte {
            eot: !single_document,
        },
        TokenizerSpec::Gpt2 => Tokenizer::Gpt2(Gpt2Tokenizer::new()?),
        TokenizerSpec::File(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the tokenizer {}", path.display()))?;
            Tokenizer::Hf(HfTokenizer::from_json_text(&text, path)?)
        }
        TokenizerSpec::Bpe(n) => {
            bar.set_message(format!("training a {n}-token BPE"));
            Tokenizer::Hf(train_bpe(&files, opts, &rule, *n)?)
        }
    };
    let dtype = Dtype::for_vocab(tokenizer.vocab_size());

    // Pass 2: tokenise and write.
    let tmp = opts.out.as_deref().map(staged_folder::start).transpose()?;
    let mut writers = [
        ShardWriter::new(tmp.clone(), Split::Train, dtype, opts.shard_tokens),
        ShardWriter::new(tmp.clone(), Split::Val, dtype, opts.shard_tokens),
    ];
    let read = Arc::new(AtomicU64::new(0));
    let eot = if single_document {
        None
    } else {
        tokenizer.eot()
    };
    // A reader thread assigns pieces to splits and fills batches while the pool tokenises the
    // previous one; the channel holds one batch, so memory stays at about three batches.
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<(Split, Piece)>>(1);
    let (mut doc_counts, skipped) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut splitter = Splitter::new(&rule);
            let mut skipped = Skipped::default();
            let mut batch: Vec<(Split, Piece)> = Vec::new();
            let mut batch_bytes = 0;
            documents::for_each_piece(
                &files,
                &opts.text_field,
                read.clone(),
                &mut skipped,
                |piece| {
                    for (split, piece) in splitter.assign(piece) {
                        batch_bytes += piece.text.len();
                        batch.push((split, piece));
                    }
                    if batch_bytes >= BATCH_BYTES {
                        batch_bytes = 0;
                        // The writer stopped (it failed): stop reading; its error is reported.
                        return Ok(send.send(std::mem::take(&mut batch)).is_ok());
                    }
                    Ok(true)
                },
            )?;
            // A closed channel means the writer failed; its error is the one reported.
            let _ = send.send(batch);
            drop(send);
            anyhow::Ok((splitter.documents, skipped))
        });
        let written = (|| {
            for batch in receive.iter() {
                let encoded: Vec<anyhow::Result<Vec<u32>>> = batch
                    .par_iter()
                    .map(|(_, p)| {
                        let mut ids = tokenizer.encode(&p.text)?;
                        if p.last {
                            ids.extend(eot);
                        }
                        Ok(ids)
                    })
                    .collect();
                let vocab = tokenizer.vocab_size();
                for ((split, piece), ids) in batch.into_iter().zip(encoded) {
                    let ids = ids?;
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                        bail!(
                            "the tokenizer produced id {bad}, outside its {vocab}-token vocabulary"
                        );
                    }
                    let w = &mut writers[(split == Split::Val) as usize];
                    w.write(&ids, piece.text.len() as u64)?;
                }
                bar.set_position(read.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{} tokens",
                    writers[0].total_tokens + writers[1].total_tokens
                ));
            }
            anyhow::Ok(())
        })();
        // Unblock the reader if writing failed, then take its result.
        drop(receive);
        let counts = reader.join().expect("the reader thread does not panic");
        written.and(counts)
    })?;
    if single_document {
        doc_counts = SplitCounts { train: 1, val: 1 };
    }
    bar.finish_and_clear();

    let [train, val] = writers;
    for w in [&train, &val] {
        if w.total_tokens == 0 {
            bail!(
                "{}: the {} split is empty after reading {} documents ({} skipped{}); {}",
                inputs.join(" "),
                w.split.name(),
                doc_counts.train + doc_counts.val,
                skipped.total(),
                skipped
                    .first
                    .as_ref()
                    .map_or(String::new(), |f| format!(", the first at {f}")),
                if doc_counts.train + doc_counts.val < 10 {
                    "give more documents (each file, or each JSONL line, is one), or one text file to split by position"
                } else {
                    "raise --val-fraction"
                }
            );
        }
    }
    let (train, val) = (train.finish()?, val.finish()?);
    let meta = Meta {
        format: FORMAT.into(),
        tokenizer: opts.tokenizer.to_string(),
        tokenizer_kind: tokenizer.kind().into(),
        vocab_size: tokenizer.vocab_size(),
        eot_id: eot,
        dtype,
        split_rule: if single_document {
            "tail"
        } else {
            "document_hash"
        }
        .into(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        sources: files.iter().map(|f| f.path.display().to_string()).collect(),
        documents: doc_counts,
        tokens: SplitCounts {
            train: train.tokens,
            val: val.tokens,
        },
        bytes: SplitCounts {
            train: train.bytes,
            val: val.bytes,
        },
        skipped_documents: skipped,
        skipped_files,
        shards: train.shards.into_iter().chain(val.shards).collect(),
    };
    if let (Some(out), Some(tmp)) = (&opts.out, &tmp) {
        tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
        super::write_atomically(
            &tmp.join(META_FILE),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )?;
        staged_folder::finish(tmp, out)?;
    }
    Ok(Prepared {
        meta,
        tokenizer,
        memory: train.memory.zip(val.memory),
        seconds: start.elapsed().as_secs_f64(),
        bytes_read: read.load(Ordering::Relaxed),
    })
}

/// `out` may be created, or replaced if it is a prepared dataset and `force` says so.
fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    let names = staged_folder::file_names(out)?;
    let empty = names.is_empty();
    // Only what prepare itself writes may be replaced: a readable meta.json and nothing
    // but its files beside it.
    let ours = |n: &String| {
        n == META_FILE
            || n == TOKENIZER_FILE
            || ((n.starts_with("train-") || n.starts_with("val-")) && n.ends_with(".bin"))
    };
    let prepared = Meta::load(out).is_ok() && names.iter().all(ours);
    match (prepared, empty, force) {
        (_, true, _) | (true, _, true) => Ok(()),
        (true, _, false) => bail!(
            "--out {}: already holds a prepared dataset (meta.json); pass --force to replace it",
            out.display()
        ),
        (false, false, _) => bail!(
            "--out {}: holds files that are not a prepared dataset's; prepare writes into a new \
             or empty folder (--force only replaces a folder holding nothing but a prepared \
             dataset)",
            out.display()
        ),
    }
}

/// The decompressed length of a text file (its size unless compressed).
fn decompressed_len(file: &InputFile) -> anyhow::Result<u64> {
    if file.compression == documents::Compression::None {
        return Ok(file.size);
    }
    let mut reader = file.open(Arc::new(AtomicU64::new(0)))?;
    std::io::copy(&mut reader, &mut std::io::sink())
        .with_context(|| format!("reading {}", file.path.display()))
}

/// Train `bpe:n` on the training split's first `opts.bpe_train_bytes` of text.
fn train_bpe(
    files: &[InputFile],
    opts: &PrepareOptions,
    rule: &SplitRule,
    n: usize,
) -> anyhow::Result<HfTokenizer> {
    let mut texts = Vec::new();
    let mut taken = 0;
    let mut splitter = Splitter::new(rule);
    let mut skipped = Skipped::default();
    let read = Arc::new(AtomicU64::new(0));
    documents::for_each_piece(files, &opts.text_field, read, &mut skipped, |p| {
        for (split, piece) in splitter.assign(p) {
            if split == Split::Train {
                taken += piece.text.len() as u64;
                texts.push(piece.text);
            }
        }
        Ok(taken < opts.bpe_train_bytes)
    })?;
    if taken == 0 {
        bail!("bpe:{n}: the training split has no text to train the tokenizer on");
    }
    HfTokenizer::train_bpe(n, texts.into_iter())
}

/// Appends one split's tokens to numbered shard files (or to memory), hashing as it goes.
struct ShardWriter {
    dir: Option<PathBuf>,
    split: Split,
    dtype: Dtype,
    shard_tokens: u64,
    current: Option<(BufWriter<std::fs::File>, Sha256, ShardMeta)>,
    done: Vec<ShardMeta>,
    memory: Vec<u32>,
    total_tokens: u64,
    total_bytes: u64,
}

impl ShardWriter {
    fn new(dir: Option<PathBuf>, split: Split, dtype: Dtype, shard_tokens: u64) -> Self {
        Self {
            dir,
            split,
            dtype,
            shard_tokens,
            current: None,
            done: vec![],
            memory: vec![],
            total_tokens: 0,
            total_bytes: 0,
        }
    }

    /// Append `ids`, which encode `bytes` of text.
    fn write(&mut self, mut ids: &[u32], bytes: u64) -> anyhow::Result<()> {
        self.total_tokens += ids.len() as u64;
        self.total_bytes += bytes;
        let Some(dir) = self.dir.clone() else {
            self.memory.extend_from_slice(ids);
            return Ok(());
        };
        let mut bytes = Some(bytes);
        while !ids.is_empty() {
            if self.current.is_none() {
                let file = format!("{}-{:05}.bin", self.split.name(), self.done.len());
                let path = dir.join(&file);
                let f = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                let meta = ShardMeta {
                    file,
                    split: self.split,
                    tokens: 0,
                    bytes: 0,
                    sha256: String::new(),
                };
                self.current = Some((BufWriter::with_capacity(1 << 20, f), Sha256::new(), meta));
            }
            let (w, hash, meta) = self.current.as_mut().expect("opened above");
            let room = (self.shard_tokens - meta.tokens) as usize;
            let (now, rest) = ids.split_at(room.min(ids.len()));
            let mut buf = Vec::with_capacity(now.len() * self.dtype.width());
            match self.dtype {
                Dtype::Uint16 => now
                    .iter()
                    .for_each(|&t| buf.extend_from_slice(&(t as u16).to_le_bytes())),
                Dtype::Uint32 => now
                    .iter()
                    .for_each(|&t| buf.extend_from_slice(&t.to_le_bytes())),
            }
            w.write_all(&buf)
                .with_context(|| format!("writing {}", meta.file))?;
            hash.update(&buf);
            meta.tokens += now.len() as u64;
            // A piece's bytes count in the shard its first token lands in.
            meta.bytes += bytes.take().unwrap_or(0);
            ids = rest;
            if meta.tokens == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> anyhow::Result<()> {
        if let Some((w, hash, mut meta)) = self.current.take() {
            let f = w
                .into_inner()
                .map_err(|e| anyhow::anyhow!("writing {}: {}", meta.file, e.error()))?;
            f.sync_all()
                .with_context(|| format!("writing {}", meta.file))?;
            meta.sha256 = format!("{:x}", hash.finalize());
            self.done.push(meta);
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<Written> {
        self.close()?;
        Ok(Written {
            tokens: self.total_tokens,
            bytes: self.total_bytes,
            memory: self.dir.is_none().then_some(self.memory),
            shards: self.done,
        })
    }
}

/// One split as written.
struct Written {
    tokens: u64,
    bytes: u64,
    shards: Vec<ShardMeta>,
    /// The tokens, when kept in memory.
    memory: Option<Vec<u32>>,
}

fn progress_bar(quiet: bool, total: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} [{elapsed_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar
}

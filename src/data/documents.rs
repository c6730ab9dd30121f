//! Reading a corpus as a stream of documents: files, folders (recursively) and globs;
//! `.txt`, `.md` and `.jsonl` (one document per line, its text under a field), each also
//! `.gz` or `.zst` compressed. Large documents arrive in pieces of bounded size, so no
//! document — and never the whole corpus — has to fit in memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};

/// Pieces of a document are cut at a line boundary once they reach this many bytes.
pub const PIECE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The whole file is one document.
    Text,
    /// One JSON object per line, one document each.
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
    pub compression: Compression,
    /// On disk (compressed).
    pub size: u64,
}

pub const VALID_INPUTS: &str = ".txt, .md or .jsonl files, optionally .gz or .zst compressed";

impl InputFile {
    /// The file's format from its name, `None` if metamix does not read it.
    fn recognise(path: &Path) -> Option<(Format, Compression)> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
            (s, Compression::Gzip)
        } else if let Some(s) = name.strip_suffix(".zst") {
            (s, Compression::Zstd)
        } else {
            (name.as_str(), Compression::None)
        };
        let format = if stem.ends_with(".txt") || stem.ends_with(".md") {
            Format::Text
        } else if stem.ends_with(".jsonl") {
            Format::Jsonl
        } else {
            return None;
        };
        Some((format, compression))
    }

    /// Its decompressed bytes; `read` counts the bytes taken from disk.
    pub fn open(&self, read: Arc<AtomicU64>) -> anyhow::Result<Box<dyn BufRead>> {
        let file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let counted = CountingReader { inner: file, read };
        Ok(match self.compression {
            Compression::None => Box::new(BufReader::with_capacity(1 << 20, counted)),
            Compression::Gzip => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
                BufReader::new(counted),
            ))),
            Compression::Zstd => Box::new(BufReader::new(
                zstd::Decoder::new(counted)
                    .with_context(|| format!("{}: not zstd data", self.path.display()))?,
            )),
        })
    }
}

struct CountingReader<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The input files named by `inputs` (files, folders searched recursively, or glob
/// patterns), in a fixed order, each once; and how many files in folders were skipped as
/// not text.
pub fn resolve(inputs: &[String]) -> anyhow::Result<(Vec<InputFile>, usize)> {
    let mut paths = Vec::new();
    let mut skipped = 0;
    if inputs.is_empty() {
        bail!("no inputs: name files, folders or globs of {VALID_INPUTS}");
    }
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            walk(path, &mut paths, &mut skipped)?;
        } else if path.is_file() {
            if InputFile::recognise(path).is_none() {
                bail!("{input}: not a format prepare reads; it reads {VALID_INPUTS}");
            }
            paths.push(path.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let matches =
                glob::glob(input).with_context(|| format!("{input}: not a valid glob"))?;
            let before = paths.len();
            for m in matches {
                let m = m.with_context(|| format!("reading a match of {input}"))?;
                if m.is_dir() {
                    walk(&m, &mut paths, &mut skipped)?;
                } else if InputFile::recognise(&m).is_some() {
                    paths.push(m);
                } else {
                    skipped += 1;
                }
            }
            if paths.len() == before {
                bail!("{input}: the glob matches no {VALID_INPUTS}");
            }
        } else {
            bail!("{input}: no such file or folder");
        }
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
    let files = paths
        .into_iter()
        .map(|path| {
            let (format, compression) = InputFile::recognise(&path).expect("recognised above");
            let size = std::fs::metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            Ok(InputFile {
                path,
                format,
                compression,
                size,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((files, skipped))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, skipped: &mut usize) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the folder {}", dir.display()))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out, skipped)?;
        } else if InputFile::recognise(&path).is_some() {
            out.push(path);
        } else {
            *skipped += 1;
        }
    }
    Ok(())
}

/// A piece of a document: the whole document unless it is longer than [`PIECE_BYTES`].
#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    /// The document's first piece (its text decides the document's split).
    pub first: bool,
    /// The document's last piece (an end-of-document token follows it).
    pub last: bool,
}

/// Why documents were left out.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Skipped {
    /// Documents (or, of a document longer than 1 MiB, pieces) that are not UTF-8.
    pub invalid_utf8: u64,
    pub empty: u64,
    /// JSONL lines that are not a JSON object with the text field as a string.
    pub no_text_field: u64,
    /// Where the first skip happened, `file:line` (JSONL) or the file.
    pub first: Option<String>,
}

impl Skipped {
    pub fn total(&self) -> u64 {
        self.invalid_utf8 + self.empty + self.no_text_field
    }

    fn note(&mut self, at: String) {
        if self.first.is_none() {
            self.first = Some(at);
        }
    }
}

/// Every piece of every document of `files`, in order, to `each`, until it returns false.
pub fn for_each_piece(
    files: &[InputFile],
    text_field: &str,
    read: Arc<AtomicU64>,
    skipped: &mut Skipped,
    mut each: impl FnMut(Piece) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    for file in files {
        let mut reader = file.open(read.clone())?;
        let at = |line: usize| format!("{}:{line}", file.path.display());
        match file.format {
            Format::Text => {
                let mut pieces = TextPieces::new(&mut reader, &file.path);
                let mut first = true;
                while let Some((bytes, last)) = pieces.next_piece()? {
                    match String::from_utf8(bytes) {
                        Ok(text) if first && last && text.is_empty() => {
                            skipped.empty += 1;
                            skipped.note(file.path.display().to_string());
                        }
                        Ok(text) => {
                            if !each(Piece { text, first, last })? {
                                return Ok(());
                            }
                            first = false;
                        }
                        Err(_) => {
                            skipped.invalid_utf8 += 1;
                            skipped.note(file.path.display().to_string());
                        }
                    }
                }
            }
            Format::Jsonl => {
                let mut line = Vec::new();
                let mut number = 0;
                loop {
                    line.clear();
                    if reader
                        .read_until(b'\n', &mut line)
                        .with_context(|| format!("reading {}", file.path.display()))?
                        == 0
                    {
                        break;
                    }
                    number += 1;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let Ok(text) = std::str::from_utf8(&line) else {
                        skipped.invalid_utf8 += 1;
                        skipped.note(at(number));
                        continue;
                    };
                    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
                    match value.as_ref().and_then(|v| v.get(text_field)?.as_str()) {
                        Some("") => {
                            skipped.empty += 1;
                            skipped.note(at(number));
                        }
                        Some(text) => {
                            let piece = Piece {
                                text: text.to_string(),
                                first: true,
                                last: true,
                            };
                            if !each(piece)? {
                                return Ok(());
                            }
                        }
                        None => {
                            skipped.no_text_field += 1;
                            skipped.note(at(number));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A text file in pieces of about [`PIECE_BYTES`], each cut after a line that ends in a
/// non-space character and before one that starts with one, where BPE tokenizers split
/// anyway (so pieces tokenise as the whole would).
struct TextPieces<'a> {
    reader: &'a mut dyn BufRead,
    path: &'a Path,
    line: Vec<u8>,
    done: bool,
}

impl<'a> TextPieces<'a> {
    fn new(reader: &'a mut dyn BufRead, path: &'a Path) -> Self {
        Self {
            reader,
            path,
            line: Vec::new(),
            done: false,
        }
    }

    /// The next piece and whether it is the last.
    fn next_piece(&mut self) -> anyhow::Result<Option<(Vec<u8>, bool)>> {
        if self.done {
            return Ok(None);
        }
        let mut piece = std::mem::take(&mut self.line);
        loop {
            let mut line = Vec::new();
            let n = read_line_capped(self.reader, &mut line, MAX_PIECE_BYTES)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if n == 0 {
                self.done = true;
                return Ok(Some((piece, true)));
            }
            // Between "x\n" and a line starting "y", GPT-2-style splits cut anyway (after a
            // blank line they would not: "\n\n" is one token). Exact for "\n" endings.
            let cut_here = piece.len() >= PIECE_BYTES
                && piece.ends_with(b"\n")
                && !line[0].is_ascii_whitespace()
                && ends_in_text(&piece);
            if cut_here {
                self.line = line;
                return Ok(Some((piece, false)));
            }
            piece.extend_from_slice(&line);
            if piece.len() >= MAX_PIECE_BYTES {
                // No clean cut in sight (one endless line, every line indented): cut here,
                // before a character the read split, so memory stays bounded.
                let mut tail = piece.len().saturating_sub(4);
                while tail < piece.len() && piece[tail] & 0xC0 == 0x80 {
                    tail += 1;
                }
                let cut = match std::str::from_utf8(&piece[tail..]) {
                    Err(e) if e.error_len().is_none() => tail + e.valid_up_to(),
                    _ => piece.len(),
                };
                self.line = piece.split_off(cut);
                return Ok(Some((piece, false)));
            }
        }
    }
}

/// Pieces are cut wherever they must be beyond this size.
const MAX_PIECE_BYTES: usize = 4 * PIECE_BYTES;

/// Whether the last line of `piece` has text before its line ending ("\n" or "\r\n").
fn ends_in_text(piece: &[u8]) -> bool {
    let body = piece.strip_suffix(b"\n").unwrap_or(piece);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    body.last().is_some_and(|b| !b.is_ascii_whitespace())
}

/// Append the next line (through its "\n") to `out`, but at most `cap` bytes of it.
fn read_line_capped(r: &mut dyn BufRead, out: &mut Vec<u8>, cap: usize) -> std::io::Result<usize> {
    let start = out.len();
    while out.len() - start < cap {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let room = (cap - (out.len() - start)).min(buf.len());
        match buf[..room].iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.extend_from_slice(&buf[..=i]);
                r.consume(i + 1);
                break;
            }
            None => {
                out.extend_from_slice(&buf[..room]);
                r.consume(room);
            }
        }
    }
    Ok(out.len() - start)
}

/// FNV-1a of `bytes` after `seed`: a document's split depends on its text and the seed
/// only, not on where it sits in the corpus.
pub fn document_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    // Finalise (splitmix64) so nearby texts land far apart.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_comes_in_pieces_cut_between_lines() {
        let line = "word word word\n";
        let text = line.repeat(PIECE_BYTES / line.len() * 2 + 10);
        let mut reader: &[u8] = text.as_bytes();
        let mut pieces = TextPieces::new(&mut reader, Path::new("t.txt"));
        let mut got = Vec::new();
        while let Some((p, last)) = pieces.next_piece().unwrap() {
            got.push((p, last));
        }
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(p, _)| p.ends_with(b"\n")));
        assert_eq!(got.iter().filter(|(_, last)| *last).count(), 1);
        let joined: Vec<u8> = got.into_iter().flat_map(|(p, _)| p).collect();
        assert_eq!(joined, text.as_bytes());
    }

    #[test]
    fn text_without_clean_cuts_still_comes_in_bounded_pieces() {
        // One endless line of multi-byte characters, and CRLF lines that all start indented.
        let endless = "東京".repeat(MAX_PIECE_BYTES);
        let indented = "  word\r\n".repeat(MAX_PIECE_BYTES / 4);
        for text in [endless, indented] {
            let mut reader: &[u8] = text.as_bytes();
            let mut pieces = TextPieces::new(&mut reader, Path::new("t.txt"));
            let mut joined = Vec::new();
            while let Some((p, _)) = pieces.next_piece().unwrap() {
                assert!(p.len() <= 2 * MAX_PIECE_BYTES, "{}", p.len());
                assert!(std::str::from_utf8(&p).is_ok(), "cut inside a character");
                joined.extend(p);
            }
            assert_eq!(joined, text.as_bytes());
        }
        assert!(ends_in_text(b"a\r\n") && !ends_in_text(b"a\r\n\r\n") && !ends_in_text(b"\n"));
    }
}

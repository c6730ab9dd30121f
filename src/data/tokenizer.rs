//! The tokenizers a recipe can name in `[data] tokenizer`, behind one type.
//!
//! Every kind is saved as a Hugging Face `tokenizer.json` (so `sample`, `eval`, an export
//! and `tokenizers.Tokenizer.from_file` in Python decode without the recipe), but metamix
//! encodes with the fastest exact implementation it has: its own for `char` and `byte`,
//! `tiktoken-rs` for `gpt2`, the `tokenizers` crate for the rest.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::byte_level;
use super::char_tokenizer::CharTokenizer;
use super::gpt2_tokenizer::Gpt2Tokenizer;
use super::hf_tokenizer::HfTokenizer;

/// The end-of-document token's text in every tokenizer metamix makes (GPT-2's).
pub const EOT: &str = "<|endoftext|>";

/// What `[data] tokenizer` (and `prepare --tokenizer`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// One id per character of the corpus, in sorted order (nanoGPT's shakespeare_char).
    Char,
    /// UTF-8 bytes, ids 0..=255 (the Long Range Arena convention).
    Byte,
    /// GPT-2's byte-level BPE: the ids of OpenAI's tiktoken `gpt2` / `r50k_base`.
    Gpt2,
    /// A byte-level BPE with this vocabulary size, trained on the training split.
    Bpe(usize),
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
}

pub const VALID_TOKENIZERS: &str = "char, byte, gpt2, bpe:<vocabulary size> (e.g. bpe:4096) or a path to a Hugging Face tokenizer.json";

impl FromStr for TokenizerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "char" => Self::Char,
            "byte" => Self::Byte,
            "gpt2" | "r50k_base" => Self::Gpt2,
            _ => {
                if let Some(n) = s.strip_prefix("bpe:") {
                    let n: usize = n.parse().map_err(|_| {
                        format!("{s:?}: the vocabulary size after `bpe:` must be a whole number, e.g. bpe:4096")
                    })?;
                    // 256 byte symbols and the end-of-document token come first.
                    if !(258..=1 << 20).contains(&n) {
                        return Err(format!(
                            "{s:?}: a byte-level BPE needs a vocabulary of 258 (256 bytes, \
                             the end-of-document token and one merge) to 1048576"
                        ));
                    }
                    Self::Bpe(n)
                } else if s.ends_with(".json") {
                    Self::File(PathBuf::from(s))
                } else {
                    return Err(format!(
                        "unknown tokenizer {s:?}; valid: {VALID_TOKENIZERS}"
                    ));
                }
            }
        })
    }
}

impl TokenizerSpec {
    /// How a saved `tokenizer.json` of this spec is read back (see [`Tokenizer::load`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Char => "char",
            Self::Byte => "byte",
            Self::Gpt2 => "gpt2",
            Self::Bpe(_) | Self::File(_) => "huggingface",
        }
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Char => write!(f, "char"),
            Self::Byte => write!(f, "byte"),
            Self::Gpt2 => write!(f, "gpt2"),
            Self::Bpe(n) => write!(f, "bpe:{n}"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A tokenizer ready to encode and decode.
#[derive(Clone)]
pub enum Tokenizer {
    Char(CharTokenizer),
    /// Bytes; with `eot`, id 256 ends each document.
    Byte {
        eot: bool,
    },
    Gpt2(Gpt2Tokenizer),
    /// Loaded from a `tokenizer.json` (including a trained `bpe:N`).
    Hf(HfTokenizer),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} tokens)", self.kind(), self.vocab_size())
    }
}

impl Tokenizer {
    /// The name meta.json and messages use: char, byte, gpt2 or huggingface.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Char(_) => "char",
            Self::Byte { .. } => "byte",
            Self::Gpt2(_) => "gpt2",
            Self::Hf(_) => "huggingface",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Char(t) => t.vocab_size(),
            Self::Byte { eot } => 256 + *eot as usize,
            Self::Gpt2(_) => Gpt2Tokenizer::VOCAB_SIZE,
            Self::Hf(t) => t.vocab_size(),
        }
    }

    /// The end-of-document token, if this tokenizer has one.
    pub fn eot(&self) -> Option<u32> {
        match self {
            Self::Char(t) => t.eot(),
            Self::Byte { eot } => eot.then_some(256),
            Self::Gpt2(_) => Some(Gpt2Tokenizer::EOT_ID),
            Self::Hf(t) => t.eot(),
        }
    }

    /// Token ids of `text`, special-token text encoded as plain text.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        match self {
            Self::Char(t) => t.encode(text),
            Self::Byte { .. } => Ok(text.bytes().map(u32::from).collect()),
            Self::Gpt2(t) => Ok(t.encode(text)),
            Self::Hf(t) => t.encode(text),
        }
    }

    /// The text of `ids`. Never fails: an id outside the vocabulary, or a byte sequence cut
    /// inside a UTF-8 character (a BPE stream stopped mid-character), decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Char(t) => t.decode(ids),
            Self::Byte { .. } => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Self::Gpt2(t) => t.decode(ids),
            Self::Hf(t) => t.decode(ids),
        }
    }

    /// How many bytes of UTF-8 text each token stands for (0 for special tokens): bits per
    /// byte divides a window's loss by the bytes of its targets.
    pub fn token_bytes(&self) -> Vec<u32> {
        match self {
            Self::Char(t) => t
                .chars
                .iter()
                .map(|c| c.len_utf8() as u32)
                .chain(t.eot().map(|_| 0))
                .collect(),
            Self::Byte { eot } => std::iter::repeat_n(1, 256)
                .chain(eot.then_some(0))
                .collect(),
            Self::Gpt2(t) => t.token_bytes(),
            Self::Hf(t) => t.token_bytes(),
        }
    }

    /// This tokenizer as a Hugging Face `tokenizer.json`.
    pub fn to_hf_json(&self) -> Value {
        match self {
            Self::Char(t) => t.to_hf_json(),
            Self::Byte { eot } => {
                let vocab: serde_json::Map<String, Value> = (0..=255u8)
                    .map(|b| (byte_level::byte_char(b).to_string(), json!(b)))
                    .collect();
                byte_level::bpe_json(Value::Object(vocab), vec![], eot.then_some(256), false)
            }
            Self::Gpt2(t) => t.to_hf_json(),
            Self::Hf(t) => t.to_json(),
        }
    }

    /// Write `tokenizer.json`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string(&self.to_hf_json())?;
        crate::data::write_atomically(path, text.as_bytes())
    }

    /// Read a `tokenizer.json` that metamix saved for a tokenizer of `kind` (as meta.json
    /// names it).
    pub fn load(path: &Path, kind: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokenizer {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a tokenizer.json", path.display()))?;
        let eot = byte_level::added_token_id(&json, EOT);
        Ok(match kind {
            "char" => Self::Char(
                CharTokenizer::from_hf_json(&json)
                    .with_context(|| format!("{}: not a char tokenizer", path.display()))?,
            ),
            "byte" => Self::Byte { eot: eot.is_some() },
            "gpt2" => Self::Gpt2(Gpt2Tokenizer::new()?),
            "huggingface" => Self::Hf(HfTokenizer::from_json_text(&text, path)?),
            other => bail!(
                "{}: unknown tokenizer kind {other:?} (valid: char, byte, gpt2, huggingface)",
                path.display()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in ["char", "byte", "gpt2", "bpe:4096", "my/tokenizer.json"] {
            assert_eq!(s.parse::<TokenizerSpec>().unwrap().to_string(), s);
        }
        let err = "gtp2".parse::<TokenizerSpec>().unwrap_err();
        assert!(err.contains("gtp2") && err.contains("bpe:"), "{err}");
        assert!("bpe:12".parse::<TokenizerSpec>().is_err());
        assert!("bpe:x".parse::<TokenizerSpec>().is_err());
    }

    #[test]
    fn byte_tokenizer_round_trips_and_survives_cut_characters() {
        let t = Tokenizer::Byte { eot: false };
        let text = "naïve — 東京 🦀";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(t.decode(&ids), text);
        // Cut inside the crab's four bytes: a replacement character, no panic.
        let cut = t.decode(&ids[..ids.len() - 1]);
        assert!(cut.ends_with('\u{FFFD}'), "{cut}");
        assert_eq!(t.token_bytes().iter().sum::<u32>(), 256);
    }
}

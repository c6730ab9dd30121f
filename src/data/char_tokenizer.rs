//! A character-level tokenizer (nanoGPT's shakespeare_char): one id per distinct character,
//! ids in sorted character order. The vocabulary is saved with the run.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharTokenizer {
    /// `chars[id]` is the character of token `id`.
    pub chars: Vec<char>,
    #[serde(skip)]
    ids: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The vocabulary of `text`.
    pub fn fit(text: &str) -> Self {
        let set: BTreeSet<char> = text.chars().collect();
        Self::from_chars(set.into_iter().collect())
    }

    pub fn from_chars(chars: Vec<char>) -> Self {
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self { chars, ids }
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// Encode text; a character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        text.chars()
            .map(|c| match self.ids.get(&c) {
                Some(&id) => Ok(id),
                None => bail!(
                    "character {c:?} is not in the vocabulary ({} characters seen in training)",
                    self.chars.len()
                ),
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: CharTokenizer = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a metamix vocabulary", path.display()))?;
        Ok(Self::from_chars(raw.chars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_unknown_char() {
        let tok = CharTokenizer::fit("hello world");
        assert_eq!(tok.vocab_size(), 8);
        let ids = tok.encode("world hello").unwrap();
        assert_eq!(tok.decode(&ids), "world hello");
        assert!(tok.encode("xyz").unwrap_err().to_string().contains("'x'"));
    }
}

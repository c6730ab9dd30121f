//! A character-level tokenizer (nanoGPT's shakespeare_char): one id per distinct character,
//! ids in sorted character order; a corpus of several documents adds an end-of-document
//! token after them.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::tokenizer::EOT;

#[derive(Debug, Clone, PartialEq)]
pub struct CharTokenizer {
    /// `chars[id]` is the character of token `id`.
    pub chars: Vec<char>,
    /// Id `chars.len()` ends each document.
    eot: bool,
    ids: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The vocabulary of `chars` (each counted once), with an end-of-document token if `eot`.
    pub fn fit(chars: impl IntoIterator<Item = char>, eot: bool) -> Self {
        let set: BTreeSet<char> = chars.into_iter().collect();
        Self::from_chars(set.into_iter().collect(), eot)
    }

    pub fn from_chars(chars: Vec<char>, eot: bool) -> Self {
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self { chars, eot, ids }
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len() + self.eot as usize
    }

    pub fn eot(&self) -> Option<u32> {
        self.eot.then_some(self.chars.len() as u32)
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

    /// The end-of-document token decodes to nothing; an unknown id to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&i| Some(i) != self.eot())
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }

    /// As a Hugging Face `tokenizer.json`: every character split off (`Split` on any
    /// character), looked up in a `WordLevel` vocabulary, fused back on decode.
    pub fn to_hf_json(&self) -> Value {
        let mut vocab: serde_json::Map<String, Value> = self
            .chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        let mut added = vec![];
        if let Some(id) = self.eot() {
            vocab.insert(EOT.into(), json!(id));
            added.push(
                json!({"id": id, "content": EOT, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}),
            );
        }
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                              "behavior": "Isolated", "invert": false},
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab,
                      "unk_token": if self.eot { EOT } else { "<unk>" }}
        })
    }

    /// The inverse of [`Self::to_hf_json`].
    pub fn from_hf_json(json: &Value) -> anyhow::Result<Self> {
        let vocab = json["model"]["vocab"]
            .as_object()
            .context("no model.vocab object")?;
        let mut chars = vec!['\0'; vocab.len()];
        let mut eot = false;
        for (token, id) in vocab {
            let id = id.as_u64().context("a vocabulary id is not a number")? as usize;
            let mut it = token.chars();
            match (it.next(), it.next()) {
                _ if token == EOT && id + 1 == vocab.len() => eot = true,
                (Some(c), None) if id < chars.len() => chars[id] = c,
                _ => bail!("vocabulary entry {token:?} is not one character"),
            }
        }
        if eot {
            chars.pop();
        }
        Ok(Self::from_chars(chars, eot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_unknown_char() {
        let tok = CharTokenizer::fit("hello world".chars(), false);
        assert_eq!(tok.vocab_size(), 8);
        let ids = tok.encode("world hello").unwrap();
        assert_eq!(tok.decode(&ids), "world hello");
        assert!(tok.encode("xyz").unwrap_err().to_string().contains("'x'"));
    }

    #[test]
    fn hugging_face_form_round_trips() {
        for eot in [false, true] {
            let tok = CharTokenizer::fit("naïve 東京\n".chars(), eot);
            let back = CharTokenizer::from_hf_json(&tok.to_hf_json()).unwrap();
            assert_eq!(back, tok);
            assert_eq!(back.eot(), eot.then_some(9));
        }
    }
}

//! Any Hugging Face `tokenizer.json`, through the `tokenizers` crate; and `bpe:N`, a
//! byte-level BPE that crate trains.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use serde_json::Value;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::byte_level;
use super::tokenizer::EOT;

/// End-of-document tokens of common tokenizer families, in the order they are looked for.
const EOT_CANDIDATES: [&str; 5] = [EOT, "</s>", "<|end_of_text|>", "<eos>", "[SEP]"];

#[derive(Clone)]
pub struct HfTokenizer {
    inner: Arc<Tokenizer>,
    /// The JSON it was read from (saved as is).
    json: Arc<Value>,
    eot: Option<u32>,
}

impl HfTokenizer {
    /// Parse `text`, read from `path` (named in errors).
    pub fn from_json_text(text: &str, path: &Path) -> anyhow::Result<Self> {
        let inner: Tokenizer = text.parse().map_err(|e| {
            anyhow!(
                "{}: not a Hugging Face tokenizer.json ({e}); save one with \
                 `tokenizer.save(\"tokenizer.json\")` in Python",
                path.display()
            )
        })?;
        let json: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Self::new(inner, json))
    }

    fn new(inner: Tokenizer, json: Value) -> Self {
        let eot = EOT_CANDIDATES
            .iter()
            .find_map(|c| byte_level::added_token_id(&json, c));
        Self {
            inner: Arc::new(inner),
            json: Arc::new(json),
            eot,
        }
    }

    /// A byte-level BPE of `vocab_size` tokens (the end-of-document token and the 256 byte
    /// symbols included) trained on `texts`, GPT-2's way: text split into words, numbers and
    /// punctuation first, so merges never cross them.
    pub fn train_bpe(
        vocab_size: usize,
        texts: impl Iterator<Item = String> + Send,
    ) -> anyhow::Result<Self> {
        let empty = byte_level::bpe_json(Value::Object(Default::default()), vec![], None, true);
        let mut tokenizer: Tokenizer = empty
            .to_string()
            .parse()
            .map_err(|e| anyhow!("building an empty BPE: {e}"))?;
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        tokenizer
            .train(&mut trainer, texts)
            .map_err(|e| anyhow!("training the BPE: {e}"))?;
        let json: Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| anyhow!("serialising the trained BPE: {e}"))?,
        )?;
        Ok(Self::new(tokenizer, json))
    }

    /// One past the largest id (ids may have gaps, so not the count of tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1)
    }

    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizer.json could not encode the text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner
            .decode(ids, false)
            .unwrap_or_else(|_| "\u{FFFD}".to_string())
    }

    /// Bytes per token: exact for byte-level vocabularies, the decoded text's length for
    /// others (word-piece and sentence-piece markers decode to what they stand for).
    pub fn token_bytes(&self) -> Vec<u32> {
        let byte_level = self.json["decoder"]["type"] == "ByteLevel";
        let table = byte_level::char_bytes();
        let special: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if special.contains(&id) {
                    return 0;
                }
                let Some(token) = self.inner.id_to_token(id) else {
                    return 0;
                };
                match byte_level {
                    true => byte_level::byte_len(&token, &table).unwrap_or(token.len() as u32),
                    false => self.decode(&[id]).len() as u32,
                }
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        (*self.json).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_unicode_and_has_its_vocabulary() {
        let text = "the cat sat on the mat. the cat ate the rat. naïve 東京 🦀 ".repeat(20);
        let t = HfTokenizer::train_bpe(300, std::iter::once(text.clone())).unwrap();
        // At most 300: training stops early when no pair repeats.
        assert!((260..=300).contains(&t.vocab_size()), "{}", t.vocab_size());
        assert_eq!(t.eot(), Some(0), "the special token comes first");
        let ids = t.encode(&text).unwrap();
        assert!(
            ids.len() < text.len() / 2,
            "merges shorten the text: {}",
            ids.len()
        );
        assert_eq!(t.decode(&ids), text);
        // Bytes per token add up to the text's length.
        let bytes = t.token_bytes();
        let total: u32 = ids.iter().map(|&i| bytes[i as usize]).sum();
        assert_eq!(total as usize, text.len());
    }
}

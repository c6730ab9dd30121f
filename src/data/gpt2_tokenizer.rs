//! GPT-2's BPE (OpenAI's `gpt2` / `r50k_base`), encoded by `tiktoken-rs`, whose crate
//! carries the ranks: it works offline and gives tiktoken's ids.

use std::collections::HashMap;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use super::byte_level;

#[derive(Clone)]
pub struct Gpt2Tokenizer {
    bpe: &'static CoreBPE,
}

impl Gpt2Tokenizer {
    pub const VOCAB_SIZE: usize = 50257;
    /// `<|endoftext|>`.
    pub const EOT_ID: u32 = 50256;

    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            bpe: tiktoken_rs::r50k_base_singleton(),
        })
    }

    /// Ids of `text`; `<|endoftext|>` in the text is encoded as ordinary text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token(id).unwrap_or("\u{FFFD}".as_bytes().to_vec()))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes of token `id` (`None` outside the vocabulary).
    fn token(&self, id: u32) -> Option<Vec<u8>> {
        self.bpe.decode_bytes(&[id]).ok()
    }

    pub fn token_bytes(&self) -> Vec<u32> {
        (0..Self::VOCAB_SIZE as u32)
            .map(|id| match id {
                Self::EOT_ID => 0,
                _ => self.token(id).map_or(0, |b| b.len() as u32),
            })
            .collect()
    }

    /// The Hugging Face form of the same tokenizer (what `GPT2TokenizerFast` loads): the
    /// vocabulary in byte-level characters, and the merge list recovered from the ranks —
    /// each multi-byte token is the merge of the two parts that BPE, limited to lower
    /// ranks, leaves it in (as `transformers`' tiktoken converter does).
    pub fn to_hf_json(&self) -> Value {
        let tokens: Vec<Vec<u8>> = (0..Self::EOT_ID)
            .map(|id| self.token(id).expect("ids below 50256 are ordinary tokens"))
            .collect();
        let ranks: HashMap<&[u8], u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.as_slice(), id as u32))
            .collect();
        let mut merges = Vec::new();
        for (rank, token) in tokens.iter().enumerate() {
            if token.len() < 2 {
                continue;
            }
            let parts = bpe_parts(token, &ranks, rank as u32);
            assert_eq!(parts.len(), 2, "GPT-2's token {rank} is one merge");
            merges.push((
                byte_level::to_chars(parts[0]),
                byte_level::to_chars(parts[1]),
            ));
        }
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (byte_level::to_chars(t), Value::from(id)))
            .collect();
        byte_level::bpe_json(Value::Object(vocab), merges, Some(Self::EOT_ID), true)
    }
}

/// `token` split by BPE using only merges of rank below `max_rank`.
fn bpe_parts<'a>(token: &'a [u8], ranks: &HashMap<&[u8], u32>, max_rank: u32) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = (0..=token.len()).collect();
    loop {
        let best = (0..bounds.len() - 2)
            .filter_map(|i| ranks.get(&token[bounds[i]..bounds[i + 2]]).map(|&r| (r, i)))
            .filter(|&(r, _)| r < max_rank)
            .min();
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    bounds.windows(2).map(|w| &token[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_tiktoken() {
        // Computed once with OpenAI's Python tiktoken (0.14) on the r50k_base ranks; the
        // first and the zeros are also in tiktoken's own tests (tests/test_encoding.py).
        let t = Gpt2Tokenizer::new().unwrap();
        assert_eq!(t.encode("hello world"), [31373, 995]);
        assert_eq!(t.encode("Hello world"), [15496, 995]);
        assert_eq!(t.encode("0000"), [2388]);
        assert_eq!(t.encode("'rer"), [821, 81]);
        assert_eq!(
            t.encode("naïve 東京 🦀\n\n  x"),
            [
                2616, 38776, 10545, 251, 109, 12859, 105, 12520, 99, 222, 628, 220, 2124
            ]
        );
        assert_eq!(
            t.encode("First Citizen:\nBefore we proceed"),
            [5962, 22307, 25, 198, 8421, 356, 5120]
        );
        assert_eq!(t.decode(&[31373, 995]), "hello world");
        // Special-token text is plain text on encode.
        assert_ne!(t.encode("<|endoftext|>"), [Gpt2Tokenizer::EOT_ID]);
    }
}

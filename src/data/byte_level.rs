//! GPT-2's byte-level alphabet (each byte shown as one printable character, the form
//! Hugging Face's `ByteLevel` pre-tokenizer and decoder use) and the `tokenizer.json` of a
//! byte-level BPE.

use serde_json::{Value, json};

/// The printable character byte `b` is written as: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes take code points from 256 up, in byte order.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("a valid code point")
}

/// The inverse of [`byte_char`], as a 324-entry table indexed by code point.
pub fn char_bytes() -> Vec<Option<u8>> {
    let mut table = vec![None; 324];
    for b in 0..=255u8 {
        table[byte_char(b) as usize] = Some(b);
    }
    table
}

/// The text form of a token's bytes.
pub fn to_chars(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_char(b)).collect()
}

/// How many bytes a byte-level token string stands for (`None` if it is not one).
pub fn byte_len(token: &str, table: &[Option<u8>]) -> Option<u32> {
    token
        .chars()
        .map(|c| table.get(c as usize).copied().flatten().map(|_| 1))
        .sum()
}

/// A byte-level BPE `tokenizer.json`: `vocab` maps token strings to ids, `merges` are
/// pairs in priority order, `eot` is the end-of-document token's id. With `use_regex` the
/// text is first split GPT-2's way (words, numbers, punctuation, spaces).
pub fn bpe_json(
    vocab: Value,
    merges: Vec<(String, String)>,
    eot: Option<u32>,
    use_regex: bool,
) -> Value {
    let added: Vec<Value> = eot
        .map(|id| {
            json!({"id": id, "content": super::tokenizer::EOT, "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .into_iter()
        .collect();
    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// The id of the added token whose text is `content`, in a `tokenizer.json`.
pub fn added_token_id(json: &Value, content: &str) -> Option<u32> {
    json["added_tokens"]
        .as_array()?
        .iter()
        .find(|t| t["content"] == content)
        .and_then(|t| t["id"].as_u64())
        .map(|id| id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection_with_gpt2s_known_characters() {
        let table = char_bytes();
        for b in 0..=255u8 {
            assert_eq!(table[byte_char(b) as usize], Some(b));
        }
        // GPT-2 writes a space as 'Ġ' (U+0120) and a newline as 'Ċ' (U+010A).
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_len("Ġthe", &table), Some(4));
    }
}

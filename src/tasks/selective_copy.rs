//! Selective copying from the Mamba paper (Gu & Dao 2023, "Mamba: Linear-Time Sequence
//! Modeling with Selective State Spaces", §4.1 and Appendix E.1): the copying task of Arjovsky
//! et al. 2016, with the tokens to remember at random positions among noise, so that a model
//! must select them by content rather than by a fixed spacing. After the noisy stretch come
//! `num_tokens` markers; at the k-th marker the model must output the k-th data token.

use rand::Rng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::example::{Example, Target};
use crate::options::{OptionError, at_least_one, fail};

/// The filler among the data tokens.
pub const NOISE: u32 = 0;
/// The token that asks for the next data token.
pub const MARKER: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectiveCopyOptions {
    /// Token ids in use: noise 0, marker 1, data tokens `2..vocab_size` (paper: 16).
    pub vocab_size: usize,
    /// Data tokens to memorise and copy back (paper: 16).
    pub num_tokens: usize,
}

impl Default for SelectiveCopyOptions {
    fn default() -> Self {
        Self {
            vocab_size: 16,
            num_tokens: 16,
        }
    }
}

impl SelectiveCopyOptions {
    pub fn validate(&self, seq_len: usize) -> Result<(), OptionError> {
        at_least_one(&[("num_tokens", self.num_tokens)])?;
        if self.vocab_size < 3 {
            return fail(
                "vocab_size",
                format!(
                    "is {} but noise (0), marker (1) and at least one data token need 3: use 3 or more",
                    self.vocab_size
                ),
            );
        }
        let n = self.num_tokens;
        if 2 * n > seq_len {
            return fail(
                "num_tokens",
                format!(
                    "copy length longer than the sequence: {n} tokens and their {n} markers need \
                     2·{n} = {} positions but task.seq_len is {seq_len}: lower num_tokens to at \
                     most {} or raise seq_len to at least {}",
                    2 * n,
                    seq_len / 2,
                    2 * n
                ),
            );
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn example(&self, seq_len: usize, rng: &mut ChaCha8Rng) -> Example {
        let n = self.num_tokens;
        let body = seq_len - n;
        let mut tokens = vec![NOISE; seq_len];
        let mut positions = index::sample(rng, body, n).into_vec();
        positions.sort_unstable();
        let mut targets = Vec::with_capacity(n);
        for (k, &pos) in positions.iter().enumerate() {
            let data = rng.random_range(2..self.vocab_size as u32);
            tokens[pos] = data;
            // The output at the k-th marker has read the marker itself: it names the k-th token.
            tokens[body + k] = MARKER;
            targets.push((body + k, data));
        }
        Example {
            tokens,
            target: Target::Tokens(targets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn markers_ask_for_the_data_tokens_in_order() {
        let o = SelectiveCopyOptions::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for seq_len in [32, 40, 256] {
            let e = o.example(seq_len, &mut rng);
            assert_eq!(e.tokens.len(), seq_len);
            let (body, tail) = e.tokens.split_at(seq_len - 16);
            assert!(tail.iter().all(|&t| t == MARKER));
            let data: Vec<u32> = body.iter().copied().filter(|&t| t != NOISE).collect();
            assert_eq!(data.len(), 16, "data tokens are never noise or markers");
            assert!(data.iter().all(|&t| (2..16).contains(&t)));
            let expected: Vec<(usize, u32)> = data
                .iter()
                .enumerate()
                .map(|(k, &t)| (seq_len - 16 + k, t))
                .collect();
            assert_eq!(e.target, Target::Tokens(expected));
        }
    }

    #[test]
    fn positions_vary_and_runs_repeat() {
        let o = SelectiveCopyOptions {
            num_tokens: 4,
            ..Default::default()
        };
        let first = o.example(64, &mut ChaCha8Rng::seed_from_u64(5));
        assert_eq!(first, o.example(64, &mut ChaCha8Rng::seed_from_u64(5)));
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let layouts: std::collections::HashSet<Vec<bool>> = (0..20)
            .map(|_| {
                o.example(64, &mut rng)
                    .tokens
                    .iter()
                    .map(|&t| t == NOISE)
                    .collect()
            })
            .collect();
        assert!(layouts.len() > 15, "random spacing, not a fixed one");
    }

    #[test]
    fn validation_names_both_lengths() {
        let o = SelectiveCopyOptions::default();
        assert!(o.validate(32).is_ok());
        let e = o.validate(31).unwrap_err();
        assert_eq!(e.key, "num_tokens");
        assert!(e.message.contains("copy length longer than the sequence"));
        assert!(e.message.contains("16 tokens") && e.message.contains("task.seq_len is 31"));
        assert_eq!(
            SelectiveCopyOptions {
                vocab_size: 2,
                ..o.clone()
            }
            .validate(64)
            .unwrap_err()
            .key,
            "vocab_size"
        );
        assert_eq!(
            SelectiveCopyOptions { num_tokens: 0, ..o }
                .validate(64)
                .unwrap_err()
                .key,
            "num_tokens"
        );
    }
}

//! Induction heads as in the Mamba paper (Gu & Dao 2023, "Mamba: Linear-Time Sequence
//! Modeling with Selective State Spaces", §4.1; the mechanism of Olsson et al. 2022, "In-context
//! Learning and Induction Heads"): random tokens in which a trigger token appears twice; after
//! its second appearance, at the end, the model must output the token that followed the first.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::example::{Example, Target};
use crate::options::{OptionError, fail};

/// The trigger; no other position holds it.
pub const TRIGGER: u32 = 0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InductionHeadsOptions {
    /// Token ids in use: the trigger 0 and random tokens `1..vocab_size` (paper: 16).
    pub vocab_size: usize,
}

impl Default for InductionHeadsOptions {
    fn default() -> Self {
        Self { vocab_size: 16 }
    }
}

impl InductionHeadsOptions {
    pub fn validate(&self, seq_len: usize) -> Result<(), OptionError> {
        if self.vocab_size < 3 {
            return fail(
                "vocab_size",
                format!(
                    "is {} but the trigger and at least two other tokens need 3: use 3 or more",
                    self.vocab_size
                ),
            );
        }
        if seq_len < 4 {
            return fail(
                "seq_len",
                format!(
                    "task.seq_len is {seq_len} but a trigger, its answer, one more token and the \
                     final trigger need at least 4: raise task.seq_len to 4 or more"
                ),
            );
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn example(&self, seq_len: usize, rng: &mut ChaCha8Rng) -> Example {
        let v = self.vocab_size as u32;
        let mut tokens: Vec<u32> = (0..seq_len).map(|_| rng.random_range(1..v)).collect();
        // The answer (at p + 1) never lands on the last position, which holds the trigger.
        let p = rng.random_range(0..=seq_len - 3);
        tokens[p] = TRIGGER;
        tokens[seq_len - 1] = TRIGGER;
        Example {
            target: Target::Tokens(vec![(seq_len - 1, tokens[p + 1])]),
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_last_trigger_asks_for_what_followed_the_first() {
        let o = InductionHeadsOptions::default();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut firsts = std::collections::HashSet::new();
        for seq_len in [4, 5, 64, 64, 64, 64, 256] {
            let e = o.example(seq_len, &mut rng);
            assert_eq!(e.tokens.len(), seq_len);
            let triggers: Vec<usize> = (0..seq_len).filter(|&i| e.tokens[i] == TRIGGER).collect();
            assert_eq!(triggers.len(), 2);
            assert_eq!(triggers[1], seq_len - 1);
            assert!(triggers[0] + 1 < seq_len - 1);
            firsts.insert(triggers[0]);
            assert!(e.tokens.iter().all(|&t| t < 16));
            assert_eq!(
                e.target,
                Target::Tokens(vec![(seq_len - 1, e.tokens[triggers[0] + 1])])
            );
        }
        assert!(firsts.len() > 3, "the first trigger moves");
    }

    #[test]
    fn validation() {
        let o = InductionHeadsOptions::default();
        assert!(o.validate(4).is_ok());
        assert_eq!(o.validate(3).unwrap_err().key, "seq_len");
        let e = InductionHeadsOptions { vocab_size: 2 }
            .validate(64)
            .unwrap_err();
        assert_eq!(e.key, "vocab_size");
        assert!(e.message.contains("is 2"));
    }
}

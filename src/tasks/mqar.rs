//! Multi-query associative recall (MQAR) from Zoology (Arora et al. 2023, "Zoology: Measuring
//! and Improving Recall in Efficient Language Models"; `zoology/data/associative_recall.py`,
//! `multiquery_ar`): key–value pairs `k1 v1 … kP vP`, then a region of zeros in which every key
//! comes back once; at each returning key the model must output that key's value. Gaps follow
//! Zoology's power law, so most queries come soon after the pairs. As with Zoology's
//! `random_non_queries = False`, the filler stays token 0.

use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::example::{Example, Target};
use crate::options::{OptionError, at_least_one, fail, positive};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqarOptions {
    /// Token ids in use: keys come from `[1, vocab_size/2)`, values from
    /// `[vocab_size/2, vocab_size)`, 0 fills the query region (Zoology: 8192).
    pub vocab_size: usize,
    /// Key–value pairs per example, each queried once.
    pub num_kv_pairs: usize,
    /// Exponent `a` of the gap law `p(x) ∝ a·x^(a−1)`: small means queries crowd the start of
    /// the region, 1 means uniform (Zoology: 0.01).
    pub power_a: f64,
}

impl Default for MqarOptions {
    fn default() -> Self {
        Self {
            vocab_size: 64,
            num_kv_pairs: 8,
            power_a: 0.01,
        }
    }
}

impl MqarOptions {
    pub fn validate(&self, seq_len: usize) -> Result<(), OptionError> {
        at_least_one(&[("num_kv_pairs", self.num_kv_pairs)])?;
        let p = self.num_kv_pairs;
        if self.vocab_size < 2 * p + 2 {
            return fail(
                "vocab_size",
                format!(
                    "is {} but {p} distinct keys and values need 2·{p} + 2 = {} ids: raise \
                     vocab_size to at least {} or lower num_kv_pairs to at most {}",
                    self.vocab_size,
                    2 * p + 2,
                    2 * p + 2,
                    self.vocab_size.saturating_sub(2) / 2
                ),
            );
        }
        if 4 * p > seq_len {
            return fail(
                "num_kv_pairs",
                format!(
                    "{p} pairs need 4·{p} = {} positions but task.seq_len is {seq_len}: lower \
                     num_kv_pairs to at most {} or raise seq_len",
                    4 * p,
                    seq_len / 4
                ),
            );
        }
        if !positive(self.power_a) {
            return fail(
                "power_a",
                format!(
                    "is {} but must be a finite number above 0 (1 = uniform gaps)",
                    self.power_a
                ),
            );
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn example(&self, seq_len: usize, rng: &mut ChaCha8Rng) -> Example {
        let p = self.num_kv_pairs;
        let half = self.vocab_size / 2;
        let keys = index::sample(rng, half - 1, p);
        let values = index::sample(rng, self.vocab_size - half, p);
        let mut tokens = vec![0u32; seq_len];
        for (i, (k, v)) in keys.iter().zip(values.iter()).enumerate() {
            tokens[2 * i] = (k + 1) as u32;
            tokens[2 * i + 1] = (half + v) as u32;
        }
        // Gap g (0-based) has weight a·(g+1)^(a−1); drawn without replacement, as
        // numpy's `choice(replace=False, p=p)` does.
        let context = 2 * p;
        let space = (seq_len - context) / 2;
        let a = self.power_a;
        let gaps = index::sample_weighted(rng, space, |g| a * ((g + 1) as f64).powf(a - 1.0), p)
            .expect("validate() keeps the gap weights positive and finite");
        let mut targets: Vec<(usize, u32)> = gaps
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let pos = context + 2 * g;
                tokens[pos] = tokens[2 * i];
                (pos, tokens[2 * i + 1])
            })
            .collect();
        targets.sort_unstable();
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
    use std::collections::{HashMap, HashSet};

    #[test]
    fn every_key_returns_once_and_targets_its_value() {
        let o = MqarOptions::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for seq_len in [32, 33, 64, 256] {
            let e = o.example(seq_len, &mut rng);
            assert_eq!(e.tokens.len(), seq_len);
            let ctx = &e.tokens[..16];
            let pairs: HashMap<u32, u32> = ctx.chunks(2).map(|c| (c[0], c[1])).collect();
            assert_eq!(pairs.len(), 8, "keys distinct");
            assert_eq!(
                pairs.values().collect::<HashSet<_>>().len(),
                8,
                "values distinct"
            );
            assert!(
                pairs
                    .iter()
                    .all(|(&k, &v)| (1..32).contains(&k) && (32..64).contains(&v))
            );
            let Target::Tokens(t) = &e.target else {
                panic!()
            };
            // Re-derive: every nonzero token after the pairs is a query at an even offset.
            let mut expected = Vec::new();
            for (pos, &tok) in e.tokens.iter().enumerate().skip(16) {
                if tok != 0 {
                    assert_eq!((pos - 16) % 2, 0);
                    expected.push((pos, pairs[&tok]));
                }
            }
            assert_eq!(t, &expected);
            assert_eq!(
                t.iter()
                    .map(|(p, _)| e.tokens[*p])
                    .collect::<HashSet<_>>()
                    .len(),
                8
            );
        }
    }

    #[test]
    fn small_power_a_favours_short_gaps() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mean_first = |a: f64, rng: &mut ChaCha8Rng| {
            let o = MqarOptions {
                num_kv_pairs: 1,
                power_a: a,
                ..Default::default()
            };
            (0..400)
                .map(|_| match o.example(202, rng).target {
                    Target::Tokens(t) => t[0].0 as f64,
                    _ => unreachable!(),
                })
                .sum::<f64>()
                / 400.0
        };
        // 100 gaps: uniform averages position ≈ 2 + 2·49.5 = 101.
        assert!(mean_first(0.01, &mut rng) < 60.0);
        assert!((mean_first(1.0, &mut rng) - 101.0).abs() < 12.0);
    }

    #[test]
    fn validation_says_what_fits() {
        let o = MqarOptions::default();
        assert!(o.validate(32).is_ok());
        let e = o.validate(31).unwrap_err();
        assert_eq!(e.key, "num_kv_pairs");
        assert!(
            e.message.contains("4·8 = 32") && e.message.contains("at most 7"),
            "{}",
            e.message
        );
        let e = MqarOptions {
            vocab_size: 17,
            ..o.clone()
        }
        .validate(64)
        .unwrap_err();
        assert_eq!(e.key, "vocab_size");
        assert!(
            MqarOptions {
                vocab_size: 18,
                ..o.clone()
            }
            .validate(64)
            .is_ok()
        );
        assert_eq!(
            MqarOptions {
                num_kv_pairs: 0,
                ..o.clone()
            }
            .validate(64)
            .unwrap_err()
            .key,
            "num_kv_pairs"
        );
        assert_eq!(
            MqarOptions { power_a: 0.0, ..o }
                .validate(64)
                .unwrap_err()
                .key,
            "power_a"
        );
    }
}

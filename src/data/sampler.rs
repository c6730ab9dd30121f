//! Windows of `seq_len + 1` tokens from a split's shards, drawn by a sampler whose whole
//! state is in every checkpoint, so a resumed run draws the same batches.

use std::sync::Arc;

use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::token_shards::{Split, TokenStore};
use crate::components::checkpoint::{CheckpointReader, CheckpointWriter, Stateful};

/// One split of a dataset: its shards, and how many bytes of text each token stands for.
pub struct TokenSplit {
    pub split: Split,
    pub shards: Vec<TokenStore>,
    pub token_bytes: Arc<Vec<u32>>,
}

impl TokenSplit {
    pub fn tokens(&self) -> usize {
        self.shards.iter().map(TokenStore::len).sum()
    }

    /// Random windows per shard: every start that leaves `seq_len + 1` tokens.
    fn random_windows(&self, seq_len: usize) -> Vec<u64> {
        self.shards
            .iter()
            .map(|s| s.len().saturating_sub(seq_len) as u64)
            .collect()
    }

    /// Sequential windows per shard: starts at multiples of `seq_len`, so each token is an
    /// input once.
    fn sequential_windows(&self, seq_len: usize) -> Vec<u64> {
        self.shards
            .iter()
            .map(|s| (s.len().saturating_sub(1) / seq_len) as u64)
            .collect()
    }

    /// Whether a window of `seq_len` fits in some shard; else an error naming the split.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), String> {
        match self.random_windows(seq_len).iter().any(|&n| n > 0) {
            true => Ok(()),
            false => Err(format!(
                "the {} split has {} tokens (largest shard {}), too few for windows of \
                 training.seq_len + 1 = {} tokens",
                self.split.name(),
                self.tokens(),
                self.shards.iter().map(TokenStore::len).max().unwrap_or(0),
                seq_len + 1
            )),
        }
    }

    /// The batch of windows at `(shard, start)`.
    pub fn batch(&self, starts: &[(usize, usize)], seq_len: usize, device: &Device) -> Batch {
        let mut inputs = Vec::with_capacity(starts.len() * seq_len);
        let mut targets = Vec::with_capacity(starts.len() * seq_len);
        for &(shard, start) in starts {
            let store = &self.shards[shard];
            store.extend_into(start, seq_len, &mut inputs);
            store.extend_into(start + 1, seq_len, &mut targets);
        }
        let target_bytes = targets
            .iter()
            .map(|&t| self.token_bytes.get(t as usize).copied().unwrap_or(0) as u64)
            .sum();
        let shape = [starts.len(), seq_len];
        Batch {
            inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
            targets: Tensor::from_data(TensorData::new(targets, shape), device),
            target_bytes,
        }
    }
}

/// One micro-batch: inputs and next-token targets, `[batch, seq]` each.
pub struct Batch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    /// Bytes of text the targets stand for (bits per byte divides by it).
    pub target_bytes: u64,
}

/// `[data] sampling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Windows at uniformly random starts across all shards, weighted by size (nanoGPT's
    /// `get_batch`).
    #[default]
    Random,
    /// Every token once per epoch, in an order shuffled by the seed and the epoch.
    Sequential,
}

/// Draws window starts. Random: its whole state is the ChaCha RNG. Sequential: the epoch
/// and how far into it; the epoch's order is a seeded permutation computed, not stored, so
/// the state stays three numbers whatever the corpus size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowSampler {
    Random { rng: Box<ChaCha8Rng> },
    Sequential { seed: u64, epoch: u64, cursor: u64 },
}

impl WindowSampler {
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        match sampling {
            Sampling::Random => Self::Random {
                rng: Box::new(ChaCha8Rng::seed_from_u64(seed)),
            },
            Sampling::Sequential => Self::Sequential {
                seed,
                epoch: 0,
                cursor: 0,
            },
        }
    }

    /// Starts `(shard, offset)` of the next `batch` windows of `seq_len + 1` tokens.
    pub fn starts(
        &mut self,
        split: &TokenSplit,
        batch: usize,
        seq_len: usize,
    ) -> Vec<(usize, usize)> {
        match self {
            Self::Random { rng } => {
                let counts = split.random_windows(seq_len);
                let total: u64 = counts.iter().sum();
                (0..batch)
                    .map(|_| locate(&counts, rng.random_range(0..total)))
                    .collect()
            }
            Self::Sequential {
                seed,
                epoch,
                cursor,
            } => {
                let counts = split.sequential_windows(seq_len);
                let total: u64 = counts.iter().sum();
                let order = |epoch: u64| {
                    Permutation::new(
                        total,
                        *seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    )
                };
                let mut permutation = order(*epoch);
                (0..batch)
                    .map(|_| {
                        // `>=`: a resume onto fewer windows (another seq_len, a smaller
                        // corpus) starts the next epoch rather than walking off the end.
                        if *cursor >= total {
                            *epoch += 1;
                            *cursor = 0;
                            permutation = order(*epoch);
                        }
                        let window = permutation.apply(*cursor);
                        *cursor += 1;
                        let (shard, k) = locate(&counts, window);
                        (shard, k * seq_len)
                    })
                    .collect()
            }
        }
    }

    pub fn batch(
        &mut self,
        split: &TokenSplit,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Batch {
        let starts = self.starts(split, batch, seq_len);
        split.batch(&starts, seq_len, device)
    }
}

/// Shard and index within it of the `i`-th window, counting shards in order.
fn locate(counts: &[u64], mut i: u64) -> (usize, usize) {
    for (shard, &n) in counts.iter().enumerate() {
        if i < n {
            return (shard, i as usize);
        }
        i -= n;
    }
    unreachable!("window index beyond the split")
}

/// A seeded bijection of `0..n` without a table: a four-round Feistel network on the
/// smallest even number of bits that covers `n`, walking the cycle until the value lands
/// below `n` (fewer than four steps on average).
struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            n,
            half_bits: bits.div_ceil(2),
            keys: std::array::from_fn(|_| rng.random()),
        }
    }

    fn apply(&self, mut x: u64) -> u64 {
        loop {
            x = self.round_trip(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn round_trip(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.keys {
            let f = mix(right ^ key) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Stateful for WindowSampler {
    fn save_state(&self, into: &mut CheckpointWriter) -> anyhow::Result<()> {
        into.entry("sampler", self)
    }

    fn load_state(&mut self, from: &CheckpointReader) -> anyhow::Result<()> {
        let saved: Self = from.required("sampler")?;
        if std::mem::discriminant(&saved) != std::mem::discriminant(self) {
            anyhow::bail!(
                "the checkpoint's data sampler is {:?} sampling, the recipe's data.sampling is \
                 not: resume with the sampling the run started with",
                match saved {
                    Self::Random { .. } => "random",
                    Self::Sequential { .. } => "sequential",
                }
            );
        }
        *self = saved;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(lens: &[usize]) -> TokenSplit {
        TokenSplit {
            split: Split::Train,
            shards: lens
                .iter()
                .map(|&n| TokenStore::Memory((0..n as u32).collect()))
                .collect(),
            token_bytes: Arc::new(vec![1; 1 << 16]),
        }
    }

    #[test]
    fn permutation_is_a_bijection_for_any_size() {
        for n in [1u64, 2, 3, 5, 64, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(i)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<u64> = (0..50).map(|i| Permutation::new(50, 1).apply(i)).collect();
        let b: Vec<u64> = (0..50).map(|i| Permutation::new(50, 2).apply(i)).collect();
        assert_ne!(a, b, "the seed changes the order");
    }

    #[test]
    fn sequential_covers_every_token_once_per_epoch_across_shards() {
        let s = split(&[101, 37, 250]);
        let seq = 8;
        let total: u64 = s.sequential_windows(seq).iter().sum();
        let mut sampler = WindowSampler::new(Sampling::Sequential, 3);
        let first = sampler.starts(&s, total as usize, seq);
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), total as usize, "no window twice in an epoch");
        for &(shard, start) in &first {
            assert!(start + seq < s.shards[shard].len());
            assert_eq!(start % seq, 0);
        }
        // The next epoch is another order of the same windows.
        let second = sampler.starts(&s, total as usize, seq);
        assert_ne!(first, second);
        let mut again = second.clone();
        again.sort();
        assert_eq!(again, sorted);
    }

    #[test]
    fn sampler_state_resumes_the_same_stream() {
        let s = split(&[1000, 500]);
        for sampling in [Sampling::Random, Sampling::Sequential] {
            let mut a = WindowSampler::new(sampling, 7);
            a.starts(&s, 4, 16);
            let saved = serde_json::to_string(&a).unwrap();
            let mut b: WindowSampler = serde_json::from_str(&saved).unwrap();
            assert_eq!(a.starts(&s, 8, 16), b.starts(&s, 8, 16));
            assert_ne!(
                WindowSampler::new(sampling, 8).starts(&s, 8, 16),
                b.starts(&s, 8, 16)
            );
        }
    }

    #[test]
    fn random_windows_reach_every_shard_in_proportion() {
        let s = split(&[10_016, 1_016]);
        let mut sampler = WindowSampler::new(Sampling::Random, 1);
        let starts = sampler.starts(&s, 11_000, 16);
        let in_small = starts.iter().filter(|(shard, _)| *shard == 1).count();
        assert!((800..1200).contains(&in_small), "{in_small} of 11000");
    }
}

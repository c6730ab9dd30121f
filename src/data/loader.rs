//! The train/val split and a sampler of random windows whose RNG state is checkpointed.

use std::path::Path;

use anyhow::{Context, bail};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::CharTokenizer;

/// A tokenized corpus split deterministically: the first `1 - val_fraction` of the text
/// trains, the rest validates (nanoGPT's split).
#[derive(Debug, Clone)]
pub struct Corpus {
    pub tokenizer: CharTokenizer,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl Corpus {
    /// Read and split `path`. With `tokenizer` (a resumed run's), encode with it; otherwise fit one.
    pub fn load(
        path: &Path,
        val_fraction: f64,
        tokenizer: Option<CharTokenizer>,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("data.path: cannot read {}", path.display()))?;
        let tokenizer = tokenizer.unwrap_or_else(|| CharTokenizer::fit(&text));
        let ids = tokenizer
            .encode(&text)
            .with_context(|| format!("data.path: {}", path.display()))?;
        let n_train = ((1.0 - val_fraction) * ids.len() as f64) as usize;
        Ok(Self {
            tokenizer,
            train: ids[..n_train].to_vec(),
            val: ids[n_train..].to_vec(),
        })
    }

    /// Check both splits hold at least one window of `seq_len + 1` tokens.
    pub fn check_seq_len(&self, seq_len: usize, path: &Path) -> anyhow::Result<()> {
        for (name, split) in [("train", &self.train), ("val", &self.val)] {
            if split.len() <= seq_len + 1 {
                bail!(
                    "data.path: the {name} split of {} has {} tokens, too few for training.seq_len = {seq_len}",
                    path.display(),
                    split.len()
                );
            }
        }
        Ok(())
    }
}

/// One micro-batch: inputs and next-token targets, `[batch, seq]` each.
pub struct Batch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
}

/// Draws windows at uniformly random offsets (nanoGPT's `get_batch`). Its whole state is the
/// ChaCha RNG, which serialises exactly, so a resumed run draws the same batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSampler {
    rng: ChaCha8Rng,
}

impl WindowSampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Offsets of `batch` windows of `seq_len + 1` tokens in a split of `len` tokens.
    pub fn offsets(&mut self, len: usize, batch: usize, seq_len: usize) -> Vec<usize> {
        (0..batch)
            .map(|_| self.rng.random_range(0..len - seq_len))
            .collect()
    }

    pub fn batch(
        &mut self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Batch {
        let offsets = self.offsets(tokens.len(), batch, seq_len);
        windows(tokens, &offsets, seq_len, device)
    }
}

/// The batch of windows starting at `offsets`.
pub fn windows(tokens: &[u32], offsets: &[usize], seq_len: usize, device: &Device) -> Batch {
    let mut inputs = Vec::with_capacity(offsets.len() * seq_len);
    let mut targets = Vec::with_capacity(offsets.len() * seq_len);
    for &o in offsets {
        inputs.extend(tokens[o..o + seq_len].iter().map(|&t| t as i64));
        targets.extend(tokens[o + 1..o + seq_len + 1].iter().map(|&t| t as i64));
    }
    let shape = [offsets.len(), seq_len];
    Batch {
        inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
        targets: Tensor::from_data(TensorData::new(targets, shape), device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_state_resumes_the_same_stream() {
        let mut a = WindowSampler::new(7);
        a.offsets(1000, 4, 16);
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: WindowSampler = serde_json::from_str(&saved).unwrap();
        assert_eq!(a.offsets(1000, 8, 16), b.offsets(1000, 8, 16));
        assert_ne!(
            WindowSampler::new(8).offsets(1000, 8, 16),
            b.offsets(1000, 8, 16)
        );
    }
}

//! `sample`: autoregressive generation with temperature and top-k, seeded.

use burn::prelude::*;
use rand::SeedableRng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand_chacha::ChaCha8Rng;

use crate::data::Tokenizer;
use crate::model::{DecodeState, LanguageModel};

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// Divides the logits; → 0 approaches greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// Continue `prompt`, one token at a time through each mixer's recurrent form. A model
/// with a learned position table re-reads the last half-table of tokens into a fresh state
/// when the table runs out (nanoGPT crops its context the same way), so generation never
/// stops; models without one are unbounded.
pub fn generate(
    model: &LanguageModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &SampleOptions,
    device: &Device,
) -> anyhow::Result<String> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        // Start a new document; without an end-of-document token, from a newline, as
        // nanoGPT's sample.py does with "\n".
        ids = match tokenizer.eot() {
            Some(eot) => vec![eot],
            None => tokenizer.encode("\n").unwrap_or(vec![0]),
        };
    }
    let new = generate_ids(model, &ids, opts, device);
    Ok(format!("{prompt}{}", tokenizer.decode(&new)))
}

/// The tokens that follow `prompt` (at least one id), by [`generate`]'s rules.
pub fn generate_ids(
    model: &LanguageModel,
    prompt: &[u32],
    opts: &SampleOptions,
    device: &Device,
) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    let context = model.max_seq_len().unwrap_or(usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let first_new = ids.len();
    let token =
        |id: u32| Tensor::<2, Int>::from_data(TensorData::new(vec![id as i64], [1, 1]), device);
    // Read the prompt (its last `context` tokens).
    let mut state = DecodeState::default();
    let mut logits = None;
    for &id in &ids[ids.len().saturating_sub(context)..] {
        logits = Some(model.step(token(id), &mut state));
    }
    for _ in 0..opts.max_new_tokens {
        let last = logits.take().expect("the prompt has at least one token");
        let v = last.dims()[2];
        let next = pick(last.reshape([v]), opts, &mut rng);
        ids.push(next);
        if state.position >= context {
            state = DecodeState::default();
            let keep = (context / 2).max(1);
            for &id in &ids[ids.len() - keep..ids.len() - 1] {
                model.step(token(id), &mut state);
            }
        }
        logits = Some(model.step(token(next), &mut state));
    }
    ids.split_off(first_new)
}

fn pick(logits: Tensor<1>, opts: &SampleOptions, rng: &mut ChaCha8Rng) -> u32 {
    let mut logits: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32");
    if opts.top_k > 0 && opts.top_k < logits.len() {
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[opts.top_k - 1];
        for l in &mut logits {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if opts.temperature <= 0.0 {
        return argmax(&logits);
    }
    // Softmax of logits / temperature, shifted by the max so exp cannot overflow.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| (((l - max) as f64) / opts.temperature).exp())
        .collect();
    match WeightedIndex::new(&weights) {
        Ok(dist) => dist.sample(rng) as u32,
        Err(_) => argmax(&logits),
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

//! `sample`: autoregressive generation with temperature and top-k, seeded.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::CharTokenizer;
use crate::model::LanguageModel;

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// Divides the logits; → 0 approaches greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// Continue `prompt`. The model sees at most its position table's length of context.
pub fn generate(
    model: &LanguageModel,
    tokenizer: &CharTokenizer,
    prompt: &str,
    opts: &SampleOptions,
    device: &Device,
) -> anyhow::Result<String> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        // Start from a newline, as nanoGPT's sample.py does with "\n".
        ids = tokenizer.encode("\n").unwrap_or(vec![0]);
    }
    let context = model.max_seq_len().unwrap_or(usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let first_new = ids.len();
    for _ in 0..opts.max_new_tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(
                window.iter().map(|&i| i as i64).collect(),
                [1, window.len()],
            ),
            device,
        );
        let logits = model.forward(input);
        let [_, t, v] = logits.dims();
        let last = logits.slice([0..1, t - 1..t, 0..v]).reshape([v]);
        let next = pick(last, opts, &mut rng);
        ids.push(next);
    }
    Ok(format!("{prompt}{}", tokenizer.decode(&ids[first_new..])))
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
    let n = logits.len();
    let scaled = Tensor::<1>::from_data(
        TensorData::new(
            logits
                .iter()
                .map(|l| l / opts.temperature as f32)
                .collect::<Vec<_>>(),
            [n],
        ),
        &Device::flex(),
    );
    let probs: Vec<f32> = softmax(scaled, 0)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let mut u: f32 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    argmax(&probs)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

//! The reference form of softmax attention: materialise the score matrix, mask, softmax.

use burn::nn::Dropout;
use burn::prelude::*;

use super::Visibility;

/// Masked scores are finite, so a row that sees no key of a block gets a negligible
/// log-sum-exp (≈ −1e30) that a merge weighs by exactly 0, instead of a NaN.
pub const HIDDEN: f32 = -1.0e30;

/// Attention of queries at global positions `q_start..` over keys at `k_start..`: q
/// `[b, h, tq, dk]`, k `[b, h, tk, dk]`, v `[b, h, tk, dv]` → the output `[b, h, tq, dv]`
/// and each row's log-sum-exp `[b, h, tq, 1]`. `dropout` drops attention weights.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    starts: (usize, usize),
    visibility: Visibility,
    dropout: Option<&Dropout>,
) -> (Tensor<4>, Tensor<4>) {
    attend_masked(q, k, v, starts, visibility, None, dropout)
}

/// [`attend`], with the keys `hidden_keys` marks (`[b, 1, 1, tk]`, true = padding) hidden
/// from every query as well.
pub fn attend_masked(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    (q_start, k_start): (usize, usize),
    visibility: Visibility,
    hidden_keys: Option<Tensor<4, Bool>>,
    dropout: Option<&Dropout>,
) -> (Tensor<4>, Tensor<4>) {
    let [_, _, tq, dk] = q.dims();
    let tk = k.dims()[2];
    let device = q.device();
    let mut s = q.matmul(k.swap_dims(2, 3)).mul_scalar(super::scale(dk));
    if let Some(hidden) = visibility.mask((q_start, q_start + tq), (k_start, k_start + tk), &device)
    {
        s = s.mask_fill(hidden, HIDDEN);
    }
    if let Some(hidden) = hidden_keys {
        let [b, h, _, _] = s.dims();
        s = s.mask_fill(hidden.expand([b, h, tq, tk]), HIDDEN);
    }
    // The max only stabilises exp; it cancels from both results, so it needs no gradient.
    let m = s.clone().max_dim(3).detach();
    let p = super::exp_scores::exp_scores(s - m.clone());
    let l = p.clone().sum_dim(3);
    let out = match dropout {
        // Dropout acts on the normalised weights.
        Some(d) => crate::fused_dropout::forward(d, p / l.clone()).matmul(v),
        // Normalising the output instead of the weights keeps one [tq, tk] tensor fewer
        // alive for backward (what a ring rank holds per visited block).
        None => p.matmul(v) / l.clone(),
    };
    (out, m + l.log())
}

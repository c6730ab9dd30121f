//! Merging two partial attentions of the same queries over disjoint keys, from their
//! outputs and log-sum-exps (ring attention's and FlashAttention's combine step).

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, sigmoid};

/// Fold one block's `(out, lse)` into the running `(out, lse)` of the same queries:
/// `out = out − σ(lse_b − lse)(out − out_b)`, `lse = lse − logσ(lse − lse_b)`, the stable
/// form of weighting each by `exp(lse_i − lse_total)`. The first block of every row must
/// see at least one key, so the running log-sum-exp is finite.
pub fn merge(
    acc: Option<(Tensor<4>, Tensor<4>)>,
    block: (Tensor<4>, Tensor<4>),
) -> (Tensor<4>, Tensor<4>) {
    let Some((out, lse)) = acc else {
        return block;
    };
    let (out_b, lse_b) = block;
    let w = sigmoid(lse_b.clone() - lse.clone());
    let out = out.clone() - w * (out - out_b);
    let lse = lse.clone() - log_sigmoid(lse - lse_b);
    (out, lse)
}

//! The attention core that softmax attention, mixture-of-head attention and ring attention
//! share: which keys a query sees ([`Visibility`], with its block enumeration), heads
//! ([`split_heads`], [`merge_heads`], [`repeat_kv`]), the forms of softmax attention — the
//! naive reference ([`naive::attend`]), the tiled online-softmax form in tensor ops
//! ([`tiled::attend_tiled_ops`]) and the FlashAttention backend extension ([`flash`]) — all
//! returning the output and each row's log-sum-exp, and the rule that merges two partial
//! results over disjoint keys ([`merge::merge`]).

pub mod exp_scores;
pub mod flash;
pub mod fused_softmax;
pub mod heads;
pub mod merge;
pub mod naive;
pub mod tiled;
pub mod visibility;

use burn::prelude::*;

pub use heads::{merge_heads, split_heads};
pub use merge::merge;
pub use visibility::Visibility;

/// Grouped-query attention: each of `[b, kv_heads, t, hd]`'s heads serves `groups`
/// consecutive query heads.
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, groups, t, hd])
        .reshape([b, kvh * groups, t, hd])
}

/// The softmax temperature `1 / √head_dim`.
pub fn scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

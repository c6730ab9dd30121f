//! The memory-efficient form of causal softmax attention: queries and keys in blocks, an
//! online softmax over the key blocks each query block sees.

use burn::nn::Dropout;
use burn::prelude::*;

use super::Visibility;
use super::flash::{FlashAttentionBackend, Span};

/// Attention over a whole sequence, tiled in `block`s, `dropout` acting on the weights.
/// On flex (the CPU backend) it runs as a backend extension with FlashAttention's
/// recomputing backward ([`super::flash`]), so training memory is linear in sequence
/// length too; elsewhere, as [`attend_tiled_ops`]. Both drop weights by the counter-based
/// mask of [`crate::fused_dropout`], tile by tile, so they drop what the naive form drops
/// on flex under the same key.
pub fn attend_tiled(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    block: usize,
    visibility: Visibility,
    dropout: Option<&Dropout>,
) -> Tensor<4> {
    let mask = dropout.and_then(|d| crate::fused_dropout::mask_for(d, &q.device()));
    if takes_flash_path(&q.device()) {
        flash(q, k, v, (0, 0), visibility, block, mask).0
    } else {
        attend_tiled_ops(q, k, v, block, visibility, mask).0
    }
}

/// Attention of queries at global positions `q_start..` over keys at `k_start..` (a ring
/// attention block, or with both at 0 a whole sequence), tiled in `block`s: the output and
/// each row's log-sum-exp, both differentiable. FlashAttention on flex (memory linear in
/// the block's length in training too); the naive form elsewhere, which Burn's autodiff
/// stores whole either way.
pub fn attend_block(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    (q_start, k_start): (usize, usize),
    visibility: Visibility,
    block: usize,
) -> (Tensor<4>, Tensor<4>) {
    if takes_flash_path(&q.device()) {
        flash(q, k, v, (q_start, k_start), visibility, block, None)
    } else {
        super::naive::attend(q, k, v, (q_start, k_start), visibility, None)
    }
}

/// The FlashAttention extension (flex only): output and row log-sum-exp. `dropout`: the
/// weights' mask `(p, key)`, for a whole sequence only (both starts 0).
fn flash(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    (q_start, k_start): (usize, usize),
    visibility: Visibility,
    block: usize,
    dropout: Option<(f64, u64)>,
) -> (Tensor<4>, Tensor<4>) {
    let dv = v.dims()[3];
    let span = Span::new(block, (q_start, k_start), visibility, dropout);
    let packed = <burn::backend::Dispatch as FlashAttentionBackend>::flash_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        span,
    );
    let packed = Tensor::<4>::from_dispatch(packed);
    (packed.clone().narrow(3, 0, dv), packed.narrow(3, dv, 1))
}

/// From this many tokens, whole-sequence attention on flex takes the FlashAttention kernels
/// (in blocks of [`FLASH_BLOCK`] queries) where the recipe leaves `tiled` unset: from 2k tokens they are faster than the materialised weights (1.04–1.2× one layer
/// of nanoGPT's and of the default model at 2k, ~2× at 4k–16k), and their memory grows
/// linearly; at 512–1k the two were within noise of each other.
pub const FLASH_FROM: usize = 2048;

/// Queries per block of the FlashAttention kernels where metamix picks them (128 measured
/// a few percent faster than 64 from 2k tokens on).
pub const FLASH_BLOCK: usize = 128;

/// Whether [`attend_tiled`] runs the FlashAttention extension on `device` (registered for
/// flex and its autodiff).
pub fn takes_flash_path(device: &Device) -> bool {
    crate::device::is_flex(device)
}

/// FlashAttention's forward in tensor ops: each query block streams over the key blocks
/// it can see ([`Visibility::key_blocks`]: blocks wholly in the future or wholly too old
/// are skipped), keeping a running max `m`, normaliser `l` and unnormalised output,
/// rescaled whenever the max grows. Scores exist one block pair at a time, so inference
/// memory grows linearly with sequence length (Burn's autodiff still keeps every block for
/// backward: that is what the extension avoids). Returns the output and row log-sum-exp.
/// `dropout`, the mask `(p, key)` of [`crate::fused_dropout`], multiplies each block of
/// weights before it meets the values; the normaliser sums them undropped.
pub fn attend_tiled_ops(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    block: usize,
    visibility: Visibility,
    dropout: Option<(f64, u64)>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let dropped = |p: Tensor<4>, (q0, q1), (k0, k1)| match dropout {
        Some(mask) => {
            let f = crate::fused_dropout::block_factors(mask, (b * h, t, t), q0..q1, k0..k1);
            let f = TensorData::new(f, [b, h, q1 - q0, k1 - k0]);
            p * Tensor::<4>::from_data(f, &device)
        }
        None => p,
    };
    let (mut outputs, mut lses) = (Vec::new(), Vec::new());
    for q0 in (0..t).step_by(block) {
        let q1 = (q0 + block).min(t);
        let q_blk = q
            .clone()
            .slice([0..b, 0..h, q0..q1, 0..dk])
            .mul_scalar(super::scale(dk));
        let mut state: Option<(Tensor<4>, Tensor<4>, Tensor<4>)> = None; // m, l, acc
        for (k0, k1) in visibility.key_blocks((q0, q1), (0, t), block) {
            let k_blk = k.clone().slice([0..b, 0..h, k0..k1, 0..dk]);
            let v_blk = v.clone().slice([0..b, 0..h, k0..k1, 0..dv]);
            let mut scores = q_blk.clone().matmul(k_blk.transpose());
            if let Some(hidden) = visibility.mask((q0, q1), (k0, k1), &device) {
                scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
            }
            // The diagonal block comes first, so every row's max is finite from the start.
            let blk_max = scores.clone().max_dim(3);
            state = Some(match state {
                None => {
                    let p = (scores - blk_max.clone()).exp();
                    let pv = dropped(p.clone(), (q0, q1), (k0, k1)).matmul(v_blk);
                    (blk_max, p.sum_dim(3), pv)
                }
                Some((m, l, acc)) => {
                    let m_new = m.clone().max_pair(blk_max);
                    let p = (scores - m_new.clone()).exp();
                    let correction = (m - m_new.clone()).exp();
                    let pv = dropped(p.clone(), (q0, q1), (k0, k1)).matmul(v_blk);
                    let l = l * correction.clone() + p.sum_dim(3);
                    (m_new, l, acc * correction + pv)
                }
            });
        }
        let (m, l, acc) = state.expect("every query block sees its diagonal block");
        outputs.push(acc / l.clone());
        lses.push(m + l.log());
    }
    (Tensor::cat(outputs, 2), Tensor::cat(lses, 2))
}

//! FlashAttention (Dao et al.) as a Burn backend extension: the tiled forward of
//! [`attend_tiled_ops`](super::tiled::attend_tiled_ops), plus a backward pass that
//! recomputes each block's probabilities from the saved row log-sum-exp instead of keeping
//! them. Training memory then grows linearly in sequence length; Burn's autodiff, left to
//! itself, keeps every block of scores for the backward pass.
//!
//! One kernel serves whole-sequence causal attention and ring attention's blocks: queries
//! and keys sit at global positions (`q_start..`, `k_start..`) under any [`Visibility`],
//! and the output carries each row's log-sum-exp as one extra last channel
//! (`[b, h, tq, dv + 1]`), so a ring can merge blocks and still get gradients through the
//! log-sum-exp (`dS = P ∘ (dP − (rowsum(dO ∘ O) − dlse))`).
//!
//! Dropout on the weights, for a whole sequence, multiplies each block of weights by its
//! part of [`crate::fused_dropout`]'s counter-based mask, recomputed in backward as the
//! blocks of weights are, so no mask is stored (FlashAttention's own dropout works so).
//!
//! On flex in f32 it runs as native kernels ([`kernel`]): a gemm per block of queries over
//! every key the block sees, the softmax in cache. The block-pair form here, in backend
//! primitive ops, is the same computation for flex's other dtypes; the extension is
//! registered for flex (and its autodiff), the CPU backend. Other backends use the
//! tensor-op forms.

mod kernel;

use crate::device::{RunCount, flex_from_f32, register_gradients};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, Slice, TensorMetadata, backend_extension};
use burn::tensor::{DType, TensorData};

use super::Visibility;
use super::naive::HIDDEN;

#[backend_extension(Flex, Autodiff)]
pub trait FlashAttentionBackend: Backend {
    /// Attention of q `[b, h, tq, dk]` over k `[b, h, tk, dk]`, v `[b, h, tk, dv]`, placed,
    /// tiled and masked as `span` says. Returns `[b, h, tq, dv + 1]`: the output, then each
    /// row's log-sum-exp.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        span: Span,
    ) -> FloatTensor<Self>;

    /// The gradients of q, k and v from the inputs, the packed output [`Self::flash_attention`]
    /// returned and its gradient (the output's, then the log-sum-exp's), under the same span.
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        span: Span,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Forward passes the extension has run in this process: lets a test see that a form
/// really took this path rather than only matching its output.
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// Of those, the ones that ran the native f32 kernels ([`kernel`]).
pub static KERNEL_CALLS: RunCount = RunCount::new();

/// Whether the native kernels take these inputs (else the block-pair form in primitive ops).
fn takes_kernel(tensors: &[&FloatTensor<Flex>]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// Where the queries and keys sit (global positions `q_start..`, `k_start..`), the query
/// tile, which keys each query sees, and the weights' dropout mask `(p, key)` of
/// [`crate::fused_dropout`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    block: usize,
    q_start: usize,
    k_start: usize,
    visibility: Visibility,
    dropout: Option<(f64, u64)>,
}

impl Span {
    /// Dropout (`p > 0`) over a whole sequence only (both starts 0).
    pub fn new(
        block: usize,
        (q_start, k_start): (usize, usize),
        visibility: Visibility,
        dropout: Option<(f64, u64)>,
    ) -> Self {
        let dropout = dropout.filter(|&(p, _)| p > 0.0);
        assert!(
            dropout.is_none() || (q_start, k_start) == (0, 0),
            "FlashAttention drops weights over whole sequences only"
        );
        Self {
            block,
            q_start,
            k_start,
            visibility,
            dropout,
        }
    }

    /// The dropout factors of the block pair (`[b, h, q1 − q0, k1 − k0]`, of `[b, h, tq,
    /// tk]` weights), or `None` without dropout.
    fn dropout_factors<B: Backend>(
        &self,
        (b, h, tq, tk): (usize, usize, usize, usize),
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
        device: &<FloatTensor<B> as TensorMetadata>::Device,
    ) -> Option<FloatTensor<B>> {
        self.dropout.map(|mask| {
            let f = crate::fused_dropout::block_factors(mask, (b * h, tq, tk), q0..q1, k0..k1);
            B::float_from_data(TensorData::new(f, [b, h, q1 - q0, k1 - k0]), device)
        })
    }

    /// The key blocks (local positions) of `tk` keys that query block `[q0, q1)` (local)
    /// sees: blocks wholly in the future or wholly too old are skipped.
    fn key_blocks(&self, (q0, q1): (usize, usize), tk: usize) -> Vec<(usize, usize)> {
        self.visibility.key_blocks(
            (self.q_start + q0, self.q_start + q1),
            (self.k_start, tk),
            self.block,
        )
    }

    /// 0 where key `k0 + j` is visible to query `q0 + i`, [`HIDDEN`] where not; `None` when
    /// the whole block is visible. `[1, 1, q1 − q0, k1 − k0]`.
    fn bias<B: Backend>(
        &self,
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
        device: &<FloatTensor<B> as TensorMetadata>::Device,
    ) -> Option<FloatTensor<B>> {
        self.visibility
            .bias_values(
                (self.q_start + q0, self.q_start + q1),
                (self.k_start + k0, self.k_start + k1),
                HIDDEN,
            )
            .map(|values| {
                B::float_from_data(TensorData::new(values, [1, 1, q1 - q0, k1 - k0]), device)
            })
    }
}

impl FlashAttentionBackend for Flex {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        span: Span,
    ) -> FloatTensor<Self> {
        if !takes_kernel(&[&q, &k, &v]) {
            let (out, lse) = forward::<Flex>(q, k, v, span);
            return Flex::float_cat(vec![out, lse], 3);
        }
        FORWARD_CALLS.record();
        KERNEL_CALLS.record();
        let mut shape = q.shape();
        shape[3] = v.shape()[3] + 1;
        flex_from_f32(kernel::forward(&q, &k, &v, &span), shape, DType::F32)
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        span: Span,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !takes_kernel(&[&q, &k, &v, &packed, &grad]) {
            let saved = Saved {
                q,
                k,
                v,
                packed,
                span,
            };
            return backward::<Flex>(saved, grad);
        }
        let (dq, dk, dv) = kernel::backward((&q, &k, &v), &packed, &grad, &span);
        let f = |values, like: &FloatTensor<Self>| flex_from_f32(values, like.shape(), DType::F32);
        (f(dq, &q), f(dk, &k), f(dv, &v))
    }
}

/// What the backward pass keeps: the inputs, and the output packed with each row's
/// log-sum-exp as the extension returned it.
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    packed: FloatTensor<B>,
    span: Span,
}

#[derive(Debug)]
struct FlashBackward;

impl<B: Backend + FlashAttentionBackend> Backward<B, 3> for FlashBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let parents = ops.parents.map(|p| p.map(|n| n.id));
        let grad_packed = grads.consume::<B>(&ops.node);
        let Saved {
            q,
            k,
            v,
            packed,
            span,
        } = ops.state;
        let (dq, dk, dv) = B::flash_attention_backward(q, k, v, packed, grad_packed, span);
        register_gradients::<B, _>(grads, parents, [dq, dk, dv]);
    }
}

impl<B: Backend + FlashAttentionBackend, C: CheckpointStrategy> FlashAttentionBackend
    for Autodiff<B, C>
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        span: Span,
    ) -> FloatTensor<Self> {
        match FlashBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let packed = B::flash_attention(q.clone(), k.clone(), v.clone(), span);
                let saved = Saved {
                    q,
                    k,
                    v,
                    packed: packed.clone(),
                    span,
                };
                prep.finish(saved, packed)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                span,
            )),
        }
    }

    fn flash_attention_backward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _packed: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _span: Span,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!(
            "FlashAttention's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

fn range(a: usize, b: usize) -> Slice {
    Slice::new(a as isize, Some(b as isize), 1)
}

/// Rows `a..b` of dim 2 of a `[b, h, t, d]` tensor.
fn rows<B: Backend>(x: &FloatTensor<B>, a: usize, b: usize) -> FloatTensor<B> {
    let s = x.shape();
    B::float_slice(
        x.clone(),
        &[range(0, s[0]), range(0, s[1]), range(a, b), range(0, s[3])],
    )
}

/// Channels `a..b` of dim 3 of a `[b, h, t, d]` tensor.
fn channels<B: Backend>(x: &FloatTensor<B>, a: usize, b: usize) -> FloatTensor<B> {
    let s = x.shape();
    B::float_slice(
        x.clone(),
        &[range(0, s[0]), range(0, s[1]), range(0, s[2]), range(a, b)],
    )
}

/// Scores of a block pair: `q_blk · k_blkᵀ / √dk` plus the visibility bias.
fn scores<B: Backend>(
    q_blk: FloatTensor<B>,
    k_blk: FloatTensor<B>,
    bias: &Option<FloatTensor<B>>,
    scale: f64,
) -> FloatTensor<B> {
    let s = B::float_mul_scalar(
        B::float_matmul(q_blk, B::float_swap_dims(k_blk, 2, 3)),
        scale.into(),
    );
    match bias {
        Some(b) => B::float_add(s, b.clone()),
        None => s,
    }
}

/// Output `[b, h, tq, dv]` and row log-sum-exp `[b, h, tq, 1]`. Masked scores are the finite
/// [`HIDDEN`], so a row that sees no key of the visited blocks gets a finite log-sum-exp
/// near −1e30 (weight 0 in any merge) instead of a NaN, as in [`super::naive::attend`].
fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    span: Span,
) -> (FloatTensor<B>, FloatTensor<B>) {
    FORWARD_CALLS.record();
    let shape = q.shape();
    let (b, h, tq, dk) = (shape[0], shape[1], shape[2], shape[3]);
    let tk = k.shape()[2];
    let dv = v.shape()[3];
    let scale = super::scale(dk);
    let device = q.device();
    let dtype = q.dtype();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for q0 in (0..tq).step_by(span.block) {
        let q1 = (q0 + span.block).min(tq);
        let q_blk = rows::<B>(&q, q0, q1);
        let mut state: Option<(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)> = None; // m, l, acc
        for (k0, k1) in span.key_blocks((q0, q1), tk) {
            let bias = span.bias::<B>((q0, q1), (k0, k1), &device);
            let s = scores::<B>(q_blk.clone(), rows::<B>(&k, k0, k1), &bias, scale);
            let v_blk = rows::<B>(&v, k0, k1);
            let blk_max = B::float_max_dim(s.clone(), 3);
            let factors = span.dropout_factors::<B>((b, h, tq, tk), (q0, q1), (k0, k1), &device);
            // The weights meet the values dropped; the normaliser sums them whole.
            let weighted = |p: FloatTensor<B>| match factors {
                Some(f) => B::float_matmul(B::float_mul(p, f), v_blk),
                None => B::float_matmul(p, v_blk),
            };
            state = Some(match state {
                None => {
                    let p = B::float_exp(B::float_sub(s, blk_max.clone()));
                    (blk_max, B::float_sum_dim(p.clone(), 3), weighted(p))
                }
                Some((m, l, acc)) => {
                    let m_new = B::float_max_dim(B::float_cat(vec![m.clone(), blk_max], 3), 3);
                    let p = B::float_exp(B::float_sub(s, m_new.clone()));
                    let c = B::float_exp(B::float_sub(m, m_new.clone()));
                    let l =
                        B::float_add(B::float_mul(l, c.clone()), B::float_sum_dim(p.clone(), 3));
                    let acc = B::float_add(B::float_mul(acc, c), weighted(p));
                    (m_new, l, acc)
                }
            });
        }
        match state {
            Some((m, l, acc)) => {
                outs.push(B::float_div(acc, l.clone()));
                lses.push(B::float_add(m, B::float_log(l)));
            }
            // No key block is visible to these queries: nothing to attend, weight 0 in a merge.
            None => {
                outs.push(B::float_zeros(
                    [b, h, q1 - q0, dv].into(),
                    &device,
                    dtype.into(),
                ));
                lses.push(B::float_full(
                    [b, h, q1 - q0, 1].into(),
                    HIDDEN.into(),
                    &device,
                    dtype.into(),
                ));
            }
        }
    }
    (B::float_cat(outs, 2), B::float_cat(lses, 2))
}

/// FlashAttention-2's backward: per block pair, recompute `P = exp(S − lse)`, then
/// `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − δ)`, `dQ += dS K / √dk`, `dK += dSᵀ Q / √dk`, with
/// `δ = rowsum(dO ∘ O) − dlse`: the gradient reaching the log-sum-exp output enters there,
/// since `∂lse_i/∂S_ij = P_ij`. With dropout factors F, `dV += (P ∘ F)ᵀ dO` and
/// `dS = P ∘ ((dO Vᵀ) ∘ F − δ)`; δ is unchanged, as `rowsum(P ∘ F ∘ dO Vᵀ) = rowsum(dO ∘ O)`.
fn backward<B: Backend>(
    saved: Saved<B>,
    grad_packed: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let Saved {
        q,
        k,
        v,
        packed,
        span,
    } = saved;
    let (b, h, tq) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let tk = k.shape()[2];
    let dk = q.shape()[3];
    let dv = v.shape()[3];
    let out = channels::<B>(&packed, 0, dv);
    let lse = channels::<B>(&packed, dv, dv + 1);
    let scale = super::scale(dk);
    let device = q.device();
    let grad_out = channels::<B>(&grad_packed, 0, dv);
    let grad_lse = channels::<B>(&grad_packed, dv, dv + 1);
    let delta = B::float_sub(
        B::float_sum_dim(B::float_mul(grad_out.clone(), out), 3),
        grad_lse,
    ); // [b, h, tq, 1]
    let mut dq: Vec<Option<FloatTensor<B>>> = vec![None; tq.div_ceil(span.block)];
    let mut dkv: Vec<Option<(FloatTensor<B>, FloatTensor<B>)>> =
        vec![None; tk.div_ceil(span.block)];
    for (qi, q0) in (0..tq).step_by(span.block).enumerate() {
        let q1 = (q0 + span.block).min(tq);
        let q_blk = rows::<B>(&q, q0, q1);
        let do_blk = rows::<B>(&grad_out, q0, q1);
        let lse_blk = rows::<B>(&lse, q0, q1);
        let delta_blk = rows::<B>(&delta, q0, q1);
        for (k0, k1) in span.key_blocks((q0, q1), tk) {
            let bias = span.bias::<B>((q0, q1), (k0, k1), &device);
            let k_blk = rows::<B>(&k, k0, k1);
            let v_blk = rows::<B>(&v, k0, k1);
            let s = scores::<B>(q_blk.clone(), k_blk.clone(), &bias, scale);
            let p = B::float_exp(B::float_sub(s, lse_blk.clone()));
            let factors = span.dropout_factors::<B>((b, h, tq, tk), (q0, q1), (k0, k1), &device);
            let dropped = match &factors {
                Some(f) => B::float_mul(p.clone(), f.clone()),
                None => p.clone(),
            };
            let dv_part = B::float_matmul(B::float_swap_dims(dropped, 2, 3), do_blk.clone());
            let dp = B::float_matmul(do_blk.clone(), B::float_swap_dims(v_blk, 2, 3));
            let dp = match factors {
                Some(f) => B::float_mul(dp, f),
                None => dp,
            };
            let ds = B::float_mul_scalar(
                B::float_mul(p, B::float_sub(dp, delta_blk.clone())),
                scale.into(),
            );
            let dq_part = B::float_matmul(ds.clone(), k_blk);
            let dk_part = B::float_matmul(B::float_swap_dims(ds, 2, 3), q_blk.clone());
            dq[qi] = Some(match dq[qi].take() {
                Some(acc) => B::float_add(acc, dq_part),
                None => dq_part,
            });
            let kj = k0 / span.block;
            dkv[kj] = Some(match dkv[kj].take() {
                Some((dk_acc, dv_acc)) => {
                    (B::float_add(dk_acc, dk_part), B::float_add(dv_acc, dv_part))
                }
                None => (dk_part, dv_part),
            });
        }
    }
    let shape = |x: &FloatTensor<B>, t: usize| {
        let s = x.shape();
        [s[0], s[1], t, s[3]]
    };
    let dtype = q.dtype();
    // A block no query saw gets no gradient: zeros.
    let dq: Vec<FloatTensor<B>> = dq
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            g.unwrap_or_else(|| {
                let n = (tq - i * span.block).min(span.block);
                B::float_zeros(shape(&q, n).into(), &device, dtype.into())
            })
        })
        .collect();
    let (dks, dvs): (Vec<_>, Vec<_>) = dkv
        .into_iter()
        .enumerate()
        .map(|(j, g)| {
            g.unwrap_or_else(|| {
                let n = (tk - j * span.block).min(span.block);
                (
                    B::float_zeros(shape(&k, n).into(), &device, dtype.into()),
                    B::float_zeros(shape(&v, n).into(), &device, dtype.into()),
                )
            })
        })
        .unzip();
    (
        B::float_cat(dq, 2),
        B::float_cat(dks, 2),
        B::float_cat(dvs, 2),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::flex_f32;
    use crate::testing::{SeededValues, max_relative_difference};

    /// A flex tensor of normal values, drawn without the device's generator.
    fn normal(shape: [usize; 4], seed: u64) -> FloatTensor<Flex> {
        let n = shape.iter().product();
        let values = SeededValues::new(seed).draw(n, burn::tensor::Distribution::Normal(0.0, 1.0));
        flex_from_f32(values, shape, DType::F32)
    }

    /// The native kernels equal the block-pair form in primitive ops, which other dtypes
    /// take: the packed output, and the gradients of q, k and v under a gradient on both
    /// the output and the log-sum-exp. Whole sequences (causal, windowed, bidirectional,
    /// dropout) and ring-attention blocks at offsets (one whose last queries see no key),
    /// blocks that leave a partial one, queries as a strided view (heads split).
    #[test]
    fn kernels_equal_the_block_pair_form() {
        let bidirectional = Visibility {
            causal: false,
            window: 0,
        };
        // (tq, tk, (q_start, k_start), visibility, block, dropout)
        let cases = [
            (37, 37, (0, 0), Visibility::causal(0), 8, 0.0),
            (37, 37, (0, 0), Visibility::causal(11), 16, 0.0),
            (30, 30, (0, 0), bidirectional, 8, 0.0),
            (37, 37, (0, 0), Visibility::causal(0), 8, 0.3),
            (33, 33, (0, 0), Visibility::causal(9), 16, 0.25),
            (20, 20, (40, 20), Visibility::causal(0), 8, 0.0),
            // Queries 48.. see no key (the block form leaves a row that sees none inside a
            // block it visits unspecified: weight 0 in a merge either way).
            (20, 20, (40, 0), Visibility::causal(29), 8, 0.0),
            (20, 24, (20, 40), bidirectional, 8, 0.0),
        ];
        for (seed, (tq, tk, starts, visibility, block, p)) in cases.into_iter().enumerate() {
            let seed = 10 * seed as u64;
            let q = Flex::float_swap_dims(normal([2, tq, 3, 8], seed), 1, 2);
            let (k, v) = (
                normal([2, 3, tk, 8], seed + 1),
                normal([2, 3, tk, 5], seed + 2),
            );
            let grad = normal([2, 3, tq, 6], seed + 3);
            let span = Span::new(block, starts, visibility, Some((p, 77)));
            let (out, lse) = forward::<Flex>(q.clone(), k.clone(), v.clone(), span);
            let packed = Flex::float_cat(vec![out, lse], 3);
            let ours = kernel::forward(&q, &k, &v, &span);
            let what = format!("tq {tq} tk {tk} at {starts:?} {visibility:?} block {block} p {p}");
            let err = max_relative_difference(&ours, &flex_f32(&packed));
            assert!(err < 1e-5, "{what} packed output: max difference {err}");
            let saved = Saved {
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                packed: packed.clone(),
                span,
            };
            let reference = backward::<Flex>(saved, grad.clone());
            let ours = kernel::backward((&q, &k, &v), &packed, &grad, &span);
            for (name, a, b) in [
                ("dq", ours.0, reference.0),
                ("dk", ours.1, reference.1),
                ("dv", ours.2, reference.2),
            ] {
                let err = max_relative_difference(&a, &flex_f32(&b));
                assert!(err < 1e-4, "{what} {name}: max difference {err}");
            }
        }
    }
}

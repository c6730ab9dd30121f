//! Softmax attention's weights in one pass each way, as a Burn backend extension on flex:
//! `P = softmax(scale · S)` over the keys each query sees, and in backward
//! `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`. The naive form ([`super::naive::attend`])
//! builds the same weights from about six tensor ops (scale, mask, max, subtract, exp, sum,
//! divide), each a sweep over the `[b, h, tq, tk]` scores plus its own backward. That form
//! is the reference, and runs wherever this one does not; a test holds the two equal,
//! gradients included.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::nn::Dropout;
use burn::prelude::*;
use rayon::prelude::*;

use super::Visibility;
use crate::device::{flex_f32, flex_from_f32};
use crate::matmul::{Blocks, matmul_blocks};
use crate::vector_math::{dot_fma, exp_nonpositive_fma, has_fma, max, sum};

/// Forward passes the extension has run in this process (for a test that it took the path).
static FORWARD_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Score rows per parallel task.
const ROWS: usize = 32;

/// Rows and columns of the blocks causal attention's products skip above the diagonal
/// ([`Blocks`]); sequences no longer than one block take plain products.
pub const CAUSAL_BLOCK: usize = 64;

#[backend_extension(Flex, Autodiff)]
pub trait FusedSoftmaxBackend: Backend {
    /// `softmax(scale · s)` of scores `[.., tq, tk]` along the keys, query `i` seeing only
    /// the keys `visibility` allows (weight 0 elsewhere; a row that sees none is all 0).
    fn attention_weights(
        s: FloatTensor<Self>,
        scale: f64,
        visibility: Visibility,
    ) -> FloatTensor<Self>;

    /// `dS` from the weights `p` and their gradient `dp` (0 where `visibility` hides a key).
    fn attention_weights_backward(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f64,
        visibility: Visibility,
    ) -> FloatTensor<Self>;
}

/// Softmax attention of q `[b, h, t, dk]` over k `[b, h, t, dk]`, v `[b, h, t, dv]` (no key
/// mask), `dropout` acting on the weights: the extension's weights times v on flex,
/// [`super::naive::attend`] elsewhere.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    visibility: Visibility,
    dropout: Option<&Dropout>,
) -> Tensor<4> {
    if !crate::device::is_flex(&q.device()) {
        return super::naive::attend(q, k, v, (0, 0), visibility, dropout).0;
    }
    let scale = super::scale(q.dims()[3]);
    let (tq, tk) = (q.dims()[2], k.dims()[2]);
    // Causal scores above the diagonal blocks are masked and their weights are 0.
    let (scores, weighted) = if visibility.causal && tq == tk && tq > CAUSAL_BLOCK {
        (
            Blocks::OutLower(CAUSAL_BLOCK),
            Blocks::LeftLower(CAUSAL_BLOCK),
        )
    } else {
        (Blocks::Dense, Blocks::Dense)
    };
    let s = matmul_blocks(q, k.swap_dims(2, 3), scores);
    let p = Tensor::<4>::from_dispatch(
        <burn::backend::Dispatch as FusedSoftmaxBackend>::attention_weights(
            s.into_dispatch(),
            scale,
            visibility,
        ),
    );
    let p = match dropout {
        Some(d) => crate::fused_dropout::forward(d, p),
        None => p,
    };
    matmul_blocks(p, v, weighted)
}

/// The keys `[lo, hi)` query `i` sees (a contiguous range under any [`Visibility`]).
#[inline(always)]
fn visible(i: usize, tk: usize, v: Visibility) -> (usize, usize) {
    let hi = if v.causal { (i + 1).min(tk) } else { tk };
    let lo = if v.window > 0 {
        (i + 1).saturating_sub(v.window)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// A row of the output with every element written: the same memory as `[f32]`.
fn written(row: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller has written every element.
    unsafe { &mut *(row as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Writes 0 to the hidden keys of a row, outside `[lo, hi)`.
#[inline(always)]
fn zero_outside(row: &mut [MaybeUninit<f32>], (lo, hi): (usize, usize)) {
    let (head, rest) = row.split_at_mut(lo);
    for x in head.iter_mut().chain(&mut rest[hi - lo..]) {
        x.write(0.0);
    }
}

/// The forward over a task's rows (`first_row..`, each `tk` long, `tq` per sequence),
/// writing every element once: hidden keys get weight 0. An output zeroed beforehand cost
/// a sweep of its own, 6% of nanoGPT's step at seq 1024 (perf).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows(
    p: &mut [MaybeUninit<f32>],
    s: &[f32],
    (first_row, tq, tk): (usize, usize, usize),
    scale: f32,
    visibility: Visibility,
) {
    const FMA: bool = has_fma!();
    for (r, (p, s)) in p.chunks_mut(tk).zip(s.chunks(tk)).enumerate() {
        let (lo, hi) = visible((first_row + r) % tq, tk, visibility);
        zero_outside(p, (lo, hi));
        if lo == hi {
            continue;
        }
        let s = &s[lo..hi];
        let m = max(s) * scale;
        for (p, &s) in p[lo..hi].iter_mut().zip(s) {
            p.write(exp_nonpositive_fma::<FMA>(s * scale - m));
        }
        let p = &mut written(p)[lo..hi];
        let inv = 1.0 / sum(p);
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

/// The backward over a task's rows, writing every element once; a hidden key's weight is
/// 0, so its `dS` is too, and neither `p` nor `dp` is read there (half of a causal row).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows_backward(
    ds: &mut [MaybeUninit<f32>],
    (p, dp): (&[f32], &[f32]),
    (first_row, tq, tk): (usize, usize, usize),
    scale: f32,
    visibility: Visibility,
) {
    const FMA: bool = has_fma!();
    let rows = ds.chunks_mut(tk).zip(p.chunks(tk)).zip(dp.chunks(tk));
    for (r, ((ds, p), dp)) in rows.enumerate() {
        let (lo, hi) = visible((first_row + r) % tq, tk, visibility);
        zero_outside(ds, (lo, hi));
        let (p, dp) = (&p[lo..hi], &dp[lo..hi]);
        let c = dot_fma::<FMA>(p, dp);
        for ((ds, &p), &dp) in ds[lo..hi].iter_mut().zip(p).zip(dp) {
            ds.write(scale * p * (dp - c));
        }
    }
}

/// A `[.., tq, tk]` f32 output of `n` elements, its rows written in parallel tasks of
/// [`ROWS`] rows by `rows(task's rows, first row)`, each writing every element it is given.
fn by_row_tasks(
    n: usize,
    tk: usize,
    rows: impl Fn(&mut [MaybeUninit<f32>], usize) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()
        .par_chunks_mut(ROWS * tk)
        .enumerate()
        .for_each(|(task, piece)| rows(piece, task * ROWS));
    // SAFETY: the tasks cover the n elements and write each one.
    unsafe { out.set_len(n) };
    out
}

impl FusedSoftmaxBackend for Flex {
    fn attention_weights(s: FlexTensor, scale: f64, visibility: Visibility) -> FlexTensor {
        FORWARD_CALLS.fetch_add(1, Ordering::Relaxed);
        let (shape, dtype) = (s.shape(), s.dtype());
        let (tq, tk) = (shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]);
        let s = flex_f32(&s);
        let p = by_row_tasks(s.len(), tk, |p, first| {
            let s = &s[first * tk..first * tk + p.len()];
            softmax_rows(p, s, (first, tq, tk), scale as f32, visibility)
        });
        flex_from_f32(p, shape, dtype)
    }

    fn attention_weights_backward(
        p: FlexTensor,
        dp: FlexTensor,
        scale: f64,
        visibility: Visibility,
    ) -> FlexTensor {
        let (shape, dtype) = (p.shape(), p.dtype());
        let (tq, tk) = (shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]);
        let (p, dp) = (flex_f32(&p), flex_f32(&dp));
        let ds = by_row_tasks(p.len(), tk, |ds, first| {
            let span = first * tk..first * tk + ds.len();
            let inputs = (&p[span.clone()], &dp[span]);
            softmax_rows_backward(ds, inputs, (first, tq, tk), scale as f32, visibility)
        });
        flex_from_f32(ds, shape, dtype)
    }
}

#[derive(Debug)]
struct WeightsBackward;

impl<B: Backend + FusedSoftmaxBackend> Backward<B, 1> for WeightsBackward {
    /// The weights, the scale and which keys each query sees.
    type State = (FloatTensor<B>, f64, Visibility);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (p, scale, visibility) = ops.state;
        if let [Some(node)] = ops.parents {
            let ds = B::attention_weights_backward(p, grad, scale, visibility);
            grads.register::<B>(node.id, ds);
        }
    }
}

impl<B: Backend + FusedSoftmaxBackend, C: CheckpointStrategy> FusedSoftmaxBackend
    for Autodiff<B, C>
{
    fn attention_weights(
        s: FloatTensor<Self>,
        scale: f64,
        visibility: Visibility,
    ) -> FloatTensor<Self> {
        match WeightsBackward
            .prepare::<C>([s.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = B::attention_weights(s.into_primitive(), scale, visibility);
                prep.finish((p.clone(), scale, visibility), p)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::attention_weights(s.into_primitive(), scale, visibility))
            }
        }
    }

    fn attention_weights_backward(
        _p: FloatTensor<Self>,
        _dp: FloatTensor<Self>,
        _scale: f64,
        _visibility: Visibility,
    ) -> FloatTensor<Self> {
        unreachable!(
            "the weights' backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Equal to the naive form, output and the gradients of q, k and v, for causal, sliding
    /// window and bidirectional visibility, with and without dropout on the weights (both
    /// forms under one fixed mask key, so both draw the same mask). The sequence spans
    /// three causal blocks, the last one partial, so the causal forms skip blocks.
    #[test]
    fn fused_weights_equal_the_naive_form() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let r =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &device);
        let t = 2 * CAUSAL_BLOCK + 22;
        let (q, k, v, w) = (
            r([2, 3, t, 8]),
            r([2, 3, t, 8]),
            r([2, 3, t, 5]),
            r([2, 3, t, 5]),
        );
        let visibilities = [
            Visibility::causal(0),
            Visibility::causal(5),
            Visibility {
                causal: false,
                window: 0,
            },
        ];
        let dropouts = [None, Some(burn::nn::DropoutConfig::new(0.25).init())];
        for (visibility, dropout) in visibilities
            .into_iter()
            .flat_map(|v| dropouts.iter().map(move |d| (v, d.as_ref())))
        {
            let run = |fused: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = crate::fused_dropout::with_fixed_key(99, || {
                    if fused {
                        attend(q.clone(), k.clone(), v.clone(), visibility, dropout)
                    } else {
                        crate::attention::naive::attend(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            (0, 0),
                            visibility,
                            dropout,
                        )
                        .0
                    }
                });
                let g = (out.clone() * w.clone()).sum().backward();
                let vals = |t: Tensor<4>| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap()
                };
                [
                    vals(out),
                    vals(q.grad(&g).unwrap()),
                    vals(k.grad(&g).unwrap()),
                    vals(v.grad(&g).unwrap()),
                ]
            };
            let calls = FORWARD_CALLS.load(Ordering::Relaxed);
            let dropped = crate::fused_dropout::calls();
            let (ours, naive) = (run(true), run(false));
            assert!(
                FORWARD_CALLS.load(Ordering::Relaxed) > calls,
                "the extension ran"
            );
            let dropped = crate::fused_dropout::calls() > dropped;
            assert_eq!(dropped, dropout.is_some(), "dropout ran only where asked");
            for (what, a, b) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(&ours)
                .zip(&naive)
                .map(|((w, a), b)| (w, a, b))
            {
                let err = crate::testing::max_relative_difference(a, b);
                let p = dropout.map(|d| d.prob);
                assert!(
                    err < 2e-5,
                    "{visibility:?} dropout {p:?} {what}: max difference {err}"
                );
            }
        }
    }
}

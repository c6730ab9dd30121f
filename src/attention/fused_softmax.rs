//! Softmax attention's weights in one pass each way, as a Burn backend extension on flex:
//! `P = softmax(scale · S)` over the keys each query sees, and in backward
//! `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`. The naive form ([`super::naive::attend`])
//! builds the same weights from about six tensor ops (scale, mask, max, subtract, exp, sum,
//! divide), each a sweep over the `[b, h, tq, tk]` scores plus its own backward. That form
//! is the reference, and runs wherever this one does not; a test holds the two equal,
//! gradients included.

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

    /// `dS` from the weights `p` and their gradient `dp`.
    fn attention_weights_backward(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f64,
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

/// The forward over a task's rows (`first_row..`, each `tk` long, `tq` per sequence), into
/// `p` zeroed: hidden keys keep weight 0.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows(
    p: &mut [f32],
    s: &[f32],
    (first_row, tq, tk): (usize, usize, usize),
    scale: f32,
    visibility: Visibility,
) {
    const FMA: bool = has_fma!();
    for (r, (p, s)) in p.chunks_mut(tk).zip(s.chunks(tk)).enumerate() {
        let (lo, hi) = visible((first_row + r) % tq, tk, visibility);
        if lo == hi {
            continue;
        }
        let (p, s) = (&mut p[lo..hi], &s[lo..hi]);
        let m = max(s) * scale;
        for (p, &s) in p.iter_mut().zip(s) {
            *p = exp_nonpositive_fma::<FMA>(s * scale - m);
        }
        let inv = 1.0 / sum(p);
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

/// The backward over a task's rows.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows_backward(ds: &mut [f32], p: &[f32], dp: &[f32], tk: usize, scale: f32) {
    const FMA: bool = has_fma!();
    for ((ds, p), dp) in ds.chunks_mut(tk).zip(p.chunks(tk)).zip(dp.chunks(tk)) {
        let c = dot_fma::<FMA>(p, dp);
        for ((ds, &p), &dp) in ds.iter_mut().zip(p).zip(dp) {
            *ds = scale * p * (dp - c);
        }
    }
}

impl FusedSoftmaxBackend for Flex {
    fn attention_weights(s: FlexTensor, scale: f64, visibility: Visibility) -> FlexTensor {
        FORWARD_CALLS.fetch_add(1, Ordering::Relaxed);
        let (shape, dtype) = (s.shape(), s.dtype());
        let (tq, tk) = (shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]);
        let s = flex_f32(&s);
        let mut p = vec![0f32; s.len()];
        p.par_chunks_mut(ROWS * tk)
            .zip(s.par_chunks(ROWS * tk))
            .enumerate()
            .for_each(|(task, (p, s))| {
                let rows = (task * ROWS, tq, tk);
                softmax_rows(p, s, rows, scale as f32, visibility)
            });
        flex_from_f32(p, shape, dtype)
    }

    fn attention_weights_backward(p: FlexTensor, dp: FlexTensor, scale: f64) -> FlexTensor {
        let (shape, dtype) = (p.shape(), p.dtype());
        let tk = shape[shape.num_dims() - 1];
        let (p, dp) = (flex_f32(&p), flex_f32(&dp));
        let mut ds = vec![0f32; p.len()];
        ds.par_chunks_mut(ROWS * tk)
            .zip(p.par_chunks(ROWS * tk).zip(dp.par_chunks(ROWS * tk)))
            .for_each(|(ds, (p, dp))| softmax_rows_backward(ds, p, dp, tk, scale as f32));
        flex_from_f32(ds, shape, dtype)
    }
}

#[derive(Debug)]
struct WeightsBackward;

impl<B: Backend + FusedSoftmaxBackend> Backward<B, 1> for WeightsBackward {
    /// The weights and the scale.
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (p, scale) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::attention_weights_backward(p, grad, scale));
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
                prep.finish((p.clone(), scale), p)
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

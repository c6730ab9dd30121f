//! Softmax attention's weights in one pass each way, as a Burn backend extension on flex:
//! `P = softmax(scale · S)` over the keys each query sees, and in backward
//! `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`. The naive form ([`super::naive::attend`])
//! builds the same weights from about six tensor ops (scale, mask, max, subtract, exp, sum,
//! divide), each a sweep over the `[b, h, tq, tk]` scores plus its own backward. That form
//! is the reference, and runs wherever this one does not; a test holds the two equal,
//! gradients included.

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
use crate::device::{RunCount, flex_f32, overwrite_f32};
use crate::matmul::{Blocks, matmul_blocks};
use crate::vector_math::{dot_fma, exp_nonpositive_fma, has_fma, max, sum};

/// Forward passes the extension has run in this process (for a test that it took the path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

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
/// mask), `dropout` acting on the weights: the extension's weights times v on flex, torch's
/// fused kernel on libtorch where it applies ([`takes_torch_kernel`]),
/// [`super::naive::attend`] elsewhere.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    visibility: Visibility,
    dropout: Option<&Dropout>,
) -> Tensor<4> {
    if !crate::device::is_flex(&q.device()) {
        #[cfg(feature = "tch")]
        if takes_torch_kernel(&q.device(), visibility, (q.dims()[2], k.dims()[2]), dropout) {
            let scale = super::scale(q.dims()[3]);
            return crate::torch_kernels::attention(q, k, v, visibility.causal, scale);
        }
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

/// Whether [`attend`] takes torch's kernel ([`crate::torch_kernels::attention`]): on
/// libtorch, without dropout (torch's would draw from its own generator, not the recipe's
/// seed), a window (torch's causal flag has none) or causal attention between unequal
/// lengths (torch aligns its causal mask top-left, [`Visibility`] by position).
pub fn takes_torch_kernel(
    device: &Device,
    visibility: Visibility,
    (tq, tk): (usize, usize),
    dropout: Option<&Dropout>,
) -> bool {
    crate::device::is_libtorch(device)
        && dropout.is_none()
        && visibility.window == 0
        && (!visibility.causal || tq == tk)
}

/// Writes 0 to the hidden keys of a row, outside `[lo, hi)`.
#[inline(always)]
fn zero_outside(row: &mut [f32], (lo, hi): (usize, usize)) {
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

/// The forward over a task's rows (`first_row..`, each `tk` long, `tq` per sequence),
/// turning each row of scores into its weights in place: hidden keys get weight 0.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows(
    rows: &mut [f32],
    (first_row, tq, tk): (usize, usize, usize),
    scale: f32,
    visibility: Visibility,
) {
    const FMA: bool = has_fma!();
    for (r, row) in rows.chunks_mut(tk).enumerate() {
        let (lo, hi) = visibility.visible_keys((first_row + r) % tq, (0, tk));
        zero_outside(row, (lo, hi));
        if lo < hi {
            softmax_in_place::<FMA>(&mut row[lo..hi], scale);
        }
    }
}

/// `softmax(scale · p)` in place over a row's visible scores (not empty), returning its
/// log-sum-exp `log Σ exp(scale · p)`: the body of every softmax kernel here.
#[inline(always)]
pub(super) fn softmax_in_place<const FMA: bool>(p: &mut [f32], scale: f32) -> f32 {
    let m = max(p) * scale;
    for p in p.iter_mut() {
        *p = exp_nonpositive_fma::<FMA>(*p * scale - m);
    }
    let l = sum(p);
    let inv = 1.0 / l;
    for p in p.iter_mut() {
        *p *= inv;
    }
    m + l.ln()
}

/// The backward over a task's rows, turning each row of `dp` into `dS` in place. A hidden
/// key's weight is 0, so its `dS` is too, and neither `p` nor `dp` is read there (half of
/// a causal row).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows_backward(
    dp: &mut [f32],
    p: &[f32],
    (first_row, tq, tk): (usize, usize, usize),
    scale: f32,
    visibility: Visibility,
) {
    const FMA: bool = has_fma!();
    for (r, (dp, p)) in dp.chunks_mut(tk).zip(p.chunks(tk)).enumerate() {
        let (lo, hi) = visibility.visible_keys((first_row + r) % tq, (0, tk));
        zero_outside(dp, (lo, hi));
        let (dp, p) = (&mut dp[lo..hi], &p[lo..hi]);
        let c = dot_fma::<FMA>(p, dp);
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = scale * p * (*dp - c);
        }
    }
}

/// Runs `rows(task's rows, first row)` over `x`'s rows (`tk` long) in parallel tasks of
/// [`ROWS`] rows, over x's own buffer where it is the only owner (a fresh product or
/// gradient: no new `[b, h, t, t]` buffer to fault in), else over a copy.
fn over_rows(x: FlexTensor, tk: usize, rows: impl Fn(&mut [f32], usize) + Sync) -> FlexTensor {
    overwrite_f32(x, |values| {
        values
            .par_chunks_mut(ROWS * tk)
            .enumerate()
            .for_each(|(task, piece)| rows(piece, task * ROWS))
    })
}

impl FusedSoftmaxBackend for Flex {
    fn attention_weights(s: FlexTensor, scale: f64, visibility: Visibility) -> FlexTensor {
        FORWARD_CALLS.record();
        let shape = s.shape();
        let (tq, tk) = (shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]);
        over_rows(s, tk, |rows, first| {
            softmax_rows(rows, (first, tq, tk), scale as f32, visibility)
        })
    }

    fn attention_weights_backward(
        p: FlexTensor,
        dp: FlexTensor,
        scale: f64,
        visibility: Visibility,
    ) -> FlexTensor {
        let shape = p.shape();
        let (tq, tk) = (shape[shape.num_dims() - 2], shape[shape.num_dims() - 1]);
        let p = flex_f32(&p);
        over_rows(dp, tk, |rows, first| {
            let p = &p[first * tk..first * tk + rows.len()];
            softmax_rows_backward(rows, p, (first, tq, tk), scale as f32, visibility)
        })
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

    /// The weights overwrite the scores only where nothing else holds them: a score tensor
    /// a caller still holds is left as it was, and gives the same weights.
    #[test]
    fn weights_leave_shared_scores_alone() {
        let device = Device::flex();
        device.seed(12);
        let s = Tensor::<4>::random([2, 3, 9, 9], Distribution::Normal(0.0, 2.0), &device);
        let before = s.to_data();
        let weights = |s: Tensor<4>| {
            Tensor::<4>::from_dispatch(
                <burn::backend::Dispatch as FusedSoftmaxBackend>::attention_weights(
                    s.into_dispatch(),
                    0.5,
                    Visibility::causal(0),
                ),
            )
            .into_data()
        };
        let shared = weights(s.clone());
        s.to_data().assert_eq(&before, true);
        let owned = weights(Tensor::from_data(before.clone(), &device));
        shared.assert_eq(&owned, true);
        assert_ne!(shared, before, "the weights are not the scores");
    }

    /// Grouped key/value heads (expanded views of fewer heads, as grouped-query attention
    /// gives) over three causal blocks: equal to the naive form, gradients of the shared
    /// keys and values included.
    #[test]
    fn grouped_kv_heads_equal_the_naive_form() {
        let device = Device::flex().autodiff();
        device.seed(13);
        let t = 2 * CAUSAL_BLOCK + 22;
        let r = |s: [usize; 4]| Tensor::<4>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, w) = (
            r([2, 4, t, 8]),
            r([2, 2, t, 8]),
            r([2, 2, t, 8]),
            r([2, 4, t, 8]),
        );
        let run = |fused: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let (kk, vv) = (
                crate::attention::repeat_kv(k.clone(), 2),
                crate::attention::repeat_kv(v.clone(), 2),
            );
            let vis = Visibility::causal(0);
            let out = if fused {
                attend(q.clone(), kk, vv, vis, None)
            } else {
                crate::attention::naive::attend(q.clone(), kk, vv, (0, 0), vis, None).0
            };
            let g = (out.clone() * w.clone()).sum().backward();
            let vals = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
            [
                vals(out),
                vals(q.grad(&g).unwrap()),
                vals(k.grad(&g).unwrap()),
                vals(v.grad(&g).unwrap()),
            ]
        };
        let (ours, naive) = (run(true), run(false));
        for (what, (a, b)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(ours.iter().zip(&naive))
        {
            let err = crate::testing::max_relative_difference(a, b);
            assert!(err < 2e-5, "{what}: max difference {err}");
        }
    }

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
            let calls = FORWARD_CALLS.get();
            let dropped = crate::fused_dropout::CALLS.get();
            let (ours, naive) = (run(true), run(false));
            assert!(FORWARD_CALLS.get() > calls, "the extension ran");
            // (Only that it ran where asked: the count is global, and a test running beside
            // this one may drop out too. Where not asked, the outputs' equality with the
            // naive form's below shows that nothing was dropped.)
            if dropout.is_some() {
                assert!(crate::fused_dropout::CALLS.get() > dropped, "dropout ran");
            }
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

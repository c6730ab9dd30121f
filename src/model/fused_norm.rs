//! LayerNorm and RMSNorm over the last dimension as one Burn backend extension on flex:
//! the forward in one pass per row and the backward (the input's, gamma's and beta's
//! gradients) in one more, where Burn's autodiff runs the decomposed form — mean,
//! subtract, square, mean, add, sqrt, divide, scale, shift, each with its own backward —
//! as some twenty whole-tensor ops. The references are `burn::tensor::module::layer_norm`
//! and RMSNorm's formula in tensor ops ([`super::norm`]); a test holds them equal,
//! gradients included.
//!
//! Per row of `d` values, with `xhat = (x − mean)·rstd` (RMSNorm: no mean, `rstd` from the
//! mean square): `y = xhat·gamma + beta`; `dxhat = dy·gamma`,
//! `dx = rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat))` (RMSNorm without the
//! `mean(dxhat)` term), `dgamma = Σ_rows dy·xhat`, `dbeta = Σ_rows dy`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::device::{flex_f32, flex_from_f32};

static FORWARD_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many times the fused norm's forward has run in this process (for a test that the
/// model took this path).
pub fn forward_calls() -> usize {
    FORWARD_CALLS.load(Ordering::Relaxed)
}

#[backend_extension(Flex, Autodiff)]
pub trait FusedNormBackend: Backend {
    /// x `[.., d]`, gamma and beta `[d]` → the normalised x; `center`: LayerNorm (subtract
    /// the mean), else RMSNorm (beta is then ignored).
    fn fused_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> FloatTensor<Self>;

    /// The gradients of x, gamma and beta given the output's, `grad`.
    fn fused_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The normalisation of `x` over its last dimension; `beta` absent is a zero shift.
pub fn fused_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
    center: bool,
) -> Tensor<D> {
    let beta = beta.unwrap_or_else(|| gamma.zeros_like());
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedNormBackend>::fused_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        center,
    ))
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// A row's mean (0 for RMSNorm) and `1/√(var + eps)` (RMSNorm: of the mean square).
fn row_stats(x: &[f32], eps: f32, center: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if center {
        x.iter().sum::<f32>() / n
    } else {
        0.0
    };
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl FusedNormBackend for Flex {
    fn fused_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
        center: bool,
    ) -> FlexTensor {
        FORWARD_CALLS.fetch_add(1, Ordering::Relaxed);
        let (shape, dtype) = (x.shape(), x.dtype());
        let (x, gamma, beta) = (flex_f32(&x), flex_f32(&gamma), flex_f32(&beta));
        let d = gamma.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = row_stats(x, eps as f32, center);
                    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(&*gamma).zip(&*beta) {
                        let b = if center { b } else { 0.0 };
                        *y = (x - mean) * rstd * g + b;
                    }
                }
            });
        flex_from_f32(out, shape, dtype)
    }

    fn fused_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        eps: f64,
        center: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (shape, dtype, g_shape) = (x.shape(), x.dtype(), gamma.shape());
        let (x, gamma, dy) = (flex_f32(&x), flex_f32(&gamma), flex_f32(&grad));
        let d = gamma.len();
        let mut dx = vec![0f32; x.len()];
        // Each task's partial sums of dgamma and dbeta, added up after.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d).zip(dy.par_chunks(ROWS * d)))
            .map(|(dx, (x, dy))| {
                let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
                let mut xhat = vec![0f32; d];
                for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                    let (mean, rstd) = row_stats(x, eps as f32, center);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for j in 0..d {
                        xhat[j] = (x[j] - mean) * rstd;
                        let dxhat = dy[j] * gamma[j];
                        m1 += dxhat;
                        m2 += dxhat * xhat[j];
                        dgamma[j] += dy[j] * xhat[j];
                        dbeta[j] += dy[j];
                    }
                    let (m1, m2) = (if center { m1 / d as f32 } else { 0.0 }, m2 / d as f32);
                    for j in 0..d {
                        dx[j] = rstd * (dy[j] * gamma[j] - m1 - xhat[j] * m2);
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
        for (g, b) in partials {
            for j in 0..d {
                dgamma[j] += g[j];
                dbeta[j] += b[j];
            }
        }
        (
            flex_from_f32(dx, shape, dtype),
            flex_from_f32(dgamma, g_shape.clone(), dtype),
            flex_from_f32(dbeta, g_shape, dtype),
        )
    }
}

#[derive(Debug)]
struct NormBackward;

/// What backward needs: the input, gamma, and the norm's constants.
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f64,
    center: bool,
}

impl<B: Backend + FusedNormBackend> Backward<B, 3> for NormBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dx, dgamma, dbeta) = B::fused_norm_backward(s.x, s.gamma, grad, s.eps, s.center);
        let [x, gamma, beta] = ops.parents;
        for (node, g) in [(x, dx), (gamma, dgamma), (beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: Backend + FusedNormBackend, C: CheckpointStrategy> FusedNormBackend for Autodiff<B, C> {
    fn fused_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        let y = B::fused_norm(x.clone(), gamma.clone(), beta, eps, center);
        match NormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                Saved {
                    x,
                    gamma,
                    eps,
                    center,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_norm_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _eps: f64,
        _center: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!(
            "the norm's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

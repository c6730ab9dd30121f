//! LayerNorm and RMSNorm over the last dimension as one Burn backend extension on flex:
//! the forward in one pass per row and the backward (the input's, gamma's and beta's
//! gradients) in one more, where Burn's autodiff runs the decomposed form — mean,
//! subtract, square, mean, add, sqrt, divide, scale, shift, each with its own backward —
//! as some twenty whole-tensor ops. The references are `burn::tensor::module::layer_norm`
//! and RMSNorm's formula in tensor ops ([`norm_reference`]); a test holds them equal,
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

use crate::vector_math::{dot_fma, has_fma, sum, sum_map};

use crate::device::{RunCount, flex_f32, flex_from_f32, register_gradients, zeroed};

/// Fused norms run in this process (for a test that the model took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

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

/// The normalisation of `x` over its last dimension (`center`: LayerNorm, else RMSNorm);
/// `beta` absent is a zero shift. The extension on flex in f32, torch's kernels on libtorch
/// ([`crate::torch_kernels::norm`]), [`norm_reference`] elsewhere.
pub fn fused_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
    center: bool,
) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if crate::device::is_libtorch(&x.device()) {
        return crate::torch_kernels::norm(x, gamma, beta, eps, center);
    }
    if !(crate::device::is_flex(&x.device()) && x.dtype() == burn::tensor::DType::F32) {
        return norm_reference(x, gamma, beta, eps, center);
    }
    let beta = beta.unwrap_or_else(|| gamma.zeros_like());
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedNormBackend>::fused_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
        center,
    ))
}

/// [`fused_norm`] in tensor ops: Burn's `layer_norm`, or RMSNorm's formula. Other backends'
/// path, and the fused one's reference.
pub fn norm_reference<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
    center: bool,
) -> Tensor<D> {
    if center {
        return burn::tensor::module::layer_norm(x, gamma, beta, eps);
    }
    let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
    let y = (x / rms) * gamma.unsqueeze();
    match beta {
        Some(beta) => y + beta.unsqueeze(),
        None => y,
    }
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// A row's mean (0 for RMSNorm) and `1/√(var + eps)` (RMSNorm: of the mean square).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32, center: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if center { sum(x) / n } else { 0.0 };
    let var = sum_map(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The forward over a task's rows `x` (each `gamma.len()` long) into `out`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn norm_rows(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, center: bool) {
    let d = gamma.len();
    for (y, x) in out.chunks_mut(d).zip(x.chunks(d)) {
        let (mean, rstd) = row_stats(x, eps, center);
        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            let b = if center { b } else { 0.0 };
            *y = (x - mean) * rstd * g + b;
        }
    }
}

/// The backward over a task's rows: `dx` written, `dγ` and `dβ` (`sums`) accumulated.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn norm_rows_backward(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
    eps: f32,
    center: bool,
) {
    const FMA: bool = has_fma!();
    let d = gamma.len();
    let (mut xhat, mut dxhat) = (vec![0f32; d], vec![0f32; d]);
    for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let (mean, rstd) = row_stats(x, eps, center);
        for j in 0..d {
            xhat[j] = (x[j] - mean) * rstd;
            dxhat[j] = dy[j] * gamma[j];
            dgamma[j] += dy[j] * xhat[j];
            dbeta[j] += dy[j];
        }
        let m1 = if center { sum(&dxhat) / d as f32 } else { 0.0 };
        let m2 = dot_fma::<FMA>(&dxhat, &xhat) / d as f32;
        for j in 0..d {
            dx[j] = rstd * (dxhat[j] - m1 - xhat[j] * m2);
        }
    }
}

impl FusedNormBackend for Flex {
    fn fused_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
        center: bool,
    ) -> FlexTensor {
        FORWARD_CALLS.record();
        let (shape, dtype) = (x.shape(), x.dtype());
        let (x, gamma, beta) = (flex_f32(&x), flex_f32(&gamma), flex_f32(&beta));
        let d = gamma.len();
        let mut out = Vec::with_capacity(x.len());
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .for_each(|(out, x)| norm_rows(zeroed(out), x, &gamma, &beta, eps as f32, center));
        // SAFETY: the pieces above, one per piece of x, cover all of x's length.
        unsafe { out.set_len(x.len()) };
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
        let mut dx = Vec::with_capacity(x.len());
        // Each task's partial sums of dgamma and dbeta, added up after.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d).zip(dy.par_chunks(ROWS * d)))
            .map(|(dx, (x, dy))| {
                let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
                let sums = (&mut dgamma[..], &mut dbeta[..]);
                norm_rows_backward(zeroed(dx), x, dy, &gamma, sums, eps as f32, center);
                (dgamma, dbeta)
            })
            .collect();
        // SAFETY: the pieces above, one per piece of x, cover all of x's length.
        unsafe { dx.set_len(x.len()) };
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
        let parents = ops.parents.map(|p| p.map(|n| n.id));
        register_gradients::<B, _>(grads, parents, [dx, dgamma, dbeta]);
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

//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`: the L2 norm over
//! every parameter's gradient, and the factor that brings it within the recipe's
//! `grad_clip`.
//!
//! On flex each gradient's sum of squares is one parallel pass, a Burn backend extension
//! ([`SumSquaresBackend`]); as tensor ops (square, sum, add: the reference, and other
//! backends' path) it was three ops per parameter on one thread, 2% of a default-model
//! step while the other core waited (perf).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32, is_flex};
use crate::vector_math::sum_map;

#[backend_extension(Flex, Autodiff)]
pub trait SumSquaresBackend: Backend {
    /// `Σ x²` over all of `x`'s elements, as a tensor `[1]`.
    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The global L2 norm of all gradients (one number over every parameter, as
/// `torch.nn.utils.clip_grad_norm_` computes it).
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        /// Flex's sums, read as they come (no device to wait for).
        host: f64,
        /// Other backends': summed on the device, read once.
        device: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(g) = self.grads.get::<D>(param.id) else {
                return;
            };
            if g.dtype() == DType::F32 && is_flex(&g.device()) {
                let s = Tensor::<1>::from_dispatch(
                    <burn::backend::Dispatch as SumSquaresBackend>::sum_squares(g.into_dispatch()),
                );
                self.host += s.into_scalar::<f32>() as f64;
            } else {
                let s = sum_squares_reference(g);
                self.device = Some(match self.device.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut v = SumSquares {
        grads,
        host: 0.0,
        device: None,
    };
    model.visit(&mut v);
    let on_device = v.device.map_or(0.0, |t| t.into_scalar::<f32>() as f64);
    (v.host + on_device).sqrt()
}

/// The reference: `Σ x²` in tensor ops.
pub fn sum_squares_reference<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    x.square().sum()
}

/// The factor that brings a gradient of norm `norm` within `max_norm` (1 when it already is,
/// or when clipping is off).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Elements per parallel piece: fixed, so the partial sums add up in the same order on
/// any number of threads.
const PIECE: usize = 16 * 1024;

/// `Σ x²` of one piece ([`sum_map`]'s 16 lanes), compiled for each target so the loop
/// vectorises.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn piece_sum_squares(piece: &[f32]) -> f64 {
    sum_map(piece, |x| x * x) as f64
}

/// Sums the extension has run in this process (for a test that the norm took the path).
pub static CALLS: RunCount = RunCount::new();

impl SumSquaresBackend for Flex {
    fn sum_squares(x: FlexTensor) -> FlexTensor {
        CALLS.record();
        let values = flex_f32(&x);
        let sum: f64 = values
            .par_chunks(PIECE)
            .map(piece_sum_squares)
            .collect::<Vec<f64>>()
            .into_iter()
            .sum();
        flex_from_f32(vec![sum as f32], [1], DType::F32)
    }
}

impl<B: Backend + SumSquaresBackend, C: CheckpointStrategy> SumSquaresBackend for Autodiff<B, C> {
    /// Burn's ops under autodiff: the clipping reads gradients off autodiff, so this form
    /// only serves a caller that wants the sum's own gradient.
    fn sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_sum(Self::float_mul(x.clone(), x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::Linear;
    use burn::tensor::Distribution;

    /// The global norm over a weight and a bias, on flex (the extension) and as the
    /// reference's tensor ops, with more elements than one piece and pieces that end short
    /// of a multiple of 64; and the clip factor.
    #[test]
    fn global_norm_equals_the_reference_and_clips() {
        let device = Device::flex();
        device.seed(9);
        let (k, n) = (3 * PIECE / 256 + 1, 257);
        let model = Linear {
            weight: Param::from_tensor(Tensor::zeros([k, n], &device)),
            bias: Some(Param::from_tensor(Tensor::zeros([n], &device))),
        };
        let gw = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let gb = Tensor::<1>::full([n], 3.0, &device);
        let mut grads = GradientsParams::new();
        grads.register(model.weight.id, gw.clone());
        grads.register(model.bias.as_ref().unwrap().id, gb.clone());
        let before = CALLS.get();
        let norm = global_grad_norm(&model, &grads);
        assert!(CALLS.get() >= before + 2, "the extension ran");
        let reference = (sum_squares_reference(gw).into_scalar::<f32>() as f64
            + sum_squares_reference(gb).into_scalar::<f32>() as f64)
            .sqrt();
        assert!(
            (norm / reference - 1.0).abs() < 1e-5,
            "{norm} against {reference}"
        );
        assert!((clip_factor(norm, 1.0) * norm - 1.0).abs() < 1e-5);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(10.0, 0.0), 1.0);
    }

    /// A norm known by hand: a 3 × 2 weight's gradient of 2s and a bias's of 3s.
    #[test]
    fn global_norm_of_known_gradients() {
        let device = Device::flex();
        let model = Linear {
            weight: Param::from_tensor(Tensor::zeros([3, 2], &device)),
            bias: Some(Param::from_tensor(Tensor::zeros([2], &device))),
        };
        let mut grads = GradientsParams::new();
        grads.register(model.weight.id, Tensor::<2>::full([3, 2], 2.0, &device));
        let bias = model.bias.as_ref().unwrap().id;
        grads.register(bias, Tensor::<1>::full([2], 3.0, &device));
        let norm = global_grad_norm(&model, &grads);
        assert!((norm - (6.0f64 * 4.0 + 2.0 * 9.0).sqrt()).abs() < 1e-9);
    }
}

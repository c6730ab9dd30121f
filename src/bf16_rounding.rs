//! f32 values rounded to bf16 precision and kept in f32, as a Burn backend extension on
//! flex: how bf16 autocast's projections run on the cpu backend.
//!
//! Flex has no bf16 matrix kernel: Burn's bf16 matmul converts both operands to f32 element
//! by element on one thread, multiplies in f32 and converts the result back, and autocast's
//! casts around it are more such passes (perf: a quarter of a bf16 step). The same numbers
//! come from rounding the f32 operands to bf16 precision, one f32 product, and rounding its
//! result: [`round_to_bf16`] is that rounding, one parallel vectorised pass, and in backward
//! it rounds the gradient, as the cast's backward and the bf16 product's output do. The
//! reference is Burn's cast there and back (`x.cast(BF16).cast(F32)`); a test holds the two
//! equal bit for bit, and the whole projection equal to the cast chain, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::prelude::*;

use crate::device::flex_map;

#[backend_extension(Flex, Autodiff)]
pub trait Bf16RoundingBackend: Backend {
    /// Each value rounded to the nearest bf16 (ties to even; a NaN stays a NaN), as f32.
    fn round_to_bf16(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `x` rounded to bf16 precision, still f32 (flex only: [`crate::device::is_flex`]).
pub fn round_to_bf16<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(
        <burn::backend::Dispatch as Bf16RoundingBackend>::round_to_bf16(x.into_dispatch()),
    )
}

/// One value rounded as `half::bf16::from_f32` rounds it, back in f32: branch-free, so
/// the loop over a tensor vectorises.
#[inline(always)]
pub(crate) fn round(v: f32) -> f32 {
    let x = v.to_bits();
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    // Round half to even: up when the dropped half is over ½, or exactly ½ with an odd
    // kept part. A carry into the exponent is the right result (the next binade, or ∞).
    let up = (x & 0x8000 != 0) && (x & 0x1_7fff != 0);
    let rounded = ((x >> 16) + up as u32) << 16;
    // A NaN keeps its sign and top mantissa bits and is made quiet.
    let quiet = (x | 0x0040_0000) & 0xffff_0000;
    f32::from_bits(if nan { quiet } else { rounded })
}

impl Bf16RoundingBackend for Flex {
    /// In place where the tensor is unshared (a product's output, a gradient).
    fn round_to_bf16(x: FlexTensor) -> FlexTensor {
        flex_map(x, None, |v, _| round(v))
    }
}

#[derive(Debug)]
struct RoundBackward;

impl<B: Backend + Bf16RoundingBackend> Backward<B, 1> for RoundBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::round_to_bf16(grad));
        }
    }
}

impl<B: Backend + Bf16RoundingBackend, C: CheckpointStrategy> Bf16RoundingBackend
    for Autodiff<B, C>
{
    fn round_to_bf16(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let out = B::round_to_bf16(x.into_primitive());
        RoundBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateless(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    /// Bit for bit Burn's cast to bf16 and back, on random values of every scale and on
    /// ties, the largest finite values, infinities, zeros of both signs and NaNs.
    #[test]
    fn rounding_equals_burns_cast() {
        let device = Device::flex();
        device.seed(41);
        let mut xs = values(Tensor::<1>::random(
            [4096],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        let scales = [1e-40f32, 1e-20, 1e20, 3e38];
        for (i, x) in xs.iter_mut().enumerate() {
            *x *= scales[i % scales.len()];
        }
        let ties = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -(1.0 + 2f32.powi(-8)),
        ];
        let specials = [
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
        ];
        xs.extend(ties.into_iter().chain(specials));
        xs.extend([f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001)]);
        let n = xs.len();
        let x = Tensor::<1>::from_data(TensorData::new(xs, [n]), &device);
        let ours = values(round_to_bf16(x.clone()));
        let burns = values(x.cast(DType::BF16).cast(DType::F32));
        for (i, (a, b)) in ours.iter().zip(&burns).enumerate() {
            let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(
                same,
                "element {i}: {a:e} ({:#x}) against {b:e} ({:#x})",
                a.to_bits(),
                b.to_bits()
            );
        }
    }

    /// A projection through the rounding (operands, product, and in backward the
    /// gradients) equals Burn's bf16 cast chain, output and gradients, to within one bf16
    /// step (the two products may sum in different orders before rounding).
    #[test]
    fn rounded_product_equals_the_cast_chain() {
        let device = Device::flex().autodiff();
        device.seed(43);
        let x = Tensor::<2>::random([37, 24], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([24, 19], Distribution::Normal(0.0, 0.5), &device);
        let probe = Tensor::<2>::random([37, 19], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let y = if fused {
                let r = round_to_bf16::<2>;
                r(r(x.clone()).matmul(r(w.clone())))
            } else {
                x.clone()
                    .cast(DType::BF16)
                    .matmul(w.clone().cast(DType::BF16))
                    .cast(DType::F32)
            };
            let g = (y.clone() * probe.clone()).sum().backward();
            [
                values(y),
                values(x.grad(&g).unwrap()),
                values(w.grad(&g).unwrap()),
            ]
        };
        let (ours, burns) = (run(true), run(false));
        for (what, (a, b)) in ["output", "dx", "dw"].iter().zip(ours.iter().zip(&burns)) {
            let err = crate::testing::max_relative_difference(a, b);
            assert!(err <= 2f32.powi(-7), "{what}: max difference {err}");
        }
        // The rounding is there: the output is not the f32 product.
        let exact = values(x.clone().matmul(w.clone()));
        assert!(ours[0].iter().zip(&exact).any(|(a, b)| a != b));
    }
}

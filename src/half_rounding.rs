//! f32 values rounded to bf16 or f16 precision and kept in f32, as a Burn backend extension
//! on flex: how bf16 and f16 autocast's projections run on the cpu backend.
//!
//! Flex has no bf16 or f16 matrix kernel of its own: Burn's converts both operands to f32
//! element by element on one thread, multiplies in f32 and converts the result back, and
//! autocast's casts around it are more such passes (perf: a quarter of a bf16 step; f16 ran
//! at 0.41× f32). The same numbers come from rounding the f32 operands, one f32 product (a
//! product of two bf16 or two f16 values is exact in f32), and rounding its result:
//! [`round_to_half`] is that rounding, one parallel vectorised pass, and in backward it
//! rounds the gradient, as the cast's backward and the low-precision product's output do.
//! The reference is Burn's cast there and back (`x.cast(BF16).cast(F32)`); tests hold the
//! two equal bit for bit, and the whole projection equal to the cast chain, gradients
//! included. [`crate::matmul::matmul_rounded`] puts the roundings around the product.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::prelude::*;

use crate::device::flex_map;

/// A 16-bit float format to round to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfFormat {
    Bf16,
    F16,
}

#[backend_extension(Flex, Autodiff)]
pub trait HalfRoundingBackend: Backend {
    /// Each value rounded to the nearest value of `format` (ties to even; past its largest
    /// finite value, ±∞; a NaN stays a NaN), as f32.
    fn round_to_half(x: FloatTensor<Self>, format: HalfFormat) -> FloatTensor<Self>;
}

/// `x` rounded to `format`'s precision, still f32 (flex only: [`crate::device::is_flex`]).
pub fn round_to_half<const D: usize>(x: Tensor<D>, format: HalfFormat) -> Tensor<D> {
    Tensor::from_dispatch(
        <burn::backend::Dispatch as HalfRoundingBackend>::round_to_half(x.into_dispatch(), format),
    )
}

/// One value rounded as `half::bf16::from_f32` rounds it, back in f32: branch-free, so
/// the loop over a tensor vectorises.
#[inline(always)]
pub(crate) fn round(v: f32) -> f32 {
    let x = v.to_bits();
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    // Round half to even: adding just under half of the dropped part's range, plus the
    // kept part's lowest bit, carries up exactly when the dropped half is over ½, or ½
    // with an odd kept part. A carry into the exponent is the right result (the next
    // binade, or ∞); only a NaN could wrap, and it takes the other branch.
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) & 0xffff_0000;
    // A NaN keeps its sign and top mantissa bits and is made quiet.
    let quiet = (x | 0x0040_0000) & 0xffff_0000;
    f32::from_bits(if nan { quiet } else { rounded })
}

/// One value rounded as `half::f16::from_f32` rounds it, back in f32, branch-free: 10
/// mantissa bits kept (ties to even) in f16's normal range, multiples of 2⁻²⁴ below it (its
/// subnormals), ±∞ past 65504.
#[inline(always)]
pub(crate) fn round_f16(v: f32) -> f32 {
    let x = v.to_bits();
    let magnitude = x & 0x7fff_ffff;
    let nan = magnitude > 0x7f80_0000;
    let normal = f32::from_bits(x.wrapping_add(0x0fff + ((x >> 13) & 1)) & 0xffff_e000);
    // Adding 0.75 (whose ulp is 2⁻²⁴) rounds to f16's subnormal step; the sign is v's,
    // zeros included.
    let subnormal = ((v + 0.75) - 0.75).copysign(v);
    let r = if magnitude < 0x3880_0000 {
        subnormal
    } else {
        normal
    };
    let r = if r.abs() > 65504.0 {
        f32::INFINITY.copysign(v)
    } else {
        r
    };
    if nan {
        f32::from_bits(x | 0x0040_0000)
    } else {
        r
    }
}

impl HalfRoundingBackend for Flex {
    /// In place where the tensor is unshared (a product's output, a gradient).
    fn round_to_half(x: FlexTensor, format: HalfFormat) -> FlexTensor {
        match format {
            HalfFormat::Bf16 => flex_map(x, None, |v, _| round(v)),
            HalfFormat::F16 => flex_map(x, None, |v, _| round_f16(v)),
        }
    }
}

#[derive(Debug)]
struct RoundBackward(HalfFormat);

impl<B: Backend + HalfRoundingBackend> Backward<B, 1> for RoundBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::round_to_half(grad, self.0));
        }
    }
}

impl<B: Backend + HalfRoundingBackend, C: CheckpointStrategy> HalfRoundingBackend
    for Autodiff<B, C>
{
    fn round_to_half(x: FloatTensor<Self>, format: HalfFormat) -> FloatTensor<Self> {
        let node = x.node();
        let out = B::round_to_half(x.into_primitive(), format);
        RoundBackward(format)
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

    /// Bit for bit Burn's cast to bf16 or f16 and back, on random values of every scale
    /// (f16's subnormals and overflow among them) and on ties, the largest finite values,
    /// infinities, zeros of both signs and NaNs.
    #[test]
    fn rounding_equals_burns_cast() {
        let device = Device::flex();
        device.seed(41);
        let normal = values(Tensor::<1>::random(
            [8192],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        let scales = [
            1e-40f32, 1e-20, 1e-8, 3e-6, 5e-5, 1e-3, 3e4, 7e4, 1e20, 3e38,
        ];
        let step = |bits: i32| 2f32.powi(bits);
        let cases = [
            (
                HalfFormat::Bf16,
                DType::BF16,
                vec![1.0 + step(-8), 1.0 + 3.0 * step(-8)],
            ),
            (
                HalfFormat::F16,
                DType::F16,
                vec![
                    1.0 + step(-11),
                    1.0 + 3.0 * step(-11),
                    // Subnormal ties, the smallest normal, and around the largest finite.
                    step(-25),
                    3.0 * step(-25),
                    step(-14) - step(-25),
                    step(-14),
                    65504.0,
                    65519.0,
                    65520.0,
                    1e5,
                ],
            ),
        ];
        for (format, dtype, ties) in cases {
            let mut xs: Vec<f32> = normal
                .iter()
                .enumerate()
                .map(|(i, x)| x * scales[i % scales.len()])
                .collect();
            xs.extend(ties.iter().flat_map(|&t| [t, -t]));
            xs.extend([
                f32::MAX,
                f32::MIN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
            ]);
            xs.extend([f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001)]);
            let n = xs.len();
            let x = Tensor::<1>::from_data(TensorData::new(xs, [n]), &device);
            let ours = values(round_to_half(x.clone(), format));
            let burns = values(x.clone().cast(dtype).cast(DType::F32));
            let xs = values(x);
            for (i, (a, b)) in ours.iter().zip(&burns).enumerate() {
                let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                assert!(
                    same,
                    "{format:?} element {i}, {:e}: {a:e} ({:#x}) against {b:e} ({:#x})",
                    xs[i],
                    a.to_bits(),
                    b.to_bits()
                );
            }
        }
    }

    /// A projection through the rounding (operands, product, and in backward the
    /// gradients) equals Burn's bf16 or f16 cast chain, output and gradients, to within one
    /// step of the format (the two products may sum in different orders before rounding).
    #[test]
    fn rounded_product_equals_the_cast_chain() {
        let device = Device::flex().autodiff();
        device.seed(43);
        let x = Tensor::<2>::random([37, 24], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([24, 19], Distribution::Normal(0.0, 0.5), &device);
        let probe = Tensor::<2>::random([37, 19], Distribution::Normal(0.0, 1.0), &device);
        for (format, dtype, step) in [
            (HalfFormat::Bf16, DType::BF16, 2f32.powi(-7)),
            (HalfFormat::F16, DType::F16, 2f32.powi(-10)),
        ] {
            let run = |fused: bool| {
                let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
                let y = if fused {
                    let r = |t| round_to_half::<2>(t, format);
                    r(r(x.clone()).matmul(r(w.clone())))
                } else {
                    x.clone()
                        .cast(dtype)
                        .matmul(w.clone().cast(dtype))
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
                assert!(err <= step, "{format:?} {what}: max difference {err}");
            }
            // The rounding is there: the output is not the f32 product.
            let exact = values(x.clone().matmul(w.clone()));
            assert!(
                ours[0].iter().zip(&exact).any(|(a, b)| a != b),
                "{format:?}"
            );
        }
    }
}

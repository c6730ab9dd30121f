//! GELU (exact), SiLU, softplus and elu + 1 as one Burn backend extension on flex: each
//! forward and each derivative in a single pass, with the vectorisable exp, erf and log1p
//! of [`crate::vector_math`], four vectors at a time ([`RealMap`]). Burn's own forms on
//! flex are a scalar libm call per element (GELU's erf was ~8% of a default-recipe step)
//! and, for SiLU and softplus, chains of 2–6 ops with as many more in backward (~13% of an
//! SSM step). Elsewhere Burn's forms run; they are the reference, and the tests hold the two
//! equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::prelude::*;

use crate::device::{RunCount, map_pieces};
use crate::f32x16::{QUAD, Quad, quad_part, with_f32x16};
use crate::vector_math::{
    Real, erf_and_gauss_of, erf_of, exp_nonpositive_of, has_fma, sigmoid_and_exp_in, softplus_in,
};
use std::mem::MaybeUninit;

/// Forward passes the extension has run in this process (for a test that it took the path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// The element-wise functions the extension computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointwise {
    /// `x/2 · (1 + erf(x/√2))`.
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
    /// `ln(1 + eˣ)` (β = 1).
    Softplus,
    /// `elu(x) + 1`: `x + 1` above 0, `eˣ` below (linear attention's feature map).
    EluPlusOne,
}

#[backend_extension(Flex, Autodiff)]
pub trait ActivationBackend: Backend {
    fn activation(x: FloatTensor<Self>, f: Pointwise) -> FloatTensor<Self>;

    /// `grad · f'(x)`.
    fn activation_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        f: Pointwise,
    ) -> FloatTensor<Self>;
}

/// Exact GELU.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    apply(x, Pointwise::Gelu)
}

/// SiLU, `x · sigmoid(x)`.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    apply(x, Pointwise::Silu)
}

/// Softplus with β = 1, as `burn::tensor::activation::softplus(x, 1.0)`.
pub fn softplus<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    apply(x, Pointwise::Softplus)
}

/// `elu(x) + 1`, as `burn::tensor::activation::elu(x, 1.0).add_scalar(1.0)`.
pub fn elu_plus_one<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    apply(x, Pointwise::EluPlusOne)
}

/// `f(x)`: the extension on flex, Burn's form elsewhere.
pub fn apply<const D: usize>(x: Tensor<D>, f: Pointwise) -> Tensor<D> {
    use burn::tensor::activation as burns;
    if !crate::device::is_flex(&x.device()) {
        return match f {
            Pointwise::Gelu => burns::gelu(x),
            Pointwise::Silu => burns::silu(x),
            Pointwise::Softplus => burns::softplus(x, 1.0),
            Pointwise::EluPlusOne => burns::elu(x, 1.0).add_scalar(1.0),
        };
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as ActivationBackend>::activation(
        x.into_dispatch(),
        f,
    ))
}

/// An element-wise function `f(x, other)` written once over [`Real`], so that
/// [`flex_map_real`] runs it on four vectors side by side ([`Quad`]): one vector at a
/// time, a chain of dependent operations as long as an erf's ran at a fraction of its
/// arithmetic's rate (out-of-order execution did not hide its latency), as a closure over
/// single f32s did.
pub trait RealMap: Sync {
    fn apply<R: Real, const FMA: bool>(&self, x: R, other: R) -> R;
}

/// [`crate::device::flex_map`] of a [`RealMap`], in [`Quad`]s where the lanes take them
/// ([`quad_part`]; the rest one by one, the same arithmetic), fused multiply-adds where the
/// CPU has them.
pub fn flex_map_real(
    x: burn::backend::flex::FlexTensor,
    other: Option<burn::backend::flex::FlexTensor>,
    f: impl RealMap,
) -> burn::backend::flex::FlexTensor {
    map_pieces(
        x,
        other,
        |values| map_real_in_place(values, &f),
        |out, x, other| map_real(out, x, other, &f),
    )
}

/// [`flex_map_real`]'s loop over one piece: `out` from x (and `other`, or 0s).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn map_real(out: &mut [MaybeUninit<f32>], x: &[f32], other: Option<&[f32]>, f: &impl RealMap) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => {
        let full = quad_part::<V>(x.len());
        match other {
            Some(o) => {
                for c in (0..full).step_by(QUAD) {
                    let [x, o] = Quad::<V>::load_each([x, o], c);
                    f.apply::<_, FMA>(x, o).store_uninit(&mut out[c..]);
                }
                for c in full..x.len() {
                    out[c].write(f.apply::<f32, FMA>(x[c], o[c]));
                }
            }
            None => {
                for c in (0..full).step_by(QUAD) {
                    let x = Quad::<V>::load(&x[c..]);
                    f.apply::<_, FMA>(x, Quad::splat(0.0)).store_uninit(&mut out[c..]);
                }
                for c in full..x.len() {
                    out[c].write(f.apply::<f32, FMA>(x[c], 0.0));
                }
            }
        }
    })
}

/// [`flex_map_real`]'s loop over one piece of an unshared tensor, `other` 0.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn map_real_in_place(values: &mut [f32], f: &impl RealMap) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => {
        let full = quad_part::<V>(values.len());
        for c in (0..full).step_by(QUAD) {
            let x = Quad::<V>::load(&values[c..]);
            f.apply::<_, FMA>(x, Quad::splat(0.0)).store(&mut values[c..]);
        }
        for v in &mut values[full..] {
            *v = f.apply::<f32, FMA>(*v, 0.0);
        }
    })
}

/// 1/√(2π), the normal density's factor.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `f(x)`, the second operand unused.
struct Forward(Pointwise);

impl RealMap for Forward {
    #[inline(always)]
    fn apply<R: Real, const FMA: bool>(&self, x: R, _: R) -> R {
        match self.0 {
            Pointwise::Gelu => {
                x * 0.5 * (erf_of::<R, FMA>(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
            }
            Pointwise::Silu => x * sigmoid_and_exp_in::<R, FMA>(x).0,
            Pointwise::Softplus => softplus_in::<R, FMA>(x),
            // x + 1 from 0 up (eˣ is 1 at 0 too), eˣ below; a NaN stays NaN.
            Pointwise::EluPlusOne => {
                R::select_nonnegative(x, x + 1.0, exp_nonpositive_of::<R, FMA>(x))
            }
        }
    }
}

/// `grad · f'(x)`, the gradient the second operand.
struct Derivative(Pointwise);

impl RealMap for Derivative {
    #[inline(always)]
    fn apply<R: Real, const FMA: bool>(&self, x: R, g: R) -> R {
        match self.0 {
            Pointwise::Gelu => {
                // One exp for both: e^(−(x/√2)²) is the density's e^(−x²/2).
                let (erf, gauss) = erf_and_gauss_of::<R, FMA>(x * std::f32::consts::FRAC_1_SQRT_2);
                let (cdf, pdf) = ((erf + 1.0) * 0.5, gauss * INV_SQRT_2PI);
                g * x.mul_add::<FMA>(pdf, cdf)
            }
            Pointwise::Silu => {
                let s = sigmoid_and_exp_in::<R, FMA>(x).0;
                g * s * (x * (-s + 1.0) + 1.0)
            }
            Pointwise::Softplus => g * sigmoid_and_exp_in::<R, FMA>(x).0,
            Pointwise::EluPlusOne => {
                R::select_nonnegative(x, g, g * exp_nonpositive_of::<R, FMA>(x))
            }
        }
    }
}

impl ActivationBackend for Flex {
    fn activation(x: FlexTensor, f: Pointwise) -> FlexTensor {
        FORWARD_CALLS.record();
        flex_map_real(x, None, Forward(f))
    }

    fn activation_backward(x: FlexTensor, grad: FlexTensor, f: Pointwise) -> FlexTensor {
        flex_map_real(x, Some(grad), Derivative(f))
    }
}

#[derive(Debug)]
struct ActivationBackward;

impl<B: Backend + ActivationBackend> Backward<B, 1> for ActivationBackward {
    type State = (FloatTensor<B>, Pointwise);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, f) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::activation_backward(x, grad, f));
        }
    }
}

impl<B: Backend + ActivationBackend, C: CheckpointStrategy> ActivationBackend for Autodiff<B, C> {
    fn activation(x: FloatTensor<Self>, f: Pointwise) -> FloatTensor<Self> {
        match ActivationBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let y = B::activation(x.clone(), f);
                prep.finish((x, f), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::activation(x.into_primitive(), f)),
        }
    }

    fn activation_backward(
        _x: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _f: Pointwise,
    ) -> FloatTensor<Self> {
        unreachable!(
            "an activation's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Each equals Burn's form, outputs and gradients, over ±6 (where erf saturates) and
    /// beyond, past softplus's threshold of 20 too.
    #[test]
    fn activations_equal_burns() {
        use burn::tensor::activation as burns;
        let device = Device::flex().autodiff();
        device.seed(5);
        let x = Tensor::<3>::random([3, 50, 70], Distribution::Normal(0.0, 8.0), &device);
        let w = Tensor::<3>::random([3, 50, 70], Distribution::Normal(0.0, 1.0), &device);
        let run = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| {
            let x = x.clone().require_grad();
            let y = f(x.clone());
            let g = (y.clone() * w.clone()).sum().backward();
            let v = |t: Tensor<3>| {
                t.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap()
            };
            (v(y), v(x.grad(&g).unwrap()))
        };
        type Form<'a> = &'a dyn Fn(Tensor<3>) -> Tensor<3>;
        let cases: [(&str, Form, Form); 4] = [
            ("gelu", &gelu, &burns::gelu),
            ("silu", &silu, &burns::silu),
            ("softplus", &softplus, &|x| burns::softplus(x, 1.0)),
            ("elu + 1", &elu_plus_one, &|x| {
                burns::elu(x, 1.0).add_scalar(1.0)
            }),
        ];
        for (name, ours, burns) in cases {
            let calls = FORWARD_CALLS.get();
            let (ours, burns) = (run(ours), run(burns));
            assert!(FORWARD_CALLS.get() > calls, "{name}: the extension ran");
            for (what, a, b) in [
                ("output", &ours.0, &burns.0),
                ("gradient", &ours.1, &burns.1),
            ] {
                // Relative past 1: the outputs grow with |x|.
                let err = crate::testing::max_relative_difference(a, b);
                assert!(err < 2e-6, "{name} {what}: max difference {err}");
            }
        }
    }

    /// Without autodiff, on a tensor nothing else holds (a product's fresh output), the
    /// forward overwrites its input: the same values as Burn's form.
    #[test]
    fn activations_in_place_equal_burns() {
        use burn::tensor::activation as burns;
        let device = Device::flex();
        device.seed(6);
        let x = Tensor::<2>::random([37, 70], Distribution::Normal(0.0, 8.0), &device);
        let fresh = || x.clone().mul_scalar(1.0);
        let v = |t: Tensor<2>| {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let cases: [(&str, Tensor<2>, Tensor<2>); 4] = [
            ("gelu", gelu(fresh()), burns::gelu(x.clone())),
            ("silu", silu(fresh()), burns::silu(x.clone())),
            (
                "softplus",
                softplus(fresh()),
                burns::softplus(x.clone(), 1.0),
            ),
            (
                "elu + 1",
                elu_plus_one(fresh()),
                burns::elu(x.clone(), 1.0).add_scalar(1.0),
            ),
        ];
        for (name, ours, burns) in cases {
            let err = crate::testing::max_relative_difference(&v(ours), &v(burns));
            assert!(err < 2e-6, "{name}: max difference {err}");
        }
    }
}

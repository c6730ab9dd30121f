//! `exp` of attention scores after the row max is subtracted (all ≤ 0), as a Burn backend
//! extension on flex with a vectorised exp ([`crate::vector_math::exp_nonpositive`]).
//! Burn's `exp` on flex calls libm's scalar `expf` per element, and the causal mask's
//! −1e30 scores take its underflow path (`with_errnof`): about 5% of a default-recipe step
//! (perf). Scores below −87 give exactly 0, as `expf` does. The reference is Burn's `exp`;
//! a test holds the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::prelude::*;

use crate::device::flex_map;
use crate::vector_math::exp_nonpositive;

#[backend_extension(Flex, Autodiff)]
pub trait ExpScoresBackend: Backend {
    /// `exp(x)` of `x ≤ 0`.
    fn exp_scores(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `exp(x)` for scores `x ≤ 0`: the extension on flex, Burn's `exp` of the scores clamped
/// at −80 elsewhere.
pub fn exp_scores<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !crate::device::is_flex(&x.device()) {
        // Hidden keys' −1e30 scores would send libtorch's exp (MKL's) down its underflow
        // path, element by element. From −80 the weight is below 2e-35 (and its gradient,
        // through the clamp, 0), within f32's rounding of any row's sum of weights.
        return x.clamp_min(EXP_FLOOR).exp();
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as ExpScoresBackend>::exp_scores(
        x.into_dispatch(),
    ))
}

/// Where [`exp_scores`] clamps scores on backends other than flex: `exp(−80)` is a normal
/// f32 (1.8e-35), so no exp takes an underflow path.
const EXP_FLOOR: f32 = -80.0;

impl ExpScoresBackend for Flex {
    fn exp_scores(x: FlexTensor) -> FlexTensor {
        flex_map(x, None, |x, _| {
            let y = exp_nonpositive(x);
            // A select, so the loop still vectorises.
            if x < -87.0 { 0.0 } else { y }
        })
    }
}

#[derive(Debug)]
struct ExpBackward;

impl<B: Backend> Backward<B, 1> for ExpBackward {
    /// The output: `d exp(x) = exp(x) dx`.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::float_mul(grad, ops.state));
        }
    }
}

impl<B: Backend + ExpScoresBackend, C: CheckpointStrategy> ExpScoresBackend for Autodiff<B, C> {
    fn exp_scores(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match ExpBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::exp_scores(x.into_primitive());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::exp_scores(x.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Equal to Burn's `exp` over scores from 0 down to far below the f32 range (masked
    /// scores), outputs and gradients.
    #[test]
    fn exp_scores_equals_burns_exp() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let x = Tensor::<4>::random([2, 3, 40, 50], Distribution::Uniform(-30.0, 0.0), &device);
        // Some masked scores (−1e30) and some near the underflow edge.
        let x = x.clone().mask_fill(x.clone().lower_elem(-27.0), -1.0e30);
        let x = x.clone().mask_fill(
            x.clone()
                .lower_elem(-1.0e29)
                .bool_not()
                .bool_and(x.clone().lower_elem(-25.0)),
            -87.2,
        );
        let w = Tensor::<4>::random([2, 3, 40, 50], Distribution::Normal(0.0, 1.0), &device);
        let run = |f: fn(Tensor<4>) -> Tensor<4>| {
            let x = x.clone().require_grad();
            let y = f(x.clone());
            let g = (y.clone() * w.clone()).sum().backward();
            let v = |t: Tensor<4>| {
                t.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap()
            };
            (v(y), v(x.grad(&g).unwrap()))
        };
        let (ours, burns) = (run(exp_scores), run(|x| x.exp()));
        for (what, a, b) in [
            ("output", &ours.0, &burns.0),
            ("gradient", &ours.1, &burns.1),
        ] {
            for (a, b) in a.iter().zip(b) {
                assert!(
                    (a - b).abs() <= 3e-7 * b.abs() + 1e-37,
                    "{what}: {a} vs {b}"
                );
            }
        }
        // Masked scores give exactly 0, as libm's does.
        assert!(
            ours.0
                .iter()
                .zip(&burns.0)
                .all(|(a, b)| *b != 0.0 || *a == 0.0)
        );
    }
}

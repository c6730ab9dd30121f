//! The first-order linear recurrence `s_t = a_t ⊙ s_(t−1) + b_t` over time, which Mamba's
//! selective scan and linear attention's chunk-to-chunk state both are.
//!
//! Two forms, held equal by the tests (gradients included): [`decayed_scan_reference`], a
//! loop of tensor ops; and a Burn backend extension on flex whose forward is one pass over
//! memory and whose backward is the same scan run backwards in time. The reference's
//! per-step slices each back-propagate into a zero tensor of the whole input, so its
//! backward is quadratic in the number of steps; the extension's is linear.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, Slice, TensorMetadata, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32, register_gradients};

/// Scans the extension has run in this process: lets a test see that a form took this
/// path rather than only matching its output.
pub static FORWARD_CALLS: RunCount = RunCount::new();

#[backend_extension(Flex, Autodiff)]
pub trait DecayedScanBackend: Backend {
    /// Every `s_t = a_t ⊙ s_(t−1) + b_t`, `t = 0..T`, for a, b `[n, T, d]` from s0 `[n, d]`:
    /// `[n, T, d]`.
    fn decayed_scan(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Every state `s_t = a_t ⊙ s_(t−1) + b_t` for a, b `[n, T, d]` from `s0` `[n, d]`:
/// `[n, T, d]` (state t after step t). The backend extension on flex, the reference loop
/// elsewhere.
pub fn decayed_scan(a: Tensor<3>, b: Tensor<3>, s0: Tensor<2>) -> Tensor<3> {
    if !crate::device::is_flex(&a.device()) {
        return decayed_scan_reference(a, b, s0);
    }
    Tensor::from_dispatch(
        <burn::backend::Dispatch as DecayedScanBackend>::decayed_scan(
            a.into_dispatch(),
            b.into_dispatch(),
            s0.into_dispatch(),
        ),
    )
}

/// Reference: the recurrence, one step at a time.
pub fn decayed_scan_reference(a: Tensor<3>, b: Tensor<3>, s0: Tensor<2>) -> Tensor<3> {
    let [n, t, d] = a.dims();
    let mut s = s0;
    let mut states = Vec::with_capacity(t);
    for i in 0..t {
        let step = |x: &Tensor<3>| x.clone().narrow(1, i, 1).reshape([n, d]);
        s = step(&a) * s + step(&b);
        states.push(s.clone().unsqueeze_dim::<3>(1));
    }
    Tensor::cat(states, 1)
}

impl DecayedScanBackend for Flex {
    fn decayed_scan(a: FlexTensor, b: FlexTensor, s0: FlexTensor) -> FlexTensor {
        let shape = a.shape();
        let [n, t, d] = [shape[0], shape[1], shape[2]];
        let dtype = a.dtype();
        let (a, b, s0) = (flex_f32(&a), flex_f32(&b), flex_f32(&s0));
        // Sequences and channels are independent: each task scans one sequence's block of
        // BLOCK channels (so one long sequence still uses every core), and the loop over a
        // block vectorises; blocks are copied into place afterwards.
        const BLOCK: usize = 64;
        let blocks = d.div_ceil(BLOCK);
        let scanned: Vec<(usize, usize, Vec<f32>)> = (0..n * blocks)
            .into_par_iter()
            .map(|task| {
                let (i, j0) = (task / blocks, (task % blocks) * BLOCK);
                let w = BLOCK.min(d - j0);
                let mut s = s0[i * d + j0..i * d + j0 + w].to_vec();
                let mut out = Vec::with_capacity(t * w);
                for step in 0..t {
                    let at = (i * t + step) * d + j0;
                    for (j, s) in s.iter_mut().enumerate() {
                        *s = a[at + j] * *s + b[at + j];
                    }
                    out.extend_from_slice(&s);
                }
                (i, j0, out)
            })
            .collect();
        let mut out = vec![0f32; n * t * d];
        for (i, j0, block) in scanned {
            let w = block.len() / t.max(1);
            for (step, row) in block.chunks_exact(w.max(1)).enumerate() {
                let at = (i * t + step) * d + j0;
                out[at..at + w].copy_from_slice(row);
            }
        }
        FORWARD_CALLS.record();
        flex_from_f32(out, [n, t, d], dtype)
    }
}

/// What the backward pass keeps.
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    a: FloatTensor<B>,
    s0: FloatTensor<B>,
    states: FloatTensor<B>,
}

#[derive(Debug)]
struct ScanBackward;

fn range(a: usize, b: usize) -> Slice {
    Slice::new(a as isize, Some(b as isize), 1)
}

/// `x` `[n, T, d]` at steps `a..b`.
fn steps<B: Backend>(x: &FloatTensor<B>, a: usize, b: usize) -> FloatTensor<B> {
    let s = x.shape();
    B::float_slice(x.clone(), &[range(0, s[0]), range(a, b), range(0, s[2])])
}

impl<B: Backend + DecayedScanBackend> Backward<B, 3> for ScanBackward {
    type State = Saved<B>;

    /// With λ_t = ∂L/∂s_t (through the later states too): λ_t = g_t + a_(t+1) ⊙ λ_(t+1),
    /// the same recurrence backwards in time; then ∂L/∂b_t = λ_t, ∂L/∂a_t = λ_t ⊙ s_(t−1)
    /// and ∂L/∂s0 = a_0 ⊙ λ_0.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let parents = ops.parents.map(|p| p.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let Saved { a, s0, states } = ops.state;
        let shape = a.shape();
        let [n, t, d] = [shape[0], shape[1], shape[2]];
        let device = a.device();
        let zeros = |len: usize| B::float_zeros([n, len, d].into(), &device, a.dtype().into());
        // a_(t+1), with 0 after the last step; reversed in time with the gradient.
        let a_next = B::float_cat(vec![steps::<B>(&a, 1, t), zeros(1)], 1);
        let lambda = B::float_flip(
            B::decayed_scan(
                B::float_flip(a_next, &[1]),
                B::float_flip(grad, &[1]),
                B::float_zeros([n, d].into(), &device, a.dtype().into()),
            ),
            &[1],
        );
        let s_prev = B::float_cat(
            vec![
                B::float_reshape(s0, [n, 1, d].into()),
                steps::<B>(&states, 0, t - 1),
            ],
            1,
        );
        let da = B::float_mul(lambda.clone(), s_prev);
        let ds0 = B::float_reshape(
            B::float_mul(steps::<B>(&a, 0, 1), steps::<B>(&lambda, 0, 1)),
            [n, d].into(),
        );
        register_gradients::<B, _>(grads, parents, [da, lambda, ds0]);
    }
}

impl<B: Backend + DecayedScanBackend, C: CheckpointStrategy> DecayedScanBackend for Autodiff<B, C> {
    fn decayed_scan(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match ScanBackward
            .prepare::<C>([a.node(), b.node(), s0.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b, s0) = (a.into_primitive(), b.into_primitive(), s0.into_primitive());
                let states = B::decayed_scan(a.clone(), b, s0.clone());
                let saved = Saved {
                    a,
                    s0,
                    states: states.clone(),
                };
                prep.finish(saved, states)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::decayed_scan(
                a.into_primitive(),
                b.into_primitive(),
                s0.into_primitive(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "{what}: relative difference {err}");
    }

    /// The extension equals the reference loop, outputs and all three gradients, on random
    /// inputs with decays in (0, 1) and beyond, from a non-zero start.
    #[test]
    fn extension_equals_reference_with_gradients() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let (n, t, d) = (3, 17, 70);
        let a = Tensor::<3>::random([n, t, d], Distribution::Uniform(0.0, 1.2), &device);
        let b = Tensor::<3>::random([n, t, d], Distribution::Normal(0.0, 1.0), &device);
        let s0 = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([n, t, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |scan: fn(Tensor<3>, Tensor<3>, Tensor<2>) -> Tensor<3>| {
            let (a, b, s0) = (
                a.clone().require_grad(),
                b.clone().require_grad(),
                s0.clone().require_grad(),
            );
            let y = scan(a.clone(), b.clone(), s0.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                values(y),
                values(a.grad(&grads).unwrap()),
                values(b.grad(&grads).unwrap()),
                values(s0.grad(&grads).unwrap()),
            )
        };
        let calls = FORWARD_CALLS.get();
        let fast = run(decayed_scan);
        // The forward, and the backward's reverse scan, took the extension.
        assert!(FORWARD_CALLS.get() >= calls + 2);
        let reference = run(decayed_scan_reference);
        assert_close(&fast.0, &reference.0, "states");
        assert_close(&fast.1, &reference.1, "∂a");
        assert_close(&fast.2, &reference.2, "∂b");
        assert_close(&fast.3, &reference.3, "∂s0");
    }
}

//! Per-token cross-entropy `−log softmax(logits)[target]` as a Burn backend extension on
//! flex: the forward is one pass per row (max, then the sum of exponentials), and the
//! backward writes `g · (softmax − onehot)` in one more, recomputing the row's statistics
//! instead of keeping `[tokens, vocab]` probabilities. Burn's `log_softmax` + `gather` form
//! sweeps the logits about six times each way and scatters the gather's gradient into a
//! zeroed `[tokens, vocab]` tensor; at a 50k vocabulary the logits are most of a small
//! model's memory traffic. That form is the reference ([`super::objective::token_nll`]
//! elsewhere); a test holds the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32};
use crate::vector_math::{exp_nonpositive_fma, has_fma, max, sum_map};

/// Forward passes the extension has run in this process (for a test that it took the path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// Rows per parallel task.
const ROWS: usize = 16;

#[backend_extension(Flex, Autodiff)]
pub trait TokenNllBackend: Backend {
    /// `−log softmax(row)[target]` for each row of `logits` `[n, v]`, `targets` `[n]`.
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;

    /// The logits' gradient from each row's `grad` `[n]`.
    fn token_nll_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `−log softmax(logits)[target]` per row of `logits` `[n, v]`: the extension on flex.
pub fn token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<burn::backend::Dispatch as TokenNllBackend>::token_nll(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// The targets as indices, each checked against the vocabulary.
fn indices(targets: FlexTensor, vocab: usize) -> Vec<usize> {
    let values = targets
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("int targets");
    values
        .into_iter()
        .map(|t| {
            assert!(
                (0..vocab as i64).contains(&t),
                "cross-entropy target {t} is outside the vocabulary of {vocab}"
            );
            t as usize
        })
        .collect()
}

/// A row's max and `ln Σ exp(x − max)`.
#[inline(always)]
fn row_lse<const FMA: bool>(x: &[f32]) -> (f32, f32) {
    let m = max(x);
    (m, sum_map(x, |v| exp_nonpositive_fma::<FMA>(v - m)).ln())
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn nll_rows(nll: &mut [f32], logits: &[f32], targets: &[usize]) {
    const FMA: bool = has_fma!();
    let v = logits.len() / nll.len().max(1);
    for ((nll, x), &t) in nll.iter_mut().zip(logits.chunks(v)).zip(targets) {
        let (m, log_sum) = row_lse::<FMA>(x);
        *nll = m + log_sum - x[t];
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn nll_rows_backward(d: &mut [f32], logits: &[f32], targets: &[usize], grad: &[f32]) {
    const FMA: bool = has_fma!();
    let v = logits.len() / grad.len().max(1);
    for (((d, x), &t), &g) in d.chunks_mut(v).zip(logits.chunks(v)).zip(targets).zip(grad) {
        let (m, log_sum) = row_lse::<FMA>(x);
        let shift = m + log_sum;
        for (d, &x) in d.iter_mut().zip(x) {
            *d = g * exp_nonpositive_fma::<FMA>(x - shift);
        }
        d[t] -= g;
    }
}

impl TokenNllBackend for Flex {
    fn token_nll(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        FORWARD_CALLS.record();
        let (shape, dtype) = (logits.shape(), logits.dtype());
        let (n, v) = (shape[0], shape[1]);
        let targets = indices(targets, v);
        let logits = flex_f32(&logits);
        let mut nll = vec![0f32; n];
        nll.par_chunks_mut(ROWS)
            .zip(logits.par_chunks(ROWS * v).zip(targets.par_chunks(ROWS)))
            .for_each(|(nll, (x, t))| nll_rows(nll, x, t));
        flex_from_f32(nll, [n], dtype)
    }

    fn token_nll_backward(logits: FlexTensor, targets: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (shape, dtype) = (logits.shape(), logits.dtype());
        let (n, v) = (shape[0], shape[1]);
        let targets = indices(targets, v);
        let (logits, grad) = (flex_f32(&logits), flex_f32(&grad));
        let mut d = vec![0f32; n * v];
        d.par_chunks_mut(ROWS * v)
            .zip(logits.par_chunks(ROWS * v))
            .zip(targets.par_chunks(ROWS).zip(grad.par_chunks(ROWS)))
            .for_each(|((d, x), (t, g))| nll_rows_backward(d, x, t, g));
        flex_from_f32(d, shape, dtype)
    }
}

#[derive(Debug)]
struct TokenNllGrad;

impl<B: Backend + TokenNllBackend> Backward<B, 1> for TokenNllGrad {
    /// The logits and the targets.
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (logits, targets) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::token_nll_backward(logits, targets, grad));
        }
    }
}

impl<B: Backend + TokenNllBackend, C: CheckpointStrategy> TokenNllBackend for Autodiff<B, C> {
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match TokenNllGrad
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let y = B::token_nll(logits.clone(), targets.clone());
                prep.finish((logits, targets), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_nll(logits.into_primitive(), targets)),
        }
    }

    fn token_nll_backward(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!(
            "cross-entropy's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::log_softmax;

    /// Equal to Burn's `log_softmax` + `gather`, per-token losses and the logits' gradient,
    /// with logits spread wide enough that a max-free form would overflow.
    #[test]
    fn fused_cross_entropy_equals_burns() {
        let device = Device::flex().autodiff();
        device.seed(8);
        let (n, v) = (70, 300);
        let logits = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 30.0), &device);
        let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
        let w = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let x = logits.clone().require_grad();
            let nll = if ours {
                token_nll(x.clone(), targets.clone())
            } else {
                log_softmax(x.clone(), 1)
                    .gather(1, targets.clone().reshape([n, 1]))
                    .reshape([n])
                    .neg()
            };
            let g = (nll.clone() * w.clone()).sum().backward();
            let vals = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
            let grad = x
                .grad(&g)
                .unwrap()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            (vals(nll), grad)
        };
        let calls = FORWARD_CALLS.get();
        let (ours, burns) = (run(true), run(false));
        assert!(FORWARD_CALLS.get() > calls, "the extension ran");
        for (what, a, b) in [("nll", &ours.0, &burns.0), ("gradient", &ours.1, &burns.1)] {
            let err = crate::testing::max_relative_difference(a, b);
            assert!(err < 1e-5, "{what}: max difference {err}");
        }
    }
}

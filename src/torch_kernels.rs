//! torch's own fused kernels on libtorch, as a Burn backend extension: softmax attention
//! through `scaled_dot_product_attention` (FlashAttention's CPU kernel, or flash /
//! memory-efficient / cuDNN on CUDA, in the operands' dtype: bf16 under autocast, as
//! PyTorch's autocast runs it) and LayerNorm / RMSNorm through `layer_norm` / `rms_norm`.
//! In Burn's own ops each is a chain of element-wise ops and reductions, one pass over
//! memory each, forward and backward (attention also materialises its scores in f32).
//!
//! The backwards are torch's too: a forward runs on detached leaves that require grad, and
//! the backward asks torch's autograd for their gradients ([`TorchKernelsBackend::torch_grads`]),
//! so torch keeps what its kernel needs (e.g. attention's output and log-sum-exp) and
//! nothing is recomputed. The reference forms are [`crate::attention::naive::attend`] and
//! [`crate::fused_norm::norm_reference`]; `tests/libtorch.rs` holds them equal, gradients
//! included.

// burn-tch is deprecated upstream in favour of CubeCL's backends; it is metamix's route to
// torch's kernels (`training.backend = "libtorch"`) while it lasts.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, LibTorch, backend_extension};
use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::device::register_gradients;

thread_local! {
    /// Calls that took torch's kernels on this thread: (attention, norm).
    static CALLS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// How many calls on this thread took torch's attention and norm kernels (for tests that
/// they did; per thread, so that tests running beside each other do not count each other's).
pub fn calls() -> (usize, usize) {
    CALLS.get()
}

/// A kernel's output, and what [`TorchKernelsBackend::torch_grads`] needs for its
/// backward: the output that holds torch's graph and the three leaves it was computed from.
type Tracked<B> = (FloatTensor<B>, Graph<B>);
type Graph<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

#[backend_extension(LibTorch, Autodiff)]
pub trait TorchKernelsBackend: Backend {
    /// Attention of q `[b, h, tq, dk]` over k `[b, h, tk, dk]`, v `[b, h, tk, dv]`
    /// (`causal`: query i sees keys ≤ i), scores scaled by `scale`.
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// [`Self::torch_attention`] recorded for torch's autograd (leaves q, k, v): a
    /// `Tracked`, spelled out for the macro.
    #[allow(clippy::type_complexity)]
    fn torch_attention_tracked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> (
        FloatTensor<Self>,
        (
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
        ),
    );

    /// LayerNorm (`center`) or RMSNorm of x over its last dimension, times `gamma` plus
    /// `beta` (`[d]` each).
    fn torch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> FloatTensor<Self>;

    /// [`Self::torch_norm`] recorded for torch's autograd (leaves x, gamma, beta): a
    /// `Tracked`, spelled out for the macro.
    #[allow(clippy::type_complexity)]
    fn torch_norm_tracked(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> (
        FloatTensor<Self>,
        (
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
        ),
    );

    /// The gradients of a tracked kernel's three leaves given its output's, `grad`.
    fn torch_grads(
        graph: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Softmax attention of q `[b, h, tq, dk]` over k `[b, h, tk, dk]`, v `[b, h, tk, dv]`
/// through torch's fused kernel, on libtorch (`causal`: query i sees keys ≤ i, torch's
/// top-left alignment), scores scaled by `scale`. Under autocast the operands are cast to
/// the working dtype, as PyTorch's autocast runs attention, and the output back to q's.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool, scale: f64) -> Tensor<4> {
    CALLS.set((calls().0 + 1, calls().1));
    let dtype = q.dtype();
    let (q, k, v) = match crate::mixed_precision::working_dtype() {
        Some(low) => (q.cast(low), k.cast(low), v.cast(low)),
        None => (q, k, v),
    };
    let out = Tensor::<4>::from_dispatch(
        <burn::backend::Dispatch as TorchKernelsBackend>::torch_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            causal,
            scale,
        ),
    );
    if out.dtype() == dtype {
        out
    } else {
        out.cast(FloatDType::from(dtype))
    }
}

/// LayerNorm (`center`) or RMSNorm of `x` over its last dimension through torch's kernels,
/// on libtorch.
pub fn norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
    center: bool,
) -> Tensor<D> {
    CALLS.set((calls().0, calls().1 + 1));
    let beta = beta.unwrap_or_else(|| gamma.zeros_like());
    Tensor::from_dispatch(
        <burn::backend::Dispatch as TorchKernelsBackend>::torch_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
            center,
        ),
    )
}

fn sdpa(
    q: &tch::Tensor,
    k: &tch::Tensor,
    v: &tch::Tensor,
    causal: bool,
    scale: f64,
) -> tch::Tensor {
    tch::Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        None::<tch::Tensor>,
        0.0,
        causal,
        scale,
        false,
    )
}

fn torch_norm(
    x: &tch::Tensor,
    gamma: &tch::Tensor,
    beta: &tch::Tensor,
    eps: f64,
    center: bool,
) -> tch::Tensor {
    let d = [*x.size().last().expect("a tensor with dimensions")];
    if center {
        x.layer_norm(d, Some(gamma), Some(beta), eps, true)
    } else {
        x.rms_norm(d, Some(gamma), eps) + beta
    }
}

/// `f` run for torch's autograd on leaves sharing `inputs`' storage: the detached output,
/// and the output with its graph and the leaves, for [`TorchKernelsBackend::torch_grads`].
fn tracked(
    [a, b, c]: [TchTensor; 3],
    f: impl FnOnce(&tch::Tensor, &tch::Tensor, &tch::Tensor) -> tch::Tensor,
) -> Tracked<LibTorch> {
    // `from_existing` tells burn-tch that a leaf shares its input's storage, so it never
    // writes over either in place: torch's graph reads them in the backward.
    let leaf = |x: TchTensor| {
        let t = x.tensor.detach().set_requires_grad(true);
        TchTensor::from_existing(t, x.storage)
    };
    let (a, b, c) = (leaf(a), leaf(b), leaf(c));
    let graph = TchTensor::new(tch::with_grad(|| f(&a.tensor, &b.tensor, &c.tensor)));
    let out = TchTensor::from_existing(graph.tensor.detach(), graph.storage.clone());
    (out, (graph, a, b, c))
}

impl TorchKernelsBackend for LibTorch {
    fn torch_attention(
        q: TchTensor,
        k: TchTensor,
        v: TchTensor,
        causal: bool,
        scale: f64,
    ) -> TchTensor {
        TchTensor::new(tch::no_grad(|| {
            sdpa(&q.tensor, &k.tensor, &v.tensor, causal, scale)
        }))
    }

    fn torch_attention_tracked(
        q: TchTensor,
        k: TchTensor,
        v: TchTensor,
        causal: bool,
        scale: f64,
    ) -> Tracked<Self> {
        tracked([q, k, v], |q, k, v| sdpa(q, k, v, causal, scale))
    }

    fn torch_norm(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        eps: f64,
        center: bool,
    ) -> TchTensor {
        TchTensor::new(tch::no_grad(|| {
            torch_norm(&x.tensor, &gamma.tensor, &beta.tensor, eps, center)
        }))
    }

    fn torch_norm_tracked(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        eps: f64,
        center: bool,
    ) -> Tracked<Self> {
        tracked([x, gamma, beta], |x, g, b| torch_norm(x, g, b, eps, center))
    }

    fn torch_grads(
        graph: TchTensor,
        a: TchTensor,
        b: TchTensor,
        c: TchTensor,
        grad: TchTensor,
    ) -> (TchTensor, TchTensor, TchTensor) {
        // torch's run_backward takes no output gradient: ⟨out, grad⟩ has it as out's.
        let grad = grad.tensor.to_kind(graph.tensor.kind());
        let root = tch::with_grad(|| (&graph.tensor * grad).sum(None));
        let leaves = [&a.tensor, &b.tensor, &c.tensor];
        let mut g = tch::Tensor::run_backward(&[root], &leaves, false, false)
            .into_iter()
            .map(TchTensor::new);
        let mut next = || g.next().expect("one gradient per leaf");
        (next(), next(), next())
    }
}

/// The backward of either kernel: torch's autograd over the graph kept in the state.
#[derive(Debug)]
struct TorchBackward;

impl<B: Backend + TorchKernelsBackend> Backward<B, 3> for TorchBackward {
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (graph, a, b, c) = ops.state;
        let (ga, gb, gc) = B::torch_grads(graph, a, b, c, grad);
        register_gradients::<B, _>(grads, ops.parents.map(|p| p.map(|n| n.id)), [ga, gb, gc]);
    }
}

/// Autodiff's side of either kernel: `plain` where nothing needs a gradient, else
/// `tracked` with its torch graph kept for [`TorchBackward`].
fn record<B: Backend + TorchKernelsBackend, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<B, C>>; 3],
    plain: impl FnOnce([FloatTensor<B>; 3]) -> FloatTensor<B>,
    tracked: impl FnOnce([FloatTensor<B>; 3]) -> Tracked<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = inputs.each_ref().map(|x| x.node());
    let inputs = inputs.map(|x| x.into_primitive());
    match TorchBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, graph) = tracked(inputs);
            prep.finish(graph, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(plain(inputs)),
    }
}

impl<B: Backend + TorchKernelsBackend, C: CheckpointStrategy> TorchKernelsBackend
    for Autodiff<B, C>
{
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self> {
        record::<B, C>(
            [q, k, v],
            |[q, k, v]| B::torch_attention(q, k, v, causal, scale),
            |[q, k, v]| B::torch_attention_tracked(q, k, v, causal, scale),
        )
    }

    fn torch_attention_tracked(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: bool,
        _: f64,
    ) -> Tracked<Self> {
        unreachable!("torch's graph is recorded on the inner backend")
    }

    fn torch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        center: bool,
    ) -> FloatTensor<Self> {
        record::<B, C>(
            [x, gamma, beta],
            |[x, g, b]| B::torch_norm(x, g, b, eps, center),
            |[x, g, b]| B::torch_norm_tracked(x, g, b, eps, center),
        )
    }

    fn torch_norm_tracked(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: f64,
        _: bool,
    ) -> Tracked<Self> {
        unreachable!("torch's graph is recorded on the inner backend")
    }

    fn torch_grads(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the backward runs on the inner backend; it is not differentiated again")
    }
}

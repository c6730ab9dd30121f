//! A projection's bias, `y + b` along the last dim, as a Burn backend extension on flex:
//! one parallel pass that adds `b` to each row, over y's own buffer where y is a fresh
//! product's output, and a backward whose bias gradient sums the rows in parallel pieces.
//!
//! As Burn ops the add is a broadcast binary op and its backward a `sum_dim` over the
//! broadcast rows, both on one thread at these sizes while the other core waits: about 7%
//! of a default-model step with its 24 biased projections (`model.bias = false` measured
//! that much faster). The reference, [`add_bias_reference`], is those Burn ops; a test holds
//! the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32, is_flex, overwrite_f32};

#[backend_extension(Flex, Autodiff)]
pub trait BiasBackend: Backend {
    /// `y` `[.., n]` with `b` `[n]` added to each row.
    fn add_bias(y: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The bias's gradient, on the backend under autodiff: the sum of the rows of `g` `[.., n]`.
pub trait BiasGradient: Backend {
    fn sum_rows(g: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Bias adds run through the extension in this process (for a test that one did).
pub static CALLS: RunCount = RunCount::new();

/// `y + b` along y's last dim: the extension for f32 on flex, Burn's broadcast add elsewhere.
pub fn add_bias<const D: usize>(y: Tensor<D>, b: Tensor<1>) -> Tensor<D> {
    let f32s = y.dtype() == DType::F32 && b.dtype() == DType::F32;
    if !f32s || !is_flex(&y.device()) || y.dims()[D - 1] != b.dims()[0] {
        return add_bias_reference(y, b);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as BiasBackend>::add_bias(
        y.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// The reference: Burn's broadcast add.
pub fn add_bias_reference<const D: usize>(y: Tensor<D>, b: Tensor<1>) -> Tensor<D> {
    y + b.unsqueeze::<D>()
}

/// Rows per parallel piece: a fixed count, so the bias gradient's sums come in the same
/// order whatever the thread count, and a run repeats exactly on another machine.
const PIECE_ROWS: usize = 64;

/// `row += bias` for each row of `piece`, compiled for each target so the loop vectorises.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn add_rows(piece: &mut [f32], bias: &[f32]) {
    for row in piece.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `sum += row` for each row of `piece`, compiled for each target as [`add_rows`].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn sum_piece(piece: &[f32], sum: &mut [f32]) {
    for row in piece.chunks_exact(sum.len()) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
}

impl BiasBackend for Flex {
    fn add_bias(y: FlexTensor, b: FlexTensor) -> FlexTensor {
        CALLS.record();
        let bias = flex_f32(&b);
        let n = bias.len();
        if n == 0 {
            return y;
        }
        overwrite_f32(y, |values| {
            values
                .par_chunks_mut(PIECE_ROWS * n)
                .for_each(|piece| add_rows(piece, &bias));
        })
    }
}

impl BiasGradient for Flex {
    fn sum_rows(g: FlexTensor) -> FlexTensor {
        let n = g.shape()[g.shape().num_dims() - 1];
        let values = flex_f32(&g);
        if n == 0 {
            return flex_from_f32(Vec::new(), [0], DType::F32);
        }
        // Each piece's partial sum, then the partials added in piece order.
        let partials: Vec<Vec<f32>> = values
            .par_chunks(PIECE_ROWS * n)
            .map(|piece| {
                let mut sum = vec![0f32; n];
                sum_piece(piece, &mut sum);
                sum
            })
            .collect();
        let mut sum = vec![0f32; n];
        for partial in &partials {
            sum_piece(partial, &mut sum);
        }
        flex_from_f32(sum, [n], DType::F32)
    }
}

#[derive(Debug)]
struct BiasBackward;

impl<B: Backend + BiasGradient> Backward<B, 2> for BiasBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [node_y, node_b] = ops.parents;
        if let Some(node) = node_b {
            grads.register::<B>(node.id, B::sum_rows(grad.clone()));
        }
        if let Some(node) = node_y {
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: Backend + BiasBackend + BiasGradient, C: CheckpointStrategy> BiasBackend
    for Autodiff<B, C>
{
    fn add_bias(y: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [y.node(), b.node()];
        let out = B::add_bias(y.into_primitive(), b.into_primitive());
        BiasBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateless(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::tensor::Distribution;

    /// Equal to Burn's broadcast add, output and both gradients: a fresh product's output
    /// (added in place), a strided view (copied first), and more rows than one piece's,
    /// with a partial last piece.
    #[test]
    fn add_bias_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let normal = |shape: Vec<usize>| {
            Tensor::<3>::random(shape.clone(), Distribution::Normal(0.0, 1.0), &device)
        };
        let (rows, n) = (2 * PIECE_ROWS + 9, 37);
        for strided in [false, true] {
            let x = match strided {
                true => normal(vec![rows, 3, n]),
                false => normal(vec![3, rows, n]),
            }
            .require_grad();
            let b =
                Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let probe = normal(vec![3, rows, n]);
            // A transposed view is not contiguous; a fresh product of x owns its buffer.
            let input = |x: Tensor<3>| match strided {
                true => x.swap_dims(0, 1),
                false => x * 2.0,
            };
            let run = |fused: bool| {
                let y = input(x.clone());
                let out = match fused {
                    true => add_bias(y, b.clone()),
                    false => add_bias_reference(y, b.clone()),
                };
                let g = (out.clone() * probe.clone()).sum().backward();
                let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
                let gb = b
                    .grad(&g)
                    .unwrap()
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap();
                (v(out), v(x.grad(&g).unwrap()), gb)
            };
            let before = CALLS.get();
            let (ours, reference) = (run(true), run(false));
            // A tensor held elsewhere is left as it was.
            let held = input(x.clone());
            let _ = add_bias(held.clone(), b.clone());
            let unchanged = held.into_data().try_into_vec::<f32>().unwrap();
            let expected = input(x.clone()).into_data().try_into_vec::<f32>().unwrap();
            assert_eq!(unchanged, expected, "held input (strided: {strided})");
            assert!(CALLS.get() > before, "the extension ran");
            assert_eq!(ours.0, reference.0, "output (strided: {strided})");
            assert_eq!(ours.1, reference.1, "y's gradient (strided: {strided})");
            let err = max_relative_difference(&ours.2, &reference.2);
            assert!(err < 1e-5, "bias gradient (strided: {strided}): {err}");
        }
    }
}

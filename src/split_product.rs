//! A projection cut into column blocks, `x · [w₀ | w₁ | …]` → `[x·w₀, x·w₁, …]` (Mamba's
//! in_proj into u and z, Mamba-2's into z, x, B, C and dt), as a Burn backend extension on
//! flex. Forward, each piece is its own product, so each comes out contiguous for what reads
//! it. Backward, the pieces' gradients are written side by side into one `[rows, n]`
//! gradient G, and `dx = G · wᵀ`, `dw = xᵀ · G`: two products.
//!
//! As Burn ops (a product per piece with a narrowed weight, [`split_product_reference`])
//! autodiff sums the pieces' gradients of x with Burn's add, on one thread, and each
//! narrowed weight's gradient is a zero-filled tensor of the whole weight with the piece
//! written in, summed again: in Mamba-2's in_proj four adds of x's gradient and five fills
//! and four adds of w's, about a sixth of the layer's backward. A test holds the two equal.
//!
//! Burn's autodiff gives an op one output, so each piece is an op of its own on one shared
//! node, the product's: a piece's backward leaves its gradient in a slot the product holds,
//! and the product's backward, which Burn runs after every piece's (the pieces lie deeper in
//! the graph), reads them all. A slot that no gradient reached stays empty: zeros there.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, Slice};
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32, register_gradients};
use crate::matmul::{Blocks, MatmulBackend};

#[backend_extension(Flex, Autodiff)]
pub trait SplitProductBackend: Backend {
    /// `x` `[rows, k]` times the column blocks of `w` `[k, n]` that are `widths` wide
    /// (summing to n): `[rows, width]` each.
    fn split_product(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        widths: Vec<usize>,
    ) -> Vec<FloatTensor<Self>>;
}

/// The backward, on the backend under autodiff (outside the extension trait: Burn's
/// dispatch does not route a `Vec` of tensors into a function).
pub trait SplitProductBackward: Backend {
    /// The gradients of x and w given the pieces' (in order, `[rows, width]` each).
    fn split_product_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grads: Vec<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Split products run through the extension in this process (for a test that it did).
pub static CALLS: RunCount = RunCount::new();

/// `x · w` cut into pieces `widths` wide: the extension for f32 on flex, Burn's ops
/// ([`split_product_reference`]) elsewhere.
pub fn split_product<const N: usize>(
    x: Tensor<2>,
    w: Tensor<2>,
    widths: [usize; N],
) -> [Tensor<2>; N] {
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !f32s || !crate::device::is_flex(&x.device()) {
        return split_product_reference(x, w, widths);
    }
    let pieces = <burn::backend::Dispatch as SplitProductBackend>::split_product(
        x.into_dispatch(),
        w.into_dispatch(),
        widths.to_vec(),
    );
    let mut pieces = pieces.into_iter().map(Tensor::from_dispatch);
    std::array::from_fn(|_| pieces.next().expect("one piece per width"))
}

/// The reference: a product per piece with its narrowed block of `w`.
pub fn split_product_reference<const N: usize>(
    x: Tensor<2>,
    w: Tensor<2>,
    widths: [usize; N],
) -> [Tensor<2>; N] {
    std::array::from_fn(|i| {
        let start = widths[..i].iter().sum();
        crate::matmul::matmul(x.clone(), w.clone().narrow(1, start, widths[i]))
    })
}

/// Rows of G per parallel task of the backward's gather.
const ROWS: usize = 64;

impl SplitProductBackend for Flex {
    fn split_product(x: FlexTensor, w: FlexTensor, widths: Vec<usize>) -> Vec<FlexTensor> {
        CALLS.record();
        let k = w.shape()[0];
        let mut start = 0;
        widths
            .into_iter()
            .map(|width| {
                let range = [Slice::from(0..k), Slice::from(start..start + width)];
                start += width;
                // The block is a view of w; the product reads it in place.
                let block = Flex::float_slice(w.clone(), &range);
                <Flex as MatmulBackend>::matmul(x.clone(), block, Blocks::Dense)
            })
            .collect()
    }
}

impl SplitProductBackward for Flex {
    fn split_product_backward(
        x: FlexTensor,
        w: FlexTensor,
        grads: Vec<FlexTensor>,
    ) -> (FlexTensor, FlexTensor) {
        let (rows, n) = (x.shape()[0], w.shape()[1]);
        let widths: Vec<usize> = grads.iter().map(|g| g.shape()[1]).collect();
        assert_eq!(
            widths.iter().sum::<usize>(),
            n,
            "split product: piece widths"
        );
        let pieces: Vec<_> = grads.iter().map(flex_f32).collect();
        // G, the pieces side by side, a block of rows per task.
        let mut g = Vec::with_capacity(rows * n);
        if n > 0 {
            g.spare_capacity_mut()[..rows * n]
                .par_chunks_mut(ROWS * n)
                .enumerate()
                .for_each(|(task, out)| {
                    for (r, out) in (task * ROWS..).zip(out.chunks_exact_mut(n)) {
                        let mut at = 0;
                        for (piece, &width) in pieces.iter().zip(&widths) {
                            let row = &piece[r * width..(r + 1) * width];
                            let out = &mut out[at..at + width];
                            // SAFETY: `out` has room for the row's `width` values; a
                            // `MaybeUninit<f32>` has f32's layout. (A copy, where a loop of
                            // element writes compiled to scalar stores.)
                            unsafe {
                                let to = out.as_mut_ptr().cast::<f32>();
                                std::ptr::copy_nonoverlapping(row.as_ptr(), to, width);
                            }
                            at += width;
                        }
                    }
                });
        }
        // SAFETY: the tasks wrote every one of the rows × n elements.
        unsafe { g.set_len(rows * n) };
        // The pieces' gradients, G's size together, are freed before the products.
        drop(pieces);
        drop(grads);
        let g = flex_from_f32(g, [rows, n], DType::F32);
        let t = |m: FlexTensor| Flex::float_swap_dims(m, 0, 1);
        let dx = <Flex as MatmulBackend>::matmul(g.clone(), t(w), Blocks::Dense);
        let dw = <Flex as MatmulBackend>::matmul(t(x), g, Blocks::Dense);
        (dx, dw)
    }
}

/// The pieces' gradients, left by each piece's backward for the product's (see the module).
#[derive(Clone)]
struct Slots<B: Backend>(Arc<Mutex<Vec<Option<FloatTensor<B>>>>>);

impl<B: Backend> std::fmt::Debug for Slots<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slots")
    }
}

#[derive(Debug)]
struct PieceBackward;

impl<B: Backend> Backward<B, 1> for PieceBackward {
    /// The product's slots and this piece's place among them.
    type State = (Slots<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (slots, i) = ops.state;
        slots.0.lock().expect("slots")[i] = Some(grad);
    }
}

#[derive(Debug)]
struct ProductBackward;

impl<B: Backend + SplitProductBackward> Backward<B, 2> for ProductBackward {
    /// x, w, the pieces' widths and their slots.
    type State = (FloatTensor<B>, FloatTensor<B>, Vec<usize>, Slots<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, widths, slots) = ops.state;
        let filled = std::mem::take(&mut *slots.0.lock().expect("slots"));
        let (rows, dtype) = (x.shape()[0], x.dtype());
        let device = x.device();
        let pieces = filled
            .into_iter()
            .zip(widths)
            .map(|(grad, width)| {
                grad.unwrap_or_else(|| B::float_zeros([rows, width].into(), &device, dtype.into()))
            })
            .collect();
        let (dx, dw) = B::split_product_backward(x, w, pieces);
        register_gradients::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx, dw]);
    }
}

impl<B: Backend + SplitProductBackend + SplitProductBackward, C: CheckpointStrategy>
    SplitProductBackend for Autodiff<B, C>
{
    fn split_product(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        widths: Vec<usize>,
    ) -> Vec<FloatTensor<Self>> {
        let nodes = [x.node(), w.node()];
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let pieces = B::split_product(x.clone(), w.clone(), widths.clone());
        let slots = Slots(Arc::new(Mutex::new(vec![None; widths.len()])));
        // The shared node: its output is never read (w's buffer stands in, uncopied).
        let product = match ProductBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, w.clone(), widths, slots.clone()), w),
            OpsKind::UnTracked(prep) => prep.finish(w),
        };
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                match PieceBackward
                    .prepare::<C>([product.node()])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish((slots.clone(), i), piece),
                    OpsKind::UnTracked(prep) => prep.finish(piece),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::tensor::Distribution;

    /// The extension equals a product per narrowed block, pieces and the gradients of x and
    /// w, over more rows than one task's and pieces as narrow as Mamba-2's Δ; a piece that
    /// no gradient reaches gives zeros in its block of w's gradient.
    #[test]
    fn split_product_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(23);
        let (rows, k, widths) = (2 * ROWS + 9, 40, [48, 16, 8, 33]);
        let n: usize = widths.iter().sum();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<2>::random([rows, k], normal, &device).require_grad();
        let w = Tensor::<2>::random([k, n], normal, &device).require_grad();
        let probes = widths.map(|width| Tensor::<2>::random([rows, width], normal, &device));
        for used in [4, 3] {
            let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            let run = |fused: bool| {
                let calls = CALLS.get();
                let pieces = match fused {
                    true => split_product(x.clone(), w.clone(), widths),
                    false => split_product_reference(x.clone(), w.clone(), widths),
                };
                assert_eq!(CALLS.get() > calls, fused, "took the extension where asked");
                let outputs: Vec<_> = pieces.iter().map(|p| values(p.clone().inner())).collect();
                let loss = pieces
                    .into_iter()
                    .zip(probes.clone())
                    .take(used)
                    .map(|(p, probe)| (p * probe).sum())
                    .reduce(|a, b| a + b)
                    .unwrap();
                let grads = loss.backward();
                let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());
                let unused = dw.clone().narrow(1, n - widths[3], widths[3]);
                (outputs, values(dx), values(dw), values(unused))
            };
            let (fused, reference) = (run(true), run(false));
            for (a, b) in fused.0.iter().zip(&reference.0) {
                assert!(max_relative_difference(a, b) < 1e-5, "pieces");
            }
            assert!(max_relative_difference(&fused.1, &reference.1) < 1e-5, "dx");
            assert!(max_relative_difference(&fused.2, &reference.2) < 1e-5, "dw");
            if used < widths.len() {
                assert!(fused.3.iter().all(|&v| v == 0.0), "an unused piece's block");
            }
        }
    }
}

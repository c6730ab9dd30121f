//! A projection cut into column blocks, `x · [w₀ | w₁ | …]` → `[x·w₀, x·w₁, …]` (Mamba's
//! in_proj into u and z, Mamba-2's into z, x, B, C and dt), as a Burn backend extension on
//! flex. Forward, each wide piece is its own product, so each comes out contiguous for what
//! reads it (neighbouring narrow ones are one product, cut into pieces). Backward,
//! `dx = Σ gᵢ · wᵢᵀ` accumulates in one buffer (wᵀ laid out once, row-major, for those
//! products) and each `xᵀ · gᵢ` is written into its columns of w's gradient: a product each
//! way per piece (narrow pieces first gathered side by side, as one), and no sums outside
//! them.
//!
//! As Burn ops (a product per piece with a narrowed weight, [`split_product_reference`])
//! autodiff sums the pieces' gradients of x with Burn's add, on one thread, and each
//! narrowed weight's gradient is a zero-filled tensor of the whole weight with the piece
//! written in, summed again: in Mamba-2's in_proj four adds of x's gradient and five fills
//! and four adds of w's. A test holds the two equal.
//!
//! Where x has another reader too (Mamba's x_proj input is also the scan's), the product can
//! hand x itself on as one more output ([`split_product_and_input`]): that reader's gradient
//! then starts dx's sum, the products adding into it, where autodiff would add the two
//! gradients of x with Burn's add, on one thread.
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

use crate::device::{RunCount, flex_f32, flex_from_f32, register_gradients, unshared_f32};
use crate::matmul::{Blocks, MatmulBackend, Matrices, gemm_into_bands};

#[backend_extension(Flex, Autodiff)]
pub trait SplitProductBackend: Backend {
    /// `x` `[rows, k]` times the column blocks of `w` `[k, n]` that are `widths` wide
    /// (summing to n): `[rows, width]` each; with `and_input`, x itself after them.
    fn split_product(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        widths: Vec<usize>,
        and_input: bool,
    ) -> Vec<FloatTensor<Self>>;
}

/// The backward, on the backend under autodiff (outside the extension trait: Burn's
/// dispatch does not route a `Vec` of tensors into a function).
pub trait SplitProductBackward: Backend {
    /// The gradients of x and w given the pieces' (in order, `[rows, width]` each), x's
    /// added to `dx_from` where given (the gradient of x handed on).
    fn split_product_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grads: Vec<FloatTensor<Self>>,
        dx_from: Option<FloatTensor<Self>>,
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
    split_product_in(x, w, widths, false).0
}

/// [`split_product`] and x itself, for another reader of x: its gradient and the
/// product's are summed inside the product's backward (see the module).
pub fn split_product_and_input<const N: usize>(
    x: Tensor<2>,
    w: Tensor<2>,
    widths: [usize; N],
) -> ([Tensor<2>; N], Tensor<2>) {
    let (pieces, x) = split_product_in(x, w, widths, true);
    (pieces, x.expect("asked for"))
}

fn split_product_in<const N: usize>(
    x: Tensor<2>,
    w: Tensor<2>,
    widths: [usize; N],
    and_input: bool,
) -> ([Tensor<2>; N], Option<Tensor<2>>) {
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !f32s || !crate::device::is_flex(&x.device()) {
        let input = and_input.then(|| x.clone());
        return (split_product_reference(x, w, widths), input);
    }
    let pieces = <burn::backend::Dispatch as SplitProductBackend>::split_product(
        x.into_dispatch(),
        w.into_dispatch(),
        widths.to_vec(),
        and_input,
    );
    let mut pieces = pieces.into_iter().map(Tensor::from_dispatch);
    let products = std::array::from_fn(|_| pieces.next().expect("one piece per width"));
    (products, pieces.next())
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

impl SplitProductBackend for Flex {
    fn split_product(
        x: FlexTensor,
        w: FlexTensor,
        widths: Vec<usize>,
        and_input: bool,
    ) -> Vec<FlexTensor> {
        CALLS.record();
        let (rows, k) = (x.shape()[0], w.shape()[0]);
        let mut start = 0;
        let mut pieces = Vec::with_capacity(widths.len());
        for run in runs(&widths) {
            let width: usize = widths[run.clone()].iter().sum();
            let range = [Slice::from(0..k), Slice::from(start..start + width)];
            start += width;
            // The block is a view of w; the product reads it in place.
            let block = Flex::float_slice(w.clone(), &range);
            let product = <Flex as MatmulBackend>::matmul(x.clone(), block, Blocks::Dense);
            if run.len() == 1 {
                pieces.push(product);
                continue;
            }
            // Neighbouring narrow pieces: one product (x packed once, where a product per
            // piece packed it for each), its columns then copied out piece by piece.
            let product = flex_f32(&product);
            let mut at = 0;
            for &piece in &widths[run] {
                let mut values = Vec::with_capacity(rows * piece);
                for r in 0..rows {
                    values.extend_from_slice(&product[r * width + at..][..piece]);
                }
                pieces.push(flex_from_f32(values, [rows, piece], DType::F32));
                at += piece;
            }
        }
        if and_input {
            pieces.push(x);
        }
        pieces
    }
}

impl SplitProductBackward for Flex {
    fn split_product_backward(
        x: FlexTensor,
        w: FlexTensor,
        grads: Vec<FlexTensor>,
        dx_from: Option<FlexTensor>,
    ) -> (FlexTensor, FlexTensor) {
        let (rows, k, n) = (x.shape()[0], x.shape()[1], w.shape()[1]);
        let widths: Vec<usize> = grads.iter().map(|g| g.shape()[1]).collect();
        assert_eq!(
            widths.iter().sum::<usize>(),
            n,
            "split product: piece widths"
        );
        // dx's buffer: the given gradient's own where nothing else holds it (as a fresh
        // gradient is), else a copy of it, or a new one that the first product writes.
        let mut dx_from = dx_from.map(|mut g| match unshared_f32(&mut g) {
            Some(_) => g,
            None => flex_from_f32(flex_f32(&g).into_owned(), [rows, k], DType::F32),
        });
        if rows == 0 || k == 0 || n == 0 {
            let zeros = |len, shape: [usize; 2]| flex_from_f32(vec![0.0; len], shape, DType::F32);
            let dx = dx_from.unwrap_or_else(|| zeros(rows * k, [rows, k]));
            return (dx, zeros(k * n, [k, n]));
        }
        let pieces: Vec<_> = grads.iter().map(flex_f32).collect();
        let (x, w) = (Matrices::of(&x), Matrices::of(&w));
        let ((x0, (x_rs, x_cs)), (w0, (w_rs, w_cs))) =
            ((x.first(0), x.strides), (w.first(0), w.strides));
        // wᵀ `[n, k]` laid out once, so that dx's products read each block's rows in
        // place: through a transposed view of w, gemm packed it across its grain (Mamba's
        // in_proj: 160–170 GFLOP/s against 200 for the same shape forward, in training).
        let wt = transposed((w0, (w_rs, w_cs)), (k, n));
        let mut dx = Vec::<f32>::with_capacity(if dx_from.is_some() { 0 } else { rows * k });
        let dx_out = match dx_from.as_mut() {
            Some(g) => unshared_f32(g).expect("unshared").as_mut_ptr(),
            None => dx.as_mut_ptr(),
        };
        let mut dw = Vec::<f32>::with_capacity(k * n);
        let (mut column, mut written) = (0, dx_from.is_some());
        for run in runs(&widths) {
            let width: usize = widths[run.clone()].iter().sum();
            if width == 0 {
                continue;
            }
            let gathered;
            let g: &[f32] = if run.len() == 1 {
                &pieces[run.start]
            } else {
                gathered = side_by_side(&pieces[run.clone()], &widths[run], rows);
                &gathered
            };
            let g = (g.as_ptr(), (width as isize, 1));
            // SAFETY: dx `[rows, k]` (`dx_from`'s values, or capacity reserved above) and dw
            // `[k, n]` (capacity reserved above); wᵀ `[n, k]`, its rows from `column` on the
            // block's. The first run writes every element of dx unless it holds
            // `dx_from`'s, and the others add to it; each run writes its own columns of dw,
            // and together they cover all n. x, w and the gradients are alive for the
            // calls, their strides their layouts'.
            unsafe {
                // dx (+)= g · w[:, column..]ᵀ
                let w_block = (wt.as_ptr().add(column * k), (k as isize, 1));
                gemm_into_bands((dx_out, k), (rows, width, k), g, w_block, written);
                // dw[:, column..] = xᵀ · g
                let out = (dw.as_mut_ptr().add(column), n);
                gemm_into_bands(out, (k, rows, width), (x0, (x_cs, x_rs)), g, false);
            }
            (column, written) = (column + width, true);
        }
        // SAFETY: every element of both was written above (n > 0, so some run was).
        unsafe {
            if dx_from.is_none() {
                dx.set_len(rows * k);
            }
            dw.set_len(k * n);
        }
        let dx = dx_from.unwrap_or_else(|| flex_from_f32(dx, [rows, k], DType::F32));
        (dx, flex_from_f32(dw, [k, n], DType::F32))
    }
}

/// `w` `[k, n]` (a pointer and its (row, column) strides) transposed into a new `[n, k]`,
/// row-major: 16 × 16 blocks by [`F32x16::transpose`] where w's rows are contiguous, the
/// rest element by element.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn transposed((w, (rs, cs)): (*const f32, (isize, isize)), (k, n): (usize, usize)) -> Vec<f32> {
    crate::f32x16::with_f32x16!(V => transposed_in::<V>((w, (rs, cs)), (k, n)))
}

#[inline(always)]
fn transposed_in<V: crate::f32x16::F32x16>(
    (w, (rs, cs)): (*const f32, (isize, isize)),
    (k, n): (usize, usize),
) -> Vec<f32> {
    const L: usize = 16;
    let mut out = vec![0f32; n * k];
    // SAFETY: (i, j) with i < k, j < n lies inside w, as its strides describe it.
    let at = |i: usize, j: usize| unsafe { *w.offset(i as isize * rs + j as isize * cs) };
    let (mut rows, mut block) = ([[0f32; L]; L], [[0f32; L]; L]);
    for i0 in (0..k).step_by(L) {
        for j0 in (0..n).step_by(L) {
            if cs != 1 || i0 + L > k || j0 + L > n {
                for i in i0..(i0 + L).min(k) {
                    for j in j0..(j0 + L).min(n) {
                        out[j * k + i] = at(i, j);
                    }
                }
                continue;
            }
            for (r, row) in rows.iter_mut().enumerate() {
                // SAFETY: row i0 + r, columns j0 .. j0 + 16 of w, contiguous (cs = 1).
                let src = unsafe { w.offset((i0 + r) as isize * rs + j0 as isize) };
                row.copy_from_slice(unsafe { std::slice::from_raw_parts(src, L) });
            }
            V::transpose(&rows, &mut block);
            for (c, column) in block.iter().enumerate() {
                out[(j0 + c) * k + i0..][..L].copy_from_slice(column);
            }
        }
    }
    out
}

/// Pieces at least this wide have their gradients read in place; narrower neighbours are
/// gathered side by side into one (a product over 8 or 16 columns runs far below gemm's
/// speed on wide ones).
const WIDE: usize = 64;

/// The pieces in runs, each one wide piece or neighbouring narrow ones.
fn runs(widths: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, &width) in widths.iter().enumerate() {
        match out.last_mut() {
            Some(run) if width < WIDE && widths[run.start] < WIDE => run.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Narrow pieces' gradients (`[rows, width]` each) side by side, `[rows, Σ widths]`.
fn side_by_side(pieces: &[std::borrow::Cow<[f32]>], widths: &[usize], rows: usize) -> Vec<f32> {
    let n: usize = widths.iter().sum();
    let mut out = vec![0f32; rows * n];
    let mut at = 0;
    for (piece, &width) in pieces.iter().zip(widths) {
        for (row, out) in piece.chunks_exact(width).zip(out.chunks_exact_mut(n)) {
            out[at..at + width].copy_from_slice(row);
        }
        at += width;
    }
    out
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
        let mut filled = std::mem::take(&mut *slots.0.lock().expect("slots"));
        // The slot past the pieces' is x's own, where x was handed on.
        let dx_from = match filled.len() > widths.len() {
            true => filled.pop().flatten(),
            false => None,
        };
        let (rows, dtype) = (x.shape()[0], x.dtype());
        let device = x.device();
        let pieces = filled
            .into_iter()
            .zip(widths)
            .map(|(grad, width)| {
                grad.unwrap_or_else(|| B::float_zeros([rows, width].into(), &device, dtype.into()))
            })
            .collect();
        let (dx, dw) = B::split_product_backward(x, w, pieces, dx_from);
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
        and_input: bool,
    ) -> Vec<FloatTensor<Self>> {
        let nodes = [x.node(), w.node()];
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let pieces = B::split_product(x.clone(), w.clone(), widths.clone(), and_input);
        let slots = Slots(Arc::new(Mutex::new(vec![None; pieces.len()])));
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

    /// The blocked transpose equals the element loop, for a row-major matrix whose sides
    /// are off the 16-wide blocks and for a strided (column-major) one.
    #[test]
    fn transposed_equals_the_element_loop() {
        let (k, n) = (37, 50);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.25 - 3.0).collect();
        for (rs, cs) in [(n as isize, 1), (1, k as isize)] {
            let out = transposed((values.as_ptr(), (rs, cs)), (k, n));
            for i in 0..k {
                for j in 0..n {
                    let w = values[(i as isize * rs + j as isize * cs) as usize];
                    assert_eq!(out[j * k + i], w, "({i}, {j}) of strides ({rs}, {cs})");
                }
            }
        }
    }

    /// How a test's loss reads x where the product hands it on.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum InputRead {
        /// Not handed on: the plain split product.
        NotAsked,
        /// Weighted by a probe: its gradient is fresh, and the product adds into it.
        Probe,
        /// Added to a piece-shaped product of its own: its gradient is the add's, shared with
        /// that other parent, so the product copies it first.
        SharedGradient,
        /// Handed on but never read: no gradient reaches it.
        Unread,
    }

    /// The extension equals a product per narrowed block, pieces and the gradients of x and
    /// w, with wide pieces and narrow ones as Mamba-2's Δ; a piece that no gradient reaches
    /// gives zeros in its block of w's gradient. Where x is handed on, its gradient there
    /// joins dx as autodiff would add it.
    #[test]
    fn split_product_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(23);
        // Runs of one wide piece and of narrow ones gathered, in every order.
        let (rows, k, widths) = (137, 40, [WIDE + 16, 16, 8, WIDE + 3, 33]);
        let n: usize = widths.iter().sum();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<2>::random([rows, k], normal, &device).require_grad();
        let w = Tensor::<2>::random([k, n], normal, &device).require_grad();
        let probes = widths.map(|width| Tensor::<2>::random([rows, width], normal, &device));
        let x_probe = Tensor::<2>::random([rows, k], normal, &device);
        let reads = [
            InputRead::NotAsked,
            InputRead::Probe,
            InputRead::SharedGradient,
            InputRead::Unread,
        ];
        for (used, read) in [5, 4].into_iter().flat_map(|u| reads.map(|r| (u, r))) {
            let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            let run = |fused: bool| {
                let calls = CALLS.get();
                let (pieces, input) = match (fused, read) {
                    (true, InputRead::NotAsked) => {
                        (split_product(x.clone(), w.clone(), widths), None)
                    }
                    (true, _) => {
                        let (pieces, x) = split_product_and_input(x.clone(), w.clone(), widths);
                        (pieces, Some(x))
                    }
                    (false, _) => (
                        split_product_reference(x.clone(), w.clone(), widths),
                        Some(x.clone()),
                    ),
                };
                assert_eq!(CALLS.get() > calls, fused, "took the extension where asked");
                let outputs: Vec<_> = pieces.iter().map(|p| values(p.clone().inner())).collect();
                let mut loss = pieces
                    .into_iter()
                    .zip(probes.clone())
                    .take(used)
                    .map(|(p, probe)| (p * probe).sum())
                    .reduce(|a, b| a + b)
                    .unwrap();
                let input = || input.clone().expect("x handed on");
                match read {
                    InputRead::NotAsked | InputRead::Unread => {}
                    InputRead::Probe => loss = loss + (input() * x_probe.clone()).sum(),
                    InputRead::SharedGradient => {
                        let other = x.clone().mul_scalar(0.5);
                        loss = loss + ((input() + other) * x_probe.clone()).sum();
                    }
                }
                let grads = loss.backward();
                let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());
                let unused = dw.clone().narrow(1, n - widths[4], widths[4]);
                (outputs, values(dx), values(dw), values(unused))
            };
            let (fused, reference) = (run(true), run(false));
            let case = format!("{used} pieces read, x {read:?}");
            for (a, b) in fused.0.iter().zip(&reference.0) {
                assert!(max_relative_difference(a, b) < 1e-5, "pieces, {case}");
            }
            assert!(
                max_relative_difference(&fused.1, &reference.1) < 1e-5,
                "dx, {case}"
            );
            assert!(
                max_relative_difference(&fused.2, &reference.2) < 1e-5,
                "dw, {case}"
            );
            if used < widths.len() {
                assert!(
                    fused.3.iter().all(|&v| v == 0.0),
                    "an unused piece's block, {case}"
                );
            }
        }
    }
}

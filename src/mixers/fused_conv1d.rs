//! Mamba's and Mamba-2's depthwise causal conv and the SiLU after it, fused, as a Burn
//! backend extension on flex: `y_s = silu(bias + Σ_j w_j ⊙ p_(s+j))` over the sequence `p`
//! = history then x, channels innermost (`K ≤ 4` taps, causal-conv1d's limit too; wider
//! kernels take the reference). The output is formed row by row, 64 channels at a time,
//! the SiLU applied as each group's sums come out, so memory is read in order. The backward
//! recomputes the pre-activation from the inputs, row by row again, and gathers each input
//! row's gradient from the `kernel` outputs that read it, so no two tasks write the same
//! row; the weight's gradient sums run down the steps 64 channels at a time, in registers.
//! (Blocks of 16 channels each down all the steps, the order before, read one 64-byte line
//! per 1 KB row: a stride that missed L1 at each step, 1.4× the time of this order.)
//!
//! The reference is [`super::causal_conv1d::CausalConv1d::forward`] followed by
//! [`crate::activations::silu`]: a concatenation, `kernel` slices, products and sums, each
//! with its own backward (about 20 ops and several zero-filled buffers per layer). The
//! tests hold the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;

use crate::device::{RunCount, flex_f32, flex_from_f32, register_gradients, written};
use crate::f32x16::{F32x16, QUAD, Quad, quad_part, with_const, with_f32x16};
use crate::vector_math::{Real, has_fma, sigmoid_and_exp_in};
use std::mem::MaybeUninit;

#[backend_extension(Flex, Autodiff)]
pub trait ConvSiluBackend: Backend {
    /// x `[b, t, ch]` after history `[b, kernel − 1, ch]` (or, zeros, `[b, 0, ch]`: a
    /// sequence's start, with no buffer to fill and no gradient to write), weight
    /// `[ch, 1, kernel]`, bias `[ch]` → `silu(conv)` `[b, t, ch]`.
    fn conv1d_silu(
        x: FloatTensor<Self>,
        history: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradients of x, history (`[b, 0, ch]` where it is), weight and bias given the
    /// output's.
    #[allow(clippy::type_complexity)]
    fn conv1d_silu_backward(
        x: FloatTensor<Self>,
        history: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// Fused convs run in this process (for a test that the extension took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// `silu(conv(x))` through the extension (flex and its autodiff only; see
/// [`crate::device::is_flex`]).
pub fn conv1d_silu(
    x: Tensor<3>,
    history: Tensor<3>,
    weight: Tensor<3>,
    bias: Tensor<1>,
) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as ConvSiluBackend>::conv1d_silu(
        x.into_dispatch(),
        history.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Output rows per parallel task, so one long sequence still spreads over every core.
const PIECE: usize = 256;

/// The widest kernel the fused conv takes (causal-conv1d's CUDA kernel's too): the weight
/// gradient's sums of a group of channels stay in registers.
pub const MAX_KERNEL: usize = 4;

/// Channels per block past the [`Quad`]s: one [`F32x16`].
const LANES: usize = 16;

/// A block's `width` lanes of `values` from `c0` (the rest 0).
#[inline(always)]
fn load_block<V: F32x16>(values: &[f32], c0: usize, width: usize) -> V {
    V::load_first(&values[c0..], width)
}

thread_local! {
    /// Each thread's buffer for a piece's ∂L/∂z, kept from call to call: allocated and
    /// zeroed per piece it was one more pass over memory than the kernel's own. (Borrowed
    /// outside the kernels: a closure inside one is a function boundary that the vector
    /// intrinsics are not inlined across.)
    static GRAD_Z: std::cell::RefCell<Vec<MaybeUninit<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The inputs as f32, the weight transposed to `[kernel][ch]`.
struct Inputs<'a> {
    x: std::borrow::Cow<'a, [f32]>,
    /// `[b, kernel − 1, ch]`, or empty: zeros (see [`ConvSiluBackend::conv1d_silu`]).
    history: std::borrow::Cow<'a, [f32]>,
    /// A row of zeros, the history's rows where it is empty.
    zeros: Vec<f32>,
    /// `[kernel][ch]`.
    w: Vec<f32>,
    bias: std::borrow::Cow<'a, [f32]>,
    t: usize,
    ch: usize,
    kernel: usize,
}

impl<'a> Inputs<'a> {
    fn read(
        x: &'a FlexTensor,
        history: &'a FlexTensor,
        weight: &FlexTensor,
        bias: &'a FlexTensor,
    ) -> Self {
        let (s, kernel) = (x.shape(), weight.shape()[2]);
        let (t, ch) = (s[1], s[2]);
        let raw = flex_f32(weight);
        let mut w = vec![0f32; kernel * ch];
        for c in 0..ch {
            for j in 0..kernel {
                w[j * ch + c] = raw[c * kernel + j];
            }
        }
        Self {
            x: flex_f32(x),
            history: flex_f32(history),
            zeros: vec![0.0; ch],
            w,
            bias: flex_f32(bias),
            t,
            ch,
            kernel,
        }
    }

    /// Row `r` of sequence `i` counted from the start of its history (`r < kernel − 1`
    /// reads the history).
    #[inline(always)]
    fn row(&self, i: usize, r: usize) -> &[f32] {
        let (ch, h) = (self.ch, self.kernel - 1);
        if r < h && self.history.is_empty() {
            &self.zeros
        } else if r < h {
            &self.history[(i * h + r) * ch..(i * h + r + 1) * ch]
        } else {
            let s = r - h;
            &self.x[(i * self.t + s) * ch..(i * self.t + s + 1) * ch]
        }
    }

    /// The padded rows `s .. s + K` that output step `s` of sequence `i` reads.
    #[inline(always)]
    fn taps_rows<const K: usize>(&self, i: usize, s: usize) -> [&[f32]; K] {
        // (A loop: `std::array::from_fn` was a call per step, 7% of the backward.)
        let mut rows: [&[f32]; K] = [&[]; K];
        for (j, row) in rows.iter_mut().enumerate() {
            *row = self.row(i, s + j);
        }
        rows
    }

    /// The pre-activations `bias + Σ_j w_j ⊙ p_(s+j)` at channels `c .. c + QUAD` of a
    /// step whose rows are `rows` (the taps added in order j = 0, 1, …).
    #[inline(always)]
    fn pre_activation_quad<V: F32x16, const K: usize, const FMA: bool>(
        &self,
        rows: &[&[f32]; K],
        c: usize,
    ) -> Quad<V> {
        let mut z = Quad::<V>::load(&self.bias[c..]);
        for (j, row) in rows.iter().enumerate() {
            z = Quad::load(&self.w[j * self.ch + c..]).mul_add::<FMA>(Quad::load(&row[c..]), z);
        }
        z
    }

    /// [`Self::pre_activation_quad`] at a block's lanes, the same arithmetic.
    #[inline(always)]
    fn pre_activation_block<V: F32x16, const K: usize>(
        &self,
        rows: &[&[f32]; K],
        (c0, width): (usize, usize),
    ) -> V {
        let mut z = load_block::<V>(&self.bias, c0, width);
        for (j, row) in rows.iter().enumerate() {
            let w = load_block::<V>(&self.w[j * self.ch..], c0, width);
            z = w.mul_add(load_block(row, c0, width), z);
        }
        z
    }

    /// The gradients of padded rows `rows` (from `first`) into `out` (`[rows][ch]`): row r
    /// is read by output steps `r − j` (j < K) with weight `w_j`. `gz` holds ∂L/∂z of step
    /// s in its row `s − first + K − 1`, with rows of zeros for the steps outside the
    /// piece, so every row reads its K steps unconditionally. Row by row, the rows read in
    /// order (a block of channels down all the rows read one line per 1 KB row, a stride
    /// that missed L1 at every step).
    #[inline(always)]
    fn gather_rows<V: F32x16, const K: usize, const FMA: bool>(
        &self,
        (gz, first): (&[f32], usize),
        rows: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let ch = self.ch;
        let full = quad_part::<V>(ch);
        for (r, out) in rows.zip(out.chunks_exact_mut(ch)) {
            // Step r − j sits in row r − j − first + K − 1.
            let mut steps: [&[f32]; K] = [&[]; K];
            for (j, step) in steps.iter_mut().enumerate() {
                *step = &gz[(r - first + K - 1 - j) * ch..][..ch];
            }
            for c in (0..full).step_by(QUAD) {
                let mut acc = Quad::<V>::splat(0.0);
                for (j, step) in steps.iter().enumerate() {
                    acc = Quad::load(&self.w[j * ch + c..])
                        .mul_add::<FMA>(Quad::load(&step[c..]), acc);
                }
                acc.store_uninit(&mut out[c..]);
            }
            for c0 in (full..ch).step_by(LANES) {
                let width = (ch - c0).min(LANES);
                let mut acc = V::zero();
                for (j, step) in steps.iter().enumerate() {
                    let w = load_block::<V>(&self.w[j * ch..], c0, width);
                    acc = w.mul_add(load_block(step, c0, width), acc);
                }
                acc.store_uninit(&mut out[c0..c0 + width]);
            }
        }
    }

    /// Output steps `steps`' shares of the weight's and bias's gradients (`[K][ch]`, `[ch]`)
    /// from their ∂L/∂z, `gz` (from the first of them), each channel's terms added in step
    /// order: a [`Quad`] of channels at a time down the steps, then the channels past the
    /// Quads a block of [`LANES`] at a time, the sums in registers.
    #[inline(always)]
    fn weight_grads<V: F32x16, const K: usize, const FMA: bool>(
        &self,
        i: usize,
        gz: &[f32],
        steps: std::ops::Range<usize>,
    ) -> Sums {
        let ch = self.ch;
        let full = quad_part::<V>(ch);
        let (mut g_w, mut g_b) = (vec![0f32; K * ch], vec![0f32; ch]);
        let terms = || steps.clone().zip(gz.chunks_exact(ch));
        for c in (0..full).step_by(QUAD) {
            let (mut gw, mut gb) = ([Quad::<V>::splat(0.0); K], Quad::<V>::splat(0.0));
            for (s, g) in terms() {
                let (g, rows) = (Quad::<V>::load(&g[c..]), self.taps_rows::<K>(i, s));
                gb = gb + g;
                for j in 0..K {
                    gw[j] = g.mul_add::<FMA>(Quad::load(&rows[j][c..]), gw[j]);
                }
            }
            for j in 0..K {
                gw[j].store(&mut g_w[j * ch + c..]);
            }
            gb.store(&mut g_b[c..]);
        }
        for c0 in (full..ch).step_by(LANES) {
            let width = (ch - c0).min(LANES);
            let (mut gw, mut gb) = ([V::zero(); K], V::zero());
            for (s, g) in terms() {
                let (g, rows) = (load_block::<V>(g, c0, width), self.taps_rows::<K>(i, s));
                gb = gb.add(g);
                for j in 0..K {
                    gw[j] = g.mul_add(load_block(rows[j], c0, width), gw[j]);
                }
            }
            for j in 0..K {
                gw[j].store_partial(&mut g_w[j * ch + c0..j * ch + c0 + width]);
            }
            gb.store_partial(&mut g_b[c0..c0 + width]);
        }
        (g_w, g_b)
    }
}

/// Output steps `s0..s0 + out.len() / ch` of sequence `i`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_piece(x: &Inputs, i: usize, s0: usize, out: &mut [MaybeUninit<f32>]) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => with_const!(x.kernel, K in [1, 2, 3, 4] => forward_piece_in::<V, K, FMA>(x, i, s0, out)))
}

/// [`forward_piece`], the SiLU in [`Quad`]s where the lanes take them (`quad_part`; the
/// rest one by one, the same arithmetic).
#[inline(always)]
fn forward_piece_in<V: F32x16, const K: usize, const FMA: bool>(
    x: &Inputs,
    i: usize,
    s0: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let ch = x.ch;
    let full = quad_part::<V>(ch);
    // Row by row, the SiLU on each Quad as its sums are formed (was: a block of channels
    // down all the rows, then the SiLU in a pass of its own).
    for (s, y) in (s0..).zip(out.chunks_exact_mut(ch)) {
        let rows = x.taps_rows::<K>(i, s);
        for c in (0..full).step_by(QUAD) {
            let z = x.pre_activation_quad::<V, K, FMA>(&rows, c);
            (z * sigmoid_and_exp_in::<_, FMA>(z).0).store_uninit(&mut y[c..]);
        }
        for c0 in (full..ch).step_by(LANES) {
            let width = (ch - c0).min(LANES);
            let z = x.pre_activation_block::<V, K>(&rows, (c0, width));
            z.store_uninit(&mut y[c0..c0 + width]);
        }
        // SAFETY: the loops above wrote every channel of the row.
        let rest = &mut unsafe { written(y) }[full..];
        if V::QUADS && !rest.is_empty() {
            // One more Quad, padded, where the tail went one element at a time (Mamba-2's
            // B and C convs, 16 channels each, are all tail).
            let z = Quad::<V>::load_padded(rest);
            (z * sigmoid_and_exp_in::<_, FMA>(z).0).store_first(rest);
        } else {
            for v in rest {
                *v *= sigmoid_and_exp_in::<_, FMA>(*v).0;
            }
        }
    }
}

/// `g · silu'(z)`, `silu'(z) = σ(z)(1 + z(1 − σ(z)))`.
#[inline(always)]
fn silu_backward<R: Real, const FMA: bool>(z: R, g: R) -> R {
    let sig = sigmoid_and_exp_in::<R, FMA>(z).0;
    g * sig * (z * (-sig + 1.0) + 1.0)
}

impl Inputs<'_> {
    /// ∂L/∂z at output steps `first..last` of sequence `i` from the output's gradient (the
    /// pre-activation z recomputed, `silu'(z) = σ(z)(1 + z(1 − σ(z)))`), laid out for
    /// [`Self::gather_rows`]: `K − 1` rows of zeros, the steps' rows, then zeros up to
    /// `rows` rows in all. In [`Quad`]s where the lanes take them (`quad_part`; the rest one
    /// by one, the same arithmetic).
    #[inline(always)]
    fn grad_z<'b, V: F32x16, const K: usize, const FMA: bool>(
        &self,
        grad: &[f32],
        (i, first, last): (usize, usize, usize),
        rows: usize,
        buffer: &'b mut Vec<MaybeUninit<f32>>,
    ) -> &'b [f32] {
        let (t, ch) = (self.t, self.ch);
        let full = quad_part::<V>(ch);
        if buffer.len() < rows * ch {
            buffer.resize(rows * ch, MaybeUninit::new(0.0));
        }
        let buffer = &mut buffer[..rows * ch];
        let (before, rest) = buffer.split_at_mut((K - 1) * ch);
        let (steps, after) = rest.split_at_mut((last - first) * ch);
        before.fill(MaybeUninit::new(0.0));
        after.fill(MaybeUninit::new(0.0));
        // Row by row, as the forward: the Quads' ∂L/∂z at once, the tail's z first, then
        // its ∂L/∂z in place.
        for (s, gz) in (first..).zip(steps.chunks_exact_mut(ch)) {
            let g = &grad[(i * t + s) * ch..(i * t + s + 1) * ch];
            let rows = self.taps_rows::<K>(i, s);
            for c in (0..full).step_by(QUAD) {
                let z = self.pre_activation_quad::<V, K, FMA>(&rows, c);
                silu_backward::<_, FMA>(z, Quad::load(&g[c..])).store_uninit(&mut gz[c..]);
            }
            for c0 in (full..ch).step_by(LANES) {
                let width = (ch - c0).min(LANES);
                let z = self.pre_activation_block::<V, K>(&rows, (c0, width));
                z.store_uninit(&mut gz[c0..c0 + width]);
            }
            // SAFETY: the loops above wrote every channel of the row.
            let gz = unsafe { written(gz) };
            if V::QUADS && full < ch {
                let (z, g) = (
                    Quad::<V>::load_padded(&gz[full..]),
                    Quad::<V>::load_padded(&g[full..]),
                );
                silu_backward::<_, FMA>(z, g).store_first(&mut gz[full..]);
            } else {
                for c in full..ch {
                    gz[c] = silu_backward::<_, FMA>(gz[c], g[c]);
                }
            }
        }
        // SAFETY: every row written: the margins' zeros above, the steps' ∂L/∂z.
        unsafe { written(buffer) }
    }
}

/// The gradients of x's rows `s0..s0 + gx.len() / ch` of sequence `i`, and this piece's
/// share of the weight's and bias's gradients (`[kernel][ch]`, `[ch]`): those of output
/// steps `s0..`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_piece(
    x: &Inputs,
    grad: &[f32],
    (i, s0): (usize, usize),
    (gx, buffer): (&mut [MaybeUninit<f32>], &mut Vec<MaybeUninit<f32>>),
) -> Sums {
    const FMA: bool = has_fma!();
    with_f32x16!(V => with_const!(x.kernel, K in [1, 2, 3, 4] => backward_piece_in::<V, K, FMA>(x, grad, (i, s0), gx, buffer)))
}

/// [`backward_piece`] on lanes `V`, `K` taps.
#[inline(always)]
fn backward_piece_in<V: F32x16, const K: usize, const FMA: bool>(
    x: &Inputs,
    grad: &[f32],
    (i, s0): (usize, usize),
    gx: &mut [MaybeUninit<f32>],
    buffer: &mut Vec<MaybeUninit<f32>>,
) -> Sums {
    let (t, ch, h) = (x.t, x.ch, K - 1);
    let s1 = s0 + gx.len() / ch;
    // x's row s is padded row s + h, read by steps s .. s + h (those before t).
    let steps = (i, s0, (s1 + h).min(t));
    let gz = x.grad_z::<V, K, FMA>(grad, steps, s1 - s0 + 2 * h, buffer);
    x.gather_rows::<V, K, FMA>((gz, s0), s0 + h..s1 + h, gx);
    x.weight_grads::<V, K, FMA>(i, &gz[h * ch..], s0..s1)
}

/// The gradient of sequence `i`'s history rows into `g_history` `[kernel − 1][ch]`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn history_backward(
    x: &Inputs,
    grad: &[f32],
    i: usize,
    (g_history, buffer): (&mut [MaybeUninit<f32>], &mut Vec<MaybeUninit<f32>>),
) {
    const FMA: bool = has_fma!();
    let h = x.kernel - 1;
    with_f32x16!(V => with_const!(x.kernel, K in [1, 2, 3, 4] => {
        // History row r is read by steps r − j ≥ 0 (those before t).
        let gz = x.grad_z::<V, K, FMA>(grad, (i, 0, h.min(x.t)), 2 * h, buffer);
        x.gather_rows::<V, K, FMA>((gz, 0), 0..h, g_history);
    }))
}

/// A weight gradient `[kernel][ch]` and a bias gradient `[ch]`, partial or summed.
type Sums = (Vec<f32>, Vec<f32>);

fn add_sums((mut w, mut b): Sums, (w2, b2): Sums) -> Sums {
    w.iter_mut().zip(w2).for_each(|(a, v)| *a += v);
    b.iter_mut().zip(b2).for_each(|(a, v)| *a += v);
    (w, b)
}

impl ConvSiluBackend for Flex {
    fn conv1d_silu(
        x: FlexTensor,
        history: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
    ) -> FlexTensor {
        let (shape, dtype) = (x.shape(), x.dtype());
        let inputs = Inputs::read(&x, &history, &weight, &bias);
        let (t, ch) = (inputs.t, inputs.ch);
        let len = shape.num_elements();
        let mut y = Vec::with_capacity(len);
        if t > 0 && ch > 0 {
            let sequences = y.spare_capacity_mut()[..len].par_chunks_mut(t * ch);
            sequences.enumerate().for_each(|(i, seq)| {
                seq.par_chunks_mut(PIECE * ch)
                    .enumerate()
                    .for_each(|(p, out)| forward_piece(&inputs, i, p * PIECE, out));
            });
        }
        // SAFETY: the pieces above cover all `len` elements (none when t or ch is 0).
        unsafe { y.set_len(len) };
        FORWARD_CALLS.record();
        flex_from_f32(y, shape, dtype)
    }

    fn conv1d_silu_backward(
        x: FlexTensor,
        history: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let (x_shape, h_shape, dtype) = (x.shape(), history.shape(), x.dtype());
        let (w_shape, b_shape) = (weight.shape(), bias.shape());
        let inputs = Inputs::read(&x, &history, &weight, &bias);
        let grad = flex_f32(&grad);
        let (t, ch, kernel) = (inputs.t, inputs.ch, inputs.kernel);
        let h = kernel - 1;
        let len = x_shape.num_elements();
        let mut gx = Vec::with_capacity(len);
        let mut g_history = vec![0f32; h_shape.num_elements()];
        let zero = || (vec![0f32; kernel * ch], vec![0f32; ch]);
        // The pieces' partial sums are added in piece order, not as rayon's reduce would
        // (its order follows the work stealing), so every run gives the same bits.
        let (g_w, g_b) = if t > 0 && ch > 0 {
            let parts: Vec<Sums> = gx.spare_capacity_mut()[..len]
                .par_chunks_mut(t * ch)
                .enumerate()
                .flat_map(|(i, gx)| {
                    gx.par_chunks_mut(PIECE * ch)
                        .enumerate()
                        .map(move |(p, gx)| (i, p, gx))
                })
                .map(|(i, p, gx)| {
                    let piece = (i, p * PIECE);
                    GRAD_Z.with_borrow_mut(|b| backward_piece(&inputs, &grad, piece, (gx, b)))
                })
                .collect();
            parts.into_iter().fold(zero(), add_sums)
        } else {
            zero()
        };
        // SAFETY: the pieces above cover all `len` elements (none when t or ch is 0).
        unsafe { gx.set_len(len) };
        if t > 0 && h > 0 && ch > 0 && !inputs.history.is_empty() {
            // Every row written: a history row that no output step reads (t < h) gets 0s.
            g_history
                .par_chunks_mut(h * ch)
                .enumerate()
                .for_each(|(i, gh)| {
                    // SAFETY: f32s are written, never read uninitialised, through the view.
                    let gh = unsafe { &mut *(gh as *mut [f32] as *mut [MaybeUninit<f32>]) };
                    GRAD_Z.with_borrow_mut(|b| history_backward(&inputs, &grad, i, (gh, b)))
                });
        }
        (
            flex_from_f32(gx, x_shape, dtype),
            flex_from_f32(g_history, h_shape, dtype),
            flex_from_f32(g_w_to_weight(&g_w, ch, kernel), w_shape, dtype),
            flex_from_f32(g_b, b_shape, dtype),
        )
    }
}

/// `[kernel][ch]` back to the weight's `[ch, 1, kernel]`.
fn g_w_to_weight(g: &[f32], ch: usize, kernel: usize) -> Vec<f32> {
    let mut out = vec![0f32; ch * kernel];
    for c in 0..ch {
        for j in 0..kernel {
            out[c * kernel + j] = g[j * ch + c];
        }
    }
    out
}

#[derive(Debug)]
struct ConvSiluBackward;

impl<B: Backend + ConvSiluBackend> Backward<B, 4> for ConvSiluBackward {
    /// x, history, weight, bias: the output is recomputed from them.
    type State = [FloatTensor<B>; 4];

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [x, history, weight, bias] = ops.state;
        let (gx, gh, gw, gb) = B::conv1d_silu_backward(x, history, weight, bias, grad);
        register_gradients::<B, _>(
            grads,
            ops.parents.map(|p| p.map(|n| n.id)),
            [gx, gh, gw, gb],
        );
    }
}

impl<B: Backend + ConvSiluBackend, C: CheckpointStrategy> ConvSiluBackend for Autodiff<B, C> {
    fn conv1d_silu(
        x: FloatTensor<Self>,
        history: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), history.node(), weight.node(), bias.node()];
        let inputs = [x, history, weight, bias].map(|t| t.into_primitive());
        let [x, history, weight, bias] = inputs.clone();
        let y = B::conv1d_silu(x, history, weight, bias);
        match ConvSiluBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(inputs, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn conv1d_silu_backward(
        _x: FloatTensor<Self>,
        _history: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unreachable!(
            "the conv's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::causal_conv1d::CausalConv1d;
    use super::*;
    use burn::tensor::Distribution;

    /// The fused conv + SiLU equals the reference, output and the gradients of x, history,
    /// weight and bias: across a piece boundary, with fewer steps than the history, and
    /// with channels in a [`QUAD`] and past it; from a given history and from none (zeros,
    /// which the fused conv takes as `[b, 0, ch]`).
    #[test]
    fn fused_conv_silu_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let shapes = [
            (3, PIECE + 37, 13, 4),
            (2, 2, 5, 4),
            (2, 9, 6, 1),
            (2, 7, QUAD + 5, 4),
            // Every kernel width the fused conv takes, more channels than one block.
            (2, 11, 19, 3),
            (2, 5, 33, 2),
        ];
        for (b, t, ch, kernel) in shapes {
            let normal = |shape: [usize; 3]| {
                Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.5), &device).require_grad()
            };
            let x = normal([b, t, ch]);
            let history = normal([b, kernel - 1, ch]);
            let mut conv = CausalConv1d::new(ch, kernel, &device);
            let bias = Tensor::<1>::random([ch], Distribution::Normal(0.0, 0.5), &device);
            conv.bias = burn::module::Param::from_tensor(bias);
            let probe = Tensor::<3>::random([b, t, ch], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool, given: bool| {
                let start = given.then(|| history.clone());
                let y = if fused {
                    conv.forward_silu(x.clone(), start)
                } else {
                    crate::activations::silu(conv.forward(x.clone(), start))
                };
                let g = (y.clone() * probe.clone()).sum().backward();
                let v = |t: Tensor<3>| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap()
                };
                let v1 = |t: Tensor<1>| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap()
                };
                [
                    v(y),
                    v(x.grad(&g).unwrap()),
                    // An empty history (kernel 1), or none given, has no gradient.
                    match given {
                        true => history.grad(&g).map(v).unwrap_or_default(),
                        false => Vec::new(),
                    },
                    v(conv.weight.grad(&g).unwrap()),
                    v1(conv.bias.grad(&g).unwrap()),
                ]
            };
            for given in [true, false] {
                let calls = FORWARD_CALLS.get();
                let fused = run(true, given);
                assert!(FORWARD_CALLS.get() > calls, "the extension ran");
                let reference = run(false, given);
                let names = ["output", "dx", "dhistory", "dweight", "dbias"];
                for ((name, a), r) in names.iter().zip(&fused).zip(&reference) {
                    let err = crate::testing::max_relative_difference(a, r);
                    // The weight's and bias's gradients are sums over all b·t positions, added
                    // in another order than the reference's: 1.7e-5 was seen at 879 of them.
                    let tolerance = if name.starts_with("dw") || name.starts_with("db") {
                        1e-4
                    } else {
                        1e-5
                    };
                    assert!(
                        err < tolerance,
                        "{b}×{t}×{ch} k={kernel} history given {given}: {name}: {err:e}"
                    );
                }
            }
        }
    }
}

//! Mamba's selective scan, fused, as a Burn backend extension on flex: for each sequence
//! and channel d, `h_t = exp(Δ_t[d]·A[d]) ⊙ h_(t−1) + Δ_t[d]·u_t[d]·B_t`,
//! `y_t[d] = C_t · h_t`, with each task's states (a block of channels × `d_state`) kept
//! in cache and never written out — as mamba_ssm's CUDA kernel keeps them in registers.
//! The backward pass recomputes the states a segment at a time (a buffer in cache) and runs
//! the adjoint recurrence back in time. Its tasks write their pieces of the outputs in
//! place (`Output`).
//!
//! The reference forms are [`super::ssm::scan_sequential`] (a loop of tensor ops) and
//! [`super::ssm::scan_chunked`]; the tests hold this one equal to them, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;

use std::borrow::Cow;

use crate::device::{RunCount, flex_f32, flex_from_f32};
use crate::vector_math::{dot_fma, exp_nonpositive_fma, has_fma, mul_add};

#[backend_extension(Flex, Autodiff)]
pub trait SelectiveScanBackend: Backend {
    /// Δ, u `[b, T, D]`, A `[D, N]`, B, C `[b, T, N]`, h0 `[b, D, N]` → y `[b, T, D]` and the
    /// final state `[b, D, N]`.
    fn selective_scan(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of [`Self::selective_scan`]'s inputs (Δ, u, A, B, C, h0) given those of
    /// its outputs (`gy` `[b, T, D]`, `gh` `[b, D, N]`).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn selective_scan_backward(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        gy: FloatTensor<Self>,
        gh: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// Fused scans run in this process (for tests that check a form took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// The fused scan: y `[b, T, D]` and the final state `[b, D, N]`. Registered for flex
/// and its autodiff ([`crate::device::is_flex`]).
pub fn selective_scan(
    delta: Tensor<3>,
    u: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<3>,
    c: Tensor<3>,
    h0: Tensor<3>,
) -> (Tensor<3>, Tensor<3>) {
    let (y, h) = <burn::backend::Dispatch as SelectiveScanBackend>::selective_scan(
        delta.into_dispatch(),
        u.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        h0.into_dispatch(),
    );
    (Tensor::from_dispatch(y), Tensor::from_dispatch(h))
}

/// Channels per parallel task (one sequence's block of channels): the widest of these that
/// still leaves [`MIN_TASKS`] tasks. Wider blocks share each step's sums over channels (dB,
/// dC) among more channels: 128 against 32 cut the backward by a fifth at batch 12.
const BLOCK_WIDTHS: [usize; 3] = [128, 64, 32];

/// Tasks enough to keep every core busy on the machines metamix trains on. The width
/// depends on the shape alone, so results do not depend on the thread count.
const MIN_TASKS: usize = 16;

/// Steps per segment of the backward's recompute: the states of one segment at a time stay
/// in cache (all T of them, 33 MB per task at 16k tokens, would not).
pub const SEGMENT: usize = 256;

/// The sizes of a scan.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    d: usize,
    n: usize,
}

impl Dims {
    fn of(delta: &FlexTensor, a: &FlexTensor) -> Self {
        let (s, sa) = (delta.shape(), a.shape());
        Self {
            b: s[0],
            t: s[1],
            d: s[2],
            n: sa[1],
        }
    }

    /// (sequence, first channel, channels) of every task.
    fn tasks(self) -> Vec<Task> {
        let width = BLOCK_WIDTHS
            .into_iter()
            .find(|w| self.b * self.d.div_ceil(*w) >= MIN_TASKS)
            .unwrap_or(BLOCK_WIDTHS[2]);
        let blocks = self.d.div_ceil(width);
        (0..self.b * blocks)
            .map(|i| {
                let d0 = (i % blocks) * width;
                (i / blocks, d0, width.min(self.d - d0))
            })
            .collect()
    }
}

/// The inputs as f32 slices (borrowed from the tensors where they are contiguous f32).
struct Inputs<'a> {
    delta: Cow<'a, [f32]>,
    u: Cow<'a, [f32]>,
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    c: Cow<'a, [f32]>,
    h0: Cow<'a, [f32]>,
}

impl<'a> Inputs<'a> {
    /// Δ, u, A, B, C, h0 as f32.
    fn read(tensors: &'a [FlexTensor; 6]) -> Self {
        let [delta, u, a, b, c, h0] = tensors.each_ref().map(flex_f32);
        Self {
            delta,
            u,
            a,
            b,
            c,
            h0,
        }
    }
}

/// One task's view: sequence `i`, channels `d0..d0 + w`. Its state is laid out `[n][w]`
/// (channel fastest), so every loop over the block's channels is element-wise and
/// vectorises; A and the start state are transposed to match.
struct Block<'a> {
    x: &'a Inputs<'a>,
    dims: Dims,
    i: usize,
    d0: usize,
    w: usize,
    /// A `[n][w]`.
    a: Vec<f32>,
    /// Whether every channel's A is one number across its state (Mamba-2's scalar A per
    /// head, broadcast): then each step's decay is one exp per channel, not `n`.
    shared_decay: bool,
}

impl<'a> Block<'a> {
    fn new(x: &'a Inputs<'a>, dims: Dims, (i, d0, w): (usize, usize, usize)) -> Self {
        let n = dims.n;
        let mut a = vec![0f32; n * w];
        for j in 0..w {
            for k in 0..n {
                a[k * w + j] = x.a[(d0 + j) * n + k];
            }
        }
        let shared_decay = (1..n).all(|k| a[k * w..(k + 1) * w] == a[..w]);
        Self {
            x,
            dims,
            i,
            d0,
            w,
            a,
            shared_decay,
        }
    }

    /// This block's rows of a `[b][d][n]` tensor (h0, the final state's gradient) as `[n][w]`.
    fn state_from(&self, rows: &[f32]) -> Vec<f32> {
        let (n, w, dd) = (self.dims.n, self.w, self.dims.d);
        let mut h = vec![0f32; n * w];
        for j in 0..w {
            for k in 0..n {
                h[k * w + j] = rows[(self.i * dd + self.d0 + j) * n + k];
            }
        }
        h
    }

    /// `[n][w]` back to this block's `[w][n]` rows.
    fn state_to(&self, h: &[f32]) -> Vec<f32> {
        let (n, w) = (self.dims.n, self.w);
        let mut rows = vec![0f32; w * n];
        for j in 0..w {
            for k in 0..n {
                rows[j * n + k] = h[k * w + j];
            }
        }
        rows
    }

    /// Where this block's channels of `step` start in a `[b, t, d]` tensor.
    #[inline(always)]
    fn row(&self, step: usize) -> usize {
        (self.i * self.dims.t + step) * self.dims.d + self.d0
    }

    /// Δ and u of this block at `step`.
    #[inline(always)]
    fn at(&self, step: usize) -> (&'a [f32], &'a [f32]) {
        let at = self.row(step);
        (&self.x.delta[at..at + self.w], &self.x.u[at..at + self.w])
    }

    /// B and C at `step`, `[n]` each.
    #[inline(always)]
    fn bc(&self, step: usize) -> (&'a [f32], &'a [f32]) {
        let (n, row) = (self.dims.n, self.i * self.dims.t + step);
        (
            &self.x.b[row * n..(row + 1) * n],
            &self.x.c[row * n..(row + 1) * n],
        )
    }

    /// One step from state `h` `[n][w]` in place. `Y`: adds `C_t · h_t` to `y` `[w]`.
    /// `DECAYS`: writes the step's decays `[n][w]` for the backward (only row 0 under a
    /// shared decay, which is every row's). `FMA`: see [`mul_add`].
    #[inline(always)]
    fn step<const FMA: bool, const DECAYS: bool, const Y: bool>(
        &self,
        step: usize,
        h: &mut [f32],
        decay: &mut [f32],
        y: &mut [f32],
    ) {
        let w = self.w;
        let (dl, u) = self.at(step);
        let (b, c) = self.bc(step);
        let mut dlu = [0f32; BLOCK_WIDTHS[0]];
        let dlu = &mut dlu[..w];
        for j in 0..w {
            dlu[j] = dl[j] * u[j];
        }
        for k in 0..self.dims.n {
            let (hk, bk) = (&mut h[k * w..(k + 1) * w], b[k]);
            let a = &self.a[k * w..(k + 1) * w];
            if self.shared_decay && k > 0 {
                decay_row::<FMA, false, false>(hk, &mut decay[..w], (a, dl, dlu), bk);
            } else if DECAYS || self.shared_decay {
                decay_row::<FMA, true, true>(hk, &mut decay[k * w..(k + 1) * w], (a, dl, dlu), bk);
            } else {
                decay_row::<FMA, true, false>(hk, &mut decay[..w], (a, dl, dlu), bk);
            }
            if Y {
                let (y, ck) = (&mut y[..w], c[k]);
                for j in 0..w {
                    y[j] = mul_add::<FMA>(ck, hk[j], y[j]);
                }
            }
        }
    }
}

/// One state row of a step, `h ← e ⊙ h + Δ·u·B[k]` over the block's channels, with
/// `e = exp(Δ·A[k])` computed (`EXP`, and written to `decay` if `KEEP`) or read from `decay`
/// (a shared decay's row 0). One loop per case, so each vectorises without a branch.
#[inline(always)]
fn decay_row<const FMA: bool, const EXP: bool, const KEEP: bool>(
    h: &mut [f32],
    decay: &mut [f32],
    (a, dl, dlu): (&[f32], &[f32], &[f32]),
    b: f32,
) {
    let w = h.len();
    let (decay, a, dl, dlu) = (&mut decay[..w], &a[..w], &dl[..w], &dlu[..w]);
    for j in 0..w {
        let e = if EXP {
            exp_nonpositive_fma::<FMA>(dl[j] * a[j])
        } else {
            decay[j]
        };
        if KEEP {
            decay[j] = e;
        }
        h[j] = mul_add::<FMA>(e, h[j], dlu[j] * b);
    }
}

/// One task's forward: its block's y `[t, w]` and final states `[w, n]`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_task(x: &Inputs, dims: Dims, task: Task, (y_out, h_out): (Output, Output)) {
    const FMA: bool = has_fma!();
    let (t, n) = (dims.t, dims.n);
    let blk = Block::new(x, dims, task);
    let w = blk.w;
    let mut h = blk.state_from(&x.h0);
    let mut decay = vec![0f32; n * w];
    let mut y_t = vec![0f32; w];
    for step in 0..t {
        y_t.fill(0.0);
        blk.step::<FMA, false, true>(step, &mut h, &mut decay, &mut y_t);
        // SAFETY: this task's channels of this step's row.
        unsafe { y_out.write(blk.row(step), &y_t) };
    }
    // SAFETY: this task's rows of the final state.
    unsafe { h_out.write((task.0 * dims.d + task.1) * n, &blk.state_to(&h)) };
}

/// One task's backward: dΔ, du and dh0 written to its block of `outputs`; dA `[w, n]`
/// (this sequence's share), dB and dC `[t, n]` (this block's share) returned.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_task(
    x: &Inputs,
    dims: Dims,
    task: Task,
    (gy, gh): (&[f32], &[f32]),
    scratch: &mut Scratch,
    [d_delta, d_u, d_h0]: [Output; 3],
) -> BackwardPart {
    const FMA: bool = has_fma!();
    let (t, dd, n) = (dims.t, dims.d, dims.n);
    let blk = Block::new(x, dims, task);
    let w = blk.w;
    let nw = n * w;
    // The state entering each segment of SEGMENT steps: one pass over all but the last.
    let segments = t.div_ceil(SEGMENT).max(1);
    let mut entering = vec![0f32; segments * nw];
    let mut h = blk.state_from(&x.h0);
    entering[..nw].copy_from_slice(&h);
    let mut decay = vec![0f32; nw];
    // One segment's states h_(start−1) .. h_(end−1) and decays, recomputed from its entering
    // state: a buffer that stays in cache, where all T states would not at long lengths.
    // Every element is written before it is read, so the buffers are reused across tasks.
    let (states, decays) = scratch.buffers((SEGMENT.min(t) + 1) * nw, SEGMENT.min(t) * nw);
    for step in 0..(segments - 1) * SEGMENT {
        blk.step::<FMA, false, false>(step, &mut h, &mut decay, &mut []);
        if (step + 1) % SEGMENT == 0 {
            let s = (step + 1) / SEGMENT;
            entering[s * nw..(s + 1) * nw].copy_from_slice(&h);
        }
    }
    // λ = ∂L/∂h_t, from the final state's gradient back in time.
    let mut lambda = blk.state_from(gh);
    let (mut gd, mut gu) = (vec![0f32; w], vec![0f32; w]);
    let mut g_a = vec![0f32; nw];
    let (mut g_b, mut g_c) = (vec![0f32; t * n], vec![0f32; t * n]);
    let mut dlu = vec![0f32; w];
    // Σ_k λ_k·A_k·e_k·h_(t−1),k and Σ_k λ_k·B_k per channel: dΔ and du follow from them.
    let (mut via_decay, mut via_input) = (vec![0f32; w], vec![0f32; w]);
    for segment in (0..segments).rev() {
        let (start, end) = (segment * SEGMENT, ((segment + 1) * SEGMENT).min(t));
        states[..nw].copy_from_slice(&entering[segment * nw..(segment + 1) * nw]);
        for i in 0..end - start {
            let (done, next) = states.split_at_mut((i + 1) * nw);
            next[..nw].copy_from_slice(&done[i * nw..]);
            let decay = &mut decays[i * nw..(i + 1) * nw];
            blk.step::<FMA, true, false>(start + i, &mut next[..nw], decay, &mut []);
        }
        for step in (start..end).rev() {
            let i = step - start;
            let (dl, u) = blk.at(step);
            let (b, c) = blk.bc(step);
            let at = (task.0 * t + step) * dd + task.1;
            let gy = &gy[at..at + w];
            for j in 0..w {
                dlu[j] = dl[j] * u[j];
            }
            let e_t = &decays[i * nw..(i + 1) * nw];
            let h_prev_t = &states[i * nw..(i + 1) * nw];
            let h_t = &states[(i + 1) * nw..(i + 2) * nw];
            via_decay.fill(0.0);
            via_input.fill(0.0);
            for k in 0..n {
                let r = k * w..(k + 1) * w;
                let lam = &mut lambda[r.clone()];
                // A shared decay is kept in row 0 only.
                let e = if blk.shared_decay {
                    &e_t[..w]
                } else {
                    &e_t[r.clone()]
                };
                let (h_prev, h) = (&h_prev_t[r.clone()], &h_t[r.clone()]);
                let (a, ga) = (&blk.a[r.clone()], &mut g_a[r]);
                // y_t = C_t · h_t
                g_c[step * n + k] = dot_fma::<FMA>(gy, h);
                for j in 0..w {
                    lam[j] = mul_add::<FMA>(gy[j], c[k], lam[j]);
                }
                // h_t = e ⊙ h_(t−1) + Δ·u·B_t, e = exp(Δ·A)
                g_b[step * n + k] = dot_fma::<FMA>(lam, &dlu);
                let sums = (&mut via_decay[..], &mut via_input[..]);
                adjoint_step::<FMA>(lam, ga, sums, (e, h_prev, a, dl), b[k]);
            }
            let (vd, vi) = (&via_decay[..w], &via_input[..w]);
            for j in 0..w {
                gd[j] = mul_add::<FMA>(vi[j], u[j], vd[j]);
                gu[j] = vi[j] * dl[j];
            }
            // SAFETY: this task's channels of this step's row.
            unsafe {
                d_delta.write(blk.row(step), &gd);
                d_u.write(blk.row(step), &gu);
            }
        }
    }
    // SAFETY: this task's rows of the start state.
    unsafe { d_h0.write((task.0 * dd + task.1) * n, &blk.state_to(&lambda)) };
    (task.0, task.1, w, blk.state_to(&g_a), g_b, g_c)
}

/// One state row's part of a backward step (row k of a block, `w` channels): the
/// gradients through `h_t = e ⊙ h_(t−1) + Δ·u·B_t[k]` given λ = ∂L/∂h_t, which becomes
/// ∂L/∂h_(t−1). A function of its own so that its slices are known not to overlap: inline,
/// with five written and read arrays, LLVM gave up proving it and left the loop scalar.
#[inline(always)]
fn adjoint_step<const FMA: bool>(
    lam: &mut [f32],
    g_a: &mut [f32],
    (via_decay, via_input): (&mut [f32], &mut [f32]),
    (e, h_prev, a, delta): (&[f32], &[f32], &[f32], &[f32]),
    b: f32,
) {
    let w = lam.len();
    let (g_a, via_decay, via_input) = (&mut g_a[..w], &mut via_decay[..w], &mut via_input[..w]);
    let (e, h_prev, a, delta) = (&e[..w], &h_prev[..w], &a[..w], &delta[..w]);
    for j in 0..w {
        let back = lam[j] * e[j] * h_prev[j];
        via_decay[j] = mul_add::<FMA>(back, a[j], via_decay[j]);
        via_input[j] = mul_add::<FMA>(lam[j], b, via_input[j]);
        g_a[j] = mul_add::<FMA>(back, delta[j], g_a[j]);
        lam[j] *= e[j];
    }
}

/// A task's sequence, first channel and width.
type Task = (usize, usize, usize);

/// Buffers the backward reuses from task to task on one thread (zeroing fresh ones for each
/// of a layer's ~100 tasks was about 3% of a Mamba layer's time).
#[derive(Default)]
struct Scratch {
    states: Vec<f32>,
    decays: Vec<f32>,
}

impl Scratch {
    /// The states and decays buffers, at least `states` and `decays` long.
    fn buffers(&mut self, states: usize, decays: usize) -> (&mut [f32], &mut [f32]) {
        if self.states.len() < states {
            self.states.resize(states, 0.0);
        }
        if self.decays.len() < decays {
            self.decays.resize(decays, 0.0);
        }
        (&mut self.states[..states], &mut self.decays[..decays])
    }
}

/// [`backward_task`]'s shares of the sums: sequence, first channel, width, dA, dB, dC.
type BackwardPart = (usize, usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// An output that the tasks write in disjoint pieces, in parallel, allocated but not zeroed:
/// each task writes its own channels of each step's row (and its rows of a state), and
/// together they write every element once. Writing from the tasks, where each step's piece
/// is still in cache, replaced a serial pass that copied every task's result into place
/// after all had run, and the zero fills of both.
#[derive(Clone, Copy)]
struct Output(*mut f32);

// SAFETY: tasks write disjoint elements (see `write`), and the buffer outlives them.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// `len` values' worth of room, and the handle the tasks write through.
    fn alloc(len: usize) -> (Vec<f32>, Self) {
        let mut values = Vec::with_capacity(len);
        let out = Self(values.as_mut_ptr());
        (values, out)
    }

    /// Writes `values` at element `at` on.
    ///
    /// # Safety
    /// Inside the buffer, and no other task writes those elements.
    unsafe fn write(self, at: usize, values: &[f32]) {
        // SAFETY: as the caller promises.
        unsafe {
            self.0
                .add(at)
                .copy_from_nonoverlapping(values.as_ptr(), values.len())
        }
    }

    /// The buffer, once every element has been written.
    ///
    /// # Safety
    /// Every one of `len` elements was written.
    unsafe fn finish(mut values: Vec<f32>, len: usize) -> Vec<f32> {
        // SAFETY: as the caller promises.
        unsafe { values.set_len(len) };
        values
    }
}

impl SelectiveScanBackend for Flex {
    fn selective_scan(
        delta: FlexTensor,
        u: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        h0: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (dims, dtype) = (Dims::of(&delta, &a), delta.dtype());
        let tensors = [delta, u, a, b, c, h0];
        let x = Inputs::read(&tensors);
        let Dims { b: nb, t, d: dd, n } = dims;
        let ((y, y_out), (h_last, h_out)) =
            (Output::alloc(nb * t * dd), Output::alloc(nb * dd * n));
        dims.tasks()
            .into_par_iter()
            .for_each(|task| forward_task(&x, dims, task, (y_out, h_out)));
        // SAFETY: the tasks cover every sequence and channel: every step's row and state.
        let (y, h_last) = unsafe {
            (
                Output::finish(y, nb * t * dd),
                Output::finish(h_last, nb * dd * n),
            )
        };
        FORWARD_CALLS.record();
        (
            flex_from_f32(y, [nb, t, dd], dtype),
            flex_from_f32(h_last, [nb, dd, n], dtype),
        )
    }

    fn selective_scan_backward(
        delta: FlexTensor,
        u: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        h0: FlexTensor,
        gy: FlexTensor,
        gh: FlexTensor,
    ) -> (
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
    ) {
        let (dims, dtype) = (Dims::of(&delta, &a), delta.dtype());
        let tensors = [delta, u, a, b, c, h0];
        let x = Inputs::read(&tensors);
        let (gy, gh) = (flex_f32(&gy), flex_f32(&gh));
        let Dims { b: nb, t, d: dd, n } = dims;
        let (g_delta, d_delta) = Output::alloc(nb * t * dd);
        let (g_u, d_u) = Output::alloc(nb * t * dd);
        let (g_h0, d_h0) = Output::alloc(nb * dd * n);
        let parts: Vec<_> = dims
            .tasks()
            .into_par_iter()
            .map_init(Scratch::default, |scratch, task| {
                let outputs = [d_delta, d_u, d_h0];
                backward_task(&x, dims, task, (&gy, &gh), scratch, outputs)
            })
            .collect();
        // SAFETY: the tasks cover every sequence and channel: every step's row and state.
        let (g_delta, g_u, g_h0) = unsafe {
            let rows = nb * t * dd;
            let states = nb * dd * n;
            (
                Output::finish(g_delta, rows),
                Output::finish(g_u, rows),
                Output::finish(g_h0, states),
            )
        };
        let mut g_a = vec![0f32; dd * n];
        let mut g_b = vec![0f32; nb * t * n];
        let mut g_c = vec![0f32; nb * t * n];
        for (i, d0, w, pa, pb, pc) in parts {
            for (acc, v) in g_a[d0 * n..(d0 + w) * n].iter_mut().zip(pa) {
                *acc += v;
            }
            for (acc, v) in g_b[i * t * n..(i + 1) * t * n].iter_mut().zip(pb) {
                *acc += v;
            }
            for (acc, v) in g_c[i * t * n..(i + 1) * t * n].iter_mut().zip(pc) {
                *acc += v;
            }
        }
        (
            flex_from_f32(g_delta, [nb, t, dd], dtype),
            flex_from_f32(g_u, [nb, t, dd], dtype),
            flex_from_f32(g_a, [dd, n], dtype),
            flex_from_f32(g_b, [nb, t, n], dtype),
            flex_from_f32(g_c, [nb, t, n], dtype),
            flex_from_f32(g_h0, [nb, dd, n], dtype),
        )
    }
}

/// What the backward pass keeps: the inputs (the states are recomputed).
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    inputs: [FloatTensor<B>; 6],
    /// The final state's shape, for a zero gradient when only y is used.
    h_shape: burn::tensor::Shape,
}

#[derive(Debug)]
struct ScanBackward;

impl<B: Backend + SelectiveScanBackend> Backward<B, 6> for ScanBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let packed = grads.consume::<B>(&ops.node);
        let Saved { inputs, h_shape } = ops.state;
        let [delta, u, a, b, c, h0] = inputs;
        // The output is y and the final state side by side (see the Autodiff forward).
        let (gy, gh) = unpack::<B>(packed, delta.shape(), h_shape);
        let (gd, gu, ga, gb, gc, gh0) = B::selective_scan_backward(delta, u, a, b, c, h0, gy, gh);
        for (node, g) in ops.parents.into_iter().zip([gd, gu, ga, gb, gc, gh0]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// One tracked output for autodiff: y `[b, T, D]` flattened, then the final state flattened,
/// `[b, T·D + D·N]`.
fn pack<B: Backend>(y: FloatTensor<B>, h: FloatTensor<B>) -> FloatTensor<B> {
    let (sy, sh) = (y.shape(), h.shape());
    let bsz = sy[0];
    B::float_cat(
        vec![
            B::float_reshape(y, [bsz, sy[1] * sy[2]].into()),
            B::float_reshape(h, [bsz, sh[1] * sh[2]].into()),
        ],
        1,
    )
}

/// y and the final state back out of [`pack`]'s output.
fn unpack<B: Backend>(
    packed: FloatTensor<B>,
    y_shape: burn::tensor::Shape,
    h_shape: burn::tensor::Shape,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let bsz = y_shape[0];
    let (ty, th) = (y_shape[1] * y_shape[2], h_shape[1] * h_shape[2]);
    let range = |a: usize, b: usize| burn::backend::Slice::new(a as isize, Some(b as isize), 1);
    let y = B::float_slice(packed.clone(), &[range(0, bsz), range(0, ty)]);
    let h = B::float_slice(packed, &[range(0, bsz), range(ty, ty + th)]);
    (B::float_reshape(y, y_shape), B::float_reshape(h, h_shape))
}

impl<B: Backend + SelectiveScanBackend, C: CheckpointStrategy> SelectiveScanBackend
    for Autodiff<B, C>
{
    fn selective_scan(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [
            delta.node(),
            u.node(),
            a.node(),
            b.node(),
            c.node(),
            h0.node(),
        ];
        let inputs = [delta, u, a, b, c, h0].map(|x| x.into_primitive());
        let [d, u, a, b, c, h0] = inputs.clone();
        let (y, h) = B::selective_scan(d.clone(), u, a, b, c, h0);
        let (y_shape, h_shape) = (y.shape(), h.shape());
        let packed = pack::<B>(y, h);
        // Autodiff tracks one output; y and h are cut from it, so both carry gradients.
        let packed = match ScanBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                Saved {
                    inputs,
                    h_shape: h_shape.clone(),
                },
                packed,
            ),
            OpsKind::UnTracked(prep) => prep.finish(packed),
        };
        unpack::<Self>(packed, y_shape, h_shape)
    }

    fn selective_scan_backward(
        _delta: FloatTensor<Self>,
        _u: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _b: FloatTensor<Self>,
        _c: FloatTensor<Self>,
        _h0: FloatTensor<Self>,
        _gy: FloatTensor<Self>,
        _gh: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unreachable!(
            "the scan's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

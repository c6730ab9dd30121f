//! Mamba's selective scan, fused, as a Burn backend extension on flex: for each sequence
//! and channel d, `h_t = exp(Δ_t[d]·A[d]) ⊙ h_(t−1) + Δ_t[d]·u_t[d]·B_t`,
//! `y_t[d] = C_t · h_t`. Each chunk of 16 channels runs through time with its states in
//! registers (a group of state rows at a time, [`F32x16`] lanes) and never writes them out,
//! as mamba_ssm's CUDA kernel keeps a channel's in a thread's registers. The backward
//! recomputes the states a segment at a time (a buffer in cache) and runs the adjoint
//! recurrence back in time, λ in registers. Both gather a segment's per-step inputs of a
//! chunk once ([`Steps`]) and walk them with iterators, and take a decay as
//! `2^(Δ·A log₂e)`, the cheaper exponential. Its tasks write their pieces of the outputs in
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

use crate::device::{RunCount, SendPtr, flex_f32, flex_from_f32, register_gradients};
use crate::f32x16::{F32x16, prefetch, with_const, with_f32x16};
use crate::vector_math::add_lanes;

#[backend_extension(Flex, Autodiff)]
pub trait SelectiveScanBackend: Backend {
    /// Δ `[b, T, D]` (or `[b, T, H]`: see [`Dims::heads`]), u `[b, T, D]`, A `[D, N]` (or
    /// `[D, 1]`: see [`Dims::shared`]), B, C `[b, T, N]`, h0 `[b, D, N]` (or, zeros, `[b, D,
    /// 0]`: see [`no_state`]), the skip D `[D]` → y `[b, T, D]` (`C·h + D·u`) and the final
    /// state `[b, D, N]`.
    fn selective_scan(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`Self::selective_scan`]'s y alone: where the final state is not wanted, autodiff
    /// tracks y by itself instead of y and the state packed into one output (whose slices'
    /// gradients are each a zero-filled copy of the whole).
    fn selective_scan_output(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradients of [`Self::selective_scan`]'s inputs (Δ, u, A, B, C, h0, D) given those
    /// of its outputs (`gy` `[b, T, D]`, `gh` `[b, D, N]` or, zeros, `[b, D, 0]`); h0's
    /// `[b, D, 0]` where h0 is.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn selective_scan_backward(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d: FloatTensor<Self>,
        gy: FloatTensor<Self>,
        gh: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
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

/// The fused scan: y `[b, T, D]` and the final state `[b, D, N]`; y gets the skip
/// `D·u` where `skip` (`[D]`) is given (Mamba-2's; mamba_ssm's kernel takes it too), which
/// saves the separate products and sums of `y + D·u` and their backwards. Δ is `[b, T, D]`
/// or, one per head of consecutive channels, `[b, T, H]`; A `[D, N]` or, shared by the state
/// rows, `[D, 1]` (Mamba-2's both). Registered for flex and its autodiff
/// ([`crate::device::is_flex`]).
pub fn selective_scan(
    delta: Tensor<3>,
    u: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<3>,
    c: Tensor<3>,
    (h0, skip): (Option<Tensor<3>>, Option<Tensor<1>>),
) -> (Tensor<3>, Tensor<3>) {
    let skip = skip_or_zeros(skip, &u);
    let h0 = h0.unwrap_or_else(|| no_state(&u));
    let (y, h) = <burn::backend::Dispatch as SelectiveScanBackend>::selective_scan(
        delta.into_dispatch(),
        u.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        h0.into_dispatch(),
        skip.into_dispatch(),
    );
    (Tensor::from_dispatch(y), Tensor::from_dispatch(h))
}

/// [`selective_scan`]'s y `[b, T, D]` alone, for callers that drop the final state.
pub fn selective_scan_output(
    delta: Tensor<3>,
    u: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<3>,
    c: Tensor<3>,
    (h0, skip): (Option<Tensor<3>>, Option<Tensor<1>>),
) -> Tensor<3> {
    let skip = skip_or_zeros(skip, &u);
    let h0 = h0.unwrap_or_else(|| no_state(&u));
    Tensor::from_dispatch(
        <burn::backend::Dispatch as SelectiveScanBackend>::selective_scan_output(
            delta.into_dispatch(),
            u.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            c.into_dispatch(),
            h0.into_dispatch(),
            skip.into_dispatch(),
        ),
    )
}

/// A state of zeros for a scan over `u` `[b, T, D]`, as `[b, D, 0]`: no buffer to fill
/// and read back, and no gradient of it to write (a fresh scan's state is no parameter).
fn no_state(u: &Tensor<3>) -> Tensor<3> {
    let [b, _, d] = u.dims();
    Tensor::zeros([b, d, 0], &u.device())
}

/// The skip D, zeros `[D]` (no skip) where not given: the kernel's one extra multiply-add
/// per step and chunk then adds nothing.
fn skip_or_zeros(skip: Option<Tensor<1>>, u: &Tensor<3>) -> Tensor<1> {
    skip.unwrap_or_else(|| Tensor::zeros([u.dims()[2]], &u.device()))
}

/// Channels per parallel task (one sequence's block of channels): the widest of these that
/// still leaves [`MIN_TASKS`] tasks. Wider blocks share each step's sums over channels (dB,
/// dC), and their reduction across lanes, among more channels: 128 against 32 cut the
/// backward by a fifth at batch 12, and 256 against 128 by 6% more.
const BLOCK_WIDTHS: [usize; 4] = [256, 128, 64, 32];

/// Tasks enough to keep every core busy on the machines metamix trains on. The width
/// depends on the shape alone, so results do not depend on the thread count. (Fewer, wider
/// tasks lose nothing where each core would take the same number of narrow ones: 12 on 16
/// cores end as soon as 24 of half the width would.)
const MIN_TASKS: usize = 12;

/// Steps per segment of the backward's recompute: one segment's states of a group (32 KB)
/// and its dB, dC terms stay in cache, where all T steps' would not. (32 was slower.)
pub const SEGMENT: usize = 64;

/// The sizes of a scan.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    d: usize,
    n: usize,
    /// Whether A is `[D, 1]`, one number per channel shared by its state rows (Mamba-2's
    /// scalar A per head): a step's decay is then one exp per channel, not one per row, the
    /// backward sums `λ ⊙ h` over rows before it multiplies by the decay, and dA is `[D, 1]`.
    shared: bool,
    /// Δ's last size: `d`, one Δ per channel (Mamba's), or H dividing `d`, one per head of
    /// `d / H` consecutive channels (Mamba-2's), read as such: no `[b, T, D]` copy of it,
    /// and its gradient summed over each head's channels inside the backward.
    heads: usize,
}

impl Dims {
    fn of(delta: &FlexTensor, u: &FlexTensor, a: &FlexTensor, b: &FlexTensor) -> Self {
        let (s, heads) = (u.shape(), delta.shape()[2]);
        assert!(
            heads > 0 && s[2] % heads == 0,
            "the scan's Δ has {heads} columns, which do not divide its {} channels",
            s[2]
        );
        let n = b.shape()[2];
        Self {
            b: s[0],
            t: s[1],
            d: s[2],
            n,
            shared: a.shape()[1] == 1 && n > 1,
            heads,
        }
    }

    /// Channels per Δ (1: one per channel).
    fn head_dim(self) -> usize {
        self.d / self.heads
    }

    /// A's columns: 1 where [`Self::shared`], else `n`.
    fn a_cols(self) -> usize {
        if self.shared { 1 } else { self.n }
    }

    /// (sequence, first channel, channels) of every task.
    fn tasks(self) -> Vec<Task> {
        let width = BLOCK_WIDTHS
            .into_iter()
            .find(|w| self.b * self.d.div_ceil(*w) >= MIN_TASKS)
            .unwrap_or(BLOCK_WIDTHS[3]);
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
    /// A·log₂e as lanes, `[D / 16][a_cols]` (see [`Chunk::a_rows`]): laid out once for all
    /// tasks, where each chunk of every sequence's task gathered its channels' values.
    a_lanes: Vec<Lanes>,
    b: Cow<'a, [f32]>,
    c: Cow<'a, [f32]>,
    h0: Cow<'a, [f32]>,
    skip: Cow<'a, [f32]>,
}

impl<'a> Inputs<'a> {
    /// Δ, u, A, B, C, h0, D as f32.
    fn read(tensors: &'a [FlexTensor; 7], dims: Dims) -> Self {
        let [delta, u, a, b, c, h0, skip] = tensors.each_ref().map(flex_f32);
        let cols = dims.a_cols();
        let mut a_lanes = vec![[0f32; LANES]; dims.d.div_ceil(LANES) * cols];
        for (channel, row) in a.chunks_exact(cols).enumerate() {
            for (k, v) in row.iter().enumerate() {
                a_lanes[channel / LANES * cols + k][channel % LANES] = v * std::f32::consts::LOG2_E;
            }
        }
        Self {
            delta,
            u,
            a_lanes,
            b,
            c,
            h0,
            skip,
        }
    }
}

/// Channels whose states run through time together, a chunk: one AVX-512 register of f32
/// (two AVX2 ones). A chunk keeps a group of its state rows in registers for the whole
/// scan, as mamba_ssm's CUDA kernel keeps a channel's state in a thread's registers, where
/// a `[n][block width]` layout loaded and stored at every step was twice as slow.
const LANES: usize = 16;

/// One value per channel of a chunk, in memory.
type Lanes = [f32; LANES];

/// `rows` (`[n]` lanes) as channel-major `[width][n]` values, `width` from `out`'s length:
/// 16 rows at a time by [`F32x16::transpose`], the rest element by element.
#[inline(always)]
fn lanes_to_channels<V: F32x16>(rows: &[Lanes], out: &mut [f32]) {
    let n = rows.len();
    let mut block = [[0f32; LANES]; LANES];
    for k0 in (0..n).step_by(LANES) {
        if let Ok(square) = <&[Lanes; LANES]>::try_from(&rows[k0..(k0 + LANES).min(n)]) {
            V::transpose(square, &mut block);
            for (channel, column) in out.chunks_exact_mut(n).zip(&block) {
                channel[k0..k0 + LANES].copy_from_slice(column);
            }
        } else {
            for (l, channel) in out.chunks_exact_mut(n).enumerate() {
                for (v, row) in channel[k0..].iter_mut().zip(&rows[k0..]) {
                    *v = row[l];
                }
            }
        }
    }
}

/// Channel-major `[width][n]` values (`width ≤ 16`) as `rows` (`[n]` lanes; lanes past the
/// width left as they are): [`lanes_to_channels`] undone.
#[inline(always)]
fn channels_to_lanes<V: F32x16>(values: &[f32], rows: &mut [Lanes]) {
    let n = rows.len();
    let mut block = [[0f32; LANES]; LANES];
    for k0 in (0..n).step_by(LANES) {
        if n - k0 >= LANES {
            for (column, channel) in block.iter_mut().zip(values.chunks_exact(n)) {
                column.copy_from_slice(&channel[k0..k0 + LANES]);
            }
            let square: &mut [Lanes; LANES] = (&mut rows[k0..k0 + LANES]).try_into().unwrap();
            V::transpose(&block, square);
        } else {
            for (l, channel) in values.chunks_exact(n).enumerate() {
                for (row, v) in rows[k0..].iter_mut().zip(&channel[k0..]) {
                    row[l] = *v;
                }
            }
        }
    }
}

/// The sizes of the groups of state rows a chunk holds in registers, largest first:
/// `d_state` is cut into these (Mamba's default 16 is two groups of 8).
const GROUPS: [usize; 4] = [8, 4, 2, 1];

/// (first row, rows) of each group of `n` state rows.
fn groups(n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut k0 = 0;
    for g in GROUPS {
        while n - k0 >= g {
            out.push((k0, g));
            k0 += g;
        }
    }
    out
}

/// `rows` as lanes `V`. (A loop: `std::array::from_fn`'s closure would be a function
/// boundary that `V`'s intrinsics are not inlined across.)
#[inline(always)]
fn load_rows<V: F32x16, const G: usize>(rows: &[Lanes; G]) -> [V; G] {
    let mut out = [V::zero(); G];
    for (v, row) in out.iter_mut().zip(rows) {
        *v = V::load(row);
    }
    out
}

/// How a chunk's lanes read Δ ([`Dims::heads`]).
#[derive(Clone, Copy)]
enum DeltaLanes {
    /// One Δ per channel: the lanes' values lie side by side.
    PerChannel,
    /// Every lane in this one head: one value, broadcast.
    OneHead(usize),
    /// Lanes across heads: each its head's value.
    Heads,
}

/// One chunk: sequence `i`, channels `c0 .. c0 + width` (`width ≤ LANES`). Lanes past the
/// width read as zeros: Δ = 0 there, so their states stay zero and add nothing.
struct Chunk<'a> {
    x: &'a Inputs<'a>,
    dims: Dims,
    i: usize,
    c0: usize,
    width: usize,
    delta_lanes: DeltaLanes,
}

impl<'a> Chunk<'a> {
    fn new(x: &'a Inputs<'a>, dims: Dims, (i, c0, width): (usize, usize, usize)) -> Self {
        let p = dims.head_dim();
        let delta_lanes = if p == 1 {
            DeltaLanes::PerChannel
        } else if width == LANES && c0 / p == (c0 + width - 1) / p {
            DeltaLanes::OneHead(c0 / p)
        } else {
            DeltaLanes::Heads
        };
        Self {
            x,
            dims,
            i,
            c0,
            width,
            delta_lanes,
        }
    }

    /// This chunk's lanes of Δ from one step's row of it (`[heads]` values).
    #[inline(always)]
    fn delta_lanes<V: F32x16>(&self, row: &[f32]) -> V {
        match self.delta_lanes {
            DeltaLanes::PerChannel => {
                // The next chunk's line of this row, read after this chunk's steps.
                prefetch(row.as_ptr().wrapping_add(self.c0 + LANES));
                V::load_first(&row[self.c0..], self.width)
            }
            DeltaLanes::OneHead(h) => V::splat(row[h]),
            DeltaLanes::Heads => {
                let p = self.dims.head_dim();
                let mut lanes = [0f32; LANES];
                for (l, v) in lanes[..self.width].iter_mut().enumerate() {
                    *v = row[(self.c0 + l) / p];
                }
                V::load(&lanes)
            }
        }
    }

    /// The gradient `g` of this chunk's Δ lanes at `step`: into `d_delta` where Δ is per
    /// channel, else summed over each head's lanes into `heads`.
    ///
    /// # Safety
    /// No other task writes this chunk's channels of `d_delta`.
    #[inline(always)]
    unsafe fn add_delta_grad<V: F32x16>(
        &self,
        (d_delta, heads): (Output, &mut HeadGrads),
        step: usize,
        g: V,
    ) {
        match self.delta_lanes {
            // SAFETY: as the caller promises.
            DeltaLanes::PerChannel => unsafe { self.store(d_delta, step, g) },
            DeltaLanes::OneHead(h) => heads.add(step, h, add_lanes(g.to_array())),
            DeltaLanes::Heads => {
                let p = self.dims.head_dim();
                for (l, v) in g.to_array()[..self.width].iter().enumerate() {
                    heads.add(step, (self.c0 + l) / p, *v);
                }
            }
        }
    }

    /// Where this chunk's channels of `step` start in a `[b, t, d]` tensor.
    #[inline(always)]
    fn row(&self, step: usize) -> usize {
        (self.i * self.dims.t + step) * self.dims.d + self.c0
    }

    /// This chunk's lanes of a `[b, t, d]` tensor at steps `start .. start + out.len()`,
    /// into `out` (lanes past the width 0). A segment's inputs are gathered once and read
    /// by every group of rows, from a buffer whose index needs no bounds check per row.
    #[inline(always)]
    fn gather<V: F32x16>(&self, values: &[f32], start: usize, out: &mut [Lanes]) {
        let rows = values[self.row(start)..].chunks(self.dims.d);
        for (lanes, row) in out.iter_mut().zip(rows) {
            prefetch(row.as_ptr().wrapping_add(LANES));
            V::load_first(row, self.width).store(lanes);
        }
    }

    /// Writes `v`'s first `width` lanes at this chunk's channels of `step` in `out`.
    ///
    /// # Safety
    /// No other task writes this chunk's channels of `out`.
    #[inline(always)]
    unsafe fn store<V: F32x16>(&self, out: Output, step: usize, v: V) {
        // SAFETY: as the caller promises.
        unsafe { out.write_lanes(self.row(step), v, self.width) }
    }

    /// This chunk's channels of the skip D.
    #[inline(always)]
    fn skip<V: F32x16>(&self) -> V {
        V::load_first(&self.x.skip[self.c0..], self.width)
    }

    /// This chunk's sequence's rows of B or C `[b, t, n]` at steps `start .. end`.
    #[inline(always)]
    fn seq_rows(&self, values: &'a [f32], (start, end): (usize, usize)) -> &'a [f32] {
        let (t, n) = (self.dims.t, self.dims.n);
        &values[(self.i * t + start) * n..(self.i * t + end) * n]
    }

    /// A's rows `k0 .. k0 + G` for this chunk's channels (each its one column where A is
    /// shared), times log₂e: a step's decay `exp(Δ·A)` is then `2^(Δ·A log₂e)`, the
    /// cheaper exponential.
    #[inline(always)]
    fn a_rows<V: F32x16, const G: usize>(&self, k0: usize) -> [V; G] {
        let cols = self.dims.a_cols();
        let lanes = &self.x.a_lanes[self.c0 / LANES * cols..][..cols];
        if self.dims.shared {
            return [V::load(&lanes[0]); G];
        }
        load_rows(lanes[k0..k0 + G].try_into().unwrap())
    }

    /// All `n` rows of this chunk's state in a `[b, d, n]` array, as `[n]` lanes.
    #[inline(always)]
    fn read_state<V: F32x16>(&self, values: &[f32]) -> Vec<Lanes> {
        let n = self.dims.n;
        let at = (self.i * self.dims.d + self.c0) * n;
        let mut rows = vec![[0f32; LANES]; n];
        if values.is_empty() {
            // A state of zeros given as `[b, D, 0]` (see `no_state`).
            return rows;
        }
        let block = &values[at..at + self.width * n];
        // A state of zeros (a fresh scan's, the gradient of a final state left unused) needs
        // no transposing. (Its test ORs the bits 16 values at a time, which vectorises, where
        // `any` stopping at the first non-zero compiled to a scalar loop: 3% of a backward.)
        let bits = |values: &[f32]| values.iter().fold(0, |acc, v| acc | v.to_bits());
        if block.chunks(LANES).any(|values| bits(values) != 0) {
            channels_to_lanes::<V>(block, &mut rows);
        }
        rows
    }

    /// `rows` (`[n]` lanes) into this chunk's part of a `[b, d, n]` output.
    ///
    /// # Safety
    /// No other task writes this chunk's channels of `out`.
    #[inline(always)]
    unsafe fn write_state<V: F32x16>(&self, out: Output, rows: &[Lanes]) {
        let n = self.dims.n;
        let mut values = vec![0f32; self.width * n];
        lanes_to_channels::<V>(rows, &mut values);
        // SAFETY: as the caller promises; the chunk's channels are consecutive.
        unsafe { out.write((self.i * self.dims.d + self.c0) * n, &values) };
    }

    /// One step of rows `k0 .. k0 + G` (`a` from [`Self::a_rows`]), given the step's Δ, Δ·u
    /// and its B rows: `h ← e ⊙ h + Δ·u·B`, `e = exp(Δ·A)`. The decays e go to `decays`
    /// where given (one, at 0, where A is shared).
    #[inline(always)]
    fn step<V: F32x16, const G: usize>(
        &self,
        (dl, dlu, b): (V, V, &[f32; G]),
        (a, h): (&[V; G], &mut [V; G]),
        mut decays: Option<&mut [Lanes]>,
    ) {
        // (Branches, not closures: a closure is a function boundary that the intrinsics
        // behind `V` are not inlined across.)
        let shared = if self.dims.shared {
            let e = dl.mul(a[0]).exp2_nonpositive();
            if let Some(decays) = decays.as_deref_mut() {
                e.store(&mut decays[0]);
            }
            e
        } else {
            V::zero()
        };
        for g in 0..G {
            let e = if self.dims.shared {
                shared
            } else {
                let e = dl.mul(a[g]).exp2_nonpositive();
                if let Some(decays) = decays.as_deref_mut() {
                    e.store(&mut decays[g]);
                }
                e
            };
            h[g] = e.mul_add(h[g], dlu.mul(V::splat(b[g])));
        }
    }

    /// Rows `k0 .. k0 + G` through a segment's `steps` from their state `h` (left at the
    /// state after): their terms of y, added to `y` (`[len]` lanes) where given.
    #[inline(always)]
    fn forward<V: F32x16, const G: usize>(
        &self,
        k0: usize,
        steps: &Steps,
        h: &mut [Lanes],
        mut y: Option<&mut [Lanes]>,
    ) {
        let n = self.dims.n;
        let a = self.a_rows::<V, G>(k0);
        let mut hr: [V; G] = load_rows(h[k0..k0 + G].try_into().unwrap());
        let inputs = steps.dl.iter().zip(steps.dlu).zip(steps.b.chunks_exact(n));
        for (s, ((dl, dlu), b)) in inputs.enumerate() {
            let b = b[k0..k0 + G].try_into().unwrap();
            self.step::<V, G>((V::load(dl), V::load(dlu), b), (&a, &mut hr), None);
            if let Some(y) = y.as_deref_mut() {
                let c: &[f32; G] = steps.c[s * n + k0..s * n + k0 + G].try_into().unwrap();
                let mut acc = V::load(&y[s]);
                for g in 0..G {
                    acc = V::splat(c[g]).mul_add(hr[g], acc);
                }
                acc.store(&mut y[s]);
            }
        }
        for g in 0..G {
            hr[g].store(&mut h[k0 + g]);
        }
    }

    /// The backward of rows `k0 .. k0 + G` over one segment's `steps`, from the state that
    /// enters it: λ = ∂L/∂h and dA's rows (`[n]` lanes) carried back through it; each
    /// step's sums over rows for dΔ and du added to `buffers.via`, and its per-channel terms
    /// of dB and dC to `buffers.sums_b`, `buffers.sums_c`.
    #[inline(always)]
    fn backward_segment<V: F32x16, const G: usize>(
        &self,
        k0: usize,
        (steps, gy): (&Steps, &[Lanes]),
        entering: &[Lanes],
        (lam, g_a): (&mut [Lanes], &mut [Lanes]),
        buffers: &mut SegmentWork,
    ) {
        let (n, len) = (self.dims.n, steps.dl.len());
        let a = self.a_rows::<V, G>(k0);
        // Slices of the segment's length, walked by iterators: no bounds check per row.
        let states = &mut buffers.states[..len * G];
        let (sums_b, sums_c) = (
            &mut buffers.sums_b[..len * n],
            &mut buffers.sums_c[..len * n],
        );
        let via = &mut buffers.via[..2 * len];
        let inputs = || steps.dl.iter().zip(steps.dlu).zip(gy);
        // Recompute the segment's states h_(t−1) and decays from its entering state, and
        // dC's terms gy ⊙ h_t on the way. (The way back reads the decays from a buffer
        // beside the states: recomputing them there took 40% more instructions in the
        // backward and 12–16% more time on an AVX2 CPU; an earlier measurement on an
        // AVX-512 CPU had the buffer 2% slower: worth re-measuring there.)
        let mut h: [V; G] = load_rows(entering[k0..k0 + G].try_into().unwrap());
        let decays = &mut buffers.decays[..len * G];
        let kept = states.chunks_exact_mut(G).zip(decays.chunks_exact_mut(G));
        let rows = steps.b.chunks_exact(n).zip(sums_c.chunks_exact_mut(n));
        for (((state, decay), (b, sum_c)), ((dl, dlu), gy)) in kept.zip(rows).zip(inputs()) {
            for g in 0..G {
                h[g].store(&mut state[g]);
            }
            let b = b[k0..k0 + G].try_into().unwrap();
            let step = (V::load(dl), V::load(dlu), b);
            self.step::<V, G>(step, (&a, &mut h), Some(decay));
            let (gy, sum_c): (V, &mut [Lanes; G]) =
                (V::load(gy), (&mut sum_c[k0..k0 + G]).try_into().unwrap());
            for (h, sum) in h.iter().zip(sum_c) {
                gy.mul_add(*h, V::load(sum)).store(sum);
            }
        }
        // Back in time through y_t = C_t · h_t and h_t = e ⊙ h_(t−1) + Δ·u·B_t.
        let mut lam_r: [V; G] = load_rows(lam[k0..k0 + G].try_into().unwrap());
        let kept = states.chunks_exact(G).zip(decays.chunks_exact(G));
        let rows = steps.b.chunks_exact(n).zip(steps.c.chunks_exact(n));
        let sums = sums_b.chunks_exact_mut(n).zip(via.chunks_exact_mut(2));
        let back_in_time = kept.zip(rows).zip(sums).zip(inputs()).rev();
        if self.dims.shared {
            // One decay e and one A per channel: Σ_k λ_k·e·h_(t−1),k·A = e·A·Σ_k λ_k·h_(t−1),k,
            // so the rows need only the sum; dA is one row, `g_a[0]`.
            let mut ga = V::load(&g_a[0]);
            for ((((states, decay), (b, c)), (sum_b, via)), ((dl, dlu), gy)) in back_in_time {
                let (dl, dlu, gy) = (V::load(dl), V::load(dlu), V::load(gy));
                let e = V::load(&decay[0]);
                let (b, c): (&[f32; G], &[f32; G]) = (
                    b[k0..k0 + G].try_into().unwrap(),
                    c[k0..k0 + G].try_into().unwrap(),
                );
                let sum_b: &mut [Lanes; G] = (&mut sum_b[k0..k0 + G]).try_into().unwrap();
                let (mut held, mut via_input) = (V::zero(), V::load(&via[1]));
                for g in 0..G {
                    let lam = gy.mul_add(V::splat(c[g]), lam_r[g]);
                    lam.mul_add(dlu, V::load(&sum_b[g])).store(&mut sum_b[g]);
                    held = lam.mul_add(V::load(&states[g]), held);
                    via_input = lam.mul_add(V::splat(b[g]), via_input);
                    lam_r[g] = lam.mul(e);
                }
                let back = held.mul(e);
                back.mul_add(a[0], V::load(&via[0])).store(&mut via[0]);
                via_input.store(&mut via[1]);
                ga = back.mul_add(dl, ga);
            }
            ga.store(&mut g_a[0]);
            for g in 0..G {
                lam_r[g].store(&mut lam[k0 + g]);
            }
            return;
        }
        let mut ga_r: [V; G] = load_rows(g_a[k0..k0 + G].try_into().unwrap());
        for ((((states, decays), (b, c)), (sum_b, via)), ((dl, dlu), gy)) in back_in_time {
            let (dl, dlu, gy) = (V::load(dl), V::load(dlu), V::load(gy));
            let (b, c): (&[f32; G], &[f32; G]) = (
                b[k0..k0 + G].try_into().unwrap(),
                c[k0..k0 + G].try_into().unwrap(),
            );
            let sum_b: &mut [Lanes; G] = (&mut sum_b[k0..k0 + G]).try_into().unwrap();
            // Σ_k λ_k·A_k·e_k·h_(t−1),k and Σ_k λ_k·B_k per channel: dΔ and du follow.
            let (mut via_decay, mut via_input) = (V::load(&via[0]), V::load(&via[1]));
            for g in 0..G {
                let (e, h_prev) = (V::load(&decays[g]), V::load(&states[g]));
                let lam = gy.mul_add(V::splat(c[g]), lam_r[g]);
                lam.mul_add(dlu, V::load(&sum_b[g])).store(&mut sum_b[g]);
                let back = lam.mul(e).mul(h_prev);
                via_decay = back.mul_add(a[g], via_decay);
                via_input = lam.mul_add(V::splat(b[g]), via_input);
                ga_r[g] = back.mul_add(dl, ga_r[g]);
                lam_r[g] = lam.mul(e);
            }
            via_decay.store(&mut via[0]);
            via_input.store(&mut via[1]);
        }
        for g in 0..G {
            lam_r[g].store(&mut lam[k0 + g]);
            ga_r[g].store(&mut g_a[k0 + g]);
        }
    }
}

/// A segment's inputs for one chunk: Δ and Δ·u per step (`[len]` lanes, gathered once per
/// chunk and segment), and the sequence's B and C rows (`[len][n]`, in place).
struct Steps<'s> {
    dl: &'s [Lanes],
    u: &'s [Lanes],
    dlu: &'s [Lanes],
    b: &'s [f32],
    c: &'s [f32],
}

impl<'s> Steps<'s> {
    /// Steps `start .. end` of `chunk`: Δ, u and Δ·u gathered into `lanes`' buffers, in
    /// one pass over the rows.
    #[inline(always)]
    fn gather<V: F32x16>(
        chunk: &Chunk<'s>,
        (start, end): (usize, usize),
        lanes: &'s mut StepLanes,
    ) -> Self {
        let len = end - start;
        let StepLanes { dl, u, dlu } = lanes;
        let (dl, u, dlu) = (&mut dl[..len], &mut u[..len], &mut dlu[..len]);
        let (at, d, width) = (chunk.row(start), chunk.dims.d, chunk.width);
        let heads = chunk.dims.heads;
        let deltas = chunk.x.delta[(chunk.i * chunk.dims.t + start) * heads..].chunks(heads);
        let rows = deltas.zip(chunk.x.u[at..].chunks(d));
        let out = dl.iter_mut().zip(u.iter_mut()).zip(dlu.iter_mut());
        for (((dl, u), dlu), (row_dl, row_u)) in out.zip(rows) {
            // The next chunk's line of this row, read after this chunk's steps.
            prefetch(row_u.as_ptr().wrapping_add(LANES));
            let (vd, vu) = (chunk.delta_lanes::<V>(row_dl), V::load_first(row_u, width));
            vd.store(dl);
            vu.store(u);
            vd.mul(vu).store(dlu);
        }
        Self {
            dl,
            u,
            dlu,
            b: chunk.seq_rows(&chunk.x.b, (start, end)),
            c: chunk.seq_rows(&chunk.x.c, (start, end)),
        }
    }
}

/// One task's forward: its channels' y and, where `h_out` is given, final states.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_task(
    x: &Inputs,
    dims: Dims,
    task: Task,
    buffers: &mut SegmentBuffers,
    outputs: (Output, Option<Output>),
) {
    with_f32x16!(V => forward_task_in::<V>(x, dims, task, buffers, outputs))
}

/// [`forward_task`] on lanes `V`, a segment of steps at a time.
#[inline(always)]
fn forward_task_in<V: F32x16>(
    x: &Inputs,
    dims: Dims,
    (i, d0, w): Task,
    buffers: &mut SegmentBuffers,
    (y_out, h_out): (Output, Option<Output>),
) {
    buffers.fit(SEGMENT.min(dims.t), dims.n);
    let SegmentBuffers { lanes, gy: y, .. } = buffers;
    for c0 in (d0..d0 + w).step_by(LANES) {
        let chunk = Chunk::new(x, dims, (i, c0, (d0 + w - c0).min(LANES)));
        let mut h = chunk.read_state::<V>(&x.h0);
        for start in (0..dims.t).step_by(SEGMENT) {
            let end = (start + SEGMENT).min(dims.t);
            let steps = Steps::gather::<V>(&chunk, (start, end), lanes);
            let y = &mut y[..end - start];
            y.fill([0.0; LANES]);
            for (k0, rows) in groups(dims.n) {
                with_const!(rows, G in [8, 4, 2, 1] => chunk.forward::<V, G>(k0, &steps, &mut h, Some(&mut *y)));
            }
            let skip = chunk.skip::<V>();
            // SAFETY: this chunk's channels of the segment's rows.
            unsafe {
                for ((step, y), u) in (start..).zip(y.iter()).zip(steps.u) {
                    let y = skip.mul_add(V::load(u), V::load(y));
                    y_out.write_lanes(chunk.row(step), y, chunk.width);
                }
            }
        }
        if let Some(h_out) = h_out {
            // SAFETY: this chunk's rows of the final state.
            unsafe { chunk.write_state::<V>(h_out, &h) };
        }
    }
}

/// One task's backward: dΔ (where per channel), du and dh0 written to its channels of
/// `outputs`; dA `[w, n]` (`[w, 1]` where shared: this sequence's share), dB and dC
/// `[t, n]` (this block's share) and dΔ where per head returned. The states are recomputed
/// a segment at a time, from the state entering each.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_task(
    x: &Inputs,
    dims: Dims,
    (i, d0, w): Task,
    (gy, gh): (&[f32], &[f32]),
    buffers: &mut SegmentBuffers,
    [d_delta, d_u, d_h0]: [Output; 3],
) -> BackwardPart {
    with_f32x16!(V => backward_task_in::<V>(x, dims, (i, d0, w), (gy, gh), buffers, [d_delta, d_u, d_h0]))
}

/// [`backward_task`] on lanes `V`.
#[inline(always)]
fn backward_task_in<V: F32x16>(
    x: &Inputs,
    dims: Dims,
    (i, d0, w): Task,
    (gy, gh): (&[f32], &[f32]),
    buffers: &mut SegmentBuffers,
    [d_delta, d_u, d_h0]: [Output; 3],
) -> BackwardPart {
    let (t, n) = (dims.t, dims.n);
    let groups = groups(n);
    let segments = t.div_ceil(SEGMENT).max(1);
    let chunks: Vec<Chunk> = (d0..d0 + w)
        .step_by(LANES)
        .map(|c0| Chunk::new(x, dims, (i, c0, (d0 + w - c0).min(LANES))))
        .collect();
    buffers.fit(SEGMENT.min(t), n);
    let SegmentBuffers {
        lanes,
        gy: gy_steps,
        work,
    } = buffers;
    let mut g_heads = HeadGrads::of_task(dims, (d0, w));
    // Per chunk: λ (from the final state's gradient), dA, and the state entering each
    // segment, `[n]` lanes each.
    let mut lam: Vec<Vec<Lanes>> = chunks.iter().map(|c| c.read_state::<V>(gh)).collect();
    let mut g_a = vec![vec![[0f32; LANES]; n]; chunks.len()];
    // Per chunk: the skip D's gradient, Σ_t gy·u.
    let mut g_skip = vec![[0f32; LANES]; chunks.len()];
    // (A loop, not a closure: `V`'s intrinsics are not inlined across a closure.)
    let mut entering = Vec::with_capacity(chunks.len());
    for chunk in &chunks {
        let mut states = vec![chunk.read_state::<V>(&x.h0)];
        for segment in 1..segments {
            let range = ((segment - 1) * SEGMENT, segment * SEGMENT);
            let steps = Steps::gather::<V>(chunk, range, lanes);
            let mut h = states[segment - 1].clone();
            for &(k0, rows) in &groups {
                with_const!(rows, G in [8, 4, 2, 1] => chunk.forward::<V, G>(k0, &steps, &mut h, None));
            }
            states.push(h);
        }
        entering.push(states);
    }
    let (mut g_b, mut g_c) = (vec![0f32; t * n], vec![0f32; t * n]);
    for segment in (0..segments).rev() {
        let (start, end) = (segment * SEGMENT, ((segment + 1) * SEGMENT).min(t));
        let len = end - start;
        work.sums_b[..len * n].fill([0.0; LANES]);
        work.sums_c[..len * n].fill([0.0; LANES]);
        for (c, chunk) in chunks.iter().enumerate() {
            let steps = Steps::gather::<V>(chunk, (start, end), lanes);
            let gy_steps = &mut gy_steps[..len];
            chunk.gather::<V>(gy, start, gy_steps);
            work.via[..2 * len].fill([0.0; LANES]);
            for &(k0, rows) in &groups {
                let carried = (&mut lam[c][..], &mut g_a[c][..]);
                with_const!(rows, G in [8, 4, 2, 1] => chunk.backward_segment::<V, G>(
                    k0, (&steps, gy_steps), &entering[c][segment], carried, work
                ));
            }
            let via = work.via[..2 * len].chunks_exact(2);
            let (skip, mut g_skip_c) = (chunk.skip::<V>(), V::load(&g_skip[c]));
            let inputs = steps.dl.iter().zip(steps.u).zip(gy_steps.iter());
            for ((step, ((dl, u), gy)), via) in (start..end).zip(inputs).zip(via) {
                let (dl, u, gy) = (V::load(dl), V::load(u), V::load(gy));
                // via_decay summed A log₂e: ln 2 brings it back to A.
                let via_decay = V::load(&via[0]).mul(V::splat(std::f32::consts::LN_2));
                let via_input = V::load(&via[1]);
                g_skip_c = gy.mul_add(u, g_skip_c);
                // SAFETY: this chunk's channels of this step's row.
                unsafe {
                    let g_delta = via_input.mul_add(u, via_decay);
                    chunk.add_delta_grad((d_delta, &mut g_heads), step, g_delta);
                    chunk.store(d_u, step, skip.mul_add(gy, via_input.mul(dl)));
                }
            }
            g_skip_c.store(&mut g_skip[c]);
        }
        // Each step's sums over the channels, 16 state rows at a time where there are.
        let full = n / LANES * LANES;
        for (sums, g) in [(&work.sums_b, &mut g_b), (&work.sums_c, &mut g_c)] {
            let steps = sums[..len * n].chunks_exact(n);
            for (rows, out) in steps.zip(g[start * n..end * n].chunks_exact_mut(n)) {
                for (rows, out) in rows.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
                    V::sum_rows(rows.try_into().unwrap()).store(out.try_into().unwrap());
                }
                for (row, out) in rows[full..].iter().zip(&mut out[full..]) {
                    *out = add_lanes(*row);
                }
            }
        }
    }
    let cols = dims.a_cols();
    let (mut part_a, mut part_skip) = (vec![0f32; w * cols], vec![0f32; w]);
    for (chunk, ((lam, g_a), g_skip)) in chunks.iter().zip(lam.iter().zip(&g_a).zip(&g_skip)) {
        if !x.h0.is_empty() {
            // SAFETY: this chunk's rows of the start state.
            unsafe { chunk.write_state::<V>(d_h0, lam) };
        }
        let at = (chunk.c0 - d0) * cols;
        lanes_to_channels::<V>(&g_a[..cols], &mut part_a[at..at + chunk.width * cols]);
        let at = chunk.c0 - d0;
        part_skip[at..at + chunk.width].copy_from_slice(&g_skip[..chunk.width]);
    }
    BackwardPart {
        task: (i, d0, w),
        a: part_a,
        b: g_b,
        c: g_c,
        skip: part_skip,
        heads: g_heads,
    }
}

/// A task's dΔ where Δ is per head: `[t, heads]` from its first head, each summed over the
/// task's channels of the head (a head may span two tasks, so each keeps its own sums).
struct HeadGrads {
    first: usize,
    heads: usize,
    values: Vec<f32>,
}

impl HeadGrads {
    /// Room for the heads of channels `d0 .. d0 + w`; none where Δ is per channel.
    fn of_task(dims: Dims, (d0, w): (usize, usize)) -> Self {
        if dims.heads == dims.d {
            return Self {
                first: 0,
                heads: 0,
                values: Vec::new(),
            };
        }
        let p = dims.head_dim();
        let (first, last) = (d0 / p, (d0 + w - 1) / p);
        let heads = last + 1 - first;
        Self {
            first,
            heads,
            values: vec![0.0; dims.t * heads],
        }
    }

    #[inline(always)]
    fn add(&mut self, step: usize, head: usize, v: f32) {
        self.values[step * self.heads + head - self.first] += v;
    }
}

/// A task's sequence, first channel and width.
type Task = (usize, usize, usize);

/// A chunk's Δ, u and Δ·u over a segment, gathered (`[SEGMENT]` lanes each).
#[derive(Default)]
struct StepLanes {
    dl: Vec<Lanes>,
    u: Vec<Lanes>,
    dlu: Vec<Lanes>,
}

/// One segment's buffers, reused from task to task on a thread (see [`BUFFERS`]): a chunk's
/// gathered inputs and output gradient (the forward's output: `[SEGMENT]` lanes each) and
/// the backward's work space.
#[derive(Default)]
struct SegmentBuffers {
    lanes: StepLanes,
    gy: Vec<Lanes>,
    work: SegmentWork,
}

thread_local! {
    /// Each thread's [`SegmentBuffers`], kept from call to call: rayon's `map_init` made
    /// them afresh for every split of the tasks, 130 KB of zeroed buffers a time.
    static BUFFERS: std::cell::RefCell<SegmentBuffers> = Default::default();
}

/// A group's recomputed states h_(t−1) and decays (`[SEGMENT][GROUPS[0]]` lanes each), the
/// per-channel terms of dB and dC (`[SEGMENT][n]` lanes), and the per-step sums for dΔ and
/// du (`[SEGMENT][2]` lanes).
#[derive(Default)]
struct SegmentWork {
    states: Vec<Lanes>,
    decays: Vec<Lanes>,
    sums_b: Vec<Lanes>,
    sums_c: Vec<Lanes>,
    via: Vec<Lanes>,
}

impl SegmentBuffers {
    /// Room for segments of `len` steps and `n` state rows.
    fn fit(&mut self, len: usize, n: usize) {
        let group = GROUPS[0];
        let work = &mut self.work;
        for (buffer, size) in [
            (&mut self.lanes.dl, len),
            (&mut self.lanes.u, len),
            (&mut self.lanes.dlu, len),
            (&mut self.gy, len),
            (&mut work.states, len * group),
            (&mut work.decays, len * group),
            (&mut work.sums_b, len * n),
            (&mut work.sums_c, len * n),
            (&mut work.via, 2 * len),
        ] {
            if buffer.len() < size {
                buffer.resize(size, [0.0; LANES]);
            }
        }
    }
}

/// [`backward_task`]'s shares of the sums.
struct BackwardPart {
    task: Task,
    /// dA `[w, n]` (`[w, 1]` shared), this sequence's share.
    a: Vec<f32>,
    /// dB, dC `[t, n]`, this block of channels' share.
    b: Vec<f32>,
    c: Vec<f32>,
    /// dD `[w]`, this sequence's share.
    skip: Vec<f32>,
    /// dΔ where Δ is per head (empty where per channel: written in place).
    heads: HeadGrads,
}

/// An output that the tasks write in disjoint pieces, in parallel, allocated but not zeroed:
/// each task writes its own channels of each step's row (and its rows of a state), and
/// together they write every element once. Writing from the tasks, where each step's piece
/// is still in cache, replaced a serial pass that copied every task's result into place
/// after all had run, and the zero fills of both.
/// Tasks write disjoint elements (see `write`), and the buffer outlives them: what
/// [`SendPtr`] asks.
#[derive(Clone, Copy)]
struct Output(SendPtr<*mut f32>);

impl Output {
    /// `len` values' worth of room, and the handle the tasks write through.
    fn alloc(len: usize) -> (Vec<f32>, Self) {
        let mut values = Vec::with_capacity(len);
        let out = Self(SendPtr(values.as_mut_ptr()));
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
                .get()
                .add(at)
                .copy_from_nonoverlapping(values.as_ptr(), values.len())
        }
    }

    /// Writes `v`'s first `width` lanes at element `at` on: one vector store when all 16
    /// are (a copy of a variable length is a call to `memcpy`, one per step and chunk).
    ///
    /// # Safety
    /// As [`Self::write`], for `width` elements.
    #[inline(always)]
    unsafe fn write_lanes<V: F32x16>(self, at: usize, v: V, width: usize) {
        // SAFETY: as the caller promises.
        unsafe {
            // The next chunk's line of this row, written after this chunk's steps.
            prefetch(self.0.get().wrapping_add(at + LANES));
            if width == LANES {
                v.store(&mut *self.0.get().add(at).cast::<Lanes>());
            } else {
                self.write(at, &v.to_array()[..width]);
            }
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

/// The fused forward on flex: y, and the final state where `state` (its transpose out of
/// the lanes skipped where only y is wanted).
fn flex_forward(tensors: [FlexTensor; 7], state: bool) -> (FlexTensor, Option<FlexTensor>) {
    let [delta, u, a, b, ..] = &tensors;
    let (dims, dtype) = (Dims::of(delta, u, a, b), u.dtype());
    let x = Inputs::read(&tensors, dims);
    let Dims {
        b: nb, t, d: dd, n, ..
    } = dims;
    let (y, y_out) = Output::alloc(nb * t * dd);
    let (h_last, h_out) = Output::alloc(if state { nb * dd * n } else { 0 });
    let h_out = state.then_some(h_out);
    dims.tasks().into_par_iter().for_each(|task| {
        BUFFERS.with_borrow_mut(|buffers| forward_task(&x, dims, task, buffers, (y_out, h_out)))
    });
    // SAFETY: the tasks cover every sequence and channel: every step's row and, where
    // asked for, state.
    let (y, h_last) = unsafe {
        (
            Output::finish(y, nb * t * dd),
            state.then(|| Output::finish(h_last, nb * dd * n)),
        )
    };
    FORWARD_CALLS.record();
    (
        flex_from_f32(y, [nb, t, dd], dtype),
        h_last.map(|h| flex_from_f32(h, [nb, dd, n], dtype)),
    )
}

impl SelectiveScanBackend for Flex {
    fn selective_scan(
        delta: FlexTensor,
        u: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        h0: FlexTensor,
        skip: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (y, h) = flex_forward([delta, u, a, b, c, h0, skip], true);
        (y, h.expect("the final state was asked for"))
    }

    fn selective_scan_output(
        delta: FlexTensor,
        u: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        h0: FlexTensor,
        skip: FlexTensor,
    ) -> FlexTensor {
        flex_forward([delta, u, a, b, c, h0, skip], false).0
    }

    fn selective_scan_backward(
        delta: FlexTensor,
        u: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        h0: FlexTensor,
        skip: FlexTensor,
        gy: FlexTensor,
        gh: FlexTensor,
    ) -> (
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
        FlexTensor,
    ) {
        let (dims, dtype) = (Dims::of(&delta, &u, &a, &b), u.dtype());
        let tensors = [delta, u, a, b, c, h0, skip];
        let x = Inputs::read(&tensors, dims);
        let (gy, gh) = (flex_f32(&gy), flex_f32(&gh));
        let Dims {
            b: nb, t, d: dd, n, ..
        } = dims;
        // Δ per channel: its gradient written in place; per head: summed from the tasks'.
        let per_channel = dims.heads == dd;
        let (g_delta, d_delta) = Output::alloc(if per_channel { nb * t * dd } else { 0 });
        let (g_u, d_u) = Output::alloc(nb * t * dd);
        // h0 given as `[b, D, 0]` (zeros, see `no_state`): its gradient as the same.
        let h0_n = if x.h0.is_empty() { 0 } else { n };
        let (g_h0, d_h0) = Output::alloc(nb * dd * h0_n);
        let parts: Vec<_> = dims
            .tasks()
            .into_par_iter()
            .map(|task| {
                let outputs = [d_delta, d_u, d_h0];
                BUFFERS.with_borrow_mut(|buffers| {
                    backward_task(&x, dims, task, (&gy, &gh), buffers, outputs)
                })
            })
            .collect();
        // SAFETY: the tasks cover every sequence and channel: every step's row and state.
        let (g_delta, g_u, g_h0) = unsafe {
            let rows = nb * t * dd;
            let states = nb * dd * h0_n;
            (
                Output::finish(g_delta, if per_channel { rows } else { 0 }),
                Output::finish(g_u, rows),
                Output::finish(g_h0, states),
            )
        };
        let cols = dims.a_cols();
        let (mut g_a, mut g_skip) = (vec![0f32; dd * cols], vec![0f32; dd]);
        let mut g_b = vec![0f32; nb * t * n];
        let mut g_c = vec![0f32; nb * t * n];
        let heads = dims.heads;
        let mut g_delta = if per_channel {
            g_delta
        } else {
            vec![0f32; nb * t * heads]
        };
        for part in parts {
            let (i, d0, w) = part.task;
            let add = |acc: &mut [f32], values: &[f32]| {
                for (acc, v) in acc.iter_mut().zip(values) {
                    *acc += v;
                }
            };
            add(&mut g_skip[d0..d0 + w], &part.skip);
            add(&mut g_a[d0 * cols..(d0 + w) * cols], &part.a);
            add(&mut g_b[i * t * n..(i + 1) * t * n], &part.b);
            add(&mut g_c[i * t * n..(i + 1) * t * n], &part.c);
            let h = &part.heads;
            if !per_channel {
                for (step, values) in h.values.chunks_exact(h.heads).enumerate() {
                    let at = (i * t + step) * heads + h.first;
                    add(&mut g_delta[at..at + h.heads], values);
                }
            }
        }
        (
            flex_from_f32(g_delta, [nb, t, heads], dtype),
            flex_from_f32(g_u, [nb, t, dd], dtype),
            flex_from_f32(g_a, [dd, cols], dtype),
            flex_from_f32(g_b, [nb, t, n], dtype),
            flex_from_f32(g_c, [nb, t, n], dtype),
            flex_from_f32(g_h0, [nb, dd, h0_n], dtype),
            flex_from_f32(g_skip, [dd], dtype),
        )
    }
}

/// What the backward pass keeps: the inputs (the states are recomputed).
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    inputs: [FloatTensor<B>; 7],
    /// The final state's shape, for a zero gradient when only y is used.
    h_shape: burn::tensor::Shape,
}

/// The scan's backward: of its packed y and final state (see the Autodiff forward), or,
/// `packed` false, of [`SelectiveScanBackend::selective_scan_output`]'s y alone (the final
/// state's gradient zero).
#[derive(Debug)]
struct ScanBackward {
    packed: bool,
}

impl<B: Backend + SelectiveScanBackend> Backward<B, 7> for ScanBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (gy, gh) = if self.packed {
            let y_shape = ops.state.inputs[1].shape();
            let (gy, gh) = unpack::<B>(grad, y_shape, ops.state.h_shape.clone());
            (gy, Some(gh))
        } else {
            (grad, None)
        };
        register_scan_gradients(ops, (gy, gh), grads);
    }
}

/// The inputs' gradients, given those of y and of the final state (`None`: zero).
fn register_scan_gradients<B: Backend + SelectiveScanBackend>(
    ops: Ops<Saved<B>, 7>,
    (gy, gh): (FloatTensor<B>, Option<FloatTensor<B>>),
    grads: &mut Gradients,
) {
    let Saved { inputs, h_shape } = ops.state;
    let [delta, u, a, b, c, h0, skip] = inputs;
    // The final state's gradient, where none reached it, as zeros `[b, D, 0]` (see
    // `no_state`).
    let gh = gh.unwrap_or_else(|| {
        let shape = [h_shape[0], h_shape[1], 0].into();
        B::float_zeros(shape, &delta.device(), delta.dtype().into())
    });
    let (gd, gu, ga, gb, gc, gh0, gs) =
        B::selective_scan_backward(delta, u, a, b, c, h0, skip, gy, gh);
    register_gradients::<B, _>(
        grads,
        ops.parents.map(|p| p.map(|n| n.id)),
        [gd, gu, ga, gb, gc, gh0, gs],
    );
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
        skip: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inputs = [delta, u, a, b, c, h0, skip];
        let nodes = inputs.each_ref().map(|x| x.node());
        let inputs = inputs.map(|x| x.into_primitive());
        let [d, u, a, b, c, h0, skip] = inputs.clone();
        let (y, h) = B::selective_scan(d, u, a, b, c, h0, skip);
        let (y_shape, h_shape) = (y.shape(), h.shape());
        let packed = pack::<B>(y, h);
        // Autodiff tracks one output; y and h are cut from it, so both carry gradients.
        let packed = match (ScanBackward { packed: true })
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
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

    fn selective_scan_output(
        delta: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        skip: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let inputs = [delta, u, a, b, c, h0, skip];
        let nodes = inputs.each_ref().map(|x| x.node());
        let inputs = inputs.map(|x| x.into_primitive());
        let [d, u, a, b, c, h0, skip] = inputs.clone();
        let h_shape = h0.shape();
        let y = B::selective_scan_output(d, u, a, b, c, h0, skip);
        match (ScanBackward { packed: false })
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(Saved { inputs, h_shape }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn selective_scan_backward(
        _delta: FloatTensor<Self>,
        _u: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _b: FloatTensor<Self>,
        _c: FloatTensor<Self>,
        _h0: FloatTensor<Self>,
        _skip: FloatTensor<Self>,
        _gy: FloatTensor<Self>,
        _gh: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Lanes to channel-major values and back, 16 rows at a time and the rest one by one,
    /// for full and partial chunks: `out[l][k] = rows[k][l]` for the chunk's lanes, and the
    /// round trip gives the rows back (lanes past the width 0).
    #[test]
    fn lanes_and_channels_convert_both_ways() {
        fn check<V: F32x16>(form: &str) {
            for (n, width) in [(5, 16), (16, 16), (16, 11), (21, 7), (37, 16)] {
                let rows: Vec<Lanes> = (0..n)
                    .map(|k| {
                        std::array::from_fn(|l| if l < width { (k * 100 + l) as f32 } else { 0.0 })
                    })
                    .collect();
                let mut values = vec![f32::NAN; width * n];
                lanes_to_channels::<V>(&rows, &mut values);
                for (l, channel) in values.chunks_exact(n).enumerate() {
                    for (k, v) in channel.iter().enumerate() {
                        assert_eq!(*v, rows[k][l], "{form} n={n} width={width}: ({k}, {l})");
                    }
                }
                let mut back = vec![[0f32; LANES]; n];
                channels_to_lanes::<V>(&values, &mut back);
                assert_eq!(back, rows, "{form} n={n} width={width}: round trip");
            }
        }
        check::<crate::f32x16::Portable<true>>("portable");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            /// # Safety
            /// The CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn check_avx512() {
                check::<crate::f32x16::Avx512>("AVX-512");
            }
            // SAFETY: checked above.
            unsafe { check_avx512() };
        }
    }
}

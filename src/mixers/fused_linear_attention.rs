//! Causal linear attention's recurrence, fused, as a Burn backend extension on flex: for
//! each sequence and head, `S_t = γ_t S_(t−1) + k_t v_tᵀ`, `z_t = γ_t z_(t−1) + k_t`,
//! `o_t = qᵀ_t S_t` (÷ `(qᵀ_t z_t + ε)` when normalised), with the `dk × dv` state kept in
//! cache and never written out — as flash-linear-attention's fused recurrent kernel keeps
//! it in registers. The backward recomputes the states a segment at a time and runs the
//! adjoint recurrence back in time.
//!
//! The chunkwise form ([`super::linear_attention::chunkwise`]) is about 25 tensor ops on
//! small 5-D tensors, each a pass, an allocation and a backward of its own: at seq 64 a
//! layer took 13× a softmax attention layer. The references are
//! [`super::linear_attention::recurrent`] (a loop of tensor ops) and the chunkwise form; a
//! test holds this one equal to them, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use super::linear_attention::{LinearInputs, NORM_EPS};
use crate::device::{RunCount, flex_from_f32, is_flex, register_gradients};
use crate::vector_math::{dot_fma, has_fma, mul_add};

#[backend_extension(Flex, Autodiff)]
pub trait LinearScanBackend: Backend {
    /// q, k `[b, h, t, dk]`, v `[b, h, t, dv]`, log-decays `[b, h, t]` (any strides) →
    /// o `[b, h, t, dv]`.
    fn linear_scan(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_decay: FloatTensor<Self>,
        normalize: bool,
    ) -> FloatTensor<Self>;

    /// The gradients of q, k, v and the log-decays given the output's (the last only when
    /// `decay_grad`; zeros otherwise).
    #[allow(clippy::type_complexity)]
    fn linear_scan_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_decay: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        normalize: bool,
        decay_grad: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// Fused recurrences run in this process (for a test that a form took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// Whether [`linear_scan`] runs the extension for these inputs (f32 on flex).
pub fn available(inputs: &LinearInputs) -> bool {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let dtypes = [q.dtype(), k.dtype(), v.dtype(), log_decay.dtype()];
    dtypes == [DType::F32; 4] && is_flex(&q.device())
}

/// Causal linear attention by the fused recurrence; see [`available`] for where it runs.
pub fn linear_scan(inputs: LinearInputs, normalize: bool) -> Tensor<4> {
    let LinearInputs { q, k, v, log_decay } = inputs;
    Tensor::from_dispatch(<burn::backend::Dispatch as LinearScanBackend>::linear_scan(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        log_decay.into_dispatch(),
        normalize,
    ))
}

/// Steps per segment of the backward's recompute: one segment's states stay in cache.
const SEGMENT: usize = 64;

/// An f32 tensor read in place through its strides, its last dim made contiguous.
struct Strided<'a> {
    values: &'a [f32],
    start: isize,
    strides: Vec<isize>,
}

impl<'a> Strided<'a> {
    /// `t` as it is when its last dim is contiguous (or it has one dim), else `copy` of it.
    fn of(t: &'a FlexTensor, copy: &'a mut Option<FlexTensor>) -> Self {
        let rank = t.shape().num_dims();
        let t = if rank > 1 && t.layout().strides()[rank - 1] != 1 {
            copy.insert(t.to_contiguous())
        } else {
            t
        };
        Self {
            values: t.storage::<f32>(),
            start: t.layout().start_offset() as isize,
            strides: t.layout().strides().to_vec(),
        }
    }

    /// Sequence `i`, head `j`, step `s`: the row `[d]` of a `[b, h, t, d]` tensor.
    #[inline(always)]
    fn row(&self, (i, j, s): (usize, usize, usize), d: usize) -> &'a [f32] {
        let at = self.at(i, j, s) as usize;
        &self.values[at..at + d]
    }

    /// Sequence `i`, head `j`, step `s`: the value of a `[b, h, t]` tensor.
    #[inline(always)]
    fn value(&self, (i, j, s): (usize, usize, usize)) -> f32 {
        self.values[self.at(i, j, s) as usize]
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize, s: usize) -> isize {
        let st = &self.strides;
        self.start + i as isize * st[0] + j as isize * st[1] + s as isize * st[2]
    }
}

/// The inputs of one call, with their sizes.
struct Inputs<'a> {
    q: Strided<'a>,
    k: Strided<'a>,
    v: Strided<'a>,
    a: Strided<'a>,
    t: usize,
    dk: usize,
    dv: usize,
    normalize: bool,
}

impl<'a> Inputs<'a> {
    /// q, k, v and the log-decays read in place (copied only where a last dim is strided).
    fn of(
        tensors: &'a [FlexTensor; 4],
        copies: &'a mut [Option<FlexTensor>; 4],
        normalize: bool,
    ) -> Self {
        let [q, k, v, a] = tensors;
        let [cq, ck, cv, ca] = copies;
        let (_, _, t, dk, dv) = sizes(q, v);
        Self {
            q: Strided::of(q, cq),
            k: Strided::of(k, ck),
            v: Strided::of(v, cv),
            a: Strided::of(a, ca),
            t,
            dk,
            dv,
            normalize,
        }
    }

    /// One step of (sequence, head) `task`'s recurrence from the state `(s, z)` in place:
    /// returns γ_t. z is kept only when normalising (it is unused otherwise).
    #[inline(always)]
    fn step<const FMA: bool>(
        &self,
        task: (usize, usize),
        step: usize,
        (s, z): (&mut [f32], &mut [f32]),
    ) -> f32 {
        let (dk, dv) = (self.dk, self.dv);
        let at = (task.0, task.1, step);
        let (k, v) = (self.k.row(at, dk), self.v.row(at, dv));
        let gamma = self.a.value(at).exp();
        for (i, &ki) in k.iter().enumerate() {
            let row = &mut s[i * dv..(i + 1) * dv];
            for (sj, &vj) in row.iter_mut().zip(v) {
                *sj = mul_add::<FMA>(gamma, *sj, ki * vj);
            }
        }
        if self.normalize {
            for (zi, &ki) in z.iter_mut().zip(k) {
                *zi = mul_add::<FMA>(gamma, *zi, ki);
            }
        }
        gamma
    }

    /// `qᵀ S` into `num` `[dv]`, and `qᵀ z`.
    #[inline(always)]
    fn read<const FMA: bool>(&self, q: &[f32], (s, z): (&[f32], &[f32]), num: &mut [f32]) -> f32 {
        let dv = self.dv;
        num.fill(0.0);
        for (i, &qi) in q.iter().enumerate() {
            let row = &s[i * dv..(i + 1) * dv];
            for (nj, &sj) in num.iter_mut().zip(row) {
                *nj = mul_add::<FMA>(qi, sj, *nj);
            }
        }
        if self.normalize {
            dot_fma::<FMA>(q, z)
        } else {
            0.0
        }
    }
}

/// One (sequence, head) task's forward: its outputs `[t, dv]`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_task(x: &Inputs, task: (usize, usize), out: &mut [f32]) {
    const FMA: bool = has_fma!();
    let (dk, dv) = (x.dk, x.dv);
    let (mut s, mut z) = (vec![0f32; dk * dv], vec![0f32; dk]);
    for (step, o) in out.chunks_exact_mut(dv).enumerate() {
        x.step::<FMA>(task, step, (&mut s, &mut z));
        let q = x.q.row((task.0, task.1, step), dk);
        let den = x.read::<FMA>(q, (&s, &z), o);
        if x.normalize {
            let r = 1.0 / (den + NORM_EPS as f32);
            o.iter_mut().for_each(|o| *o *= r);
        }
    }
}

/// One task's gradients, each `[t, d]` of its own.
struct TaskGrads<'a> {
    q: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a mut [f32],
    a: &'a mut [f32],
}

/// `dst = γ_t src + (k_t vᵀ_t, k_t, v_t k_tᵀ)` for a state laid out `[S | z | Sᵀ]` (S
/// `[dk, dv]`, z `[dk]`, Sᵀ `[dv, dk]`): returns γ_t. The backward keeps S both ways so that
/// each of its products runs along a row (a sum of scaled rows, vectorised) and none is a
/// dot product per row, whose horizontal sum cost more than the row's products.
#[inline(always)]
fn advance<const FMA: bool>(
    x: &Inputs,
    task: (usize, usize),
    step: usize,
    src: &[f32],
    dst: &mut [f32],
) -> f32 {
    let (dk, dv) = (x.dk, x.dv);
    let at = (task.0, task.1, step);
    let (k, v) = (x.k.row(at, dk), x.v.row(at, dv));
    let gamma = x.a.value(at).exp();
    let (s, rest) = dst.split_at_mut(dk * dv);
    let (z, st) = rest.split_at_mut(dk);
    let (s0, rest0) = src.split_at(dk * dv);
    let (z0, st0) = rest0.split_at(dk);
    axpy_rows::<FMA>(s, s0, gamma, k, v);
    axpy_rows::<FMA>(st, st0, gamma, v, k);
    for ((zi, &z0i), &ki) in z.iter_mut().zip(z0).zip(k) {
        *zi = mul_add::<FMA>(gamma, z0i, ki);
    }
    gamma
}

/// `m = γ m0 + a bᵀ` for `[a.len(), b.len()]` matrices, row by row.
#[inline(always)]
fn axpy_rows<const FMA: bool>(m: &mut [f32], m0: &[f32], gamma: f32, a: &[f32], b: &[f32]) {
    let w = b.len();
    for (r, &ar) in a.iter().enumerate() {
        let (row, row0) = (&mut m[r * w..(r + 1) * w], &m0[r * w..(r + 1) * w]);
        for ((x, &x0), &bj) in row.iter_mut().zip(row0).zip(b) {
            *x = mul_add::<FMA>(gamma, x0, ar * bj);
        }
    }
}

/// `m ← γ m + a bᵀ` in place, as [`axpy_rows`].
#[inline(always)]
fn update_rows<const FMA: bool>(m: &mut [f32], gamma: f32, a: &[f32], b: &[f32]) {
    let w = b.len();
    for (r, &ar) in a.iter().enumerate() {
        for (x, &bj) in m[r * w..(r + 1) * w].iter_mut().zip(b) {
            *x = mul_add::<FMA>(gamma, *x, ar * bj);
        }
    }
}

/// `out = Σ_r c_r · m[r]` over the rows of `m` `[c.len(), out.len()]`.
#[inline(always)]
fn combine_rows<const FMA: bool>(out: &mut [f32], m: &[f32], c: &[f32]) {
    let w = out.len();
    out.fill(0.0);
    for (r, &cr) in c.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&m[r * w..(r + 1) * w]) {
            *o = mul_add::<FMA>(cr, x, *o);
        }
    }
}

/// One (sequence, head) task's backward, `grad` its output gradient `[t, dv]`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_task(x: &Inputs, task: (usize, usize), grad: &[f32], decay_grad: bool, g: TaskGrads) {
    const FMA: bool = has_fma!();
    let (t, dk, dv) = (x.t, x.dk, x.dv);
    let (ns, width) = (dk * dv, 2 * dk * dv + dk);
    // The state (S and z) entering each segment: one pass over all but the last.
    let segments = t.div_ceil(SEGMENT).max(1);
    let mut entering = vec![0f32; segments * (ns + dk)];
    let mut state = vec![0f32; ns + dk];
    for step in 0..(segments - 1) * SEGMENT {
        let (s, z) = state.split_at_mut(ns);
        x.step::<FMA>(task, step, (s, z));
        if (step + 1) % SEGMENT == 0 {
            let at = (step + 1) / SEGMENT * (ns + dk);
            entering[at..at + ns + dk].copy_from_slice(&state);
        }
    }
    // One segment's states `[S | z | Sᵀ]` (entering, then after each step) and decays,
    // every one written before it is read.
    let mut kept = SEGMENT_STATES.take();
    kept.resize(kept.len().max((SEGMENT.min(t) + 1) * width), 0.0);
    let states = &mut kept[..(SEGMENT.min(t) + 1) * width];
    let mut gammas = vec![0f32; SEGMENT.min(t)];
    // λ = ∂L/∂(S_t, z_t), both ways, from the end back in time; each step's decay is
    // applied to them at the next (earlier) step's update.
    let (mut lam_s, mut lam_st, mut lam_z) = (vec![0f32; ns], vec![0f32; ns], vec![0f32; dk]);
    let mut pending = 1f32;
    let (mut num, mut d_num) = (vec![0f32; dv], vec![0f32; dv]);
    for segment in (0..segments).rev() {
        let (start, end) = (segment * SEGMENT, ((segment + 1) * SEGMENT).min(t));
        let entered = &entering[segment * (ns + dk)..(segment + 1) * (ns + dk)];
        states[..ns + dk].copy_from_slice(entered);
        // Sᵀ of the entering state.
        for i in 0..dk {
            for j in 0..dv {
                states[ns + dk + j * dk + i] = entered[i * dv + j];
            }
        }
        for i in 0..end - start {
            let (done, next) = states.split_at_mut((i + 1) * width);
            let src = &done[i * width..];
            gammas[i] = advance::<FMA>(x, task, start + i, src, &mut next[..width]);
        }
        for step in (start..end).rev() {
            let i = step - start;
            let at = (task.0, task.1, step);
            let (q, k, v) = (x.q.row(at, dk), x.k.row(at, dk), x.v.row(at, dv));
            let prev = &states[i * width..(i + 1) * width];
            let cur = &states[(i + 1) * width..(i + 2) * width];
            let (s, z, st) = (&cur[..ns], &cur[ns..ns + dk], &cur[ns + dk..]);
            let go = &grad[step * dv..(step + 1) * dv];
            // o = num · r with r = 1 / (den + ε): dnum = g r, dden = −r² (g · num).
            let d_den = if x.normalize {
                combine_rows::<FMA>(&mut num, s, q);
                let r = 1.0 / (dot_fma::<FMA>(q, z) + NORM_EPS as f32);
                d_num.iter_mut().zip(go).for_each(|(d, &g)| *d = g * r);
                -r * r * dot_fma::<FMA>(go, &num)
            } else {
                d_num.copy_from_slice(go);
                0.0
            };
            // dq = S dnum + z dden.
            let dq = &mut g.q[step * dk..(step + 1) * dk];
            combine_rows::<FMA>(dq, st, &d_num);
            if x.normalize {
                for (d, &zi) in dq.iter_mut().zip(z) {
                    *d = mul_add::<FMA>(zi, d_den, *d);
                }
            }
            // λ_S ← γ_(t+1) λ_S + q ⊗ dnum (both ways), λ_z ← γ_(t+1) λ_z + q dden.
            update_rows::<FMA>(&mut lam_s, pending, q, &d_num);
            update_rows::<FMA>(&mut lam_st, pending, &d_num, q);
            for (l, &qi) in lam_z.iter_mut().zip(q) {
                *l = mul_add::<FMA>(pending, *l, qi * d_den);
            }
            // S_t = γ S_(t−1) + k vᵀ, z_t = γ z_(t−1) + k: dk = λ_S v + λ_z, dv = λ_Sᵀ k,
            // dγ = ⟨λ_S, S_(t−1)⟩ + ⟨λ_z, z_(t−1)⟩.
            let dk_t = &mut g.k[step * dk..(step + 1) * dk];
            combine_rows::<FMA>(dk_t, &lam_st, v);
            if x.normalize {
                dk_t.iter_mut().zip(&lam_z).for_each(|(d, &l)| *d += l);
            }
            combine_rows::<FMA>(&mut g.v[step * dv..(step + 1) * dv], &lam_s, k);
            let gamma = gammas[i];
            if decay_grad {
                let mut d_gamma = dot_fma::<FMA>(&lam_s, &prev[..ns]);
                if x.normalize {
                    d_gamma += dot_fma::<FMA>(&lam_z, &prev[ns..ns + dk]);
                }
                // γ = exp(a): da = dγ · γ.
                g.a[step] = d_gamma * gamma;
            }
            pending = gamma;
        }
    }
    SEGMENT_STATES.set(kept);
}

thread_local! {
    /// A backward task's segment of states, kept by each thread from task to task: half a
    /// megabyte at the default sizes, whose zero-filling afresh for every (sequence, head)
    /// was 6% of the linear model's step (perf).
    static SEGMENT_STATES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The sizes `(b, h, t, dk, dv)` of a call.
fn sizes(q: &FlexTensor, v: &FlexTensor) -> (usize, usize, usize, usize, usize) {
    let (sq, sv) = (q.shape(), v.shape());
    (sq[0], sq[1], sq[2], sq[3], sv[3])
}

impl LinearScanBackend for Flex {
    fn linear_scan(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        a: FlexTensor,
        normalize: bool,
    ) -> FlexTensor {
        FORWARD_CALLS.record();
        let (b, h, t, _, dv) = sizes(&q, &v);
        let (tensors, mut copies) = ([q, k, v, a], Default::default());
        let x = Inputs::of(&tensors, &mut copies, normalize);
        let mut out = vec![0f32; b * h * t * dv];
        if t * dv > 0 {
            out.par_chunks_mut(t * dv)
                .enumerate()
                .for_each(|(task, out)| forward_task(&x, (task / h, task % h), out));
        }
        flex_from_f32(out, [b, h, t, dv], DType::F32)
    }

    fn linear_scan_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        a: FlexTensor,
        grad: FlexTensor,
        normalize: bool,
        decay_grad: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let (b, h, t, dk, dv) = sizes(&q, &v);
        let (tensors, mut copies) = ([q, k, v, a], Default::default());
        let x = Inputs::of(&tensors, &mut copies, normalize);
        let grad = crate::device::flex_f32(&grad);
        let tasks = b * h;
        let (mut gq, mut gk) = (vec![0f32; tasks * t * dk], vec![0f32; tasks * t * dk]);
        let (mut gv, mut ga) = (vec![0f32; tasks * t * dv], vec![0f32; tasks * t]);
        if t * dk * dv > 0 {
            gq.par_chunks_mut(t * dk)
                .zip(gk.par_chunks_mut(t * dk))
                .zip(gv.par_chunks_mut(t * dv).zip(ga.par_chunks_mut(t)))
                .enumerate()
                .for_each(|(task, ((q, k), (v, a)))| {
                    let g = &grad[task * t * dv..(task + 1) * t * dv];
                    let grads = TaskGrads { q, k, v, a };
                    backward_task(&x, (task / h, task % h), g, decay_grad, grads);
                });
        }
        (
            flex_from_f32(gq, [b, h, t, dk], DType::F32),
            flex_from_f32(gk, [b, h, t, dk], DType::F32),
            flex_from_f32(gv, [b, h, t, dv], DType::F32),
            flex_from_f32(ga, [b, h, t], DType::F32),
        )
    }
}

#[derive(Debug)]
struct LinearScanBackward;

impl<B: Backend + LinearScanBackend> Backward<B, 4> for LinearScanBackward {
    /// q, k, v, the log-decays and whether to normalise: the backward recomputes the states.
    type State = ([FloatTensor<B>; 4], bool);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ([q, k, v, a], normalize) = ops.state;
        let decay_grad = ops.parents[3].is_some();
        let (gq, gk, gv, ga) = B::linear_scan_backward(q, k, v, a, grad, normalize, decay_grad);
        register_gradients::<B, _>(
            grads,
            ops.parents.map(|p| p.map(|n| n.id)),
            [gq, gk, gv, ga],
        );
    }
}

impl<B: Backend + LinearScanBackend, C: CheckpointStrategy> LinearScanBackend for Autodiff<B, C> {
    fn linear_scan(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        normalize: bool,
    ) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node(), a.node()];
        let inputs = [q, k, v, a].map(|t| t.into_primitive());
        let [q, k, v, a] = inputs.clone();
        let out = B::linear_scan(q, k, v, a, normalize);
        match LinearScanBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((inputs, normalize), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn linear_scan_backward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _normalize: bool,
        _decay_grad: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unreachable!(
            "the recurrence's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixers::linear_attention::{chunkwise, recurrent};
    use crate::testing::max_relative_difference;
    use burn::tensor::Distribution;

    /// Equal to the recurrent reference and the chunkwise form, output and the gradients
    /// of q, k, v and the log-decays, normalised or not, over more than one segment, with
    /// q, k and v strided head views as the mixer passes them.
    #[test]
    fn fused_recurrence_equals_the_references() {
        let device = Device::flex().autodiff();
        device.seed(31);
        let (b, h, t, dk, dv) = (2, 3, SEGMENT + 21, 8, 6);
        // [b, t, h, d] swapped to [b, h, t, d], as split_heads gives them; positive keys
        // and queries as a feature map's, so the normaliser stays away from zero.
        let heads = |d: usize, lo: f64| {
            Tensor::<4>::random([b, t, h, d], Distribution::Uniform(lo, 1.0), &device)
                .swap_dims(1, 2)
        };
        let (q, k, v) = (heads(dk, 0.1), heads(dk, 0.1), heads(dv, -1.0));
        let a = Tensor::<3>::random([b, h, t], Distribution::Uniform(-0.3, 0.0), &device);
        let probe = Tensor::<4>::random([b, h, t, dv], Distribution::Normal(0.0, 1.0), &device);
        for normalize in [true, false] {
            let run = |form: usize| {
                let [q, k, v] = [&q, &k, &v].map(|x| x.clone().require_grad());
                let a = a.clone().require_grad();
                let inputs = LinearInputs {
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    log_decay: a.clone(),
                };
                let out = match form {
                    0 => linear_scan(inputs, normalize),
                    1 => recurrent(inputs, normalize),
                    _ => chunkwise(inputs, normalize, 16),
                };
                let g = (out.clone() * probe.clone()).sum().backward();
                let v4 = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
                let ga = a
                    .grad(&g)
                    .unwrap()
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap();
                let grads = [q.grad(&g), k.grad(&g), v.grad(&g)].map(|t| v4(t.unwrap()));
                (v4(out), grads, ga)
            };
            let calls = FORWARD_CALLS.get();
            let ours = run(0);
            assert!(FORWARD_CALLS.get() > calls, "the extension ran");
            for (name, reference) in [("recurrent", run(1)), ("chunkwise", run(2))] {
                let err = max_relative_difference(&ours.0, &reference.0);
                assert!(err < 1e-4, "{name} normalize {normalize}: output {err}");
                for (part, (x, r)) in ["dq", "dk", "dv"]
                    .iter()
                    .zip(ours.1.iter().zip(&reference.1))
                {
                    let err = max_relative_difference(x, r);
                    assert!(err < 1e-3, "{name} normalize {normalize}: {part} {err}");
                }
                let err = max_relative_difference(&ours.2, &reference.2);
                assert!(
                    err < 1e-3,
                    "{name} normalize {normalize}: d log-decay {err}"
                );
            }
        }
    }
}

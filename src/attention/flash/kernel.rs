//! FlashAttention on flex in f32 as native kernels: per block of queries, one gemm for the
//! scores over every key the block sees, the softmax in cache, one gemm for the output;
//! backward per (sequence, head), FlashAttention-2's recomputation with each block's
//! products as gemms. The `[b, h, t, t]` weights are never stored: a block's scores, at
//! most `block × tk`, live in a per-thread scratch buffer.
//!
//! The block-pair form in [`super`] (backend primitive ops) is the same computation, and
//! the path for dtypes other than f32; the tests of the tiled forms and of ring attention
//! hold both equal to the naive form.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::Span;
use crate::attention::fused_softmax::softmax_in_place;
use crate::attention::naive::HIDDEN;
use crate::fused_dropout::Mask;
use crate::matmul::{Matrices, gemm_add_into, gemm_into};
use crate::vector_math::{exp_nonpositive_fma, has_fma};

/// Sizes of a call: (sequences × heads, queries, keys, key width, value width).
type Sizes = (usize, usize, usize, usize, usize);

fn sizes(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Sizes {
    let (sq, sk, sv) = (q.shape(), k.shape(), v.shape());
    (sq[0] * sq[1], sq[2], sk[2], sq[3], sv[3])
}

thread_local! {
    /// A task's block of scores (and, in backward, their gradients): reused from task to
    /// task, so no `block × tk` buffer is allocated and faulted in per block.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f` over a scratch buffer of at least `len` values (their contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH.take();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let r = f(&mut buffer[..len]);
    SCRATCH.set(buffer);
    r
}

impl Span {
    /// The keys `[lo, hi)` (local) that query `r` (local) sees, of `tk`.
    fn visible(&self, r: usize, tk: usize) -> (usize, usize) {
        self.visibility
            .visible_keys(self.q_start + r, (self.k_start, tk))
    }

    /// Each row's visible keys relative to the block's first key, and the block's keys
    /// `[k0, k1)` (their union; the ranges move forward with the query).
    fn block_keys(
        &self,
        (q0, q1): (usize, usize),
        tk: usize,
    ) -> (Vec<(usize, usize)>, usize, usize) {
        let (k0, k1) = (self.visible(q0, tk).0, self.visible(q1 - 1, tk).1);
        let ranges = (q0..q1)
            .map(|r| {
                let (lo, hi) = self.visible(r, tk);
                (lo.max(k0) - k0, hi.max(k0) - k0)
            })
            .collect();
        (ranges, k0, k1)
    }

    /// Multiplies each row of a block of weights (`len` keys from `k0`, rows from `q0`, of
    /// matrix `m` of `[bh, tq, tk]`) by its dropout factors: 0, or `1 / (1 − p)`.
    fn drop(
        &self,
        p: &mut [f32],
        (m, q0, k0, len): (usize, usize, usize, usize),
        (tq, tk): (usize, usize),
    ) {
        let Some((prob, key)) = self.dropout else {
            return;
        };
        let (mask, keep) = (Mask::new(prob, key), (1.0 / (1.0 - prob)) as f32);
        for (r, row) in p.chunks_mut(len).enumerate() {
            mask.apply(row, ((m * tq + q0 + r) * tk + k0) as u64, keep);
        }
    }
}

/// The softmax of each row of scores `s` (`len` keys per row) over its visible keys, in
/// place, 0 elsewhere; each row's log-sum-exp (of the scaled scores) into `lse`, [`HIDDEN`]
/// where a row sees no key.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn softmax_rows(s: &mut [f32], len: usize, ranges: &[(usize, usize)], scale: f32, lse: &mut [f32]) {
    const FMA: bool = has_fma!();
    for ((row, &(lo, hi)), lse) in s.chunks_mut(len).zip(ranges).zip(lse) {
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        *lse = if lo < hi {
            softmax_in_place::<FMA>(&mut row[lo..hi], scale)
        } else {
            HIDDEN
        };
    }
}

/// The weights again from the scores and each row's log-sum-exp: `exp(scale · s − lse)`
/// over the visible keys, 0 elsewhere.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn weights_again(s: &mut [f32], len: usize, ranges: &[(usize, usize)], scale: f32, lse: &[f32]) {
    const FMA: bool = has_fma!();
    for ((row, &(lo, hi)), &lse) in s.chunks_mut(len).zip(ranges).zip(lse) {
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        for p in &mut row[lo..hi] {
            // ≤ 0 up to rounding (lse is at least the row's largest scaled score); exp clamps.
            *p = exp_nonpositive_fma::<FMA>(*p * scale - lse);
        }
    }
}

/// `dS = scale · P ∘ (dP − δ)` in place of `dP`, row by row, 0 outside the visible keys.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn score_gradients(
    dp: &mut [f32],
    p: &[f32],
    len: usize,
    ranges: &[(usize, usize)],
    scale: f32,
    delta: &[f32],
) {
    for (((dp, p), &(lo, hi)), &delta) in
        dp.chunks_mut(len).zip(p.chunks(len)).zip(ranges).zip(delta)
    {
        dp[..lo].fill(0.0);
        dp[hi..].fill(0.0);
        for (dp, &p) in dp[lo..hi].iter_mut().zip(&p[lo..hi]) {
            *dp = scale * p * (*dp - delta);
        }
    }
}

/// The output and each row's log-sum-exp, packed `[bh, tq, dv + 1]` as the extension
/// returns them. Tasks: (sequence × head, block of queries).
pub(super) fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, span: &Span) -> Vec<f32> {
    let (bh, tq, tk, dk, dv) = sizes(q, k, v);
    let (qm, km, vm) = (Matrices::of(q), Matrices::of(k), Matrices::of(v));
    let (width, block) = (dv + 1, span.block);
    let scale = crate::attention::scale(dk) as f32;
    let mut out = vec![0f32; bh * tq * width];
    out.par_chunks_mut(tq * width)
        .enumerate()
        .flat_map(|(m, o)| {
            o.par_chunks_mut(block * width)
                .enumerate()
                .map(move |(blk, o)| (m, blk * block, o))
        })
        .for_each(|(m, q0, out)| {
            let q1 = (q0 + block).min(tq);
            let rows = q1 - q0;
            let (ranges, k0, k1) = span.block_keys((q0, q1), tk);
            if k0 >= k1 {
                // These queries see no key: output 0, weight 0 in any merge.
                out.chunks_mut(width).for_each(|row| row[dv] = HIDDEN);
                return;
            }
            let len = k1 - k0;
            let (q_rs, _) = qm.strides;
            let ((k_rs, k_cs), (v_rs, v_cs)) = (km.strides, vm.strides);
            with_scratch(rows * len, |p| {
                // SAFETY: the pointers lie inside matrix m of q, k and v (rows q0..q1, keys
                // k0..k1); p holds rows × len values.
                unsafe {
                    gemm_into(
                        (p.as_mut_ptr(), len),
                        (rows, dk, len),
                        (qm.first(m).offset(q0 as isize * q_rs), qm.strides),
                        (km.first(m).offset(k0 as isize * k_rs), (k_cs, k_rs)),
                    );
                }
                let mut lse = vec![0f32; rows];
                softmax_rows(p, len, &ranges, scale, &mut lse);
                span.drop(p, (m, q0, k0, len), (tq, tk));
                // SAFETY: `out` is this block's rows × width values.
                unsafe {
                    gemm_into(
                        (out.as_mut_ptr(), width),
                        (rows, len, dv),
                        (p.as_ptr(), (len as isize, 1)),
                        (vm.first(m).offset(k0 as isize * v_rs), (v_rs, v_cs)),
                    );
                }
                for (row, lse) in out.chunks_mut(width).zip(lse) {
                    row[dv] = lse;
                }
            });
        });
    out
}

/// `(dq, dk, dv)`, each contiguous, from the extension's packed output and its gradient
/// (`[.., dv + 1]`: the output's, then the log-sum-exp's). One task per (sequence, head),
/// over its blocks of queries in turn, accumulating the keys' and values' gradients.
pub(super) fn backward(
    (q, k, v): (&FlexTensor, &FlexTensor, &FlexTensor),
    packed: &FlexTensor,
    grad: &FlexTensor,
    span: &Span,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (bh, tq, tk, dk, dv) = sizes(q, k, v);
    let (qm, km, vm) = (Matrices::of(q), Matrices::of(k), Matrices::of(v));
    let (om, gm) = (Matrices::of(packed), Matrices::of(grad));
    let block = span.block;
    let scale = crate::attention::scale(dk) as f32;
    let (mut dq, mut dks, mut dvs) = (
        vec![0f32; bh * tq * dk],
        vec![0f32; bh * tk * dk],
        vec![0f32; bh * tk * dv],
    );
    let ((q_rs, _), (k_rs, k_cs), (v_rs, v_cs)) = (qm.strides, km.strides, vm.strides);
    let ((o_rs, o_cs), (g_rs, g_cs)) = (om.strides, gm.strides);
    dq.par_chunks_mut(tq * dk)
        .zip(dks.par_chunks_mut(tk * dk))
        .zip(dvs.par_chunks_mut(tk * dv))
        .enumerate()
        .for_each(|(m, ((dq, dk_m), dv_m))| {
            for q0 in (0..tq).step_by(block) {
                let q1 = (q0 + block).min(tq);
                let rows = q1 - q0;
                let (ranges, k0, k1) = span.block_keys((q0, q1), tk);
                if k0 >= k1 {
                    continue;
                }
                let len = k1 - k0;
                let (q_blk, do_blk) = (
                    // SAFETY: rows q0.. of matrix m of q and of the gradient.
                    unsafe { qm.first(m).offset(q0 as isize * q_rs) },
                    unsafe { gm.first(m).offset(q0 as isize * g_rs) },
                );
                // δ = rowsum(dO ∘ O) − dlse, and each row's log-sum-exp.
                let (mut delta, mut lse) = (vec![0f32; rows], vec![0f32; rows]);
                for r in 0..rows {
                    let at = |mat: &Matrices, (rs, cs): (isize, isize), c: usize| {
                        // SAFETY: row q0 + r, column c ≤ dv of matrix m.
                        unsafe {
                            *mat.first(m)
                                .offset((q0 + r) as isize * rs + c as isize * cs)
                        }
                    };
                    let dot: f32 = (0..dv)
                        .map(|c| at(&gm, (g_rs, g_cs), c) * at(&om, (o_rs, o_cs), c))
                        .sum();
                    delta[r] = dot - at(&gm, (g_rs, g_cs), dv);
                    lse[r] = at(&om, (o_rs, o_cs), dv);
                }
                let dropping = span.dropout.is_some();
                let parts = if dropping { 3 } else { 2 };
                with_scratch(parts * rows * len, |scratch| {
                    let (p, rest) = scratch.split_at_mut(rows * len);
                    let (dp, dropped) = rest.split_at_mut(rows * len);
                    let pl = (len as isize, 1);
                    let pt = (1, len as isize);
                    let k_blk = unsafe { km.first(m).offset(k0 as isize * k_rs) };
                    let v_blk = unsafe { vm.first(m).offset(k0 as isize * v_rs) };
                    // SAFETY (the products below): each pointer lies inside matrix m of its
                    // tensor or inside this task's own slices, with room for its rows.
                    unsafe {
                        // P again, and dP = dO · Vᵀ.
                        gemm_into(
                            (p.as_mut_ptr(), len),
                            (rows, dk, len),
                            (q_blk, qm.strides),
                            (k_blk, (k_cs, k_rs)),
                        );
                        gemm_into(
                            (dp.as_mut_ptr(), len),
                            (rows, dv, len),
                            (do_blk, gm.strides),
                            (v_blk, (v_cs, v_rs)),
                        );
                    }
                    weights_again(p, len, &ranges, scale, &lse);
                    // The weights as they met the values: dropped, where dropout acts.
                    let met: &[f32] = if dropping {
                        dropped.copy_from_slice(p);
                        span.drop(dropped, (m, q0, k0, len), (tq, tk));
                        span.drop(dp, (m, q0, k0, len), (tq, tk));
                        dropped
                    } else {
                        p
                    };
                    // SAFETY: as above; keys k0..k1 of this task's dv.
                    unsafe {
                        gemm_add_into(
                            (dv_m.as_mut_ptr().add(k0 * dv), dv),
                            (len, rows, dv),
                            (met.as_ptr(), pt),
                            (do_blk, gm.strides),
                        );
                    }
                    score_gradients(dp, p, len, &ranges, scale, &delta);
                    // SAFETY: as above; rows q0..q1 of this task's dq, keys k0..k1 of its dk.
                    unsafe {
                        gemm_into(
                            (dq.as_mut_ptr().add(q0 * dk), dk),
                            (rows, len, dk),
                            (dp.as_ptr(), pl),
                            (k_blk, km.strides),
                        );
                        gemm_add_into(
                            (dk_m.as_mut_ptr().add(k0 * dk), dk),
                            (len, rows, dk),
                            (dp.as_ptr(), pt),
                            (q_blk, qm.strides),
                        );
                    }
                });
            }
        });
    (dq, dks, dvs)
}

//! Sixteen f32 lanes as one value: one AVX-512 register where the CPU has them, two AVX2
//! registers where it has AVX2 and FMA ([`Avx2`]), an array that LLVM vectorises otherwise
//! ([`Portable`]). Kernels written against [`F32x16`] keep a value per lane
//! in a register across a loop, where plain arrays of lanes let LLVM vectorise across the
//! wrong loop (gathers and scatters of every lane; see `mixers::selective_scan`).
//!
//! A kernel is generic over the type and picks it inside a `#[multiversion]` function with
//! [`with_f32x16`], so that [`Avx512`] is only ever built in a clone for a CPU with AVX-512
//! (and [`Avx2`] in one for AVX2 and FMA). Intrinsics inline only into code compiled for
//! their features, that is, into that clone
//! through `#[inline(always)]` functions: a closure is a function of its own, so a kernel
//! uses loops, not closures, around these operations (one closure made a backward 14×
//! slower, an intrinsic call per vector).

use crate::vector_math::{
    EXP_R, EXP2_POLY, LN_2_PARTS, MAGIC, Real, add_lanes, exp_nonpositive_fma,
    exp2_nonpositive_fma, mul_add, pow2_of_shifted,
};

/// Sixteen f32 lanes and the element-wise operations kernels use on them.
pub trait F32x16: Copy {
    /// Whether a [`Quad`] of these runs as registers side by side (four AVX-512, eight
    /// AVX2), so that kernels take it. [`Portable`] lanes are arrays LLVM vectorises one
    /// operation at a time; four of them as one value came out 4× slower than a plain loop
    /// over elements (AVX2, a probe of softplus and sigmoid), so kernels loop over elements
    /// there (which LLVM may leave scalar: GELU's was, hence [`Avx2`]).
    const QUADS: bool;
    /// Every lane `x`.
    fn splat(x: f32) -> Self;
    /// The lanes of `x`.
    fn load(x: &[f32; 16]) -> Self;
    /// Writes the lanes to `out`.
    fn store(self, out: &mut [f32; 16]);
    /// `values` (at most 16) in the first lanes, the rest 0.
    #[inline(always)]
    fn load_partial(values: &[f32]) -> Self {
        let mut lanes = [0f32; 16];
        lanes[..values.len()].copy_from_slice(values);
        Self::load(&lanes)
    }
    /// The first `out.len()` (at most 16) lanes into `out`.
    #[inline(always)]
    fn store_partial(self, out: &mut [f32]) {
        let mut lanes = [0f32; 16];
        self.store(&mut lanes);
        out.copy_from_slice(&lanes[..out.len()]);
    }
    /// The first `out.len()` (at most 16) lanes into `out`, which need not have been
    /// written before: a kernel's output, each element written once, with no zero fill.
    #[inline(always)]
    fn store_uninit(self, out: &mut [std::mem::MaybeUninit<f32>]) {
        let lanes = self.to_array();
        if let Ok(out) = <&mut [std::mem::MaybeUninit<f32>; 16]>::try_from(&mut *out) {
            // SAFETY: 16 elements, checked by the conversion; an unaligned write.
            unsafe { out.as_mut_ptr().cast::<[f32; 16]>().write_unaligned(lanes) }
        } else {
            for (o, v) in out.iter_mut().zip(lanes) {
                o.write(v);
            }
        }
    }
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// `self · b + c`, fused where the CPU has FMA.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `2^x` of each lane, for lanes ≤ 0: [`exp2_nonpositive_fma`]'s value (below −126 a
    /// value ≤ 2^−126, not necessarily its).
    fn exp2_nonpositive(self) -> Self;
    /// [`crate::vector_math::exp_nonpositive_fma`] of each lane.
    fn exp_nonpositive(self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn div(self, other: Self) -> Self;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    /// `f32::max` of each lane and `x` (not NaN).
    fn max(self, x: f32) -> Self;
    /// `f32::clamp` of each lane.
    fn clamp(self, lo: f32, hi: f32) -> Self;
    /// Each lane's magnitude with `sign`'s sign.
    fn copysign(self, sign: Self) -> Self;
    /// `a` where `x ≥ 0`, else `b`, lane by lane.
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self;
    /// `2^k` for `k + 1.5·2^23` in each lane (see `vector_math::pow2_of_shifted`).
    fn pow2_of_shifted(self) -> Self;

    /// Every lane 0.
    #[inline(always)]
    fn zero() -> Self {
        Self::splat(0.0)
    }

    /// The first `width` lanes from `values` (all 16 when `width` is), the rest 0.
    #[inline(always)]
    fn load_first(values: &[f32], width: usize) -> Self {
        if width == 16 {
            Self::load(values[..16].try_into().unwrap())
        } else {
            Self::load_partial(&values[..width])
        }
    }

    /// The lanes as an array.
    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut out = [0f32; 16];
        self.store(&mut out);
        out
    }

    /// `rows` transposed: `out[l][k] = rows[k][l]`.
    #[inline(always)]
    fn transpose(rows: &[[f32; 16]; 16], out: &mut [[f32; 16]; 16]) {
        for (k, row) in rows.iter().enumerate() {
            for (l, v) in row.iter().enumerate() {
                out[l][k] = *v;
            }
        }
    }

    /// Each row's [`add_lanes`], row k in lane k: the same sums, bit for bit.
    #[inline(always)]
    fn sum_rows(rows: &[[f32; 16]; 16]) -> Self {
        let mut sums = [0f32; 16];
        for (s, row) in sums.iter_mut().zip(rows) {
            *s = add_lanes(*row);
        }
        Self::load(&sums)
    }
}

/// The lanes as an array, element-wise loops that LLVM turns into the target's vectors.
/// `FMA`: see [`mul_add`].
#[derive(Clone, Copy)]
pub struct Portable<const FMA: bool>([f32; 16]);

impl<const FMA: bool> Portable<FMA> {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = f(*o);
        }
        Self(out)
    }
    #[inline(always)]
    fn map2(self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(other.0) {
            *o = f(*o, b);
        }
        Self(out)
    }
}

impl<const FMA: bool> F32x16 for Portable<FMA> {
    const QUADS: bool = false;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self([x; 16])
    }
    #[inline(always)]
    fn load(x: &[f32; 16]) -> Self {
        Self(*x)
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 16]) {
        *out = self.0;
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.map2(other, |a, b| a + b)
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        self.map2(other, |a, b| a * b)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        let mut out = c.0;
        for ((o, a), b) in out.iter_mut().zip(self.0).zip(b.0) {
            *o = mul_add::<FMA>(a, b, *o);
        }
        Self(out)
    }
    #[inline(always)]
    fn exp2_nonpositive(self) -> Self {
        self.map(exp2_nonpositive_fma::<FMA>)
    }
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        self.map(exp_nonpositive_fma::<FMA>)
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.map2(other, |a, b| a - b)
    }
    #[inline(always)]
    fn div(self, other: Self) -> Self {
        self.map2(other, |a, b| a / b)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        self.map(|a| -a)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        self.map(f32::abs)
    }
    #[inline(always)]
    fn max(self, x: f32) -> Self {
        self.map(|a| a.max(x))
    }
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        self.map(|a| a.clamp(lo, hi))
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        self.map2(sign, f32::copysign)
    }
    #[inline(always)]
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self {
        let mut out = b.0;
        for ((o, x), a) in out.iter_mut().zip(x.0).zip(a.0) {
            if x >= 0.0 {
                *o = a;
            }
        }
        Self(out)
    }
    #[inline(always)]
    fn pow2_of_shifted(self) -> Self {
        self.map(pow2_of_shifted)
    }
}

/// One AVX-512 register. Only built by [`with_f32x16`] in a multiversion clone whose target
/// has AVX-512F, which is what makes its intrinsics sound to call.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Avx512(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl F32x16 for Avx512 {
    const QUADS: bool = true;
    // SAFETY (every method): an `Avx512` exists only on a CPU with AVX-512F (see the type).
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_set1_ps(x) })
    }
    #[inline(always)]
    fn load(x: &[f32; 16]) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_loadu_ps(x.as_ptr()) })
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 16]) {
        unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), self.0) }
    }
    /// A masked load: the copy through an array was a `memcpy` call per use.
    #[inline(always)]
    fn load_partial(values: &[f32]) -> Self {
        // Masked-off lanes are neither read nor faulted on.
        let mask = first_lanes(values.len());
        Self(unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, values.as_ptr()) })
    }
    #[inline(always)]
    fn store_partial(self, out: &mut [f32]) {
        let mask = first_lanes(out.len());
        unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(out.as_mut_ptr(), mask, self.0) }
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_add_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_mul_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    /// [`exp2_nonpositive_fma`]'s steps, k by `vrndscaleps` and 2^k applied by
    /// `vscalefps` (one correctly rounded product, as the exponent bits and multiply are):
    /// the same value in fewer instructions. `vscalefps` takes any k, so no clamp: below
    /// −126 this gives 2^y itself (subnormal, or 0), where the portable form gives 2^−126.
    #[inline(always)]
    fn exp2_nonpositive(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let y = self.0;
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            let f = _mm512_sub_ps(y, k);
            let mut p = _mm512_set1_ps(EXP2_POLY[4]);
            for c in EXP2_POLY[..4].iter().rev() {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
            }
            let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
            Self(_mm512_scalef_ps(p, k))
        }
    }

    /// [`exp_nonpositive_formula`]'s steps with 2^k applied by `vscalefps`, which takes
    /// any k: a single `max` at −104 (k ≥ −150, where 2^k·e^r is 0; it passes NaN on)
    /// instead of the clamp to [−87, 0], and no exponent bits to build. The same values
    /// from −87 to 0; below, e^x itself (subnormal, or 0) where the formula gives e^−87.
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let x = _mm512_max_ps(_mm512_set1_ps(-104.0), self.0);
            let shifted = _mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(MAGIC),
            );
            let k = _mm512_sub_ps(shifted, _mm512_set1_ps(MAGIC));
            // exp_reduced's steps (its r, its polynomial), as intrinsics.
            let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN_2_PARTS[0]), x);
            let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN_2_PARTS[1]), r);
            let mut p = _mm512_set1_ps(EXP_R[0]);
            for c in &EXP_R[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let e_r = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
            let e_r = _mm512_add_ps(e_r, _mm512_set1_ps(1.0));
            Self(_mm512_scalef_ps(e_r, k))
        }
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_sub_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn div(self, other: Self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_div_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn neg(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let sign = _mm512_set1_epi32(i32::MIN);
            Self(_mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(self.0),
                sign,
            )))
        }
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Self(unsafe { std::arch::x86_64::_mm512_abs_ps(self.0) })
    }
    /// `vmaxps` returns its second operand where either is NaN: `x`, as `f32::max`.
    #[inline(always)]
    fn max(self, x: f32) -> Self {
        use std::arch::x86_64::*;
        Self(unsafe { _mm512_max_ps(self.0, _mm512_set1_ps(x)) })
    }
    /// Bounds first: NaN lanes come through as the second operands, as `f32::clamp`'s.
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let y = _mm512_max_ps(_mm512_set1_ps(lo), self.0);
            Self(_mm512_min_ps(_mm512_set1_ps(hi), y))
        }
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let (m, s) = (_mm512_castps_si512(self.0), _mm512_castps_si512(sign.0));
            // Bits from `s` where the mask's bit (the sign) is set, else from `m`.
            let mask = _mm512_set1_epi32(i32::MIN);
            let bits = _mm512_or_si512(_mm512_andnot_si512(mask, m), _mm512_and_si512(mask, s));
            Self(_mm512_castsi512_ps(bits))
        }
    }
    #[inline(always)]
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let nonnegative = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x.0, _mm512_setzero_ps());
            Self(_mm512_mask_blend_ps(nonnegative, b.0, a.0))
        }
    }
    #[inline(always)]
    fn pow2_of_shifted(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let k = _mm512_sub_epi32(
                _mm512_castps_si512(self.0),
                _mm512_set1_epi32(MAGIC.to_bits() as i32 - 127),
            );
            Self(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(k)))
        }
    }

    /// Four rounds of 16 shuffles (pairs of lanes, of 64-bit pairs, then twice of 128-bit
    /// blocks), where the element loop compiled to gathers (with A's lanes, gathered then
    /// too, a fifth of a 4-step scan's samples). (Loops, not `from_fn`: its closure is a
    /// function the intrinsics are not inlined into.)
    #[inline(always)]
    fn transpose(rows: &[[f32; 16]; 16], out: &mut [[f32; 16]; 16]) {
        use std::arch::x86_64::*;
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (r, row) in r.iter_mut().zip(rows) {
                *r = _mm512_loadu_ps(row.as_ptr());
            }
            // Per 128-bit block β, of rows 2j, 2j + 1: elements 4β, 4β + 1 interleaved in
            // t[2j], 4β + 2, 4β + 3 in t[2j + 1].
            let mut t = [_mm512_setzero_ps(); 16];
            for j in 0..8 {
                t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
                t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
            }
            // u[4q + m], block β: rows 4q .. 4q + 4 of element 4β + m.
            let mut u = [_mm512_setzero_ps(); 16];
            for q in 0..4 {
                let [t0, t1, t2, t3] = [0, 1, 2, 3].map(|i| t[4 * q + i]);
                let (t0, t1) = (_mm512_castps_pd(t0), _mm512_castps_pd(t1));
                let (t2, t3) = (_mm512_castps_pd(t2), _mm512_castps_pd(t3));
                u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
                u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
                u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
                u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
            }
            // v[8h + m], of rows 8h .. 8h + 8: blocks of elements m, 8 + m (rows 8h .. 8h + 4),
            // m, 8 + m (rows 8h + 4 .. 8h + 8); v[8h + 4 + m] the same of 4 + m, 12 + m.
            let mut v = [_mm512_setzero_ps(); 16];
            for h in 0..2 {
                for m in 0..4 {
                    let (a, b) = (u[8 * h + m], u[8 * h + 4 + m]);
                    v[8 * h + m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                    v[8 * h + 4 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
                }
            }
            // Element l: its blocks of rows 0 .. 8 from v[l % 8], of rows 8 .. 16 from
            // v[8 + l % 8].
            for l in 0..8 {
                let (a, b) = (v[l], v[8 + l]);
                let low = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                let high = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
                _mm512_storeu_ps(out[l].as_mut_ptr(), low);
                _mm512_storeu_ps(out[8 + l].as_mut_ptr(), high);
            }
        }
    }

    /// [`add_lanes`]' tree for 16 rows at once, a level per step: halves of pairs of rows
    /// swapped in by shuffles and added, 46 vector operations where 16 separate sums took
    /// about 15 scalar ones each. Lane `4j + m` ends up holding row `j + 4m`: one permute
    /// puts it in place.
    #[inline(always)]
    fn sum_rows(rows: &[[f32; 16]; 16]) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            // Loops, not `std::array::from_fn`: its closures are functions of their own,
            // without AVX-512 enabled, across which the intrinsics did not inline (a call
            // per shuffle where the caller's body was large).
            let zero = _mm512_setzero_ps();
            let mut r = [zero; 16];
            for (v, row) in r.iter_mut().zip(rows) {
                *v = _mm512_loadu_ps(row.as_ptr());
            }
            // Lanes i + 8: row pairs, each 256-bit half one row's 8 sums.
            let mut h8 = [zero; 8];
            for (j, h) in h8.iter_mut().enumerate() {
                let (a, b) = (r[2 * j], r[2 * j + 1]);
                *h = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
                );
            }
            // Lanes i + 4: four rows, a 128-bit block each.
            let mut h4 = [zero; 4];
            for (j, h) in h4.iter_mut().enumerate() {
                let (a, b) = (h8[2 * j], h8[2 * j + 1]);
                *h = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                );
            }
            // Lanes i + 2: block j holds rows j, 4 + j (of 0..8, or 8..16), two sums each.
            let mut h2 = [zero; 2];
            for (j, h) in h2.iter_mut().enumerate() {
                let (a, b) = (_mm512_castps_pd(h4[2 * j]), _mm512_castps_pd(h4[2 * j + 1]));
                *h = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
                );
            }
            // Lane 4j + m: row j + 4m.
            let sums = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(h2[0], h2[1]),
                _mm512_shuffle_ps::<0b11_01_11_01>(h2[0], h2[1]),
            );
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            Self(_mm512_permutexvar_ps(order, sums))
        }
    }
}

/// Two AVX2 registers of eight lanes. Only built by [`with_f32x16`] in a multiversion clone
/// whose target has AVX2 and FMA, which is what makes its intrinsics sound to call. Without
/// it, kernels on such CPUs took [`Portable`] lanes, whose element loops LLVM left scalar
/// where a function's body branches (GELU's erf: a fifth of a default-recipe step on an
/// AVX2-only EPYC).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Avx2([std::arch::x86_64::__m256; 2]);

/// `Avx2`'s operations on both registers. (A macro, not a closure: see the module.)
#[cfg(target_arch = "x86_64")]
macro_rules! both {
    ($f:ident($($x:expr),+)) => {
        // SAFETY: an `Avx2` exists only on a CPU with AVX2 and FMA (see the type).
        Avx2(unsafe { [$f($($x.0[0]),+), $f($($x.0[1]),+)] })
    };
}

/// The lanes of an 8-lane half that lie in the first `len` of 16, from `from`: a mask
/// for `vmaskmovps` (each lane's sign bit).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx2_first_lanes(len: usize, from: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let n = len.saturating_sub(from).min(8) as i32;
    // SAFETY: AVX2's, on a CPU with it (see `Avx2`).
    unsafe {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// 2^k from the bits of `shifted = k + MAGIC` ([`pow2_of_shifted`]).
    #[inline(always)]
    fn pow2(shifted: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: see the type.
        unsafe {
            let k = _mm256_sub_epi32(
                _mm256_castps_si256(shifted),
                _mm256_set1_epi32(MAGIC.to_bits() as i32 - 127),
            );
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(k))
        }
    }

    /// [`exp2_nonpositive_fma`]'s steps on one register, bit for bit.
    #[inline(always)]
    fn exp2_half(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: see the type.
        unsafe {
            // `vmaxps` gives its second operand where either is NaN: −126, as `f32::max`.
            let y = _mm256_max_ps(y, _mm256_set1_ps(-126.0));
            let shifted = _mm256_add_ps(y, _mm256_set1_ps(MAGIC));
            let k = _mm256_sub_ps(shifted, _mm256_set1_ps(MAGIC));
            let f = _mm256_sub_ps(y, k);
            let mut p = _mm256_set1_ps(EXP2_POLY[4]);
            for c in EXP2_POLY[..4].iter().rev() {
                p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
            }
            let p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
            _mm256_mul_ps(p, Self::pow2(shifted))
        }
    }

    /// [`crate::vector_math::exp_nonpositive_formula`]'s steps on one register, bit for bit.
    #[inline(always)]
    fn exp_half(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: see the type.
        unsafe {
            let x = _mm256_min_ps(_mm256_set1_ps(0.0), _mm256_max_ps(_mm256_set1_ps(-87.0), x));
            let shifted = _mm256_fmadd_ps(
                x,
                _mm256_set1_ps(std::f32::consts::LOG2_E),
                _mm256_set1_ps(MAGIC),
            );
            let k = _mm256_sub_ps(shifted, _mm256_set1_ps(MAGIC));
            // exp_reduced's steps: −k·c + x is `vfnmadd`, the same rounding.
            let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN_2_PARTS[0]), x);
            let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN_2_PARTS[1]), r);
            let mut p = _mm256_set1_ps(EXP_R[0]);
            for c in &EXP_R[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let e_r = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r);
            let e_r = _mm256_add_ps(e_r, _mm256_set1_ps(1.0));
            _mm256_mul_ps(e_r, Self::pow2(shifted))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl F32x16 for Avx2 {
    const QUADS: bool = true;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY (every method): see the type.
        let v = unsafe { std::arch::x86_64::_mm256_set1_ps(x) };
        Self([v, v])
    }
    #[inline(always)]
    fn load(x: &[f32; 16]) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            Self([
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(x.as_ptr().add(8)),
            ])
        }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 16]) {
        use std::arch::x86_64::*;
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), self.0[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), self.0[1]);
        }
    }
    /// Masked loads (`vmaskmovps` neither reads nor faults on masked-off lanes): the copy
    /// through an array is a `memcpy` call per use.
    #[inline(always)]
    fn load_partial(values: &[f32]) -> Self {
        use std::arch::x86_64::*;
        let p = values.as_ptr();
        let len = values.len();
        unsafe {
            Self([
                _mm256_maskload_ps(p, avx2_first_lanes(len, 0)),
                _mm256_maskload_ps(p.wrapping_add(8), avx2_first_lanes(len, 8)),
            ])
        }
    }
    #[inline(always)]
    fn store_partial(self, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let (p, len) = (out.as_mut_ptr(), out.len());
        unsafe {
            _mm256_maskstore_ps(p, avx2_first_lanes(len, 0), self.0[0]);
            _mm256_maskstore_ps(p.wrapping_add(8), avx2_first_lanes(len, 8), self.0[1]);
        }
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        use std::arch::x86_64::_mm256_add_ps;
        both!(_mm256_add_ps(self, other))
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        use std::arch::x86_64::_mm256_mul_ps;
        both!(_mm256_mul_ps(self, other))
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        use std::arch::x86_64::_mm256_fmadd_ps;
        both!(_mm256_fmadd_ps(self, b, c))
    }
    #[inline(always)]
    fn exp2_nonpositive(self) -> Self {
        Self([Self::exp2_half(self.0[0]), Self::exp2_half(self.0[1])])
    }
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        Self([Self::exp_half(self.0[0]), Self::exp_half(self.0[1])])
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        use std::arch::x86_64::_mm256_sub_ps;
        both!(_mm256_sub_ps(self, other))
    }
    #[inline(always)]
    fn div(self, other: Self) -> Self {
        use std::arch::x86_64::_mm256_div_ps;
        both!(_mm256_div_ps(self, other))
    }
    #[inline(always)]
    fn neg(self) -> Self {
        use std::arch::x86_64::*;
        let sign = Self::splat(-0.0);
        both!(_mm256_xor_ps(self, sign))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        use std::arch::x86_64::*;
        let sign = Self::splat(-0.0);
        both!(_mm256_andnot_ps(sign, self))
    }
    /// `vmaxps` returns its second operand where either is NaN: `x`, as `f32::max`.
    #[inline(always)]
    fn max(self, x: f32) -> Self {
        use std::arch::x86_64::_mm256_max_ps;
        let x = Self::splat(x);
        both!(_mm256_max_ps(self, x))
    }
    /// Bounds first: NaN lanes come through as the second operands, as `f32::clamp`'s.
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        use std::arch::x86_64::{_mm256_max_ps, _mm256_min_ps};
        let (lo, hi) = (Self::splat(lo), Self::splat(hi));
        let y = both!(_mm256_max_ps(lo, self));
        both!(_mm256_min_ps(hi, y))
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        use std::arch::x86_64::*;
        let mask = Self::splat(-0.0);
        let magnitude = both!(_mm256_andnot_ps(mask, self));
        let sign = both!(_mm256_and_ps(mask, sign));
        both!(_mm256_or_ps(magnitude, sign))
    }
    #[inline(always)]
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self {
        use std::arch::x86_64::*;
        let zero = Self::splat(0.0);
        // SAFETY: see the type.
        let nonnegative = unsafe {
            Self([
                _mm256_cmp_ps::<_CMP_GE_OQ>(x.0[0], zero.0[0]),
                _mm256_cmp_ps::<_CMP_GE_OQ>(x.0[1], zero.0[1]),
            ])
        };
        both!(_mm256_blendv_ps(b, a, nonnegative))
    }
    #[inline(always)]
    fn pow2_of_shifted(self) -> Self {
        Self([Self::pow2(self.0[0]), Self::pow2(self.0[1])])
    }
}

/// The mask of the first `len` (at most 16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn first_lanes(len: usize) -> u16 {
    if len >= 16 {
        u16::MAX
    } else {
        (1u16 << len) - 1
    }
}

/// Asks the CPU to bring the cache line holding `at` into its caches ahead of a load: a
/// hint, with no effect on any value, that never faults (any address will do).
#[inline(always)]
pub fn prefetch(at: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and faults on no address; SSE is x86-64's baseline.
    unsafe {
        use std::arch::x86_64::*;
        _mm_prefetch::<_MM_HINT_T0>(at.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Elements in a [`Quad`].
pub const QUAD: usize = 64;

/// How many of `n` elements a kernel on lanes `V` runs as [`Quad`]s: the whole ones where
/// `V` takes them ([`F32x16::QUADS`]), none otherwise; the rest go one by one.
#[inline(always)]
pub fn quad_part<V: F32x16>(n: usize) -> usize {
    if V::QUADS { n / QUAD * QUAD } else { 0 }
}

/// Four [`F32x16`] as one [`Real`]: each operation on all four side by side, so a function
/// written in `Real` (an exp, a division, a series) runs four independent chains at once.
/// Applied to one vector at a time, such a chain of some 100 cycles' latency is more than
/// out-of-order execution hides: perf had the fused Δ's softplus at a third of its
/// arithmetic's rate, stalled on each step. (Arrays of 64 f32 as the value instead made
/// LLVM shuffle lanes through the stack; the explicit vectors stay in registers.)
#[derive(Clone, Copy)]
pub struct Quad<V>(pub [V; 4]);

impl<V: F32x16> Quad<V> {
    /// The 64 values at the start of `values`.
    #[inline(always)]
    pub fn load(values: &[f32]) -> Self {
        let values: &[f32; QUAD] = values[..QUAD].try_into().unwrap();
        let mut out = [V::zero(); 4];
        for (v, x) in out.iter_mut().zip(values.chunks_exact(16)) {
            *v = V::load(x.try_into().unwrap());
        }
        Self(out)
    }

    /// The 64 values at `at` in each of `slices`.
    #[inline(always)]
    pub fn load_each<const N: usize>(slices: [&[f32]; N], at: usize) -> [Self; N] {
        let mut out = [Self([V::zero(); 4]); N];
        for (q, values) in out.iter_mut().zip(slices) {
            *q = Self::load(&values[at..]);
        }
        out
    }

    /// `values` (at most 64) followed by 0s: a row's tail past its whole Quads as one more.
    #[inline(always)]
    pub fn load_padded(values: &[f32]) -> Self {
        let mut out = [V::zero(); 4];
        for (v, part) in out.iter_mut().zip(values.chunks(16)) {
            *v = V::load_partial(part);
        }
        Self(out)
    }

    /// The first `out.len()` (at most 64) values into `out`: [`Self::load_padded`]'s way back.
    #[inline(always)]
    pub fn store_first(self, out: &mut [f32]) {
        for (v, part) in self.0.iter().zip(out.chunks_mut(16)) {
            v.store_partial(part);
        }
    }

    /// Writes the 64 values to the start of `out`, which need not have been written
    /// before ([`F32x16::store_uninit`]).
    #[inline(always)]
    pub fn store_uninit(self, out: &mut [std::mem::MaybeUninit<f32>]) {
        for (v, o) in self.0.iter().zip(out[..QUAD].chunks_exact_mut(16)) {
            v.store_uninit(o);
        }
    }

    /// Writes the 64 values to the start of `out`.
    #[inline(always)]
    pub fn store(self, out: &mut [f32]) {
        let out: &mut [f32; QUAD] = (&mut out[..QUAD]).try_into().unwrap();
        for (v, o) in self.0.iter().zip(out.chunks_exact_mut(16)) {
            v.store(o.try_into().unwrap());
        }
    }
}

/// `Quad`'s operations lane-group by lane-group. (Loops, not closures: see the module.)
macro_rules! quad_binary {
    ($trait:ident, $method:ident, $op:ident) => {
        impl<V: F32x16> std::ops::$trait for Quad<V> {
            type Output = Self;
            #[inline(always)]
            fn $method(self, other: Self) -> Self {
                let mut out = self.0;
                for (o, b) in out.iter_mut().zip(other.0) {
                    *o = o.$op(b);
                }
                Self(out)
            }
        }
        impl<V: F32x16> std::ops::$trait<f32> for Quad<V> {
            type Output = Self;
            #[inline(always)]
            fn $method(self, other: f32) -> Self {
                let (mut out, b) = (self.0, V::splat(other));
                for o in out.iter_mut() {
                    *o = o.$op(b);
                }
                Self(out)
            }
        }
    };
}
quad_binary!(Add, add, add);
quad_binary!(Sub, sub, sub);
quad_binary!(Mul, mul, mul);
quad_binary!(Div, div, div);

impl<V: F32x16> std::ops::Neg for Quad<V> {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.neg();
        }
        Self(out)
    }
}

impl<V: F32x16> Real for Quad<V> {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self([V::splat(x); 4])
    }
    /// Fused wherever `V` has FMA, whatever `FMA` says: a kernel passes its clone's
    /// [`crate::vector_math::has_fma`], which agrees.
    #[inline(always)]
    fn mul_add<const FMA: bool>(self, b: Self, c: Self) -> Self {
        let mut out = c.0;
        for ((o, a), b) in out.iter_mut().zip(self.0).zip(b.0) {
            *o = a.mul_add(b, *o);
        }
        Self(out)
    }
    #[inline(always)]
    fn max(self, x: f32) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.max(x);
        }
        Self(out)
    }
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.clamp(lo, hi);
        }
        Self(out)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.abs();
        }
        Self(out)
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        let mut out = self.0;
        for (o, s) in out.iter_mut().zip(sign.0) {
            *o = o.copysign(s);
        }
        Self(out)
    }
    #[inline(always)]
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self {
        let mut out = b.0;
        for ((o, x), a) in out.iter_mut().zip(x.0).zip(a.0) {
            *o = V::select_nonnegative(x, a, *o);
        }
        Self(out)
    }
    /// Each lane group's [`F32x16::exp_nonpositive`] (AVX-512's own form where `V` has it).
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.exp_nonpositive();
        }
        Self(out)
    }
    #[inline(always)]
    fn pow2_of_shifted(self) -> Self {
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = o.pow2_of_shifted();
        }
        Self(out)
    }
}

/// Runs `$body` with `$v` the [`F32x16`] type for the multiversion clone this expands in:
/// [`Avx512`] where its target has AVX-512F, [`Avx2`] where it has AVX2 and FMA, [`Portable`]
/// otherwise. Only inside a `#[multiversion]` function's body.
macro_rules! with_f32x16 {
    ($v:ident => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if multiversion::target::selected_target!().supports_feature_str("avx512f") {
                type $v = $crate::f32x16::Avx512;
                $body
            } else if multiversion::target::selected_target!().supports_feature_str("avx2")
                && $crate::vector_math::has_fma!()
            {
                type $v = $crate::f32x16::Avx2;
                $body
            } else if $crate::vector_math::has_fma!() {
                type $v = $crate::f32x16::Portable<true>;
                $body
            } else {
                type $v = $crate::f32x16::Portable<false>;
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            if $crate::vector_math::has_fma!() {
                type $v = $crate::f32x16::Portable<true>;
                $body
            } else {
                type $v = $crate::f32x16::Portable<false>;
                $body
            }
        }
    }};
}
pub(crate) use with_f32x16;

/// Runs `$body` with `$name` a `usize` constant equal to `$value`, one of the listed sizes,
/// so that each size gets its own code: a kernel's `[V; N]` arrays (state rows, a conv's
/// taps) then live in registers. Any other value panics.
macro_rules! with_const {
    ($value:expr, $name:ident in [$($n:literal),+] => $body:expr) => {
        match $value {
            $(
                $n => {
                    const $name: usize = $n;
                    $body
                }
            )+
            other => panic!("no kernel for {} = {other}", stringify!($name)),
        }
    };
}
pub(crate) use with_const;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector_math::{
        erf_of, exp_nonpositive_of, ln_1p_unit_of, sigmoid_and_exp_in, softplus_in,
    };

    /// Whether the CPU has AVX2 and FMA, what [`Avx2`] needs.
    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// A function of 16 lanes compiled for a target feature the CPU may lack.
    #[cfg(target_arch = "x86_64")]
    type LaneFunction = unsafe fn(&[f32; 16]) -> [f32; 16];

    /// Runs `ours` (a function of 16 lanes, AVX-512F or AVX2 enabled) and `portable` over
    /// 320,000 points from 0 down to `lo`, and `extra` values in the first lanes, and hands
    /// `check` each point with both results. Where the CPU lacks what `ours` needs (`has`)
    /// there is nothing to compare: nothing runs.
    #[cfg(target_arch = "x86_64")]
    fn against_portable(
        (lo, extra): (f32, &[f32]),
        (has, ours): (fn() -> bool, LaneFunction),
        portable: fn(Portable<true>) -> Portable<true>,
        check: impl Fn(f32, f32, f32),
    ) {
        if !has() {
            return;
        }
        let mut xs: Vec<f32> = (0..16 * 20_000)
            .map(|i| lo * i as f32 / 320_000.0)
            .collect();
        xs[..extra.len()].copy_from_slice(extra);
        for lanes in xs.chunks_exact(16) {
            let lanes: &[f32; 16] = lanes.try_into().unwrap();
            // SAFETY: the CPU has what `ours` needs, checked above.
            let got = unsafe { ours(lanes) };
            let theirs = portable(Portable::<true>::load(lanes)).to_array();
            for ((x, got), theirs) in lanes.iter().zip(got).zip(theirs) {
                check(*x, got, theirs);
            }
        }
    }

    /// [`Avx512`]'s `2^x` is [`Portable`]'s, bit for bit, over the whole range, and past it
    /// (below −126) no more than 2^−126.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_exp2_equals_the_portable_one() {
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn exp2_avx512(x: &[f32; 16]) -> [f32; 16] {
            Avx512::load(x).exp2_nonpositive().to_array()
        }
        against_portable(
            (-130.0, &[]),
            (|| std::is_x86_feature_detected!("avx512f"), exp2_avx512),
            |p| p.exp2_nonpositive(),
            |x, ours, theirs| {
                if x >= -126.0 {
                    assert_eq!(ours.to_bits(), theirs.to_bits(), "2^{x}");
                } else {
                    assert!((0.0..=2f32.powi(-126)).contains(&ours), "2^{x}: {ours}");
                }
            },
        );
    }

    /// [`Avx512`]'s `e^x` is the portable one's, bit for bit, from −87 to 0; below, no more
    /// than e^−87 (the portable form's floor); NaN stays NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_exp_equals_the_portable_one() {
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn exp_avx512(x: &[f32; 16]) -> [f32; 16] {
            Avx512::load(x).exp_nonpositive().to_array()
        }
        let extra = [0.0, -0.0, f32::NAN, f32::NEG_INFINITY];
        against_portable(
            (-120.0, &extra),
            (|| std::is_x86_feature_detected!("avx512f"), exp_avx512),
            |p| p.exp_nonpositive(),
            |x, ours, theirs| {
                if x.is_nan() {
                    assert!(ours.is_nan(), "e^NaN: {ours}");
                } else if x >= -87.0 {
                    assert_eq!(ours.to_bits(), theirs.to_bits(), "e^{x}");
                } else {
                    assert!((0.0..=theirs).contains(&ours), "e^{x}: {ours}");
                }
            },
        );
    }

    /// [`Avx2`]'s `2^x` and `e^x` are [`Portable`]'s, bit for bit, everywhere: the same
    /// steps, clamps included (NaN: `2^x` takes −126 as `f32::max` does, `e^x` stays NaN).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_exp2_and_exp_equal_the_portable_ones() {
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp2_avx2(x: &[f32; 16]) -> [f32; 16] {
            Avx2::load(x).exp2_nonpositive().to_array()
        }
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp_avx2(x: &[f32; 16]) -> [f32; 16] {
            Avx2::load(x).exp_nonpositive().to_array()
        }
        let extra = [0.0, -0.0, f32::NAN, f32::NEG_INFINITY, -1e30];
        let same = |x: f32, ours: f32, theirs: f32| {
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "at {x}: {ours} against {theirs}"
            )
        };
        against_portable(
            (-130.0, &extra),
            (has_avx2, exp2_avx2),
            |p| p.exp2_nonpositive(),
            same,
        );
        against_portable(
            (-120.0, &extra),
            (has_avx2, exp_avx2),
            |p| p.exp_nonpositive(),
            same,
        );
    }

    /// [`Avx512`]'s shuffled transpose and the portable element loop both give
    /// `out[l][k] = rows[k][l]` (the AVX-512 one where the CPU has it).
    #[test]
    fn transposes_transpose() {
        let rows: [[f32; 16]; 16] =
            std::array::from_fn(|k| std::array::from_fn(|l| (16 * k + l) as f32 + 0.5));
        let check = |out: &[[f32; 16]; 16], form: &str| {
            for (k, row) in rows.iter().enumerate() {
                for (l, v) in row.iter().enumerate() {
                    assert_eq!(out[l][k], *v, "{form}: element ({k}, {l})");
                }
            }
        };
        let mut out = [[0f32; 16]; 16];
        Portable::<true>::transpose(&rows, &mut out);
        check(&out, "portable");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            /// # Safety
            /// The CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn transpose_avx512(rows: &[[f32; 16]; 16], out: &mut [[f32; 16]; 16]) {
                Avx512::transpose(rows, out)
            }
            let mut out = [[0f32; 16]; 16];
            // SAFETY: checked above.
            unsafe { transpose_avx512(&rows, &mut out) };
            check(&out, "AVX-512");
        }
    }

    /// Masked loads and stores of 0 to 64 values, by `round_trip` (a [`Quad`]'s
    /// `load_padded`, `store_first` and `store`): the values in the first lanes, zeros in
    /// the rest, and nothing past the end written (a guard value after it stays).
    fn check_partial_loads_and_stores(round_trip: impl Fn(&[f32], &mut [f32]) -> [f32; QUAD]) {
        let values: Vec<f32> = (0..QUAD).map(|i| i as f32 + 0.5).collect();
        for len in 0..=QUAD {
            let (mut ours, mut portable) = (vec![-1f32; len + 1], vec![-1f32; len + 1]);
            let lanes = round_trip(&values[..len], &mut ours[..len]);
            let q = Quad::<Portable<false>>::load_padded(&values[..len]);
            q.store_first(&mut portable[..len]);
            let mut expected = [0f32; QUAD];
            q.store(&mut expected);
            assert_eq!(lanes, expected, "lanes of {len} values");
            assert_eq!(ours, portable, "stored {len} values");
            assert_eq!(ours[len], -1.0, "past {len} values");
        }
    }

    /// A [`Quad`]'s padded load, its first values stored, and all its lanes.
    #[inline(always)]
    fn round_trip<V: F32x16>(values: &[f32], out: &mut [f32]) -> [f32; QUAD] {
        let q = Quad::<V>::load_padded(values);
        q.store_first(out);
        let mut all = [0f32; QUAD];
        q.store(&mut all);
        all
    }

    #[test]
    fn avx512_partial_loads_and_stores_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            /// # Safety
            /// The CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn round_trip_avx512(values: &[f32], out: &mut [f32]) -> [f32; QUAD] {
                round_trip::<Avx512>(values, out)
            }
            // SAFETY: AVX-512F was detected above.
            check_partial_loads_and_stores(|v, o| unsafe { round_trip_avx512(v, o) });
        }
    }

    #[test]
    fn avx2_partial_loads_and_stores_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            /// # Safety
            /// The CPU has AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn round_trip_avx2(values: &[f32], out: &mut [f32]) -> [f32; QUAD] {
                round_trip::<Avx2>(values, out)
            }
            // SAFETY: checked above.
            check_partial_loads_and_stores(|v, o| unsafe { round_trip_avx2(v, o) });
        }
    }

    /// [`Avx512::sum_rows`]' shuffles put each row's [`add_lanes`] in its lane, bit for
    /// bit (values of mixed magnitudes, so that another order of additions would round
    /// differently).
    #[test]
    fn avx512_row_sums_equal_add_lanes() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            /// # Safety
            /// The CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn sums_avx512(rows: &[[f32; 16]; 16]) -> [f32; 16] {
                Avx512::sum_rows(rows).to_array()
            }
            let mut seed = 7u32;
            let mut next = || {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let scale = [1e-3, 1.0, 1e4][(seed >> 30) as usize % 3];
                (seed >> 8) as f32 / (1 << 24) as f32 * scale - scale / 2.0
            };
            for _ in 0..50 {
                let rows: [[f32; 16]; 16] =
                    std::array::from_fn(|_| std::array::from_fn(|_| next()));
                // SAFETY: checked above.
                let ours = unsafe { sums_avx512(&rows) };
                let want = rows.map(add_lanes);
                assert_eq!(ours.map(f32::to_bits), want.map(f32::to_bits));
                let portable = Portable::<true>::sum_rows(&rows).to_array();
                assert_eq!(portable.map(f32::to_bits), want.map(f32::to_bits));
            }
        }
    }

    /// The element-wise functions on the Quads at `x` (`x` as the arguments, or where a
    /// function needs them, `−|x|` or `|x|` up to 1).
    #[inline(always)]
    fn on_quads<V: F32x16>(x: &[f32]) -> [[f32; QUAD]; 6] {
        let q = Quad::<V>::load(x);
        let results = [
            exp_nonpositive_of::<Quad<V>, true>(-q.abs()),
            ln_1p_unit_of::<Quad<V>, true>(q.abs().clamp(0.0, 1.0)),
            erf_of::<Quad<V>, true>(q),
            sigmoid_and_exp_in::<Quad<V>, true>(q).0,
            sigmoid_and_exp_in::<Quad<V>, true>(q).1,
            softplus_in::<Quad<V>, true>(q),
        ];
        results.map(|r| {
            let mut out = [0f32; QUAD];
            r.store(&mut out);
            out
        })
    }

    /// `quads` (of [`on_quads`]) equal f32's functions (with FMA) bit for bit, over
    /// arguments of both signs, zeros, large magnitudes and a NaN, but where `floor` allows
    /// values under e^−87 (1.6e-38) to differ from the portable exp's floor.
    fn check_quads(quads: impl Fn(&[f32]) -> [[f32; QUAD]; 6], floor: bool) {
        let scalar: [fn(f32) -> f32; 6] = [
            |x| exp_nonpositive_of::<f32, true>(-x.abs()),
            |x| ln_1p_unit_of::<f32, true>(x.abs().clamp(0.0, 1.0)),
            erf_of::<f32, true>,
            |x| sigmoid_and_exp_in::<f32, true>(x).0,
            |x| sigmoid_and_exp_in::<f32, true>(x).1,
            softplus_in::<f32, true>,
        ];
        let mut xs: Vec<f32> = (0..40 * QUAD)
            .map(|i| (i as f32 - 20.0 * QUAD as f32) * 0.037)
            .collect();
        xs[..6].copy_from_slice(&[0.0, -0.0, 1e-30, -200.0, 200.0, f32::NAN]);
        for x in xs.chunks_exact(QUAD) {
            let ours = quads(x);
            for (f, (ours, f32s)) in ours.iter().zip(scalar).enumerate() {
                for (o, &v) in ours.iter().zip(x) {
                    let want = f32s(v);
                    let under_floor = floor && (o - want).abs() <= 2e-38;
                    assert!(
                        o.to_bits() == want.to_bits()
                            || (o.is_nan() && want.is_nan())
                            || under_floor,
                        "function {f} at {v}: {o} against {want}"
                    );
                }
            }
        }
    }

    /// [`Quad`] of [`Avx512`] computes the element-wise functions bit for bit as f32 does:
    /// its intrinsics (select, copysign, clamp, the exponent bits) implement f32's
    /// semantics. (Except under e^−87, where its exp goes on down past the portable one's
    /// floor, see `Avx512::exp_nonpositive`.)
    #[test]
    fn avx512_quads_equal_f32_functions() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
            /// # Safety
            /// The CPU has AVX-512F and DQ.
            #[target_feature(enable = "avx512f,avx512dq,fma")]
            unsafe fn quads(x: &[f32]) -> [[f32; QUAD]; 6] {
                on_quads::<Avx512>(x)
            }
            // SAFETY: checked above.
            check_quads(|x| unsafe { quads(x) }, true);
        }
    }

    /// [`Quad`] of [`Avx2`] computes the element-wise functions bit for bit as f32 does,
    /// everywhere.
    #[test]
    fn avx2_quads_equal_f32_functions() {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            /// # Safety
            /// The CPU has AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn quads(x: &[f32]) -> [[f32; QUAD]; 6] {
                on_quads::<Avx2>(x)
            }
            // SAFETY: checked above.
            check_quads(|x| unsafe { quads(x) }, false);
        }
    }
}

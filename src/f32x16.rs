//! Sixteen f32 lanes as one value: one AVX-512 register where the CPU has them, an array
//! that LLVM vectorises otherwise (on AVX2, as well as two registers written out by hand:
//! tried, and no faster). Kernels written against [`F32x16`] keep a value per lane
//! in a register across a loop, where plain arrays of lanes let LLVM vectorise across the
//! wrong loop (gathers and scatters of every lane; see `mixers::selective_scan`).
//!
//! A kernel is generic over the type and picks it inside a `#[multiversion]` function with
//! [`with_f32x16`], so that [`Avx512`] is only ever built in a clone for a CPU with AVX-512.
//! Its intrinsics inline only into code compiled for AVX-512, that is, into that clone
//! through `#[inline(always)]` functions: a closure is a function of its own, so a kernel
//! uses loops, not closures, around these operations (one closure made a backward 14×
//! slower, an intrinsic call per vector).

use crate::vector_math::{EXP2_POLY, add_lanes, exp2_nonpositive_fma, mul_add};

/// Sixteen f32 lanes and the element-wise operations kernels use on them.
pub trait F32x16: Copy {
    /// Every lane `x`.
    fn splat(x: f32) -> Self;
    /// The lanes of `x`.
    fn load(x: &[f32; 16]) -> Self;
    /// Writes the lanes to `out`.
    fn store(self, out: &mut [f32; 16]);
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// `self · b + c`, fused where the CPU has FMA.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `2^x` of each lane, for lanes ≤ 0: [`exp2_nonpositive_fma`]'s value.
    fn exp2_nonpositive(self) -> Self;

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
            let mut lanes = [0f32; 16];
            lanes[..width].copy_from_slice(&values[..width]);
            Self::load(&lanes)
        }
    }

    /// The lanes as an array.
    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut out = [0f32; 16];
        self.store(&mut out);
        out
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
    fn map2(self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(other.0) {
            *o = f(*o, b);
        }
        Self(out)
    }
}

impl<const FMA: bool> F32x16 for Portable<FMA> {
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
        let mut out = self.0;
        for o in out.iter_mut() {
            *o = exp2_nonpositive_fma::<FMA>(*o);
        }
        Self(out)
    }
}

/// One AVX-512 register. Only built by [`with_f32x16`] in a multiversion clone whose target
/// has AVX-512F, which is what makes its intrinsics sound to call.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Avx512(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl F32x16 for Avx512 {
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
    /// the same value in fewer instructions.
    #[inline(always)]
    fn exp2_nonpositive(self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let y = _mm512_min_ps(
                _mm512_max_ps(self.0, _mm512_set1_ps(-126.0)),
                _mm512_setzero_ps(),
            );
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            let f = _mm512_sub_ps(y, k);
            let mut p = _mm512_set1_ps(EXP2_POLY[5]);
            for c in EXP2_POLY[..5].iter().rev() {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
            }
            let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
            Self(_mm512_scalef_ps(p, k))
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
            let r: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(rows[k].as_ptr()));
            // Lanes i + 8: row pairs, each 256-bit half one row's 8 sums.
            let h8: [__m512; 8] = std::array::from_fn(|j| {
                let (a, b) = (r[2 * j], r[2 * j + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
                )
            });
            // Lanes i + 4: four rows, a 128-bit block each.
            let h4: [__m512; 4] = std::array::from_fn(|j| {
                let (a, b) = (h8[2 * j], h8[2 * j + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                )
            });
            // Lanes i + 2: block j holds rows j, 4 + j (of 0..8, or 8..16), two sums each.
            let h2: [__m512; 2] = std::array::from_fn(|j| {
                let (a, b) = (_mm512_castps_pd(h4[2 * j]), _mm512_castps_pd(h4[2 * j + 1]));
                _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
                )
            });
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

/// Runs `$body` with `$v` the [`F32x16`] type for the multiversion clone this expands in:
/// [`Avx512`] where its target has AVX-512F, [`Portable`] otherwise. Only inside a
/// `#[multiversion]` function's body.
macro_rules! with_f32x16 {
    ($v:ident => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if multiversion::target::selected_target!().supports_feature_str("avx512f") {
                type $v = $crate::f32x16::Avx512;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Avx512`]'s `2^x` is [`Portable`]'s, bit for bit, over the whole range and past
    /// its clamp (where the CPU has AVX-512F; elsewhere there is no `Avx512` to compare).
    #[test]
    fn avx512_exp2_equals_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            /// # Safety
            /// The CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn exp2_avx512(x: &[f32; 16]) -> [f32; 16] {
                Avx512::load(x).exp2_nonpositive().to_array()
            }
            let xs: Vec<f32> = (0..16 * 20_000)
                .map(|i| -130.0 * i as f32 / 320_000.0)
                .collect();
            for lanes in xs.chunks_exact(16) {
                let lanes: &[f32; 16] = lanes.try_into().unwrap();
                // SAFETY: checked above.
                let ours = unsafe { exp2_avx512(lanes) };
                let portable = Portable::<true>::load(lanes).exp2_nonpositive().to_array();
                assert_eq!(
                    ours.map(f32::to_bits),
                    portable.map(f32::to_bits),
                    "{lanes:?}"
                );
            }
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
}

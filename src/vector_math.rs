//! Element-wise math written so that loops over slices vectorise: libm's `expf` and `erff`
//! are a call per element, and a large share of a small model's step on the CPU (perf).
//! No stable crate offers vectorisable versions, so these are the classic approximations,
//! branch-free, each tested against libm.
//!
//! The crate is built for baseline x86-64, whose loops vectorise to 4-lane SSE2 without FMA.
//! The loops that call these are `#[multiversion(targets(...))]`: compiled again for
//! AVX-512, AVX2 and SSE4.2 and chosen at run time, as Burn's own kernels choose their
//! instructions. The targets are listed at each kernel: multiversion's `"simd"` shorthand
//! leaves AVX-512 out (written before Rust 1.89 made it stable), which kept the kernels on
//! AVX2 until this was noticed.
//!
//! Rust never fuses `a * b + c` into one instruction by itself. The `…_fma` forms take the
//! choice as a constant: a kernel passes [`has_fma`]`!()`, true in its AVX-512 and AVX2
//! clones, so those get fused multiply-adds (half the instructions in a polynomial) and the
//! baseline clone keeps its separate products and sums.

/// `Σ xᵢ` in 16 interleaved partial sums, which vectorise (a single running sum cannot be
/// reordered, so it stays one scalar add per element).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    sum_map(x, |v| v)
}

/// `Σ f(xᵢ)`, as [`sum`].
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().map(|&v| f(v)).sum::<f32>();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    add_lanes(lanes) + tail
}

/// The sum of 16 lanes by halves: 8 + 4 + 2 + 1 vector adds. `iter().sum()` would add them
/// one after another in order (floats do not reassociate), a serial chain of 16 scalar adds
/// that perf showed costing more than the products it sums in short dots.
///
/// The lanes pass through `black_box` first: seeing this tree, LLVM's SLP vectoriser built
/// the lanes' loop from 2-wide pieces (`vmovsd`, 8 adds per 16 elements where one 16-wide
/// add does). `black_box` is the identity; it only keeps the loop from being planned
/// together with the tree, at the cost of one store and load of the lanes per sum.
#[inline(always)]
pub fn add_lanes(lanes: [f32; 16]) -> f32 {
    let lanes = std::hint::black_box(lanes);
    // Fixed-size halves (a loop over the half width was left a loop, not unrolled).
    let h8: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let h4: [f32; 4] = std::array::from_fn(|i| h8[i] + h8[i + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// The largest of `x` (−∞ if empty), in 16 lanes as [`sum`] (a running `max` is not
/// reordered into vectors either).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    // As in add_lanes, the loop above is kept from 2-wide pieces.
    let lanes = std::hint::black_box(lanes);
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    let h8: [f32; 8] = std::array::from_fn(|i| larger(lanes[i], lanes[i + 8]));
    let h4: [f32; 4] = std::array::from_fn(|i| larger(h8[i], h8[i + 4]));
    larger(larger(h4[0], h4[2]), larger(h4[1], h4[3])).max(tail)
}

/// `Σ aᵢ·bᵢ`, as [`sum`], each lane's product added in one [`mul_add`] (fused where `FMA`).
#[inline(always)]
pub fn dot_fma<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 16];
    let split = n - n % 16;
    for (ca, cb) in a[..split].chunks_exact(16).zip(b[..split].chunks_exact(16)) {
        for ((l, &x), &y) in lanes.iter_mut().zip(ca).zip(cb) {
            *l = mul_add::<FMA>(x, y, *l);
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    add_lanes(lanes) + tail
}

/// `exp(x)` for `x ≤ 0` (decays, Gaussians) to about 2 ulp: Cephes' `expf` without
/// branches. Values below −87 give `exp(−87)`.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    exp_nonpositive_fma::<false>(x)
}

/// [`exp_nonpositive`] with its polynomial in [`mul_add`]s, fused where `FMA`.
#[inline(always)]
pub fn exp_nonpositive_fma<const FMA: bool>(x: f32) -> f32 {
    exp_nonpositive_of::<f32, FMA>(x)
}

/// [`exp_nonpositive_fma`] in any [`Real`]: [`Real::exp_nonpositive`], which is
/// [`exp_nonpositive_formula`] but where the type has a faster form (the same values from
/// −87 to 0).
#[inline(always)]
pub fn exp_nonpositive_of<R: Real, const FMA: bool>(x: R) -> R {
    x.exp_nonpositive::<FMA>()
}

/// [`exp_nonpositive_fma`]'s steps in any [`Real`]. The coefficients and the split of ln 2
/// are [`EXP_R`] and [`LN_2_PARTS`].
#[inline(always)]
pub fn exp_nonpositive_formula<R: Real, const FMA: bool>(x: R) -> R {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x.mul_add::<FMA>(R::splat(LOG2_E), R::splat(MAGIC));
    let k = shifted - MAGIC;
    // x = k·ln 2 + r, |r| ≤ ln 2 / 2; ln 2 split in two so k·ln 2 is exact.
    let e_r = exp_reduced::<R, FMA>(x, k);
    e_r * shifted.pow2_of_shifted()
}

/// ln 2 in two parts, the first with few enough bits that `k · LN_2_PARTS[0]` is exact.
pub(crate) const LN_2_PARTS: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];

/// Cephes' `expf` polynomial `p(r) ≈ (e^r − 1 − r) / r²` on `|r| ≤ ln 2 / 2`, highest
/// power first.
pub(crate) const EXP_R: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^r` for `r = x − k ln 2` (`k` the integer nearest `x log₂ e`): the reduction and the
/// polynomial that every form of [`exp_nonpositive_fma`] shares.
#[inline(always)]
pub(crate) fn exp_reduced<R: Real, const FMA: bool>(x: R, k: R) -> R {
    let r = (-k).mul_add::<FMA>(
        R::splat(LN_2_PARTS[1]),
        (-k).mul_add::<FMA>(R::splat(LN_2_PARTS[0]), x),
    );
    let mut p = R::splat(EXP_R[0]);
    for c in &EXP_R[1..] {
        p = p.mul_add::<FMA>(r, R::splat(*c));
    }
    (p * r).mul_add::<FMA>(r, r) + 1.0
}

/// Adding 1.5·2^23 rounds to an integer held in the low mantissa bits: k = round(x·log2 e)
/// without a float→int conversion, which baseline x86-64 only has one lane at a time.
pub(crate) const MAGIC: f32 = 12_582_912.0;

/// 2^k from its exponent bits (k ∈ [−126, 127]), k read off the bits of `shifted = k + MAGIC`.
#[inline(always)]
pub(crate) fn pow2_of_shifted(shifted: f32) -> f32 {
    let k_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(k_bits.wrapping_add(127) << 23)
}

/// `2^y` for `y ≤ 0` to 1.4 ulp (with FMA; a relative error of 1.7·10⁻⁷, as CUDA's fast
/// `exp2f`, which mamba_ssm's scan takes): a degree-5 polynomial for `2^f`, `|f| ≤ ½`,
/// fitted for relative error, times `2^k`. In base 2 the argument needs no `k·ln 2` split,
/// so a decay `exp(Δ·A)` computed as `2^(Δ·A·log₂e)`, `A·log₂e` formed once, costs 8
/// vector operations on AVX-512 instead of [`exp_nonpositive_fma`]'s 15 (the selective
/// scan's inner loop; degree 6, under 1 ulp, made its forward 11% slower). Values below
/// −126 give `2^−126`; above 0, `2^y` still (k ≤ 127).
#[inline(always)]
pub fn exp2_nonpositive_fma<const FMA: bool>(y: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits (see
    // `exp_nonpositive_fma`); f = y − k is exact.
    // (No clamp at 0: the callers' arguments are ≤ 0, and one operation less per state
    // element and step shows in the scan.)
    let y = y.max(-126.0);
    let shifted = y + MAGIC;
    let k = shifted - MAGIC;
    let f = y - k;
    let mut p = EXP2_POLY[4];
    for c in EXP2_POLY[..4].iter().rev() {
        p = mul_add::<FMA>(p, f, *c);
    }
    let p = mul_add::<FMA>(p, f, 1.0);
    p * pow2_of_shifted(shifted)
}

/// `2^f ≈ 1 + f·(c₁ + f·(c₂ + …))` on `[−½, ½]`, the coefficients c₁ … c₅ fitted for
/// relative error with c₁ = ln 2, the slope at 0 (iteratively reweighted least squares;
/// 10⁻⁷ before rounding to f32).
pub(crate) const EXP2_POLY: [f32; 5] = [
    std::f32::consts::LN_2,
    0.240_222_83,
    0.055_505_585,
    0.009_669_689,
    0.001_330_058_6,
];

/// `a·b + c`: one fused instruction where `FMA` (a kernel's clone for a target with FMA,
/// [`has_fma`]), a product and a sum otherwise — without the instruction, `mul_add` is a
/// libm call per element.
#[inline(always)]
pub fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Whether the multiversion clone this expands in has fused multiply-add: a constant for
/// [`mul_add`]'s `FMA`. Only inside a `#[multiversion]` function's body.
macro_rules! has_fma {
    () => {
        multiversion::target::selected_target!().supports_feature_str("fma")
            || cfg!(target_arch = "aarch64")
    };
}
pub(crate) use has_fma;

/// `ln(1 + e)` for `0 ≤ e ≤ 1` (softplus's `ln(1 + e^(−|x|))`) to about 1e-7 relative:
/// `2·atanh(z)` with `z = e/(2 + e) ≤ 1/3`, by its series to z¹⁵, which needs no exponent
/// split and keeps full relative accuracy as `e → 0`.
#[inline(always)]
pub fn ln_1p_unit(e: f32) -> f32 {
    ln_1p_unit_of::<f32, false>(e)
}

/// [`ln_1p_unit`] in any [`Real`], its series in [`mul_add`]s, fused where `FMA`.
#[inline(always)]
pub fn ln_1p_unit_of<R: Real, const FMA: bool>(e: R) -> R {
    let z = e / (e + 2.0);
    let z2 = z * z;
    let mut p = R::splat(1.0 / 15.0);
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 13.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 11.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 9.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 7.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 5.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0 / 3.0));
    p = p.mul_add::<FMA>(z2, R::splat(1.0));
    z * 2.0 * p
}

/// `erf(x)` to 6e-7 absolute (Abramowitz & Stegun 7.1.26: 1.5e-7, plus f32 rounding).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_of::<f32, false>(x)
}

/// [`erf`] in any [`Real`], [`mul_add`]s fused where `FMA`.
#[inline(always)]
pub fn erf_of<R: Real, const FMA: bool>(x: R) -> R {
    erf_and_gauss_of::<R, FMA>(x).0
}

/// [`erf_of`] and the `e^(−x²)` it is formed from (GELU's derivative needs both: the
/// normal density at `x√2` is that exp over √(2π)).
#[inline(always)]
pub fn erf_and_gauss_of<R: Real, const FMA: bool>(x: R) -> (R, R) {
    let z = x.abs();
    let t = R::splat(1.0) / z.mul_add::<FMA>(R::splat(0.327_591_1), R::splat(1.0));
    let mut p = R::splat(1.061_405_4);
    p = p.mul_add::<FMA>(t, R::splat(-1.453_152));
    p = p.mul_add::<FMA>(t, R::splat(1.421_413_8));
    p = p.mul_add::<FMA>(t, R::splat(-0.284_496_74));
    p = p.mul_add::<FMA>(t, R::splat(0.254_829_6));
    let gauss = exp_nonpositive_of::<R, FMA>(-(z * z));
    let y = -(p * t * gauss) + 1.0;
    (y.copysign(x), gauss)
}

/// `ln(1 + eˣ)`, as `max(x, 0) + ln(1 + e^(−|x|))`, which cannot overflow, in any
/// [`Real`], fused multiply-adds where `FMA`.
#[inline(always)]
pub fn softplus_in<R: Real, const FMA: bool>(x: R) -> R {
    x.max(0.0) + ln_1p_unit_of::<R, FMA>(sigmoid_and_exp_in::<R, FMA>(x).1)
}

/// `sigmoid(x)` and `e^(−|x|)`, from one exp that cannot overflow, in any [`Real`], fused
/// multiply-adds where `FMA`.
#[inline(always)]
pub fn sigmoid_and_exp_in<R: Real, const FMA: bool>(x: R) -> (R, R) {
    let e = exp_nonpositive_of::<R, FMA>(-x.abs());
    let s = R::select_nonnegative(x, R::splat(1.0), e) / (e + 1.0);
    (s, e)
}

/// What the functions above are written in: one f32, or four vectors of them
/// ([`crate::f32x16::Quad`]), on which the element-wise kernels call them.
pub trait Real:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Add<f32, Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Sub<f32, Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Mul<f32, Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// Every element `x`.
    fn splat(x: f32) -> Self;
    /// `self·b + c`, fused where `FMA` (see [`mul_add`]).
    fn mul_add<const FMA: bool>(self, b: Self, c: Self) -> Self;
    /// `f32::max` of each element and `x`.
    fn max(self, x: f32) -> Self;
    /// `f32::clamp` of each element.
    fn clamp(self, lo: f32, hi: f32) -> Self;
    fn abs(self) -> Self;
    /// Each element's magnitude with `sign`'s sign.
    fn copysign(self, sign: Self) -> Self;
    /// `a` where `x ≥ 0`, else `b`, element by element.
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self;
    /// [`pow2_of_shifted`] of each element.
    fn pow2_of_shifted(self) -> Self;
    /// [`exp_nonpositive_fma`] of each element: [`exp_nonpositive_formula`] unless the
    /// type has a faster form (the same values from −87 to 0).
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> Self {
        exp_nonpositive_formula::<Self, FMA>(self)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn mul_add<const FMA: bool>(self, b: Self, c: Self) -> Self {
        mul_add::<FMA>(self, b, c)
    }
    #[inline(always)]
    fn max(self, x: f32) -> Self {
        f32::max(self, x)
    }
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        f32::clamp(self, lo, hi)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        f32::copysign(self, sign)
    }
    #[inline(always)]
    fn select_nonnegative(x: Self, a: Self, b: Self) -> Self {
        if x >= 0.0 { a } else { b }
    }
    #[inline(always)]
    fn pow2_of_shifted(self) -> Self {
        pow2_of_shifted(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_matches_libm() {
        // Both forms: the products and sums rounded apart, and fused.
        for exp in [exp_nonpositive_fma::<false>, exp_nonpositive_fma::<true>] {
            let mut worst = 0f32;
            for i in 0..=200_000 {
                let x = -87.0 * i as f32 / 200_000.0;
                let (ours, libm) = (exp(x), x.exp());
                worst = worst.max((ours - libm).abs() / libm);
            }
            assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
            assert_eq!(exp(0.0), 1.0);
        }
    }

    #[test]
    fn exp2_nonpositive_matches_libm() {
        for (exp2, ulps) in [
            (exp2_nonpositive_fma::<false> as fn(f32) -> f32, 3.0),
            (exp2_nonpositive_fma::<true>, 1.5),
        ] {
            let mut worst = 0f64;
            for i in 0..=200_000 {
                let y = -126.0 * i as f32 / 200_000.0;
                let exact = (y as f64).exp2();
                worst = worst.max((exp2(y) as f64 - exact).abs() / exact);
            }
            assert!(worst < ulps * f32::EPSILON as f64, "relative error {worst}");
            assert_eq!(exp2(0.0), 1.0);
            assert_eq!(exp2(-3.0), 0.125);
            assert_eq!(exp2(-1000.0), 2f32.powi(-126));
        }
    }

    #[test]
    fn ln_1p_unit_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            // Dense near 0, where the relative error matters, and across (0, 1].
            let e = (i as f64 / 200_000.0).powi(3) as f32;
            let exact = (e as f64).ln_1p();
            let err = (ln_1p_unit(e) as f64 - exact).abs() / exact.max(f64::MIN_POSITIVE);
            worst = worst.max(err);
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(ln_1p_unit(0.0), 0.0);
    }

    #[test]
    fn lane_sums_equal_plain_sums() {
        // Lengths below, at and past the 16 lanes, with a tail.
        for n in [0, 1, 15, 16, 17, 130] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-5 * (1.0 + y.abs());
            assert!(close(sum(&a), a.iter().sum()), "sum, n = {n}");
            let squares: f32 = a.iter().map(|v| v * v).sum();
            assert!(close(sum_map(&a, |v| v * v), squares), "sum_map, n = {n}");
            let products: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(close(dot_fma::<false>(&a, &b), products), "dot, n = {n}");
            assert!(
                close(dot_fma::<true>(&a, &b), products),
                "dot fused, n = {n}"
            );
            let largest = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&a), largest, "max, n = {n}");
        }
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let x = 6.0 * i as f32 / 100_000.0;
            let exact = libm_erf(x as f64);
            worst = worst.max((erf(x) as f64 - exact).abs());
        }
        assert!(worst < 6e-7, "absolute error {worst}");
    }

    /// erf in f64 by its Taylor series (|x| ≤ 3) or continued fraction, as a reference.
    fn libm_erf(x: f64) -> f64 {
        // Rust's std has no erf; the series converges fast enough at these arguments.
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}

//! bf16 autocast's product on the CPU's bf16 dot product, AVX-512 BF16's `vdpbf16ps`:
//! each f32 lane gains two bf16 products per instruction, twice an f32 FMA's
//! multiply-adds. f32 operands are rounded to bf16 as they are packed (no pass of their
//! own), the products (exact in f32) summed in f32, and the result optionally rounded to
//! bf16 as it is stored: bf16 autocast's numbers, summed in another order. No maintained
//! Rust gemm has a bf16 kernel (the gemm crate, flex's, converts bf16 to f32), so this is
//! one: operands packed into bf16 pairs along k, a 12 × 32 register tile, rayon over
//! blocks of rows.
//!
//! [`available`] says whether to use it (the CPU has the instruction at full rate);
//! elsewhere callers round and take the f32 product. The reference is the f32 product of the
//! rounded operands (a test holds the two equal).

use rayon::prelude::*;

use crate::device::SendPtr;

/// Rows of a register tile.
const MR: usize = 12;
/// Columns of a register tile: two vectors of 16 f32 lanes.
const NR: usize = 32;
/// Depth of one packed block (a `KC × n` block of B in bf16 stays in L2 for n up to ~1k).
const KC: usize = 512;

/// Whether this CPU has the instruction (AVX-512F and AVX-512 BF16): the kernel can run.
pub fn has_instruction() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether bf16 products take the kernel: the CPU has the instruction and runs it at full
/// rate. On AMD's (Zen 4 and later) it gives twice an f32 FMA's multiply-adds (the kernel
/// measured 1.6–1.8× the f32 gemm on an EPYC); the Intel Xeon (Sapphire Rapids) of an
/// earlier session ran it at half its f32 FMA rate (40 against 85 GMAC/s on one core),
/// where the f32 product is the faster. So: AMD's only, a fixed rule per CPU, so that a
/// run's numbers do not depend on a timing.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| has_instruction() && amd())
}

/// The CPU's vendor is AMD (`cpuid` leaf 0: "AuthenticAMD").
fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: cpuid leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix operand: its first element and (row, column) strides, in elements.
pub type Operand = (*const f32, (isize, isize));

/// Two f32s rounded to bf16 ([`crate::half_rounding::round`]) as one 32-bit lane, `lo`
/// in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    use crate::half_rounding::round;
    (round(lo).to_bits() >> 16) | (round(hi).to_bits() & 0xffff_0000)
}

/// `out = a · b` for `a` `[m, k]` and `b` `[k, n]` rounded to bf16, summed in f32, `out`
/// row-major with rows `ld` apart, each value rounded to bf16 where `round_output`.
///
/// # Safety
/// [`has_instruction`] is true; the operands' elements lie where their strides say; `out` has
/// room for m rows of n values `ld` apart.
pub unsafe fn gemm_bf16(
    (out, ld): (*mut f32, usize),
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    round_output: bool,
) {
    // Tasks write their own rows of `out` and only read a and b.
    let (out, a, b) = (SendPtr(out), SendPtr(a), SendPtr(b));
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    if k == 0 {
        for r in 0..m {
            // SAFETY: row r of the output.
            unsafe { std::slice::from_raw_parts_mut(out.get().add(r * ld), n).fill(0.0) };
        }
    }
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let pairs = kc.div_ceil(2);
        // B's block, [panel][pair][NR] pairs of bf16, packed once for all rows.
        // Kept by the thread from product to product: a fresh zeroed block at every
        // product was fresh pages from the kernel (perf: 5% of a bf16 step in clearing).
        let mut packed_b = PACKED_B.take();
        if packed_b.len() < n_panels * pairs * NR {
            packed_b.resize(n_panels * pairs * NR, 0);
        }
        packed_b[..n_panels * pairs * NR]
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = NR.min(n - p * NR);
                // SAFETY: rows k0..k0 + kc, columns of panel p, of b.
                unsafe { pack_b(panel, b.get(), (k0, kc), (p * NR, cols)) };
            });
        let (add, last) = (k0 > 0, k0 + kc == k);
        (0..m_panels).into_par_iter().for_each(|mp| {
            let a = a.get();
            let rows = MR.min(m - mp * MR);
            let mut packed_a = [0u32; KC / 2 * MR];
            // SAFETY: rows of panel mp, columns k0..k0 + kc, of a.
            let a_strides = unsafe { pack_a(&mut packed_a, a, (mp * MR, rows), (k0, kc)) };
            for np in 0..n_panels {
                let cols = NR.min(n - np * NR);
                // SAFETY: the tile's rows and columns lie inside the output; the packed
                // blocks hold `pairs` pairs of MR and NR lanes; the caller checked the CPU.
                unsafe {
                    let tile = out.get().add(mp * MR * ld + np * NR);
                    kernel(
                        (packed_a.as_ptr(), a_strides),
                        packed_b.as_ptr().add(np * pairs * NR),
                        pairs,
                        (tile, ld),
                        (rows, cols),
                        (add, last && round_output),
                    );
                }
            }
        });
        PACKED_B.set(packed_b);
    }
}

thread_local! {
    /// B's packed block, reused by the calling thread (a call nested on the same thread
    /// finds it taken and allocates its own).
    static PACKED_B: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f(i)` for each pair `(x[2i], x[2i + 1])` of a strided line of `2 · pairs` values (`x[2
/// · pairs]` too where `odd`, paired with 0): the pairs of a row of a along k, or of a
/// column of b. A contiguous line takes a loop that vectorises.
///
/// # Safety
/// The line's values lie at `x`, `stride` apart.
#[inline(always)]
unsafe fn line_pairs(
    x: *const f32,
    stride: isize,
    (pairs, odd): (usize, bool),
    mut f: impl FnMut(usize, u32),
) {
    if stride == 1 {
        // SAFETY: 2 · pairs contiguous values.
        let line = unsafe { std::slice::from_raw_parts(x, 2 * pairs) };
        for (i, two) in line.chunks_exact(2).enumerate() {
            f(i, pair(two[0], two[1]));
        }
    } else {
        let at = |i: usize| unsafe { *x.offset(i as isize * stride) };
        for i in 0..pairs {
            f(i, pair(at(2 * i), at(2 * i + 1)));
        }
    }
    if odd {
        f(
            pairs,
            pair(unsafe { *x.offset(2 * pairs as isize * stride) }, 0.0),
        );
    }
}

/// Rows `k0..k0 + kc` of b, columns `c0..c0 + cols`, as `[pair][NR]` lanes (0 past k;
/// lanes past `cols` are left as they are: they meet only output columns never stored).
///
/// # Safety
/// Those elements lie inside b.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn pack_b(
    panel: &mut [u32],
    b: Operand,
    (k0, kc): (usize, usize),
    (c0, cols): (usize, usize),
) {
    let (p, (rs, cs)) = b;
    // SAFETY (all pointers below): rows k0..k0 + kc, columns c0..c0 + cols, of b.
    let first = unsafe { p.offset(k0 as isize * rs + c0 as isize * cs) };
    if cs == 1 {
        // Rows contiguous: two rows at a time, along them (a loop that vectorises).
        for (kp, lanes) in panel.chunks_mut(NR).enumerate() {
            let r = 2 * kp;
            let row = |r: usize| unsafe {
                std::slice::from_raw_parts(first.offset(r as isize * rs), cols)
            };
            if r + 1 < kc {
                for ((lane, &l), &h) in lanes.iter_mut().zip(row(r)).zip(row(r + 1)) {
                    *lane = pair(l, h);
                }
            } else {
                for (lane, &l) in lanes.iter_mut().zip(row(r)) {
                    *lane = pair(l, 0.0);
                }
            }
        }
    } else {
        // Columns along k (a transposed operand's rows), one at a time.
        for j in 0..cols {
            let column = unsafe { first.offset(j as isize * cs) };
            unsafe {
                line_pairs(column, rs, (kc / 2, kc % 2 == 1), |kp, v| {
                    panel[kp * NR + j] = v
                })
            };
        }
    }
}

/// Rows `r0..r0 + rows` of a, columns `k0..k0 + kc`, as pairs along k (0 past the
/// edges): `[row][pair]` where a's rows are contiguous (written along them, a loop that
/// vectorises), else `[pair][MR]`. Returns the layout's (pair, row) strides.
///
/// # Safety
/// Those elements lie inside a.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn pack_a(
    packed: &mut [u32],
    a: Operand,
    (r0, rows): (usize, usize),
    (k0, kc): (usize, usize),
) -> (usize, usize) {
    let (p, (rs, cs)) = a;
    let pairs = kc.div_ceil(2);
    // SAFETY (all pointers below): rows r0..r0 + rows, columns k0..k0 + kc, of a.
    let first = unsafe { p.offset(r0 as isize * rs + k0 as isize * cs) };
    if cs == 1 {
        for (r, lanes) in packed.chunks_mut(pairs).take(MR).enumerate() {
            if r >= rows {
                lanes.fill(0);
                continue;
            }
            let row = unsafe { std::slice::from_raw_parts(first.offset(r as isize * rs), kc) };
            for (lane, two) in lanes.iter_mut().zip(row.chunks_exact(2)) {
                *lane = pair(two[0], two[1]);
            }
            if kc % 2 == 1 {
                lanes[pairs - 1] = pair(row[kc - 1], 0.0);
            }
        }
        return (1, pairs);
    }
    if rows < MR {
        packed[..pairs * MR].fill(0);
    }
    #[cfg(target_arch = "x86_64")]
    if rs == 1 {
        // Columns contiguous (a transposed operand): two columns' `rows` values side by
        // side, 12 lanes of pairs a step (a loop over 12 does not vectorise by itself).
        use std::arch::x86_64::*;
        let mask = ((1u32 << rows) - 1) as __mmask16;
        for kp in 0..pairs {
            let c = 2 * kp;
            // SAFETY: `rows` values of columns c (and c + 1 where inside the block), and
            // lanes kp · MR.. of `packed`, which has room for MR of them.
            unsafe {
                let column = |c: usize| _mm512_maskz_loadu_ps(mask, first.offset(c as isize * cs));
                let lo = column(c);
                let hi = if c + 1 < kc {
                    column(c + 1)
                } else {
                    _mm512_setzero_ps()
                };
                let lanes = _mm512_or_si512(_mm512_srli_epi32(bf16_top(lo), 16), bf16_top(hi));
                _mm512_mask_storeu_epi32(packed.as_mut_ptr().add(kp * MR).cast(), mask, lanes);
            }
        }
        return (MR, 1);
    }
    for r in 0..rows {
        let row = unsafe { first.offset(r as isize * rs) };
        unsafe {
            line_pairs(row, cs, (kc / 2, kc % 2 == 1), |kp, v| {
                packed[kp * MR + r] = v
            })
        };
    }
    (MR, 1)
}

/// Each lane rounded to bf16 as [`crate::half_rounding::round`] rounds (nearest, ties to
/// even; a NaN made quiet), its bits in the top half and 0 below.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn bf16_top(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let x = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    // Up when the dropped half is over ½, or exactly ½ with an odd kept part.
    let rounded = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    let magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
    let r = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32))
}

/// One `MR × NR` tile: `c (+)= a · b` over `pairs` packed pairs, storing `rows × cols` of
/// it, rounded to bf16 where `round`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    (a, (a_kp, a_r)): (*const u32, (usize, usize)),
    b: *const u32,
    pairs: usize,
    (c, ld): (*mut f32, usize),
    (rows, cols): (usize, usize),
    (add, round): (bool, bool),
) {
    use std::arch::x86_64::*;
    use std::mem::transmute;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for kp in 0..pairs {
        // SAFETY (these loads): within the packed blocks, as the caller promises.
        let (b0, b1): (__m512bh, __m512bh) = unsafe {
            (
                transmute::<__m512, __m512bh>(_mm512_loadu_ps(b.add(kp * NR).cast())),
                transmute::<__m512, __m512bh>(_mm512_loadu_ps(b.add(kp * NR + 16).cast())),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: within the packed block; same-size vector types.
            let a = unsafe {
                transmute::<__m512i, __m512bh>(
                    _mm512_set1_epi32(*a.add(kp * a_kp + r * a_r) as i32),
                )
            };
            acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
        }
    }
    let mask = |from: usize| -> __mmask16 {
        let n = cols.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let masks = [mask(0), mask(16)];
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for h in 0..2 {
            // SAFETY: the masked lanes lie inside row r's `cols` columns.
            unsafe {
                let p = c.add(r * ld + 16 * h);
                let v = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(masks[h], p), acc[h])
                } else {
                    acc[h]
                };
                // Rounded in registers: reading back a masked store stalls its forwarding.
                let v = if round {
                    _mm512_castsi512_ps(bf16_top(v))
                } else {
                    v
                };
                _mm512_mask_storeu_ps(p, masks[h], v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: (*const u32, (usize, usize)),
    _: *const u32,
    _: usize,
    _: (*mut f32, usize),
    _: (usize, usize),
    _: (bool, bool),
) {
    unreachable!("`has_instruction` is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::half_rounding::round;

    /// Values from a seeded LCG, not bf16 (rounding them is part of the product).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Equal to the product of the operands rounded to bf16 (to summation order; summed
    /// in f64 here), and where asked that product rounded to bf16 (to one bf16 step, where
    /// the order tips a rounding): sizes with partial tiles, an odd depth, several K blocks,
    /// a transposed operand.
    #[test]
    fn equals_the_product_of_rounded_operands() {
        if !has_instruction() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (m, k, n) in [(13, 7, 33), (40, 1100, 70), (12, 32, 32), (1, 1, 1)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            for (transposed, round_output) in [(false, false), (true, true)] {
                // b as given ([k, n] row-major), or read through a transpose of [n, k].
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let b_op: Operand = if transposed {
                    (bt.as_ptr(), (1, k as isize))
                } else {
                    (b.as_ptr(), (n as isize, 1))
                };
                let mut out = vec![f32::NAN; m * n];
                // SAFETY: the CPU has the instruction; operands and output sized as described.
                unsafe {
                    gemm_bf16(
                        (out.as_mut_ptr(), n),
                        (m, k, n),
                        (a.as_ptr(), (k as isize, 1)),
                        b_op,
                        round_output,
                    )
                };
                let what = format!("{m}x{k}x{n} transposed {transposed} rounded {round_output}");
                for i in 0..m {
                    for j in 0..n {
                        let terms =
                            (0..k).map(|l| round(a[i * k + l]) as f64 * round(b[l * n + j]) as f64);
                        let scale = 1.0 + terms.clone().map(f64::abs).sum::<f64>();
                        let want = terms.sum::<f64>();
                        let got = out[i * n + j] as f64;
                        let tolerance = if round_output {
                            2f64.powi(-8) * want.abs().max(1.0)
                        } else {
                            0.0
                        };
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + tolerance,
                            "{what} ({i}, {j}): {got} against {want}"
                        );
                        if round_output {
                            assert_eq!(got as f32, round(got as f32), "{what}: not rounded");
                        }
                    }
                }
            }
        }
    }
}

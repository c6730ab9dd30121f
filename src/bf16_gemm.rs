//! Products of matrices whose values are bf16 (held in f32, as bf16 autocast's rounded
//! operands are) with the CPU's bf16 dot product, AVX-512 BF16's `vdpbf16ps`: each f32 lane
//! gains two bf16 products per instruction, twice an f32 FMA's multiply-adds. A product of
//! two bf16 values is exact in f32, so this gives the f32 product of the same operands,
//! summed in another order. No maintained Rust gemm has a bf16 kernel (the gemm crate,
//! flex's, converts bf16 to f32), so this is one: operands packed into bf16 pairs along k,
//! a 12 × 32 register tile, rayon over blocks of rows.
//!
//! [`available`] says whether the CPU has the instruction; elsewhere callers keep the f32
//! product. The reference is the f32 product (a test holds the two equal on bf16 values).

use rayon::prelude::*;

/// Rows of a register tile.
const MR: usize = 12;
/// Columns of a register tile: two vectors of 16 f32 lanes.
const NR: usize = 32;
/// Depth of one packed block (a `KC × n` block of B in bf16 stays in L2 for n up to ~1k).
const KC: usize = 512;

/// Whether this CPU runs the kernel (AVX-512F and AVX-512 BF16).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
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

/// A matrix operand: its first element and (row, column) strides, in elements.
pub type Operand = (*const f32, (isize, isize));

/// A pair of bf16 as one 32-bit lane, `lo` in the low half: the top halves of two f32s,
/// exact for values that are bf16 (others are cut toward zero).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (lo.to_bits() >> 16) | (hi.to_bits() & 0xffff_0000)
}

/// Where a raw pointer may cross threads: each task writes its own rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rows of the output, which outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so a closure captures the whole (Sync) wrapper.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// An operand the tasks read (shared, read only).
#[derive(Clone, Copy)]
struct In(Operand);
// SAFETY: read only while the call runs.
unsafe impl Send for In {}
unsafe impl Sync for In {}

impl In {
    fn get(self) -> Operand {
        self.0
    }
}

/// `out = a · b` (or `out += a · b` with `accumulate`) for `a` `[m, k]` and `b` `[k, n]`
/// holding bf16 values, `out` row-major with rows `ld` apart.
///
/// # Safety
/// [`available`] is true; the operands' elements lie where their strides say; `out` has
/// room for m rows of n values `ld` apart, initialised where `accumulate`.
pub unsafe fn gemm_bf16(
    (out, ld): (*mut f32, usize),
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    accumulate: bool,
) {
    let (out, a, b) = (Out(out), In(a), In(b));
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    if k == 0 && !accumulate {
        for r in 0..m {
            // SAFETY: row r of the output.
            unsafe { std::slice::from_raw_parts_mut(out.ptr().add(r * ld), n).fill(0.0) };
        }
    }
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let pairs = kc.div_ceil(2);
        // B's block, [panel][pair][NR] pairs of bf16, packed once for all rows.
        let mut packed_b = vec![0u32; n_panels * pairs * NR];
        packed_b
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = NR.min(n - p * NR);
                // SAFETY: rows k0..k0 + kc, columns of panel p, of b.
                unsafe { pack_b(panel, b.get(), (k0, kc), (p * NR, cols)) };
            });
        let add = accumulate || k0 > 0;
        (0..m_panels).into_par_iter().for_each(|mp| {
            let a = a.get();
            let rows = MR.min(m - mp * MR);
            let mut packed_a = [0u32; KC / 2 * MR];
            // SAFETY: rows of panel mp, columns k0..k0 + kc, of a.
            unsafe { pack_a(&mut packed_a, a, (mp * MR, rows), (k0, kc)) };
            for np in 0..n_panels {
                let cols = NR.min(n - np * NR);
                // SAFETY: the tile's rows and columns lie inside the output; the packed
                // blocks hold `pairs` pairs of MR and NR lanes; `available` was checked.
                unsafe {
                    let tile = out.ptr().add(mp * MR * ld + np * NR);
                    kernel(
                        packed_a.as_ptr(),
                        packed_b.as_ptr().add(np * pairs * NR),
                        pairs,
                        (tile, ld),
                        (rows, cols),
                        add,
                    );
                }
            }
        });
    }
}

/// Rows `k0..k0 + kc` of b, columns `c0..c0 + cols`, as `[pair][NR]` lanes (0 past the
/// edges; lanes past `cols` are left as they are, unread).
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
    for (kp, lanes) in panel.chunks_mut(NR).enumerate() {
        let r = k0 + 2 * kp;
        // SAFETY: row r (and r + 1 when inside the block), columns c0.., of b.
        let row = |r: usize| unsafe { p.offset(r as isize * rs + c0 as isize * cs) };
        let (lo, hi) = (row(r), (r + 1 < k0 + kc).then(|| row(r + 1)));
        if cs == 1 {
            // Rows stored contiguously: a loop that vectorises.
            // SAFETY: `cols` values of each row.
            let lo = unsafe { std::slice::from_raw_parts(lo, cols) };
            match hi {
                Some(hi) => {
                    let hi = unsafe { std::slice::from_raw_parts(hi, cols) };
                    for ((lane, &l), &h) in lanes.iter_mut().zip(lo).zip(hi) {
                        *lane = pair(l, h);
                    }
                }
                None => {
                    for (lane, &l) in lanes.iter_mut().zip(lo) {
                        *lane = pair(l, 0.0);
                    }
                }
            }
        } else {
            for (j, lane) in lanes[..cols].iter_mut().enumerate() {
                let at = |row: *const f32| unsafe { *row.offset(j as isize * cs) };
                *lane = pair(at(lo), hi.map_or(0.0, at));
            }
        }
    }
}

/// Rows `r0..r0 + rows` of a, columns `k0..k0 + kc`, as `[pair][MR]` lanes (0 past the
/// edges).
///
/// # Safety
/// Those elements lie inside a.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn pack_a(
    packed: &mut [u32],
    a: Operand,
    (r0, rows): (usize, usize),
    (k0, kc): (usize, usize),
) {
    let (p, (rs, cs)) = a;
    let pairs = kc.div_ceil(2);
    if rows < MR {
        packed[..pairs * MR].fill(0);
    }
    for r in 0..rows {
        // SAFETY: row r0 + r, columns k0.., of a.
        let row = unsafe { p.offset((r0 + r) as isize * rs + k0 as isize * cs) };
        let at = |c: usize| unsafe { *row.offset(c as isize * cs) };
        for kp in 0..kc / 2 {
            packed[kp * MR + r] = pair(at(2 * kp), at(2 * kp + 1));
        }
        if kc % 2 == 1 {
            packed[(pairs - 1) * MR + r] = pair(at(kc - 1), 0.0);
        }
    }
}

/// One `MR × NR` tile: `c (+)= a · b` over `pairs` packed pairs, storing `rows × cols` of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    a: *const u32,
    b: *const u32,
    pairs: usize,
    (c, ld): (*mut f32, usize),
    (rows, cols): (usize, usize),
    add: bool,
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
                transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(kp * MR + r) as i32))
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
                _mm512_mask_storeu_ps(p, masks[h], v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: *const u32,
    _: *const u32,
    _: usize,
    _: (*mut f32, usize),
    _: (usize, usize),
    _: bool,
) {
    unreachable!("`available` is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 values from a seeded LCG.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0;
                f32::from_bits(x.to_bits() & 0xffff_0000)
            })
            .collect()
    }

    /// Equal to the f32 product of the same bf16 values (to summation order): sizes with
    /// partial tiles and an odd depth, several K blocks, a transposed operand, with and
    /// without accumulating into the output.
    #[test]
    fn equals_the_f32_product_on_bf16_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (m, k, n) in [(13, 7, 33), (40, 600, 70), (12, 32, 32), (1, 1, 1)] {
            let (a, b, c0) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
            for (transposed, accumulate) in [(false, false), (true, true)] {
                // b as given ([k, n] row-major), or read through a transpose of [n, k].
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let b_op: Operand = if transposed {
                    (bt.as_ptr(), (1, k as isize))
                } else {
                    (b.as_ptr(), (n as isize, 1))
                };
                let mut out = if accumulate {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                // SAFETY: available; operands and output sized as described.
                unsafe {
                    gemm_bf16(
                        (out.as_mut_ptr(), n),
                        (m, k, n),
                        (a.as_ptr(), (k as isize, 1)),
                        b_op,
                        accumulate,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                            .sum();
                        let want = dot
                            + if accumulate {
                                c0[i * n + j] as f64
                            } else {
                                0.0
                            };
                        let got = out[i * n + j] as f64;
                        let scale: f64 = 1.0
                            + (0..k)
                                .map(|l| (a[i * k + l] * b[l * n + j]).abs() as f64)
                                .sum::<f64>();
                        assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "{m}x{k}x{n} transposed {transposed} accumulate {accumulate} ({i}, {j}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}

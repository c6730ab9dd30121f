//! Matrix products `[.., m, k] · [.., k, n]` (the projections, and attention's scores and
//! weighted values), as a Burn backend extension on flex: the gemm crate (Burn's own flex
//! kernel) writing into an output it has not zeroed. Burn's flex matmul zero-fills each
//! output before gemm overwrites it, about 7% of a default-model step in memset (perf),
//! over every forward and backward product. Strided inputs (a transposed weight, the
//! backward's transposes, heads split by a view) are read in place. Burn's `matmul` is the
//! reference and the path for other backends, dtypes and broadcast batches; a test holds
//! the two equal, gradients included.
//!
//! Causal attention's products skip the blocks above the diagonal ([`Blocks`]): its scores
//! there are masked and its weights there are 0, so about half of each product, forward and
//! backward, is known before it is computed. PyTorch's CPU attention kernel skips them
//! too; on nanoGPT's model (seq 256) they are a tenth of a step's products.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;

use crate::device::{RunCount, SendPtr, flex_from_f32, map_piece_in_place};
use crate::half_rounding::{HalfFormat, HalfRoundingBackend, round_to_half};

/// Products the extension has run in this process (for a test that it took the path).
pub static CALLS: RunCount = RunCount::new();

/// Products of at least this many multiply-adds split across threads. Flex's own rule is
/// 192³; split in bands ([`gemm_into_bands`]), the small models' LM head products (6.4 M)
/// and Mamba's Δ projections (0.8–1.6 M) gain from two threads too.
const PARALLEL_FROM: usize = 128 * 64 * 64;

/// Below this many multiply-adds, a product over fewer than [`NARROW_K`] terms stays on one
/// thread: it is mostly its output's writes, and split it took longer (in Mamba-2's in_proj
/// backward, the input's gradient through Δ's columns, 768 × 8 × 128: 12 µs on one thread,
/// 27 on two).
const NARROW_PARALLEL_FROM: usize = 4 * PARALLEL_FROM;
const NARROW_K: usize = 16;

/// Which blocks of a product with a square `[t, t]` matrix (in blocks of `.0` rows and
/// columns) are computed: causal attention's scores are not wanted, and its weights are 0,
/// above the diagonal blocks. Elements above the diagonal inside a diagonal block are
/// computed like the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Every element: a plain product.
    Dense,
    /// `a · b` is `[t, t]`; the blocks above the diagonal are left 0 (the scores).
    OutLower(usize),
    /// `a` is `[t, t]` and taken as 0 above the diagonal blocks (the weights times v).
    LeftLower(usize),
    /// `a` is `[t, t]` and taken as 0 below the diagonal blocks (a backward's `Pᵀ · dO`;
    /// backward products only: such a product has no gradient of its own).
    LeftUpper(usize),
    /// `b` is `[t, t]` and taken as 0 above the diagonal blocks (a backward's `qᵀ · dS`;
    /// backward products only, as `LeftUpper`).
    RightLower(usize),
}

#[backend_extension(Flex, Autodiff)]
pub trait MatmulBackend: Backend {
    /// `a · b` for `a` `[.., m, k]`, `b` `[.., k, n]` with the same batch dims, either of
    /// them strided, over the blocks `blocks` names.
    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, blocks: Blocks) -> FloatTensor<Self>;

    /// bf16 or f16 autocast's product of f32 operands: `a` and `b` rounded to `format`,
    /// multiplied and summed in f32, the result rounded to `format` ([`matmul_rounded`]).
    fn matmul_half(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        format: HalfFormat,
    ) -> FloatTensor<Self>;

    /// `a · b` (dense) with each value of the product rounded to `format`: for operands
    /// already rounded, autocast's product. Each thread rounds its own band of the output
    /// right after computing it, while it is in cache.
    fn matmul_round_output(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        format: HalfFormat,
    ) -> FloatTensor<Self>;
}

/// `a · b`: the extension for f32 on flex with equal batch dims, Burn's `matmul` otherwise.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    matmul_blocks(a, b, Blocks::Dense)
}

/// `a · b` over `blocks`, where the extension runs; elsewhere a plain product, which is
/// what the block structure promises wherever it is used (0s where they are skipped, and
/// the skipped outputs are not read).
pub fn matmul_blocks<const D: usize>(a: Tensor<D>, b: Tensor<D>, blocks: Blocks) -> Tensor<D> {
    let f32s = a.dtype() == DType::F32 && b.dtype() == DType::F32;
    let same_batch = a.dims()[..D - 2] == b.dims()[..D - 2];
    if !f32s || !same_batch || !crate::device::is_flex(&a.device()) {
        return a.matmul(b);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as MatmulBackend>::matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        blocks,
    ))
}

/// bf16 or f16 autocast's product of f32 operands on flex, in f32:
/// `round(round(a) · round(b))`, each rounding to `format` ([`round_to_half`], whose
/// backward rounds the gradient), so in backward `da = round(round(g) · round(b)ᵀ)` and
/// `db = round(round(a)ᵀ · round(g))`: the same product again. One op
/// ([`MatmulBackend::matmul_half`]): bf16's one kernel where [`crate::bf16_gemm::available`],
/// which rounds as it packs and stores; elsewhere the operands (and in backward the
/// gradient) rounded once, and f32 products that round their outputs in their own threads
/// ([`MatmulBackend::matmul_round_output`]). The roundings around the f32 product, as
/// separate ops, are the reference, and the path where the batch dims differ.
pub fn matmul_rounded<const D: usize>(a: Tensor<D>, b: Tensor<D>, format: HalfFormat) -> Tensor<D> {
    let same_batch = a.dims()[..D - 2] == b.dims()[..D - 2];
    if same_batch {
        return Tensor::from_dispatch(<burn::backend::Dispatch as MatmulBackend>::matmul_half(
            a.into_dispatch(),
            b.into_dispatch(),
            format,
        ));
    }
    let round = |x| round_to_half::<D>(x, format);
    round(matmul(round(a), round(b)))
}

/// An f32 tensor's matrices: where each one's first element lies, and the (row, column)
/// strides, in elements.
pub(crate) struct Matrices<'a> {
    values: &'a [f32],
    start: usize,
    batch_dims: Vec<usize>,
    batch_strides: Vec<isize>,
    pub strides: (isize, isize),
}

impl<'a> Matrices<'a> {
    /// The matrices of an f32 tensor of at least 2 dims, batch dims row-major.
    pub fn of(t: &'a FlexTensor) -> Self {
        let layout = t.layout();
        let (dims, strides) = (t.shape().to_vec(), layout.strides());
        let r = dims.len();
        Self {
            values: t.storage(),
            start: layout.start_offset(),
            batch_dims: dims[..r - 2].to_vec(),
            batch_strides: strides[..r - 2].to_vec(),
            strides: (strides[r - 2], strides[r - 1]),
        }
    }

    /// The first element of matrix `i` (batch dims row-major).
    pub fn first(&self, mut i: usize) -> *const f32 {
        let mut at = self.start as isize;
        for (&d, &s) in self.batch_dims.iter().zip(&self.batch_strides).rev() {
            at += (i % d) as isize * s;
            i /= d;
        }
        // SAFETY: the layout's offsets lie inside its storage.
        unsafe { self.values.as_ptr().offset(at) }
    }
}

/// `out = a · b` for one matrix of each: `out` row-major `[m, n]` with rows `ld` apart,
/// possibly uninitialised.
///
/// # Safety
/// `out` has room for m rows of n values `ld` apart, and `a`, `b` point at `[m, k]`,
/// `[k, n]` matrices with the given (row, column) strides, all alive for the call; k > 0.
pub(crate) unsafe fn gemm_into(
    out: (*mut f32, usize),
    mkn: (usize, usize, usize),
    a: (*const f32, (isize, isize)),
    b: (*const f32, (isize, isize)),
) {
    // SAFETY: as the caller promises; gemm writes all of `out` without reading it
    // (`read_dst` false, k > 0).
    unsafe { gemm_call(out, mkn, a, b, false, gemm::Parallelism::None) }
}

/// `out += a · b`, as [`gemm_into`] but over an initialised `out`.
///
/// # Safety
/// As [`gemm_into`], and `out`'s elements are initialised.
pub(crate) unsafe fn gemm_add_into(
    out: (*mut f32, usize),
    mkn: (usize, usize, usize),
    a: (*const f32, (isize, isize)),
    b: (*const f32, (isize, isize)),
) {
    // SAFETY: as the caller promises.
    unsafe { gemm_call(out, mkn, a, b, true, gemm::Parallelism::None) }
}

/// [`gemm_into`] across threads: each thread one gemm over its own band of the output,
/// along its longer side. gemm's own split was slower than one thread on some of a small
/// model's shapes (128 × 768 × 65, the LM head's weight gradient: 140 µs on two threads,
/// 78 on one; Mamba's x_proj, 768 × 256 × 40: 99 against 88) and no faster on the rest.
/// An output too small for two bands takes gemm's own split. With `accumulate`, `out +=
/// a · b` (as [`gemm_add_into`]).
///
/// # Safety
/// As [`gemm_into`], and as [`gemm_add_into`] where `accumulate`.
pub(crate) unsafe fn gemm_into_bands(
    out: (*mut f32, usize),
    mkn: (usize, usize, usize),
    a: (*const f32, (isize, isize)),
    b: (*const f32, (isize, isize)),
    accumulate: bool,
) {
    // SAFETY: as the caller promises.
    unsafe { gemm_bands_rounding(out, mkn, a, b, accumulate, None) }
}

/// [`gemm_into_bands`], each band of the output then rounded to `round` where given, by the
/// thread that computed it.
///
/// # Safety
/// As [`gemm_into_bands`].
unsafe fn gemm_bands_rounding(
    (out, ld): (*mut f32, usize),
    (m, k, n): (usize, usize, usize),
    (a, (a_rs, a_cs)): (*const f32, (isize, isize)),
    (b, (b_rs, b_cs)): (*const f32, (isize, isize)),
    accumulate: bool,
    round: Option<HalfFormat>,
) {
    let split_rows = m >= n;
    let long = if split_rows { m } else { n };
    let bands = rayon::current_num_threads().min(long / BAND);
    if bands < 2 {
        let (a, b) = ((a, (a_rs, a_cs)), (b, (b_rs, b_cs)));
        // SAFETY: as the caller promises.
        unsafe {
            gemm_call(
                (out, ld),
                (m, k, n),
                a,
                b,
                accumulate,
                gemm::Parallelism::Rayon(0),
            );
            round_block((out, ld), (m, n), round);
        }
        return;
    }
    let width = long.div_ceil(bands);
    let (out, a, b) = (SendPtr(out), SendPtr(a), SendPtr(b));
    rayon::scope(|scope| {
        for start in (0..long).step_by(width) {
            let size = width.min(long - start);
            scope.spawn(move |_| {
                let (out, a, b) = (out.get(), a.get(), b.get());
                let at = start as isize;
                // SAFETY: this band's rows (columns) of `out` and `a` (`b`) alone.
                unsafe {
                    let (out, mkn, a, b) = if split_rows {
                        let a = (a.offset(at * a_rs), (a_rs, a_cs));
                        (
                            (out.add(start * ld), ld),
                            (size, k, n),
                            a,
                            (b, (b_rs, b_cs)),
                        )
                    } else {
                        let b = (b.offset(at * b_cs), (b_rs, b_cs));
                        ((out.add(start), ld), (m, k, size), (a, (a_rs, a_cs)), b)
                    };
                    gemm_call(out, mkn, a, b, accumulate, gemm::Parallelism::None);
                    round_block(out, (mkn.0, mkn.2), round);
                }
            });
        }
    });
}

/// Each value of a `[rows, cols]` block of a row-major output (rows `ld` apart) rounded to
/// `round`, where given.
///
/// # Safety
/// The block lies inside one live buffer that no other thread touches meanwhile.
unsafe fn round_block(
    (out, ld): (*mut f32, usize),
    (rows, cols): (usize, usize),
    round: Option<HalfFormat>,
) {
    let Some(format) = round else { return };
    for r in 0..rows {
        // SAFETY: row r of the block, as the caller promises.
        let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * ld), cols) };
        // One closure per format, inlined into the vectorised loop.
        match format {
            HalfFormat::Bf16 => map_piece_in_place(row, &|v, _| crate::half_rounding::round(v)),
            HalfFormat::F16 => map_piece_in_place(row, &|v, _| crate::half_rounding::round_f16(v)),
        }
    }
}

/// gemm's `out = (read_dst ? out : 0) + a · b`.
///
/// # Safety
/// As [`gemm_add_into`] when `read_dst`, else as [`gemm_into`].
unsafe fn gemm_call(
    (out, ld): (*mut f32, usize),
    (m, k, n): (usize, usize, usize),
    (a, (a_rs, a_cs)): (*const f32, (isize, isize)),
    (b, (b_rs, b_cs)): (*const f32, (isize, isize)),
    read_dst: bool,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: as the callers promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            ld as isize,
            read_dst,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            if read_dst { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The narrowest band of a product's output that one thread takes.
const BAND: usize = 64;

/// The products of [`Blocks`] other than `Dense`: one task per matrix and block of rows
/// (columns for `RightLower`), each one gemm over the part its block needs.
fn matmul_blocks_flex(
    (a, b): (&Matrices, &Matrices),
    (m, k, n): (usize, usize, usize),
    batches: usize,
    blocks: Blocks,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (bs, t) = match blocks {
        Blocks::Dense => unreachable!("dense products take the plain path"),
        Blocks::OutLower(bs) => (bs, (m, n)),
        Blocks::LeftLower(bs) | Blocks::LeftUpper(bs) => (bs, (m, k)),
        Blocks::RightLower(bs) => (bs, (k, n)),
    };
    assert!(
        t.0 == t.1 && bs > 0,
        "matmul {blocks:?}: the triangular operand must be square, got {t:?}"
    );
    let (t, size) = (t.0, m * n);
    let n_blocks = t.div_ceil(bs);
    let mut out = Vec::<f32>::with_capacity(batches * size);
    // Each task writes its own rows (columns for RightLower).
    let base = SendPtr(out.as_mut_ptr());
    (0..batches * n_blocks).into_par_iter().for_each(|task| {
        let (i, blk) = (task / n_blocks, task % n_blocks);
        let (lo, hi) = (blk * bs, ((blk + 1) * bs).min(t));
        let (a0, b0) = (a.first(i), b.first(i));
        let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides, b.strides);
        // SAFETY: matrix i's output lies at i × size within the capacity reserved above;
        // each task writes its own rows [lo, hi) (its columns for RightLower), and every
        // offset below stays inside matrix i of a, b and the output.
        unsafe {
            let out = base.get().add(i * size);
            let at = |p: *const f32, r: usize, rs: isize, c: usize, cs: isize| {
                p.offset(r as isize * rs + c as isize * cs)
            };
            match blocks {
                Blocks::OutLower(_) => {
                    let row = out.add(lo * n);
                    let a = (at(a0, lo, a_rs, 0, a_cs), a.strides);
                    gemm_into((row, n), (hi - lo, k, hi), a, (b0, b.strides));
                    for r in 0..hi - lo {
                        std::ptr::write_bytes(row.add(r * n + hi), 0, n - hi);
                    }
                }
                Blocks::LeftLower(_) => {
                    let a = (at(a0, lo, a_rs, 0, a_cs), a.strides);
                    gemm_into((out.add(lo * n), n), (hi - lo, hi, n), a, (b0, b.strides));
                }
                Blocks::LeftUpper(_) => {
                    let a = (at(a0, lo, a_rs, lo, a_cs), a.strides);
                    let b = (at(b0, lo, b_rs, 0, b_cs), b.strides);
                    gemm_into((out.add(lo * n), n), (hi - lo, t - lo, n), a, b);
                }
                Blocks::RightLower(_) => {
                    let a = (at(a0, 0, a_rs, lo, a_cs), a.strides);
                    let b = (at(b0, lo, b_rs, lo, b_cs), b.strides);
                    gemm_into((out.add(lo), n), (m, t - lo, hi - lo), a, b);
                }
                Blocks::Dense => unreachable!(),
            }
        }
    });
    // SAFETY: the tasks wrote every element of every matrix.
    unsafe { out.set_len(batches * size) };
    out
}

/// `a · b`'s shape, its number of matrices and their (m, k, n), for `a` `[.., m, k]` and
/// `b` `[.., k, n]`.
fn product_dims(a: &FlexTensor, b: &FlexTensor) -> (Vec<usize>, usize, (usize, usize, usize)) {
    let (sa, sb) = (a.shape(), b.shape());
    let r = sa.num_dims();
    let (m, k, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
    assert_eq!(sb[r - 2], k, "matmul: {sa:?} · {sb:?}");
    let mut shape = sa.to_vec();
    shape[r - 1] = n;
    let batches = shape[..r - 2].iter().product();
    (shape, batches, (m, k, n))
}

/// Flex's product over `blocks`, its output rounded to `round` where given (dense products
/// only: [`MatmulBackend::matmul_round_output`]).
fn flex_product(
    a: FlexTensor,
    b: FlexTensor,
    blocks: Blocks,
    round: Option<HalfFormat>,
) -> FlexTensor {
    CALLS.record();
    let (shape, batches, (m, k, n)) = product_dims(&a, &b);
    let size = m * n;
    if k == 0 || size == 0 {
        return flex_from_f32(vec![0.0; batches * size], shape, DType::F32);
    }
    let (a, b) = (Matrices::of(&a), Matrices::of(&b));
    if blocks != Blocks::Dense {
        let out = matmul_blocks_flex((&a, &b), (m, k, n), batches, blocks);
        return flex_from_f32(out, shape, DType::F32);
    }
    let one = |out: *mut f32, i: usize, split: bool| {
        let (a, b) = ((a.first(i), a.strides), (b.first(i), b.strides));
        // SAFETY: `out` is matrix i's own m × n piece of the output; a's and b's
        // matrices i lie within their layouts.
        unsafe {
            if split {
                gemm_bands_rounding((out, n), (m, k, n), a, b, false, round)
            } else {
                gemm_into((out, n), (m, k, n), a, b);
                round_block((out, n), (m, n), round);
            }
        }
    };
    let mut out = Vec::<f32>::with_capacity(batches * size);
    let work = m * n * k;
    let large = work >= PARALLEL_FROM && (k >= NARROW_K || work >= NARROW_PARALLEL_FROM);
    if large || batches == 1 {
        // Large matrices (or one): each split across threads.
        for i in 0..batches {
            // SAFETY: within the capacity reserved above.
            one(unsafe { out.as_mut_ptr().add(i * size) }, i, large);
        }
    } else {
        // Many small matrices: one per task.
        use rayon::prelude::*;
        out.spare_capacity_mut()
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, piece)| one(piece.as_mut_ptr().cast(), i, false));
    }
    // SAFETY: every matrix of the output was written above.
    unsafe { out.set_len(batches * size) };
    flex_from_f32(out, shape, DType::F32)
}

impl MatmulBackend for Flex {
    fn matmul(a: FlexTensor, b: FlexTensor, blocks: Blocks) -> FlexTensor {
        flex_product(a, b, blocks, None)
    }

    fn matmul_round_output(a: FlexTensor, b: FlexTensor, format: HalfFormat) -> FlexTensor {
        ROUNDING_CALLS.record();
        flex_product(a, b, Blocks::Dense, Some(format))
    }

    fn matmul_half(a: FlexTensor, b: FlexTensor, format: HalfFormat) -> FlexTensor {
        if format != HalfFormat::Bf16 || !crate::bf16_gemm::available() {
            let round = |x| <Self as HalfRoundingBackend>::round_to_half(x, format);
            return Self::matmul_round_output(round(a), round(b), format);
        }
        CALLS.record();
        BF16_CALLS.record();
        let (shape, batches, (m, k, n)) = product_dims(&a, &b);
        let (a, b) = (Matrices::of(&a), Matrices::of(&b));
        let mut out = Vec::<f32>::with_capacity(batches * m * n);
        for i in 0..batches {
            // SAFETY: the CPU has the instruction (checked above); matrix i's output lies
            // within the capacity reserved above; a's and b's matrices i lie within their
            // layouts. The kernel writes every element.
            unsafe {
                crate::bf16_gemm::gemm_bf16(
                    (out.as_mut_ptr().add(i * m * n), n),
                    (m, k, n),
                    (a.first(i), a.strides),
                    (b.first(i), b.strides),
                    true,
                );
            }
        }
        // SAFETY: every matrix of the output was written above.
        unsafe { out.set_len(batches * m * n) };
        flex_from_f32(out, shape, DType::F32)
    }
}

/// Products [`MatmulBackend::matmul_half`] ran with the bf16 kernel.
pub static BF16_CALLS: RunCount = RunCount::new();

/// Products [`MatmulBackend::matmul_round_output`] ran on flex.
pub static ROUNDING_CALLS: RunCount = RunCount::new();

/// The backward of autocast's product ([`MatmulBackend::matmul_half`]).
#[derive(Debug)]
struct HalfBackward {
    format: HalfFormat,
    /// The bf16 kernel's: the inputs are kept as given, and each backward product rounds
    /// its operands as it packs them. Otherwise the inputs are kept rounded, the gradient
    /// is rounded once, and the products round only their outputs.
    kernel: bool,
}

impl<B: Backend + MatmulBackend + HalfRoundingBackend> Backward<B, 2> for HalfBackward {
    /// Both inputs (rounded unless `kernel`).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        let [node_a, node_b] = ops.parents;
        let r = grad.shape().num_dims();
        let t = |x: FloatTensor<B>| B::float_swap_dims(x, r - 2, r - 1);
        let format = self.format;
        let (grad, product): (_, fn(_, _, _) -> _) = if self.kernel {
            (grad, B::matmul_half)
        } else {
            (B::round_to_half(grad, format), B::matmul_round_output)
        };
        if let Some(node) = node_a {
            grads.register::<B>(node.id, product(grad.clone(), t(b), format));
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, product(t(a), grad, format));
        }
    }
}

/// The backward of [`MatmulBackend::matmul_round_output`]: the rounding's (the gradient
/// rounded), then the product's.
#[derive(Debug)]
struct RoundOutputBackward(HalfFormat);

impl<B: Backend + MatmulBackend + HalfRoundingBackend> Backward<B, 2> for RoundOutputBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = B::round_to_half(grads.consume::<B>(&ops.node), self.0);
        let (a, b) = ops.state;
        let [node_a, node_b] = ops.parents;
        let r = grad.shape().num_dims();
        let t = |x: FloatTensor<B>| B::float_swap_dims(x, r - 2, r - 1);
        if let Some(node) = node_a {
            grads.register::<B>(node.id, B::matmul(grad.clone(), t(b), Blocks::Dense));
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, B::matmul(t(a), grad, Blocks::Dense));
        }
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: Backend + MatmulBackend> Backward<B, 2> for MatmulBackward {
    /// Both inputs and the product's blocks.
    type State = (FloatTensor<B>, FloatTensor<B>, Blocks);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, blocks) = ops.state;
        let [node_a, node_b] = ops.parents;
        // d a = g · bᵀ, d b = aᵀ · g; the transposes are views. A triangular output's
        // gradient is read only on its blocks, a triangular input's is wanted only there.
        let (blocks_a, blocks_b) = match blocks {
            Blocks::Dense => (Blocks::Dense, Blocks::Dense),
            Blocks::OutLower(bs) => (Blocks::LeftLower(bs), Blocks::RightLower(bs)),
            Blocks::LeftLower(bs) => (Blocks::OutLower(bs), Blocks::LeftUpper(bs)),
            Blocks::LeftUpper(_) | Blocks::RightLower(_) => {
                panic!("a {blocks:?} product has no gradient: it is for backward passes only")
            }
        };
        let r = grad.shape().num_dims();
        let t = |x: FloatTensor<B>| B::float_swap_dims(x, r - 2, r - 1);
        if let Some(node) = node_a {
            grads.register::<B>(node.id, B::matmul(grad.clone(), t(b), blocks_a));
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, B::matmul(t(a), grad, blocks_b));
        }
    }
}

impl<B: Backend + MatmulBackend + HalfRoundingBackend, C: CheckpointStrategy> MatmulBackend
    for Autodiff<B, C>
{
    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, blocks: Blocks) -> FloatTensor<Self> {
        match MatmulBackward
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.into_primitive(), b.into_primitive());
                let y = B::matmul(a.clone(), b.clone(), blocks);
                prep.finish((a, b, blocks), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::matmul(a.into_primitive(), b.into_primitive(), blocks))
            }
        }
    }

    fn matmul_half(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        format: HalfFormat,
    ) -> FloatTensor<Self> {
        let kernel = format == HalfFormat::Bf16 && crate::bf16_gemm::available();
        let backward = HalfBackward { format, kernel };
        match backward
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.into_primitive(), b.into_primitive());
                if kernel {
                    let y = B::matmul_half(a.clone(), b.clone(), format);
                    return prep.finish((a, b), y);
                }
                let (a, b) = (B::round_to_half(a, format), B::round_to_half(b, format));
                let y = B::matmul_round_output(a.clone(), b.clone(), format);
                prep.finish((a, b), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul_half(
                a.into_primitive(),
                b.into_primitive(),
                format,
            )),
        }
    }

    fn matmul_round_output(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        format: HalfFormat,
    ) -> FloatTensor<Self> {
        match RoundOutputBackward(format)
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.into_primitive(), b.into_primitive());
                let y = B::matmul_round_output(a.clone(), b.clone(), format);
                prep.finish((a, b), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul_round_output(
                a.into_primitive(),
                b.into_primitive(),
                format,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::tensor::Distribution;

    /// Equal to Burn's matmul, output and both gradients: contiguous inputs, a transposed
    /// weight (the tied LM head), a sliced one, and sizes on both sides of the threshold
    /// where products split across threads: in bands of rows and of columns (the
    /// gradients), of uneven sizes, a narrow output, and a narrow inner dimension.
    #[test]
    fn matmul_equals_burns_in_2d() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let r = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let shapes = [
            (7, 5, 3),
            (300, 200, 250),
            (257, 70, 130),
            (40, 90, 700),
            (900, 60, 40),
            // Over 8 terms: one thread forward, bands backward (see `NARROW_K`).
            (700, 8, 150),
        ];
        for (m, k, n) in shapes {
            let a = r([m, k]);
            let weights = [
                ("contiguous", r([k, n])),
                ("transposed", r([n, k]).transpose()),
                ("sliced", r([k, n + 4]).slice([0..k, 2..n + 2])),
            ];
            for (what, b) in weights {
                let w = r([m, n]);
                let run = |ours: bool| {
                    let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                    let y = if ours {
                        matmul(a.clone(), b.clone())
                    } else {
                        a.clone().matmul(b.clone())
                    };
                    let g = (y.clone() * w.clone()).sum().backward();
                    let v = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
                    [v(y), v(a.grad(&g).unwrap()), v(b.grad(&g).unwrap())]
                };
                let calls = CALLS.get();
                let (ours, burns) = (run(true), run(false));
                assert!(CALLS.get() >= calls + 3, "{what}: the extension ran");
                for (part, (x, y)) in ["output", "da", "db"].iter().zip(ours.iter().zip(&burns)) {
                    let err = max_relative_difference(x, y);
                    assert!(
                        err < 1e-5,
                        "{m}x{k}x{n} {what} {part}: max difference {err}"
                    );
                }
            }
        }
    }

    /// Each block structure equals Burn's product of the operands with the skipped blocks
    /// zeroed, output and both gradients (which exercise the two backward-only structures),
    /// for blocks that divide the size and blocks that leave a partial one, a view as the
    /// triangular operand among them.
    #[test]
    fn block_products_equal_masked_dense_ones() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let r = |s: [usize; 3]| Tensor::<3>::random(s, Distribution::Normal(0.0, 1.0), &device);
        for (t, d, bs) in [(48, 5, 16), (50, 7, 16), (9, 3, 4)] {
            // 1 on and below the diagonal blocks.
            let lower: Vec<f32> = (0..t * t)
                .map(|e| f32::from(e % t / bs <= e / t / bs))
                .collect();
            let lower = Tensor::<1>::from_floats(lower.as_slice(), &device).reshape([1, t, t]);
            // (structure, a, b, what the reference masks: 0 output, 1 a)
            let cases = [
                (
                    Blocks::OutLower(bs),
                    r([2, t, d]),
                    r([2, t, d]).swap_dims(1, 2),
                    0,
                ),
                (Blocks::LeftLower(bs), r([2, t, t]), r([2, t, d]), 1),
                (
                    Blocks::LeftLower(bs),
                    r([2, t, t]).swap_dims(1, 2),
                    r([2, t, d]),
                    1,
                ),
            ];
            for (blocks, a, b, masked) in cases {
                let w = r([2, t, b.dims()[2]]);
                let run = |ours: bool| {
                    let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                    let y = match (ours, masked) {
                        (true, _) => matmul_blocks(a.clone(), b.clone(), blocks),
                        (false, 0) => a.clone().matmul(b.clone()) * lower.clone(),
                        (false, _) => (a.clone() * lower.clone()).matmul(b.clone()),
                    };
                    let g = (y.clone() * w.clone()).sum().backward();
                    let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
                    let da = a.grad(&g).unwrap();
                    // A triangular input's gradient is defined on its blocks only.
                    let da = if masked == 1 {
                        da * lower.clone().inner()
                    } else {
                        da
                    };
                    [v(y), v(da), v(b.grad(&g).unwrap())]
                };
                let (ours, burns) = (run(true), run(false));
                for (part, (x, y)) in ["output", "da", "db"].iter().zip(ours.iter().zip(&burns)) {
                    let err = max_relative_difference(x, y);
                    assert!(
                        err < 1e-5,
                        "t {t} block {bs} {blocks:?} {part}: max difference {err}"
                    );
                }
            }
        }
    }

    /// bf16 and f16 autocast's product equals its reference, the roundings around the f32
    /// product (to summation order, so to one step of the format where the order tips a
    /// rounding), output and both gradients (whose products read a transposed operand),
    /// a transposed weight among them; sizes that split in bands of rows, that are large
    /// with too few rows for bands (columns), and small; and it ran the bf16 kernel where
    /// the CPU has it, f32 products rounding their outputs elsewhere.
    #[test]
    fn half_products_equal_the_roundings_around_the_f32_one() {
        let device = Device::flex().autodiff();
        device.seed(6);
        let r = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0.0, 1.0), &device);
        for format in [HalfFormat::Bf16, HalfFormat::F16] {
            for (m, k, n) in [(300, 200, 70), (70, 300, 45), (5, 3, 7)] {
                let (a, w) = (r([m, k]), r([m, n]));
                for b in [r([k, n]), r([n, k]).transpose()] {
                    let run = |fused: bool| {
                        let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                        let y = if fused {
                            matmul_rounded(a.clone(), b.clone(), format)
                        } else {
                            let round = |x| round_to_half::<2>(x, format);
                            round(matmul(round(a.clone()), round(b.clone())))
                        };
                        let g = (y.clone() * w.clone()).sum().backward();
                        let v = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
                        [v(y), v(a.grad(&g).unwrap()), v(b.grad(&g).unwrap())]
                    };
                    let (kernel, rounded) = (BF16_CALLS.get(), ROUNDING_CALLS.get());
                    let (ours, reference) = (run(true), run(false));
                    let on_kernel = format == HalfFormat::Bf16 && crate::bf16_gemm::available();
                    assert_eq!(
                        (
                            BF16_CALLS.get() >= kernel + 3,
                            ROUNDING_CALLS.get() >= rounded + 3
                        ),
                        (on_kernel, !on_kernel),
                        "{format:?}: the bf16 kernel ran where it can, the rounding product elsewhere"
                    );
                    for (part, (x, y)) in ["output", "da", "db"]
                        .iter()
                        .zip(ours.iter().zip(&reference))
                    {
                        // One bf16 step is 2^-8 to 2^-7 of the value (f16's, 2^-11 to 2^-10).
                        let err = max_relative_difference(x, y);
                        let step = match format {
                            HalfFormat::Bf16 => 2f32.powi(-7),
                            HalfFormat::F16 => 2f32.powi(-10),
                        };
                        assert!(
                            err <= step,
                            "{format:?} {m}x{k}x{n} {part}: max difference {err}"
                        );
                        let same = x.iter().zip(y).filter(|(x, y)| x == y).count();
                        assert!(
                            same * 10 >= x.len() * 9,
                            "{format:?} {m}x{k}x{n} {part}: {same} of {} equal",
                            x.len()
                        );
                    }
                }
            }
        }
    }

    /// The product with its output rounded equals the rounding of Burn's product, output
    /// and both gradients (the rounding's backward rounds the gradient): sizes that split in
    /// bands of rows, of columns, and one that stays on one thread.
    #[test]
    fn round_output_product_equals_the_rounded_product() {
        let device = Device::flex().autodiff();
        device.seed(8);
        let r = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0.0, 1.0), &device);
        for format in [HalfFormat::Bf16, HalfFormat::F16] {
            for (m, k, n) in [(300, 200, 70), (70, 300, 400), (9, 5, 6)] {
                let (a, b, w) = (r([m, k]), r([k, n]), r([m, n]));
                let run = |fused: bool| {
                    let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                    let y = if fused {
                        Tensor::<2>::from_dispatch(
                            <burn::backend::Dispatch as MatmulBackend>::matmul_round_output(
                                a.clone().into_dispatch(),
                                b.clone().into_dispatch(),
                                format,
                            ),
                        )
                    } else {
                        round_to_half(a.clone().matmul(b.clone()), format)
                    };
                    let g = (y.clone() * w.clone()).sum().backward();
                    let v = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
                    [v(y), v(a.grad(&g).unwrap()), v(b.grad(&g).unwrap())]
                };
                let calls = ROUNDING_CALLS.get();
                let (ours, reference) = (run(true), run(false));
                assert!(ROUNDING_CALLS.get() > calls, "the extension ran");
                for (part, (x, y)) in ["output", "da", "db"]
                    .iter()
                    .zip(ours.iter().zip(&reference))
                {
                    let rounded = x.iter().all(|&v| {
                        let again = match format {
                            HalfFormat::Bf16 => crate::half_rounding::round(v),
                            HalfFormat::F16 => crate::half_rounding::round_f16(v),
                        };
                        again == v
                    });
                    assert!(
                        rounded || *part != "output",
                        "{format:?}: output not rounded"
                    );
                    let err = max_relative_difference(x, y);
                    assert!(err <= 2f32.powi(-7), "{format:?} {m}x{k}x{n} {part}: {err}");
                }
            }
        }
    }

    /// Batched as attention uses it: heads split by a view, keys transposed by a view.
    #[test]
    fn matmul_equals_burns_batched() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let r = |s: [usize; 4]| Tensor::<4>::random(s, Distribution::Normal(0.0, 1.0), &device);
        // q [2, 3 heads, 9, 4] as a view of [2, 9, 3, 4]; kᵀ a view of k [2, 3, 9, 4].
        let q = r([2, 9, 3, 4]).swap_dims(1, 2);
        let k = r([2, 3, 9, 4]);
        let w = r([2, 3, 9, 9]);
        let run = |ours: bool| {
            let (q, k) = (q.clone().require_grad(), k.clone().require_grad());
            let kt = k.clone().swap_dims(2, 3);
            let y = if ours {
                matmul(q.clone(), kt)
            } else {
                q.clone().matmul(kt)
            };
            let g = (y.clone() * w.clone()).sum().backward();
            let v = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
            [v(y), v(q.grad(&g).unwrap()), v(k.grad(&g).unwrap())]
        };
        let (ours, burns) = (run(true), run(false));
        for (part, (x, y)) in ["output", "dq", "dk"].iter().zip(ours.iter().zip(&burns)) {
            let err = max_relative_difference(x, y);
            assert!(err < 1e-5, "{part}: max difference {err}");
        }
    }
}

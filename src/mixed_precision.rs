//! Mixed precision, as PyTorch's autocast does it: inside [`autocast`], every projection
//! (the matmuls that hold almost all of a step's FLOPs) runs on a low-precision copy of its
//! f32 weight and input, and returns f32 — or, where it feeds another projection on a
//! backend with half-precision kernels (the MLP's hidden layer on libtorch and wgpu,
//! [`linear_low`]), stays in the low precision, as PyTorch's autocast leaves a linear's
//! output. Everything else — norms, softmax statistics,
//! recurrent states and scans, the loss — stays f32, as do the master weights and the
//! optimizer. The casts are in the autodiff graph, so gradients arrive in f32 on the masters.

use std::cell::Cell;

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::device::{BackendKind, Precision};
use crate::half_rounding::HalfFormat;
use crate::split_product::{split_product, split_product_and_input};

thread_local! {
    static WORKING_DTYPE: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// Run `f` with projections in `dtype` (`None`: plain f32). Nests; restores on return.
pub fn autocast<T>(dtype: Option<FloatDType>, f: impl FnOnce() -> T) -> T {
    let before = WORKING_DTYPE.with(|d| d.replace(dtype));
    let out = f();
    WORKING_DTYPE.with(|d| d.set(before));
    out
}

/// The dtype projections run in now, if not f32.
pub fn working_dtype() -> Option<FloatDType> {
    WORKING_DTYPE.with(Cell::get)
}

/// Says, once per run, what `precision` does for speed on the cpu backend: bf16 multiplies
/// on the CPU's bf16 dot product where metamix uses it ([`crate::bf16_gemm`]), faster than
/// f32; otherwise bf16 and f16 round f32 operands around an f32 product
/// ([`crate::half_rounding`]), at about f32's speed. Activations stay f32 either way.
pub fn note_cpu_precision(backend: BackendKind, precision: Precision) {
    if backend != BackendKind::Cpu || crate::device::working_dtype(precision).is_none() {
        return;
    }
    if precision == Precision::Bf16 && crate::bf16_gemm::available() {
        eprintln!(
            "note: training.precision = \"bf16\" on the cpu backend multiplies on this CPU's \
             bf16 dot product, faster than f32; activations stay f32 between projections, so \
             it saves no memory"
        );
        return;
    }
    let name = format!("{precision:?}").to_lowercase();
    eprintln!(
        "note: training.precision = \"{name}\" on the cpu backend rounds the projections to \
         {name} but multiplies in f32 (metamix has no {name} matrix kernel for this CPU), so it \
         trains at about f32's speed here: use it for its numerics, not for speed"
    );
}

/// `x · W + b` for `x` `[.., d_in]`: Burn's `Linear::forward`, in the working dtype when
/// under [`autocast`] (the bias is added in f32, after the product is cast back).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    project(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// [`linear`] whose output feeds another projection: under [`autocast`] on a backend with
/// half-precision kernels of its own (libtorch, wgpu) it stays in the working dtype, as
/// PyTorch's autocast leaves a linear's output, so the activation between the two (the
/// MLP's GELU, SwiGLU's product) runs on half the bytes and the next projection casts
/// nothing. Flex keeps activations f32 (its projections round f32 operands instead).
pub fn linear_low<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let (w, b) = (layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    match low_dtype(&x) {
        Some(dtype) => {
            let y = matmul_rows_in(x, w, Some(dtype));
            with_bias(y, b.map(|b| b.cast(dtype)))
        }
        None => project(x, w, b),
    }
}

/// The working dtype [`linear_low`] keeps `x`'s projection in, if any.
fn low_dtype<const D: usize>(x: &Tensor<D>) -> Option<FloatDType> {
    working_dtype().filter(|_| !crate::device::is_flex(&x.device()))
}

/// `x · w + b`, the bias (if any) added after the product.
fn project<const D: usize>(x: Tensor<D>, w: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    with_bias(matmul_rows(x, w), bias)
}

/// `y + b` along the last dim, where there is a bias.
fn with_bias<const D: usize>(y: Tensor<D>, bias: Option<Tensor<1>>) -> Tensor<D> {
    match bias {
        Some(b) => crate::bias_add::add_bias(y, b),
        None => y,
    }
}

/// `linear(layer, x)` cut along its output features into pieces `widths` wide (summing to
/// its width), each its own product with a column block of the weight. Narrowing one
/// output instead leaves each piece a strided view, copied by whatever reads it, whose
/// gradient is a zero-filled tensor of the whole output with the piece written in: a cost
/// per activation, where this pays it once per weight. In f32 the pieces are one op
/// ([`split_product`]), whose backward on flex sums nothing through Burn's adds; under
/// [`autocast`], a product per piece in the working dtype.
pub fn linear_split<const D: usize, const N: usize>(
    layer: &Linear,
    x: Tensor<D>,
    widths: [usize; N],
) -> [Tensor<D>; N] {
    linear_split_in(layer, x, widths, false).0
}

/// [`linear_split`] and x itself, for another reader of x: in f32 on flex the product's
/// backward then sums x's two gradients in its own products
/// ([`split_product_and_input`]), where autodiff would add them with Burn's add.
pub fn linear_split_and_input<const D: usize, const N: usize>(
    layer: &Linear,
    x: Tensor<D>,
    widths: [usize; N],
) -> ([Tensor<D>; N], Tensor<D>) {
    let (pieces, x) = linear_split_in(layer, x, widths, true);
    (pieces, x.expect("asked for"))
}

fn linear_split_in<const D: usize, const N: usize>(
    layer: &Linear,
    x: Tensor<D>,
    widths: [usize; N],
    and_input: bool,
) -> ([Tensor<D>; N], Option<Tensor<D>>) {
    let (w, bias) = (layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let x = x.reshape([rows, dims[D - 1]]);
    let (pieces, input) = match working_dtype() {
        None if and_input => {
            let (pieces, x) = split_product_and_input(x, w, widths);
            (pieces, Some(x))
        }
        None => (split_product(x, w, widths), None),
        Some(_) => {
            let input = and_input.then(|| x.clone());
            let pieces = std::array::from_fn(|i| {
                let start = widths[..i].iter().sum();
                matmul_rows(x.clone(), w.clone().narrow(1, start, widths[i]))
            });
            (pieces, input)
        }
    };
    let input = input.map(|x| x.reshape(dims));
    let mut start = 0;
    let pieces = pieces.map(|piece| {
        let width = piece.dims()[1];
        dims[D - 1] = width;
        let piece = piece.reshape(dims);
        let b = bias.clone().map(|b| b.narrow(0, start, width));
        start += width;
        with_bias(piece, b)
    });
    (pieces, input)
}

/// `x · w` for `x` `[.., k]` and a weight `w` `[k, n]`, as one `[rows, k] · [k, n]` product
/// over all leading dims, in the working dtype when under [`autocast`].
///
/// Burn keeps `[batch, seq]` rows as a batch of products against a broadcast weight when
/// `seq` fills its GPU tiles; on the CPU that is `batch` small gemms, and the weight's
/// gradient a `[batch, k, n]` tensor summed afterwards. One 2-D product is one gemm each
/// way, with `w`'s gradient accumulated inside it.
pub fn matmul_rows<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    matmul_rows_in(x, w, None)
}

/// [`matmul_rows`], its product left in `keep` (the working dtype) instead of f32 where
/// given (see [`linear_low`]).
fn matmul_rows_in<const D: usize>(
    x: Tensor<D>,
    w: Tensor<2>,
    keep: Option<FloatDType>,
) -> Tensor<D> {
    let mut dims = x.dims();
    let [k, n] = w.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = n;
    let x = x.reshape([rows, k]);
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let y = match working_dtype() {
        None => crate::matmul::matmul(x, w),
        // Flex has no bf16 or f16 matmul of its own: the same numbers come from rounded
        // f32 operands and a rounded f32 product, without the casts' element-by-element
        // conversions; bf16's on the CPU's bf16 dot product where it has one.
        Some(dtype @ (FloatDType::BF16 | FloatDType::F16))
            if f32s && crate::device::is_flex(&x.device()) =>
        {
            let format = match dtype {
                FloatDType::BF16 => HalfFormat::Bf16,
                _ => HalfFormat::F16,
            };
            crate::matmul::matmul_rounded(x, w, format)
        }
        Some(dtype) => {
            let y = x.cast(dtype).matmul(w.cast(dtype));
            match keep {
                Some(_) => y,
                None => y.cast(FloatDType::F32),
            }
        }
    };
    y.reshape(dims)
}

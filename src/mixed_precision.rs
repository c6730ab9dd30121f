//! Mixed precision, as PyTorch's autocast does it: inside [`autocast`], every projection
//! (the matmuls that hold almost all of a step's FLOPs) runs on a low-precision copy of its
//! f32 weight and input, and returns f32. Everything else — norms, softmax statistics,
//! recurrent states and scans, the loss — stays f32, as do the master weights and the
//! optimizer. The casts are in the autodiff graph, so gradients arrive in f32 on the masters.

use std::cell::Cell;

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::FloatDType;

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

/// `x · W + b` for `x` `[.., d_in]`: Burn's `Linear::forward`, in the working dtype when
/// under [`autocast`] (the bias is added in f32, after the product is cast back).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let Some(dtype) = working_dtype() else {
        return layer.forward(x);
    };
    let out_dtype = x.dtype();
    let w = layer.weight.val().cast(dtype).unsqueeze::<D>();
    let y = x.cast(dtype).matmul(w).cast(out_dtype);
    match &layer.bias {
        Some(b) => y + b.val().unsqueeze::<D>(),
        None => y,
    }
}

/// `a · b`, in the working dtype when under [`autocast`].
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    match working_dtype() {
        None => a.matmul(b),
        Some(dtype) => {
            let out_dtype = a.dtype();
            a.cast(dtype).matmul(b.cast(dtype)).cast(out_dtype)
        }
    }
}

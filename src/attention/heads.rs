//! Heads in and out of the `[b, heads, t, head_dim]` layout, as a Burn backend extension on
//! flex: the swap of dims 1 and 2 either as a view or as a contiguous copy made in parallel,
//! each the other's backward. Splitting heads is a view forward (the products read it in
//! place) and a copy backward, where the gradient becomes `[b, t, d]` rows for the
//! projection's; merging them is a copy forward and a view backward.
//!
//! As Burn ops the copies come from `reshape` of a swapped view, on one thread while the
//! other core waits: four per softmax layer and step (perf: 3% of the main thread's time
//! in a default-model step). The reference is `swap_dims` and `reshape`; a test holds the
//! two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::device::{RunCount, flex_from_f32, is_flex};

#[backend_extension(Flex, Autodiff)]
pub trait HeadsBackend: Backend {
    /// `x` `[b, a, c, d]` as `[b, c, a, d]`: a contiguous copy where `copy`, else a view.
    fn swap_heads(x: FloatTensor<Self>, copy: bool) -> FloatTensor<Self>;
}

/// Copies the extension has made in this process (for a test that a form took the path).
pub static COPIES: RunCount = RunCount::new();

/// `[b, t, heads · head_dim]` → `[b, heads, t, head_dim]`, a view (its gradient a copy).
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, t, d] = x.dims();
    swap(x.reshape([b, t, heads, d / heads]), false)
}

/// `[b, heads, t, head_dim]` → `[b, t, heads · head_dim]`, a copy (its gradient a view).
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, t, hd] = x.dims();
    swap(x, true).reshape([b, t, h * hd])
}

/// Dims 1 and 2 swapped: the extension for f32 on flex, Burn's `swap_dims` elsewhere.
fn swap(x: Tensor<4>, copy: bool) -> Tensor<4> {
    if x.dtype() != DType::F32 || !is_flex(&x.device()) {
        return x.swap_dims(1, 2);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as HeadsBackend>::swap_heads(
        x.into_dispatch(),
        copy,
    ))
}

impl HeadsBackend for Flex {
    fn swap_heads(x: FlexTensor, copy: bool) -> FlexTensor {
        let view = Flex::float_swap_dims(x.clone(), 1, 2);
        // A view where one was asked for, where it is already contiguous (one head, or one
        // step), or for a dtype other than f32 (which the forward never passes; whatever
        // reads the view copies it).
        if !copy || view.layout().contiguous_offsets().is_some() || x.dtype() != DType::F32 {
            return view;
        }
        COPIES.record();
        let [b, a, c, d]: [usize; 4] = x.shape().to_vec().try_into().expect("4 dims");
        let (layout, values) = (x.layout(), x.storage::<f32>());
        let (start, s) = (layout.start_offset() as isize, layout.strides().to_vec());
        let len = b * c * a * d;
        let mut out = Vec::<f32>::with_capacity(len);
        // One task per output row block `[a, d]`, (batch, c) in order.
        out.spare_capacity_mut()[..len]
            .par_chunks_mut((a * d).max(1))
            .enumerate()
            .for_each(|(i, block)| {
                let (bi, ci) = ((i / c) as isize, (i % c) as isize);
                for (ai, run) in block.chunks_exact_mut(d).enumerate() {
                    // The layout's offsets lie inside its storage.
                    let first = (start + bi * s[0] + ai as isize * s[1] + ci * s[2]) as usize;
                    if s[3] == 1 {
                        let source = &values[first..first + d];
                        for (v, &x) in run.iter_mut().zip(source) {
                            v.write(x);
                        }
                    } else {
                        for (j, v) in run.iter_mut().enumerate() {
                            v.write(values[(first as isize + j as isize * s[3]) as usize]);
                        }
                    }
                }
            });
        // SAFETY: each block's a runs of d were written above.
        unsafe { out.set_len(len) };
        flex_from_f32(out, [b, c, a, d], DType::F32)
    }
}

#[derive(Debug)]
struct SwapBackward;

impl<B: Backend + HeadsBackend> Backward<B, 1> for SwapBackward {
    /// Whether the forward copied: the backward does the other.
    type State = bool;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::swap_heads(grad, !ops.state));
        }
    }
}

impl<B: Backend + HeadsBackend, C: CheckpointStrategy> HeadsBackend for Autodiff<B, C> {
    fn swap_heads(x: FloatTensor<Self>, copy: bool) -> FloatTensor<Self> {
        let node = x.node();
        let out = B::swap_heads(x.into_primitive(), copy);
        match SwapBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(copy, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Split and merge equal Burn's `swap_dims` and `reshape`, outputs and gradients, with
    /// the extension's copies made both ways.
    #[test]
    fn heads_equal_swapped_views() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let normal =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (b, t, h, hd) = (2, 7, 3, 5);
        let probe = normal([b, t, h * hd]);
        let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
        let x = normal([b, t, h * hd]).require_grad();
        let run = |ours: bool| {
            let heads = match ours {
                true => split_heads(x.clone(), h),
                false => x.clone().reshape([b, t, h, hd]).swap_dims(1, 2),
            };
            // Something per head, so the gradient is not a plain copy of the probe's.
            let factors: Vec<f32> = (1..=h).map(|i| i as f32).collect();
            let heads = heads
                * Tensor::<1>::from_data(TensorData::new(factors, [h]), &device)
                    .reshape([1, h, 1, 1]);
            let out = match ours {
                true => merge_heads(heads),
                false => heads.swap_dims(1, 2).reshape([b, t, h * hd]),
            };
            let g = (out.clone() * probe.clone()).sum().backward();
            (v(out), v(x.grad(&g).unwrap()))
        };
        let before = COPIES.get();
        let (ours, reference) = (run(true), run(false));
        assert!(COPIES.get() >= before + 2, "copies both ways");
        assert_eq!(ours, reference);
    }

    /// The copy reads any layout: an offset start (a narrowed view), a last dim that is not
    /// contiguous (a transposed view), a negative stride (a flip); one head is a view.
    #[test]
    fn the_copy_reads_strided_layouts() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 5, 4, 6], Distribution::Normal(0.0, 1.0), &device);
        let layouts = [
            x.clone().narrow(1, 1, 3),
            x.clone().swap_dims(2, 3),
            x.clone().flip([3]),
            x.clone().narrow(1, 2, 1),
        ];
        for (i, y) in layouts.into_iter().enumerate() {
            let expected = y.clone().swap_dims(1, 2).into_data();
            let swapped = Tensor::<4>::from_dispatch(
                <burn::backend::Dispatch as HeadsBackend>::swap_heads(y.into_dispatch(), true),
            );
            assert_eq!(swapped.into_data(), expected, "layout {i}");
        }
    }
}

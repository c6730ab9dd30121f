//! Dropout, fused, as a Burn backend extension on flex: one parallel pass that zeroes an
//! element or scales it by `1 / (1 − p)`, in place where the tensor is not shared, and a
//! backward that is the same pass over the gradient. Whether element `i` survives is a
//! hash of `i` and the call's key (counter-based, as PyTorch's and flash-attention's
//! Philox masks on the GPU), so no mask is stored: the backward recomputes it.
//!
//! Burn's `Dropout` draws a Bernoulli tensor element by element from one ChaCha stream on
//! one thread, then multiplies twice: on nanoGPT's model with dropout 0.2 that was a sixth
//! of a step, with the other core waiting (perf). The reference, [`dropout_reference`], is
//! the same mask built element by element as a tensor and multiplied in; a test holds the
//! two equal, gradients included. On other backends Burn's `Dropout` runs as before.
//!
//! The key is drawn from the device's RNG, which the trainer seeds per step, so a seed
//! fixes the masks and a resumed run draws the ones an uninterrupted run would.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::nn::Dropout;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use rayon::prelude::*;

use std::cell::Cell;

use crate::device::{RunCount, is_flex, overwrite_f32};

#[backend_extension(Flex, Autodiff)]
pub trait DropoutBackend: Backend {
    /// `x` with element `i` scaled by `1 / (1 − p)` where [`Mask::keeps`] it, else zeroed.
    fn fused_dropout(x: FloatTensor<Self>, p: f64, key: u64) -> FloatTensor<Self>;
}

/// Fused dropouts run in this process (for a test that a model took this path).
pub static CALLS: RunCount = RunCount::new();

/// `dropout` applied to `x`, as Burn's `Dropout::forward` (only while training on an
/// autodiff device, and not at p = 0): the extension for f32 on flex, Burn's elsewhere.
pub fn forward<const D: usize>(dropout: &Dropout, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !is_active(dropout, &device) || x.dtype() != DType::F32 || !is_flex(&device) {
        return dropout.forward(x);
    }
    let key = draw_key(&device);
    Tensor::from_dispatch(<burn::backend::Dispatch as DropoutBackend>::fused_dropout(
        x.into_dispatch(),
        dropout.prob,
        key,
    ))
}

/// Whether `dropout` acts now on `device`, as Burn's does: training, on an autodiff
/// device, p > 0.
fn is_active(dropout: &Dropout, device: &Device) -> bool {
    dropout.training.is_enabled() && device.is_autodiff() && dropout.prob > 0.0
}

/// `(p, key)` of `dropout`'s mask for a call on `device` now, or `None` where it does not
/// act: for kernels that apply the mask inside themselves (FlashAttention's tiles, with
/// [`block_factors`]).
pub fn mask_for(dropout: &Dropout, device: &Device) -> Option<(f64, u64)> {
    is_active(dropout, device).then(|| (dropout.prob, draw_key(device)))
}

/// The factors (0 or `1 / (1 − p)`) the mask under `key` gives the block `rows × cols` of
/// each of `n` row-major `[t_rows, t_cols]` matrices stored one after another (as a
/// `[.., t_rows, t_cols]` tensor is): `[n, rows, cols]`, row-major. A tiled kernel that
/// multiplies its blocks by these drops what [`forward`] drops over the whole tensor.
pub fn block_factors(
    (p, key): (f64, u64),
    (n, t_rows, t_cols): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    let (mask, scale) = (Mask::new(p, key), (1.0 / (1.0 - p)) as f32);
    let (height, width) = (rows.len(), cols.len());
    let mut out = vec![1f32; n * height * width];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (m, i) = (r / height, rows.start + r % height);
            mask.apply(row, ((m * t_rows + i) * t_cols + cols.start) as u64, scale);
        });
    out
}

thread_local! {
    static FIXED_KEY: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` with every mask on this thread keyed by `key` instead of a draw from the
/// device's RNG: for tests that compare two forms under one mask, since flex's RNG is one
/// per process and tests running beside them draw from it too.
pub fn with_fixed_key<T>(key: u64, f: impl FnOnce() -> T) -> T {
    let before = FIXED_KEY.with(|k| k.replace(Some(key)));
    let out = f();
    FIXED_KEY.with(|k| k.set(before));
    out
}

/// A mask's key from the device's RNG: the top 16 bits of four uniform draws (each f32 in
/// [0, 1) carries at least 23 random bits).
fn draw_key(device: &Device) -> u64 {
    if let Some(key) = FIXED_KEY.with(Cell::get) {
        return key;
    }
    let draws = Tensor::<1>::random([4], Distribution::Default, device)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 draws");
    draws
        .iter()
        .fold(0u64, |key, &u| (key << 16) | (u * 65536.0) as u64 & 0xffff)
}

/// The reference: [`Mask`]'s keep decisions as a tensor of 0 and `1 / (1 − p)`, times `x`.
pub fn dropout_reference<const D: usize>(x: Tensor<D>, p: f64, key: u64) -> Tensor<D> {
    let (mask, scale) = (Mask::new(p, key), (1.0 / (1.0 - p)) as f32);
    let n = x.shape().num_elements();
    let factors: Vec<f32> = (0..n as u64)
        .map(|i| if mask.keeps(i) { scale } else { 0.0 })
        .collect();
    let factors = Tensor::<1>::from_data(TensorData::new(factors, [n]), &x.device());
    x.clone() * factors.reshape(x.shape())
}

/// Which elements a call keeps: element `i` survives when a 32-bit hash of `i` and the key
/// is at least `p · 2³²`, so with probability `1 − p` to within 2⁻³².
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    key: (u32, u32),
    threshold: u32,
}

impl Mask {
    pub fn new(p: f64, key: u64) -> Self {
        let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        // splitmix64's finaliser, so that keys a bit apart give unrelated words.
        let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            key: (z as u32, (z >> 32) as u32),
            threshold,
        }
    }

    /// Whether element `i` (row-major) survives.
    pub fn keeps(&self, i: u64) -> bool {
        self.part_key(i >> 32).keeps(i as u32, self.threshold)
    }

    /// `values[j] *= scale` where element `first + j` survives, else `0` (a product, so a
    /// NaN stays NaN as it does in Burn's dropout): what every fused form applies, so they
    /// all drop the same elements.
    #[inline(always)]
    pub fn apply(&self, values: &mut [f32], first: u64, scale: f32) {
        let last = first + values.len().saturating_sub(1) as u64;
        if first >> 32 == last >> 32 {
            // One part key for the whole run: the loop vectorises.
            let (key, low) = (self.part_key(first >> 32), first as u32);
            for (j, v) in values.iter_mut().enumerate() {
                let keep = key.keeps(low.wrapping_add(j as u32), self.threshold);
                *v *= if keep { scale } else { 0.0 };
            }
        } else {
            for (j, v) in values.iter_mut().enumerate() {
                *v *= if self.keeps(first + j as u64) {
                    scale
                } else {
                    0.0
                };
            }
        }
    }

    /// The key for the elements whose index has these high 32 bits.
    #[inline(always)]
    fn part_key(&self, high: u64) -> PartKey {
        PartKey(
            self.key.0,
            self.key.1 ^ mix((high as u32).wrapping_mul(0x9e37_79b9)),
        )
    }
}

/// A [`Mask`]'s key for the 2³² elements that share an index's high bits.
#[derive(Clone, Copy)]
struct PartKey(u32, u32);

impl PartKey {
    #[inline(always)]
    fn keeps(self, low: u32, threshold: u32) -> bool {
        mix(mix(low ^ self.0).wrapping_add(self.1)) >= threshold
    }
}

/// lowbias32 (Wellons, hash-prospector): a bijective 32-bit hash in which flipping any
/// input bit flips each output bit with probability close to ½. Two rounds, the key mixed
/// in between, so that nearby indices and nearby keys give unrelated bits; integer
/// multiplies and shifts, so the loop below vectorises.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Elements per parallel task: a power of two, so no task's indices cross a multiple of
/// 2³² and each has one [`PartKey`].
const PIECE: usize = 1 << 14;

/// [`Mask::apply`] compiled for each target, so that its loop vectorises.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn drop_piece(values: &mut [f32], first: u64, mask: Mask, scale: f32) {
    mask.apply(values, first, scale);
}

impl DropoutBackend for Flex {
    fn fused_dropout(x: FlexTensor, p: f64, key: u64) -> FlexTensor {
        CALLS.record();
        let (mask, scale) = (Mask::new(p, key), (1.0 / (1.0 - p)) as f32);
        overwrite_f32(x, |values| {
            values
                .par_chunks_mut(PIECE)
                .enumerate()
                .for_each(|(i, piece)| drop_piece(piece, (i * PIECE) as u64, mask, scale));
        })
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl<B: Backend + DropoutBackend> Backward<B, 1> for DropoutBackward {
    /// p and the key: the backward recomputes the mask.
    type State = (f64, u64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (p, key) = ops.state;
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::fused_dropout(grad, p, key));
        }
    }
}

impl<B: Backend + DropoutBackend, C: CheckpointStrategy> DropoutBackend for Autodiff<B, C> {
    fn fused_dropout(x: FloatTensor<Self>, p: f64, key: u64) -> FloatTensor<Self> {
        let node = x.node();
        let out = B::fused_dropout(x.into_primitive(), p, key);
        match DropoutBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((p, key), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::nn::DropoutConfig;

    /// The fused dropout equals the reference mask, output and gradient, over more
    /// elements than one task's, on a strided (transposed) input as on a contiguous one.
    #[test]
    fn fused_dropout_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(23);
        let (p, key) = (0.3, 0x1234_5678_9abc_def0);
        let normal =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let x = normal([3, PIECE / 64 + 5, 40]);
        for strided in [false, true] {
            // A fresh product is the only owner of its buffer (the in-place path); a
            // transposed view is neither contiguous nor unshared.
            let input = |x: Tensor<3>| if strided { x.swap_dims(1, 2) } else { x * 1.0 };
            let probe = normal(input(x.clone()).dims());
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let input = input(x.clone());
                let out = if fused {
                    Tensor::from_dispatch(
                        <burn::backend::Dispatch as DropoutBackend>::fused_dropout(
                            input.into_dispatch(),
                            p,
                            key,
                        ),
                    )
                } else {
                    dropout_reference(input, p, key)
                };
                let g = (out.clone() * probe.clone()).sum().backward();
                let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
                (v(out), v(x.grad(&g).unwrap()))
            };
            let before = CALLS.get();
            let (ours, reference) = (run(true), run(false));
            assert!(CALLS.get() > before, "the extension ran");
            assert_eq!(ours.0, reference.0, "output (strided: {strided})");
            let err = max_relative_difference(&ours.1, &reference.1);
            assert!(
                err < 1e-6,
                "gradient (strided: {strided}): max difference {err}"
            );
        }
    }

    /// Each element survives with probability 1 − p, independently of its neighbours and
    /// of other keys' masks, and the same key gives the same mask.
    #[test]
    fn masks_keep_one_minus_p_independently() {
        let n = 1u64 << 20;
        for p in [0.1, 0.5, 0.9] {
            let (a, b) = (Mask::new(p, 7), Mask::new(p, 8));
            let kept: Vec<bool> = (0..n).map(|i| a.keeps(i)).collect();
            let rate = kept.iter().filter(|&&k| k).count() as f64 / n as f64;
            // Four standard deviations of a binomial proportion.
            let tol = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!((rate - (1.0 - p)).abs() < tol, "p {p}: kept {rate}");
            let both = |f: &dyn Fn(u64) -> bool| (0..n).filter(|&i| f(i)).count() as f64 / n as f64;
            let q = (1.0 - p) * (1.0 - p);
            let neighbours = both(&|i| kept[i as usize] && kept[((i + 1) % n) as usize]);
            assert!(
                (neighbours - q).abs() < 2.0 * tol,
                "p {p}: neighbours both kept {neighbours}"
            );
            let across = both(&|i| kept[i as usize] && b.keeps(i));
            assert!(
                (across - q).abs() < 2.0 * tol,
                "p {p}: two keys both kept {across}"
            );
            assert!((0..1000).all(|i| Mask::new(p, 7).keeps(i) == kept[i as usize]));
        }
        // Indices past 2³² use a key of their own, not the first 2³²'s mask again.
        let m = Mask::new(0.5, 3);
        let same = (0..4096u64)
            .filter(|&i| m.keeps(i) == m.keeps(i + (1 << 32)))
            .count();
        assert!((1700..2400).contains(&same), "{same} of 4096 repeat");
    }

    /// In training the module path takes the extension; evaluation and p = 0 leave x as it is.
    #[test]
    fn forward_drops_only_while_training() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let x = Tensor::<2>::ones([64, 64], &device);
        let before = CALLS.get();
        let out = forward(&DropoutConfig::new(0.25).init(), x.clone());
        assert!(CALLS.get() > before, "the extension ran");
        let values = out.into_data().try_into_vec::<f32>().unwrap();
        assert!(
            values
                .iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        let zeros = values.iter().filter(|&&v| v == 0.0).count();
        assert!(
            (700..1350).contains(&zeros),
            "{zeros} of 4096 dropped at p 0.25"
        );
        let same = |d: Dropout, x: Tensor<2>| {
            let v = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
            v(forward(&d, x.clone())) == v(x)
        };
        assert!(same(DropoutConfig::new(0.0).init(), x.clone()));
        let flex = Device::flex();
        let plain = Tensor::<2>::ones([8, 8], &flex);
        assert!(same(DropoutConfig::new(0.5).init(), plain));
    }
}

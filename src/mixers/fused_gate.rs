//! Mamba's output gate `(y + D ⊙ u) ⊙ silu(z)`, fused, as a Burn backend extension on flex:
//! one pass forward, and one backward that writes the gradients of y, u and z and sums D's.
//! mamba_ssm folds the same gate into its scan kernel (`selective_scan_fn(…, D, z)`). Where
//! the fused scan has added `D ⊙ u` itself, [`gate`] is `y ⊙ silu(z)` (u and D empty).
//!
//! The reference, [`skip_gate_reference`], is four tensor ops (a broadcast product, a sum,
//! the SiLU, a product) whose backward is about eight more, each a pass over the layer's
//! activations into a fresh buffer. A test holds the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::activations::silu;
use crate::device::{
    RunCount, flex_f32, flex_from_f32, is_flex, register_gradients, unshared_f32, zeroed,
};
use crate::f32x16::{F32x16, QUAD, Quad, quad_part, with_f32x16};
use crate::vector_math::{Real, has_fma, sigmoid_and_exp_in};

#[backend_extension(Flex, Autodiff)]
pub trait SkipGateBackend: Backend {
    /// y, u, z `[.., d]` and D `[d]` → `(y + D ⊙ u) ⊙ silu(z)`.
    fn skip_gate(
        y: FloatTensor<Self>,
        u: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradients of y, u, D and z given the output's.
    #[allow(clippy::type_complexity)]
    fn skip_gate_backward(
        y: FloatTensor<Self>,
        u: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// Fused gates run in this process (for a test that the extension took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// Backwards of the gate without its skip run in place ([`backward_in_place`]), for a test.
pub static IN_PLACE_CALLS: RunCount = RunCount::new();

/// `(y + D ⊙ u) ⊙ silu(z)`: the extension for f32 on flex, [`skip_gate_reference`]
/// elsewhere.
pub fn skip_gate(y: Tensor<3>, u: Tensor<3>, d: Tensor<1>, z: Tensor<3>) -> Tensor<3> {
    let f32s = [y.dtype(), u.dtype(), d.dtype(), z.dtype()] == [DType::F32; 4];
    if !f32s || !is_flex(&y.device()) {
        return skip_gate_reference(y, u, d, z);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as SkipGateBackend>::skip_gate(
        y.into_dispatch(),
        u.into_dispatch(),
        d.into_dispatch(),
        z.into_dispatch(),
    ))
}

/// `y ⊙ silu(z)`, the gate without its skip (where the scan has added `D ⊙ u` to y itself):
/// the extension for f32 on flex with u and D empty, whose backward then writes no gradient
/// of u; tensor ops elsewhere.
pub fn gate(y: Tensor<3>, z: Tensor<3>) -> Tensor<3> {
    let device = y.device();
    if [y.dtype(), z.dtype()] != [DType::F32; 2] || !is_flex(&device) {
        return y * silu(z);
    }
    let empty = || Tensor::<1>::zeros([0], &device);
    Tensor::from_dispatch(<burn::backend::Dispatch as SkipGateBackend>::skip_gate(
        y.into_dispatch(),
        empty().into_dispatch(),
        empty().into_dispatch(),
        z.into_dispatch(),
    ))
}

/// The gate in tensor ops: the reference, and the form on other backends.
pub fn skip_gate_reference(y: Tensor<3>, u: Tensor<3>, d: Tensor<1>, z: Tensor<3>) -> Tensor<3> {
    (y + u * d.unsqueeze::<3>()) * silu(z)
}

/// Rows (positions) per parallel task.
const ROWS: usize = 64;

/// Elements per parallel task of the in-place backward ([`backward_in_place`]).
const PIECE: usize = 16 * 1024;

/// The inputs as f32 slices. u and D empty: no skip (see [`gate`]).
struct Inputs<'a> {
    y: std::borrow::Cow<'a, [f32]>,
    u: std::borrow::Cow<'a, [f32]>,
    d: std::borrow::Cow<'a, [f32]>,
    z: std::borrow::Cow<'a, [f32]>,
    width: usize,
}

impl<'a> Inputs<'a> {
    fn read(tensors: &'a [FlexTensor; 4]) -> Self {
        let width = tensors[0].shape().last().copied().unwrap_or(0);
        let [y, u, d, z] = tensors.each_ref().map(flex_f32);
        Self { y, u, d, z, width }
    }

    /// The channel count (y's last dim).
    fn width(&self) -> usize {
        self.width
    }

    /// Whether there is a skip `D ⊙ u`.
    fn skip(&self) -> bool {
        !self.d.is_empty()
    }
}

/// The output at rows `first..first + out.len() / d`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_rows(x: &Inputs, first: usize, out: &mut [f32]) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => forward_rows_in::<V, FMA>(x, first, out))
}

/// [`forward_rows`], in [`Quad`]s where the lanes take them (`quad_part`; the rest one by
/// one, the same arithmetic).
#[inline(always)]
fn forward_rows_in<V: F32x16, const FMA: bool>(x: &Inputs, first: usize, out: &mut [f32]) {
    let (w, full) = (x.width(), quad_part::<V>(x.width()));
    for (r, out) in out.chunks_exact_mut(w).enumerate() {
        let at = (first + r) * w;
        let (y, z) = (&x.y[at..at + w], &x.z[at..at + w]);
        if x.skip() {
            let (u, d) = (&x.u[at..at + w], &x.d[..w]);
            for c in (0..full).step_by(QUAD) {
                let [y, u, d, z] = Quad::<V>::load_each([y, u, d, z], c);
                gated::<_, FMA>(y + d * u, z).store(&mut out[c..]);
            }
            for c in full..w {
                out[c] = gated::<_, FMA>(y[c] + d[c] * u[c], z[c]);
            }
        } else {
            for c in (0..full).step_by(QUAD) {
                let [y, z] = Quad::<V>::load_each([y, z], c);
                gated::<_, FMA>(y, z).store(&mut out[c..]);
            }
            for c in full..w {
                out[c] = gated::<_, FMA>(y[c], z[c]);
            }
        }
    }
}

/// `x · silu(z)`, x the gated value (`y + D·u`, or y without the skip).
#[inline(always)]
fn gated<R: Real, const FMA: bool>(x: R, z: R) -> R {
    x * (z * sigmoid_and_exp_in::<R, FMA>(z).0)
}

/// [`gated`]'s gradients given the output's, `g`: that of x (of y; of u: times D; of D:
/// times u) and of z.
#[inline(always)]
fn gate_backward<R: Real, const FMA: bool>(x: R, z: R, g: R) -> (R, R) {
    let sig = sigmoid_and_exp_in::<R, FMA>(z).0;
    // g · silu(z): the gradient of x.
    let g_x = g * z * sig;
    // silu'(z) = σ(z)(1 + z(1 − σ(z))).
    let gz = g * x * sig * (z * (-sig + 1.0) + 1.0);
    (g_x, gz)
}

/// [`gated`]'s backward without the skip, element by element and in place: `g` (the
/// output's gradient) becomes y's, `z` becomes z's. Each line is read before it is written,
/// so no output buffer is filled or fetched (fresh buffers, zero-filled or not, cost the
/// gate's backward about as much as its arithmetic).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_in_place(y: &[f32], z: &mut [f32], g: &mut [f32]) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => {
        let full = quad_part::<V>(y.len());
        for c in (0..full).step_by(QUAD) {
            let [yq, zq, gq] = Quad::<V>::load_each([y, z, g], c);
            let (g_y, g_z) = gate_backward::<_, FMA>(yq, zq, gq);
            g_y.store(&mut g[c..]);
            g_z.store(&mut z[c..]);
        }
        for c in full..y.len() {
            (g[c], z[c]) = gate_backward::<_, FMA>(y[c], z[c], g[c]);
        }
    })
}

/// The gradients of y, u (with the skip) and z at rows `first..`, and these rows' share
/// of D's (empty without the skip).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_rows(
    x: &Inputs,
    grad: &[f32],
    first: usize,
    (gy, gu, gz): (&mut [f32], &mut [f32], &mut [f32]),
) -> Vec<f32> {
    const FMA: bool = has_fma!();
    with_f32x16!(V => backward_rows_in::<V, FMA>(x, grad, first, (gy, gu, gz)))
}

/// [`backward_rows`], in [`Quad`]s where the lanes take them (`quad_part`; the rest one by
/// one, the same arithmetic). `gu` is empty without the skip.
#[inline(always)]
fn backward_rows_in<V: F32x16, const FMA: bool>(
    x: &Inputs,
    grad: &[f32],
    first: usize,
    (gy, gu, gz): (&mut [f32], &mut [f32], &mut [f32]),
) -> Vec<f32> {
    let (w, full) = (x.width(), quad_part::<V>(x.width()));
    if !x.skip() {
        for (r, (gy, gz)) in gy
            .chunks_exact_mut(w)
            .zip(gz.chunks_exact_mut(w))
            .enumerate()
        {
            let at = (first + r) * w;
            let (y, z, g) = (&x.y[at..at + w], &x.z[at..at + w], &grad[at..at + w]);
            for c in (0..full).step_by(QUAD) {
                let [y, z, g] = Quad::<V>::load_each([y, z, g], c);
                let (g_y, g_z) = gate_backward::<_, FMA>(y, z, g);
                g_y.store(&mut gy[c..]);
                g_z.store(&mut gz[c..]);
            }
            for c in full..w {
                (gy[c], gz[c]) = gate_backward::<_, FMA>(y[c], z[c], g[c]);
            }
        }
        return Vec::new();
    }
    let d = &x.d[..w];
    let mut gd = vec![0f32; w];
    let rows = gy
        .chunks_exact_mut(w)
        .zip(gu.chunks_exact_mut(w))
        .zip(gz.chunks_exact_mut(w));
    for (r, ((gy, gu), gz)) in rows.enumerate() {
        let at = (first + r) * w;
        let (y, u, z, g) = (
            &x.y[at..at + w],
            &x.u[at..at + w],
            &x.z[at..at + w],
            &grad[at..at + w],
        );
        for c in (0..full).step_by(QUAD) {
            let [y, u, d, z, g] = Quad::<V>::load_each([y, u, d, z, g], c);
            let (g_pre, g_z) = gate_backward::<_, FMA>(y + d * u, z, g);
            g_pre.store(&mut gy[c..]);
            (g_pre * d).store(&mut gu[c..]);
            (Quad::<V>::load(&gd[c..]) + g_pre * u).store(&mut gd[c..]);
            g_z.store(&mut gz[c..]);
        }
        for c in full..w {
            let (g_pre, g_z) = gate_backward::<_, FMA>(y[c] + d[c] * u[c], z[c], g[c]);
            gy[c] = g_pre;
            gu[c] = g_pre * d[c];
            gd[c] += g_pre * u[c];
            gz[c] = g_z;
        }
    }
    gd
}

impl SkipGateBackend for Flex {
    fn skip_gate(y: FlexTensor, u: FlexTensor, d: FlexTensor, z: FlexTensor) -> FlexTensor {
        let (shape, dtype) = (y.shape(), y.dtype());
        let tensors = [y, u, d, z];
        let x = Inputs::read(&tensors);
        let w = x.width();
        let len = shape.num_elements();
        let mut out = Vec::with_capacity(len);
        if w > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(ROWS * w)
                .enumerate()
                .for_each(|(p, out)| forward_rows(&x, p * ROWS, zeroed(out)));
        }
        // SAFETY: the pieces above cover all `len` elements (none when w = 0: len = 0).
        unsafe { out.set_len(len) };
        FORWARD_CALLS.record();
        flex_from_f32(out, shape, dtype)
    }

    fn skip_gate_backward(
        y: FlexTensor,
        u: FlexTensor,
        d: FlexTensor,
        mut z: FlexTensor,
        mut grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let (shape, u_shape, d_shape, dtype) = (y.shape(), u.shape(), d.shape(), y.dtype());
        if d.shape().num_elements() == 0
            && let Some(y_values) = y.as_slice::<f32>()
            && let (Some(zs), Some(gs)) = (unshared_f32(&mut z), unshared_f32(&mut grad))
            && zs.len() == y_values.len()
            && gs.len() == y_values.len()
        {
            zs.par_chunks_mut(PIECE)
                .zip(gs.par_chunks_mut(PIECE))
                .zip(y_values.par_chunks(PIECE))
                .for_each(|((z, g), y)| backward_in_place(y, z, g));
            IN_PLACE_CALLS.record();
            let empty = |shape| flex_from_f32(Vec::new(), shape, dtype);
            return (grad, empty(u_shape), empty(d_shape), z);
        }
        let tensors = [y, u, d, z];
        let x = Inputs::read(&tensors);
        let grad = flex_f32(&grad);
        let (w, len) = (x.width(), shape.num_elements());
        // u's gradient only with the skip.
        let gu_len = if x.skip() { len } else { 0 };
        let [mut gy, mut gz] = [(); 2].map(|_| Vec::with_capacity(len));
        let mut gu = Vec::with_capacity(gu_len);
        let mut gd = vec![0f32; x.d.len()];
        if w > 0 {
            let piece = ROWS * w;
            // u's gradient in the same pieces, or (without the skip) empty ones.
            let gu_pieces: Vec<&mut [std::mem::MaybeUninit<f32>]> = if x.skip() {
                gu.spare_capacity_mut()[..len].chunks_mut(piece).collect()
            } else {
                (0..len.div_ceil(piece))
                    .map(|_| Default::default())
                    .collect()
            };
            let parts: Vec<Vec<f32>> = gy.spare_capacity_mut()[..len]
                .par_chunks_mut(piece)
                .zip(gu_pieces)
                .zip(gz.spare_capacity_mut()[..len].par_chunks_mut(piece))
                .enumerate()
                .map(|(p, ((gy, gu), gz))| {
                    let outputs = (zeroed(gy), zeroed(gu), zeroed(gz));
                    backward_rows(&x, &grad, p * ROWS, outputs)
                })
                .collect();
            // Summed in piece order, not as rayon's reduce would (its order follows the work
            // stealing), so every run gives the same bits.
            for part in parts {
                gd.iter_mut().zip(part).for_each(|(acc, v)| *acc += v);
            }
        }
        // SAFETY: the pieces above cover all `len` elements of each (none when w = 0), and
        // all `gu_len` of u's.
        unsafe {
            gy.set_len(len);
            gu.set_len(gu_len);
            gz.set_len(len);
        }
        (
            flex_from_f32(gy, shape.clone(), dtype),
            flex_from_f32(gu, u_shape, dtype),
            flex_from_f32(gd, d_shape, dtype),
            flex_from_f32(gz, shape, dtype),
        )
    }
}

#[derive(Debug)]
struct SkipGateBackward;

impl<B: Backend + SkipGateBackend> Backward<B, 4> for SkipGateBackward {
    /// y, u, D, z: the backward recomputes silu(z) from them.
    type State = [FloatTensor<B>; 4];

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [y, u, d, z] = ops.state;
        let (gy, gu, gd, gz) = B::skip_gate_backward(y, u, d, z, grad);
        register_gradients::<B, _>(
            grads,
            ops.parents.map(|p| p.map(|n| n.id)),
            [gy, gu, gd, gz],
        );
    }
}

impl<B: Backend + SkipGateBackend, C: CheckpointStrategy> SkipGateBackend for Autodiff<B, C> {
    fn skip_gate(
        y: FloatTensor<Self>,
        u: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [y.node(), u.node(), d.node(), z.node()];
        let inputs = [y, u, d, z].map(|t| t.into_primitive());
        let [y, u, d, z] = inputs.clone();
        let out = B::skip_gate(y, u, d, z);
        match SkipGateBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(inputs, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn skip_gate_backward(
        _y: FloatTensor<Self>,
        _u: FloatTensor<Self>,
        _d: FloatTensor<Self>,
        _z: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unreachable!(
            "the gate's backward runs on the inner backend; it is not differentiated again"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::tensor::Distribution;

    /// Every test's shape: more rows than one task's, channels in a [`QUAD`] and past it.
    const SHAPE: [usize; 3] = [2, ROWS + 13, QUAD + 24];

    /// A tracked input of [`SHAPE`], N(0, 1.5²).
    fn leaf(device: &Device) -> Tensor<3> {
        Tensor::<3>::random(SHAPE, Distribution::Normal(0.0, 1.5), device).require_grad()
    }

    /// The fused gate equals the tensor ops, output and the gradients of y, u, D and z,
    /// over more rows than one task's, channels in a [`QUAD`] and past it.
    #[test]
    fn fused_gate_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(17);
        let (y, u, z) = (leaf(&device), leaf(&device), leaf(&device));
        let d =
            Tensor::<1>::random([SHAPE[2]], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let probe = Tensor::<3>::random(SHAPE, Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let (y, u, d, z) = (y.clone(), u.clone(), d.clone(), z.clone());
            let out = if fused {
                skip_gate(y.clone(), u.clone(), d.clone(), z.clone())
            } else {
                skip_gate_reference(y.clone(), u.clone(), d.clone(), z.clone())
            };
            let g = (out.clone() * probe.clone()).sum().backward();
            let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
            let grad_d = d
                .grad(&g)
                .unwrap()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            let grads = [y.grad(&g), u.grad(&g), z.grad(&g)].map(|t| v(t.unwrap()));
            (v(out), grads, grad_d)
        };
        let calls = FORWARD_CALLS.get();
        let (ours, reference) = (run(true), run(false));
        assert!(FORWARD_CALLS.get() > calls, "the extension ran");
        let err = max_relative_difference(&ours.0, &reference.0);
        assert!(err < 1e-5, "output: max difference {err}");
        for (part, (a, r)) in ["dy", "du", "dz"]
            .iter()
            .zip(ours.1.iter().zip(&reference.1))
        {
            let err = max_relative_difference(a, r);
            assert!(err < 1e-5, "{part}: max difference {err}");
        }
        let err = max_relative_difference(&ours.2, &reference.2);
        assert!(err < 1e-4, "dD: max difference {err}");
    }

    /// Without the skip, the fused gate equals `y ⊙ silu(z)`, output and the gradients of
    /// y and z: with y and z leaves (their buffers shared with the caller's tensors: new
    /// buffers for the gradients) and fresh intermediates (the backward in place).
    #[test]
    fn fused_gate_without_skip_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(19);
        let (y, z) = (leaf(&device), leaf(&device));
        let probe = Tensor::<3>::random(SHAPE, Distribution::Normal(0.0, 1.0), &device);
        for fresh in [false, true] {
            let run = |fused: bool| {
                let (y_in, z_in) = match fresh {
                    true => (y.clone().mul_scalar(1.0), z.clone().mul_scalar(1.0)),
                    false => (y.clone(), z.clone()),
                };
                let out = if fused {
                    gate(y_in, z_in)
                } else {
                    y_in * silu(z_in)
                };
                let g = (out.clone() * probe.clone()).sum().backward();
                let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
                (v(out), [y.grad(&g), z.grad(&g)].map(|t| v(t.unwrap())))
            };
            let (calls, in_place) = (FORWARD_CALLS.get(), IN_PLACE_CALLS.get());
            let (ours, reference) = (run(true), run(false));
            assert!(FORWARD_CALLS.get() > calls, "the extension ran");
            // (Other tests run gates too, so only "it ran" can be checked, not "it did not".)
            if fresh {
                assert!(IN_PLACE_CALLS.get() > in_place, "the backward ran in place");
            }
            let err = max_relative_difference(&ours.0, &reference.0);
            assert!(err < 1e-5, "output: max difference {err}");
            for (part, (a, r)) in ["dy", "dz"].iter().zip(ours.1.iter().zip(&reference.1)) {
                let err = max_relative_difference(a, r);
                assert!(err < 1e-5, "{part} (fresh: {fresh}): max difference {err}");
            }
        }
    }
}

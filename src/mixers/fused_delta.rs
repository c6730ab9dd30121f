//! Mamba's step sizes Δ = softplus(dt · W + b), dt_proj and its softplus, fused as a Burn
//! backend extension on flex. dt is x_proj's first `dt_rank` outputs, few columns
//! (⌈d_model / 16⌉, 8 at the default size), so `dt · W` is mostly its output's writes: gemm
//! ran a default layer's 768 × 8 × 256 product at a quarter of its rate on wide ones
//! (60 µs, and splitting it across threads did not help), then the bias and the softplus
//! were a pass each, and their backwards three more passes and two products. Here one pass
//! over rows forms each row's `dt_rank`-term sums, adds the bias and applies the softplus;
//! the backward recomputes them and, in one more pass, writes dt's gradient and sums W's
//! and b's. mamba_ssm folds the bias and softplus into its scan (`delta_bias`,
//! `delta_softplus`) and leaves the product to cuBLAS.
//!
//! The reference is [`delta_reference`]; a test holds the two equal, gradients included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::activations::softplus;
use crate::device::{RunCount, flex_f32, flex_from_f32, is_flex, register_gradients, zeroed};
use crate::f32x16::{F32x16, QUAD, Quad, quad_part, with_const, with_f32x16};
use crate::mixed_precision::{linear, working_dtype};
use crate::vector_math::{Real, has_fma, mul_add, sigmoid_and_exp_in, softplus_in};

#[backend_extension(Flex, Autodiff)]
pub trait DeltaBackend: Backend {
    /// dt `[rows, r]`, W `[r, d]`, b `[d]` → Δ `[rows, d]`.
    fn delta(
        dt: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradients of dt, W and b given Δ's (`grad` `[rows, d]`).
    fn delta_backward(
        dt: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Fused Δs run in this process (for a test that the extension took this path).
pub static FORWARD_CALLS: RunCount = RunCount::new();

/// Δ = softplus(dt_proj(dt)) for dt `[b, t, dt_rank]`: the extension for f32 on flex when
/// dt_proj has its bias (Mamba's always does), [`delta_reference`] otherwise (and under
/// autocast, whose projection rounds its operands).
pub fn delta(dt_proj: &Linear, dt: Tensor<3>) -> Tensor<3> {
    let fused = is_flex(&dt.device())
        && working_dtype().is_none()
        && dt.dtype() == DType::F32
        && dt.dims()[2] > 0;
    let Some(bias) = dt_proj.bias.as_ref().filter(|_| fused) else {
        return delta_reference(dt_proj, dt);
    };
    let [bsz, t, r] = dt.dims();
    let d = dt_proj.weight.dims()[1];
    let out = <burn::backend::Dispatch as DeltaBackend>::delta(
        dt.reshape([bsz * t, r]).into_dispatch(),
        dt_proj.weight.val().into_dispatch(),
        bias.val().into_dispatch(),
    );
    Tensor::<2>::from_dispatch(out).reshape([bsz, t, d])
}

/// The reference: the projection, then the softplus.
pub fn delta_reference(dt_proj: &Linear, dt: Tensor<3>) -> Tensor<3> {
    softplus(linear(dt_proj, dt))
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// `b + dt_row · W` at columns `c0 .. c0 + QUAD`, the sums in registers.
#[inline(always)]
fn pre_activation_quad<V: F32x16, const FMA: bool>(
    dt_row: &[f32],
    (w, b): (&[f32], &[f32]),
    c0: usize,
) -> Quad<V> {
    let mut pre = Quad::<V>::load(&b[c0..]);
    for (&x, w_row) in dt_row.iter().zip(w.chunks_exact(b.len())) {
        pre = Quad::splat(x).mul_add::<FMA>(Quad::load(&w_row[c0..]), pre);
    }
    pre
}

/// `b + dt_row · W` at columns `from ..` into `pre` (`[d − from]`), a pass over the row
/// per input: [`pre_activation_quad`]'s arithmetic for the columns past its last one.
#[inline(always)]
fn pre_activation_rest<const FMA: bool>(
    dt_row: &[f32],
    (w, b): (&[f32], &[f32]),
    from: usize,
    pre: &mut [f32],
) {
    let d = b.len();
    pre.copy_from_slice(&b[from..]);
    for (&x, w_row) in dt_row.iter().zip(w.chunks_exact(d)) {
        for (p, &w) in pre.iter_mut().zip(&w_row[from..]) {
            *p = mul_add::<FMA>(x, w, *p);
        }
    }
}

/// Δ for a task's rows: `dt` `[rows, r]` → `out` `[rows, d]`, in [`Quad`]s
/// where the lanes take them (`quad_part`; the rest one by one, the same arithmetic): four
/// vectors' softplus side by side.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn forward_rows(dt: &[f32], (w, b): (&[f32], &[f32]), out: &mut [f32]) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => forward_rows_in::<V, FMA>(dt, (w, b), out))
}

/// [`forward_rows`] on lanes `V`.
#[inline(always)]
fn forward_rows_in<V: F32x16, const FMA: bool>(
    dt: &[f32],
    (w, b): (&[f32], &[f32]),
    out: &mut [f32],
) {
    let (d, r) = (b.len(), w.len() / b.len());
    let full = quad_part::<V>(d);
    for (dt_row, out) in dt.chunks_exact(r).zip(out.chunks_exact_mut(d)) {
        for c0 in (0..full).step_by(QUAD) {
            let pre = pre_activation_quad::<V, FMA>(dt_row, (w, b), c0);
            softplus_in::<Quad<V>, FMA>(pre).store(&mut out[c0..]);
        }
        let rest = &mut out[full..];
        pre_activation_rest::<FMA>(dt_row, (w, b), full, rest);
        for v in rest {
            *v = softplus_in::<f32, FMA>(*v);
        }
    }
}

/// Rows whose pre-activation gradients the backward holds at once (`[BLOCK][d]`, in L1)
/// for the two products that take W's and dt's gradients from them.
const BLOCK: usize = 16;

/// Accumulators per group: dt_rank's columns whose sums one pass keeps in registers (8 of
/// AVX-512's 32; [`crate::f32x16::Portable`] lanes are two AVX2 registers each, of 16).
fn group<V: F32x16>() -> usize {
    if V::QUADS { 8 } else { 4 }
}

/// A `[G][16]` panel: 16 columns of a group of `G` rows.
type Panel<const G: usize> = [[f32; 16]; G];

/// `[r, d]` values (W) as panels, `[⌈r/G⌉][⌈d/16⌉]` of them, zeros past `r` and `d`: the
/// order in which the backward's products read them, with no index to check per vector.
fn to_panels<const G: usize>(values: &[f32], d: usize) -> Vec<Panel<G>> {
    let (groups, vectors) = ((values.len() / d).div_ceil(G), d.div_ceil(16));
    let mut panels = vec![[[0f32; 16]; G]; groups * vectors];
    for (row, values) in values.chunks_exact(d).enumerate() {
        let panels = &mut panels[row / G * vectors..][..vectors];
        for (panel, values) in panels.iter_mut().zip(values.chunks(16)) {
            panel[row % G][..values.len()].copy_from_slice(values);
        }
    }
    panels
}

/// [`to_panels`] undone: the panels' values added into `out` `[r, d]`.
fn add_panels<const G: usize>(panels: &[Panel<G>], d: usize, out: &mut [f32]) {
    let vectors = d.div_ceil(16);
    for (row, out) in out.chunks_exact_mut(d).enumerate() {
        let panels = &panels[row / G * vectors..][..vectors];
        for (panel, out) in panels.iter().zip(out.chunks_mut(16)) {
            out.iter_mut()
                .zip(&panel[row % G])
                .for_each(|(o, v)| *o += v);
        }
    }
}

/// The backward over a task's rows: dt's gradient written to `g_dt` `[rows, r]`, the rows'
/// shares of W's and b's gradients added to `g_w` `[r, d]` and `g_b` `[d]`. A block of rows
/// at a time: the pre-activations' gradients `g` (softplus' = sigmoid, of the recomputed
/// pre-activations); then `g_w += dtᵀ·g` and `g_b += Σ g` a column vector at a time, a
/// group of W's rows in registers summed down the block; then `g_dt = g·Wᵀ` a row at a
/// time, a group of dot products side by side, whose lanes [`F32x16::sum_rows`] adds 16 at
/// once. (A dot product and a W-row update per row and input, one after another, ran at
/// the latency of each dot's single chain.)
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn backward_rows(
    (dt, grad): (&[f32], &[f32]),
    (w, b): (&[f32], &[f32]),
    g_dt: &mut [f32],
    (g_w, g_b): (&mut [f32], &mut [f32]),
) {
    const FMA: bool = has_fma!();
    with_f32x16!(V => with_const!(group::<V>(), G in [4, 8] =>
        backward_rows_in::<V, G, FMA>((dt, grad), (w, b), g_dt, (g_w, g_b))))
}

/// [`backward_rows`] on lanes `V`, `G` accumulators per group.
#[inline(always)]
fn backward_rows_in<V: F32x16, const G: usize, const FMA: bool>(
    (dt, grad): (&[f32], &[f32]),
    (w, b): (&[f32], &[f32]),
    g_dt: &mut [f32],
    (g_w, g_b): (&mut [f32], &mut [f32]),
) {
    let (d, r) = (b.len(), w.len() / b.len());
    let (groups, vectors) = (r.div_ceil(G), d.div_ceil(16));
    let full = quad_part::<V>(d);
    // Per task, as G is the clone's (W is 8 KB at the default size: about a microsecond,
    // against the task's ten).
    let w_panels = to_panels::<G>(w, d);
    let mut g_w_panels = vec![[[0f32; 16]; G]; groups * vectors];
    let mut g_b_lanes = vec![[0f32; 16]; vectors];
    // The block's rows of g (zeros past d), of dt in groups (zeros past r), and of dt's
    // gradient as wide (slot i·groups·G + k: row i's dot product with W's row k).
    let mut g = vec![[0f32; 16]; BLOCK * vectors];
    let mut dt_groups = vec![[0f32; G]; BLOCK * groups];
    let mut sums = vec![0f32; BLOCK * groups * G];
    let blocks = dt.chunks(BLOCK * r).zip(grad.chunks(BLOCK * d));
    for ((dt, grad), g_dt) in blocks.zip(g_dt.chunks_mut(BLOCK * r)) {
        let rows = grad.len() / d;
        let rows_of_g = g
            .chunks_exact_mut(vectors)
            .zip(dt_groups.chunks_exact_mut(groups));
        let inputs = dt.chunks_exact(r).zip(grad.chunks_exact(d));
        for ((dt_row, grad), (g, x)) in inputs.zip(rows_of_g) {
            x.as_flattened_mut()[..r].copy_from_slice(dt_row);
            let g = &mut g.as_flattened_mut()[..d];
            for c0 in (0..full).step_by(QUAD) {
                let pre = pre_activation_quad::<V, FMA>(dt_row, (w, b), c0);
                let sig = sigmoid_and_exp_in::<Quad<V>, FMA>(pre).0;
                (Quad::<V>::load(&grad[c0..]) * sig).store(&mut g[c0..]);
            }
            let rest = &mut g[full..];
            pre_activation_rest::<FMA>(dt_row, (w, b), full, rest);
            for (p, &gr) in rest.iter_mut().zip(&grad[full..]) {
                *p = gr * sigmoid_and_exp_in::<f32, FMA>(*p).0;
            }
        }
        let (g, x) = (&g[..rows * vectors], &dt_groups[..rows * groups]);
        for (c, g_b) in g_b_lanes.iter_mut().enumerate() {
            // Loops, not `fold(.., V::add)`: the function passed would be a call per vector.
            let column = || g.iter().skip(c).step_by(vectors);
            let mut bias = V::load(g_b);
            for gv in column() {
                bias = bias.add(V::load(gv));
            }
            bias.store(g_b);
            for k in 0..groups {
                let panel = &mut g_w_panels[k * vectors + c];
                let mut acc = [V::zero(); G];
                for (a, p) in acc.iter_mut().zip(panel.iter()) {
                    *a = V::load(p);
                }
                for (gv, xs) in column().zip(x.iter().skip(k).step_by(groups)) {
                    let gv = V::load(gv);
                    for (a, &xv) in acc.iter_mut().zip(xs) {
                        *a = V::splat(xv).mul_add(gv, *a);
                    }
                }
                for (a, p) in acc.iter().zip(panel.iter_mut()) {
                    a.store(p);
                }
            }
        }
        let mut lanes = [[0f32; 16]; 16];
        let mut slot = 0;
        for g_row in g.chunks_exact(vectors) {
            for panels in w_panels.chunks_exact(vectors) {
                let mut acc = [V::zero(); G];
                for (gv, panel) in g_row.iter().zip(panels) {
                    let gv = V::load(gv);
                    for (a, wv) in acc.iter_mut().zip(panel) {
                        *a = gv.mul_add(V::load(wv), *a);
                    }
                }
                for a in acc {
                    a.store(&mut lanes[slot % 16]);
                    slot += 1;
                    if slot % 16 == 0 {
                        V::sum_rows(&lanes).store_partial(&mut sums[slot - 16..slot]);
                    }
                }
            }
        }
        if slot % 16 != 0 {
            V::sum_rows(&lanes).store_partial(&mut sums[slot / 16 * 16..slot]);
        }
        for (out, s) in g_dt.chunks_exact_mut(r).zip(sums.chunks_exact(groups * G)) {
            out.copy_from_slice(&s[..r]);
        }
    }
    add_panels(&g_w_panels, d, g_w);
    let g_b_values = g_b_lanes.as_flattened();
    g_b.iter_mut()
        .zip(g_b_values)
        .for_each(|(acc, v)| *acc += v);
}

impl DeltaBackend for Flex {
    fn delta(dt: FlexTensor, w: FlexTensor, b: FlexTensor) -> FlexTensor {
        let (shape, dtype) = (dt.shape(), dt.dtype());
        let (rows, r) = (shape[0], shape[1]);
        assert!(r > 0, "Δ's projection has inputs");
        let (dt, w, b) = (flex_f32(&dt), flex_f32(&w), flex_f32(&b));
        let d = b.len();
        let len = rows * d;
        let mut out = Vec::with_capacity(len);
        if len > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(ROWS * d)
                .zip(dt.par_chunks(ROWS * r))
                .for_each(|(out, dt)| forward_rows(dt, (&w, &b), zeroed(out)));
        }
        // SAFETY: the pieces above cover all `len` elements.
        unsafe { out.set_len(len) };
        FORWARD_CALLS.record();
        flex_from_f32(out, [rows, d], dtype)
    }

    fn delta_backward(
        dt: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (dt_shape, w_shape, b_shape, dtype) = (dt.shape(), w.shape(), b.shape(), dt.dtype());
        let r = dt_shape[1];
        let (dt, w, b, grad) = (flex_f32(&dt), flex_f32(&w), flex_f32(&b), flex_f32(&grad));
        let d = b.len();
        let mut g_dt = vec![0f32; dt.len()];
        let (mut g_w, mut g_b) = (vec![0f32; r * d], vec![0f32; d]);
        if d > 0 && r > 0 && !dt.is_empty() {
            // Each task's shares of W's and b's gradients, added in task order (not as
            // rayon's reduce would, which follows the work stealing): the same bits each run.
            let parts: Vec<(Vec<f32>, Vec<f32>)> = g_dt
                .par_chunks_mut(ROWS * r)
                .zip(dt.par_chunks(ROWS * r).zip(grad.par_chunks(ROWS * d)))
                .map(|(g_dt, (dt, grad))| {
                    let (mut g_w, mut g_b) = (vec![0f32; r * d], vec![0f32; d]);
                    backward_rows((dt, grad), (&w, &b), g_dt, (&mut g_w, &mut g_b));
                    (g_w, g_b)
                })
                .collect();
            for (pw, pb) in parts {
                g_w.iter_mut().zip(pw).for_each(|(acc, v)| *acc += v);
                g_b.iter_mut().zip(pb).for_each(|(acc, v)| *acc += v);
            }
        }
        (
            flex_from_f32(g_dt, dt_shape, dtype),
            flex_from_f32(g_w, w_shape, dtype),
            flex_from_f32(g_b, b_shape, dtype),
        )
    }
}

#[derive(Debug)]
struct DeltaBackward;

impl<B: Backend + DeltaBackend> Backward<B, 3> for DeltaBackward {
    /// dt, W, b: the backward recomputes the pre-activation from them.
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dt, w, b] = ops.state;
        let (g_dt, g_w, g_b) = B::delta_backward(dt, w, b, grad);
        register_gradients::<B, _>(
            grads,
            ops.parents.map(|p| p.map(|n| n.id)),
            [g_dt, g_w, g_b],
        );
    }
}

impl<B: Backend + DeltaBackend, C: CheckpointStrategy> DeltaBackend for Autodiff<B, C> {
    fn delta(
        dt: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [dt.node(), w.node(), b.node()];
        let inputs = [dt, w, b].map(|t| t.into_primitive());
        let [dt, w, b] = inputs.clone();
        let out = B::delta(dt, w, b);
        match DeltaBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(inputs, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn delta_backward(
        _dt: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _b: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("Δ's backward runs on the inner backend; it is not differentiated again")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_relative_difference;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// The backward's blocked products, on portable lanes with groups of 4 and of 8 (the
    /// AVX2 and AVX-512 sizes; a CPU runs one of them), equal plain loops over rows, where
    /// rows, dt_rank and d are no multiples of the block, the group or 16 (padding).
    #[test]
    fn blocked_backward_equals_plain_loops() {
        use crate::f32x16::Portable;
        let (rows, r, d) = (BLOCK + 5, 11, 2 * 16 + 7);
        let value = |i: usize, scale: f32| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * scale;
        let dt: Vec<f32> = (0..rows * r).map(|i| value(i, 1.0)).collect();
        let grad: Vec<f32> = (0..rows * d).map(|i| value(i + 3, 1.0)).collect();
        let w: Vec<f32> = (0..r * d).map(|i| value(i + 7, 0.5)).collect();
        let b: Vec<f32> = (0..d).map(|i| value(i + 11, 2.0)).collect();
        let (mut want_dt, mut want_w, mut want_b) =
            (vec![0f64; rows * r], vec![0f64; r * d], vec![0f64; d]);
        for i in 0..rows {
            for c in 0..d {
                let pre = b[c] as f64
                    + (0..r)
                        .map(|k| (dt[i * r + k] * w[k * d + c]) as f64)
                        .sum::<f64>();
                let g = grad[i * d + c] as f64 / (1.0 + (-pre).exp());
                want_b[c] += g;
                for k in 0..r {
                    want_dt[i * r + k] += g * w[k * d + c] as f64;
                    want_w[k * d + c] += g * dt[i * r + k] as f64;
                }
            }
        }
        let close = |ours: &[f32], want: &[f64], what: &str| {
            for (j, (o, w)) in ours.iter().zip(want).enumerate() {
                assert!(
                    (*o as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                    "{what}[{j}]: {o} against {w}"
                );
            }
        };
        type Kernel = fn((&[f32], &[f32]), (&[f32], &[f32]), &mut [f32], (&mut [f32], &mut [f32]));
        let kernels: [(&str, Kernel); 2] = [
            ("groups of 4", backward_rows_in::<Portable<true>, 4, true>),
            ("groups of 8", backward_rows_in::<Portable<false>, 8, false>),
        ];
        for (form, kernel) in kernels {
            let (mut g_dt, mut g_w, mut g_b) =
                (vec![0f32; rows * r], vec![0f32; r * d], vec![0f32; d]);
            kernel((&dt, &grad), (&w, &b), &mut g_dt, (&mut g_w, &mut g_b));
            close(&g_dt, &want_dt, &format!("{form}: d dt"));
            close(&g_w, &want_w, &format!("{form}: dW"));
            close(&g_b, &want_b, &format!("{form}: db"));
        }
    }

    /// The fused Δ equals the projection and softplus, output and the gradients of dt, W
    /// and b, over more rows than one task's, pre-activations of both signs, and columns
    /// both in a [`QUAD`] and past the last one.
    #[test]
    fn fused_delta_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(23);
        let (b, t, r, d) = (3, ROWS / 2 + 9, 5, QUAD + 37);
        let dt_proj = LinearConfig::new(r, d).init(&device);
        let dt =
            Tensor::<3>::random([b, t, r], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let probe = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let out = if fused {
                delta(&dt_proj, dt.clone())
            } else {
                delta_reference(&dt_proj, dt.clone())
            };
            let g = (out.clone() * probe.clone()).sum().backward();
            let v = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap();
            let w = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
            let bias = dt_proj.bias.as_ref().unwrap().grad(&g).unwrap();
            [
                v(out),
                v(dt.grad(&g).unwrap()),
                w(dt_proj.weight.grad(&g).unwrap()),
                bias.into_data().try_into_vec::<f32>().unwrap(),
            ]
        };
        let calls = FORWARD_CALLS.get();
        let (ours, reference) = (run(true), run(false));
        assert!(FORWARD_CALLS.get() > calls, "the extension ran");
        for (part, (a, r)) in ["output", "d dt", "dW", "db"]
            .iter()
            .zip(ours.iter().zip(&reference))
        {
            let err = max_relative_difference(a, r);
            assert!(err < 1e-5, "{part}: max difference {err}");
        }
    }
}

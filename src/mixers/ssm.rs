//! A Mamba (S6) block (Gu & Dao 2023) as a token mixer: in_proj to (x, z), causal
//! depthwise conv1d + SiLU, x_proj to (Δ, B, C), dt_proj + softplus, `A = −exp(A_log)`
//! (S4D-real init), the selective scan `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t`,
//! `y_t = C_t h_t + D x_t`, gated by SiLU(z), out_proj. Parameter names follow mamba_ssm.
//!
//! The scan has a sequential form (a loop over time) and a chunked form: inside a chunk every
//! state is a decay-weighted sum of the chunk's inputs (computed in parallel from differences
//! of cumulative log-decays, which keeps it stable), and only the state at chunk ends is
//! carried from chunk to chunk. Tests hold them equal. On the CPU backend the sequential
//! form is the faster one (the chunked form does `chunk`× more exp/multiply work to save
//! steps, which pays only where steps are expensive, e.g. a GPU's kernel launches), so it
//! is the default; `[model.ssm] scan = "chunked"` selects the other.
//!
//! The bidirectional form (`model.causal = false`) is Caduceus's BiMamba (Schiff et al.
//! 2024, "Caduceus: Bi-Directional Equivariant Long-Range DNA Sequence Modeling", §3.1;
//! Vision Mamba, Zhu et al. 2024, is the same without the tie): in_proj, the gate and
//! out_proj are shared; the reversed sequence gets its own conv, x_proj, dt_proj, A and D
//! (`reverse.*`), and the two directions' outputs are added before the gate.

#![allow(non_snake_case)] // A_log, D: mamba_ssm's names, kept for checkpoint compatibility

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use crate::activations::silu;

use super::causal_conv1d::{CausalConv1d, ConvScanState, time_steps};
use serde::{Deserialize, Serialize};

use super::decayed_scan::decayed_scan;
use super::fused_delta;
use super::fused_gate::{gate, skip_gate};
use super::selective_scan;
use super::{MixerContext, MixerOptions, ShardedForm, TokenMixer, normal_linear};
use crate::mixed_precision::{linear, linear_split, linear_split_and_input};
use crate::options::{OptionError, at_least_one, fail, positive};
use crate::padding::Padding;
use crate::parallel::SequenceParallel;
use crate::parallel::state_passing::pass_state;

#[derive(Module, Debug)]
pub struct Ssm {
    pub in_proj: Linear,
    pub conv1d: CausalConv1d,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    /// ln of −A, `[d_inner, d_state]`.
    pub A_log: Param<Tensor<2>>,
    /// The skip connection `D x`, `[d_inner]`.
    pub D: Param<Tensor<1>>,
    pub out_proj: Linear,
    /// The reversed sequence's scan, in the bidirectional form only.
    pub reverse: Option<SsmReverse>,
    d_inner: usize,
    d_state: usize,
    dt_rank: usize,
    #[module(skip)]
    scan: ScanForm,
    chunk_size: usize,
}

/// The parameters of the scan over the reversed sequence (BiMamba's second direction).
#[derive(Module, Debug)]
pub struct SsmReverse {
    pub conv1d: CausalConv1d,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    pub A_log: Param<Tensor<2>>,
    pub D: Param<Tensor<1>>,
}

/// One direction's parameters, borrowed from the layer or from its [`SsmReverse`].
struct Direction<'a> {
    conv1d: &'a CausalConv1d,
    x_proj: &'a Linear,
    dt_proj: &'a Linear,
    A_log: &'a Param<Tensor<2>>,
    D: &'a Param<Tensor<1>>,
}

/// The scan's inputs: u, Δ `[b, t, d_inner]`; B, C `[b, t, d_state]`; A `[d_inner, d_state]`,
/// or `[d_inner, 1]`, one per channel shared by its state rows (Mamba-2's, per head).
pub struct ScanInputs {
    pub u: Tensor<3>,
    pub delta: Tensor<3>,
    pub a: Tensor<2>,
    pub b: Tensor<3>,
    pub c: Tensor<3>,
}

impl Ssm {
    fn forward_direction(&self) -> Direction<'_> {
        Direction {
            conv1d: &self.conv1d,
            x_proj: &self.x_proj,
            dt_proj: &self.dt_proj,
            A_log: &self.A_log,
            D: &self.D,
        }
    }

    /// Everything before the scan: projections, conv, Δ, A, B, C; and the gate z.
    pub fn scan_inputs(&self, x: Tensor<3>) -> (ScanInputs, Tensor<3>) {
        let (u, z) = self.split_in_proj(x);
        let (inputs, _) = self.direction_inputs(&self.forward_direction(), u, None, None);
        (inputs, z)
    }

    /// in_proj of x as its two pieces: the conv's input u and the gate z `[b, t, d_inner]`.
    fn split_in_proj(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let di = self.d_inner;
        let [u, z] = linear_split(&self.in_proj, x, [di, di]);
        (u, z)
    }

    /// One direction's scan inputs from the conv's input `u` `[b, t, d_inner]` that follows
    /// the conv inputs `history` `[b, d_conv − 1, d_inner]`; also the last `d_conv − 1`
    /// conv inputs, the next chunk's history. Padded positions get Δ = 0: the state passes
    /// them unchanged and takes nothing from them.
    fn direction_inputs(
        &self,
        dir: &Direction,
        u: Tensor<3>,
        history: Option<Tensor<3>>,
        padding: Option<&Padding>,
    ) -> (ScanInputs, Tensor<3>) {
        let [bsz, t, di] = u.dims();
        let (n, r) = (self.d_state, self.dt_rank);
        let kernel = dir.conv1d.weight.dims()[2];
        // The last kernel − 1 conv inputs, from u alone unless it is shorter than that (a
        // concatenation of the whole of u was a copy per layer, mostly thrown away).
        let next_history = if t >= kernel - 1 {
            u.clone().narrow(1, t - (kernel - 1), kernel - 1)
        } else {
            let history = history
                .clone()
                .unwrap_or_else(|| Tensor::zeros([bsz, kernel - 1, di], &u.device()));
            Tensor::cat(vec![history, u.clone()], 1).narrow(1, t, kernel - 1)
        };
        let u = dir.conv1d.forward_silu(u, history);
        // dt, B and C as a split product: each contiguous for the kernel that reads it, and
        // no gradient of a slice (a zero-filled tensor of the whole, summed) behind them.
        // u comes back out of it for the scan, so that its two gradients are summed inside
        // the product's backward.
        let ([dt, b, c], u) = linear_split_and_input(dir.x_proj, u, [r, n, n]);
        let mut delta = fused_delta::delta(dir.dt_proj, dt);
        if let Some(p) = padding {
            delta = delta * p.column();
        }
        let a = dir.A_log.val().exp().neg();
        (ScanInputs { u, delta, a, b, c }, next_history)
    }

    /// One direction from conv input `u` (history and scan state as in
    /// [`Self::forward_from`]): the scan's output, its input (the conv's output), for `scan
    /// + D u` in the gate, and, where `keep_state` asks for them (decoding, state passing),
    /// the conv history and scan state after; without them the fused scan tracks y alone.
    /// Where [`Self::skip_in_scan`], the scan's output holds the skip `D u` already.
    fn direction_output(
        &self,
        dir: &Direction,
        u: Tensor<3>,
        (state, keep_state): (Option<SsmState>, bool),
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Tensor<3>, Option<SsmState>) {
        let (history, h) = match state {
            Some(s) => (Some(s.conv), Some(s.h)),
            None => (None, None),
        };
        let (inputs, conv) = self.direction_inputs(dir, u, history, padding);
        let scanned = inputs.u.clone();
        let (y, h) = match self.scan {
            _ if self.skip_in_scan(&scanned.device()) => {
                let skip = Some(dir.D.val());
                match fused_selective_scan(inputs, h, skip, keep_state) {
                    (y, Some(h)) => (y, h),
                    (y, None) => return (y, scanned, None),
                }
            }
            ScanForm::Fused if !keep_state => return (scan_fused(inputs, h), scanned, None),
            ScanForm::Fused => scan_fused_from(inputs, h),
            ScanForm::Chunked => scan_chunked_from(inputs, self.chunk_size, h),
            ScanForm::Sequential => scan_sequential_from(inputs, h),
        };
        (y, scanned, keep_state.then_some(SsmState { conv, h }))
    }

    /// Whether the scan adds the skip `D u` itself: the fused scan on flex, whose kernel
    /// takes D, so the gate reads neither u nor D and u's gradient has one part fewer to sum
    /// (autodiff adds the parts with Burn's add, on one thread). Elsewhere the gate adds it.
    fn skip_in_scan(&self, device: &Device) -> bool {
        matches!(self.scan, ScanForm::Fused) && crate::device::is_flex(device)
    }

    /// The output gate on the (summed) scan output y: `y ⊙ silu(z)` where the scan added
    /// the skip, `(y + D u) ⊙ silu(z)` otherwise.
    fn gate_output(&self, y: Tensor<3>, u: Tensor<3>, z: Tensor<3>) -> Tensor<3> {
        match self.skip_in_scan(&y.device()) {
            true => gate(y, z),
            false => skip_gate(y, u, self.D.val(), z),
        }
    }

    pub fn scan(&self, inputs: ScanInputs) -> Tensor<3> {
        match self.scan {
            ScanForm::Fused => scan_fused(inputs, None),
            ScanForm::Chunked => scan_chunked(inputs, self.chunk_size),
            ScanForm::Sequential => scan_sequential(inputs),
        }
    }
}

/// Decoding state: the last `d_conv − 1` conv inputs `[b, d_conv − 1, d_inner]` and the
/// scan state `h` `[b, d_inner, d_state]`.
pub type SsmState = ConvScanState<3>;

impl TokenMixer for Ssm {
    type Options = SsmOptions;
    type State = SsmState;
    const SHARDED: ShardedForm = ShardedForm::StatePassing;

    fn init(o: &SsmOptions, ctx: &MixerContext, device: &Device) -> Self {
        let d_inner = o.expand * ctx.d_model;
        let dt_rank = o.dt_rank(ctx.d_model);
        let n = o.d_state;

        // Mamba's dt init: weights U(±dt_rank^-½); bias = softplus⁻¹(dt), dt log-uniform in
        // [dt_min, dt_max], so Δ starts in that range.
        let bound = (dt_rank as f64).powf(-0.5);
        let mut dt_proj = normal_linear(dt_rank, d_inner, true, ctx.init_std, device);
        dt_proj.weight = Param::from_tensor(Tensor::random(
            [dt_rank, d_inner],
            Distribution::Uniform(-bound, bound),
            device,
        ));
        let (lo, hi) = (o.dt_min.ln(), o.dt_max.ln());
        let dt = Tensor::<1>::random([d_inner], Distribution::Uniform(lo, hi), device)
            .exp()
            .clamp_min(1e-4);
        let inv_softplus = dt.clone() + dt.neg().exp().neg().add_scalar(1.0).log();
        dt_proj.bias = Some(Param::from_tensor(inv_softplus));

        // S4D-real: A = −(1, 2, …, d_state) for every channel.
        let a = Tensor::<1, Int>::arange(1..n as i64 + 1, device)
            .float()
            .log()
            .reshape([1, n])
            .expand([d_inner, n]);
        let in_proj = normal_linear(ctx.d_model, 2 * d_inner, false, ctx.init_std, device);
        let conv1d = CausalConv1d::new(d_inner, o.d_conv, device);
        let x_proj = normal_linear(d_inner, dt_rank + 2 * n, false, ctx.init_std, device);
        let out_proj = normal_linear(d_inner, ctx.d_model, false, ctx.residual_init_std(), device);
        // The reverse direction starts as the forward one does (fresh draws, same init).
        let reverse = (!ctx.causal).then(|| {
            let forward = Self::init(o, &MixerContext { causal: true, ..ctx.clone() }, device);
            SsmReverse {
                conv1d: forward.conv1d,
                x_proj: forward.x_proj,
                dt_proj: forward.dt_proj,
                A_log: forward.A_log,
                D: forward.D,
            }
        });
        Ssm {
            in_proj,
            conv1d,
            x_proj,
            dt_proj,
            A_log: Param::from_tensor(a),
            D: Param::from_tensor(Tensor::ones([d_inner], device)),
            out_proj,
            reverse,
            d_inner,
            d_state: n,
            dt_rank,
            scan: o.scan,
            chunk_size: o.chunk_size,
        }
    }

    fn step(&self, x: Tensor<3>, state: Option<SsmState>) -> (Tensor<3>, SsmState) {
        let [bsz, _, _] = x.dims();
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let device = x.device();
        let kernel = self.conv1d.weight.dims()[2];
        let state = state.unwrap_or_else(|| SsmState {
            conv: Tensor::zeros([bsz, kernel - 1, di], &device),
            h: Tensor::zeros([bsz, di, n], &device),
        });
        let xz = linear(&self.in_proj, x);
        let z = xz.clone().slice([0..bsz, 0..1, di..2 * di]);
        let window = Tensor::cat(vec![state.conv, xz.slice([0..bsz, 0..1, 0..di])], 1);
        let u = silu(self.conv1d.step(window.clone()));
        let dbc = linear(&self.x_proj, u.clone());
        let dt = dbc.clone().slice([0..bsz, 0..1, 0..r]);
        let b = dbc.clone().slice([0..bsz, 0..1, r..r + n]);
        let c = dbc.slice([0..bsz, 0..1, r + n..r + 2 * n]);
        let delta = fused_delta::delta(&self.dt_proj, dt);
        let a = self.A_log.val().exp().neg().unsqueeze::<3>();
        let (y, h) = scan_step(state.h, delta, u.clone(), a, b, c);
        let y = (y + u * self.D.val().unsqueeze::<3>()) * silu(z);
        let conv = window.slice([0..bsz, 1..kernel, 0..di]);
        (linear(&self.out_proj, y), SsmState { conv, h })
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let (u, z) = self.split_in_proj(x);
        // Zeroed padding cannot reach a real position through the conv either.
        let u = match padding {
            Some(p) => p.zero_padded(u),
            None => u,
        };
        let forward = self.forward_direction();
        let (mut y, scanned, _) =
            self.direction_output(&forward, u.clone(), (None, false), padding);
        if let Some(rev) = &self.reverse {
            let backward = Direction {
                conv1d: &rev.conv1d,
                x_proj: &rev.x_proj,
                dt_proj: &rev.dt_proj,
                A_log: &rev.A_log,
                D: &rev.D,
            };
            let reversed = padding.map(Padding::reversed);
            let (y_rev, u_rev, _) =
                self.direction_output(&backward, u.flip([1]), (None, false), reversed.as_ref());
            // The reverse direction's own skip, D_rev u_rev, joins it here unless its scan
            // added it; the forward's is the gate's, or its scan's.
            let y_rev = match self.skip_in_scan(&y_rev.device()) {
                true => y_rev,
                false => y_rev + u_rev * rev.D.val().unsqueeze::<3>(),
            };
            y = y + y_rev.flip([1]);
        }
        (linear(&self.out_proj, self.gate_output(y, scanned, z)), None)
    }

    /// State passing: the scan state and the conv's last inputs go from rank to rank.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let ys = pass_state(xs, sp, |r, x, state| ranks[r].forward_from(x, state));
        (ys, None)
    }
}

impl Ssm {
    /// `forward` of positions that follow those summarised by `state`, and the state after.
    pub fn forward_from(&self, x: Tensor<3>, state: Option<SsmState>) -> (Tensor<3>, SsmState) {
        let (u, z) = self.split_in_proj(x);
        let forward = self.forward_direction();
        let (y, scanned, state) = self.direction_output(&forward, u, (state, true), None);
        let state = state.expect("kept");
        (linear(&self.out_proj, self.gate_output(y, scanned, z)), state)
    }
}

/// Reference: `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t`, `y_t = C_t · h_t`, step by step.
/// Each step slices only the small per-step inputs (`[b, 1, d_inner]`, `[b, 1, d_state]`),
/// never the `[b, t, d_inner, d_state]` products, whose slices would each back-propagate
/// into a zero tensor of the full size.
pub fn scan_sequential(s: ScanInputs) -> Tensor<3> {
    scan_sequential_from(s, None).0
}

/// [`scan_sequential`] from state `h` `[b, d_inner, d_state]` (`None` = zeros), returning
/// the final state too.
pub fn scan_sequential_from(s: ScanInputs, h: Option<Tensor<3>>) -> (Tensor<3>, Tensor<3>) {
    let [bsz, t, di] = s.u.dims();
    let n = s.b.dims()[2];
    let a = s.a.unsqueeze::<3>(); // [1, di, n]
    let mut h = h.unwrap_or_else(|| Tensor::<3>::zeros([bsz, di, n], &s.u.device()));
    let steps = time_steps(s.delta)
        .into_iter()
        .zip(time_steps(s.u))
        .zip(time_steps(s.b).into_iter().zip(time_steps(s.c)));
    let mut ys = Vec::with_capacity(t);
    for ((delta, u), (b, c)) in steps {
        let (y, next) = scan_step(h, delta, u, a.clone(), b, c);
        h = next;
        ys.push(y);
    }
    (Tensor::cat(ys, 1), h)
}

/// One scan step: Δ, u `[b, 1, d_inner]`; A `[1, d_inner, d_state]`; B, C `[b, 1, d_state]`;
/// h `[b, d_inner, d_state]`. Returns `y = C·h'` `[b, 1, d_inner]` and the new h'.
pub fn scan_step(
    h: Tensor<3>,
    delta: Tensor<3>,
    u: Tensor<3>,
    a: Tensor<3>,
    b: Tensor<3>,
    c: Tensor<3>,
) -> (Tensor<3>, Tensor<3>) {
    let [bsz, _, di] = u.dims();
    let delta = delta.reshape([bsz, di, 1]);
    let u = u.reshape([bsz, di, 1]);
    let h = (delta.clone() * a).exp() * h + (delta * u) * b;
    let y = (h.clone() * c).sum_dim(2).reshape([bsz, 1, di]);
    (y, h)
}

/// [`scan_fused_from`]'s y alone: on flex the fused scan then tracks y by itself.
pub fn scan_fused(s: ScanInputs, h: Option<Tensor<3>>) -> Tensor<3> {
    if !crate::device::is_flex(&s.u.device()) {
        return scan_fused_from(s, h).0;
    }
    fused_selective_scan(s, h, None, false).0
}

/// The fused [`selective_scan`] (flex) from state `h` (`None` = zeros), `y + D u` where
/// `skip` (D) is given: y, and the final state where `keep_state` asks for it (without it
/// the scan tracks y alone).
fn fused_selective_scan(
    s: ScanInputs,
    h: Option<Tensor<3>>,
    skip: Option<Tensor<1>>,
    keep_state: bool,
) -> (Tensor<3>, Option<Tensor<3>>) {
    if !keep_state {
        let y = selective_scan::selective_scan_output(s.delta, s.u, s.a, s.b, s.c, (h, skip));
        return (y, None);
    }
    let (y, h) = selective_scan::selective_scan(s.delta, s.u, s.a, s.b, s.c, (h, skip));
    (y, Some(h))
}

/// Fast form: on flex, the fused [`selective_scan`] (the state never leaves the cache);
/// elsewhere `h_t = exp(Δ_t A) ⊙ h_(t−1) + Δ_t u_t B_t` as one [`decayed_scan`] over
/// `d_inner · d_state` channels. From state `h` `[b, d_inner, d_state]` (`None` = zeros);
/// returns `y` and the final state.
pub fn scan_fused_from(s: ScanInputs, h: Option<Tensor<3>>) -> (Tensor<3>, Tensor<3>) {
    let [bsz, t, di] = s.u.dims();
    let n = s.b.dims()[2];
    let device = s.u.device();
    if crate::device::is_flex(&device) {
        let (y, h) = fused_selective_scan(s, h, None, true);
        return (y, h.expect("kept"));
    }
    let h = h.unwrap_or_else(|| Tensor::zeros([bsz, di, n], &device));
    // Elsewhere, every step's decay and input at once and one decayed scan over time.
    let delta = s.delta.unsqueeze_dim::<4>(3); // [b, t, di, 1]
    let decay = (delta.clone() * s.a.unsqueeze::<4>())
        .exp()
        .expand([bsz, t, di, n]); // [b, t, di, n] (A may be shared across the n)
    let input = (delta * s.u.unsqueeze_dim::<4>(3)) * s.b.unsqueeze_dim::<4>(2);
    let states = decayed_scan(
        decay.reshape([bsz, t, di * n]),
        input.reshape([bsz, t, di * n]),
        h.reshape([bsz, di * n]),
    )
    .reshape([bsz, t, di, n]);
    let y = (states.clone() * s.c.unsqueeze_dim::<4>(2))
        .sum_dim(3)
        .reshape([bsz, t, di]);
    (y, states.narrow(1, t - 1, 1).reshape([bsz, di, n]))
}

/// Fast form: chunks of `chunk` steps. Inside a chunk every state is a decay-weighted sum
/// of the chunk's inputs, all positions at once; only the chunk-end state is carried on.
/// Like the reference, it slices only the small per-step inputs.
pub fn scan_chunked(s: ScanInputs, chunk: usize) -> Tensor<3> {
    scan_chunked_from(s, chunk, None).0
}

/// [`scan_chunked`] from state `h` `[b, d_inner, d_state]` (`None` = zeros), returning the
/// final state too.
pub fn scan_chunked_from(
    s: ScanInputs,
    chunk: usize,
    h: Option<Tensor<3>>,
) -> (Tensor<3>, Tensor<3>) {
    let [bsz, t, di] = s.u.dims();
    let n = s.b.dims()[2];
    let a = s.a.unsqueeze::<4>(); // [1, 1, di, n]
    let mut h = match h {
        Some(h) => h.unsqueeze_dim::<4>(1),
        None => Tensor::<4>::zeros([bsz, 1, di, n], &s.u.device()),
    };
    let mut ys = Vec::with_capacity(t.div_ceil(chunk));
    for t0 in (0..t).step_by(chunk) {
        let t1 = (t0 + chunk).min(t);
        let len = t1 - t0;
        let delta = s
            .delta
            .clone()
            .slice([0..bsz, t0..t1, 0..di])
            .unsqueeze_dim::<4>(3);
        let u =
            s.u.clone()
                .slice([0..bsz, t0..t1, 0..di])
                .unsqueeze_dim::<4>(3);
        let b =
            s.b.clone()
                .slice([0..bsz, t0..t1, 0..n])
                .unsqueeze_dim::<4>(2);
        let c =
            s.c.clone()
                .slice([0..bsz, t0..t1, 0..n])
                .unsqueeze_dim::<4>(2);
        // [b, len, di, n]: log-decay from the chunk start through each step, and inputs.
        let cum = (delta.clone() * a.clone()).cumsum(1);
        let input = (delta * u) * b;
        // states_i = Σ_{j≤i} exp(cum_i − cum_j) input_j + exp(cum_i) h_in
        let local = (decay_matrix_over::<4, 5>(cum.clone(), 1) * input.unsqueeze_dim::<5>(1))
            .sum_dim(2)
            .reshape([bsz, len, di, n]);
        let states = local + cum.exp() * h;
        h = states.clone().slice([0..bsz, len - 1..len, 0..di, 0..n]);
        ys.push((states * c).sum_dim(3).reshape([bsz, len, di]));
    }
    (Tensor::cat(ys, 1), h.reshape([bsz, di, n]))
}

/// From cumulative log-decays `cum` with time along `dim`, the matrix
/// `exp(cum_i − cum_j)` for `j ≤ i` (0 for `j > i`), with `i` at `dim` and `j` at `dim + 1`.
/// Differences are taken before `exp`, so it never overflows.
fn decay_matrix_over<const D: usize, const D1: usize>(cum: Tensor<D>, dim: usize) -> Tensor<D1> {
    let len = cum.dims()[dim];
    let diff: Tensor<D1> = cum.clone().unsqueeze_dim(dim + 1) - cum.unsqueeze_dim(dim);
    let mut mask_shape = [1usize; D1];
    mask_shape[dim] = len;
    mask_shape[dim + 1] = len;
    let future = Tensor::<2, Bool>::tril_mask([len, len], 0, &diff.device()).reshape(mask_shape);
    diff.mask_fill(future, f32::NEG_INFINITY).exp()
}

/// `[model.ssm]`: a Mamba (S6) block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsmOptions {
    pub d_state: usize,
    pub d_conv: usize,
    /// d_inner = expand · d_model.
    pub expand: usize,
    /// Rank of Δ's projection; 0 = ⌈d_model / 16⌉.
    pub dt_rank: usize,
    pub dt_min: f64,
    pub dt_max: f64,
    /// Which scan trains: `fused` (one scan over time, the fastest), `chunked` (parallel in
    /// chunks) or `sequential` (the reference loop).
    pub scan: ScanForm,
    pub chunk_size: usize,
}

impl Default for SsmOptions {
    fn default() -> Self {
        Self {
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: 0,
            dt_min: 1e-3,
            dt_max: 0.1,
            scan: ScanForm::Fused,
            chunk_size: 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanForm {
    /// Every step's decay and input formed at once, then one [`decayed_scan`] over time
    /// (the backend extension on flex: a pass over memory, and a linear backward).
    Fused,
    /// Chunks: decay-weighted sums inside each, the state carried between them.
    Chunked,
    /// The reference: a loop of per-step tensor ops.
    Sequential,
}

impl SsmOptions {
    /// Rank of Δ's projection in a model of width `d_model`.
    pub fn dt_rank(&self, d_model: usize) -> usize {
        match self.dt_rank {
            0 => d_model.div_ceil(16),
            r => r,
        }
    }
}

impl MixerOptions for SsmOptions {
    const TRAINING_ONLY: &'static [&'static str] = &["dt_min", "dt_max", "scan", "chunk_size"];

    fn resolved(&self, ctx: &MixerContext) -> Self {
        Self {
            dt_rank: self.dt_rank(ctx.d_model),
            ..self.clone()
        }
    }

    fn conventions(&self, ctx: &MixerContext) -> Vec<String> {
        let di = self.expand * ctx.d_model;
        let (n, r) = (self.d_state, self.dt_rank(ctx.d_model));
        vec![
            format!("mamba_ssm's Mamba (S6) block; d_inner = expand·d_model = {di}"),
            format!("in_proj(x) → [u | z], each {di} wide, u first"),
            super::causal_conv1d::convention("conv1d", "u", di, self.d_conv),
            format!(
                "x_proj(u) → [dt ({r}) | B ({n}) | C ({n})] in that order; \
                 Δ = softplus(dt_proj(dt)), dt_proj has a bias (always); A = −exp(A_log), [{di}, {n}]"
            ),
            "per channel c: h_t = exp(Δ_t[c]·A[c]) ⊙ h_(t−1) + Δ_t[c]·u_t[c]·B_t (h_0 = 0, \
             [d_state]), y_t[c] = h_t·C_t + D[c]·u_t[c]"
                .to_string(),
            "out_proj(y ⊙ silu(z))".to_string(),
            "in_proj, x_proj and out_proj have no biases whatever model.bias".to_string(),
        ]
    }

    fn validate(&self, _ctx: &MixerContext) -> Result<(), OptionError> {
        at_least_one(&[
            ("d_state", self.d_state),
            ("d_conv", self.d_conv),
            ("expand", self.expand),
            ("chunk_size", self.chunk_size),
        ])?;
        if !(positive(self.dt_min) && self.dt_min <= self.dt_max) {
            return fail(
                "dt_min",
                format!(
                    "must be in (0, dt_max = {}] (got {}); Mamba uses 1e-3",
                    self.dt_max, self.dt_min
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer with the fused scan on flex, whose scan adds the skip `D u` and whose
    /// gate then reads neither, equals the layer with the sequential scan and the skip in
    /// the gate: output and the gradients of the input, D and A_log; in a sequence and
    /// with the state kept (state passing).
    #[test]
    fn the_fused_layer_with_its_skip_in_the_scan_equals_the_sequential_one() {
        let device = Device::flex().autodiff();
        let ctx = MixerContext::for_tests(8, 16);
        // One initialisation, the form set on a copy (a seed per layer would race other
        // tests' draws from the device's generator).
        let fused = Ssm::init(&SsmOptions::default(), &ctx, &device);
        let mut sequential = fused.clone();
        sequential.scan = ScanForm::Sequential;
        let x = Tensor::<3>::random([2, 9, 8], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<3>::random([2, 9, 8], Distribution::Normal(0.0, 1.0), &device);
        for keep_state in [false, true] {
            let run = |ssm: &Ssm| {
                let x = x.clone().require_grad();
                let y = match keep_state {
                    true => ssm.forward_from(x.clone(), None).0,
                    false => ssm.forward_padded(x.clone(), None).0,
                };
                let grads = (y.clone() * probe.clone()).sum().backward();
                let grad = |t: Option<Tensor<1>>| t.expect("a gradient");
                (
                    y.detach(),
                    x.grad(&grads).expect("input gradient"),
                    grad(ssm.D.grad(&grads)),
                    ssm.A_log.grad(&grads).expect("A_log's gradient"),
                )
            };
            let ((y, gx, gd, ga), (y_ref, gx_ref, gd_ref, ga_ref)) = (run(&fused), run(&sequential));
            let case = format!("keep_state={keep_state}");
            let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
                let err = crate::testing::max_relative_difference(&a, &b);
                assert!(err < 1e-4, "{case}: {what}: max difference {err}");
            };
            let v = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
            let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
            close(v(y), v(y_ref), "output");
            close(v(gx), v(gx_ref), "input gradient");
            close(v1(gd), v1(gd_ref), "D's gradient");
            let v2 = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            close(v2(ga), v2(ga_ref), "A_log's gradient");
        }
    }

    /// The scan skips padding: after trailing padding the state is the state after the last
    /// real position (padding neither feeds nor decays it), in every scan form.
    #[test]
    fn the_scan_state_passes_padding_unchanged() {
        let device = Device::flex();
        let ctx = MixerContext::for_tests(8, 16);
        for scan in [ScanForm::Fused, ScanForm::Chunked, ScanForm::Sequential] {
            let options = SsmOptions {
                scan,
                chunk_size: 3,
                ..SsmOptions::default()
            };
            let ssm = Ssm::init(&options, &ctx, &device);
            let x = Tensor::<3>::random([2, 9, 8], Distribution::Normal(0.0, 1.0), &device);
            let padding = Padding::from_lengths(&[5, 5], 9, &device);
            let (u, _) = ssm.split_in_proj(x);
            let u = padding.zero_padded(u);
            let dir = ssm.forward_direction();
            let (_, _, padded) =
                ssm.direction_output(&dir, u.clone(), (None, true), Some(&padding));
            let (_, _, real) = ssm.direction_output(&dir, u.narrow(1, 0, 5), (None, true), None);
            let (padded, real) = (padded.unwrap(), real.unwrap());
            let gap = (padded.h - real.h.clone()).abs().max().into_scalar::<f32>();
            let size = real.h.abs().max().into_scalar::<f32>();
            assert!(size > 1e-3 && gap < 1e-5 * size.max(1.0), "{scan:?}: {gap:e}");
        }
    }
}

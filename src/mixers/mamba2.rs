//! Mamba-2 as a token mixer: the SSD layer of "Transformers are SSMs: Generalized Models and
//! Efficient Algorithms Through Structured State Space Duality" (Dao & Gu 2024,
//! arXiv:2405.21060).
//!
//! One projection gives, per token, the gate z, the conv inputs xBC and Δ. A causal
//! depthwise conv + SiLU runs over xBC, which then splits into x (`nheads` heads of `headdim`
//! channels) and B, C (`ngroups` groups of `d_state`, each shared by `nheads / ngroups`
//! heads, as keys and values are in grouped-query attention). Per head h, with
//! `Δ_t = softplus(dt_t + dt_bias_h)` and `A_h = −exp(A_log_h)` one scalar per head (SSD's
//! scalar-times-identity A, where Mamba-1 has a diagonal one):
//!
//! `h_t = exp(Δ_t A_h) h_{t−1} + Δ_t x_t ⊗ B_t`,  `y_t = h_t C_t + D_h x_t`,
//!
//! with state `h_t` `[headdim, d_state]`. The heads' outputs are normalised with the gate,
//! `rmsnorm(y · silu(z)) · weight` per group, and projected out.
//!
//! Parameter names and layout follow mamba_ssm's `Mamba2` (`in_proj` split as
//! `[z | xBC | dt]`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj`), so
//! exported weights load there.
//!
//! Two forms, held equal by the tests: [`ssd_sequential`], the recurrence step by step (the
//! reference; decoding uses its step); and [`ssd_chunked`], SSD's dual form. Because A is a
//! scalar per head, the decay between two steps is one number per head, shared by every
//! entry of the state; so inside a chunk of Q steps the outputs are a masked, decay-weighted,
//! attention-like product `((C Bᵀ) ∘ L) (Δ x)` — batched matmuls, no state materialised per
//! step — and only the state at chunk ends goes from chunk to chunk (t/Q sequential steps
//! instead of t). It is the default.
//!
//! The bidirectional form (`model.causal = false`) is Caduceus's BiMamba construction
//! (Schiff et al. 2024, §3.1) applied to this layer: in_proj, the gated norm and out_proj are
//! shared; the reversed sequence gets its own conv, dt_bias, A and D (`reverse.*`); the two
//! directions' outputs are added before the gated norm.

#![allow(non_snake_case)] // A, B, C, D, A_log: the paper's and mamba_ssm's names

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use crate::activations::{silu, softplus};
use crate::matmul::matmul;
use crate::fused_norm::fused_norm;
use serde::{Deserialize, Serialize};

use super::causal_conv1d::{CausalConv1d, ConvScanState, time_steps};
use super::decayed_scan::decayed_scan;
use super::fused_gate::gate;
use super::{MixerContext, MixerOptions, OptionError, ShardedForm, TokenMixer, normal_linear};
use crate::mixed_precision::{linear, linear_split};
use crate::options::{at_least_one, divisors, fail, non_negative, positive};
use crate::padding::Padding;
use crate::parallel::SequenceParallel;
use crate::parallel::state_passing::pass_state;

/// `[model.mamba2]`: a Mamba-2 (SSD) layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mamba2Options {
    /// State size N per head: the length of B and C.
    pub d_state: usize,
    /// Taps of the causal depthwise conv over x, B and C (at least 2).
    pub d_conv: usize,
    /// d_inner = expand · d_model.
    pub expand: usize,
    /// Channels per head P; nheads = d_inner / headdim.
    pub headdim: usize,
    /// Groups of heads that share one B and C; divides nheads.
    pub ngroups: usize,
    /// Chunk length Q of the chunked form.
    pub chunk_size: usize,
    /// Lower end of Δ's initial range (drawn log-uniformly).
    pub dt_min: f64,
    /// Upper end of Δ's initial range.
    pub dt_max: f64,
    /// Floor on Δ's initial values.
    pub dt_init_floor: f64,
    /// Lower end of −A's initial range: A = −exp(A_log) starts uniform in
    /// −[a_init_min, a_init_max].
    pub a_init_min: f64,
    /// Upper end of −A's initial range.
    pub a_init_max: f64,
    /// Which form trains: `fused` (the fastest on the CPU), `chunked` (SSD's dual form) or
    /// `sequential` (the reference).
    pub form: Mamba2Form,
}

/// Which form of the scan trains (decoding always steps the recurrence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mamba2Form {
    /// [`ssd_fused`]: on flex the recurrence in one pass per group, Mamba's fused selective
    /// scan over the heads' channels; elsewhere the chunked form.
    Fused,
    /// [`ssd_chunked`]: matmuls within chunks, the recurrence between them.
    Chunked,
    /// [`ssd_sequential`]: the recurrence, one step at a time.
    Sequential,
}

impl Default for Mamba2Options {
    fn default() -> Self {
        Self {
            d_state: 16,
            d_conv: 4,
            expand: 2,
            headdim: 32,
            ngroups: 1,
            chunk_size: 16,
            dt_min: 1e-3,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            a_init_min: 1.0,
            a_init_max: 16.0,
            form: Mamba2Form::Fused,
        }
    }
}

impl MixerOptions for Mamba2Options {
    const TRAINING_ONLY: &'static [&'static str] = &[
        "chunk_size",
        "dt_min",
        "dt_max",
        "dt_init_floor",
        "a_init_min",
        "a_init_max",
        "form",
    ];

    fn conventions(&self, ctx: &MixerContext) -> Vec<String> {
        let di = self.expand * ctx.d_model;
        let (n, p, g) = (self.d_state, self.headdim, self.ngroups);
        let h = di / p;
        let conv = di + 2 * g * n;
        vec![
            format!(
                "mamba_ssm's Mamba2 (SSD) block; d_inner = expand·d_model = {di}, nheads = \
                 d_inner / headdim = {h}"
            ),
            format!("in_proj(x) → [z ({di}) | xBC ({conv}) | dt ({h})] in that order"),
            super::causal_conv1d::convention("conv1d", "xBC", conv, self.d_conv),
            format!(
                "xBC → [x ({di}) | B ({g}·{n}) | C ({g}·{n})]; x viewed as [{h} heads, {p}], B and C \
                 as [{g} groups, {n}]; head i reads group i // {}",
                h / g
            ),
            "Δ = softplus(dt + dt_bias) per head; A = −exp(A_log), one scalar per head".to_string(),
            format!(
                "per head: h_t = exp(Δ_t·A)·h_(t−1) + Δ_t·x_t B_tᵀ (h_0 = 0, [{p}, {n}]), \
                 y_t = h_t C_t + D·x_t"
            ),
            format!(
                "y = y ⊙ silu(z) (y concatenated in head order), then RMS-normalised in {g} groups \
                 of {} channels: y / √(mean(y²) + {:e}) · norm.weight (mamba_ssm's RMSNormGated, \
                 norm_before_gate = False) → out_proj",
                di / g,
                GatedRmsNorm::EPS
            ),
            "in_proj and out_proj have no biases whatever model.bias".to_string(),
        ]
    }

    fn validate(&self, ctx: &MixerContext) -> Result<(), OptionError> {
        at_least_one(&[
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("headdim", self.headdim),
            ("ngroups", self.ngroups),
            ("chunk_size", self.chunk_size),
        ])?;
        if self.d_conv < 2 {
            return fail(
                "d_conv",
                format!(
                    "{} taps: the conv needs at least 2 (mamba_ssm uses 4)",
                    self.d_conv
                ),
            );
        }
        let d_inner = self.expand * ctx.d_model;
        if !d_inner.is_multiple_of(self.headdim) {
            return fail(
                "headdim",
                format!(
                    "headdim {} does not divide d_inner = expand · d_model = {d_inner}: use a \
                     divisor of {d_inner} (e.g. {})",
                    self.headdim,
                    divisors(d_inner)
                ),
            );
        }
        let nheads = d_inner / self.headdim;
        if !nheads.is_multiple_of(self.ngroups) {
            return fail(
                "ngroups",
                format!(
                    "ngroups {} does not divide nheads = d_inner / headdim = {nheads}: use a \
                     divisor of {nheads} (e.g. {})",
                    self.ngroups,
                    divisors(nheads)
                ),
            );
        }
        if !positive(self.dt_min) {
            return fail(
                "dt_min",
                format!("{}: Δ must start above 0 (e.g. 1e-3)", self.dt_min),
            );
        }
        if !(self.dt_max.is_finite() && self.dt_max >= self.dt_min) {
            return fail(
                "dt_max",
                format!(
                    "{}: must be finite and at least dt_min = {}",
                    self.dt_max, self.dt_min
                ),
            );
        }
        if !non_negative(self.dt_init_floor) {
            return fail(
                "dt_init_floor",
                format!("{}: must be ≥ 0 (e.g. 1e-4)", self.dt_init_floor),
            );
        }
        if !positive(self.a_init_min) {
            return fail(
                "a_init_min",
                format!(
                    "{}: A = −exp(A_log) needs a range above 0 (e.g. 1)",
                    self.a_init_min
                ),
            );
        }
        if !(self.a_init_max.is_finite() && self.a_init_max >= self.a_init_min) {
            return fail(
                "a_init_max",
                format!(
                    "{}: must be finite and at least a_init_min = {}",
                    self.a_init_max, self.a_init_min
                ),
            );
        }
        Ok(())
    }
}

/// mamba_ssm's `RMSNormGated` with `norm_before_gate=False`: `rmsnorm(y · silu(z)) · weight`,
/// the mean square taken over each group of `group_size` channels.
#[derive(Module, Debug)]
pub struct GatedRmsNorm {
    /// `[d]`.
    pub weight: Param<Tensor<1>>,
    group_size: usize,
}

impl GatedRmsNorm {
    /// mamba_ssm's epsilon.
    const EPS: f64 = 1e-5;

    pub fn new(d: usize, group_size: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            group_size,
        }
    }

    /// `y`, `z` `[b, t, d]` → `[b, t, d]`, the gate through [`gate`] and the normalisation
    /// through [`fused_norm`] (one op each way on flex, where the tensor-op form takes
    /// eight: Burn's products and their backward run on one thread).
    pub fn forward(&self, y: Tensor<3>, z: Tensor<3>) -> Tensor<3> {
        let [bsz, t, d] = y.dims();
        let gs = self.group_size;
        let gated = gate(y, z);
        if gs == d {
            return fused_norm(gated, self.weight.val(), None, Self::EPS, false);
        }
        let unit = Tensor::ones([gs], &gated.device());
        let normed = fused_norm(gated.reshape([bsz, t, d / gs, gs]), unit, None, Self::EPS, false);
        normed.reshape([bsz, t, d]) * self.weight.val().reshape([1, 1, d])
    }

    /// The tensor-op form: the reference of [`Self::forward`].
    #[cfg(test)]
    fn forward_reference(&self, y: Tensor<3>, z: Tensor<3>) -> Tensor<3> {
        let [bsz, t, d] = y.dims();
        let gs = self.group_size;
        let gated = (y * silu(z)).reshape([bsz, t, d / gs, gs]);
        let rms = gated
            .clone()
            .square()
            .mean_dim(3)
            .add_scalar(Self::EPS)
            .sqrt();
        (gated / rms).reshape([bsz, t, d]) * self.weight.val().reshape([1, 1, d])
    }
}

#[derive(Module, Debug)]
pub struct Mamba2 {
    /// `d_model → [z | xBC | dt]`: d_inner + (d_inner + 2 · ngroups · d_state) + nheads.
    pub in_proj: Linear,
    /// Over xBC, `d_inner + 2 · ngroups · d_state` channels.
    pub conv1d: CausalConv1d,
    /// Added to dt before the softplus, `[nheads]`.
    pub dt_bias: Param<Tensor<1>>,
    /// ln of −A, `[nheads]`.
    pub A_log: Param<Tensor<1>>,
    /// The skip connection `D x`, `[nheads]`.
    pub D: Param<Tensor<1>>,
    pub norm: GatedRmsNorm,
    pub out_proj: Linear,
    /// The reversed sequence's scan, in the bidirectional form only.
    pub reverse: Option<Mamba2Reverse>,
    d_inner: usize,
    d_state: usize,
    headdim: usize,
    ngroups: usize,
    chunk_size: usize,
    #[module(skip)]
    form: Mamba2Form,
}

/// The parameters of the scan over the reversed sequence (BiMamba's second direction).
#[derive(Module, Debug)]
pub struct Mamba2Reverse {
    pub conv1d: CausalConv1d,
    pub dt_bias: Param<Tensor<1>>,
    pub A_log: Param<Tensor<1>>,
    pub D: Param<Tensor<1>>,
}

/// One direction's parameters, borrowed from the layer or from its [`Mamba2Reverse`].
struct Direction<'a> {
    conv1d: &'a CausalConv1d,
    dt_bias: &'a Param<Tensor<1>>,
    A_log: &'a Param<Tensor<1>>,
    D: &'a Param<Tensor<1>>,
}

/// Decoding state: the last `d_conv − 1` conv inputs `[b, d_conv − 1, conv_dim]` and the SSM
/// state `h` `[b, nheads, headdim, d_state]`.
pub type Mamba2State = ConvScanState<4>;

/// `n` draws from U(lo, hi); all `lo` when the range is empty (rand refuses lo == hi).
fn uniform(n: usize, lo: f64, hi: f64, device: &Device) -> Tensor<1> {
    if (lo as f32) < (hi as f32) {
        Tensor::random([n], Distribution::Uniform(lo, hi), device)
    } else {
        Tensor::full([n], lo, device)
    }
}

impl Mamba2 {
    pub fn nheads(&self) -> usize {
        self.d_inner / self.headdim
    }

    pub fn form(&self) -> Mamba2Form {
        self.form
    }

    /// Channels of the conv: x, B and C.
    fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.ngroups * self.d_state
    }

    fn forward_direction(&self) -> Direction<'_> {
        Direction {
            conv1d: &self.conv1d,
            dt_bias: &self.dt_bias,
            A_log: &self.A_log,
            D: &self.D,
        }
    }

    /// `in_proj` of x `[b, t, d_model]` as its pieces: z `[b, t, d_inner]`, xBC (as
    /// [`Xbc`]'s three parts) and dt `[b, t, nheads]` (before the direction's bias and
    /// softplus).
    fn split_in_proj(&self, x: Tensor<3>) -> (Tensor<3>, Xbc, Tensor<3>) {
        let (di, h, gn) = (self.d_inner, self.nheads(), self.ngroups * self.d_state);
        let [z, x, b, c, dt] = linear_split(&self.in_proj, x, [di, di, gn, gn, h]);
        (z, Xbc([x, b, c]), dt)
    }

    /// Δ = softplus(dt + dt_bias) `[b, t, nheads]`.
    fn delta(&self, dir: &Direction, dt: Tensor<3>) -> Tensor<3> {
        let h = self.nheads();
        softplus(dt + dir.dt_bias.val().reshape([1, 1, h]))
    }

    /// The conv's output as its parts → x `[b, t, nheads, headdim]`, B and C
    /// `[b, t, ngroups, d_state]` (contiguous, so these reshapes copy nothing).
    fn heads_of(&self, [x, b, c]: [Tensor<3>; 3]) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [bsz, t, _] = x.dims();
        let (g, n) = (self.ngroups, self.d_state);
        let x = x.reshape([bsz, t, self.nheads(), self.headdim]);
        (x, b.reshape([bsz, t, g, n]), c.reshape([bsz, t, g, n]))
    }

    /// The conv's output `[b, t, conv_dim]` → x `[b, t, nheads, headdim]`, B and C
    /// `[b, t, ngroups, d_state]`.
    fn split_xbc(&self, xbc: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [bsz, t, _] = xbc.dims();
        let (di, g, n) = (self.d_inner, self.ngroups, self.d_state);
        let x = xbc
            .clone()
            .narrow(2, 0, di)
            .reshape([bsz, t, self.nheads(), self.headdim]);
        let B = xbc.clone().narrow(2, di, g * n).reshape([bsz, t, g, n]);
        let C = xbc.narrow(2, di + g * n, g * n).reshape([bsz, t, g, n]);
        (x, B, C)
    }

    /// Heads `[b, t, nheads, headdim]` with their skip `D x` added → gated norm → out_proj.
    fn project_out(&self, y: Tensor<4>, z: Tensor<3>) -> Tensor<3> {
        let [bsz, t, _, _] = y.dims();
        let y = self.norm.forward(y.reshape([bsz, t, self.d_inner]), z);
        linear(&self.out_proj, y)
    }

    /// `forward` of positions that follow those summarised by `state`, and the state after.
    pub fn forward_from(
        &self,
        x: Tensor<3>,
        state: Option<Mamba2State>,
    ) -> (Tensor<3>, Mamba2State) {
        let [bsz, t, _] = x.dims();
        let kernel = self.conv1d.kernel();
        let (history, h0) = match state {
            Some(s) => (s.conv, Some(s.h)),
            None => (
                Tensor::zeros([bsz, kernel - 1, self.conv_dim()], &x.device()),
                None,
            ),
        };
        let (z, xbc, dt) = self.split_in_proj(x);
        let dir = self.forward_direction();
        let start = (Some(history.clone()), h0);
        let (y, ssm) = self.direction_output(&dir, xbc.clone(), dt, start, (None, true));
        let ssm = ssm.expect("kept");
        // The next chunk's history: the last kernel − 1 conv inputs, some of them from
        // `history` when this chunk is shorter than that.
        let conv = Tensor::cat(vec![history, xbc.joined()], 1).narrow(1, t, kernel - 1);
        (self.project_out(y, z), Mamba2State { conv, h: ssm })
    }

    /// One direction from the conv's input xBC and Δ's dt: the heads with their skip
    /// `D x`, and the final SSM state where `keep_state` asks for it (without it the fused
    /// form tracks y alone). Padded positions get Δ = 0, so the state passes
    /// them unchanged and takes nothing from them (xBC is zeroed there by the caller).
    fn direction_output(
        &self,
        dir: &Direction,
        xbc: Xbc,
        dt: Tensor<3>,
        (history, h0): (Option<Tensor<3>>, Option<Tensor<4>>),
        (padding, keep_state): (Option<&Padding>, bool),
    ) -> (Tensor<4>, Option<Tensor<4>>) {
        let mut delta = self.delta(dir, dt);
        if let Some(p) = padding {
            delta = delta * p.column();
        }
        let (x, B, C) = self.heads_of(dir.conv1d.forward_silu_parts(xbc.0, history));
        let (A, D) = (dir.A_log.val().exp().neg(), dir.D.val());
        let skip = |y: Tensor<4>, x: Tensor<4>| y + x * D.clone().reshape([1, 1, self.nheads(), 1]);
        match self.form {
            // The skip inside the fused scan.
            Mamba2Form::Fused => {
                let kept = (h0, keep_state, Some(D.clone()));
                ssd_fused_kept(x, delta, A, B, C, kept, self.chunk_size)
            }
            Mamba2Form::Chunked => {
                let (y, ssm) = ssd_chunked(x.clone(), delta, A, B, C, h0, self.chunk_size);
                (skip(y, x), keep_state.then_some(ssm))
            }
            Mamba2Form::Sequential => {
                let (y, ssm) = ssd_sequential(x.clone(), delta, A, B, C, h0);
                (skip(y, x), keep_state.then_some(ssm))
            }
        }
    }
}

/// xBC, the conv's input, as its three parts x `[b, t, d_inner]`, B and C
/// `[b, t, ngroups · d_state]`: in_proj makes them apart and the conv runs on each
/// ([`CausalConv1d::forward_silu_parts`]); joined only where a state keeps the conv's
/// last inputs.
#[derive(Clone)]
struct Xbc([Tensor<3>; 3]);

impl Xbc {
    /// `f` on each part.
    fn map(self, f: impl Fn(Tensor<3>) -> Tensor<3>) -> Self {
        Self(self.0.map(f))
    }

    /// The parts side by side, `[b, t, conv_dim]`.
    fn joined(self) -> Tensor<3> {
        Tensor::cat(self.0.to_vec(), 2)
    }
}

impl TokenMixer for Mamba2 {
    type Options = Mamba2Options;
    type State = Mamba2State;
    const SHARDED: ShardedForm = ShardedForm::StatePassing;

    fn init(o: &Mamba2Options, ctx: &MixerContext, device: &Device) -> Self {
        let d_inner = o.expand * ctx.d_model;
        let nheads = d_inner / o.headdim;
        let bc = 2 * o.ngroups * o.d_state;
        // mamba_ssm's dt init: Δ log-uniform in [dt_min, dt_max] (floored), and
        // dt_bias = softplus⁻¹(Δ) = Δ + ln(1 − e^−Δ), so Δ starts there for dt ≈ 0.
        let dt = uniform(nheads, o.dt_min.ln(), o.dt_max.ln(), device)
            .exp()
            .clamp_min(o.dt_init_floor);
        let dt_bias = dt.clone() + dt.neg().exp().neg().add_scalar(1.0).log();
        // Heads start with different decay rates: −A uniform in [a_init_min, a_init_max].
        let A_log = uniform(nheads, o.a_init_min, o.a_init_max, device).log();
        // The reverse direction starts as the forward one does (fresh draws, same init).
        let reverse = (!ctx.causal).then(|| {
            let forward = Self::init(o, &MixerContext { causal: true, ..ctx.clone() }, device);
            Mamba2Reverse {
                conv1d: forward.conv1d,
                dt_bias: forward.dt_bias,
                A_log: forward.A_log,
                D: forward.D,
            }
        });
        Mamba2 {
            in_proj: normal_linear(
                ctx.d_model,
                2 * d_inner + bc + nheads,
                false,
                ctx.init_std,
                device,
            ),
            conv1d: CausalConv1d::new(d_inner + bc, o.d_conv, device),
            dt_bias: Param::from_tensor(dt_bias),
            A_log: Param::from_tensor(A_log),
            D: Param::from_tensor(Tensor::ones([nheads], device)),
            norm: GatedRmsNorm::new(d_inner, d_inner / o.ngroups, device),
            out_proj: normal_linear(d_inner, ctx.d_model, false, ctx.residual_init_std(), device),
            reverse,
            d_inner,
            d_state: o.d_state,
            headdim: o.headdim,
            ngroups: o.ngroups,
            chunk_size: o.chunk_size,
            form: o.form,
        }
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let (z, xbc, dt) = self.split_in_proj(x);
        // Zeroed padding cannot reach a real position through the conv either.
        let xbc = match padding {
            Some(p) => xbc.map(|t| p.zero_padded(t)),
            None => xbc,
        };
        let forward = self.forward_direction();
        let fresh = (None, None);
        let dropped = (padding, false);
        let (mut y, _) = self.direction_output(&forward, xbc.clone(), dt.clone(), fresh, dropped);
        if let Some(rev) = &self.reverse {
            let backward = Direction {
                conv1d: &rev.conv1d,
                dt_bias: &rev.dt_bias,
                A_log: &rev.A_log,
                D: &rev.D,
            };
            let reversed = padding.map(Padding::reversed);
            let (y_rev, _) = self.direction_output(
                &backward,
                xbc.map(|t| t.flip([1])),
                dt.flip([1]),
                (None, None),
                (reversed.as_ref(), false),
            );
            y = y + y_rev.flip([1]);
        }
        (self.project_out(y, z), None)
    }

    fn step(&self, x: Tensor<3>, state: Option<Mamba2State>) -> (Tensor<3>, Mamba2State) {
        let [bsz, _, _] = x.dims();
        let (h, p, n) = (self.nheads(), self.headdim, self.d_state);
        let kernel = self.conv1d.kernel();
        let device = x.device();
        let state = state.unwrap_or_else(|| Mamba2State {
            conv: Tensor::zeros([bsz, kernel - 1, self.conv_dim()], &device),
            h: Tensor::zeros([bsz, h, p, n], &device),
        });
        let (z, xbc, dt) = self.split_in_proj(x);
        let dir = self.forward_direction();
        let dt = self.delta(&dir, dt);
        let window = Tensor::cat(vec![state.conv, xbc.joined()], 1);
        let xbc = silu(self.conv1d.step(window.clone()));
        let conv = window.narrow(1, 1, kernel - 1);
        let (xs, B, C) = self.split_xbc(xbc);
        let per_step = |t: Tensor<4>| per_head(t, h).reshape([bsz, h, n]);
        let (y, ssm) = ssd_step(
            state.h,
            xs.clone().reshape([bsz, h, p]),
            dt.reshape([bsz, h]),
            self.A_log.val().exp().neg(),
            per_step(B),
            per_step(C),
        );
        let y = y.reshape([bsz, 1, h, p]) + xs * self.D.val().reshape([1, 1, h, 1]);
        (self.project_out(y, z), Mamba2State { conv, h: ssm })
    }

    /// State passing: the SSM state and the conv's last inputs go from rank to rank.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let ys = pass_state(xs, sp, |r, x, state| ranks[r].forward_from(x, state));
        (ys, None)
    }
}

/// B or C `[b, t, ngroups, N]` for each head, `[b, t, nheads, N]`: head h reads group
/// `h / (nheads / ngroups)`, as mamba_ssm's `repeat(B, "b l g n -> b l (g h) n")`.
fn per_head(x: Tensor<4>, nheads: usize) -> Tensor<4> {
    let [bsz, t, g, n] = x.dims();
    if g == nheads {
        return x;
    }
    x.unsqueeze_dim::<5>(3)
        .repeat_dim(3, nheads / g)
        .reshape([bsz, t, nheads, n])
}

/// One step of the recurrence for every head: x `[b, H, P]`, Δ `[b, H]`, A `[H]`, B and C
/// `[b, H, N]` (already per head), state `[b, H, P, N]`. Returns `y = h' C` `[b, H, P]` and
/// the new state `h' = exp(Δ A) h + Δ x ⊗ B`.
pub fn ssd_step(
    state: Tensor<4>,
    x: Tensor<3>,
    dt: Tensor<2>,
    A: Tensor<1>,
    B: Tensor<3>,
    C: Tensor<3>,
) -> (Tensor<3>, Tensor<4>) {
    let [bsz, h, p] = x.dims();
    let decay = (dt.clone() * A.unsqueeze::<2>())
        .exp()
        .reshape([bsz, h, 1, 1]);
    let dtx = x * dt.unsqueeze_dim::<3>(2);
    let state = state * decay + dtx.unsqueeze_dim::<4>(3) * B.unsqueeze_dim::<4>(2);
    let y = (state.clone() * C.unsqueeze_dim::<4>(2))
        .sum_dim(3)
        .reshape([bsz, h, p]);
    (y, state)
}

/// Reference form: the recurrence one step at a time. x `[b, t, H, P]`, Δ `[b, t, H]`,
/// A `[H]`, B and C `[b, t, G, N]`, from state `initial` `[b, H, P, N]` (`None` = zeros).
/// Returns y `[b, t, H, P]` (without the `D x` skip) and the final state.
pub fn ssd_sequential(
    x: Tensor<4>,
    dt: Tensor<3>,
    A: Tensor<1>,
    B: Tensor<4>,
    C: Tensor<4>,
    initial: Option<Tensor<4>>,
) -> (Tensor<4>, Tensor<4>) {
    let [bsz, t, h, p] = x.dims();
    let n = B.dims()[3];
    let (B, C) = (per_head(B, h), per_head(C, h));
    let mut state = initial.unwrap_or_else(|| Tensor::zeros([bsz, h, p, n], &x.device()));
    let mut ys = Vec::with_capacity(t);
    let steps = time_steps(x)
        .into_iter()
        .zip(time_steps(dt))
        .zip(time_steps(B).into_iter().zip(time_steps(C)));
    for ((x, dt), (B, C)) in steps {
        let (y, next) = ssd_step(
            state,
            x.reshape([bsz, h, p]),
            dt.reshape([bsz, h]),
            A.clone(),
            B.reshape([bsz, h, n]),
            C.reshape([bsz, h, n]),
        );
        state = next;
        ys.push(y.reshape([bsz, 1, h, p]));
    }
    (Tensor::cat(ys, 1), state)
}

/// Fast form on the CPU: the recurrence, each group of heads in one call of Mamba's fused
/// [`selective_scan`](super::selective_scan) over its heads' `P` channels each (Δ one per
/// head, which the scan reads for the head's channels; A one per channel, shared by its
/// state rows; B and C the group's), whose state never leaves the cache. On the CPU this
/// beats the dual form's matmuls, whose many small products and layout copies (about a
/// third of a layer's time in copies) cost more than the recurrence's arithmetic saves.
/// Elsewhere, [`ssd_chunked`] with chunks of `chunk`. Arguments and result as
/// [`ssd_sequential`].
pub fn ssd_fused(
    x: Tensor<4>,
    dt: Tensor<3>,
    A: Tensor<1>,
    B: Tensor<4>,
    C: Tensor<4>,
    initial: Option<Tensor<4>>,
    chunk: usize,
) -> (Tensor<4>, Tensor<4>) {
    let (y, state) = ssd_fused_kept(x, dt, A, B, C, (initial, true, None), chunk);
    (y, state.expect("kept"))
}

/// [`ssd_fused`]'s y alone: on flex the fused scan then tracks y by itself.
pub fn ssd_fused_output(
    x: Tensor<4>,
    dt: Tensor<3>,
    A: Tensor<1>,
    B: Tensor<4>,
    C: Tensor<4>,
    initial: Option<Tensor<4>>,
    chunk: usize,
) -> Tensor<4> {
    ssd_fused_kept(x, dt, A, B, C, (initial, false, None), chunk).0
}

/// [`ssd_fused`], the final state returned where `keep_state`, and the skip `D x` (D
/// `[nheads]`) added to y where `skip` is given: on flex inside the fused scan, which saves
/// the separate products and sums and their backwards.
fn ssd_fused_kept(
    x: Tensor<4>,
    dt: Tensor<3>,
    A: Tensor<1>,
    B: Tensor<4>,
    C: Tensor<4>,
    (initial, keep_state, skip): (Option<Tensor<4>>, bool, Option<Tensor<1>>),
    chunk: usize,
) -> (Tensor<4>, Option<Tensor<4>>) {
    if !crate::device::is_flex(&x.device()) {
        let h = x.dims()[2];
        let (y, state) = ssd_chunked(x.clone(), dt, A, B, C, initial, chunk);
        let y = match skip {
            Some(d) => y + x * d.reshape([1, 1, h, 1]),
            None => y,
        };
        return (y, keep_state.then_some(state));
    }
    let [bsz, t, h, p] = x.dims();
    let [_, _, g, n] = B.dims();
    let per_group = h / g;
    let width = per_group * p;
    let (mut ys, mut states) = (Vec::with_capacity(g), Vec::with_capacity(g));
    for group in 0..g {
        let heads = |x: Tensor<4>| x.narrow(2, group * per_group, per_group);
        // Δ per head, `[b, t, heads]`: the scan reads each head's for its channels.
        let delta = dt.clone().narrow(2, group * per_group, per_group);
        // One A per channel, `[width, 1]`: the scan shares it across the state rows.
        let a = A
            .clone()
            .narrow(0, group * per_group, per_group)
            .reshape([per_group, 1])
            .expand([per_group, p])
            .reshape([width, 1]);
        let of_group = |x: Tensor<4>| x.narrow(2, group, 1).reshape([bsz, t, n]);
        let u = heads(x.clone()).reshape([bsz, t, width]);
        let (b, c) = (of_group(B.clone()), of_group(C.clone()));
        // No initial state: the scan's own zeros (no tensor to fill, read and differentiate).
        let h0 = initial.clone().map(|initial| {
            initial
                .narrow(1, group * per_group, per_group)
                .reshape([bsz, width, n])
        });
        // The group's heads' D, one per channel.
        let skip = skip.clone().map(|d| {
            d.narrow(0, group * per_group, per_group)
                .reshape([per_group, 1])
                .expand([per_group, p])
                .reshape([width])
        });
        let y = if keep_state {
            let (y, state) = super::selective_scan::selective_scan(delta, u, a, b, c, (h0, skip));
            states.push(state.reshape([bsz, per_group, p, n]));
            y
        } else {
            super::selective_scan::selective_scan_output(delta, u, a, b, c, (h0, skip))
        };
        ys.push(y.reshape([bsz, t, per_group, p]));
    }
    let state = keep_state.then(|| match g {
        1 => states.remove(0),
        _ => Tensor::cat(states, 1),
    });
    if g == 1 {
        // One group (the default): nothing to join, so no copy.
        return (ys.remove(0), state);
    }
    (Tensor::cat(ys, 2), state)
}

/// Fast form, SSD's dual form: [`ssd_sequential`]'s map in chunks of `chunk` steps, all
/// chunks at once (the sequence padded to whole chunks), the state carried from chunk to
/// chunk by one [`decayed_scan`]. Within a chunk, with `cum_i` the cumulative sum of `Δ A` from the
/// chunk's start through step i and `L_ij = exp(cum_i − cum_j)` (j ≤ i, else 0):
///
/// - `y_i = Σ_j (C_i · B_j) L_ij Δ_j x_j` — `((C Bᵀ) ∘ L) (Δ x)`, two matmuls;
/// - `+ exp(cum_i) C_i · h_in` — the incoming state, decayed to step i;
/// - `h_out = exp(cum_last) h_in + Σ_j exp(cum_last − cum_j) Δ_j x_j ⊗ B_j` — one matmul.
///
/// Every exponent is a difference `cum_i − cum_j`, j ≤ i, or a prefix sum of `Δ A`, so ≤ 0
/// (Δ ≥ 0, A < 0): nothing overflows however long the chunk.
pub fn ssd_chunked(
    x: Tensor<4>,
    dt: Tensor<3>,
    A: Tensor<1>,
    B: Tensor<4>,
    C: Tensor<4>,
    initial: Option<Tensor<4>>,
    chunk: usize,
) -> (Tensor<4>, Tensor<4>) {
    let [bsz, t, h, p] = x.dims();
    let n = B.dims()[3];
    let device = x.device();
    let (B, C) = (per_head(B, h), per_head(C, h));
    // Every chunk at once: padded to nc·q steps (zero Δ adds nothing and decays nothing),
    // then reshaped to [b, H, nc, q, ·] (fla's layout), so each product below is one
    // matmul batched over (b, H, chunk).
    let q = chunk.min(t);
    let nc = t.div_ceil(q);
    let pad = nc * q - t;
    let chunks = |x: Tensor<4>, d: usize| {
        let x = if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([bsz, pad, h, d], &device)], 1)
        };
        x.reshape([bsz, nc, q, h, d]).permute([0, 3, 1, 2, 4])
    };
    let (x, B, C) = (chunks(x, p), chunks(B, n), chunks(C, n));
    let dt = chunks(dt.unsqueeze_dim::<4>(3), 1).squeeze_dim::<4>(4); // [b, H, nc, q]
    let cum = (dt.clone() * A.reshape([1, h, 1, 1])).cumsum(3);
    let dtx = x * dt.unsqueeze_dim::<5>(4); // [b, H, nc, q, P]

    let scores = matmul(C.clone(), B.clone().swap_dims(3, 4)) * decay_matrix(cum.clone());
    let within = matmul(scores, dtx.clone());
    // What each chunk adds to the state, decayed to its end, and its decay as a whole.
    let total = cum.clone().narrow(3, q - 1, 1); // [b, H, nc, 1]
    let to_end = (total.clone() - cum.clone()).exp().unsqueeze_dim::<5>(4);
    let added = matmul((dtx * to_end).swap_dims(3, 4), B); // [b, H, nc, P, N]
    // The state entering each chunk: one decayed scan over chunks (a linear backward).
    let (bh, pn) = (bsz * h, p * n);
    let start = initial
        .unwrap_or_else(|| Tensor::zeros([bsz, h, p, n], &device))
        .reshape([bh, pn]);
    let after = decayed_scan(
        total.exp().reshape([bh, nc, 1]).expand([bh, nc, pn]),
        added.reshape([bh, nc, pn]),
        start.clone(),
    );
    let entering = if nc > 1 {
        Tensor::cat(
            vec![start.unsqueeze_dim::<3>(1), after.clone().narrow(1, 0, nc - 1)],
            1,
        )
    } else {
        start.unsqueeze_dim::<3>(1)
    }
    .reshape([bsz, h, nc, p, n]);
    let from_state =
        matmul(C, entering.swap_dims(3, 4)) * cum.exp().unsqueeze_dim::<5>(4); // [b, H, nc, q, P]
    let y = (within + from_state)
        .permute([0, 2, 3, 1, 4])
        .reshape([bsz, nc * q, h, p])
        .narrow(1, 0, t);
    let last = after.narrow(1, nc - 1, 1).reshape([bsz, h, p, n]);
    (y, last)
}

/// From cumulative log-decays `cum` `[b, H, nc, Q]`, the decays from step j to step i of
/// each chunk, `L[.., i, j] = exp(cum_i − cum_j)` for j ≤ i and 0 for j > i,
/// `[b, H, nc, Q, Q]`. The difference is taken before `exp` and the future masked to −∞, so
/// no exponent is positive.
fn decay_matrix(cum: Tensor<4>) -> Tensor<5> {
    let q = cum.dims()[3];
    let diff = cum.clone().unsqueeze_dim::<5>(4) - cum.unsqueeze_dim::<5>(3);
    let future = Tensor::<2, Bool>::tril_mask([q, q], 0, &diff.device())
        .reshape([1, 1, 1, q, q])
        .expand(diff.dims());
    diff.mask_fill(future, f32::NEG_INFINITY).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan skips padding: after trailing padding the SSM state is the state after the
    /// last real position (padding neither feeds nor decays it), in both forms.
    #[test]
    fn the_ssm_state_passes_padding_unchanged() {
        let device = Device::flex();
        let ctx = MixerContext::for_tests(16, 16);
        for form in [Mamba2Form::Fused, Mamba2Form::Chunked, Mamba2Form::Sequential] {
            let options = Mamba2Options {
                headdim: 8,
                chunk_size: 4,
                form,
                ..Mamba2Options::default()
            };
            let m = Mamba2::init(&options, &ctx, &device);
            let x = Tensor::<3>::random([2, 9, 16], Distribution::Normal(0.0, 1.0), &device);
            let padding = Padding::from_lengths(&[5, 5], 9, &device);
            let (_, xbc, dt) = m.split_in_proj(x);
            let xbc = xbc.map(|t| padding.zero_padded(t));
            let dir = m.forward_direction();
            let fresh = (None, None);
            let kept = (Some(&padding), true);
            let (_, padded) = m.direction_output(&dir, xbc.clone(), dt.clone(), fresh, kept);
            let (_, real) = m.direction_output(
                &dir,
                xbc.map(|t| t.narrow(1, 0, 5)),
                dt.narrow(1, 0, 5),
                (None, None),
                (None, true),
            );
            let (padded, real) = (padded.unwrap(), real.unwrap());
            let gap = (padded - real.clone()).abs().max().into_scalar::<f32>();
            let size = real.abs().max().into_scalar::<f32>();
            assert!(size > 1e-3 && gap < 1e-5 * size.max(1.0), "{form:?}: {gap:e}");
        }
    }

    /// |actual − expected| ≤ atol + rtol · |expected| at every element; on failure, reports
    /// the element furthest over its tolerance.
    fn assert_close<const D: usize>(
        actual: Tensor<D>,
        expected: Tensor<D>,
        rtol: f32,
        atol: f32,
        what: &str,
    ) {
        assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
        let a = actual.into_data().try_to_vec::<f32>().unwrap();
        let e = expected.into_data().try_to_vec::<f32>().unwrap();
        let mut worst: Option<(usize, f32)> = None;
        for (i, (&ai, &ei)) in a.iter().zip(&e).enumerate() {
            let over = (ai - ei).abs() - (atol + rtol * ei.abs());
            // NaN is never within tolerance.
            let over = if over.is_nan() { f32::INFINITY } else { over };
            if over > 0.0 && worst.is_none_or(|(_, w)| over > w) {
                worst = Some((i, over));
            }
        }
        if let Some((i, _)) = worst {
            panic!(
                "{what}: element {i} is {} where {} was expected (|diff| {:e} > {atol:e} + {rtol:e} · |expected|)",
                a[i],
                e[i],
                (a[i] - e[i]).abs()
            );
        }
    }

    const RTOL: f32 = 1e-4;
    const ATOL: f32 = 1e-5;

    /// Random SSD inputs: batch 2, 4 heads of 3 channels, state 5, in `g` groups.
    struct Inputs {
        x: Tensor<4>,
        dt: Tensor<3>,
        A: Tensor<1>,
        B: Tensor<4>,
        C: Tensor<4>,
        h0: Tensor<4>,
    }

    impl Inputs {
        fn random(t: usize, g: usize, device: &Device) -> Self {
            let (bsz, h, p, n) = (2, 4, 3, 5);
            let normal = Distribution::Normal(0.0, 1.0);
            Self {
                x: Tensor::random([bsz, t, h, p], normal, device),
                dt: Tensor::random([bsz, t, h], Distribution::Uniform(0.01, 0.5), device),
                A: Tensor::random([h], Distribution::Uniform(-2.0, -0.5), device),
                B: Tensor::random([bsz, t, g, n], normal, device),
                C: Tensor::random([bsz, t, g, n], normal, device),
                h0: Tensor::random([bsz, h, p, n], normal, device),
            }
        }

        /// The same inputs as leaves that keep their gradients.
        fn require_grad(self) -> Self {
            Self {
                x: self.x.require_grad(),
                dt: self.dt.require_grad(),
                A: self.A.require_grad(),
                B: self.B.require_grad(),
                C: self.C.require_grad(),
                h0: self.h0.require_grad(),
            }
        }

        fn sequential(&self, initial: bool) -> (Tensor<4>, Tensor<4>) {
            let h0 = initial.then(|| self.h0.clone());
            let (x, dt, A) = (self.x.clone(), self.dt.clone(), self.A.clone());
            ssd_sequential(x, dt, A, self.B.clone(), self.C.clone(), h0)
        }

        /// The chunked form, or with `fused` the fused one (the chunked form off flex).
        fn fast(&self, initial: bool, chunk: usize, fused: bool) -> (Tensor<4>, Tensor<4>) {
            let h0 = initial.then(|| self.h0.clone());
            let (x, dt, A) = (self.x.clone(), self.dt.clone(), self.A.clone());
            let (B, C) = (self.B.clone(), self.C.clone());
            match fused {
                true => ssd_fused(x, dt, A, B, C, h0, chunk),
                false => ssd_chunked(x, dt, A, B, C, h0, chunk),
            }
        }
    }

    /// (t, chunk, ngroups, initial state): whole chunks, a short last chunk, a chunk longer
    /// than the sequence, chunks of one step; one group, two, one per head.
    const CASES: &[(usize, usize, usize, bool)] = &[
        (16, 4, 1, false),
        (13, 4, 2, true),
        (5, 8, 4, true),
        (7, 1, 2, true),
        (19, 16, 1, true),
    ];

    /// The gated norm through the fused gate and RMSNorm equals its tensor-op form, output
    /// and the gradients of y, z and the weight: one group, and groups smaller than the width.
    #[test]
    fn fused_gated_norm_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(7);
        for group_size in [12, 4] {
            let normal = |shape: [usize; 3]| {
                Tensor::<3>::random(shape, Distribution::Normal(0.0, 2.0), &device).require_grad()
            };
            let (y, z) = (normal([2, 5, 12]), normal([2, 5, 12]));
            let mut norm = GatedRmsNorm::new(12, group_size, &device);
            let weight = Tensor::<1>::random([12], Distribution::Normal(1.0, 0.3), &device);
            norm.weight = Param::from_tensor(weight);
            let probe = Tensor::<3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
            let run = |out: Tensor<3>| {
                let g = (out.clone() * probe.clone()).sum().backward();
                let w = norm.weight.grad(&g).unwrap();
                (out, y.grad(&g).unwrap(), z.grad(&g).unwrap(), w)
            };
            let calls = crate::fused_norm::FORWARD_CALLS.get();
            let gates = crate::mixers::fused_gate::FORWARD_CALLS.get();
            let fused = run(norm.forward(y.clone(), z.clone()));
            assert!(crate::fused_norm::FORWARD_CALLS.get() > calls, "the fused norm ran");
            assert!(crate::mixers::fused_gate::FORWARD_CALLS.get() > gates, "the fused gate ran");
            let reference = run(norm.forward_reference(y.clone(), z.clone()));
            let what = format!("group size {group_size}");
            assert_close(fused.0, reference.0, RTOL, ATOL, &format!("{what}: output"));
            assert_close(fused.1, reference.1, RTOL, ATOL, &format!("{what}: ∂/∂y"));
            assert_close(fused.2, reference.2, RTOL, ATOL, &format!("{what}: ∂/∂z"));
            let (w, w_ref) = (fused.3.unsqueeze::<3>(), reference.3.unsqueeze::<3>());
            assert_close(w, w_ref, RTOL, ATOL, &format!("{what}: ∂/∂weight"));
        }
    }

    #[test]
    fn chunked_and_fused_equal_sequential() {
        let device = Device::flex();
        device.seed(2405);
        let calls = crate::mixers::selective_scan::FORWARD_CALLS.get();
        for (&(t, chunk, g, initial), fused) in CASES.iter().flat_map(|c| [(c, false), (c, true)]) {
            let inputs = Inputs::random(t, g, &device);
            let (y_ref, h_ref) = inputs.sequential(initial);
            let (y, h) = inputs.fast(initial, chunk, fused);
            let case = format!("t={t} chunk={chunk} ngroups={g} initial={initial} fused={fused}");
            assert_close(y, y_ref, RTOL, ATOL, &format!("{case}: y"));
            assert_close(h, h_ref, RTOL, ATOL, &format!("{case}: final state"));
        }
        assert!(
            crate::mixers::selective_scan::FORWARD_CALLS.get() > calls,
            "the fused form ran the fused scan"
        );
    }

    #[test]
    fn chunked_and_fused_gradients_equal_sequential() {
        let device = Device::flex().autodiff();
        device.seed(21);
        for (&(t, chunk, g, initial), fused) in CASES.iter().flat_map(|c| [(c, false), (c, true)]) {
            let inputs = Inputs::random(t, g, &device).require_grad();
            let normal = Distribution::Normal(0.0, 1.0);
            let w = Tensor::<4>::random(inputs.x.dims(), normal, &device);
            let w_state = Tensor::<4>::random(inputs.h0.dims(), normal, &device);
            // The final state is an output too (state passing carries it to the next chunk).
            let grads_of = |(y, h): (Tensor<4>, Option<Tensor<4>>)| {
                let loss = (y * w.clone()).sum();
                let loss = match h {
                    Some(h) => loss + (h * w_state.clone()).sum(),
                    None => loss,
                };
                let grads = loss.backward();
                let g4 = |x: &Tensor<4>| x.grad(&grads).expect("leaf has a gradient");
                (
                    [g4(&inputs.x), g4(&inputs.B), g4(&inputs.C)],
                    inputs.dt.grad(&grads).expect("leaf has a gradient"),
                    inputs.A.grad(&grads).expect("leaf has a gradient"),
                    initial.then(|| g4(&inputs.h0)),
                )
            };
            let with_state = |(y, h): (Tensor<4>, Tensor<4>)| (y, Some(h));
            let mut pairs = vec![(
                "with its final state",
                grads_of(with_state(inputs.sequential(initial))),
                grads_of(with_state(inputs.fast(initial, chunk, fused))),
            )];
            if fused {
                // y alone: the fused scan's op that tracks y by itself.
                let (x, dt, A) = (inputs.x.clone(), inputs.dt.clone(), inputs.A.clone());
                let (B, C) = (inputs.B.clone(), inputs.C.clone());
                let h0 = initial.then(|| inputs.h0.clone());
                let y = ssd_fused_output(x, dt, A, B, C, h0, chunk);
                let y_ref = inputs.sequential(initial).0;
                pairs.push(("y alone", grads_of((y_ref, None)), grads_of((y, None))));
            }
            for (what, (g4_ref, dt_ref, a_ref, h0_ref), (g4, dt, a, h0)) in pairs {
                let case = format!(
                    "t={t} chunk={chunk} ngroups={g} initial={initial} fused={fused}, {what}"
                );
                for ((actual, expected), name) in g4.into_iter().zip(g4_ref).zip(["x", "B", "C"]) {
                    assert_close(actual, expected, RTOL, ATOL, &format!("{case}: ∂/∂{name}"));
                }
                assert_close(dt, dt_ref, RTOL, ATOL, &format!("{case}: ∂/∂dt"));
                assert_close(a, a_ref, RTOL, ATOL, &format!("{case}: ∂/∂A"));
                if let (Some(h0), Some(h0_ref)) = (h0, h0_ref) {
                    assert_close(h0, h0_ref, RTOL, ATOL, &format!("{case}: ∂/∂h0"));
                }
            }
        }
    }

    /// The skip `D x` inside the fused scan equals `y + D x` after the sequential form:
    /// output and the gradients of every input, D's included, with and without the final
    /// state kept.
    #[test]
    fn fused_skip_equals_the_sum_after() {
        let device = Device::flex().autodiff();
        device.seed(29);
        let normal = Distribution::Normal(0.0, 1.0);
        let calls = crate::mixers::selective_scan::FORWARD_CALLS.get();
        for (&(t, chunk, g, initial), keep_state) in
            CASES.iter().flat_map(|c| [(c, false), (c, true)])
        {
            let inputs = Inputs::random(t, g, &device).require_grad();
            let h = inputs.A.dims()[0];
            let d = Tensor::<1>::random([h], normal, &device).require_grad();
            let w = Tensor::<4>::random(inputs.x.dims(), normal, &device);
            let run = |fused: bool| {
                let (x, dt, A) = (inputs.x.clone(), inputs.dt.clone(), inputs.A.clone());
                let (B, C) = (inputs.B.clone(), inputs.C.clone());
                let h0 = initial.then(|| inputs.h0.clone());
                let y = if fused {
                    let kept = (h0, keep_state, Some(d.clone()));
                    ssd_fused_kept(x, dt, A, B, C, kept, chunk).0
                } else {
                    let (y, _) = ssd_sequential(x.clone(), dt, A, B, C, h0);
                    y + x * d.clone().reshape([1, 1, h, 1])
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                let g4 = |x: &Tensor<4>| x.grad(&grads).expect("leaf has a gradient");
                let leaves = [g4(&inputs.x), g4(&inputs.B), g4(&inputs.C)];
                let (g_dt, g_a) = (inputs.dt.grad(&grads), inputs.A.grad(&grads));
                (y.detach(), leaves, g_dt.unwrap(), g_a.unwrap(), d.grad(&grads).unwrap())
            };
            let (y, g4, g_dt, g_a, g_d) = run(true);
            let (y_ref, g4_ref, g_dt_ref, g_a_ref, g_d_ref) = run(false);
            let case = format!("t={t} ngroups={g} initial={initial} keep_state={keep_state}");
            assert_close(y, y_ref, RTOL, ATOL, &format!("{case}: y"));
            for ((actual, expected), name) in g4.into_iter().zip(g4_ref).zip(["x", "B", "C"]) {
                assert_close(actual, expected, RTOL, ATOL, &format!("{case}: ∂/∂{name}"));
            }
            assert_close(g_dt, g_dt_ref, RTOL, ATOL, &format!("{case}: ∂/∂dt"));
            assert_close(g_a, g_a_ref, RTOL, ATOL, &format!("{case}: ∂/∂A"));
            assert_close(g_d, g_d_ref, RTOL, ATOL, &format!("{case}: ∂/∂D"));
        }
        assert!(crate::mixers::selective_scan::FORWARD_CALLS.get() > calls);
    }

    /// The layer itself: decoding token by token, and the sequence in two pieces with the
    /// state passed between them, both give what `forward` gives; for both forms.
    #[test]
    fn step_and_state_passing_equal_forward() {
        let device = Device::flex();
        device.seed(11);
        let ctx = MixerContext::for_tests(16, 64);
        for form in [Mamba2Form::Fused, Mamba2Form::Chunked, Mamba2Form::Sequential] {
            let options = Mamba2Options {
                d_state: 4,
                headdim: 8,
                ngroups: 2,
                chunk_size: 4,
                form,
                ..Default::default()
            };
            options.validate(&ctx).unwrap();
            let mixer = Mamba2::init(&options, &ctx, &device);
            let t = 11;
            let x = Tensor::<3>::random([2, t, 16], Distribution::Normal(0.0, 1.0), &device);
            let y = mixer.forward(x.clone());

            let mut state = None;
            let mut steps = Vec::with_capacity(t);
            for i in 0..t {
                let (y, next) = mixer.step(x.clone().narrow(1, i, 1), state);
                state = Some(next);
                steps.push(y);
            }
            let what = format!("{form:?}: step by step");
            assert_close(Tensor::cat(steps, 1), y.clone(), RTOL, ATOL, &what);

            // 2 < d_conv − 1 = 3: the second piece's conv history reaches into the first.
            let (y0, s) = mixer.forward_from(x.clone().narrow(1, 0, 2), None);
            let (y1, _) = mixer.forward_from(x.narrow(1, 2, t - 2), Some(s));
            let what = format!("{form:?}: in two pieces");
            assert_close(Tensor::cat(vec![y0, y1], 1), y, RTOL, ATOL, &what);
        }
    }
}

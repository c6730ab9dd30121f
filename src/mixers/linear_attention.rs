//! Kernelised linear attention (Katharopoulos et al. 2020), with optional per-head decay
//! (RetNet's fixed γ, or a GLA-style learned gate):
//!
//! `S_t = γ_t S_{t-1} + φ(k_t) v_tᵀ`,  `o_t = φ(q_t)ᵀ S_t` (÷ `φ(q_t)ᵀ z_t` when normalised,
//! `z_t = γ_t z_{t-1} + φ(k_t)`).
//!
//! Three forms of the same function, as flash-linear-attention keeps them: the recurrent one
//! (a loop over time), the quadratic one (a decay-masked `QKᵀ`), and the chunkwise-parallel
//! one that trains (quadratic inside chunks, the recurrent state between them). All take
//! per-head log-decays `a_t = ln γ_t ≤ 0`, so decay products are sums of logs.
//!
//! The bidirectional (encoder) form sums over the whole sequence: the causal sum plus the
//! same recurrence run backwards, the query's own term counted once. With decay, the weight
//! of key s for query t is the product of the γ between them, read forwards for s ≤ t
//! (`γ_(s+1)…γ_t`) and backwards for s > t (`γ_t…γ_(s−1)`), as a forward and a reversed
//! scan give it (Hydra's quasiseparable form, Hwang et al. 2024, with shared parameters).
//! Normalised, numerator and normaliser are summed over both directions before dividing.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, relu};

use serde::{Deserialize, Serialize};

use super::decayed_scan::decayed_scan;
use super::fused_linear_attention::{self, linear_scan};
use super::{MixerContext, MixerOptions, ShardedForm, TokenMixer, normal_linear};
use crate::activations::elu_plus_one;
use crate::attention::{merge_heads, split_heads};
use crate::matmul::matmul;
use crate::mixed_precision::linear;
use crate::options::{OptionError, at_least_one};
use crate::padding::Padding;
use crate::parallel::state_passing::{Carry, pass_state};
use crate::parallel::{SequenceParallel, Transport};

/// Added to the normaliser so a near-zero denominator cannot blow up.
pub(crate) const NORM_EPS: f64 = 1e-6;
/// GLA's gate temperature: γ = sigmoid(·)^(1/16) keeps decays close to 1.
const GATE_TEMPERATURE: f64 = 16.0;

#[derive(Module, Debug)]
pub struct LinearAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    /// Present with `decay = "gated"`: x → one gate logit per head.
    pub gate_proj: Option<Linear>,
    n_heads: usize,
    /// Causal (a language model) or over the whole sequence (an encoder).
    causal: bool,
    #[module(skip)]
    options: LinearAttentionOptions,
}

/// Queries, keys (already feature-mapped), values and log-decays of one call, split by head:
/// q, k `[b, h, t, dk]`, v `[b, h, t, dv]`, log_decay `[b, h, t]` (all ≤ 0).
pub struct LinearInputs {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    pub log_decay: Tensor<3>,
}

impl LinearAttention {
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        split_heads(x, self.n_heads)
    }

    fn feature_map<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self.options.feature_map {
            FeatureMap::EluPlusOne => elu_plus_one(x),
            FeatureMap::Relu => relu(x),
            FeatureMap::Identity => x,
        }
    }

    /// Project, feature-map and compute the decays for `x` `[b, t, d]`. Padded positions
    /// get a zero key (they add nothing to any state or normaliser) and no decay (the state
    /// passes them unchanged).
    pub fn inputs(&self, x: Tensor<3>, padding: Option<&Padding>) -> LinearInputs {
        let [b, t, _] = x.dims();
        let h = self.n_heads;
        let device = x.device();
        let log_decay = match self.options.decay {
            DecayMode::None => Tensor::zeros([b, h, t], &device),
            DecayMode::Retnet => {
                let gammas: Vec<f32> = (0..h)
                    .map(|i| (1.0 - 2f64.powi(-5 - i as i32)).ln() as f32)
                    .collect();
                Tensor::<1>::from_data(TensorData::new(gammas, [h]), &device)
                    .reshape([1, h, 1])
                    .expand([b, h, t])
            }
            DecayMode::Gated => {
                let gate = self.gate_proj.as_ref().expect("gated decay has a gate");
                log_sigmoid(linear(gate, x.clone()))
                    .div_scalar(GATE_TEMPERATURE)
                    .swap_dims(1, 2)
            }
        };
        // The feature map runs before the head split, on the projection's contiguous output:
        // after it, its input is a strided view that flex copies on one thread, forward and
        // backward (perf: 2–4% of a linear-attention step), and the fused scan reads the
        // strided q and k in place either way.
        let mut k = self.split_heads(self.feature_map(linear(&self.k_proj, x.clone())));
        let mut log_decay = log_decay;
        if let Some(p) = padding {
            k = k * p.valid.clone().unsqueeze_dim::<3>(1).unsqueeze_dim(3);
            log_decay = log_decay * p.valid.clone().unsqueeze_dim(1);
        }
        LinearInputs {
            q: self.split_heads(self.feature_map(linear(&self.q_proj, x.clone()))),
            k,
            v: self.split_heads(linear(&self.v_proj, x)),
            log_decay,
        }
    }

    /// Mix with the configured form, causally or over the whole sequence.
    pub fn mix(&self, inputs: LinearInputs) -> Tensor<4> {
        let (normalize, chunk) = (self.options.normalize, self.options.chunk_size);
        let form = match self.options.form {
            LinearForm::Fused if !fused_linear_attention::available(&inputs) => {
                LinearForm::Chunkwise
            }
            form => form,
        };
        match (form, self.causal) {
            (LinearForm::Fused, true) => linear_scan(inputs, normalize),
            (LinearForm::Fused, false) => {
                bidirectional(inputs, normalize, |i| linear_scan(i, false))
            }
            (LinearForm::Chunkwise, true) => chunkwise(inputs, normalize, chunk),
            (LinearForm::Recurrent, true) => recurrent(inputs, normalize),
            (LinearForm::Quadratic, true) => quadratic(inputs, normalize),
            (LinearForm::Chunkwise, false) => {
                bidirectional(inputs, normalize, |i| chunkwise(i, false, chunk))
            }
            (LinearForm::Recurrent, false) => {
                bidirectional(inputs, normalize, |i| recurrent(i, false))
            }
            (LinearForm::Quadratic, false) => quadratic_bidirectional(inputs, normalize),
        }
    }
}

/// The recurrent state: `S = Σ γ·φ(k) vᵀ` `[b, h, dk, dv]` and `z = Σ γ·φ(k)` `[b, h, 1, dk]`.
#[derive(Clone, Debug)]
pub struct LinearState {
    pub s: Tensor<4>,
    pub z: Tensor<4>,
}

impl LinearState {
    pub fn zeros(b: usize, h: usize, dk: usize, dv: usize, device: &Device) -> Self {
        Self {
            s: Tensor::zeros([b, h, dk, dv], device),
            z: Tensor::zeros([b, h, 1, dk], device),
        }
    }
}

impl Carry for LinearState {
    fn send(self, transport: &dyn Transport, rank: usize) -> Self {
        Self {
            s: transport.send(self.s, rank),
            z: transport.send(self.z, rank),
        }
    }
}

impl TokenMixer for LinearAttention {
    type Options = LinearAttentionOptions;
    type State = LinearState;
    const SHARDED: ShardedForm = ShardedForm::StatePassing;

    fn init(options: &LinearAttentionOptions, ctx: &MixerContext, device: &Device) -> Self {
        let d = ctx.d_model;
        let gate_proj = (options.decay == DecayMode::Gated)
            .then(|| normal_linear(d, ctx.n_heads, true, ctx.init_std, device));
        LinearAttention {
            q_proj: normal_linear(d, d, ctx.bias, ctx.init_std, device),
            k_proj: normal_linear(d, d, ctx.bias, ctx.init_std, device),
            v_proj: normal_linear(d, d, ctx.bias, ctx.init_std, device),
            out_proj: normal_linear(d, d, ctx.bias, ctx.residual_init_std(), device),
            gate_proj,
            n_heads: ctx.n_heads,
            causal: ctx.causal,
            options: options.clone(),
        }
    }

    fn step(&self, x: Tensor<3>, state: Option<LinearState>) -> (Tensor<3>, LinearState) {
        let b = x.dims()[0];
        let i = self.inputs(x, None);
        let (dk, dv) = (i.q.dims()[3], i.v.dims()[3]);
        let state =
            state.unwrap_or_else(|| LinearState::zeros(b, self.n_heads, dk, dv, &i.q.device()));
        let (o, state) = recurrent_step(i.q, i.k, i.v, i.log_decay, self.options.normalize, state);
        (linear(&self.out_proj, merge_heads(o)), state)
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let o = self.mix(self.inputs(x, padding));
        (linear(&self.out_proj, merge_heads(o)), None)
    }

    /// LASP: the chunkwise form per chunk, the state `(S, z)` passed from rank to rank.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let ys = pass_state(xs, sp, |r, x, state| ranks[r].forward_from(x, state));
        (ys, None)
    }
}

impl LinearAttention {
    /// `forward` of positions that follow those summarised by `state`, and the state after.
    pub fn forward_from(
        &self,
        x: Tensor<3>,
        state: Option<LinearState>,
    ) -> (Tensor<3>, LinearState) {
        let o = &self.options;
        let (y, state) = chunkwise_from(self.inputs(x, None), o.normalize, o.chunk_size, state);
        (linear(&self.out_proj, merge_heads(y)), state)
    }
}

/// One step of the recurrence: q, k `[b, h, 1, dk]`, v `[b, h, 1, dv]`, log-decay `[b, h, 1]`.
pub fn recurrent_step(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    log_decay: Tensor<3>,
    normalize: bool,
    state: LinearState,
) -> (Tensor<4>, LinearState) {
    let gamma = log_decay.exp().unsqueeze_dim::<4>(3);
    let s = state.s * gamma.clone() + k.clone().transpose().matmul(v);
    let mut o = q.clone().matmul(s.clone());
    let z = if normalize {
        let z = state.z * gamma + k;
        o = o / (q * z.clone()).sum_dim(3).add_scalar(NORM_EPS);
        z
    } else {
        state.z
    };
    (o, LinearState { s, z })
}

/// Reference: the recurrence, one time step at a time.
pub fn recurrent(inputs: LinearInputs, normalize: bool) -> Tensor<4> {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let mut state = LinearState::zeros(b, h, dk, dv, &q.device());
    let mut outputs = Vec::with_capacity(t);
    for i in 0..t {
        let (o, next) = recurrent_step(
            q.clone().slice([0..b, 0..h, i..i + 1, 0..dk]),
            k.clone().slice([0..b, 0..h, i..i + 1, 0..dk]),
            v.clone().slice([0..b, 0..h, i..i + 1, 0..dv]),
            log_decay.clone().slice([0..b, 0..h, i..i + 1]),
            normalize,
            state,
        );
        state = next;
        outputs.push(o);
    }
    Tensor::cat(outputs, 2)
}

/// `exp(c_i − c_j)` for `j ≤ i`, 0 above the diagonal: the decay from step j to step i, from
/// cumulative log-decays `c` `[.., n]`. Differences are taken before `exp`, so it is stable.
fn decay_matrix<const D: usize, const D1: usize>(cum: Tensor<D>) -> Tensor<D1> {
    let n = cum.dims()[D - 1];
    let diff: Tensor<D1> = cum.clone().unsqueeze_dim(D) - cum.unsqueeze_dim(D - 1);
    let future = Tensor::<2, Bool>::tril_mask([n, n], 0, &diff.device());
    diff.mask_fill(future.unsqueeze::<D1>(), f32::NEG_INFINITY)
        .exp()
}

/// Reference: the masked quadratic form `(φ(Q)φ(K)ᵀ ⊙ D) V`.
pub fn quadratic(inputs: LinearInputs, normalize: bool) -> Tensor<4> {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let weights = q.matmul(k.transpose()) * decay_matrix::<3, 4>(log_decay.cumsum(2));
    let o = weights.clone().matmul(v);
    if normalize {
        o / weights.sum_dim(3).add_scalar(NORM_EPS)
    } else {
        o
    }
}

/// The bidirectional form from a causal one (`causal_form`, unnormalised): the causal sum,
/// plus the causal sum of the reversed sequence reversed back, minus the query's own term
/// counted by both. Normalised, the values carry a column of ones, whose output is the
/// normaliser `Σ_s w(t, s) q_t·k_s` over both directions.
pub fn bidirectional(
    inputs: LinearInputs,
    normalize: bool,
    causal_form: impl Fn(LinearInputs) -> Tensor<4>,
) -> Tensor<4> {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let [b, h, t, dv] = v.dims();
    let v = if normalize {
        Tensor::cat(vec![v, Tensor::ones([b, h, t, 1], &q.device())], 3)
    } else {
        v
    };
    let own = (q.clone() * k.clone()).sum_dim(3) * v.clone();
    let forward = causal_form(LinearInputs {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        log_decay: log_decay.clone(),
    });
    let backward = causal_form(LinearInputs {
        q: q.flip([2]),
        k: k.flip([2]),
        v: v.flip([2]),
        log_decay: log_decay.flip([2]),
    })
    .flip([2]);
    let o = forward + backward - own;
    if normalize {
        o.clone().narrow(3, 0, dv) / o.narrow(3, dv, 1).add_scalar(NORM_EPS)
    } else {
        o
    }
}

/// Reference of the bidirectional form: the full weight matrix `φ(Q)φ(K)ᵀ ⊙ W`, with
/// `W[t, s] = exp(c_t − c_s)` for s ≤ t and `exp(e_s − e_t)` for s > t, where `c` is the
/// inclusive and `e = c − a` the exclusive cumulative log-decay.
pub fn quadratic_bidirectional(inputs: LinearInputs, normalize: bool) -> Tensor<4> {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let t = q.dims()[2];
    let c = log_decay.clone().cumsum(2);
    let e = c.clone() - log_decay;
    let past = decay_matrix::<3, 4>(c);
    // exp(e_s − e_t) above the diagonal: the transpose of decay_matrix(e) without its diagonal.
    let future = decay_matrix::<3, 4>(e).swap_dims(2, 3);
    let eye = Tensor::<2>::eye(t, &q.device()).unsqueeze::<4>();
    let weights = q.matmul(k.transpose()) * (past + future - eye);
    let o = weights.clone().matmul(v);
    if normalize {
        o / weights.sum_dim(3).add_scalar(NORM_EPS)
    } else {
        o
    }
}

/// Fast form: chunks of `chunk` steps use the quadratic form inside and pass the recurrent
/// state `S` (and `z`) between them, so work is linear in sequence length.
pub fn chunkwise(inputs: LinearInputs, normalize: bool, chunk: usize) -> Tensor<4> {
    chunkwise_from(inputs, normalize, chunk, None).0
}

/// [`chunkwise`] continuing from `state` (the state after earlier positions; `None` = the
/// start), returning the state after the last position too.
pub fn chunkwise_from(
    inputs: LinearInputs,
    normalize: bool,
    chunk: usize,
    state: Option<LinearState>,
) -> (Tensor<4>, LinearState) {
    let LinearInputs { q, k, v, log_decay } = inputs;
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let c = chunk.min(t);
    let n = t.div_ceil(c);
    let pad = n * c - t;
    // Zero padding at the end: zero keys/values add nothing, zero log-decay decays nothing.
    let pad4 = |x: Tensor<4>, d: usize| {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([b, h, pad, d], &device)], 2)
        }
    };
    let q = pad4(q, dk).reshape([b, h, n, c, dk]);
    let k = pad4(k, dk).reshape([b, h, n, c, dk]);
    let v = pad4(v, dv).reshape([b, h, n, c, dv]);
    let a = if pad == 0 {
        log_decay
    } else {
        Tensor::cat(vec![log_decay, Tensor::zeros([b, h, pad], &device)], 2)
    }
    .reshape([b, h, n, c]);

    // Within each chunk: cumulative log-decay from the chunk's start.
    let cum = a.cumsum(3);
    let last = cum.clone().slice([0..b, 0..h, 0..n, c - 1..c]); // [b, h, n, 1]
    let intra = matmul(q.clone(), k.clone().swap_dims(3, 4)) * decay_matrix::<4, 5>(cum.clone());

    // What each chunk adds to the state, decayed to the chunk's end.
    let k_to_end = k * (last.clone() - cum.clone()).exp().unsqueeze_dim::<5>(4);
    let chunk_state = matmul(k_to_end.clone().swap_dims(3, 4), v.clone()); // [b, h, n, dk, dv]
    let chunk_z = k_to_end.sum_dim(3); // [b, h, n, 1, dk]
    let chunk_decay = last.exp().unsqueeze_dim::<5>(4); // [b, h, n, 1, 1]

    // The state entering each chunk: one scan over chunks of S and z side by side, every
    // entry decayed by its chunk's decay (a scan, not a loop of slices, so the backward
    // stays linear in the number of chunks).
    let init = state.unwrap_or_else(|| LinearState::zeros(b, h, dk, dv, &device));
    let (bh, ds) = (b * h, dk * dv);
    let added = Tensor::cat(
        vec![chunk_state.reshape([bh, n, ds]), chunk_z.reshape([bh, n, dk])],
        2,
    );
    let decay = chunk_decay.reshape([bh, n, 1]).expand([bh, n, ds + dk]);
    let start = Tensor::cat(vec![init.s.reshape([bh, ds]), init.z.reshape([bh, dk])], 1);
    let after = decayed_scan(decay, added, start.clone()); // after each chunk
    let entering = if n > 1 {
        Tensor::cat(
            vec![start.unsqueeze_dim::<3>(1), after.clone().narrow(1, 0, n - 1)],
            1,
        )
    } else {
        start.unsqueeze_dim::<3>(1)
    };
    let last = after.narrow(1, n - 1, 1);
    let s = last.clone().narrow(2, 0, ds).reshape([b, h, dk, dv]);
    let z = last.narrow(2, ds, dk).reshape([b, h, 1, dk]);
    let s_in = entering.clone().narrow(2, 0, ds).reshape([b, h, n, dk, dv]);
    let z_in = entering.narrow(2, ds, dk).reshape([b, h, n, 1, dk]);
    let q_decayed = q * cum.exp().unsqueeze_dim::<5>(4);
    let mut o = matmul(intra.clone(), v) + matmul(q_decayed.clone(), s_in);
    if normalize {
        let den = intra.sum_dim(4) + (q_decayed * z_in).sum_dim(4);
        o = o / den.add_scalar(NORM_EPS);
    }
    // Padding decays nothing and adds nothing, so the state after it is the final one.
    let o = o
        .reshape([b, h, n * c, dv])
        .slice([0..b, 0..h, 0..t, 0..dv]);
    (o, LinearState { s, z })
}

/// `[model.linear]`: kernelised linear attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearAttentionOptions {
    pub feature_map: FeatureMap,
    /// Divide by φ(q)ᵀΣφ(k) (Katharopoulos et al.); off is RetNet/GLA style.
    pub normalize: bool,
    pub decay: DecayMode,
    /// Which form trains: `fused` (fast on flex), `chunkwise` (fast elsewhere), `recurrent`
    /// or `quadratic` (references).
    pub form: LinearForm,
    pub chunk_size: usize,
}

impl Default for LinearAttentionOptions {
    fn default() -> Self {
        Self {
            feature_map: FeatureMap::EluPlusOne,
            normalize: true,
            decay: DecayMode::None,
            form: LinearForm::Fused,
            chunk_size: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    /// elu(x) + 1 (Katharopoulos et al. 2020).
    EluPlusOne,
    Relu,
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayMode {
    /// Plain cumulative sum: S_t = S_{t-1} + φ(k_t) v_tᵀ.
    None,
    /// RetNet's fixed per-head γ_h = 1 − 2^(−5−h).
    Retnet,
    /// A learned, data-dependent per-head gate, as in GLA: γ_t = sigmoid(w·x_t + b)^(1/16).
    Gated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearForm {
    /// The recurrence as one extension on flex in f32 ([`super::fused_linear_attention`]),
    /// the chunkwise form elsewhere.
    Fused,
    Chunkwise,
    Recurrent,
    Quadratic,
}

impl MixerOptions for LinearAttentionOptions {
    const TRAINING_ONLY: &'static [&'static str] = &["form", "chunk_size"];

    fn conventions(&self, ctx: &MixerContext) -> Vec<String> {
        let hd = ctx.head_dim();
        let phi = match self.feature_map {
            FeatureMap::EluPlusOne => "φ(x) = elu(x) + 1",
            FeatureMap::Relu => "φ(x) = relu(x)",
            FeatureMap::Identity => "φ(x) = x",
        };
        let mut rules = vec![
            format!(
                "q = φ(q_proj(x)), k = φ(k_proj(x)), v = v_proj(x), each viewed as [t, n_heads = {}, \
                 head_dim = {hd}] (head h is columns h·{hd}..(h+1)·{hd}); {phi}",
                ctx.n_heads
            ),
            "per head: S_t = g_t·S_(t−1) + k_t v_tᵀ (S_0 = 0, [head_dim, head_dim]), \
             o_t = q_tᵀ S_t"
                .to_string(),
        ];
        if self.normalize {
            rules.push(format!(
                "normalised: o_t / (q_t·z_t + {NORM_EPS:e}), z_t = g_t·z_(t−1) + k_t (z_0 = 0): \
                 the normaliser decays with the same g"
            ));
        }
        rules.push(match self.decay {
            DecayMode::None => "g_t = 1 (no decay)".to_string(),
            DecayMode::Retnet => {
                "g = 1 − 2^(−5−h) for head h = 0..n_heads−1, the same at every step (RetNet)"
                    .to_string()
            }
            DecayMode::Gated => format!(
                "g_t = sigmoid(gate_proj(x_t))^(1/{GATE_TEMPERATURE}), one per head; gate_proj \
                 always has a bias (GLA's gate)"
            ),
        });
        rules.push("o of every head concatenated in head order → out_proj".to_string());
        rules.push(super::bias_convention(
            "q_proj, k_proj, v_proj and out_proj",
            ctx.bias,
        ));
        rules
    }

    fn validate(&self, _ctx: &MixerContext) -> Result<(), OptionError> {
        at_least_one(&[("chunk_size", self.chunk_size)])
    }
}

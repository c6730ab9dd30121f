//! Mixture-of-head attention (Jin et al. 2024, "MoH: Multi-Head Attention as
//! Mixture-of-Head Attention"): causal softmax attention whose heads are weighted per token.
//! `shared_heads` heads are always on; each token routes to `top_k` of the remaining
//! `routed` heads. Gates are two-stage:
//!
//! `g_i = α₁ · softmax(W_s x)_i` for shared heads,
//! `g_i = α₂ · softmax(W_r x)_i` for routed heads in the token's top-k (0 otherwise),
//! `[α₁, α₂] = softmax(W_h x)`,
//!
//! and the output is `out_proj(concat_i g_i · head_i)`. The load-balance loss over routed
//! heads is `L_b = Σ_i f_i P_i`, with `f_i` the fraction of tokens that select head i and
//! `P_i` the mean routing probability `softmax(W_r x)_i`; the trainer adds it times
//! `[model.moh] aux_loss_coef`.

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use super::softmax_attention::{KvCache, SoftmaxAttention, SoftmaxOptions};
use super::{MixerContext, MixerOptions, ShardedForm, TokenMixer, normal_linear};
use crate::padding::Padding;
use crate::mixed_precision::linear;
use crate::options::{OptionError, fail, non_negative};
use crate::parallel::SequenceParallel;

#[derive(Module, Debug)]
pub struct Moh {
    /// The heads themselves: softmax attention's projections, RoPE, grouped KV heads,
    /// window and forms (`[model.moh.attention]`).
    pub attention: SoftmaxAttention,
    /// x → logits over the shared heads (absent with no shared heads).
    pub shared_router: Option<Linear>,
    /// x → logits over the routed heads (absent with no routed heads).
    pub routed_router: Option<Linear>,
    /// x → [α₁, α₂] logits (absent unless both kinds of heads exist).
    pub head_type_router: Option<Linear>,
    top_k: usize,
    aux_loss_coef: f64,
}

/// Per-token head gates `[b, heads, t, 1]` and the load-balance loss of the routed heads,
/// with the token sums it is made of (a sharded sequence adds them up across ranks).
pub struct Gates {
    pub gates: Tensor<4>,
    pub balance_loss: Option<Tensor<1>>,
    pub balance_sums: Option<BalanceSums>,
}

/// Over some tokens: how often each routed head was selected, its summed router
/// probability `[routed]`, and the token count.
#[derive(Clone, Debug)]
pub struct BalanceSums {
    pub selected: Tensor<1>,
    pub probs: Tensor<1>,
    pub tokens: usize,
}

impl BalanceSums {
    pub fn of(probs: Tensor<3>, selected: Tensor<3, Bool>) -> Self {
        let [b, t, n] = probs.dims();
        Self {
            selected: selected.float().reshape([b * t, n]).sum_dim(0).reshape([n]),
            probs: probs.reshape([b * t, n]).sum_dim(0).reshape([n]),
            tokens: b * t,
        }
    }

    /// `L_b = Σ_i f_i P_i` (see [`load_balance_loss`]).
    pub fn loss(&self) -> Tensor<1> {
        let tokens = self.tokens as f64;
        (self.selected.clone().div_scalar(tokens) * self.probs.clone().div_scalar(tokens)).sum()
    }
}

impl std::ops::Add for BalanceSums {
    type Output = Self;
    fn add(self, other: BalanceSums) -> Self {
        Self {
            selected: self.selected + other.selected,
            probs: self.probs + other.probs,
            tokens: self.tokens + other.tokens,
        }
    }
}

impl Moh {
    /// The two-stage gates of every head for `x` `[b, t, d]`.
    pub fn gates(&self, x: Tensor<3>) -> Gates {
        let [b, t, _] = x.dims();
        let (alpha_shared, alpha_routed) = match &self.head_type_router {
            Some(r) => {
                let alpha = softmax(linear(r, x.clone()), 2);
                (
                    Some(alpha.clone().slice([0..b, 0..t, 0..1])),
                    Some(alpha.slice([0..b, 0..t, 1..2])),
                )
            }
            None => (None, None),
        };
        let mut parts = Vec::new();
        if let Some(r) = &self.shared_router {
            let g = softmax(linear(r, x.clone()), 2);
            parts.push(match alpha_shared {
                Some(a) => g * a,
                None => g,
            });
        }
        let mut balance_sums = None;
        if let Some(r) = &self.routed_router {
            let probs = softmax(linear(r, x), 2); // [b, t, routed]
            let selected = top_k_mask(probs.clone(), self.top_k);
            balance_sums = Some(BalanceSums::of(probs.clone(), selected.clone()));
            let g = probs * selected.float();
            parts.push(match alpha_routed {
                Some(a) => g * a,
                None => g,
            });
        }
        let gates = Tensor::cat(parts, 2).swap_dims(1, 2).unsqueeze_dim::<4>(3);
        Gates {
            gates,
            balance_loss: balance_sums.as_ref().map(BalanceSums::loss),
            balance_sums,
        }
    }

    /// Forward pass and the load-balance loss (weighted by `aux_loss_coef`).
    pub fn forward_with_balance(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let Gates {
            gates,
            balance_loss,
            ..
        } = self.gates(x.clone());
        let heads = self.attention.heads(x, padding) * gates;
        let aux = balance_loss.map(|l| l.mul_scalar(self.aux_loss_coef));
        (self.attention.project_out(heads), aux)
    }
}

/// Which of `probs` `[b, t, n]` are among each token's `k` largest (ties broken upward,
/// which continuous router outputs make measure-zero).
pub fn top_k_mask(probs: Tensor<3>, k: usize) -> Tensor<3, Bool> {
    let kth = probs.clone().topk(k, 2).min_dim(2); // [b, t, 1]
    probs.greater_equal(kth)
}

/// `L_b = Σ_i f_i P_i` over routed heads, with `f_i` the fraction of tokens whose top-k
/// contains head i and `P_i` the mean of `softmax(W_r x)_i` over tokens.
pub fn load_balance_loss(probs: Tensor<3>, selected: Tensor<3, Bool>) -> Tensor<1> {
    BalanceSums::of(probs, selected).loss()
}

impl TokenMixer for Moh {
    type Options = MohOptions;
    type State = KvCache;
    const SHARDED: ShardedForm = ShardedForm::Ring;

    fn init(o: &MohOptions, ctx: &MixerContext, device: &Device) -> Self {
        let d = ctx.d_model;
        let shared = o.shared_heads;
        let routed = ctx.n_heads - shared;
        let router = |n: usize| (n > 0).then(|| normal_linear(d, n, false, ctx.init_std, device));
        Moh {
            attention: SoftmaxAttention::init(&o.attention, ctx, device),
            shared_router: router(shared),
            routed_router: router(routed),
            head_type_router: (shared > 0 && routed > 0).then(|| router(2).expect("2 > 0")),
            top_k: o.top_k.min(routed),
            aux_loss_coef: o.aux_loss_coef,
        }
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        self.forward_with_balance(x, padding)
    }

    /// Ring attention over every head; the gates are per token, and the load-balance sums
    /// are added up across ranks (on rank 0) before the loss is formed.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let mut gates = Vec::new();
        let mut sums: Option<BalanceSums> = None;
        for (m, x) in ranks.iter().zip(&xs) {
            let g = m.gates(x.clone());
            gates.push(g.gates);
            if let Some(s) = g.balance_sums {
                let s = BalanceSums {
                    selected: sp.transport.send(s.selected, 0),
                    probs: sp.transport.send(s.probs, 0),
                    tokens: s.tokens,
                };
                sums = Some(match sums {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
        let attention: Vec<&SoftmaxAttention> = ranks.iter().map(|m| &m.attention).collect();
        let ys = SoftmaxAttention::heads_sharded(&attention, xs, sp)
            .into_iter()
            .zip(gates)
            .enumerate()
            .map(|(r, (heads, g))| ranks[r].attention.project_out(heads * g))
            .collect();
        let aux = sums.map(|s| s.loss().mul_scalar(ranks[0].aux_loss_coef));
        (ys, aux)
    }

    fn step(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let gates = self.gates(x.clone()).gates;
        let (heads, cache) = self.attention.step_heads(x, cache);
        (self.attention.project_out(heads * gates), cache)
    }

    fn max_seq_len(&self) -> Option<usize> {
        self.attention.max_seq_len()
    }
}

/// `[model.moh]`: mixture-of-head attention (uses `n_heads` heads in all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MohOptions {
    /// Heads every token uses.
    pub shared_heads: usize,
    /// Routed heads each token picks (of n_heads − shared_heads).
    pub top_k: usize,
    /// Weight of the load-balance loss in the training loss.
    pub aux_loss_coef: f64,
    /// The attention the heads compute: `[model.moh.attention]`, the keys of
    /// `[model.softmax]` (grouped KV heads, RoPE, window, tiled form).
    pub attention: SoftmaxOptions,
}

impl Default for MohOptions {
    fn default() -> Self {
        Self {
            shared_heads: 2,
            top_k: 1,
            aux_loss_coef: 0.01,
            attention: SoftmaxOptions::default(),
        }
    }
}

impl MixerOptions for MohOptions {
    const TRAINING_ONLY: &'static [&'static str] =
        &["aux_loss_coef", "attention.tiled", "attention.block_size"];

    fn resolved(&self, ctx: &MixerContext) -> Self {
        Self {
            attention: self.attention.resolved(ctx),
            ..self.clone()
        }
    }

    fn conventions(&self, ctx: &MixerContext) -> Vec<String> {
        let (n, shared) = (ctx.n_heads, self.shared_heads);
        let routed = n - shared;
        let mut rules = vec![format!(
            "mixture-of-head attention (Jin et al. 2024): causal softmax attention whose heads \
             are each scaled by a per-token gate before attention.out_proj; heads 0..{shared} are \
             shared (every token), heads {shared}..{n} routed"
        )];
        rules.extend(self.attention.attention_conventions(ctx, "attention."));
        if shared > 0 {
            rules.push(
                "shared gates = softmax(shared_router(x)) over the shared heads".to_string(),
            );
        }
        if routed > 0 {
            rules.push(format!(
                "routed gates = softmax(routed_router(x)) over the routed heads, kept where ≥ the \
                 {}-th largest of the token's (ties kept), 0 elsewhere, not renormalised",
                self.top_k.min(routed)
            ));
        }
        if shared > 0 && routed > 0 {
            rules.push(
                "[α1, α2] = softmax(head_type_router(x)); shared gates × α1, routed gates × α2"
                    .to_string(),
            );
        }
        rules.push("the routers have no biases whatever model.bias".to_string());
        rules
    }

    fn validate(&self, ctx: &MixerContext) -> Result<(), OptionError> {
        let n = ctx.n_heads;
        if self.shared_heads > n {
            return fail(
                "shared_heads",
                format!("{} is more than n_heads = {n}", self.shared_heads),
            );
        }
        let routed = n - self.shared_heads;
        if routed > 0 && !(1..=routed).contains(&self.top_k) {
            return fail(
                "top_k",
                format!(
                    "{} is not in 1..={routed} (the routed heads: n_heads {n} − shared_heads {})",
                    self.top_k, self.shared_heads
                ),
            );
        }
        if !non_negative(self.aux_loss_coef) {
            return fail("aux_loss_coef", "must be >= 0");
        }
        self.attention
            .validate(ctx)
            .map_err(|e| e.within("attention"))
    }
}

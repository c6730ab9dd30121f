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

use super::softmax_attention::{KvCache, SoftmaxAttention, attend_tiled};
use super::{TokenMixer, normal_linear};
use crate::mixed_precision::linear;
use crate::parallel::SequenceParallel;
use crate::parallel::ring_attention::{Visibility, ring_attention};
use crate::recipe::MohOptions;

#[derive(Debug, Clone)]
pub struct MohConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub bias: bool,
    pub init_std: f64,
    pub out_init_std: f64,
    pub options: MohOptions,
    /// Key block of the tiled attention form; 0 = naive.
    pub block_size: usize,
}

#[derive(Module, Debug)]
pub struct Moh {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    /// x → logits over the shared heads (absent with no shared heads).
    pub shared_router: Option<Linear>,
    /// x → logits over the routed heads (absent with no routed heads).
    pub routed_router: Option<Linear>,
    /// x → [α₁, α₂] logits (absent unless both kinds of heads exist).
    pub head_type_router: Option<Linear>,
    n_heads: usize,
    shared_heads: usize,
    top_k: usize,
    block_size: usize,
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

impl MohConfig {
    pub fn init(&self, device: &Device) -> Moh {
        let d = self.d_model;
        let shared = self.options.shared_heads;
        let routed = self.n_heads - shared;
        let router = |n: usize| (n > 0).then(|| normal_linear(d, n, false, self.init_std, device));
        Moh {
            q_proj: normal_linear(d, d, self.bias, self.init_std, device),
            k_proj: normal_linear(d, d, self.bias, self.init_std, device),
            v_proj: normal_linear(d, d, self.bias, self.init_std, device),
            out_proj: normal_linear(d, d, self.bias, self.out_init_std, device),
            shared_router: router(shared),
            routed_router: router(routed),
            head_type_router: (shared > 0 && routed > 0).then(|| router(2).expect("2 > 0")),
            n_heads: self.n_heads,
            shared_heads: shared,
            top_k: self.options.top_k.min(routed),
            block_size: self.block_size,
        }
    }
}

impl Moh {
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, self.n_heads, d / self.n_heads])
            .swap_dims(1, 2)
    }

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

    /// Forward pass and the load-balance loss.
    pub fn forward_with_balance(&self, x: Tensor<3>) -> (Tensor<3>, Option<Tensor<1>>) {
        let [b, t, d] = x.dims();
        let Gates {
            gates,
            balance_loss,
            ..
        } = self.gates(x.clone());
        let q = self.split_heads(linear(&self.q_proj, x.clone()));
        let k = self.split_heads(linear(&self.k_proj, x.clone()));
        let v = self.split_heads(linear(&self.v_proj, x));
        let no_dropout = burn::nn::DropoutConfig::new(0.0).init();
        let heads = if self.block_size > 0 {
            attend_tiled(q, k, v, self.block_size, 0)
        } else {
            SoftmaxAttention::attend_naive(q, k, v, 0, &no_dropout)
        };
        let y = (heads * gates).swap_dims(1, 2).reshape([b, t, d]);
        (linear(&self.out_proj, y), balance_loss)
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
    type State = KvCache;

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_balance(x).0
    }

    fn forward_with_aux(&self, x: Tensor<3>) -> (Tensor<3>, Option<Tensor<1>>) {
        self.forward_with_balance(x)
    }

    /// Ring attention over every head; the gates are per token, and the load-balance sums
    /// are added up across ranks (on rank 0) before the loss is formed.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let dims: Vec<[usize; 3]> = xs.iter().map(|x| x.dims()).collect();
        let (mut q, mut k, mut v, mut gates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut sums: Option<BalanceSums> = None;
        for (m, x) in ranks.iter().zip(xs) {
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
            q.push(m.split_heads(linear(&m.q_proj, x.clone())));
            k.push(m.split_heads(linear(&m.k_proj, x.clone())));
            v.push(m.split_heads(linear(&m.v_proj, x)));
        }
        let visibility = Visibility {
            causal: true,
            window: 0,
        };
        let ys = ring_attention(q, k, v, visibility, sp)
            .into_iter()
            .zip(gates)
            .zip(dims)
            .enumerate()
            .map(|(r, ((heads, g), [b, t, d]))| {
                linear(
                    &ranks[r].out_proj,
                    (heads * g).swap_dims(1, 2).reshape([b, t, d]),
                )
            })
            .collect();
        (ys, sums.map(|s| s.loss()))
    }

    fn step(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let [b, t, d] = x.dims();
        let gates = self.gates(x.clone()).gates;
        let q = self.split_heads(linear(&self.q_proj, x.clone()));
        let k = self.split_heads(linear(&self.k_proj, x.clone()));
        let v = self.split_heads(linear(&self.v_proj, x));
        let position = cache.as_ref().map_or(0, |c| c.position) + t;
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        let head_dim = d / self.n_heads;
        let scores = q
            .matmul(k.clone().transpose())
            .mul_scalar(1.0 / (head_dim as f64).sqrt());
        let heads = softmax(scores, 3).matmul(v.clone());
        let y = (heads * gates).swap_dims(1, 2).reshape([b, t, d]);
        (linear(&self.out_proj, y), KvCache { k, v, position })
    }
}

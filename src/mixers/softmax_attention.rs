//! Causal multi-head softmax attention (Vaswani et al.; GPT-2's `CausalSelfAttention`).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::{TokenMixer, normal_linear};
use crate::recipe::SoftmaxOptions;

/// Options of [`SoftmaxAttention`].
#[derive(Debug, Clone)]
pub struct SoftmaxAttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub bias: bool,
    pub dropout: f64,
    pub init_std: f64,
    /// Init std of `out_proj`, which writes into the residual stream.
    pub out_init_std: f64,
    pub options: SoftmaxOptions,
}

#[derive(Module, Debug)]
pub struct SoftmaxAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
    n_heads: usize,
    /// Key/query block of the tiled form; 0 = the naive form.
    block_size: usize,
}

impl SoftmaxAttentionConfig {
    pub fn init(&self, device: &Device) -> SoftmaxAttention {
        let d = self.d_model;
        SoftmaxAttention {
            q_proj: normal_linear(d, d, self.bias, self.init_std, device),
            k_proj: normal_linear(d, d, self.bias, self.init_std, device),
            v_proj: normal_linear(d, d, self.bias, self.init_std, device),
            out_proj: normal_linear(d, d, self.bias, self.out_init_std, device),
            attn_dropout: DropoutConfig::new(self.dropout).init(),
            resid_dropout: DropoutConfig::new(self.dropout).init(),
            n_heads: self.n_heads,
            block_size: if self.options.tiled {
                self.options.block_size
            } else {
                0
            },
        }
    }
}

impl SoftmaxAttention {
    /// `[b, t, d]` → `[b, heads, t, head_dim]`
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, self.n_heads, d / self.n_heads])
            .swap_dims(1, 2)
    }

    /// The reference form: materialise the `[t, t]` score matrix, mask the future, softmax.
    pub fn attend_naive(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, dropout: &Dropout) -> Tensor<4> {
        let [_, _, t, head_dim] = q.dims();
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = q.matmul(k.transpose()).mul_scalar(scale);
        // tril_mask is true strictly above the diagonal: the future.
        let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &scores.device());
        let scores = scores.mask_fill(future.unsqueeze::<4>(), f32::NEG_INFINITY);
        let weights = dropout.forward(softmax(scores, 3));
        weights.matmul(v)
    }
}

/// Keys and values of every token so far, `[b, heads, t, head_dim]`.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Tensor<4>,
    pub v: Tensor<4>,
}

impl TokenMixer for SoftmaxAttention {
    type State = KvCache;

    fn step(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let [b, t, d] = x.dims();
        let q = self.split_heads(self.q_proj.forward(x.clone()));
        let k = self.split_heads(self.k_proj.forward(x.clone()));
        let v = self.split_heads(self.v_proj.forward(x));
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        // The new token is the last: every cached key is in its past, so no mask.
        let head_dim = d / self.n_heads;
        let scores = q
            .matmul(k.clone().transpose())
            .mul_scalar(1.0 / (head_dim as f64).sqrt());
        let y = softmax(scores, 3).matmul(v.clone());
        let y = self.out_proj.forward(y.swap_dims(1, 2).reshape([b, t, d]));
        (y, KvCache { k, v })
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let q = self.split_heads(self.q_proj.forward(x.clone()));
        let k = self.split_heads(self.k_proj.forward(x.clone()));
        let v = self.split_heads(self.v_proj.forward(x));
        let y = if self.block_size > 0 {
            // Attention dropout needs the full weight matrix, which the tiled form never builds.
            attend_tiled(q, k, v, self.block_size)
        } else {
            Self::attend_naive(q, k, v, &self.attn_dropout)
        };
        let y = y.swap_dims(1, 2).reshape([b, t, d]);
        self.resid_dropout.forward(self.out_proj.forward(y))
    }
}

/// The memory-efficient form (FlashAttention's algorithm, in tensor ops): queries and keys
/// in blocks of `block`; each query block streams over the key blocks up to the diagonal
/// (later ones are all future and skipped), keeping a running max `m`, normaliser `l` and
/// unnormalised output, rescaled whenever the max grows. Scores exist one block pair at a
/// time, so memory grows linearly with sequence length.
pub fn attend_tiled(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, block: usize) -> Tensor<4> {
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let scale = 1.0 / (dk as f64).sqrt();
    let mut outputs = Vec::with_capacity(t.div_ceil(block));
    for q0 in (0..t).step_by(block) {
        let q1 = (q0 + block).min(t);
        let q_blk = q
            .clone()
            .slice([0..b, 0..h, q0..q1, 0..dk])
            .mul_scalar(scale);
        let mut m = Tensor::<4>::full([b, h, q1 - q0, 1], f32::NEG_INFINITY, &device);
        let mut l = Tensor::<4>::zeros([b, h, q1 - q0, 1], &device);
        let mut acc = Tensor::<4>::zeros([b, h, q1 - q0, dv], &device);
        // Key block 0 comes first and every query sees key 0, so `m` is finite after it.
        for k0 in (0..q1).step_by(block) {
            let k1 = (k0 + block).min(q1);
            let k_blk = k.clone().slice([0..b, 0..h, k0..k1, 0..dk]);
            let v_blk = v.clone().slice([0..b, 0..h, k0..k1, 0..dv]);
            let mut scores = q_blk.clone().matmul(k_blk.transpose());
            if k1 > q0 + 1 {
                // The block touches the diagonal: mask key j > query i.
                let future = causal_block_mask(q0, q1, k0, k1, &device);
                scores = scores.mask_fill(future, f32::NEG_INFINITY);
            }
            let m_new = m.clone().max_pair(scores.clone().max_dim(3));
            let p = (scores - m_new.clone()).exp();
            let correction = (m - m_new.clone()).exp();
            l = l * correction.clone() + p.clone().sum_dim(3);
            acc = acc * correction + p.matmul(v_blk);
            m = m_new;
        }
        outputs.push(acc / l);
    }
    Tensor::cat(outputs, 2)
}

/// True where key position (k0 + j) lies after query position (q0 + i).
fn causal_block_mask(
    q0: usize,
    q1: usize,
    k0: usize,
    k1: usize,
    device: &Device,
) -> Tensor<4, Bool> {
    let qi = Tensor::<1, Int>::arange(q0 as i64..q1 as i64, device).reshape([q1 - q0, 1]);
    let kj = Tensor::<1, Int>::arange(k0 as i64..k1 as i64, device).reshape([1, k1 - k0]);
    kj.greater(qi).unsqueeze::<4>()
}

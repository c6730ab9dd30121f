//! Causal multi-head softmax attention (Vaswani et al.; GPT-2's `CausalSelfAttention`).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::{TokenMixer, normal_linear};

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

impl TokenMixer for SoftmaxAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let q = self.split_heads(self.q_proj.forward(x.clone()));
        let k = self.split_heads(self.k_proj.forward(x.clone()));
        let v = self.split_heads(self.v_proj.forward(x));
        let y = Self::attend_naive(q, k, v, &self.attn_dropout);
        let y = y.swap_dims(1, 2).reshape([b, t, d]);
        self.resid_dropout.forward(self.out_proj.forward(y))
    }
}

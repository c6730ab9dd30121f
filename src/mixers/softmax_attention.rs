//! Causal multi-head softmax attention (Vaswani et al.; GPT-2's `CausalSelfAttention`), with
//! grouped-query attention (`n_kv_heads` < `n_heads` key/value heads, each shared by a group
//! of query heads), optional rotary positions (RoPE, interleaved pairs as in the original
//! LLaMA code) and an optional sliding window (each query sees its last `window` keys).
//!
//! Two forms: the naive one materialises the `[t, t]` score matrix; the tiled one streams
//! key blocks with an online softmax, so memory grows linearly with sequence length.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, RotaryEncoding, RotaryEncodingConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::{TokenMixer, normal_linear};
use crate::mixed_precision::linear;
use crate::parallel::SequenceParallel;
use crate::parallel::ring_attention::ring_attention;
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
    /// Longest sequence (sizes the rotary table).
    pub max_seq_len: usize,
    pub options: SoftmaxOptions,
}

#[derive(Module, Debug)]
pub struct SoftmaxAttention {
    pub q_proj: Linear,
    /// `d_model → n_kv_heads · head_dim`.
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    rope: Option<RotaryEncoding>,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
    n_heads: usize,
    n_kv_heads: usize,
    /// Key/query block of the tiled form; 0 = the naive form.
    block_size: usize,
    /// Keys each query sees, itself included; 0 = all.
    window: usize,
}

impl SoftmaxAttentionConfig {
    pub fn init(&self, device: &Device) -> SoftmaxAttention {
        let d = self.d_model;
        let o = &self.options;
        let n_kv_heads = if o.n_kv_heads == 0 {
            self.n_heads
        } else {
            o.n_kv_heads
        };
        let head_dim = d / self.n_heads;
        let d_kv = n_kv_heads * head_dim;
        SoftmaxAttention {
            q_proj: normal_linear(d, d, self.bias, self.init_std, device),
            k_proj: normal_linear(d, d_kv, self.bias, self.init_std, device),
            v_proj: normal_linear(d, d_kv, self.bias, self.init_std, device),
            out_proj: normal_linear(d, d, self.bias, self.out_init_std, device),
            rope: o.rotary.then(|| {
                RotaryEncodingConfig::new(self.max_seq_len, head_dim)
                    .with_theta(o.rope_theta as f32)
                    .init(device)
            }),
            attn_dropout: DropoutConfig::new(self.dropout).init(),
            resid_dropout: DropoutConfig::new(self.dropout).init(),
            n_heads: self.n_heads,
            n_kv_heads,
            block_size: if o.tiled { o.block_size } else { 0 },
            window: o.window,
        }
    }
}

/// Keys and values so far, `[b, n_kv_heads, cached, head_dim]` (at most `window` of them),
/// and the position of the next token.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    pub position: usize,
}

impl SoftmaxAttention {
    /// `[b, t, heads · head_dim]` → `[b, heads, t, head_dim]`
    fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, heads, d / heads]).swap_dims(1, 2)
    }

    /// Queries, keys and values of `x`, rotated from position `start` when RoPE is on.
    fn qkv(&self, x: Tensor<3>, start: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let q = Self::split_heads(linear(&self.q_proj, x.clone()), self.n_heads);
        let k = Self::split_heads(linear(&self.k_proj, x.clone()), self.n_kv_heads);
        let v = Self::split_heads(linear(&self.v_proj, x), self.n_kv_heads);
        match &self.rope {
            Some(rope) => (rope.apply(q, start), rope.apply(k, start), v),
            None => (q, k, v),
        }
    }

    /// Queries, keys and values of rank `rank`'s shard, each chunk rotated from its global
    /// start.
    pub fn qkv_sharded(
        &self,
        x: Tensor<3>,
        rank: usize,
        sp: &SequenceParallel,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (c, x) in sp.layout.split_shard(rank, x, 1) {
            let (q, k, v) = self.qkv(x, sp.layout.chunk_positions(c).start);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        (Tensor::cat(qs, 2), Tensor::cat(ks, 2), Tensor::cat(vs, 2))
    }

    /// The reference form: materialise the `[t, t]` score matrix, mask what a query may not
    /// see (the future, and keys `window` or more steps back), softmax.
    pub fn attend_naive(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        window: usize,
        dropout: &Dropout,
    ) -> Tensor<4> {
        let [_, _, t, head_dim] = q.dims();
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = q.matmul(k.transpose()).mul_scalar(scale);
        let visibility = Visibility {
            causal: true,
            window,
        };
        let scores = match visibility.mask((0, t), (0, t), &scores.device()) {
            Some(hidden) => scores.mask_fill(hidden, f32::NEG_INFINITY),
            None => scores, // a single token
        };
        dropout.forward(softmax(scores, 3)).matmul(v)
    }
}

impl TokenMixer for SoftmaxAttention {
    type State = KvCache;

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let (q, k, v) = self.qkv(x, 0);
        let groups = self.n_heads / self.n_kv_heads;
        let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
        let y = if self.block_size > 0 {
            // Attention dropout needs the full weight matrix, which the tiled form never builds.
            attend_tiled(q, k, v, self.block_size, self.window)
        } else {
            Self::attend_naive(q, k, v, self.window, &self.attn_dropout)
        };
        let y = y.swap_dims(1, 2).reshape([b, t, d]);
        self.resid_dropout.forward(linear(&self.out_proj, y))
    }

    /// Ring attention. Attention-weight dropout is not applied (as in the tiled form).
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let dims: Vec<[usize; 3]> = xs.iter().map(|x| x.dims()).collect();
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (r, x) in xs.into_iter().enumerate() {
            let (qr, kr, vr) = ranks[r].qkv_sharded(x, r, sp);
            q.push(qr);
            k.push(kr);
            v.push(vr);
        }
        let visibility = Visibility {
            causal: true,
            window: ranks[0].window,
        };
        let ys = ring_attention(q, k, v, visibility, sp)
            .into_iter()
            .zip(dims)
            .enumerate()
            .map(|(r, (y, [b, t, d]))| {
                let y = y.swap_dims(1, 2).reshape([b, t, d]);
                ranks[r]
                    .resid_dropout
                    .forward(linear(&ranks[r].out_proj, y))
            })
            .collect();
        (ys, None)
    }

    fn step(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let [b, t, d] = x.dims();
        let position = cache.as_ref().map_or(0, |c| c.position);
        let (q, k, v) = self.qkv(x, position);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        // A sliding window only ever needs its last `window` keys.
        let cached = k.dims()[2];
        let (k, v) = if self.window > 0 && cached > self.window {
            let [_, kvh, _, hd] = k.dims();
            let keep = cached - self.window..cached;
            (
                k.slice([0..b, 0..kvh, keep.clone(), 0..hd]),
                v.slice([0..b, 0..kvh, keep, 0..hd]),
            )
        } else {
            (k, v)
        };
        // The new token is the last: every cached key is in its past and window.
        let groups = self.n_heads / self.n_kv_heads;
        let head_dim = d / self.n_heads;
        let scores = q
            .matmul(repeat_kv(k.clone(), groups).transpose())
            .mul_scalar(1.0 / (head_dim as f64).sqrt());
        let y = softmax(scores, 3).matmul(repeat_kv(v.clone(), groups));
        let y = linear(&self.out_proj, y.swap_dims(1, 2).reshape([b, t, d]));
        let position = position + t;
        (y, KvCache { k, v, position })
    }
}

/// Grouped-query attention: each of `[b, kv_heads, t, hd]`'s heads serves `groups`
/// consecutive query heads.
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, groups, t, hd])
        .reshape([b, kvh * groups, t, hd])
}

/// Which keys a query sees (by global position): the masks of every attention form here
/// and of ring attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// Keys at or before the query only.
    pub causal: bool,
    /// With `causal`, only the last `window` keys (itself included); 0 = all.
    pub window: usize,
}

impl Visibility {
    fn hidden(&self, i: usize, j: usize) -> bool {
        (self.causal && j > i) || (self.window > 0 && j + self.window <= i)
    }

    /// No query of `[q0, q1)` sees any key of `[k0, k1)`: the keys lie wholly in the
    /// future, or wholly before the window. (Any other block is attended; a block that
    /// hides everything anyway only costs work, its merge weight is 0.)
    pub fn all_hidden(&self, (q0, q1): (usize, usize), (k0, k1): (usize, usize)) -> bool {
        let future = self.causal && k0 > q1 - 1;
        let too_old = self.window > 0 && k1 - 1 + self.window <= q0;
        future || too_old
    }

    /// `[1, 1, q, k]`, true where hidden; `None` when every key is visible.
    pub fn mask(
        &self,
        q: (usize, usize),
        k: (usize, usize),
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        let (q0, q1) = q;
        let (k0, k1) = k;
        let any = self.hidden(q0, k1 - 1) || self.hidden(q1 - 1, k0);
        any.then(|| {
            let qi = Tensor::<1, Int>::arange(q0 as i64..q1 as i64, device).reshape([q1 - q0, 1]);
            let kj = Tensor::<1, Int>::arange(k0 as i64..k1 as i64, device).reshape([1, k1 - k0]);
            let future = self.causal.then(|| kj.clone().greater(qi.clone()));
            let too_old =
                (self.window > 0).then(|| kj.add_scalar(self.window as i64).lower_equal(qi));
            let hidden = match (future, too_old) {
                (Some(f), Some(o)) => f.bool_or(o),
                (f, o) => f.or(o).expect("`any` found a hidden key"),
            };
            hidden.unsqueeze::<4>()
        })
    }
}

/// The memory-efficient form. On flex (the CPU backend) it runs as a backend extension with
/// FlashAttention's recomputing backward ([`super::flash_attention`]), so training memory is
/// linear in sequence length too; elsewhere, as [`attend_tiled_ops`].
pub fn attend_tiled(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    block: usize,
    window: usize,
) -> Tensor<4> {
    use super::flash_attention::FlashAttentionBackend;
    let device = q.device();
    let plain = if device.is_autodiff() {
        device.without_autodiff()
    } else {
        device
    };
    if plain == Device::flex() {
        let out = <burn::backend::Dispatch as FlashAttentionBackend>::flash_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            block,
            window,
        );
        Tensor::from_dispatch(out)
    } else {
        attend_tiled_ops(q, k, v, block, window)
    }
}

/// The memory-efficient form in tensor ops (FlashAttention's forward): queries and keys
/// in blocks of `block`; each query block streams over the key blocks it can see (blocks
/// wholly in the future or, with a window, wholly too old are skipped), keeping a running
/// max `m`, normaliser `l` and unnormalised output, rescaled whenever the max grows. Scores
/// exist one block pair at a time, so memory grows linearly with sequence length.
pub fn attend_tiled_ops(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    block: usize,
    window: usize,
) -> Tensor<4> {
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let scale = 1.0 / (dk as f64).sqrt();
    let visibility = Visibility {
        causal: true,
        window,
    };
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
        // The oldest key any query of this block sees.
        let first_key = if window > 0 {
            (q0 + 1).saturating_sub(window)
        } else {
            0
        };
        for k0 in (first_key / block * block..q1).step_by(block) {
            let k1 = (k0 + block).min(q1);
            let k_blk = k.clone().slice([0..b, 0..h, k0..k1, 0..dk]);
            let v_blk = v.clone().slice([0..b, 0..h, k0..k1, 0..dv]);
            let mut scores = q_blk.clone().matmul(k_blk.transpose());
            if let Some(hidden) = visibility.mask((q0, q1), (k0, k1), &device) {
                scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
            }
            let m_new = m.clone().max_pair(scores.clone().max_dim(3));
            // Rows that have seen no visible key yet keep m = −inf; shift them by 0 instead
            // so exp(−inf − (−inf)) never makes a NaN (their p and l are 0 either way).
            let m_shift = m_new
                .clone()
                .mask_fill(m_new.clone().equal_elem(f32::NEG_INFINITY), 0.0);
            let p = (scores - m_shift.clone()).exp();
            let correction = (m - m_shift).exp();
            l = l * correction.clone() + p.clone().sum_dim(3);
            acc = acc * correction + p.matmul(v_blk);
            m = m_new;
        }
        outputs.push(acc / l);
    }
    Tensor::cat(outputs, 2)
}

//! Causal multi-head softmax attention (Vaswani et al.; GPT-2's `CausalSelfAttention`), with
//! grouped-query attention (`n_kv_heads` < `n_heads` key/value heads, each shared by a group
//! of query heads), optional rotary positions (RoPE, interleaved pairs as in the original
//! LLaMA code) and an optional sliding window (each query sees its last `window` keys).
//!
//! Two forms, both from the attention core ([`crate::attention`]): the naive one
//! materialises the `[t, t]` score matrix; the tiled one streams key blocks with an online
//! softmax (FlashAttention on the CPU backend), so memory grows linearly with sequence
//! length. Unless the recipe chooses, sequences from [`FLASH_FROM`] tokens take the tiled
//! form on the CPU backend, faster there too. Under sequence parallelism it runs as ring
//! attention.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, RotaryEncoding, RotaryEncodingConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use super::{MixerContext, MixerOptions, ShardedForm, TokenMixer, normal_linear};
use crate::attention::fused_softmax;
use crate::attention::tiled::{FLASH_BLOCK, FLASH_FROM, attend_tiled, takes_flash_path};
use crate::attention::{Visibility, merge_heads, naive, repeat_kv, split_heads};
use crate::padding::Padding;
use crate::mixed_precision::{linear, linear_low};
use crate::options::{OptionError, at_least_one, divisors, fail, positive};
use crate::parallel::SequenceParallel;
use crate::parallel::ring_attention::ring_attention;

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
    /// With `block_size` 0, sequences from this many tokens take the tiled form on flex
    /// (`tiled` unset: [`FLASH_FROM`]; set to false: never).
    tiled_from: usize,
    /// Keys each query sees, itself included; 0 = all.
    window: usize,
    /// Queries see only keys at or before them; false: every key (an encoder).
    causal: bool,
    /// Longest sequence the rotary table covers; 0 without RoPE.
    rope_len: usize,
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
    /// Queries, keys and values of `x` `[b, t, d]` as heads, rotated from position `start`
    /// when RoPE is on: q `[b, n_heads, t, hd]`, k and v `[b, n_kv_heads, t, hd]`.
    pub fn qkv(&self, x: Tensor<3>, start: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        self.qkv_with(x, start, linear)
    }

    /// [`Self::qkv`] through `project` (`linear`, or `linear_low` to keep them in the
    /// working dtype for a kernel that takes it).
    fn qkv_with(
        &self,
        x: Tensor<3>,
        start: usize,
        project: fn(&Linear, Tensor<3>) -> Tensor<3>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let q = split_heads(project(&self.q_proj, x.clone()), self.n_heads);
        let k = split_heads(project(&self.k_proj, x.clone()), self.n_kv_heads);
        let v = split_heads(project(&self.v_proj, x), self.n_kv_heads);
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

    /// Which keys each query sees.
    pub fn visibility(&self) -> Visibility {
        Visibility {
            causal: self.causal,
            window: self.window,
        }
    }

    /// The attention heads `[b, n_heads, t, hd]` of `x` `[b, t, d]`, before `out_proj`;
    /// padded keys are hidden from every query.
    pub fn heads(&self, x: Tensor<3>, padding: Option<&Padding>) -> Tensor<4> {
        let heads = self.heads_in(x, padding);
        if heads.dtype() == burn::tensor::DType::F32 {
            heads
        } else {
            heads.cast(FloatDType::F32)
        }
    }

    /// [`Self::heads`], left in the working dtype where torch's kernel takes the heads in
    /// it (libtorch under autocast): out_proj casts them to it anyway, and so no f32 copy
    /// of q, k, v or the output is made between the bf16 products and the kernel, as
    /// under PyTorch's autocast. (Not with RoPE, whose rotation runs in f32.)
    fn heads_in(&self, x: Tensor<3>, padding: Option<&Padding>) -> Tensor<4> {
        let dropout = (self.attn_dropout.prob > 0.0).then_some(&self.attn_dropout);
        let (t, device, vis) = (x.dims()[1], x.device(), self.visibility());
        // The form is chosen before the projections: it decides their output dtype.
        let form = match padding {
            // The tiled kernel has no key mask: padded batches take the reference form.
            Some(_) => Form::Masked,
            None if self.block_size > 0 => Form::Tiled(self.block_size),
            // Long sequences on the CPU: the FlashAttention kernels, faster there too.
            None if t >= self.tiled_from && takes_flash_path(&device) => Form::Tiled(FLASH_BLOCK),
            None => Form::Fused,
        };
        let low = form == Form::Fused
            && self.rope.is_none()
            && fused_softmax::takes_torch_kernel(&device, vis, (t, t), dropout);
        let (q, k, v) = self.qkv_with(x, 0, if low { linear_low } else { linear });
        let groups = self.n_heads / self.n_kv_heads;
        let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
        match (form, padding) {
            (Form::Masked, Some(p)) => {
                let hidden = Some(p.hidden_keys());
                naive::attend_masked(q, k, v, (0, 0), vis, hidden, dropout).0
            }
            (Form::Tiled(block), _) => attend_tiled(q, k, v, block, vis, dropout),
            _ => fused_softmax::attend(q, k, v, vis, dropout),
        }
    }

    /// Ring attention's heads of every rank's shard (`ranks[r]`: this layer on rank r).
    pub fn heads_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> Vec<Tensor<4>> {
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (r, x) in xs.into_iter().enumerate() {
            let (qr, kr, vr) = ranks[r].qkv_sharded(x, r, sp);
            q.push(qr);
            k.push(kr);
            v.push(vr);
        }
        let tile = ranks[0].ring_tile(sp.layout.chunk_len(), &q[0].device());
        ring_attention(q, k, v, ranks[0].visibility(), tile, sp)
    }

    /// The tiles ring attention's blocks run in: the recipe's `block_size` where `tiled =
    /// true`; where `tiled` is unset, FlashAttention's blocks once a chunk has
    /// [`FLASH_FROM`] tokens on flex, as a whole sequence takes them (the materialised
    /// weights of every block pair would otherwise stay for the backward, quadratic in the
    /// shard); else 0, the materialised form.
    fn ring_tile(&self, chunk_len: usize, device: &Device) -> usize {
        if self.block_size > 0 {
            self.block_size
        } else if chunk_len >= self.tiled_from && takes_flash_path(device) {
            FLASH_BLOCK
        } else {
            0
        }
    }

    /// The heads of one new token `[b, 1, d]` given the cache of those before it; the
    /// cache keeps at most `window` keys.
    pub fn step_heads(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<4>, KvCache) {
        let t = x.dims()[1];
        let position = cache.as_ref().map_or(0, |c| c.position);
        let (q, k, v) = self.qkv(x, position);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        // A sliding window only ever needs its last `window` keys.
        let cached = k.dims()[2];
        let (k, v) = if self.window > 0 && cached > self.window {
            let keep = cached - self.window;
            (
                k.narrow(2, keep, self.window),
                v.narrow(2, keep, self.window),
            )
        } else {
            (k, v)
        };
        // The new token is the last: every cached key is in its past and window.
        let groups = self.n_heads / self.n_kv_heads;
        let head_dim = q.dims()[3];
        let scores = q
            .matmul(repeat_kv(k.clone(), groups).transpose())
            .mul_scalar(crate::attention::scale(head_dim));
        let heads = softmax(scores, 3).matmul(repeat_kv(v.clone(), groups));
        (
            heads,
            KvCache {
                k,
                v,
                position: position + t,
            },
        )
    }

    /// Heads `[b, n_heads, t, hd]` → `out_proj` of their concatenation.
    pub fn project_out(&self, heads: Tensor<4>) -> Tensor<3> {
        let out = linear(&self.out_proj, merge_heads(heads));
        crate::fused_dropout::forward(&self.resid_dropout, out)
    }
}

/// Which form [`SoftmaxAttention::heads`] runs attention in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// The reference form with a key mask (padded batches).
    Masked,
    /// Tiled, in blocks of this many queries.
    Tiled(usize),
    /// [`fused_softmax::attend`].
    Fused,
}

impl TokenMixer for SoftmaxAttention {
    type Options = SoftmaxOptions;
    type State = KvCache;
    const SHARDED: ShardedForm = ShardedForm::Ring;

    fn init(o: &SoftmaxOptions, ctx: &MixerContext, device: &Device) -> Self {
        let d = ctx.d_model;
        let n_kv_heads = o.kv_heads(ctx.n_heads);
        let head_dim = ctx.head_dim();
        let d_kv = n_kv_heads * head_dim;
        SoftmaxAttention {
            q_proj: normal_linear(d, d, ctx.bias, ctx.init_std, device),
            k_proj: normal_linear(d, d_kv, ctx.bias, ctx.init_std, device),
            v_proj: normal_linear(d, d_kv, ctx.bias, ctx.init_std, device),
            out_proj: normal_linear(d, d, ctx.bias, ctx.residual_init_std(), device),
            rope: o.rotary.then(|| {
                RotaryEncodingConfig::new(ctx.max_seq_len, head_dim)
                    .with_theta(o.rope_theta as f32)
                    .init(device)
            }),
            attn_dropout: DropoutConfig::new(ctx.dropout).init(),
            resid_dropout: DropoutConfig::new(ctx.dropout).init(),
            n_heads: ctx.n_heads,
            n_kv_heads,
            block_size: if o.tiled == Some(true) { o.block_size } else { 0 },
            tiled_from: if o.tiled.is_none() { FLASH_FROM } else { usize::MAX },
            window: o.window,
            causal: ctx.causal,
            rope_len: if o.rotary { ctx.max_seq_len } else { 0 },
        }
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        (self.project_out(self.heads_in(x, padding)), None)
    }

    /// Ring attention. Attention-weight dropout is not applied (the recipe's loader says so).
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let ys = Self::heads_sharded(ranks, xs, sp)
            .into_iter()
            .enumerate()
            .map(|(r, heads)| ranks[r].project_out(heads))
            .collect();
        (ys, None)
    }

    fn step(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let (heads, cache) = self.step_heads(x, cache);
        (linear(&self.out_proj, merge_heads(heads)), cache)
    }

    fn max_seq_len(&self) -> Option<usize> {
        (self.rope_len > 0).then_some(self.rope_len)
    }
}

/// `[model.softmax]`: softmax attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftmaxOptions {
    /// Compute attention tiled over key blocks with an online softmax (memory linear in
    /// sequence length), `true`, or materialise the full score matrix, `false`. Unset:
    /// tiled on the cpu backend from 2048 tokens (faster there), the full matrix otherwise.
    pub tiled: Option<bool>,
    /// Key block size of the tiled form.
    pub block_size: usize,
    /// Key/value heads for grouped-query attention; 0 = n_heads (plain multi-head).
    pub n_kv_heads: usize,
    /// Rotary position embedding on queries and keys (pair with `model.position = "none"`).
    pub rotary: bool,
    pub rope_theta: f64,
    /// Sliding window: each query sees its last `window` keys, itself included; 0 = all.
    pub window: usize,
}

impl Default for SoftmaxOptions {
    fn default() -> Self {
        Self {
            tiled: None,
            block_size: 64,
            n_kv_heads: 0,
            rotary: false,
            rope_theta: 10000.0,
            window: 0,
        }
    }
}

impl SoftmaxOptions {
    /// Key/value heads for a model of `n_heads` heads.
    pub fn kv_heads(&self, n_heads: usize) -> usize {
        match self.n_kv_heads {
            0 => n_heads,
            kv => kv,
        }
    }
}

impl SoftmaxOptions {
    /// The rules of causal softmax attention with these options, its projections under
    /// `prefix` (`""` here, `"attention."` inside MoH).
    pub fn attention_conventions(&self, ctx: &MixerContext, prefix: &str) -> Vec<String> {
        let (n, hd) = (ctx.n_heads, ctx.head_dim());
        let kv = self.kv_heads(n);
        let mut rules = vec![format!(
            "q = {prefix}q_proj(x), k = {prefix}k_proj(x), v = {prefix}v_proj(x), each viewed as \
             [t, heads, head_dim = {hd}]: head h is columns h·{hd}..(h+1)·{hd}; q has n_heads = {n} heads, \
             k and v {kv}"
        )];
        if kv < n {
            rules.push(format!(
                "grouped-query attention: query head i uses key/value head i // {} \
                 (torch.repeat_interleave(k, {}, dim=heads))",
                n / kv,
                n / kv
            ));
        }
        if self.rotary {
            rules.push(format!(
                "RoPE on q and k after the projections: in each head, the interleaved pair \
                 (x[2i], x[2i+1]) is rotated by the angle p·θ^(−2i/{hd}), p the token's absolute \
                 position from 0, θ = rope_theta = {}, angles computed in f32 (the original LLaMA \
                 code's pairing; Hugging Face's rotate_half pairs x[i] with x[i+{}] instead, so \
                 q_proj/k_proj rows are permuted per head to convert)",
                self.rope_theta,
                hd / 2
            ));
        }
        let window = match self.window {
            0 => String::new(),
            w => format!(" and > p − {w} (a sliding window: the query and the {} before it)", w - 1),
        };
        rules.push(format!(
            "scores = q·kᵀ / √{hd}; the query at position p sees keys at positions ≤ p{window}; \
             softmax over those; heads = scores·v concatenated in head order → {prefix}out_proj"
        ));
        rules.push(super::bias_convention(
            &format!("{prefix}q_proj, {prefix}k_proj, {prefix}v_proj and {prefix}out_proj"),
            ctx.bias,
        ));
        rules
    }
}

impl MixerOptions for SoftmaxOptions {
    const TRAINING_ONLY: &'static [&'static str] = &["tiled", "block_size"];

    fn resolved(&self, ctx: &MixerContext) -> Self {
        Self {
            n_kv_heads: self.kv_heads(ctx.n_heads),
            ..self.clone()
        }
    }

    fn conventions(&self, ctx: &MixerContext) -> Vec<String> {
        self.attention_conventions(ctx, "")
    }

    fn validate(&self, ctx: &MixerContext) -> Result<(), OptionError> {
        at_least_one(&[("block_size", self.block_size)])?;
        let kv = self.n_kv_heads;
        let n = ctx.n_heads;
        if kv != 0 && (kv > n || !n.is_multiple_of(kv)) {
            return fail(
                "n_kv_heads",
                format!(
                    "{kv} does not divide n_heads = {n}: use a divisor of {n} (e.g. {}), or 0 for one per head",
                    divisors(n)
                ),
            );
        }
        if self.rotary && !ctx.head_dim().is_multiple_of(2) {
            return fail(
                "rotary",
                format!(
                    "needs an even head dimension; d_model / n_heads = {}",
                    ctx.head_dim()
                ),
            );
        }
        if !positive(self.rope_theta) {
            return fail("rope_theta", "must be > 0 (10000 is usual)");
        }
        if self.window > 0 && !ctx.causal {
            return fail(
                "window",
                format!(
                    "a sliding window ({}) is defined for causal attention; with model.causal = \
                     false leave window = 0 (every query sees every key)",
                    self.window
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ring blocks tile as whole sequences do: unset from `FLASH_FROM` tokens per chunk,
    /// never with `tiled = false`, always (in the recipe's blocks) with `tiled = true`.
    #[test]
    fn ring_blocks_tile_from_flash_from_tokens_unless_the_recipe_says() {
        let device = Device::flex();
        let ctx = MixerContext::for_tests(8, 16);
        let layer = |tiled| {
            let options = SoftmaxOptions {
                tiled,
                ..SoftmaxOptions::default()
            };
            <SoftmaxAttention as TokenMixer>::init(&options, &ctx, &device)
        };
        assert_eq!(layer(None).ring_tile(FLASH_FROM, &device), FLASH_BLOCK);
        assert_eq!(layer(None).ring_tile(FLASH_FROM - 1, &device), 0);
        assert_eq!(layer(Some(false)).ring_tile(FLASH_FROM, &device), 0);
        let block = SoftmaxOptions::default().block_size;
        assert_eq!(layer(Some(true)).ring_tile(16, &device), block);
    }
}

//! Token mixers: the part of a MetaFormer block that moves information between positions.
//!
//! Each mixer lives in its own file, has a plain reference form next to any fast form, and
//! implements [`TokenMixer`]. The block holds a [`Mixer`] and calls it through the trait,
//! so adding a mixer means: a new file, a variant in [`MixerKind`] and [`Mixer`], and the
//! two `match`es below. Nothing in the block or the trainer changes.

pub mod flash_attention;
pub mod linear_attention;
pub mod moh;
pub mod pool;
pub mod softmax_attention;
pub mod ssm;

use burn::module::Module;
use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

use crate::parallel::SequenceParallel;
use crate::recipe::ModelConfig;
pub use linear_attention::{LinearAttention, LinearAttentionConfig};
pub use moh::{Moh, MohConfig};
pub use pool::{Pool, PoolConfig};
pub use softmax_attention::{SoftmaxAttention, SoftmaxAttentionConfig};
pub use ssm::{Ssm, SsmConfig};

/// What every token mixer does: map `[batch, seq, d_model]` to the same shape, causally
/// (position t sees positions ≤ t) unless the mixer says otherwise; and, for generation,
/// the same map one token at a time with its recurrent form.
pub trait TokenMixer {
    /// What decoding carries from one token to the next: a KV cache, a recurrent state, a
    /// window of recent inputs.
    type State: Clone;

    fn forward(&self, x: Tensor<3>) -> Tensor<3>;

    /// `forward` plus the mixer's auxiliary training loss, if it has one (MoH's load
    /// balance); the trainer adds it, scaled by the mixer's coefficient.
    fn forward_with_aux(&self, x: Tensor<3>) -> (Tensor<3>, Option<Tensor<1>>) {
        (self.forward(x), None)
    }

    /// Mix one new token `[batch, 1, d_model]` given the state of the tokens before it
    /// (`None` at the start). Returns its output and the state including it. Feeding a
    /// sequence token by token gives what `forward` gives for the whole sequence.
    fn step(&self, x: Tensor<3>, state: Option<Self::State>) -> (Tensor<3>, Self::State);

    /// Sequence parallelism: the same map on a sequence split across ranks. `ranks[r]` is
    /// this mixer on rank r and `xs[r]` rank r's shard `[batch, t_r, d_model]` (positions as
    /// `sp.layout` gives them); returns each rank's output and the auxiliary loss. Equal to
    /// `forward_with_aux` on the whole sequence, with no rank holding all of it.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>)
    where
        Self: Sized;
}

/// The mixer names a recipe may use (`mixer = "softmax"`, `mixers = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixerKind {
    /// Causal multi-head softmax attention (`[model.softmax]`).
    Softmax,
    /// Kernelised linear attention, optionally decayed (`[model.linear]`).
    Linear,
    /// A Mamba selective state-space block (`[model.ssm]`).
    Ssm,
    /// PoolFormer's pooling, `avgpool(x) − x` (`[model.pool]`).
    Pool,
    /// Mixture-of-head attention: shared heads plus top-k routed heads (`[model.moh]`).
    Moh,
}

impl MixerKind {
    /// Build this mixer for a layer of the given model, whose sequences are at most
    /// `max_seq_len` long.
    pub fn init(self, model: &ModelConfig, max_seq_len: usize, device: &Device) -> Mixer {
        match self {
            MixerKind::Softmax => Mixer::Softmax(
                SoftmaxAttentionConfig {
                    d_model: model.d_model,
                    n_heads: model.n_heads,
                    bias: model.bias,
                    dropout: model.dropout,
                    init_std: model.init_std,
                    out_init_std: residual_init_std(model),
                    max_seq_len,
                    options: model.softmax.clone(),
                }
                .init(device),
            ),
            MixerKind::Linear => Mixer::Linear(
                LinearAttentionConfig {
                    d_model: model.d_model,
                    n_heads: model.n_heads,
                    bias: model.bias,
                    init_std: model.init_std,
                    out_init_std: residual_init_std(model),
                    options: model.linear.clone(),
                }
                .init(device),
            ),
            MixerKind::Ssm => Mixer::Ssm(
                SsmConfig {
                    d_model: model.d_model,
                    init_std: model.init_std,
                    out_init_std: residual_init_std(model),
                    options: model.ssm.clone(),
                }
                .init(device),
            ),
            MixerKind::Pool => Mixer::Pool(
                PoolConfig {
                    pool_size: model.pool.pool_size,
                    causal: model.pool.causal,
                }
                .init(),
            ),
            MixerKind::Moh => Mixer::Moh(
                MohConfig {
                    d_model: model.d_model,
                    n_heads: model.n_heads,
                    bias: model.bias,
                    init_std: model.init_std,
                    out_init_std: residual_init_std(model),
                    options: model.moh.clone(),
                    block_size: if model.softmax.tiled {
                        model.softmax.block_size
                    } else {
                        0
                    },
                }
                .init(device),
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MixerKind::Softmax => "softmax",
            MixerKind::Linear => "linear",
            MixerKind::Ssm => "ssm",
            MixerKind::Pool => "pool",
            MixerKind::Moh => "moh",
        }
    }
}

/// One of the mixers, as a Burn module. Exports drop the variant name from parameter paths,
/// so `layers.0.mixer.q_proj.weight` is the same whichever mixer sits there.
// One per layer, built once: the size gap between variants costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer {
    Softmax(SoftmaxAttention),
    Linear(LinearAttention),
    Ssm(Ssm),
    Pool(Pool),
    Moh(Moh),
}

/// The decoding state of whichever mixer a layer has.
#[derive(Clone, Debug)]
pub enum MixerState {
    Softmax(softmax_attention::KvCache),
    Linear(linear_attention::LinearState),
    Ssm(ssm::SsmState),
    Pool(pool::PoolWindow),
    Moh(softmax_attention::KvCache),
}

impl TokenMixer for Mixer {
    type State = MixerState;

    fn step(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
        match self {
            Mixer::Softmax(m) => {
                let s = state.map(|s| match s {
                    MixerState::Softmax(s) => s,
                    _ => wrong_state(),
                });
                let (y, s) = m.step(x, s);
                (y, MixerState::Softmax(s))
            }
            Mixer::Linear(m) => {
                let s = state.map(|s| match s {
                    MixerState::Linear(s) => s,
                    _ => wrong_state(),
                });
                let (y, s) = m.step(x, s);
                (y, MixerState::Linear(s))
            }
            Mixer::Ssm(m) => {
                let s = state.map(|s| match s {
                    MixerState::Ssm(s) => s,
                    _ => wrong_state(),
                });
                let (y, s) = m.step(x, s);
                (y, MixerState::Ssm(s))
            }
            Mixer::Pool(m) => {
                let s = state.map(|s| match s {
                    MixerState::Pool(s) => s,
                    _ => wrong_state(),
                });
                let (y, s) = m.step(x, s);
                (y, MixerState::Pool(s))
            }
            Mixer::Moh(m) => {
                let s = state.map(|s| match s {
                    MixerState::Moh(s) => s,
                    _ => wrong_state(),
                });
                let (y, s) = m.step(x, s);
                (y, MixerState::Moh(s))
            }
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Mixer::Softmax(m) => m.forward(x),
            Mixer::Linear(m) => m.forward(x),
            Mixer::Ssm(m) => m.forward(x),
            Mixer::Pool(m) => m.forward(x),
            Mixer::Moh(m) => m.forward(x),
        }
    }

    fn forward_with_aux(&self, x: Tensor<3>) -> (Tensor<3>, Option<Tensor<1>>) {
        match self {
            Mixer::Moh(m) => m.forward_with_aux(x),
            other => (other.forward(x), None),
        }
    }

    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        // Every rank holds the same layer, so the same variant.
        macro_rules! each {
            ($variant:ident, $ty:ty) => {{
                let typed: Vec<&$ty> = ranks
                    .iter()
                    .map(|m| match m {
                        Mixer::$variant(m) => m,
                        _ => panic!("ranks hold different mixers for one layer"),
                    })
                    .collect();
                <$ty>::forward_sharded(&typed, xs, sp)
            }};
        }
        match ranks[0] {
            Mixer::Softmax(_) => each!(Softmax, SoftmaxAttention),
            Mixer::Linear(_) => each!(Linear, LinearAttention),
            Mixer::Ssm(_) => each!(Ssm, Ssm),
            Mixer::Pool(_) => each!(Pool, Pool),
            Mixer::Moh(_) => each!(Moh, Moh),
        }
    }
}

/// Each layer only ever gets back the state its own mixer made; anything else is a bug.
fn wrong_state() -> ! {
    panic!("a layer was given another mixer's decoding state")
}

/// GPT-2's scaled init for projections that write into the residual stream:
/// std / sqrt(2 · n_layers), so the residual's variance does not grow with depth.
pub fn residual_init_std(model: &ModelConfig) -> f64 {
    model.init_std / (2.0 * model.n_layers as f64).sqrt()
}

/// A linear layer with N(0, std²) weights and zero bias (GPT-2 / nanoGPT init).
pub fn normal_linear(d_in: usize, d_out: usize, bias: bool, std: f64, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(Tensor::random(
            [d_in, d_out],
            Distribution::Normal(0.0, std),
            device,
        )),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

//! Token mixers: the part of a MetaFormer block that moves information between positions.
//!
//! Each mixer lives in its own file with its options (`[model.<name>]` in a recipe), a
//! plain reference form next to any fast form, and an implementation of [`TokenMixer`].
//! The [`registry!`] line at the bottom of this file is the only other place a mixer is
//! named: it generates the recipe names ([`MixerKind`]), the layer module ([`Mixer`]), the
//! decoding state ([`MixerState`]), the options of every mixer ([`MixerOptionsSet`]) and
//! every dispatch. The block, the model, the trainer, export and the tests do not change.

pub mod causal_conv1d;
pub mod decayed_scan;
pub mod fused_conv1d;
pub mod fused_delta;
pub mod fused_gate;
pub mod fused_linear_attention;
pub mod selective_scan;

use std::fmt::Debug;

use burn::module::Module;
use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::options::OptionError;
use crate::padding::Padding;
use crate::parallel::SequenceParallel;

/// What a mixer is told about the model around it.
#[derive(Debug, Clone, PartialEq)]
pub struct MixerContext {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    /// Bias in linear layers (nanoGPT's `bias`).
    pub bias: bool,
    pub dropout: f64,
    /// Std of the normal init of projections (GPT-2: 0.02).
    pub init_std: f64,
    /// Longest sequence the model handles (sizes rotary tables).
    pub max_seq_len: usize,
    /// Position t sees positions ≤ t only (a language model); false: the whole sequence
    /// (an encoder, for classification), `model.causal`.
    pub causal: bool,
}

impl MixerContext {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// A small causal model's context for unit tests: two heads, no bias or dropout, and an
    /// init std of 0.5, larger than GPT-2's 0.02 so outputs are far from 0 and comparisons
    /// bite.
    #[cfg(test)]
    pub(crate) fn for_tests(d_model: usize, max_seq_len: usize) -> Self {
        Self {
            d_model,
            n_heads: 2,
            n_layers: 2,
            bias: false,
            dropout: 0.0,
            init_std: 0.5,
            max_seq_len,
            causal: true,
        }
    }

    /// GPT-2's scaled init for projections that write into the residual stream:
    /// std / sqrt(2 · n_layers), so the residual's variance does not grow with depth.
    pub fn residual_init_std(&self) -> f64 {
        self.init_std / (2.0 * self.n_layers as f64).sqrt()
    }
}

/// How a mixer computes over a sequence split across ranks (sequence parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardedForm {
    /// Attention: keys and values travel round a ring of ranks.
    Ring,
    /// A recurrence: each chunk starts from the state the previous chunk ended in.
    StatePassing,
    /// A local window: each chunk borrows a few positions from its neighbours.
    Halo,
    /// Not implemented: a recipe asking for it is refused.
    Unsupported,
}

impl ShardedForm {
    pub fn name(self) -> &'static str {
        match self {
            ShardedForm::Ring => "ring",
            ShardedForm::StatePassing => "state_passing",
            ShardedForm::Halo => "halo",
            ShardedForm::Unsupported => "unsupported",
        }
    }
}

/// A mixer's options: one `[model.<name>]` table of a recipe.
pub trait MixerOptions: Serialize + DeserializeOwned + Default + Clone + Debug + PartialEq {
    /// Keys that choose how training computes or initialises (a fast form, a block size, an
    /// init range) but not what the model computes: an export's `config.json` leaves them
    /// out. Dotted for a nested table (`attention.tiled`); a test checks each one exists.
    const TRAINING_ONLY: &'static [&'static str] = &[];

    /// These options with every "0 = derived" value filled in for a model shaped like
    /// `ctx`, as an export states them.
    fn resolved(&self, _ctx: &MixerContext) -> Self {
        self.clone()
    }

    /// What a reimplementation must do, beyond the tensors' names and shapes, to compute
    /// what this mixer computes with these options: one rule a line, for `config.json`.
    fn conventions(&self, ctx: &MixerContext) -> Vec<String>;

    /// Refuse values this mixer cannot run with, in a model shaped like `ctx`.
    fn validate(&self, _ctx: &MixerContext) -> Result<(), OptionError> {
        Ok(())
    }

    /// Refuse values that cannot run when sequence parallelism cuts sequences into chunks
    /// of `chunk_len` positions.
    fn validate_sharded(&self, _chunk_len: usize) -> Result<(), OptionError> {
        Ok(())
    }
}

/// What every token mixer does: map `[batch, seq, d_model]` to the same shape, causally
/// (position t sees positions ≤ t) or, built with `MixerContext::causal` false, over the
/// whole sequence; and, for generation, the causal map one token at a time with its
/// recurrent form.
pub trait TokenMixer: Module + Sized {
    type Options: MixerOptions;
    /// What decoding carries from one token to the next: a KV cache, a recurrent state, a
    /// window of recent inputs.
    type State: Clone + Debug;
    /// How [`Self::forward_sharded`] works, or that it does not.
    const SHARDED: ShardedForm;

    fn init(options: &Self::Options, ctx: &MixerContext, device: &Device) -> Self;

    /// The mixed sequence, and the mixer's auxiliary training loss already weighted by its
    /// own coefficient (MoH's load balance; the trainer adds it to the loss). Positions
    /// `padding` marks influence no real position, in either direction, whatever they hold.
    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>);

    /// [`Self::forward_padded`] of an unpadded batch, without the auxiliary loss.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_padded(x, None).0
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
        _ranks: &[&Self],
        _xs: Vec<Tensor<3>>,
        _sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        unreachable!("recipe validation refuses sequence parallelism for this mixer")
    }

    /// Longest sequence this mixer handles (a rotary table's length); `None`: any.
    fn max_seq_len(&self) -> Option<usize> {
        None
    }
}

/// Generates, from one line per mixer (`recipe name: Variant => module::Type`), the
/// mixer's module declaration and everything that has to name every mixer.
macro_rules! registry {
    ($($name:ident: $variant:ident => $module:ident :: $ty:ident),+ $(,)?) => {
        $(pub mod $module;)+

        /// The mixer names a recipe may use (`mixer = "softmax"`, `mixers = [...]`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MixerKind {
            $($variant),+
        }

        impl MixerKind {
            /// Every registered mixer, in registration order.
            pub const ALL: &[MixerKind] = &[$(MixerKind::$variant),+];
            /// Their recipe names, in the same order.
            pub const NAMES: &[&str] = &[$(stringify!($name)),+];

            /// The name a recipe uses, which is also its options table `[model.<name>]`.
            pub fn name(self) -> &'static str {
                match self {
                    $(MixerKind::$variant => stringify!($name)),+
                }
            }

            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|k| k.name() == name)
            }

            pub fn sharded_form(self) -> ShardedForm {
                match self {
                    $(MixerKind::$variant => <$module::$ty as TokenMixer>::SHARDED),+
                }
            }

            /// Build this mixer with its options from `options`.
            pub fn init(self, options: &MixerOptionsSet, ctx: &MixerContext, device: &Device) -> Mixer {
                match self {
                    $(MixerKind::$variant => Mixer::$variant(<$module::$ty>::init(&options.$name, ctx, device))),+
                }
            }
        }

        /// The options of every mixer, by recipe name: `[model.softmax]`, `[model.ssm]`, ...
        /// A layer uses those of its own mixer.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct MixerOptionsSet {
            $(pub $name: <$module::$ty as TokenMixer>::Options),+
        }

        impl MixerOptionsSet {
            /// Check the options of the mixers the layers use and of those a recipe wrote a
            /// table for (`written`; keys under `model.`); the sharded checks apply to the
            /// mixers in use.
            pub fn validate(
                &self,
                used: &[MixerKind],
                written: &[MixerKind],
                ctx: &MixerContext,
                sharded_chunk_len: Option<usize>,
            ) -> Result<(), OptionError> {
                $(
                    let in_use = used.contains(&MixerKind::$variant);
                    let within = |e: OptionError| e.within(stringify!($name));
                    if in_use || written.contains(&MixerKind::$variant) {
                        self.$name.validate(ctx).map_err(within)?;
                    }
                    if let (true, Some(len)) = (in_use, sharded_chunk_len) {
                        self.$name.validate_sharded(len).map_err(within)?;
                    }
                )+
                Ok(())
            }

            /// The options of `kind` that change what the model computes, resolved for
            /// `ctx`, as JSON (an export's `config.json`).
            pub fn export_json(&self, kind: MixerKind, ctx: &MixerContext) -> serde_json::Value {
                match kind {
                    $(MixerKind::$variant => {
                        type O = <$module::$ty as TokenMixer>::Options;
                        let mut v = serde_json::to_value(self.$name.resolved(ctx)).expect("options serialise");
                        for key in <O as MixerOptions>::TRAINING_ONLY {
                            remove_dotted(&mut v, key);
                        }
                        v
                    }),+
                }
            }

            /// Every option of `kind`, as a recipe writes them.
            pub fn to_json(&self, kind: MixerKind) -> serde_json::Value {
                match kind {
                    $(MixerKind::$variant => serde_json::to_value(&self.$name).expect("options serialise")),+
                }
            }

            /// [`MixerOptions::conventions`] of `kind`'s options.
            pub fn conventions(&self, kind: MixerKind, ctx: &MixerContext) -> Vec<String> {
                match kind {
                    $(MixerKind::$variant => self.$name.conventions(ctx)),+
                }
            }

            /// For each mixer, its [`MixerOptions::TRAINING_ONLY`] keys that its options do
            /// not have (a renamed key left behind): empty when the lists are right.
            pub fn unknown_training_only_keys() -> Vec<String> {
                let mut unknown = Vec::new();
                $(
                    type $variant = <$module::$ty as TokenMixer>::Options;
                    let v = serde_json::to_value($variant::default()).expect("options serialise");
                    for key in <$variant as MixerOptions>::TRAINING_ONLY {
                        if !key.split('.').try_fold(&v, |v, k| v.get(k)).is_some() {
                            unknown.push(format!("{}.{key}", stringify!($name)));
                        }
                    }
                )+
                unknown
            }
        }

        /// One of the mixers, as a Burn module. Exports drop the variant name from parameter
        /// paths, so `layers.0.mixer.q_proj.weight` is the same whichever mixer sits there.
        // One per layer, built once: the size gap between variants costs nothing worth boxing for.
        #[allow(clippy::large_enum_variant)]
        #[derive(Module, Debug)]
        pub enum Mixer {
            $($variant($module::$ty)),+
        }

        /// The decoding state of whichever mixer a layer has.
        #[derive(Clone, Debug)]
        pub enum MixerState {
            $($variant(<$module::$ty as TokenMixer>::State)),+
        }

        impl Mixer {
            pub fn kind(&self) -> MixerKind {
                match self {
                    $(Mixer::$variant(_) => MixerKind::$variant),+
                }
            }

            pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
                match self {
                    $(Mixer::$variant(m) => m.forward(x)),+
                }
            }

            pub fn forward_padded(
                &self,
                x: Tensor<3>,
                padding: Option<&Padding>,
            ) -> (Tensor<3>, Option<Tensor<1>>) {
                match self {
                    $(Mixer::$variant(m) => m.forward_padded(x, padding)),+
                }
            }

            pub fn step(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
                match self {
                    $(Mixer::$variant(m) => {
                        let state = state.map(|s| match s {
                            MixerState::$variant(s) => s,
                            #[allow(unreachable_patterns)]
                            _ => panic!("a layer was given another mixer's decoding state"),
                        });
                        let (y, s) = m.step(x, state);
                        (y, MixerState::$variant(s))
                    }),+
                }
            }

            /// [`TokenMixer::forward_sharded`] of one layer held by every rank.
            pub fn forward_sharded(
                ranks: &[&Self],
                xs: Vec<Tensor<3>>,
                sp: &SequenceParallel,
            ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
                match ranks[0] {
                    $(Mixer::$variant(_) => {
                        let typed: Vec<&$module::$ty> = ranks
                            .iter()
                            .map(|m| match m {
                                Mixer::$variant(m) => m,
                                #[allow(unreachable_patterns)]
                                _ => panic!("ranks hold different mixers for one layer"),
                            })
                            .collect();
                        <$module::$ty>::forward_sharded(&typed, xs, sp)
                    }),+
                }
            }

            pub fn max_seq_len(&self) -> Option<usize> {
                match self {
                    $(Mixer::$variant(m) => m.max_seq_len()),+
                }
            }
        }
    };
}

registry! {
    softmax: Softmax => softmax_attention::SoftmaxAttention,
    linear: Linear => linear_attention::LinearAttention,
    ssm: Ssm => ssm::Ssm,
    pool: Pool => pool::Pool,
    moh: Moh => moh::Moh,
    mamba2: Mamba2 => mamba2::Mamba2,
}

/// Remove `a.b.c` from a JSON object, if there.
fn remove_dotted(v: &mut serde_json::Value, key: &str) {
    match key.split_once('.') {
        Some((head, rest)) => {
            if let Some(inner) = v.get_mut(head) {
                remove_dotted(inner, rest);
            }
        }
        None => {
            if let Some(map) = v.as_object_mut() {
                map.remove(key);
            }
        }
    }
}

/// The sentence on biases every mixer with `bias`-following projections states.
pub fn bias_convention(projections: &str, bias: bool) -> String {
    if bias {
        format!("{projections} carry biases (model.bias = true)")
    } else {
        format!("{projections} have no biases (model.bias = false)")
    }
}

impl Serialize for MixerKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for MixerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        MixerKind::from_name(&name)
            .ok_or_else(|| serde::de::Error::unknown_variant(&name, MixerKind::NAMES))
    }
}

impl std::fmt::Display for MixerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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

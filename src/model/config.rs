//! `[model]`: the shape of the MetaFormer language model. Each mixer's own options
//! (`[model.<mixer>]`) live in the mixer's file and are composed here by the registry's
//! [`MixerOptionsSet`].

use serde::{Deserialize, Serialize};

use super::mlp::{Activation, MlpKind};
use super::norm::NormKind;
use crate::mixers::{MixerContext, MixerKind, MixerOptionsSet};
use crate::options::{OptionError, at_least_one, divisors, fail, positive};
/// `[model]`: the MetaFormer language model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size. 0 (the default) takes it from the data's tokenizer.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Hidden width of the channel MLP as a multiple of d_model.
    pub mlp_ratio: f64,
    /// The channel MLP: `standard` (fc2(activation(fc1(x)))) or `swiglu` (Llama's).
    pub mlp: MlpKind,
    /// The standard MLP's activation.
    pub activation: Activation,
    pub norm: NormKind,
    pub norm_eps: f64,
    /// Bias in the linear layers and norms (nanoGPT's `bias`).
    pub bias: bool,
    /// Initial value of MetaFormer's per-channel layer scale; absent = no layer scale.
    pub layer_scale_init: Option<f64>,
    pub dropout: f64,
    /// The token mixer of every layer...
    pub mixer: MixerKind,
    /// ...or one per layer (overrides `mixer`), so hybrids are one line.
    pub mixers: Option<Vec<MixerKind>>,
    /// Positional information added to the token embedding.
    pub position: PositionKind,
    /// Largest sequence a learned position table covers. 0 = `training.seq_len`.
    pub max_seq_len: usize,
    /// Share the token embedding with the LM head (nanoGPT, GPT-2).
    pub tie_embeddings: bool,
    /// Std of the normal initialisation of linear and embedding weights (GPT-2: 0.02).
    pub init_std: f64,
    /// Every mixer sees only the past (a language model); false gives each its
    /// bidirectional (encoder) form, for classification tasks.
    pub causal: bool,
    /// How a classification head reads the sequence: the mean over real (unpadded)
    /// positions, or a learned CLS vector prepended to it (needs `causal = false`).
    pub pooling: Pooling,
    /// Options of each mixer, `[model.<mixer>]`, used by the layers that pick it. Read and
    /// written by the recipe beside the other keys (see `Recipe::from_toml_str`).
    #[serde(skip)]
    pub mixer_options: MixerOptionsSet,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            mlp_ratio: 4.0,
            mlp: MlpKind::Standard,
            activation: Activation::Gelu,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            bias: true,
            layer_scale_init: None,
            dropout: 0.0,
            mixer: MixerKind::Softmax,
            mixers: None,
            position: PositionKind::Learned,
            max_seq_len: 0,
            tie_embeddings: true,
            init_std: 0.02,
            causal: true,
            pooling: Pooling::Mean,
            mixer_options: MixerOptionsSet::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean of the final hidden states over real positions.
    Mean,
    /// A learned vector at position 0 whose final hidden state feeds the head (BERT, ViT).
    Cls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// A learned absolute position table (GPT-2, nanoGPT).
    Learned,
    /// No positional embedding: for mixers that are order-aware themselves (ssm, pool).
    None,
}

impl ModelConfig {
    /// The mixer of each layer.
    pub fn layer_mixers(&self) -> Vec<MixerKind> {
        match &self.mixers {
            Some(list) => list.clone(),
            None => vec![self.mixer; self.n_layers],
        }
    }

    /// What each mixer is told about the model, for sequences of at most `max_seq_len`.
    pub fn mixer_context(&self, max_seq_len: usize) -> MixerContext {
        MixerContext {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_layers: self.n_layers,
            bias: self.bias,
            dropout: self.dropout,
            init_std: self.init_std,
            max_seq_len,
            causal: self.causal,
        }
    }

    /// Hidden width of the channel MLP.
    pub fn mlp_hidden(&self) -> usize {
        (self.mlp_ratio * self.d_model as f64).round() as usize
    }

    /// GPT-2's scaled init std of projections that write into the residual stream.
    pub fn residual_init_std(&self) -> f64 {
        self.mixer_context(0).residual_init_std()
    }

    /// Checks of `[model]` and of the options of the mixers its layers use or that the
    /// recipe wrote (`written`; keys relative to `model`); `sharded_chunk_len` is set when
    /// sequence parallelism cuts sequences.
    pub fn validate(
        &self,
        written: &[MixerKind],
        sharded_chunk_len: Option<usize>,
    ) -> Result<(), OptionError> {
        at_least_one(&[("d_model", self.d_model), ("n_layers", self.n_layers)])?;
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return fail(
                "n_heads",
                format!(
                    "{} heads do not divide d_model = {}: pick a divisor of {} (e.g. {})",
                    self.n_heads,
                    self.d_model,
                    self.d_model,
                    divisors(self.d_model)
                ),
            );
        }
        if !positive(self.mlp_ratio) || (self.mlp_ratio * self.d_model as f64).round() < 1.0 {
            return fail(
                "mlp_ratio",
                format!(
                    "must be finite and > 0 (got {}); 4.0 is usual",
                    self.mlp_ratio
                ),
            );
        }
        if self.mlp == MlpKind::Swiglu
            && !matches!(self.activation, Activation::Gelu | Activation::Silu)
        {
            return fail(
                "activation",
                format!(
                    "{} applies to mlp = \"standard\" only; swiglu's gate is always SiLU: \
                     leave activation out, or use mlp = \"standard\"",
                    serde_json::to_string(&self.activation).unwrap_or_default()
                ),
            );
        }
        if !positive(self.norm_eps) {
            return fail(
                "norm_eps",
                format!("must be finite and > 0 (got {})", self.norm_eps),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return fail(
                "dropout",
                format!("must be in [0, 1) (got {})", self.dropout),
            );
        }
        if let Some(ls) = self.layer_scale_init
            && !positive(ls)
        {
            return fail(
                "layer_scale_init",
                format!("must be finite and > 0 (got {ls}); leave it out for no layer scale"),
            );
        }
        if !positive(self.init_std) {
            return fail(
                "init_std",
                format!("must be finite and > 0 (got {})", self.init_std),
            );
        }
        if self.pooling == Pooling::Cls && self.causal {
            return fail(
                "pooling",
                "\"cls\" puts the CLS vector at position 0, which a causal model lets see \
                 nothing: use pooling = \"mean\", or causal = false",
            );
        }
        if let Some(list) = &self.mixers
            && list.len() != self.n_layers
        {
            return fail(
                "mixers",
                format!(
                    "lists {} mixers for n_layers = {}: give exactly one per layer, or use `mixer` for all",
                    list.len(),
                    self.n_layers
                ),
            );
        }
        self.mixer_options.validate(
            &self.layer_mixers(),
            written,
            &self.mixer_context(self.max_seq_len),
            sharded_chunk_len,
        )
    }
}

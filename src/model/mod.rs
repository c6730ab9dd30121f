//! The MetaFormer language model: embeddings → blocks → final norm → LM head.

pub mod config;
pub mod fused_cross_entropy;
pub mod language_model;
pub mod metaformer_block;
pub mod mlp;
pub mod norm;
pub mod objective;

pub use config::{ModelConfig, Pooling, PositionKind};
pub use language_model::{DecodeState, LanguageModel, LanguageModelConfig};
pub use metaformer_block::{MetaFormerBlock, MetaFormerBlockConfig};
pub use mlp::{Activation, Mlp, MlpConfig, MlpKind};
pub use norm::{Norm, NormKind};

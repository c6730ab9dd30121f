//! metamix: train efficient MetaFormer language models from a TOML recipe, on Burn.
//!
//! The pieces, in the order data flows: [`recipe`] (every option), [`data`] (corpus,
//! tokenizer, sampler), [`mixers`] (token mixers behind [`mixers::TokenMixer`]), [`model`]
//! (MetaFormer blocks in a language model), [`train`] (loop, optimizer, schedule,
//! checkpoints, metrics), [`weights`] (safetensors), [`export`], [`sample`].

pub mod data;
pub mod device;
pub mod export;
pub mod mixed_precision;
pub mod mixers;
pub mod model;
pub mod parallel;
pub mod recipe;
pub mod run;
pub mod sample;
pub mod train;
pub mod weights;

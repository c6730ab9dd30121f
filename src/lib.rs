//! metamix: train efficient MetaFormer models — language models, classifiers and the
//! efficient-transformer benchmarks — from a TOML recipe, on Burn.
//!
//! Layers, each using only those above it in this list (no module imports one below it):
//! - [`options`], [`vector_math`], [`mixed_precision`], [`device`], [`padding`]: option
//!   errors, vectorisable exp/erf, autocast, backends, the key-padding mask; `torch_kernels`
//!   (with `--features tch`): torch's attention and norm kernels on libtorch.
//! - [`attention`]: the attention core (mask, heads, naive / tiled / flash forms, merge).
//! - [`parallel`]: sequence layout, transport, ring attention, state passing.
//! - [`mixers`]: the token mixers and their registry.
//! - [`model`]: MetaFormer blocks in a language model.
//! - [`weights`], [`components`]: safetensors; checkpoint, optimizer, LR schedule, loss
//!   scaler, metrics, run lock, stop signal — the trainer's parts, each with its own options.
//! - [`data`]: tokenizers, `prepare`, token shards, the checkpointed window sampler.
//! - [`tasks`]: `[task]` — generated benchmarks (ListOps, MQAR, selective copying,
//!   induction heads), classification files, and their batches.
//! - [`recipe`]: composes every section's options into one file.
//! - [`run`], [`train`], [`export`], [`sample`]: what the commands do.

pub mod activations;
pub mod attention;
pub mod bf16_gemm;
pub mod bias_add;
pub mod components;
pub mod data;
pub mod device;
pub mod export;
pub mod f32x16;
pub mod fused_dropout;
pub mod fused_norm;
pub mod half_rounding;
pub mod matmul;
pub mod mixed_precision;
pub mod mixers;
pub mod model;
pub mod options;
pub mod padding;
pub mod parallel;
pub mod recipe;
pub mod run;
pub mod sample;
pub mod split_product;
pub mod tasks;
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "tch")]
pub mod torch_kernels;
pub mod train;
pub mod vector_math;
pub mod weights;

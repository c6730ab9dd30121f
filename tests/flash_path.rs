//! On flex, the tiled attention forms really run the FlashAttention extension (whose
//! backward keeps no block of scores), not only something with the same output: its
//! forward counter moves. Alone in its own test binary, so no other test moves the counter;
//! its two tests take turns ([`COUNTER`]).

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use metamix::attention::flash::{FORWARD_CALLS, KERNEL_CALLS};
use metamix::attention::tiled::{attend_block, attend_tiled};
use metamix::attention::{Visibility, naive};
use metamix::mixers::MixerKind;

/// Held by each test while it reads the counter.
static COUNTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn flex_runs_the_flash_extension_for_tiled_attention_and_ring_blocks() {
    let _turn = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let x = || Tensor::<4>::random([1, 2, 10, 4], Distribution::Normal(0.0, 1.0), &device);
    let (q, k, v) = (x().require_grad(), x(), x());

    let before = FORWARD_CALLS.get();
    let _ = naive::attend(
        q.clone(),
        k.clone(),
        v.clone(),
        (0, 0),
        Visibility::causal(0),
        None,
    );
    assert_eq!(
        FORWARD_CALLS.get(),
        before,
        "the naive form must not run the extension"
    );

    let kernels = KERNEL_CALLS.get();
    let y = attend_tiled(
        q.clone(),
        k.clone(),
        v.clone(),
        4,
        Visibility::causal(0),
        None,
    );
    assert_eq!(FORWARD_CALLS.get(), before + 1, "tiled attention on flex");
    assert_eq!(
        KERNEL_CALLS.get(),
        kernels + 1,
        "in f32, as the native kernels"
    );
    let grads = y.sum().backward();
    assert!(
        q.grad(&grads).is_some(),
        "the extension's backward reached q"
    );

    let (_, lse) = attend_block(q, k, v, (10, 0), Visibility::causal(0), 4);
    assert_eq!(FORWARD_CALLS.get(), before + 2, "a ring block on flex");
    assert_eq!(lse.dims(), [1, 2, 10, 1]);

    // The whole model: one extension call per tiled softmax layer.
    let recipe = common::tiny_lm_with(
        &[MixerKind::Softmax, MixerKind::Linear],
        8,
        false,
        &["model.softmax.tiled=true", "model.softmax.block_size=4"],
    );
    let model = metamix::run::model_config(&recipe, 11).init_seeded(1, &device);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; 8], [1, 8]), &device);
    let before = FORWARD_CALLS.get();
    let _ = model.forward(ids);
    assert_eq!(FORWARD_CALLS.get(), before + 1);
}

/// With `tiled` unset, a softmax layer takes the FlashAttention kernels from
/// `FLASH_FROM` tokens and the materialised weights below; `tiled = false` keeps the
/// weights at every length, `tiled = true` tiles at every length.
#[test]
fn long_sequences_take_the_flash_kernels_unless_the_recipe_says_otherwise() {
    use metamix::attention::tiled::FLASH_FROM;
    let _turn = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let calls = |extra: &[&str], t: usize| {
        let recipe = common::tiny_lm_with(&[MixerKind::Softmax; 2], t, false, extra);
        let model = metamix::run::model_config(&recipe, 11).init_seeded(1, &device);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; t], [1, t]), &device);
        let before = FORWARD_CALLS.get();
        let _ = model.forward(ids);
        FORWARD_CALLS.get() - before
    };
    // Two softmax layers.
    assert_eq!(calls(&[], FLASH_FROM), 2, "unset, at FLASH_FROM tokens");
    assert_eq!(calls(&[], FLASH_FROM - 1), 0, "unset, below FLASH_FROM");
    assert_eq!(
        calls(&["model.softmax.tiled=false"], FLASH_FROM),
        0,
        "tiled = false"
    );
    assert_eq!(calls(&["model.softmax.tiled=true"], 16), 2, "tiled = true");
}

//! On flex, the tiled attention forms really run the FlashAttention extension (whose
//! backward keeps no block of scores), not only something with the same output: its
//! forward counter moves. Alone in its own test binary, so no other test moves the counter.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use metamix::attention::flash::FORWARD_CALLS;
use metamix::attention::tiled::{attend_block, attend_tiled};
use metamix::attention::{Visibility, naive};
use metamix::mixers::MixerKind;

#[test]
fn flex_runs_the_flash_extension_for_tiled_attention_and_ring_blocks() {
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

    let y = attend_tiled(
        q.clone(),
        k.clone(),
        v.clone(),
        4,
        Visibility::causal(0),
        None,
    );
    assert_eq!(FORWARD_CALLS.get(), before + 1, "tiled attention on flex");
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

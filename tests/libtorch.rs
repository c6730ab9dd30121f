//! The libtorch backend (burn-tch, libtorch 2.9.0; see scripts/setup_libtorch.sh): a
//! training step matches flex in f32 and bf16, on libtorch's CPU device (and on CUDA device
//! 0 when `METAMIX_TEST_CUDA=1`).
//! Without `--features tch` these tests are listed as ignored, naming the feature.

mod common;

use common::{assert_losses_follow, assert_updates_match, step_outputs, tiny_recipe, weights};

#[test]
#[cfg_attr(not(feature = "tch"), ignore = "needs `cargo test --features tch`")]
fn libtorch_training_steps_match_flex_in_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let mut devices = vec!["training.device=\"cpu\""];
    if std::env::var("METAMIX_TEST_CUDA").is_ok_and(|v| v == "1") {
        devices.push("training.device=0");
    }
    for device in devices {
        for (precision, loss_tol, update_tol) in [("f32", 1e-4, 1e-3), ("bf16", 1e-2, 1e-1)] {
            let p = format!("training.precision=\"{precision}\"");
            let (flex, flex_before, flex_trainer) =
                step_outputs(&tiny_recipe(tmp.path(), &[&p]), 3);
            let (tch, tch_before, tch_trainer) = step_outputs(
                &tiny_recipe(tmp.path(), &[&p, "training.backend=\"libtorch\"", device]),
                3,
            );
            assert_losses_follow(
                &tch,
                &flex,
                loss_tol,
                &format!("libtorch {device} {precision}"),
            );
            assert_updates_match(
                &tch_before,
                &weights(tch_trainer.model()),
                &flex_before,
                &weights(flex_trainer.model()),
                update_tol,
                &format!("libtorch {device} {precision}"),
            );
        }
    }
}

//! The wgpu backend (Vulkan; in CI Mesa's lavapipe, a software Vulkan device): a training
//! step matches flex in f32 and f16; bf16, which Vulkan lacks, is refused at start; and
//! sequence / data parallelism across wgpu's two lavapipe devices (`default` and `cpu`)
//! follow the single-device run.
//! Without `--features wgpu` these tests are listed as ignored, naming the feature.

mod common;

use common::{assert_losses_follow, assert_updates_match, step_outputs, tiny_recipe, weights};

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs `cargo test --features wgpu`")]
fn wgpu_training_steps_match_flex_in_f32_and_f16() {
    let tmp = tempfile::tempdir().unwrap();
    for (precision, loss_tol, update_tol) in [("f32", 1e-4, 1e-3), ("f16", 2e-3, 5e-2)] {
        let p = format!("training.precision=\"{precision}\"");
        let (flex, flex_before, flex_trainer) = step_outputs(&tiny_recipe(tmp.path(), &[&p]), 3);
        let (gpu, gpu_before, gpu_trainer) = step_outputs(
            &tiny_recipe(tmp.path(), &[&p, "training.backend=\"wgpu\""]),
            3,
        );
        assert_losses_follow(&gpu, &flex, loss_tol, &format!("wgpu {precision}"));
        assert_updates_match(
            &gpu_before,
            &weights(gpu_trainer.model()),
            &flex_before,
            &weights(flex_trainer.model()),
            update_tol,
            &format!("wgpu {precision}"),
        );
    }
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs `cargo test --features wgpu`")]
fn bf16_on_vulkan_is_refused_at_start_naming_the_alternative() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(
        tmp.path(),
        &["training.backend=\"wgpu\"", "training.precision=\"bf16\""],
    );
    let err = match metamix::train::Ranks::from_recipe(&recipe) {
        Ok(_) => panic!("bf16 on a Vulkan adapter was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("training.precision = \"bf16\""), "{err}");
    assert!(err.contains("precision = \"f16\""), "{err}");
}

#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs `cargo test --features wgpu`")]
fn ring_across_two_wgpu_devices_follows_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "training.backend=\"wgpu\"",
        "model.mixers=[\"softmax\",\"linear\"]",
        "model.n_layers=2",
    ];
    let recipe = |extra: &[&str]| {
        let mut all: Vec<&str> = base.to_vec();
        all.extend_from_slice(extra);
        tiny_recipe(tmp.path(), &all)
    };
    let (reference, ref_before, ref_trainer) = step_outputs(&recipe(&[]), 3);
    let ref_after = weights(ref_trainer.model());
    for extra in [
        &[
            "parallelism.sequence_parallel_degree=2",
            "parallelism.devices=[\"default\",\"cpu\"]",
        ][..],
        &[
            "parallelism.data_parallel_degree=2",
            "parallelism.devices=[\"cpu\",\"default\"]",
        ],
    ] {
        let (outs, before, trainer) = step_outputs(&recipe(extra), 3);
        assert_losses_follow(&outs, &reference, 1e-5, &format!("{extra:?}"));
        assert_updates_match(
            &before,
            &weights(trainer.model()),
            &ref_before,
            &ref_after,
            1e-4,
            &format!("{extra:?}"),
        );
    }
}

/// Under f16 autocast, a projection whose output feeds another (`linear_low`: the MLP's
/// hidden layer) stays f16 on wgpu, as PyTorch's autocast leaves it, and the one that
/// ends the block returns f32; flex keeps both f32 (its projections round f32 operands).
#[test]
#[cfg_attr(not(feature = "wgpu"), ignore = "needs `cargo test --features wgpu`")]
fn hidden_activations_stay_half_precision_on_wgpu_only() {
    #[cfg(feature = "wgpu")]
    hidden_activations_on_wgpu();
}

#[cfg(feature = "wgpu")]
fn hidden_activations_on_wgpu() {
    use burn::prelude::*;
    use burn::tensor::{DType, Distribution, FloatDType};
    use metamix::mixed_precision::{autocast, linear, linear_low};
    let wgpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    for (device, hidden) in [(wgpu, DType::F16), (Device::flex(), DType::F32)] {
        let layer = burn::nn::LinearConfig::new(8, 16).init(&device);
        let x = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
        let (low, full) = autocast(Some(FloatDType::F16), || {
            let h = linear_low(&layer, x.clone());
            let back = burn::nn::LinearConfig::new(16, 8).init(&device);
            (h.dtype(), linear(&back, linear_low(&layer, x)).dtype())
        });
        assert_eq!(low, hidden, "{device:?}: the hidden projection");
        assert_eq!(full, DType::F32, "{device:?}: the block's last projection");
    }
}

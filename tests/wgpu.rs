//! The wgpu backend (Vulkan; in CI Mesa's lavapipe, a software Vulkan device): a training
//! step matches flex in f32 and f16; bf16, which Vulkan lacks, is refused at start; and
//! sequence / data parallelism across wgpu's two lavapipe devices (`default` and `cpu`)
//! follow the single-device run.
#![cfg(feature = "wgpu")]

mod common;

use common::{assert_losses_follow, max_rel, step_outputs, tiny_recipe, weights};

#[test]
fn wgpu_training_steps_match_flex_in_f32_and_f16() {
    let tmp = tempfile::tempdir().unwrap();
    for (precision, loss_tol, weight_tol) in [("f32", 1e-4, 1e-3), ("f16", 2e-3, 2e-2)] {
        let p = format!("training.precision=\"{precision}\"");
        let (flex, flex_model, _) = step_outputs(&tiny_recipe(tmp.path(), &[&p]), 3);
        let (gpu, gpu_model, _) = step_outputs(
            &tiny_recipe(tmp.path(), &[&p, "training.backend=\"wgpu\""]),
            3,
        );
        assert_losses_follow(&gpu, &flex, loss_tol, &format!("wgpu {precision}"));
        let e = max_rel(&weights(&gpu_model), &weights(&flex_model));
        assert!(e < weight_tol, "{precision}: weights differ by {e:e}");
    }
}

#[test]
fn bf16_on_vulkan_is_refused_at_start_naming_the_alternative() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(
        tmp.path(),
        &["training.backend=\"wgpu\"", "training.precision=\"bf16\""],
    );
    let err = match metamix::parallel::Ranks::from_recipe(&recipe) {
        Ok(_) => panic!("bf16 on a Vulkan adapter was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("training.precision = \"bf16\""), "{err}");
    assert!(err.contains("precision = \"f16\""), "{err}");
}

#[test]
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
    let (reference, ref_model, _) = step_outputs(&recipe(&[]), 3);
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
        let (outs, model, _) = step_outputs(&recipe(extra), 3);
        assert_losses_follow(&outs, &reference, 1e-5, &format!("{extra:?}"));
        let e = max_rel(&weights(&model), &weights(&ref_model));
        assert!(e < 1e-4, "{extra:?}: weights differ by {e:e}");
    }
}

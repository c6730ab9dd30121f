//! Mixed precision: bf16 and f16 training track f32; f16's loss scaler skips overflowing
//! steps and backs off; an f16 run resumes with its scaler.

mod common;

use common::{final_files, killed_after, quiet, resuming, step_outputs, tiny_recipe, weights};
use metamix::mixed_precision::{autocast, linear};

#[test]
fn projections_under_autocast_run_in_low_precision_and_return_f32_gradients() {
    use burn::prelude::*;
    use burn::tensor::{DType, Distribution, FloatDType};
    let device = Device::flex().autodiff();
    let layer = metamix::mixers::normal_linear(16, 8, true, 0.5, &device);
    let x = Tensor::<3>::random([2, 3, 16], Distribution::Normal(0.0, 1.0), &device);
    let exact = linear(&layer, x.clone());
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let y = autocast(Some(dtype), || linear(&layer, x.clone()));
        assert_eq!(y.dtype(), DType::F32);
        let err = (y.clone() - exact.clone()).abs().max().into_scalar::<f32>();
        // Rounding the inputs to 8 (bf16) or 11 (f16) bits: visible, but small.
        assert!(err > 0.0 && err < 0.1, "{dtype:?}: error {err}");
        let grads = y.sum().backward();
        let g = layer
            .weight
            .grad(&grads)
            .expect("the f32 master gets a gradient");
        assert_eq!(g.dtype(), DType::F32);
    }
}

#[test]
fn bf16_and_f16_training_track_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 30;
    let run = |precision: &str| {
        let p = format!("training.precision=\"{precision}\"");
        step_outputs(&tiny_recipe(tmp.path(), &[&p, "optimizer.lr=3e-3"]), steps)
    };
    let (f32_outs, _, _) = run("f32");
    let first = f32_outs[0].loss;
    let last = f32_outs[steps - 1].loss;
    assert!(
        last < first - 0.3,
        "f32 must learn for the comparison to mean anything"
    );
    for precision in ["bf16", "f16"] {
        let (outs, _, trainer) = run(precision);
        let scaler = trainer.loss_scaler;
        for (i, (a, b)) in outs.iter().zip(&f32_outs).enumerate() {
            assert!(!a.skipped, "{precision}: step {i} skipped");
            let gap = (a.loss - b.loss).abs();
            assert!(
                gap < 0.05,
                "{precision}: step {i} loss {} vs f32 {}",
                a.loss,
                b.loss
            );
        }
        assert!(
            outs[steps - 1].loss != f32_outs[steps - 1].loss,
            "{precision} ran in f32"
        );
        assert_eq!(scaler.is_some(), precision == "f16");
    }
}

#[test]
fn f16_overflow_skips_the_step_and_halves_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    // A scale of 2^40 overflows f16 (max 65504) in the first backward pass.
    let recipe = tiny_recipe(
        tmp.path(),
        &[
            "training.precision=\"f16\"",
            "training.loss_scaler.init_scale=1099511627776.0",
        ],
    );
    let (outs, untouched, trainer) = step_outputs(&recipe, 3);
    let scaler = trainer.loss_scaler.clone().unwrap();
    assert!(outs.iter().all(|o| o.skipped), "every step overflowed");
    assert_eq!(scaler.skipped_steps, 3);
    assert_eq!(scaler.scale, 2f64.powi(37));
    assert_eq!(
        weights(trainer.model()),
        untouched,
        "a skipped step changed the weights"
    );
    // Backing off 2^40 → 2^14 takes 26 skipped steps; then training proceeds.
    let (outs, _, trainer) = step_outputs(&recipe, 30);
    let scaler = trainer.loss_scaler;
    let skipped = outs.iter().filter(|o| o.skipped).count();
    assert!((20..30).contains(&skipped), "{skipped} skipped");
    assert!(!outs[29].skipped && outs[29].loss.is_finite());
    assert_eq!(scaler.unwrap().skipped_steps as usize, skipped);
}

#[test]
fn f16_run_resumes_with_its_loss_scaler() {
    let tmp = tempfile::tempdir().unwrap();
    // Growth every 3 good steps, so the scale moves during the run.
    let extra = [
        "training.precision=\"f16\"",
        "training.loss_scaler.growth_interval=3",
        "training.loss_scaler.init_scale=1024.0",
    ];
    let straight = tiny_recipe(&tmp.path().join("a"), &extra);
    metamix::train::train(&straight, &quiet()).unwrap();
    let split = tiny_recipe(&tmp.path().join("b"), &extra);
    metamix::train::train(&split, &killed_after(4)).unwrap();
    let state = std::fs::read_to_string(
        split
            .run_dir()
            .join("checkpoints/step-4/trainer_state.json"),
    )
    .unwrap();
    assert!(state.contains("\"loss_scaler\""), "{state}");
    assert!(state.contains("\"scale\": 2048.0"), "{state}");
    metamix::train::train(&split, &resuming()).unwrap();
    let a = final_files(&straight.run_dir(), 8);
    let b = final_files(&split.run_dir(), 8);
    assert!(a.0 == b.0, "model weights differ after resume");
    assert!(a.1 == b.1, "optimizer state differs after resume");
}

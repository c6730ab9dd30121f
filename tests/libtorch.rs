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

/// A libtorch autodiff device, seeded.
#[cfg(feature = "tch")]
fn libtorch_device(seed: u64) -> burn::prelude::Device {
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is what this tests
    let device = burn::prelude::Device::libtorch().autodiff();
    device.seed(seed);
    device
}

/// `got` within `tol` of `reference`'s largest magnitude, element by element.
#[cfg(feature = "tch")]
fn assert_near(got: &[f32], reference: &[f32], tol: f32, what: &str) {
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    common::assert_close(got, reference, 0.0, tol * scale, what);
}

/// Attention through torch's fused kernel equals the reference form, output and the
/// gradients of q, k and v, causal or not; under bf16 autocast it stays within bf16's
/// rounding of it; and softmax attention on libtorch takes that kernel.
#[test]
#[cfg_attr(not(feature = "tch"), ignore = "needs `cargo test --features tch`")]
fn torch_attention_kernel_equals_the_reference_with_gradients() {
    #[cfg(feature = "tch")]
    {
        use burn::prelude::*;
        use burn::tensor::{Distribution, FloatDType};
        use metamix::attention::{Visibility, fused_softmax, naive};
        use metamix::torch_kernels;

        let device = libtorch_device(5);
        let draw =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q0, k0, v0) = (
            draw([2, 3, 37, 16]),
            draw([2, 3, 37, 16]),
            draw([2, 3, 37, 8]),
        );
        let w = draw([2, 3, 37, 8]);
        type Attend<'a> = &'a dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>;
        let run = |f: Attend| {
            let (q, k, v) = (
                q0.clone().require_grad(),
                k0.clone().require_grad(),
                v0.clone().require_grad(),
            );
            let out = f(q.clone(), k.clone(), v.clone());
            let g = (out.clone() * w.clone()).sum().backward();
            let grad = |x: &Tensor<4>| common::values(x.grad(&g).unwrap());
            [common::values(out), grad(&q), grad(&k), grad(&v)]
        };
        for causal in [false, true] {
            let vis = Visibility { causal, window: 0 };
            let reference = run(&|q, k, v| naive::attend(q, k, v, (0, 0), vis, None).0);
            let before = torch_kernels::calls().0;
            let torch = run(&|q, k, v| fused_softmax::attend(q, k, v, vis, None));
            assert_eq!(
                torch_kernels::calls().0,
                before + 1,
                "softmax attention on libtorch took torch's kernel"
            );
            let scale = metamix::attention::scale(16);
            let bf16 = run(&|q, k, v| {
                metamix::mixed_precision::autocast(Some(FloatDType::BF16), || {
                    torch_kernels::attention(q, k, v, causal, scale)
                })
            });
            for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
                let what = format!("{what}, causal {causal}");
                assert_near(&torch[i], &reference[i], 2e-5, &format!("{what}, f32"));
                assert_near(&bf16[i], &reference[i], 3e-2, &format!("{what}, bf16"));
            }
        }
    }
}

/// LayerNorm and RMSNorm through torch's kernels equal the reference forms, output and the
/// gradients of x, gamma and beta, and the model's norm on libtorch takes them.
#[test]
#[cfg_attr(not(feature = "tch"), ignore = "needs `cargo test --features tch`")]
fn torch_norm_kernels_equal_the_reference_with_gradients() {
    #[cfg(feature = "tch")]
    {
        use burn::prelude::*;
        use burn::tensor::Distribution;
        use metamix::fused_norm::{fused_norm, norm_reference};
        use metamix::torch_kernels;

        let device = libtorch_device(6);
        let x0 = Tensor::<3>::random([3, 5, 24], Distribution::Normal(0.5, 2.0), &device);
        let g0 = Tensor::<1>::random([24], Distribution::Normal(1.0, 0.3), &device);
        let b0 = Tensor::<1>::random([24], Distribution::Normal(0.0, 0.3), &device);
        let w = Tensor::<3>::random([3, 5, 24], Distribution::Normal(0.0, 1.0), &device);
        type Norm = fn(Tensor<3>, Tensor<1>, Option<Tensor<1>>, f64, bool) -> Tensor<3>;
        for center in [true, false] {
            for with_beta in [true, false] {
                let run = |f: Norm| {
                    let (x, g, b) = (
                        x0.clone().require_grad(),
                        g0.clone().require_grad(),
                        b0.clone().require_grad(),
                    );
                    let out = f(
                        x.clone(),
                        g.clone(),
                        with_beta.then(|| b.clone()),
                        1e-5,
                        center,
                    );
                    let grads = (out.clone() * w.clone()).sum().backward();
                    let beta = b.grad(&grads).map(common::values).unwrap_or_default();
                    [
                        common::values(out),
                        common::values(x.grad(&grads).unwrap()),
                        common::values(g.grad(&grads).unwrap()),
                        beta,
                    ]
                };
                let reference = run(norm_reference::<3>);
                let before = torch_kernels::calls().1;
                let torch = run(fused_norm::<3>);
                assert_eq!(
                    torch_kernels::calls().1,
                    before + 1,
                    "the norm took torch's"
                );
                for (i, what) in ["output", "dx", "dgamma", "dbeta"].iter().enumerate() {
                    let what = format!("{what}, center {center}, beta {with_beta}");
                    assert_near(&torch[i], &reference[i], 1e-5, &what);
                }
            }
        }
    }
}

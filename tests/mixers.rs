//! Every mixer's fast form equals its plain reference form on random inputs, forward and
//! gradients; and every mixer, inside the language model, is causal.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::tiny_lm;
use metamix::mixers::linear_attention::{self, LinearInputs};
use metamix::mixers::softmax_attention::{SoftmaxAttention, attend_tiled, attend_tiled_ops};
use metamix::mixers::ssm::{self, ScanInputs};
use metamix::mixers::{MixerKind, PoolConfig};
use metamix::run::model_config;

fn device() -> Device {
    Device::flex().autodiff()
}

fn leaf<const D: usize>(shape: [usize; D], dist: Distribution) -> Tensor<D> {
    Tensor::random(shape, dist, &device()).require_grad()
}

fn normal<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    leaf(shape, Distribution::Normal(0.0, 1.0))
}

/// Max |a − b| over max(1, max |b|): relative for large values, absolute near zero.
fn rel_err<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let e = rel_err(a, b);
    assert!(e < tol, "{what}: relative error {e:e} ≥ {tol:e}");
}

/// Run `f` on the leaves and return its output and the gradients of a fixed random
/// projection of the output with respect to each leaf.
fn with_grads<const D: usize, const L: usize>(
    leaves: &[Tensor<L>],
    probe: &Tensor<D>,
    f: impl Fn(&[Tensor<L>]) -> Tensor<D>,
) -> (Tensor<D>, Vec<Tensor<L>>) {
    let out = f(leaves);
    let grads = (out.clone() * probe.clone()).sum().backward();
    let g = leaves
        .iter()
        .map(|x| x.grad(&grads).expect("leaf has a gradient"))
        .collect();
    (out.detach(), g)
}

fn compare_forms<const D: usize, const L: usize>(
    name: &str,
    leaves: &[Tensor<L>],
    out_shape: [usize; D],
    reference: impl Fn(&[Tensor<L>]) -> Tensor<D>,
    fast: impl Fn(&[Tensor<L>]) -> Tensor<D>,
    tol: f32,
) {
    let probe = Tensor::<D>::random(out_shape, Distribution::Normal(0.0, 1.0), &device());
    let (out_ref, g_ref) = with_grads(leaves, &probe, reference);
    let (out_fast, g_fast) = with_grads(leaves, &probe, fast);
    assert_close(out_fast, out_ref, tol, &format!("{name}: output"));
    for (i, (a, b)) in g_fast.into_iter().zip(g_ref).enumerate() {
        assert_close(a, b, tol, &format!("{name}: gradient of input {i}"));
    }
}

#[test]
fn tiled_softmax_equals_naive() {
    let no_dropout = burn::nn::DropoutConfig::new(0.0).init();
    for (t, block, window) in [
        (23, 8, 0),
        (16, 16, 0),
        (5, 2, 0),
        (40, 64, 0),
        (23, 4, 5),
        (30, 8, 9),
        (17, 4, 1),
        (12, 3, 12),
    ] {
        let leaves = [
            normal([2, 3, t, 8]),
            normal([2, 3, t, 8]),
            normal([2, 3, t, 8]),
        ];
        let naive = |x: &[Tensor<4>]| {
            let (q, k, v) = (x[0].clone(), x[1].clone(), x[2].clone());
            SoftmaxAttention::attend_naive(q, k, v, window, &no_dropout)
        };
        // FlashAttention (custom backward, flex) and the tensor-op form other backends use.
        let flash =
            |x: &[Tensor<4>]| attend_tiled(x[0].clone(), x[1].clone(), x[2].clone(), block, window);
        let ops = |x: &[Tensor<4>]| {
            attend_tiled_ops(x[0].clone(), x[1].clone(), x[2].clone(), block, window)
        };
        for (form, fast) in [
            ("flash", &flash as &dyn Fn(&[Tensor<4>]) -> Tensor<4>),
            ("tensor ops", &ops),
        ] {
            compare_forms(
                &format!("softmax {form} t={t} block={block} window={window}"),
                &leaves,
                [2, 3, t, 8],
                naive,
                fast,
                1e-5,
            );
        }
    }
}

fn linear_inputs(x: &[Tensor<4>], decay: &Tensor<3>) -> LinearInputs {
    // Positive features, as elu+1 gives, so the normaliser is well conditioned.
    LinearInputs {
        q: x[0].clone(),
        k: x[1].clone(),
        v: x[2].clone(),
        log_decay: decay.clone(),
    }
}

#[test]
fn linear_attention_chunkwise_recurrent_and_quadratic_agree() {
    let (b, h, t, dk, dv) = (2, 2, 21, 4, 5);
    for decay in ["none", "fixed", "data-dependent"] {
        for normalize in [false, true] {
            let pos = Distribution::Uniform(0.1, 1.0);
            let leaves = [
                leaf([b, h, t, dk], pos),
                leaf([b, h, t, dk], pos),
                normal([b, h, t, dv]),
            ];
            let log_decay = match decay {
                "none" => Tensor::zeros([b, h, t], &device()),
                "fixed" => Tensor::full([b, h, t], (0.9f32).ln(), &device()),
                _ => leaf([b, h, t], Distribution::Uniform(-0.5, 0.0)),
            };
            for chunk in [1, 4, 8, 32] {
                let name = format!("linear decay={decay} normalize={normalize} chunk={chunk}");
                compare_forms(
                    &name,
                    &leaves,
                    [b, h, t, dv],
                    |x| linear_attention::recurrent(linear_inputs(x, &log_decay), normalize),
                    |x| linear_attention::chunkwise(linear_inputs(x, &log_decay), normalize, chunk),
                    1e-5,
                );
            }
            compare_forms(
                &format!("linear quadratic decay={decay} normalize={normalize}"),
                &leaves,
                [b, h, t, dv],
                |x| linear_attention::recurrent(linear_inputs(x, &log_decay), normalize),
                |x| linear_attention::quadratic(linear_inputs(x, &log_decay), normalize),
                1e-5,
            );
            if decay == "data-dependent" {
                // The gate is learned: its gradient must match too.
                let probe =
                    Tensor::<4>::random([b, h, t, dv], Distribution::Normal(0.0, 1.0), &device());
                let grad_of = |f: &dyn Fn() -> Tensor<4>| {
                    let g = (f() * probe.clone()).sum().backward();
                    log_decay.grad(&g).unwrap()
                };
                let a = grad_of(&|| {
                    linear_attention::recurrent(linear_inputs(&leaves, &log_decay), normalize)
                });
                let c = grad_of(&|| {
                    linear_attention::chunkwise(linear_inputs(&leaves, &log_decay), normalize, 8)
                });
                assert_close(c, a, 1e-5, "linear: gradient of the log-decay");
            }
        }
    }
}

#[test]
fn ssm_chunked_scan_equals_sequential() {
    let (b, t, di, n) = (2, 19, 6, 4);
    let u = normal([b, t, di]);
    let delta = leaf([b, t, di], Distribution::Uniform(0.001, 0.5));
    let b_in = normal([b, t, n]);
    let c_in = normal([b, t, n]);
    let a = leaf([di, n], Distribution::Uniform(-4.0, -0.5));
    let inputs = || ScanInputs {
        u: u.clone(),
        delta: delta.clone(),
        a: a.clone(),
        b: b_in.clone(),
        c: c_in.clone(),
    };
    let probe = Tensor::<3>::random([b, t, di], Distribution::Normal(0.0, 1.0), &device());
    let run = |f: &dyn Fn(ScanInputs) -> Tensor<3>| {
        let y = f(inputs());
        let g = (y.clone() * probe.clone()).sum().backward();
        let g3 = |x: &Tensor<3>| x.grad(&g).unwrap();
        (
            y.detach(),
            [g3(&u), g3(&delta), g3(&b_in), g3(&c_in)],
            a.grad(&g).unwrap(),
        )
    };
    let (y_ref, g_ref, ga_ref) = run(&ssm::scan_sequential);
    for chunk in [1, 4, 8, 64] {
        let (y, g, ga) = run(&|s| ssm::scan_chunked(s, chunk));
        assert_close(
            y,
            y_ref.clone(),
            1e-5,
            &format!("ssm chunk={chunk}: output"),
        );
        for (i, (x, r)) in g.into_iter().zip(g_ref.clone()).enumerate() {
            assert_close(x, r, 1e-5, &format!("ssm chunk={chunk}: gradient {i}"));
        }
        assert_close(
            ga,
            ga_ref.clone(),
            1e-5,
            &format!("ssm chunk={chunk}: gradient of A"),
        );
    }
}

#[test]
fn pool_cumsum_equals_direct_loop() {
    for causal in [true, false] {
        for k in [1, 2, 3, 4, 7] {
            let pool = PoolConfig {
                pool_size: k,
                causal,
            }
            .init();
            let x = [normal([2, 9, 5])];
            compare_forms(
                &format!("pool k={k} causal={causal}"),
                &x,
                [2, 9, 5],
                |x| pool.forward_loop(x[0].clone()),
                |x| pool.forward_cumsum(x[0].clone()),
                1e-5,
            );
        }
    }
    // By hand: causal window 2 over [1, 3, 5] averages [1], [1, 3], [3, 5].
    let pool = PoolConfig {
        pool_size: 2,
        causal: true,
    }
    .init();
    let x = Tensor::<3>::from_data(
        TensorData::new(vec![1.0f32, 3.0, 5.0], [1, 3, 1]),
        &Device::flex(),
    );
    let y: Vec<f32> = pool.forward_cumsum(x).into_data().try_to_vec().unwrap();
    assert_eq!(y, vec![0.0, -1.0, -1.0]);
}

/// Mixer lists that cover every mixer and a hybrid.
fn mixer_lists() -> Vec<Vec<MixerKind>> {
    vec![
        vec![MixerKind::Softmax, MixerKind::Softmax],
        vec![MixerKind::Linear, MixerKind::Linear],
        vec![MixerKind::Ssm, MixerKind::Ssm],
        vec![MixerKind::Pool, MixerKind::Pool],
        vec![MixerKind::Moh, MixerKind::Moh],
        vec![MixerKind::Ssm, MixerKind::Softmax],
    ]
}

/// For every mixer (and a hybrid), logits at position t do not change when a later token
/// changes: the model is causal end to end.
#[test]
fn every_mixer_is_causal_in_the_language_model() {
    let device = Device::flex();
    for mixers in mixer_lists() {
        for variant in [false, true] {
            let mut recipe = tiny_lm(&mixers, 12, variant);
            // The fast forms, with blocks and chunks smaller than the sequence.
            recipe.model.softmax.tiled = true;
            recipe.model.softmax.block_size = 4;
            recipe.model.linear.chunk_size = 4;
            recipe.model.ssm.scan = metamix::recipe::ScanForm::Chunked;
            recipe.model.ssm.chunk_size = 4;
            let model = model_config(&recipe, 11).init_seeded(3, &device);
            let ids = |last: i64| {
                let mut v: Vec<i64> = (0..12).map(|i| (i * 7 % 11) as i64).collect();
                v[8] = last;
                Tensor::<2, Int>::from_data(TensorData::new(v, [1, 12]), &device)
            };
            let a = model.forward(ids(1)).slice([0..1, 0..8, 0..11]);
            let b = model.forward(ids(9)).slice([0..1, 0..8, 0..11]);
            assert_eq!(
                a.clone().into_data(),
                b.into_data(),
                "{mixers:?}: the past changed"
            );
            let a_all = model.forward(ids(1)).slice([0..1, 8..12, 0..11]);
            let b_all = model.forward(ids(9)).slice([0..1, 8..12, 0..11]);
            assert!(
                rel_err(a_all, b_all) > 0.0,
                "{mixers:?}: the change had no effect at all"
            );
        }
    }
}

/// Decoding token by token through each mixer's recurrent form (KV cache, running state,
/// conv window + scan state, pool window) gives the full forward pass's logits.
#[test]
fn token_by_token_decoding_matches_the_full_forward() {
    let device = Device::flex();
    for mixers in mixer_lists() {
        for variant in [false, true] {
            let recipe = tiny_lm(&mixers, 10, variant);
            let model = model_config(&recipe, 11).init_seeded(5, &device);
            let ids: Vec<i64> = (0..10).map(|i| (i * 5 % 11) as i64).collect();
            let full = model.forward(Tensor::from_data(
                TensorData::new(ids.clone(), [1, 10]),
                &device,
            ));
            let mut state = metamix::model::DecodeState::default();
            let steps: Vec<Tensor<3>> = ids
                .iter()
                .map(|&id| {
                    model.step(
                        Tensor::from_data(TensorData::new(vec![id], [1, 1]), &device),
                        &mut state,
                    )
                })
                .collect();
            let stepped = Tensor::cat(steps, 1);
            let err = (stepped - full).abs().max().into_scalar::<f32>();
            assert!(
                err < 1e-4,
                "{mixers:?} variant={variant}: max difference {err:e}"
            );
        }
    }
}

fn moh(n_heads: usize, shared_heads: usize, top_k: usize) -> metamix::mixers::Moh {
    metamix::mixers::MohConfig {
        d_model: 12,
        n_heads,
        bias: true,
        init_std: 0.3,
        out_init_std: 0.3,
        options: metamix::recipe::MohOptions {
            shared_heads,
            top_k,
            aux_loss_coef: 0.01,
        },
        block_size: 0,
    }
    .init(&Device::flex())
}

#[test]
fn moh_with_every_head_shared_is_weighted_multi_head_attention() {
    use burn::tensor::activation::softmax;
    use metamix::mixers::TokenMixer;
    let device = Device::flex();
    let m = moh(3, 3, 0);
    let x = Tensor::<3>::random([2, 7, 12], Distribution::Normal(0.0, 1.0), &device);
    let split = |y: Tensor<3>| y.reshape([2, 7, 3, 4]).swap_dims(1, 2);
    let heads = SoftmaxAttention::attend_naive(
        split(m.q_proj.forward(x.clone())),
        split(m.k_proj.forward(x.clone())),
        split(m.v_proj.forward(x.clone())),
        0,
        &burn::nn::DropoutConfig::new(0.0).init(),
    );
    let weights = softmax(m.shared_router.as_ref().unwrap().forward(x.clone()), 2)
        .swap_dims(1, 2)
        .unsqueeze_dim::<4>(3);
    let expected = m
        .out_proj
        .forward((heads * weights).swap_dims(1, 2).reshape([2, 7, 12]));
    let (y, aux) = m.forward_with_aux(x);
    assert!(aux.is_none(), "no routed heads, no balance loss");
    assert_close(y, expected, 1e-5, "moh, all heads shared");
}

#[test]
fn moh_router_picks_exactly_k_routed_heads() {
    let device = Device::flex();
    for (n_heads, shared, k) in [(6, 2, 2), (6, 0, 3), (4, 1, 1)] {
        let m = moh(n_heads, shared, k);
        let x = Tensor::<3>::random([3, 9, 12], Distribution::Normal(0.0, 1.0), &device);
        let gates = m.gates(x);
        let routed = gates
            .gates
            .clone()
            .slice([0..3, shared..n_heads, 0..9, 0..1]);
        let active = routed.greater_elem(0.0).int().sum_dim(1); // [3, 1, 9, 1]
        let counts: Vec<i64> = active.into_data().convert::<i64>().try_to_vec().unwrap();
        assert!(
            counts.iter().all(|&c| c == k as i64),
            "({n_heads}, {shared}, {k}): {counts:?}"
        );
        // Shared heads are always on; all gates of a token sum to 1.
        if shared > 0 {
            let s = gates.gates.clone().slice([0..3, 0..shared, 0..9, 0..1]);
            assert!(s.min().into_scalar::<f32>() > 0.0);
        }
        assert!(gates.balance_loss.is_some());
    }
}

#[test]
fn moh_balance_loss_has_the_documented_value() {
    use metamix::mixers::moh::{load_balance_loss, top_k_mask};
    let device = Device::flex();
    // Two tokens, three routed heads.
    let probs = Tensor::<3>::from_data(
        TensorData::new(vec![0.5f32, 0.3, 0.2, 0.1, 0.6, 0.3], [1, 2, 3]),
        &device,
    );
    // top-1: token 0 → head 0, token 1 → head 1: f = [½, ½, 0], P = [0.3, 0.45, 0.25].
    let l1 = load_balance_loss(probs.clone(), top_k_mask(probs.clone(), 1)).into_scalar::<f32>();
    assert!((l1 - (0.5 * 0.3 + 0.5 * 0.45)).abs() < 1e-6, "{l1}");
    // top-2: {0, 1} and {1, 2}: f = [½, 1, ½].
    let l2 = load_balance_loss(probs.clone(), top_k_mask(probs, 2)).into_scalar::<f32>();
    assert!(
        (l2 - (0.5 * 0.3 + 1.0 * 0.45 + 0.5 * 0.25)).abs() < 1e-6,
        "{l2}"
    );
}

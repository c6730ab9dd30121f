//! Every mixer's fast form equals its plain reference form on random inputs, forward and
//! gradients, causal and bidirectional; and every mixer, inside the language model, is
//! causal.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::{assert_tensors_close, random_tensor, tiny_lm, tiny_lm_with};
use metamix::attention::tiled::{attend_tiled, attend_tiled_ops};
use metamix::attention::{Visibility, naive};
use metamix::mixers::linear_attention::{self, LinearInputs};
use metamix::mixers::moh::{Moh, MohOptions};
use metamix::mixers::pool::{Pool, PoolOptions};
use metamix::mixers::ssm::{self, ScanInputs};
use metamix::mixers::{MixerContext, MixerKind, MixerOptions, TokenMixer};
use metamix::run::model_config;

fn device() -> Device {
    Device::flex().autodiff()
}

fn leaf<const D: usize>(shape: [usize; D], dist: Distribution) -> Tensor<D> {
    random_tensor(shape, dist, &device()).require_grad()
}

fn normal<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    leaf(shape, Distribution::Normal(0.0, 1.0))
}

/// Per element: |a − e| ≤ ATOL·max(1, max|e|) + RTOL·|e|. The fast forms reorder f32 sums,
/// nothing more, and an element that sums many terms which cancel (Δ's gradient with one
/// Δ for every channel sums hundreds) carries the rounding of its terms, not of its own
/// small value: the tensor's largest element is the measure of those terms. Over 60 random
/// draws of the scan tests the worst error was 1.8e-6 of that measure.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, what: &str) {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    assert_tensors_close(a, b, RTOL, ATOL * scale, what);
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
) {
    let probe = random_tensor::<D>(out_shape, Distribution::Normal(0.0, 1.0), &device());
    let (out_ref, g_ref) = with_grads(leaves, &probe, reference);
    let (out_fast, g_fast) = with_grads(leaves, &probe, fast);
    assert_close(out_fast, out_ref, &format!("{name}: output"));
    for (i, (a, b)) in g_fast.into_iter().zip(g_ref).enumerate() {
        assert_close(a, b, &format!("{name}: gradient of input {i}"));
    }
}

#[test]
fn tiled_softmax_equals_naive() {
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
        // Bidirectional attention (an encoder's) where there is no window.
        let visibilities = match window {
            0 => vec![
                Visibility::causal(0),
                Visibility {
                    causal: false,
                    window: 0,
                },
            ],
            w => vec![Visibility::causal(w)],
        };
        for vis in visibilities {
            let naive = |x: &[Tensor<4>]| {
                let (q, k, v) = (x[0].clone(), x[1].clone(), x[2].clone());
                naive::attend(q, k, v, (0, 0), vis, None).0
            };
            // FlashAttention (custom backward, flex) and the tensor-op form other backends use.
            let flash = |x: &[Tensor<4>]| {
                attend_tiled(x[0].clone(), x[1].clone(), x[2].clone(), block, vis, None)
            };
            let ops = |x: &[Tensor<4>]| {
                attend_tiled_ops(x[0].clone(), x[1].clone(), x[2].clone(), block, vis, None).0
            };
            for (form, fast) in [
                ("flash", &flash as &dyn Fn(&[Tensor<4>]) -> Tensor<4>),
                ("tensor ops", &ops),
            ] {
                compare_forms(
                    &format!("softmax {form} t={t} block={block} {vis:?}"),
                    &leaves,
                    [2, 3, t, 8],
                    naive,
                    fast,
                );
            }
            // Both forms' row log-sum-exps, which merges (ring attention) rely on.
            let (q, k, v) = (leaves[0].clone(), leaves[1].clone(), leaves[2].clone());
            let (_, lse_ref) = naive::attend(q.clone(), k.clone(), v.clone(), (0, 0), vis, None);
            let (_, lse) = attend_tiled_ops(q, k, v, block, vis, None);
            assert_close(lse, lse_ref, &format!("lse t={t} block={block} {vis:?}"));
        }
    }
}

/// With dropout on the weights, both tiled forms drop what the naive form drops under one
/// mask key, tile by tile: outputs and gradients equal; and the dropout did act.
#[test]
fn tiled_softmax_with_dropout_equals_naive() {
    use metamix::fused_dropout::with_fixed_key;
    let (p, key) = (0.3, 7);
    let dropout = burn::nn::DropoutConfig::new(p).init();
    let bidirectional = Visibility {
        causal: false,
        window: 0,
    };
    for (t, block, vis) in [
        (23, 8, Visibility::causal(0)),
        (30, 8, Visibility::causal(9)),
        (20, 16, bidirectional),
    ] {
        let leaves = [
            normal([2, 3, t, 8]),
            normal([2, 3, t, 8]),
            normal([2, 3, t, 8]),
        ];
        let naive_with = |x: &[Tensor<4>], d| {
            let (q, k, v) = (x[0].clone(), x[1].clone(), x[2].clone());
            with_fixed_key(key, || naive::attend(q, k, v, (0, 0), vis, d).0)
        };
        let naive = |x: &[Tensor<4>]| naive_with(x, Some(&dropout));
        let flash = |x: &[Tensor<4>]| {
            let (q, k, v) = (x[0].clone(), x[1].clone(), x[2].clone());
            with_fixed_key(key, || attend_tiled(q, k, v, block, vis, Some(&dropout)))
        };
        let ops = |x: &[Tensor<4>]| {
            let (q, k, v) = (x[0].clone(), x[1].clone(), x[2].clone());
            attend_tiled_ops(q, k, v, block, vis, Some((p, key))).0
        };
        let undropped = naive_with(&leaves, None).detach();
        let diff = (naive(&leaves).detach() - undropped)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff > 0.1, "t={t}: dropout changed the output ({diff})");
        for (form, fast) in [
            ("flash", &flash as &dyn Fn(&[Tensor<4>]) -> Tensor<4>),
            ("tensor ops", &ops),
        ] {
            compare_forms(
                &format!("softmax {form} with dropout t={t} block={block} {vis:?}"),
                &leaves,
                [2, 3, t, 8],
                naive,
                fast,
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

/// Queries and keys with positive features (as elu+1 gives, so a normaliser is well
/// conditioned) and values, as gradient leaves.
fn qkv_leaves(b: usize, h: usize, t: usize, dk: usize, dv: usize) -> [Tensor<4>; 3] {
    let positive = Distribution::Uniform(0.1, 1.0);
    [
        leaf([b, h, t, dk], positive),
        leaf([b, h, t, dk], positive),
        normal([b, h, t, dv]),
    ]
}

#[test]
fn linear_attention_chunkwise_recurrent_and_quadratic_agree() {
    let (b, h, t, dk, dv) = (2, 2, 21, 4, 5);
    for decay in ["none", "fixed", "data-dependent"] {
        for normalize in [false, true] {
            let leaves = qkv_leaves(b, h, t, dk, dv);
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
                );
            }
            compare_forms(
                &format!("linear quadratic decay={decay} normalize={normalize}"),
                &leaves,
                [b, h, t, dv],
                |x| linear_attention::recurrent(linear_inputs(x, &log_decay), normalize),
                |x| linear_attention::quadratic(linear_inputs(x, &log_decay), normalize),
            );
            if decay == "data-dependent" {
                // The gate is learned: its gradient must match too.
                let probe =
                    random_tensor::<4>([b, h, t, dv], Distribution::Normal(0.0, 1.0), &device());
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
                assert_close(c, a, "linear: gradient of the log-decay");
            }
        }
    }
}

/// The bidirectional form (a forward and a reversed causal pass, the diagonal once, the
/// normaliser summed over both) against the full weight matrix built from its definition.
#[test]
fn linear_attention_bidirectional_forms_equal_the_full_matrix() {
    let (b, h, t, dk, dv) = (2, 2, 13, 4, 3);
    for decay in ["none", "fixed", "data-dependent"] {
        for normalize in [false, true] {
            let [q, k, v] = qkv_leaves(b, h, t, dk, dv);
            let leaves = [
                q,
                k,
                v,
                match decay {
                    "none" => Tensor::zeros([b, h, t, 1], &device()).require_grad(),
                    "fixed" => Tensor::full([b, h, t, 1], (0.9f32).ln(), &device()).require_grad(),
                    _ => leaf([b, h, t, 1], Distribution::Uniform(-0.5, 0.0)),
                },
            ];
            let inputs = |x: &[Tensor<4>]| LinearInputs {
                q: x[0].clone(),
                k: x[1].clone(),
                v: x[2].clone(),
                log_decay: x[3].clone().squeeze_dim(3),
            };
            let reference =
                |x: &[Tensor<4>]| linear_attention::quadratic_bidirectional(inputs(x), normalize);
            for chunk in [1, 4, 32] {
                compare_forms(
                    &format!(
                        "bidirectional linear decay={decay} normalize={normalize} chunk={chunk}"
                    ),
                    &leaves,
                    [b, h, t, dv],
                    reference,
                    |x| {
                        linear_attention::bidirectional(inputs(x), normalize, |i| {
                            linear_attention::chunkwise(i, false, chunk)
                        })
                    },
                );
            }
            // The fused recurrence on flex, run over the flipped sequence too.
            compare_forms(
                &format!("bidirectional linear fused decay={decay} normalize={normalize}"),
                &leaves,
                [b, h, t, dv],
                reference,
                |x| {
                    linear_attention::bidirectional(inputs(x), normalize, |i| {
                        metamix::mixers::fused_linear_attention::linear_scan(i, false)
                    })
                },
            );
            compare_forms(
                &format!("bidirectional linear recurrent decay={decay} normalize={normalize}"),
                &leaves,
                [b, h, t, dv],
                reference,
                |x| {
                    linear_attention::bidirectional(inputs(x), normalize, |i| {
                        linear_attention::recurrent(i, false)
                    })
                },
            );
        }
    }
}

#[test]
fn ssm_chunked_and_fused_scans_equal_sequential() {
    scan_forms_equal_sequential((2, 19, 6, 4), &[1, 4, 8, 64]);
}

/// Enough sequences that the fused scan takes its widest channel blocks (16 × 2 blocks of
/// 256), the second one partial.
#[test]
fn ssm_fused_scan_in_wide_blocks_equals_sequential() {
    scan_forms_equal_sequential((16, 5, 300, 3), &[]);
    // State rows in every group size the fused scan keeps in registers (8 + 4 + 1), and a
    // last chunk of channels narrower than a register.
    scan_forms_equal_sequential((3, 7, 21, 13), &[]);
    // More state rows than 16: dB's and dC's sums over channels 16 rows at a time, then
    // the rest one by one.
    scan_forms_equal_sequential((2, 9, 20, 19), &[]);
}

/// A `[d_inner, 1]`, one per channel shared by its state rows (Mamba-2's): the fused scan
/// takes one decay per channel and step and sums the rows' terms of dA; the reference forms
/// broadcast it.
#[test]
fn ssm_scans_with_a_shared_across_state_rows_equal_sequential() {
    scan_forms_equal_sequential_with((3, 7, 37, 16), &[1, 4], (true, 1));
    // Two segments of the backward's recompute, and groups of 8 + 4 + 1 rows.
    let t = metamix::mixers::selective_scan::SEGMENT + 5;
    scan_forms_equal_sequential_with((2, t, 20, 13), &[], (true, 1));
}

/// Δ `[b, t, heads]`, one per head of consecutive channels (Mamba-2's), against the
/// reference given Δ broadcast to the channels (its gradient summed back by autodiff).
#[test]
fn ssm_fused_scan_with_delta_per_head_equals_sequential() {
    // Heads of 32 channels, each two whole chunks of lanes (one value broadcast), A shared,
    // over two segments: Mamba-2's case.
    let t = metamix::mixers::selective_scan::SEGMENT + 3;
    scan_forms_equal_sequential_with((2, t, 64, 16), &[], (true, 2));
    // Heads of 48 channels in tasks of 32 (2 sequences × 3 blocks take the narrowest
    // width): a head's sums come from two tasks.
    scan_forms_equal_sequential_with((2, 9, 96, 5), &[], (false, 2));
    // Heads of 3 channels: a chunk's lanes cross heads, and the last chunk is partial.
    scan_forms_equal_sequential_with((3, 7, 21, 4), &[], (false, 7));
}

/// The fused scan and the chunked ones (chunk lengths `chunks`) against the sequential
/// reference at `(batch, steps, channels, state size)`, outputs and gradients.
fn scan_forms_equal_sequential(dims: (usize, usize, usize, usize), chunks: &[usize]) {
    scan_forms_equal_sequential_with(dims, chunks, (false, dims.2))
}

/// [`scan_forms_equal_sequential`] with A `[d_inner, 1]` where `shared`, and Δ
/// `[b, t, heads]` (broadcast to `d_inner / heads` channels each, for the forms other than
/// the fused one).
fn scan_forms_equal_sequential_with(
    (b, t, di, n): (usize, usize, usize, usize),
    chunks: &[usize],
    (shared, heads): (bool, usize),
) {
    let u = normal([b, t, di]);
    let delta = leaf([b, t, heads], Distribution::Uniform(0.001, 0.5));
    let b_in = normal([b, t, n]);
    let c_in = normal([b, t, n]);
    let a = leaf(
        [di, if shared { 1 } else { n }],
        Distribution::Uniform(-4.0, -0.5),
    );
    // Δ as the fused scan takes it, or broadcast to the channels.
    let inputs = |per_head: bool| ScanInputs {
        u: u.clone(),
        delta: match per_head || heads == di {
            true => delta.clone(),
            false => delta
                .clone()
                .unsqueeze_dim::<4>(3)
                .expand([b, t, heads, di / heads])
                .reshape([b, t, di]),
        },
        a: a.clone(),
        b: b_in.clone(),
        c: c_in.clone(),
    };
    let probe = random_tensor::<3>([b, t, di], Distribution::Normal(0.0, 1.0), &device());
    let run = |f: &dyn Fn(ScanInputs) -> Tensor<3>, per_head: bool| {
        let y = f(inputs(per_head));
        let g = (y.clone() * probe.clone()).sum().backward();
        let g3 = |x: &Tensor<3>| x.grad(&g).unwrap();
        (
            y.detach(),
            [g3(&u), g3(&delta), g3(&b_in), g3(&c_in)],
            a.grad(&g).unwrap(),
        )
    };
    let (y_ref, g_ref, ga_ref) = run(&ssm::scan_sequential, false);
    let calls = metamix::mixers::selective_scan::FORWARD_CALLS.get();
    type Form = Box<dyn Fn(ScanInputs) -> Tensor<3>>;
    let mut forms: Vec<(String, Form, bool)> = vec![(
        "fused".into(),
        Box::new(|s| ssm::scan_fused_from(s, None).0),
        true,
    )];
    for &c in chunks {
        forms.push((
            format!("chunk={c}"),
            Box::new(move |s| ssm::scan_chunked(s, c)),
            false,
        ));
    }
    for (chunk, form, per_head) in forms {
        let (y, g, ga) = run(&*form, per_head);
        assert_close(y, y_ref.clone(), &format!("ssm {chunk}: output"));
        for (i, (x, r)) in g.into_iter().zip(g_ref.clone()).enumerate() {
            assert_close(x, r, &format!("ssm {chunk}: gradient {i}"));
        }
        assert_close(ga, ga_ref.clone(), &format!("ssm {chunk}: gradient of A"));
    }
    // The fused form ran the fused scan extension.
    assert!(metamix::mixers::selective_scan::FORWARD_CALLS.get() > calls);
}

/// The fused scan from a given state, and the final state it returns (what sequence
/// parallelism passes on), against the reference: outputs and every gradient, the start
/// state's included; with more channels than one parallel block, and more steps than two
/// of the backward's recompute segments.
#[test]
fn ssm_fused_scan_carries_state_like_the_reference() {
    let (b, t, di, n) = (2, 2 * metamix::mixers::selective_scan::SEGMENT + 9, 37, 5);
    let u = normal([b, t, di]);
    let delta = leaf([b, t, di], Distribution::Uniform(0.001, 0.5));
    let b_in = normal([b, t, n]);
    let c_in = normal([b, t, n]);
    let a = leaf([di, n], Distribution::Uniform(-4.0, -0.5));
    let h0 = normal([b, di, n]);
    let probe_y = random_tensor::<3>([b, t, di], Distribution::Normal(0.0, 1.0), &device());
    let probe_h = random_tensor::<3>([b, di, n], Distribution::Normal(0.0, 1.0), &device());
    let run = |f: &dyn Fn(ScanInputs, Option<Tensor<3>>) -> (Tensor<3>, Tensor<3>)| {
        let inputs = ScanInputs {
            u: u.clone(),
            delta: delta.clone(),
            a: a.clone(),
            b: b_in.clone(),
            c: c_in.clone(),
        };
        let (y, h) = f(inputs, Some(h0.clone()));
        let loss = (y.clone() * probe_y.clone()).sum() + (h.clone() * probe_h.clone()).sum();
        let g = loss.backward();
        let grads = [&u, &delta, &b_in, &c_in, &h0].map(|x| x.grad(&g).unwrap());
        (y.detach(), h.detach(), grads, a.grad(&g).unwrap())
    };
    let (y_ref, h_ref, g_ref, ga_ref) = run(&ssm::scan_sequential_from);
    let (y, h, g, ga) = run(&ssm::scan_fused_from);
    assert_close(y, y_ref, "fused from a state: output");
    assert_close(h, h_ref, "fused from a state: final state");
    for (i, (x, r)) in g.into_iter().zip(g_ref).enumerate() {
        assert_close(x, r, &format!("fused from a state: gradient {i}"));
    }
    assert_close(ga, ga_ref, "fused from a state: gradient of A");
}

#[test]
fn pool_cumsum_equals_direct_loop() {
    for causal in [true, false] {
        for k in [1, 2, 3, 4, 7] {
            let pool = Pool::new(
                &PoolOptions {
                    pool_size: k,
                    causal: None,
                },
                causal,
            );
            let x = [normal([2, 9, 5])];
            compare_forms(
                &format!("pool k={k} causal={causal}"),
                &x,
                [2, 9, 5],
                |x| pool.forward_loop(x[0].clone()),
                |x| pool.forward_cumsum(x[0].clone()),
            );
        }
    }
    // Padded batches: the prefix-sum form against the per-position loop over real positions.
    let padding = metamix::padding::Padding::from_lengths(&[9, 5], 9, &device());
    for causal in [true, false] {
        for k in [1, 3, 4] {
            let pool = Pool::new(
                &PoolOptions {
                    pool_size: k,
                    causal: None,
                },
                causal,
            );
            compare_forms(
                &format!("padded pool k={k} causal={causal}"),
                &[normal([2, 9, 5])],
                [2, 9, 5],
                |x| pool.forward_padded_loop(x[0].clone(), &padding),
                |x| pool.forward_padded_cumsum(x[0].clone(), &padding),
            );
        }
    }
    // By hand: causal window 2 over [1, 3, 5] averages [1], [1, 3], [3, 5].
    let pool = Pool::new(
        &PoolOptions {
            pool_size: 2,
            causal: None,
        },
        true,
    );
    let x = Tensor::<3>::from_data(
        TensorData::new(vec![1.0f32, 3.0, 5.0], [1, 3, 1]),
        &Device::flex(),
    );
    let y: Vec<f32> = pool.forward_cumsum(x).into_data().try_to_vec().unwrap();
    assert_eq!(y, vec![0.0, -1.0, -1.0]);
}

/// Every registered mixer (two layers of it), and two hybrids.
fn mixer_lists() -> Vec<Vec<MixerKind>> {
    let mut lists: Vec<Vec<MixerKind>> = MixerKind::ALL.iter().map(|&k| vec![k, k]).collect();
    lists.push(vec![MixerKind::Ssm, MixerKind::Softmax]);
    lists.push(vec![MixerKind::Mamba2, MixerKind::Moh]);
    lists
}

/// For every mixer (and a hybrid), logits at position t do not change when a later token
/// changes: the model is causal end to end.
#[test]
fn every_mixer_is_causal_in_the_language_model() {
    let device = Device::flex();
    for mixers in mixer_lists() {
        for variant in [false, true] {
            // The fast forms, with blocks and chunks smaller than the sequence.
            let recipe = tiny_lm_with(
                &mixers,
                12,
                variant,
                &[
                    "model.softmax.tiled=true",
                    "model.softmax.block_size=4",
                    "model.moh.attention.tiled=true",
                    "model.moh.attention.block_size=4",
                    "model.ssm.scan=\"chunked\"",
                    "model.ssm.chunk_size=4",
                ],
            );
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
            let changed = (a_all - b_all).abs().max().into_scalar::<f32>();
            assert!(changed > 0.0, "{mixers:?}: the change had no effect at all");
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

fn moh(n_heads: usize, shared_heads: usize, top_k: usize) -> Moh {
    let ctx = MixerContext {
        d_model: 12,
        n_heads,
        n_layers: 1,
        bias: true,
        dropout: 0.0,
        init_std: 0.3,
        max_seq_len: 16,
        causal: true,
    };
    let options = MohOptions {
        shared_heads,
        top_k,
        ..Default::default()
    };
    options.validate(&ctx).expect("valid MoH options");
    Moh::init(&options, &ctx, &Device::flex())
}

#[test]
fn moh_with_every_head_shared_is_weighted_multi_head_attention() {
    use burn::tensor::activation::softmax;
    let device = Device::flex();
    let m = moh(3, 3, 0);
    let a = &m.attention;
    let x = random_tensor::<3>([2, 7, 12], Distribution::Normal(0.0, 1.0), &device);
    let split = |y: Tensor<3>| y.reshape([2, 7, 3, 4]).swap_dims(1, 2);
    let heads = naive::attend(
        split(a.q_proj.forward(x.clone())),
        split(a.k_proj.forward(x.clone())),
        split(a.v_proj.forward(x.clone())),
        (0, 0),
        Visibility::causal(0),
        None,
    )
    .0;
    let weights = softmax(m.shared_router.as_ref().unwrap().forward(x.clone()), 2)
        .swap_dims(1, 2)
        .unsqueeze_dim::<4>(3);
    let expected = a
        .out_proj
        .forward((heads * weights).swap_dims(1, 2).reshape([2, 7, 12]));
    let (y, aux) = m.forward_padded(x, None);
    assert!(aux.is_none(), "no routed heads, no balance loss");
    assert_close(y, expected, "moh, all heads shared");
}

#[test]
fn moh_aux_loss_is_the_balance_loss_times_its_coefficient() {
    let device = Device::flex();
    let m = moh(4, 1, 2);
    let x = random_tensor::<3>([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
    let balance = m
        .gates(x.clone())
        .balance_loss
        .unwrap()
        .into_scalar::<f32>();
    let (_, aux) = m.forward_padded(x, None);
    let aux = aux.unwrap().into_scalar::<f32>();
    let coef = MohOptions::default().aux_loss_coef as f32;
    assert!(balance > 0.0);
    assert!(
        (aux - coef * balance).abs() <= 1e-6 * balance,
        "{aux} vs {coef} x {balance}"
    );
}

#[test]
fn moh_router_picks_exactly_k_routed_heads() {
    let device = Device::flex();
    for (n_heads, shared, k) in [(6, 2, 2), (6, 0, 3), (4, 1, 1)] {
        let m = moh(n_heads, shared, k);
        let x = random_tensor::<3>([3, 9, 12], Distribution::Normal(0.0, 1.0), &device);
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

/// Weight decay follows the kind of parameter, for every mixer's parameters: the weights of
/// linear maps and convolutions decay; biases, norms, embeddings, layer scales and the SSMs'
/// raw parameters (A_log, D, dt_bias) do not.
#[test]
fn weight_decay_is_decided_by_parameter_kind() {
    use metamix::components::optimizer::decay_plan;
    let all: Vec<MixerKind> = MixerKind::ALL.to_vec();
    let recipe = tiny_lm_with(
        &all,
        8,
        false,
        &[
            &format!("model.n_layers={}", all.len()),
            "model.layer_scale_init=0.1",
            "model.tie_embeddings=false",
        ],
    );
    let model = model_config(&recipe, 11).init_seeded(1, &Device::flex());
    let plan = decay_plan(&model);
    assert!(plan.len() > 20, "{plan:?}");
    for (path, decays) in &plan {
        let name = path.rsplit('.').next().unwrap();
        let no_decay = path.contains("embedding")
            || path.contains("norm")
            || path.contains("layer_scale")
            || matches!(name, "bias" | "A_log" | "D" | "dt_bias");
        assert_eq!(*decays, !no_decay, "{path}");
    }
    assert!(plan.iter().any(|(p, d)| p == "lm_head.weight" && *d));
    assert!(plan.iter().any(|(p, d)| p.ends_with("conv1d.weight") && *d));
}

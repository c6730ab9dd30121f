//! Every mixer, causal and bidirectional, under a key-padding mask: padded positions never
//! influence real ones (whatever they hold), a padded sequence's real outputs are those of
//! the sequence alone, the bidirectional form reads the future and the causal one does not;
//! and the SSMs' bidirectional fast forms equal their sequential references, gradients
//! included.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::assert_tensors_close;
use metamix::mixers::linear_attention::DecayMode;
use metamix::mixers::mamba2::Mamba2Form;
use metamix::mixers::ssm::ScanForm;
use metamix::mixers::{Mixer, MixerContext, MixerKind, MixerOptionsSet};
use metamix::padding::Padding;

const D: usize = 16;

fn ctx(causal: bool) -> MixerContext {
    MixerContext {
        d_model: D,
        n_heads: 4,
        n_layers: 2,
        bias: true,
        dropout: 0.0,
        // Larger than GPT-2's 0.02, so outputs are far from 0 and comparisons bite.
        init_std: 0.3,
        max_seq_len: 32,
        causal,
    }
}

/// Every mixer with its default options, plus the variants whose structure differs:
/// tiled attention, gated and RetNet linear decay, each SSM scan form, a wider pool.
fn variants() -> Vec<(String, MixerKind, MixerOptionsSet)> {
    let mut out: Vec<(String, MixerKind, MixerOptionsSet)> = MixerKind::ALL
        .iter()
        .map(|&k| (k.name().to_string(), k, MixerOptionsSet::default()))
        .collect();
    let mut o = MixerOptionsSet::default();
    o.softmax.tiled = Some(true);
    o.softmax.block_size = 3;
    out.push(("softmax tiled".into(), MixerKind::Softmax, o));
    for decay in [DecayMode::Gated, DecayMode::Retnet] {
        let mut o = MixerOptionsSet::default();
        o.linear.decay = decay;
        o.linear.chunk_size = 4;
        out.push((format!("linear {decay:?}"), MixerKind::Linear, o));
    }
    for scan in [ScanForm::Chunked, ScanForm::Sequential] {
        let mut o = MixerOptionsSet::default();
        o.ssm.scan = scan;
        o.ssm.chunk_size = 4;
        out.push((format!("ssm {scan:?}"), MixerKind::Ssm, o));
    }
    let mut o = MixerOptionsSet::default();
    o.mamba2.headdim = 8;
    o.mamba2.chunk_size = 4;
    o.mamba2.form = Mamba2Form::Sequential;
    out.push(("mamba2 sequential".into(), MixerKind::Mamba2, o));
    let mut o = MixerOptionsSet::default();
    o.pool.pool_size = 4;
    out.push(("pool 4".into(), MixerKind::Pool, o));
    for (_, kind, o) in &mut out {
        if *kind == MixerKind::Mamba2 {
            o.mamba2.headdim = 8;
        }
    }
    out
}

fn build(kind: MixerKind, options: &MixerOptionsSet, causal: bool, seed: u64) -> Mixer {
    build_on(kind, options, causal, seed, &Device::flex())
}

fn build_on(
    kind: MixerKind,
    options: &MixerOptionsSet,
    causal: bool,
    seed: u64,
    device: &Device,
) -> Mixer {
    let _guard = rng();
    Device::flex().seed(seed);
    kind.init(options, &ctx(causal), device)
}

/// Flex has one process-wide RNG and tests run in parallel: every draw holds this, so a
/// seeded init is not interleaved with another test's draws.
fn rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn random(shape: [usize; 3]) -> Tensor<3> {
    random_on(shape, &Device::flex())
}

fn random_on(shape: [usize; 3], device: &Device) -> Tensor<3> {
    let _guard = rng();
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn padding_never_reaches_real_positions_and_changes_nothing_real() {
    let (b, t) = (2, 10);
    let lengths = [10, 6];
    let device = Device::flex();
    let padding = Padding::from_lengths(&lengths, t, &device);
    for (name, kind, options) in variants() {
        for causal in [true, false] {
            let what = format!("{name} causal={causal}");
            let mixer = build(kind, &options, causal, 7);
            let x = random([b, t, D]);
            let (y, _) = mixer.forward_padded(x.clone(), Some(&padding));
            // Anything at all in the padding, even large values.
            let noise = random([b, t, D]).mul_scalar(30.0);
            let pad = (padding.column().neg().add_scalar(1.0)).expand([b, t, D]);
            let x2 = x.clone() * padding.column() + noise * pad;
            let (y2, _) = mixer.forward_padded(x2, Some(&padding));
            for (s, &n) in lengths.iter().enumerate() {
                let real = |y: Tensor<3>| y.narrow(0, s, 1).narrow(1, 0, n);
                assert_tensors_close(
                    real(y2.clone()),
                    real(y.clone()),
                    1e-4,
                    1e-5,
                    &format!("{what}: sequence {s} changed with its padding"),
                );
                // The real positions' outputs are those of the sequence alone, unpadded.
                let alone = mixer.forward(x.clone().narrow(0, s, 1).narrow(1, 0, n));
                assert_tensors_close(
                    real(y.clone()),
                    alone,
                    1e-4,
                    1e-5,
                    &format!("{what}: sequence {s} padded differs from it alone"),
                );
            }
        }
    }
}

#[test]
fn bidirectional_forms_read_the_future_causal_forms_do_not() {
    let t = 9;
    for (name, kind, options) in variants() {
        for causal in [true, false] {
            let mixer = build(kind, &options, causal, 3);
            let x = random([1, t, D]);
            let later = Tensor::cat(vec![x.clone().narrow(1, 0, t - 1), random([1, 1, D])], 1);
            let (y, y_later) = (mixer.forward(x), mixer.forward(later));
            let change = |p: usize| {
                let at = |y: Tensor<3>| y.narrow(1, p, 1);
                (at(y.clone()) - at(y_later.clone()))
                    .abs()
                    .max()
                    .into_scalar::<f32>()
            };
            if causal {
                for p in 0..t - 1 {
                    assert_eq!(
                        change(p),
                        0.0,
                        "{name}: causal, yet the last token reached {p}"
                    );
                }
            } else {
                // Pooling is local: its window reaches one position ahead; the rest reach all.
                let p = if kind == MixerKind::Pool { t - 2 } else { 0 };
                assert!(
                    change(p) > 1e-6,
                    "{name}: bidirectional, yet {p} never saw the last"
                );
            }
        }
    }
}

/// The bidirectional SSMs on a padded batch: the fast scans against the sequential
/// references, outputs and the gradient with respect to the input (both directions, the
/// padding's masking and the reverse parameters all lie on that path).
#[test]
fn bidirectional_ssm_fast_forms_equal_the_sequential_reference() {
    let device = Device::flex().autodiff();
    let (b, t) = (2, 11);
    let padding = Padding::from_lengths(&[11, 7], t, &device);
    let x = random_on([b, t, D], &device);
    let probe = random_on([b, t, D], &device);
    let run = |kind: MixerKind, options: &MixerOptionsSet| {
        let mixer = build_on(kind, options, false, 21, &device);
        let x = x.clone().require_grad();
        let (y, _) = mixer.forward_padded(x.clone(), Some(&padding));
        let grads = (y.clone() * probe.clone()).sum().backward();
        (y.detach(), x.grad(&grads).expect("input gradient"))
    };
    let mut reference = MixerOptionsSet::default();
    reference.ssm.scan = ScanForm::Sequential;
    reference.mamba2.headdim = 8;
    reference.mamba2.form = Mamba2Form::Sequential;
    let cases = [
        (MixerKind::Ssm, "fused", ScanForm::Fused),
        (MixerKind::Ssm, "chunked", ScanForm::Chunked),
        (MixerKind::Mamba2, "chunked", ScanForm::Chunked),
    ];
    for (kind, form, scan) in cases {
        let mut fast = reference.clone();
        fast.ssm.scan = scan;
        fast.ssm.chunk_size = 4;
        fast.mamba2.form = Mamba2Form::Chunked;
        fast.mamba2.chunk_size = 4;
        let (y_ref, g_ref) = run(kind, &reference);
        let (y, g) = run(kind, &fast);
        let what = format!("bidirectional {kind} {form}");
        assert_tensors_close(y, y_ref, 1e-4, 1e-5, &format!("{what}: output"));
        assert_tensors_close(g, g_ref, 1e-4, 1e-5, &format!("{what}: input gradient"));
    }
}

/// Padding in the middle of a sequence: attention hides those keys and linear attention's
/// state passes them unchanged (no input, no decay), so the real positions' outputs are
/// those of the sequence with the padding cut out.
#[test]
fn attention_and_linear_attention_skip_padding_anywhere() {
    let device = Device::flex();
    let t = 10;
    let valid = [1., 1., 1., 0., 0., 1., 1., 1., 0., 1.];
    let real: Vec<i64> = (0..t as i64).filter(|&i| valid[i as usize] > 0.5).collect();
    let padding = Padding {
        valid: Tensor::<1>::from_data(TensorData::new(valid.to_vec(), [t]), &device)
            .reshape([1, t]),
    };
    let index = Tensor::<1, Int>::from_data(TensorData::new(real.clone(), [real.len()]), &device);
    for (name, kind, options) in variants() {
        if !matches!(
            kind,
            MixerKind::Softmax | MixerKind::Linear | MixerKind::Moh
        ) {
            continue;
        }
        for causal in [true, false] {
            let mixer = build(kind, &options, causal, 13);
            let x = random([1, t, D]);
            let (y, _) = mixer.forward_padded(x.clone(), Some(&padding));
            let compact = mixer.forward(x.select(1, index.clone()));
            assert_tensors_close(
                y.select(1, index.clone()),
                compact,
                1e-4,
                1e-5,
                &format!("{name} causal={causal}: padding in the middle was not skipped"),
            );
        }
    }
}

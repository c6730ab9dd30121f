//! Shared helpers for the integration tests: a tiny recipe whose run lives in a temp dir.

#![allow(dead_code)]

use std::path::Path;

use metamix::recipe::Recipe;
use metamix::train::TrainOptions;

/// A model small enough to train a few steps in well under a second.
pub const TINY: &str = include_str!("tiny.toml");

/// The tiny recipe with its run folder under `dir`, plus overrides.
pub fn tiny_recipe(dir: &Path, overrides: &[&str]) -> Recipe {
    let mut all = vec![format!("checkpoint.folder=\"{}\"", dir.display())];
    all.extend(overrides.iter().map(|s| s.to_string()));
    Recipe::from_toml_str(TINY, "tiny.toml", "tiny", &all).expect("tiny recipe is valid")
}

/// Every tensor of a safetensors file as (name, dtype, shape, raw bytes), sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Run the `metamix` binary with `args` and wait for it.
pub fn metamix(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_metamix"))
        .args(args)
        .output()
        .expect("run metamix")
}

/// What a command printed, stdout then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Train without a progress bar or log lines.
pub fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// Quietly continue from the newest intact checkpoint (`--resume`).
pub fn resuming() -> TrainOptions {
    TrainOptions {
        resume: true,
        ..quiet()
    }
}

/// Quietly train, stopping after `step` as if killed there.
pub fn killed_after(step: u64) -> TrainOptions {
    TrainOptions {
        stop_after: Some(step),
        ..quiet()
    }
}

/// The names and bytes of every tensor of checkpoint `step`'s model and optimizer files, for
/// bitwise comparison.
pub fn final_files(run_dir: &Path, step: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = run_dir.join("checkpoints").join(format!("step-{step}"));
    let flat = |f: &str| {
        tensors(&dir.join(f))
            .into_iter()
            .flat_map(|(n, _, _, b)| n.into_bytes().into_iter().chain(b))
            .collect::<Vec<u8>>()
    };
    (flat("model.safetensors"), flat("optimizer.safetensors"))
}

/// What `steps` optimizer steps of `recipe` report, run through the trainer's own setup
/// and step (on the recipe's ranks and precision): each step's output, the weights before
/// the first step and the final model.
pub fn step_outputs(
    recipe: &Recipe,
    steps: usize,
) -> (
    Vec<metamix::train::StepOutput>,
    Vec<f32>,
    metamix::train::Trainer,
) {
    let data =
        metamix::data::Dataset::open(&recipe.data, recipe.training.seed, None, true).unwrap();
    let mut trainer = metamix::train::Trainer::new(recipe, data.tokenizer.vocab_size()).unwrap();
    let before = weights(trainer.model());
    let outs = (0..steps).map(|_| trainer.step(&data.train)).collect();
    (outs, before, trainer)
}

/// `actual` is `expected` element by element: |a − e| ≤ atol + rtol·|e| everywhere; the
/// message names the worst element.
pub fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        // NaN is never within tolerance.
        let excess = match (a - e).abs() - (atol + rtol * e.abs()) {
            x if x.is_nan() => f32::INFINITY,
            x => x,
        };
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} where {} was expected (rtol {rtol:e}, atol {atol:e})",
            actual[i], expected[i]
        );
    }
}

/// [`assert_close`] for tensors of any rank (shapes must match).
pub fn assert_tensors_close<const D: usize>(
    actual: burn::prelude::Tensor<D>,
    expected: burn::prelude::Tensor<D>,
    rtol: f32,
    atol: f32,
    what: &str,
) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    assert_close(&values(actual), &values(expected), rtol, atol, what);
}

/// A tensor of `shape` drawn from `dist` by this thread's own generator, seeded from the
/// thread's name: libtest runs each test on a thread named after it, so a test draws the
/// same values on every run and machine, whatever runs beside it (Flex's one process-wide
/// generator is shared by the tests running in parallel).
pub fn random_tensor<const D: usize>(
    shape: [usize; D],
    dist: burn::tensor::Distribution,
    device: &burn::prelude::Device,
) -> burn::prelude::Tensor<D> {
    use metamix::testing::SeededValues;
    use std::hash::{Hash, Hasher};
    thread_local! {
        static VALUES: std::cell::RefCell<SeededValues> = std::cell::RefCell::new({
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::thread::current().name().hash(&mut h);
            SeededValues::new(h.finish())
        });
    }
    let values = VALUES.with_borrow_mut(|v| v.draw(shape.iter().product(), dist));
    burn::prelude::Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}

/// A tensor's values as f32.
pub fn values<const D: usize>(x: burn::prelude::Tensor<D>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// The update a run made, `after − before`, is the reference run's update to within
/// `rtol` of that update's size (L2 norms over every weight): a tolerance measured against
/// how far the weights moved, not against the weights.
pub fn assert_updates_match(
    before: &[f32],
    after: &[f32],
    ref_before: &[f32],
    ref_after: &[f32],
    rtol: f32,
    what: &str,
) {
    assert_eq!(
        before, ref_before,
        "{what}: both runs must start from the same weights"
    );
    let update: Vec<f32> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let ref_update: Vec<f32> = ref_after
        .iter()
        .zip(ref_before)
        .map(|(a, b)| a - b)
        .collect();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let size = norm(&ref_update);
    assert!(
        size > 0.0,
        "{what}: the reference run did not move the weights"
    );
    let diff: Vec<f32> = update.iter().zip(&ref_update).map(|(a, b)| a - b).collect();
    let e = norm(&diff) / size;
    assert!(
        e < rtol,
        "{what}: updates differ by {e:e} of their size (allowed {rtol:e})"
    );
}

/// Every weight of a model, flattened in visiting order.
pub fn weights(model: &metamix::model::LanguageModel) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::prelude::*;
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let v = param.val().into_data().convert::<f32>();
            self.0.extend(v.try_to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Every step's loss in `outs` is within `tol` (relative) of `reference`'s, and no step
/// was skipped.
pub fn assert_losses_follow(
    outs: &[metamix::train::StepOutput],
    reference: &[metamix::train::StepOutput],
    tol: f64,
    what: &str,
) {
    assert_eq!(outs.len(), reference.len(), "{what}: step counts");
    for (i, (a, b)) in outs.iter().zip(reference).enumerate() {
        let e = (a.loss - b.loss).abs() / b.loss;
        assert!(e < tol, "{what}: step {i}: loss {} vs {}", a.loss, b.loss);
        assert!(!a.skipped, "{what}: step {i} was skipped");
    }
}

/// A two-layer, d_model 16 language model recipe with these mixers, read through the same
/// parser and validation as a user's; MoH routes 2 of 3 heads. `variant` turns on the
/// options that change each mixer's structure: gated linear decay, grouped-query rotary
/// attention with a sliding window in the tiled form (softmax and MoH), the chunked SSM
/// scan, Mamba-2's groups and sequential form.
pub fn tiny_lm(
    mixers: &[metamix::mixers::MixerKind],
    seq_len: usize,
    variant: bool,
) -> metamix::recipe::Recipe {
    tiny_lm_with(mixers, seq_len, variant, &[])
}

/// [`tiny_lm`] with more `--set` overrides.
pub fn tiny_lm_with(
    mixers: &[metamix::mixers::MixerKind],
    seq_len: usize,
    variant: bool,
    extra: &[&str],
) -> metamix::recipe::Recipe {
    let names: Vec<String> = mixers.iter().map(|m| format!("\"{m}\"")).collect();
    let mut sets: Vec<String> = vec![
        "model.d_model=16".into(),
        "model.n_layers=2".into(),
        "model.n_heads=4".into(),
        format!("model.mixers=[{}]", names.join(",")),
        format!("training.seq_len={seq_len}"),
        "model.moh.shared_heads=1".into(),
        "model.moh.top_k=2".into(),
        "model.pool.pool_size=3".into(),
        "model.mamba2.headdim=8".into(),
        "model.mamba2.chunk_size=4".into(),
        "model.linear.chunk_size=4".into(),
    ];
    if variant {
        for attention in ["softmax", "moh.attention"] {
            sets.push(format!("model.{attention}.n_kv_heads=2"));
            sets.push(format!("model.{attention}.rotary=true"));
            sets.push(format!("model.{attention}.window=5"));
            // FlashAttention (and its ring blocks), in ragged tiles.
            sets.push(format!("model.{attention}.tiled=true"));
            sets.push(format!("model.{attention}.block_size=3"));
        }
        sets.extend([
            "model.linear.decay=\"gated\"".into(),
            "model.linear.normalize=false".into(),
            "model.position=\"none\"".into(),
            "model.ssm.scan=\"chunked\"".into(),
            "model.ssm.chunk_size=3".into(),
            "model.mamba2.ngroups=2".into(),
            "model.mamba2.form=\"sequential\"".into(),
        ]);
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    Recipe::from_toml_str("", "tiny_lm.toml", "tiny-lm", &sets).expect("tiny_lm is a valid recipe")
}

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

/// What `steps` optimizer steps of `recipe` report, run through the trainer's own step
/// (on the recipe's ranks and precision): each step's output, and the final weights.
pub fn step_outputs(
    recipe: &Recipe,
    steps: usize,
) -> (
    Vec<metamix::train::trainer::StepOutput>,
    metamix::model::LanguageModel,
    Option<metamix::train::LossScaler>,
) {
    use metamix::data::{Corpus, WindowSampler};
    use metamix::parallel::Ranks;
    use metamix::train::{AdamW, LossScaler};
    let t = &recipe.training;
    let ranks = Ranks::from_recipe(recipe).unwrap();
    let device = ranks.device(0).clone().autodiff();
    let corpus = Corpus::load(&recipe.data.path, recipe.data.val_fraction, None).unwrap();
    let config = metamix::run::model_config(recipe, corpus.tokenizer.vocab_size());
    let mut model = config.init_seeded(t.seed, &device);
    let mut optimizer = AdamW::new(recipe.optimizer.clone());
    let mut sampler = WindowSampler::new(t.seed);
    let mut scaler =
        (t.precision == metamix::recipe::Precision::F16).then(|| LossScaler::new(&t.loss_scaler));
    let mut outs = Vec::new();
    for _ in 0..steps {
        let (next, out) = metamix::train::trainer::train_step(
            model,
            &mut optimizer,
            &mut sampler,
            &corpus.train,
            recipe,
            recipe.optimizer.lr,
            &device,
            &ranks,
            scaler.as_mut(),
        );
        model = next;
        outs.push(out);
    }
    (outs, model, scaler)
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

/// Max |a − b| over max(1e-3, max |b|): relative for large values, absolute near zero.
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Every step's loss in `outs` is within `tol` (relative) of `reference`'s, and no step
/// was skipped.
pub fn assert_losses_follow(
    outs: &[metamix::train::trainer::StepOutput],
    reference: &[metamix::train::trainer::StepOutput],
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

/// A two-layer, d_model 16 language model recipe with these mixers; MoH routes 2 of 3
/// heads. `variant` turns on the options that change each mixer's structure: gated linear
/// decay, grouped-query rotary attention with a sliding window.
pub fn tiny_lm(
    mixers: &[metamix::mixers::MixerKind],
    seq_len: usize,
    variant: bool,
) -> metamix::recipe::Recipe {
    let mut recipe = metamix::recipe::Recipe {
        name: "tiny-lm".into(),
        model: metamix::recipe::ModelConfig {
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            mixers: Some(mixers.to_vec()),
            ..Default::default()
        },
        ..Default::default()
    };
    recipe.training.seq_len = seq_len;
    recipe.model.moh.shared_heads = 1;
    recipe.model.moh.top_k = 2;
    recipe.model.pool.pool_size = 3;
    if variant {
        recipe.model.linear.decay = metamix::recipe::DecayMode::Gated;
        recipe.model.linear.normalize = false;
        recipe.model.softmax.n_kv_heads = 2;
        recipe.model.softmax.rotary = true;
        recipe.model.softmax.window = 5;
        recipe.model.position = metamix::recipe::PositionKind::None;
    }
    recipe
}

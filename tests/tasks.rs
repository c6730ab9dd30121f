//! Tasks beyond next-token prediction end to end: generated and file-backed tasks train,
//! report accuracy and resume exactly; classification pools only real positions (mean or
//! CLS); sequence and data parallelism give what one device gives; `eval --set
//! task.seq_len` scores at another length; and bad task inputs are refused by name.

mod common;

use std::path::Path;

use burn::prelude::*;
use common::{
    assert_losses_follow, assert_tensors_close, assert_updates_match, final_files, killed_after,
    metamix, quiet, resuming, text, weights,
};
use metamix::model::language_model::Targets;
use metamix::padding::Padding;
use metamix::recipe::Recipe;
use metamix::run::{Run, task_model_config};
use metamix::tasks::{Example, Target, TaskData};
use metamix::train::{Trainer, train};

/// A tiny task run under `dir`: d_model 16, two layers, sequences of 16, six steps.
fn task_recipe(dir: &Path, kind: &str, extra: &[&str]) -> Recipe {
    let mut sets: Vec<String> = vec![
        format!("checkpoint.folder=\"{}\"", dir.display()),
        "checkpoint.interval=1".into(),
        "checkpoint.keep_latest_k=10".into(),
        "metrics.tensorboard=false".into(),
        "model.d_model=16".into(),
        "model.n_layers=2".into(),
        "model.n_heads=2".into(),
        format!("task.kind=\"{kind}\""),
        "task.seq_len=16".into(),
        "task.val_examples=12".into(),
        "task.listops.min_length=4".into(),
        "task.listops.max_depth=3".into(),
        "task.mqar.num_kv_pairs=3".into(),
        "task.mqar.vocab_size=16".into(),
        "task.selective_copy.num_tokens=4".into(),
        "training.batch_size=4".into(),
        "training.steps=6".into(),
        "training.eval_interval=3".into(),
        "training.eval_batches=1".into(),
        "lr_scheduler.warmup_steps=1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Recipe::from_toml_str("", "task.toml", kind, &sets).expect("a valid task recipe")
}

fn recipe_error(kind: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets: Vec<String> = vec![
        format!("checkpoint.folder=\"{}\"", tmp.path().display()),
        format!("task.kind=\"{kind}\""),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Recipe::from_toml_str("", "task.toml", kind, &sets)
        .expect_err("the recipe must be refused")
        .to_string()
}

#[test]
fn every_task_trains_reports_accuracy_and_resumes_exactly() {
    for (kind, extra) in [
        ("listops", vec!["model.causal=false"]),
        (
            "listops",
            vec!["model.causal=false", "model.pooling=\"cls\""],
        ),
        ("mqar", vec![]),
        ("selective_copy", vec![]),
        (
            "induction_heads",
            vec!["model.mixer=\"ssm\"", "model.position=\"none\""],
        ),
    ] {
        let what = format!("{kind} {extra:?}");
        let tmp = tempfile::tempdir().unwrap();
        let recipe = task_recipe(tmp.path(), kind, &extra);
        let s = train(&recipe, &quiet()).unwrap();
        assert_eq!(s.step, 6, "{what}");
        let accuracy = s
            .val_accuracy
            .unwrap_or_else(|| panic!("{what}: no val accuracy"));
        assert!(
            (0.0..=1.0).contains(&accuracy),
            "{what}: accuracy {accuracy}"
        );
        assert!(s.val_loss.is_some_and(f64::is_finite), "{what}");

        // Killed after step 3 and resumed: the same weights and optimizer state, bit for bit
        // (every batch is a function of the seed and its index).
        let again = tempfile::tempdir().unwrap();
        let recipe = task_recipe(again.path(), kind, &extra);
        assert!(train(&recipe, &killed_after(3)).is_ok());
        train(&recipe, &resuming()).unwrap();
        assert_eq!(
            final_files(&again.path().join(kind), 6),
            final_files(&tmp.path().join(kind), 6),
            "{what}: the resumed run differs"
        );
    }
}

/// A batch of sequences of different lengths: each sequence's class logits are those of the
/// sequence alone, with mean pooling and with a CLS vector, whatever the padding holds.
#[test]
fn classification_pools_only_real_positions() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    for pooling in ["mean", "cls"] {
        for mixer in ["softmax", "linear", "ssm", "mamba2", "pool", "moh"] {
            let recipe = task_recipe(
                tmp.path(),
                "listops",
                &[
                    "model.causal=false",
                    &format!("model.pooling=\"{pooling}\""),
                    &format!("model.mixer=\"{mixer}\""),
                    "model.mamba2.headdim=8",
                ],
            );
            let model = task_model_config(&recipe, 15, Some(10)).init_seeded(4, &device);
            let lengths = [16usize, 9, 5];
            let ids = |fill: i64| {
                let v: Vec<i64> = lengths
                    .iter()
                    .flat_map(|&n| {
                        (0..16).map(move |t| if t < n { (t * 5 % 15) as i64 } else { fill })
                    })
                    .collect();
                Tensor::<2, Int>::from_data(TensorData::new(v, [3, 16]), &device)
            };
            let padding = Padding::from_lengths(&lengths, 16, &device);
            let (a, _) = model.classify(ids(0), Some(&padding));
            let (b, _) = model.classify(ids(14), Some(&padding));
            let what = format!("{mixer} pooling={pooling}");
            assert_tensors_close(
                b,
                a.clone(),
                1e-4,
                1e-5,
                &format!("{what}: padding changed a class"),
            );
            for (s, &n) in lengths.iter().enumerate() {
                let alone = ids(0).narrow(0, s, 1).narrow(1, 0, n);
                let (c, _) = model.classify(alone, None);
                assert_tensors_close(
                    a.clone().narrow(0, s, 1),
                    c,
                    1e-4,
                    1e-5,
                    &format!("{what}: sequence {s} padded differs from it alone"),
                );
            }
        }
    }
}

/// `steps` trainer steps of a task recipe: outputs, weights before, the trainer.
fn task_steps(
    recipe: &Recipe,
    steps: usize,
) -> (Vec<metamix::train::StepOutput>, Vec<f32>, Trainer) {
    let data = TaskData::open(&recipe.task, recipe.seq_len(), recipe.training.seed, true).unwrap();
    let mut trainer = Trainer::with_classes(recipe, data.vocab_size(), data.num_classes()).unwrap();
    let before = weights(trainer.model());
    let outs = (0..steps).map(|_| trainer.step_task(&data)).collect();
    (outs, before, trainer)
}

/// Classification under sequence parallelism pools by summing every rank's real positions;
/// masked token targets sum per rank. Both, and data parallelism, train as one device does.
#[test]
fn tasks_under_sequence_and_data_parallelism_equal_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, mixer) in [
        ("listops", "softmax"),
        ("listops", "ssm"),
        ("mqar", "linear"),
        ("selective_copy", "mamba2"),
    ] {
        let mixer = format!("model.mixer=\"{mixer}\"");
        let recipe = |more: &[&str]| {
            let mut sets = vec![
                mixer.as_str(),
                "model.mamba2.headdim=8",
                "model.mamba2.chunk_size=4",
            ];
            sets.extend(more);
            task_recipe(tmp.path(), kind, &sets)
        };
        let (ref_out, ref_before, ref_trainer) = task_steps(&recipe(&[]), 2);
        for parallel in [
            vec!["parallelism.sequence_parallel_degree=2"],
            vec!["parallelism.data_parallel_degree=2"],
        ] {
            let what = format!("{kind} {mixer} {parallel:?}");
            let (out, before, trainer) = task_steps(&recipe(&parallel), 2);
            assert_losses_follow(&out, &ref_out, 1e-4, &what);
            for (a, b) in out.iter().zip(&ref_out) {
                let (a, b) = (a.accuracy.unwrap(), b.accuracy.unwrap());
                assert!((a - b).abs() < 1e-6, "{what}: accuracy {a} vs {b}");
            }
            assert_updates_match(
                &before,
                &weights(trainer.model()),
                &ref_before,
                &weights(ref_trainer.model()),
                1e-3,
                &what,
            );
        }
    }
}

#[test]
fn bad_task_recipes_are_refused_by_key() {
    let e = recipe_error("lm", &["model.causal=false"]);
    assert!(e.contains("model.causal") && e.contains("classify"), "{e}");
    let e = recipe_error("listops", &["model.pooling=\"cls\""]);
    assert!(
        e.contains("model.pooling") && e.contains("causal = false"),
        "{e}"
    );
    let e = recipe_error(
        "listops",
        &[
            "model.causal=false",
            "parallelism.sequence_parallel_degree=2",
        ],
    );
    assert!(e.contains("parallelism.sequence_parallel_degree"), "{e}");
    let e = recipe_error(
        "mqar",
        &[
            "task.seq_len=32",
            "task.mqar.num_kv_pairs=20",
            "task.mqar.vocab_size=128",
        ],
    );
    assert!(
        e.contains("task.mqar.num_kv_pairs") && e.contains("32"),
        "{e}"
    );
    let e = recipe_error(
        "selective_copy",
        &["task.seq_len=16", "task.selective_copy.num_tokens=12"],
    );
    assert!(
        e.contains("task.selective_copy.num_tokens") && e.contains("16"),
        "{e}"
    );
    let e = recipe_error("classify", &[]);
    assert!(e.contains("task.classify.train"), "{e}");
    let e = recipe_error("mqar", &["task.kindd=1"]);
    assert!(e.contains("kindd"), "{e}");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A generated ListOps example as LRA's TSV writes it: parentheses around every list.
fn tsv_line(e: &Example) -> String {
    let Target::Label(label) = e.target else {
        unreachable!()
    };
    let text = metamix::tasks::listops::to_text(e)
        .replace("[", "( [")
        .replace("]", "] )");
    format!("{text}\t{label}\n")
}

#[test]
fn lra_tsv_files_train_and_bad_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // LRA-format files from the generator: the reader strips the parentheses back off.
    let gen_recipe = task_recipe(dir, "listops", &[]);
    let data = TaskData::open(&gen_recipe.task, 16, 5, true).unwrap();
    let mut train_tsv = String::from("Source\tTarget\n");
    for e in data.train_examples(0, 24) {
        train_tsv.push_str(&tsv_line(&e));
    }
    let mut val_tsv = String::from("Source\tTarget\n");
    for e in &data.val {
        val_tsv.push_str(&tsv_line(e));
    }
    write(&dir.join("basic_train.tsv"), &train_tsv);
    write(&dir.join("basic_val.tsv"), &val_tsv);
    let files = |train: &str| {
        vec![
            format!("task.classify.train=\"{}\"", dir.join(train).display()),
            format!(
                "task.classify.val=\"{}\"",
                dir.join("basic_val.tsv").display()
            ),
            "task.classify.tokenizer=\"word\"".to_string(),
            "task.classify.strip_parens=true".to_string(),
            "model.causal=false".to_string(),
        ]
    };
    let sets = files("basic_train.tsv");
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let recipe = task_recipe(dir, "classify", &refs);
    let opened = TaskData::open(&recipe.task, 16, 1, true).unwrap();
    // At most 15 symbols and <unk>; every example back as generated, parentheses gone.
    assert!(opened.vocab_size() <= 16, "{}", opened.vocab_size());
    assert_eq!(opened.val.len(), data.val.len());
    for (read, generated) in opened.val.iter().zip(&data.val) {
        assert_eq!(read.tokens.len(), generated.tokens.len());
        assert_eq!(read.target, generated.target);
    }
    let s = train(&recipe, &quiet()).unwrap();
    assert!(s.val_accuracy.is_some());

    // Errors name the file and the line.
    write(&dir.join("no_header.tsv"), "[MAX 1 2 ]\t2\n");
    write(
        &dir.join("bad_label.tsv"),
        "Source\tTarget\n[MAX 1 2 ]\ttwo\n",
    );
    write(
        &dir.join("big_label.tsv"),
        "Source\tTarget\n[MAX 1 2 ]\t2\n[MIN 1 2 ]\t12\n",
    );
    write(&dir.join("empty.tsv"), "");
    for (file, expect, extra) in [
        ("no_header.tsv", "line 1", ""),
        ("bad_label.tsv", "line 2", ""),
        ("big_label.tsv", "line 3", "task.classify.num_classes=10"),
        ("empty.tsv", "no examples", ""),
        ("missing.tsv", "missing.tsv", ""),
    ] {
        let mut sets = files(file);
        if !extra.is_empty() {
            sets.push(extra.to_string());
        }
        let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
        let recipe = task_recipe(dir, "classify", &refs);
        let e = format!(
            "{:#}",
            TaskData::open(&recipe.task, 16, 1, true).err().expect(file)
        );
        assert!(e.contains(file) && e.contains(expect), "{file}: {e}");
    }
}

/// `eval --set task.seq_len` scores a trained model at another length (no position table);
/// a length past a learned table, sampling and exporting a task run are refused by name.
#[test]
fn task_runs_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("mqar.toml");
    let runs = tmp.path().join("runs");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nposition = \"none\"\n\
             [task]\nkind = \"mqar\"\nseq_len = 16\nval_examples = 8\n\
             [task.mqar]\nvocab_size = 16\nnum_kv_pairs = 2\n\
             [training]\nbatch_size = 4\nsteps = 2\neval_batches = 1\n\
             [checkpoint]\nfolder = \"{}\"\ninterval = 2\n[metrics]\ntensorboard = false\n",
            runs.display()
        ),
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap();
    let out = metamix(&["train", recipe, "--quiet"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("val accuracy"), "{}", text(&out));
    let run = runs.join("mqar");
    let run = run.to_str().unwrap();
    let out = metamix(&["eval", run, "--set", "task.seq_len=48"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("at seq_len 48") && text(&out).contains("accuracy"),
        "{}",
        text(&out)
    );
    let out = metamix(&["eval", run, "--set", "optimizer.lr=1"]);
    assert!(
        !out.status.success() && text(&out).contains("[task]"),
        "{}",
        text(&out)
    );
    for cmd in [vec!["sample", run], vec!["export", run, "--out", "x"]] {
        let out = metamix(&cmd);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("metamix eval"),
            "{cmd:?}: {}",
            text(&out)
        );
    }
    let run = Run::open(Path::new(run)).unwrap();
    assert!(run.tokenizer.is_none());

    // Learned positions cover the training length only.
    let out = metamix(&[
        "train",
        recipe,
        "--quiet",
        "--set",
        "model.position=\"learned\"",
        "--set",
        "name=\"learned\"",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let learned = runs.join("learned");
    let out = metamix(&[
        "eval",
        learned.to_str().unwrap(),
        "--set",
        "task.seq_len=48",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("16 positions"), "{}", text(&out));
}

/// Masked token targets score only their positions: a model's loss on MQAR ignores what it
/// predicts anywhere else.
#[test]
fn masked_targets_score_only_their_positions() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = task_recipe(tmp.path(), "mqar", &[]);
    let model = task_model_config(&recipe, 16, None).init_seeded(2, &device);
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new((0..32i64).map(|i| i % 16).collect(), [2, 16]),
        &device,
    );
    let weights = |w: Vec<f32>| Tensor::<2>::from_data(TensorData::new(w, [2, 16]), &device);
    let mut w = vec![0f32; 32];
    w[5] = 1.0;
    w[20] = 1.0;
    let tokens = |t: i64| {
        let mut v = vec![t; 32];
        v[5] = 3;
        v[20] = 7;
        Tensor::<2, Int>::from_data(TensorData::new(v, [2, 16]), &device)
    };
    let loss = |t: i64| {
        model
            .objective(
                ids.clone(),
                &Targets::Masked {
                    tokens: tokens(t),
                    weights: weights(w.clone()),
                },
                None,
            )
            .cross_entropy
            .into_scalar::<f32>()
    };
    assert_eq!(loss(0), loss(9), "unscored positions changed the loss");
    let logits = model.forward(ids.clone());
    let manual = metamix::model::objective::token_nll(logits, tokens(0));
    let expected = (manual
        .clone()
        .narrow(0, 0, 1)
        .narrow(1, 5, 1)
        .into_scalar::<f32>()
        + manual.narrow(0, 1, 1).narrow(1, 4, 1).into_scalar::<f32>())
        / 2.0;
    assert!(
        (loss(0) - expected).abs() < 1e-5,
        "{} vs {expected}",
        loss(0)
    );
}

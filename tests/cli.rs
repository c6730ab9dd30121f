//! The `metamix` binary end to end on a tiny recipe: train, eval, sample, export, and the
//! errors a user meets (bad recipe, missing data, unknown run) with a non-zero exit.

mod common;

use std::path::Path;

use common::{metamix, text};

fn write_recipe(dir: &Path) -> String {
    let path = dir.join("tiny.toml");
    let body = format!(
        "{}\n",
        include_str!("common/tiny.toml").replace("RUNS", &dir.join("runs").display().to_string())
    );
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn train_eval_sample_export_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    let out = metamix(&["train", &recipe, "--quiet", "--set", "training.steps=4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("done: step 4"), "{}", text(&out));
    let run = tmp.path().join("runs/tiny");
    let run = run.to_str().unwrap();
    // The run keeps the resolved recipe, overrides applied.
    let saved = std::fs::read_to_string(tmp.path().join("runs/tiny/recipe.toml")).unwrap();
    assert!(saved.contains("steps = 4"), "{saved}");

    let out = metamix(&["eval", run]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("val loss") && text(&out).contains("perplexity"));

    let sample = |seed: &str| {
        let o = metamix(&[
            "sample", run, "--prompt", "ROMEO:", "--tokens", "20", "--seed", seed,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let a = sample("1");
    assert!(
        a.starts_with("ROMEO:") && a.trim_end().chars().count() >= 20,
        "{a:?}"
    );
    assert_eq!(a, sample("1"), "a seed fixes sampling");

    let file = tmp.path().join("out");
    let out = metamix(&["export", run, "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
    ] {
        assert!(file.join(f).is_file(), "{f}");
    }
    // The model card states the run's measured validation loss.
    let card = std::fs::read_to_string(file.join("README.md")).unwrap();
    assert!(card.contains("Validation loss **"), "{card}");

    // --resume past the end and --init-from are accepted.
    let out = metamix(&[
        "train",
        &recipe,
        "--quiet",
        "--resume",
        "--set",
        "training.steps=6",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("done: step 6"), "{}", text(&out));
    let out = metamix(&[
        "train",
        &recipe,
        "--quiet",
        "--set",
        "name=\"from_export\"",
        "--set",
        "training.steps=2",
        "--init-from",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn user_errors_are_clear_and_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", &recipe, "--set", "training.stepz=3"],
            "tiny.toml: training.stepz: unknown field `stepz`",
        ),
        (
            &["train", &recipe, "--set", "data.path=\"data/missing.txt\""],
            "data.path: data/missing.txt: no such file or folder",
        ),
        (
            &["train", "recipes/nope.toml"],
            "recipes/nope.toml: (file): cannot read the recipe",
        ),
        (
            &["eval", "runs/definitely-not-a-run"],
            "no such run directory",
        ),
        (
            &["train", &recipe, "--init-from", "nope.safetensors"],
            "nope.safetensors: no such file",
        ),
    ];
    for (args, expected) in cases {
        let out = metamix(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
    }
}

/// `bench` prints tokens/s and the cores busy in its timed steps (with how much of that was
/// the pool spinning for work), leaves no run folder behind, and refuses zero timed steps.
#[test]
fn bench_reports_throughput_and_cores_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    let out = metamix(&["bench", &recipe, "--steps", "3", "--warmup", "1"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    let number_before = |marker: &str| -> f64 {
        let head = &printed[..printed.find(marker).unwrap_or_else(|| panic!("{printed}"))];
        let word = head.split_whitespace().last().unwrap();
        word.parse()
            .unwrap_or_else(|_| panic!("{word:?} in {printed}"))
    };
    assert!(number_before(" tokens/s (3 timed steps") > 0.0, "{printed}");
    let busy = number_before(" cores busy,");
    let waiting = number_before(" of them waiting for work");
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(busy > 0.0 && busy <= cores + 0.5, "{printed}");
    assert!((0.0..=busy + 0.5).contains(&waiting), "{printed}");
    assert!(
        !tmp.path().join("runs").exists(),
        "bench wrote a run folder"
    );

    let out = metamix(&["bench", &recipe, "--steps", "0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--steps 0"), "{}", text(&out));
}

//! A run nothing can damage: a failed command leaves the run as it was, every checkpoint
//! file is verified, one process per run, a signal saves and stops, write failures name
//! their path, and values that would crash or exhaust memory are refused by key.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{final_files, killed_after, quiet, resuming, tiny_recipe};
use metamix::recipe::Recipe;
use metamix::train::train;

fn metamix() -> Command {
    Command::new(env!("CARGO_BIN_EXE_metamix"))
}

/// The tiny recipe as a file whose runs go under `dir`, with `extra` lines appended to
/// `[training]`.
fn recipe_file(dir: &Path, training: &str) -> String {
    let path = dir.join("tiny.toml");
    let body = include_str!("common/tiny.toml")
        .replace("RUNS", &dir.join("runs").display().to_string())
        .replace("[training]\n", &format!("[training]\n{training}\n"))
        .replace("steps = 8\n", "");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn a_resume_that_changes_the_architecture_is_refused_and_the_run_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &[]);
    train(&r, &killed_after(4)).unwrap();
    let saved = std::fs::read(r.run_dir().join("recipe.toml")).unwrap();
    let wider = tiny_recipe(tmp.path(), &["model.d_model=64"]);
    let e = format!("{:#}", train(&wider, &resuming()).unwrap_err());
    assert!(e.contains("model.d_model: 32 → 64"), "{e}");
    assert_eq!(
        std::fs::read(r.run_dir().join("recipe.toml")).unwrap(),
        saved
    );
    // Still exportable; an optimizer change is allowed and recorded.
    let run = metamix::run::Run::open(&r.run_dir()).unwrap();
    metamix::export::export(
        &run,
        None,
        &tmp.path().join("x"),
        Default::default(),
        false,
        &|_| None,
    )
    .unwrap();
    let lower = tiny_recipe(tmp.path(), &["optimizer.lr=1e-4"]);
    train(&lower, &resuming()).unwrap();
    let recorded = Recipe::load(&r.run_dir().join("recipe.toml"), &[]).unwrap();
    assert_eq!(recorded.optimizer.lr, 1e-4);

    // A failed start (weights that do not exist) leaves no run folder behind.
    let fresh = tiny_recipe(&tmp.path().join("other"), &[]);
    let opts = metamix::train::TrainOptions {
        init_from: Some(tmp.path().join("missing.safetensors")),
        ..quiet()
    };
    train(&fresh, &opts).unwrap_err();
    assert!(
        !fresh.run_dir().exists(),
        "half-made run folder left behind"
    );
}

#[test]
fn a_changed_byte_in_trainer_state_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &[]);
    train(&r, &killed_after(4)).unwrap();
    let state = r.run_dir().join("checkpoints/step-4/trainer_state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let changed = text.replacen("\"tokens_seen\": 256", "\"tokens_seen\": 257", 1);
    assert_ne!(text, changed, "the test changes a value");
    std::fs::write(&state, changed).unwrap();
    let ckpt = metamix::components::Checkpoint {
        dir: state.parent().unwrap().to_path_buf(),
        step: 4,
    };
    let e = format!("{:#}", ckpt.verify().unwrap_err());
    assert!(
        e.contains("trainer_state.json") && e.contains("SHA-256"),
        "{e}"
    );
    // Resume falls back to the previous checkpoint, step 2.
    let found = metamix::components::Checkpoint::latest_valid(&r.run_dir()).unwrap();
    assert_eq!(found.unwrap().0.step, 2);
}

#[test]
fn a_second_process_is_refused_while_the_first_holds_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let file = recipe_file(tmp.path(), "steps = 1000000");
    let mut first = metamix()
        .args(["train", &file, "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = tmp.path().join("runs/tiny");
    wait_for("the first run to start", || {
        run.join("recipe.toml").exists()
    });
    let second = metamix()
        .args(["train", &file, "--resume"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        text.contains(&format!("PID {}", first.id())),
        "names the holder: {text}"
    );
    // Killed (no chance to clean up), the lock goes with it.
    first.kill().unwrap();
    first.wait().unwrap();
    let r = Recipe::load(Path::new(&file), &["training.steps=2".into()]).unwrap();
    train(&r, &resuming()).unwrap();
}

#[test]
fn sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 400;
    let file = recipe_file(tmp.path(), &format!("steps = {steps}"));
    let interrupted = metamix()
        .args([
            "train",
            &file,
            "--quiet",
            "--set",
            "checkpoint.interval=100000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = tmp.path().join("runs/tiny");
    // recipe.toml is written just before the first step, and the handler is installed
    // before that: the signal lands within the first few of the 400 steps.
    wait_for("training to start", || run.join("recipe.toml").exists());
    std::thread::sleep(Duration::from_millis(20));
    signal(&interrupted, "-TERM");
    let out = interrupted.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exits non-zero");
    assert!(text.contains("--resume"), "says how to continue: {text}");
    let saved = metamix::components::Checkpoint::list(&run).unwrap();
    assert_eq!(saved.len(), 1, "one checkpoint, at the step it stopped");
    let stopped_at = saved[0].step;
    assert!(stopped_at > 0 && stopped_at < steps, "step {stopped_at}");
    assert!(
        !run.join("checkpoints").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp")),
        "no temporary folder left"
    );

    let resumed = metamix()
        .args(["train", &file, "--resume", "--quiet"])
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let straight = Recipe::load(Path::new(&file), &["name=\"straight\"".into()]).unwrap();
    train(&straight, &quiet()).unwrap();
    let a = final_files(&straight.run_dir(), steps);
    let b = final_files(&run, steps);
    assert!(
        a.0 == b.0 && a.1 == b.1,
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn a_write_failure_names_the_path_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &[]);
    train(&r, &killed_after(2)).unwrap();
    // Something in the way of the next checkpoint's folder (as a full disk or a read-only
    // folder would be, but one that fails for root too).
    let blocker = r.run_dir().join("checkpoints/.tmp-step-4");
    std::fs::write(&blocker, "a file where a folder goes").unwrap();
    let e = format!("{:#}", train(&r, &resuming()).unwrap_err());
    assert!(e.contains(".tmp-step-4"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    std::fs::remove_file(&blocker).unwrap();
    // The last good checkpoint is intact and the run resumes.
    let (ckpt, _) = metamix::components::Checkpoint::latest_valid(&r.run_dir())
        .unwrap()
        .unwrap();
    assert_eq!(ckpt.step, 2);
    train(&r, &resuming()).unwrap();
}

#[test]
fn values_that_would_crash_or_exhaust_memory_are_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, key) in [
        ("model.init_std=inf", "model.init_std"),
        ("model.mlp_ratio=inf", "model.mlp_ratio"),
        ("model.norm_eps=inf", "model.norm_eps"),
        ("optimizer.eps=inf", "optimizer.eps"),
        ("optimizer.lr=nan", "optimizer.lr"),
    ] {
        let e = Recipe::from_toml_str(common::TINY, "tiny.toml", "tiny", &[set.into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("finite"), "{set}: {e}");
    }
    for set in [
        "model.d_model=1000000",
        "model.mlp_ratio=1e12",
        "training.batch_size=100000000",
    ] {
        let r = tiny_recipe(tmp.path(), &[set]);
        let e = format!("{:#}", train(&r, &quiet()).unwrap_err());
        assert!(
            e.contains("GiB") && e.contains("this machine has"),
            "{set}: {e}"
        );
    }
    // A smoke run shorter than the default warmup just runs.
    let r = Recipe::from_toml_str("", "r.toml", "r", &["training.steps=30".into()]).unwrap();
    assert_eq!(r.lr_scheduler.warmup_steps, 3);
}

#[test]
fn sample_and_eval_refuse_meaningless_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let file = recipe_file(tmp.path(), "steps = 2");
    assert!(
        metamix()
            .args(["train", &file, "--quiet"])
            .status()
            .unwrap()
            .success()
    );
    let run = tmp.path().join("runs/tiny");
    let run = run.to_str().unwrap();
    for args in [
        vec!["sample", run, "--temperature=-1"],
        vec!["sample", run, "--temperature", "nan"],
        vec!["eval", run, "--batches", "0"],
    ] {
        let out = metamix().args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text.contains("--temperature") || text.contains("--batches"),
            "{args:?}: {text}"
        );
    }
    // eval of a run does not depend on the working directory (its data is in the run).
    let out = metamix()
        .args(["eval", run])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_export_is_reproducible_readable_and_never_silently_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &["training.steps=2"]);
    train(&r, &quiet()).unwrap();
    let run = metamix::run::Run::open(&r.run_dir()).unwrap();
    let export = |out: &std::path::Path, force: bool| {
        metamix::export::export(&run, None, out, Default::default(), force, &|_| None)
            .map_err(|e| format!("{e:#}"))
    };
    let out = tmp.path().join("a");
    export(&out, false).unwrap();
    let weights = out.join("model.safetensors");
    let first = std::fs::read(&weights).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&weights).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
    let e = export(&out, false).unwrap_err();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    // A file name for --out is the old form: refused with the folder to use instead.
    let e = export(&tmp.path().join("b/model.safetensors"), false).unwrap_err();
    assert!(e.contains("names a file") && e.contains("b/model"), "{e}");
    // --force replaces an export folder, byte for byte the same for the same weights...
    export(&out, true).unwrap();
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        first,
        "same weights, same bytes"
    );
    // ...but never a folder holding anything else, which stays as it was.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = export(&out, true).unwrap_err();
    assert!(e.contains("notes.txt"), "{e}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read(&weights).unwrap(), first);
    // No partial folder is left behind by any of this.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

//! Checkpoint safety: a damaged newest checkpoint is skipped for the previous one (and the
//! run still ends exactly as an uninterrupted one), pruning keeps the newest k, and a
//! NaN loss stops the run naming the step while the last good checkpoint stays intact.

mod common;

use common::{final_files, killed_after, quiet, resuming, tiny_recipe};
use metamix::train::{Checkpoint, train};

#[test]
fn corrupt_newest_checkpoint_falls_back_to_previous_and_still_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tiny_recipe(&tmp.path().join("a"), &[]);
    train(&straight, &quiet()).unwrap();

    let split = tiny_recipe(&tmp.path().join("b"), &[]);
    train(&split, &killed_after(6)).unwrap();
    // Truncate step-6's weights, as a crash or a bad disk might.
    let model = split.run_dir().join("checkpoints/step-6/model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = Checkpoint::list(&split.run_dir()).unwrap()[0]
        .verify()
        .unwrap_err()
        .to_string();
    assert!(err.contains("step-6") && err.contains("corrupt"), "{err}");
    // A half-written temporary folder is never taken for a checkpoint.
    std::fs::create_dir_all(split.run_dir().join("checkpoints/.tmp-step-7")).unwrap();

    let (ckpt, _) = Checkpoint::latest_valid(&split.run_dir()).unwrap().unwrap();
    assert_eq!(ckpt.step, 4);
    train(&split, &resuming()).unwrap();
    assert!(final_files(&straight.run_dir(), 8) == final_files(&split.run_dir(), 8));
}

#[test]
fn keep_latest_k_prunes_old_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &["checkpoint.keep_latest_k=2"]);
    train(&r, &quiet()).unwrap();
    let steps: Vec<u64> = Checkpoint::list(&r.run_dir())
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![8, 6]);
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the weights up after the first update.
    let r = tiny_recipe(
        tmp.path(),
        &[
            "optimizer.lr=1e30",
            "lr_scheduler.warmup_steps=0",
            "lr_scheduler.decay=\"constant\"",
            "training.grad_clip=0",
            "checkpoint.interval=1",
        ],
    );
    let err = train(&r, &quiet()).unwrap_err().to_string();
    assert!(err.contains("step "), "{err}");
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    let list = Checkpoint::list(&r.run_dir()).unwrap();
    assert!(
        !list.is_empty(),
        "the good checkpoints before the blow-up are kept"
    );
    let good = list[0].verify().unwrap().step().unwrap();
    assert!(err.contains(&format!("step-{good}")), "{err}");
    assert!(err.contains(&format!("step {}", good + 1)), "{err}");
}

#[test]
fn resume_refuses_to_start_over_when_every_checkpoint_is_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &["training.steps=2", "checkpoint.interval=1"]);
    train(&r, &quiet()).unwrap();
    for c in Checkpoint::list(&r.run_dir()).unwrap() {
        std::fs::write(c.dir.join("optimizer.safetensors"), b"garbage").unwrap();
    }
    let err = train(&r, &resuming()).unwrap_err().to_string();
    assert!(err.contains("none of the 2 checkpoints"), "{err}");
    // The damaged checkpoints are still there for the user to inspect.
    assert_eq!(Checkpoint::list(&r.run_dir()).unwrap().len(), 2);
}

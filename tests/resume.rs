//! Kill-and-resume must continue a run exactly: a run killed after N steps and resumed to
//! 2N ends with bitwise the same weights and optimizer state as a run of 2N steps.
//!
//! This file holds one test on purpose: flex's RNG (dropout) is process-wide, and each
//! integration-test file is its own process, so no other test can draw from it meanwhile.

mod common;

use common::{final_files, killed_after, quiet, resuming, tiny_recipe};
use metamix::train::train;

/// Dropout and gradient accumulation are on, so their seeding is covered too.
const EXTRA: &[&str] = &["model.dropout=0.1", "training.micro_batch_size=2"];

#[test]
fn resumed_run_matches_uninterrupted_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tiny_recipe(&tmp.path().join("a"), EXTRA);
    let s = train(&straight, &quiet()).unwrap();
    assert_eq!(s.step, 8);

    let split = tiny_recipe(&tmp.path().join("b"), EXTRA);
    let first = train(&split, &killed_after(4)).unwrap();
    assert_eq!(first.step, 4);
    // Without --resume an existing run is refused rather than overwritten.
    let refused = train(&split, &quiet()).unwrap_err().to_string();
    assert!(refused.contains("--resume"), "{refused}");

    let resumed = train(&split, &resuming()).unwrap();
    assert_eq!(resumed.step, 8);

    let a = final_files(&straight.run_dir(), 8);
    let b = final_files(&split.run_dir(), 8);
    assert!(a.0 == b.0, "model weights differ after resume");
    assert!(a.1 == b.1, "optimizer state differs after resume");
    // The weights did change from step 4 to 8 (the comparison is not vacuous).
    assert!(final_files(&split.run_dir(), 4).0 != b.0);
}

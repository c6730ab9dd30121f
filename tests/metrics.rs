//! TensorBoard event files: a run with `metrics.tensorboard = true` writes one holding the
//! documented scalars; with it off, none.

mod common;

use common::{quiet, tiny_recipe};
use metamix::train::train;

fn event_bytes(run_dir: &std::path::Path) -> Option<Vec<u8>> {
    let dir = run_dir.join("tensorboard");
    let entry = std::fs::read_dir(dir).ok()?.next()?.ok()?;
    std::fs::read(entry.path()).ok()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn tensorboard_events_hold_the_documented_scalars() {
    let tmp = tempfile::tempdir().unwrap();
    let on = tiny_recipe(
        &tmp.path().join("on"),
        &["metrics.tensorboard=true", "training.steps=4"],
    );
    train(&on, &quiet()).unwrap();
    let bytes = event_bytes(&on.run_dir()).expect("an event file");
    for tag in ["train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(contains(&bytes, tag), "no {tag} in the event file");
    }

    let off = tiny_recipe(
        &tmp.path().join("off"),
        &["metrics.tensorboard=false", "training.steps=2"],
    );
    train(&off, &quiet()).unwrap();
    assert!(event_bytes(&off.run_dir()).is_none());
}

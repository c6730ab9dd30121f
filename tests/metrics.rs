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

/// Every event of a run's TensorBoard files (TFRecord: length, crc, event, crc).
fn events(run_dir: &std::path::Path) -> Vec<tensorboard_proto::event::Event> {
    let mut out = vec![];
    for entry in std::fs::read_dir(run_dir.join("tensorboard")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let mut at = 0;
        while at + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            out.push(
                <tensorboard_proto::event::Event as protobuf::Message>::parse_from_bytes(data)
                    .unwrap(),
            );
            at += 12 + len + 4;
        }
    }
    out
}

#[test]
fn a_resumed_run_marks_where_tensorboard_drops_the_replayed_steps() {
    use tensorboard_proto::event::SessionLog_SessionStatus;
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &["metrics.tensorboard=true"]);
    train(&r, &common::killed_after(4)).unwrap();
    let starts = |evs: &[tensorboard_proto::event::Event]| -> Vec<i64> {
        evs.iter()
            .filter(|e| e.get_session_log().get_status() == SessionLog_SessionStatus::START)
            .map(|e| e.get_step())
            .collect()
    };
    assert!(
        starts(&events(&r.run_dir())).is_empty(),
        "a fresh run purges nothing"
    );
    // Written in another second, so the resumed run gets its own event file.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    train(&r, &common::resuming()).unwrap();
    let evs = events(&r.run_dir());
    assert_eq!(starts(&evs), [5], "purge from the first replayed step");
    assert!(
        evs.iter().any(|e| e.get_step() == 8),
        "the resumed run logged on"
    );
}

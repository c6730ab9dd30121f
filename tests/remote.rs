//! Ranks in other processes: two `metamix serve` processes on 127.0.0.1 each host a CPU
//! device (burn-remote over WebSocket); a sequence-parallel run across them follows the
//! single-device run.
//! Without `--features remote` these tests are listed as ignored, naming the feature.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{assert_losses_follow, step_outputs, tiny_recipe};

/// A `metamix` child (a server, a run), stopped when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve() -> (Process, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_metamix"))
        .args(["serve", "--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start metamix serve");
    // The client waits for a server that is still starting.
    (Process(child), format!("ws://127.0.0.1:{port}"))
}

#[test]
#[cfg_attr(
    not(feature = "remote"),
    ignore = "needs `cargo test --features remote`"
)]
fn sequence_parallel_across_two_serve_processes_follows_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["model.mixers=[\"softmax\",\"ssm\"]", "model.n_layers=2"];
    let (reference, _, _) = step_outputs(&tiny_recipe(tmp.path(), &base), 2);
    let (_a, url_a) = serve();
    let (_b, url_b) = serve();
    let devices = format!("parallelism.devices=[\"{url_a}\",\"{url_b}\"]");
    let mut all = base.to_vec();
    all.extend(["parallelism.sequence_parallel_degree=2", &devices]);
    let (outs, _, _) = step_outputs(&tiny_recipe(tmp.path(), &all), 2);
    assert_losses_follow(&outs, &reference, 1e-5, "across two serve processes");
}

/// A rank that stops mid-run ends the run with an error that names the step and the last
/// good checkpoint, and that checkpoint stays on disk.
#[test]
#[cfg_attr(
    not(feature = "remote"),
    ignore = "needs `cargo test --features remote`"
)]
fn a_rank_that_stops_mid_run_ends_it_with_an_error_naming_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("tiny.toml");
    std::fs::write(&recipe, common::TINY).unwrap();
    let (_a, url_a) = serve();
    let (mut b, url_b) = serve();
    let sets = [
        format!("checkpoint.folder=\"{}\"", tmp.path().display()),
        "training.steps=1000000".into(),
        "parallelism.sequence_parallel_degree=2".into(),
        format!("parallelism.devices=[\"{url_a}\",\"{url_b}\"]"),
    ];
    let mut args = vec![
        "train".to_string(),
        recipe.display().to_string(),
        "--quiet".into(),
    ];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let errors = tmp.path().join("stderr.txt");
    let mut run = Process(
        Command::new(env!("CARGO_BIN_EXE_metamix"))
            .args(&args)
            .stderr(std::fs::File::create(&errors).unwrap())
            .spawn()
            .expect("start metamix train"),
    );
    let checkpoints = tmp.path().join("tiny").join("checkpoints");
    let waited = |done: &mut dyn FnMut() -> bool, what: &str| {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "waited 2 min for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    waited(&mut || checkpoints.join("step-4").exists(), "a checkpoint");
    let _ = b.0.kill();
    let _ = b.0.wait();
    let mut status = None;
    waited(
        &mut || {
            status = run.0.try_wait().unwrap();
            status.is_some()
        },
        "the run to stop",
    );
    let text = std::fs::read_to_string(&errors).unwrap();
    assert!(!status.unwrap().success(), "{text}");
    assert!(
        text.contains("a remote rank in parallelism.devices failed"),
        "{text}"
    );
    let named = text
        .split("the last good checkpoint, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no checkpoint named in: {text}"));
    assert!(
        checkpoints.join(named).join("model.safetensors").exists(),
        "{named}"
    );
}

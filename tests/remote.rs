//! Ranks in other processes: two `metamix serve` processes on 127.0.0.1 each host a CPU
//! device (burn-remote over WebSocket); a sequence-parallel run across them follows the
//! single-device run.
//! Without `--features remote` these tests are listed as ignored, naming the feature.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command};

use common::{assert_losses_follow, step_outputs, tiny_recipe};

/// A `metamix serve` child, stopped when dropped.
struct Server(Child);

impl Drop for Server {
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

fn serve() -> (Server, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_metamix"))
        .args(["serve", "--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start metamix serve");
    // The client waits for a server that is still starting.
    (Server(child), format!("ws://127.0.0.1:{port}"))
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

//! The metrics processor (torchtitan's `MetricsProcessor`): it owns when training scalars
//! are logged (`log_interval`), the throughput window between logs, and where numbers go
//! (TensorBoard event files when enabled; the caller shows the returned line).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_rs::summary::scalar;
use tensorboard_rs::summary_writer::FileWriter;

use crate::options::{OptionError, fail};

/// What one optimizer step reports to the metrics.
#[derive(Debug, Clone, Copy)]
pub struct StepMetrics {
    pub loss: f64,
    /// The mixers' weighted auxiliary loss (0 without one).
    pub aux_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// The f16 loss scale and the steps it skipped, when the run has a loss scaler.
    pub loss_scale: Option<(f64, u64)>,
}

pub struct Metrics {
    writer: Option<FileWriter>,
    /// Where TensorBoard events go (named in the warning when they cannot be written).
    dir: std::path::PathBuf,
    log_interval: u64,
    /// Tokens trained since the last log, and since when.
    window_tokens: u64,
    window_start: Instant,
}

impl Metrics {
    /// TensorBoard events go to `<run_dir>/tensorboard` when `config.tensorboard` is on. A
    /// resumed run first writes TensorBoard's purge marker at `purge_step`, the first step
    /// it replays (what PyTorch's `SummaryWriter(purge_step=...)` writes): TensorBoard drops
    /// the killed run's events from that step on, so replayed steps do not appear twice.
    pub fn new(run_dir: &Path, config: &MetricsConfig, purge_step: Option<u64>) -> Self {
        let dir = run_dir.join("tensorboard");
        let writer = config.tensorboard.then(|| {
            std::panic::catch_unwind(|| FileWriter::new(&dir)).map_err(|_| {
                eprintln!(
                    "warning: cannot create TensorBoard events in {}; training goes on without them",
                    dir.display()
                )
            })
        });
        let mut metrics = Self {
            writer: writer.and_then(Result::ok),
            dir,
            log_interval: config.log_interval,
            window_tokens: 0,
            window_start: Instant::now(),
        };
        if let Some(step) = purge_step {
            let mut version = Event::new();
            version.set_file_version("brain.Event:2".into());
            let mut start = Event::new();
            let mut log = SessionLog::new();
            log.set_status(SessionLog_SessionStatus::START);
            start.set_session_log(log);
            metrics.write(|w| {
                w.add_event(&version, step as usize);
                w.add_event(&start, step as usize);
            });
        }
        metrics
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        self.write(|w| w.add_summary(scalar(tag, value as f32), step as usize));
    }

    /// One TensorBoard write. The writer panics on an I/O error (a full disk): that turns
    /// TensorBoard off for the rest of the run, with a warning, instead of ending the run.
    fn write(&mut self, f: impl FnOnce(&mut FileWriter)) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(w))).is_err() {
            // Its destructor would flush and panic again.
            std::mem::forget(self.writer.take());
            eprintln!(
                "warning: cannot write TensorBoard events to {} (is the disk full?); training \
                 goes on without them",
                self.dir.display()
            );
        }
    }

    /// Count step `step` (of `last_step`), which trained `tokens` tokens; on a logging step
    /// write its scalars and return the progress line (loss, lr, tokens/s).
    pub fn step(
        &mut self,
        step: u64,
        last_step: u64,
        tokens: u64,
        m: &StepMetrics,
    ) -> Option<String> {
        self.window_tokens += tokens;
        if !(step.is_multiple_of(self.log_interval) || step == last_step) {
            return None;
        }
        let tps = self.window_tokens as f64 / self.window_start.elapsed().as_secs_f64();
        self.window_start = Instant::now();
        self.window_tokens = 0;
        self.scalar("train/loss", m.loss, step);
        if m.aux_loss != 0.0 {
            self.scalar("train/aux_loss", m.aux_loss, step);
        }
        self.scalar("lr", m.lr, step);
        self.scalar("grad_norm", m.grad_norm, step);
        self.scalar("tokens_per_s", tps, step);
        if let Some((scale, skipped)) = m.loss_scale {
            self.scalar("loss_scale", scale, step);
            self.scalar("skipped_steps", skipped as f64, step);
        }
        Some(format!(
            "loss {:.4} | lr {:.2e} | {tps:.0} tok/s",
            m.loss, m.lr
        ))
    }

    pub fn flush(&mut self) {
        self.write(|w| w.flush());
    }
}

/// `[metrics]`: console and TensorBoard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Log training scalars every this many steps.
    pub log_interval: u64,
    pub tensorboard: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            log_interval: 10,
            tensorboard: true,
        }
    }
}

impl MetricsConfig {
    /// Checks of `[metrics]` (keys relative to it).
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.log_interval == 0 {
            return fail("log_interval", "must be at least 1");
        }
        Ok(())
    }
}

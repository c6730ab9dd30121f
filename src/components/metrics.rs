//! Where numbers go: the console and, if enabled, TensorBoard event files.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::options::{OptionError, fail};

pub struct Metrics {
    writer: Option<SummaryWriter>,
}

impl Metrics {
    /// TensorBoard events go to `<run_dir>/tensorboard` when `tensorboard` is on.
    pub fn new(run_dir: &Path, tensorboard: bool) -> Self {
        Self {
            writer: tensorboard.then(|| SummaryWriter::new(run_dir.join("tensorboard"))),
        }
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        if let Some(w) = &mut self.writer {
            w.add_scalar(tag, value as f32, step as usize);
        }
    }

    pub fn flush(&mut self) {
        if let Some(w) = &mut self.writer {
            w.flush();
        }
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

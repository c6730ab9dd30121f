//! Where numbers go: the console and, if enabled, TensorBoard event files.

use std::path::Path;

use tensorboard_rs::summary_writer::SummaryWriter;

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

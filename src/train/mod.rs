//! The trainer, split by concern as torchtitan does: checkpoint, lr schedule, metrics,
//! optimizer, and the loop that ties them.

pub mod bench;
pub mod checkpoint;
pub mod lr_schedule;
pub mod metrics;
pub mod optimizer;
pub mod trainer;

pub use checkpoint::{Checkpoint, TrainerState};
pub use lr_schedule::LrSchedule;
pub use optimizer::AdamW;
pub use trainer::{TrainOptions, TrainSummary, train};

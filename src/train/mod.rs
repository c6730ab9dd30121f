//! The trainer, split by concern as torchtitan does: checkpoint, lr schedule, metrics,
//! optimizer, and the loop that ties them.

pub mod bench;
pub mod checkpoint;
pub mod loss_scaler;
pub mod lr_schedule;
pub mod metrics;
pub mod optimizer;
pub mod trainer;

pub use checkpoint::{Checkpoint, TrainerState};
pub use loss_scaler::LossScaler;
pub use lr_schedule::LrSchedule;
pub use optimizer::AdamW;
pub use trainer::{TrainOptions, TrainSummary, train};

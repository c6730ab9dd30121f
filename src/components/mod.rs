//! The trainer's parts, split by concern as torchtitan's components are: checkpoints,
//! optimizer, gradient clipping, LR schedule, loss scaler, metrics. Each owns its options
//! (its recipe section) beside its code and knows nothing of the loop that uses it.

pub mod checkpoint;
pub mod grad_clip;
pub mod loss_scaler;
pub mod lr_schedule;
pub mod metrics;
pub mod optimizer;
pub mod run_lock;
pub mod staged_folder;
pub mod stop_signal;

pub use checkpoint::{Checkpoint, CheckpointManager, Stateful};
pub use loss_scaler::LossScaler;
pub use lr_schedule::LrSchedule;
pub use metrics::Metrics;
pub use optimizer::AdamW;
pub use run_lock::RunLock;

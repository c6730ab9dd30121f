//! Training: the [`Trainer`] (one setup and one optimizer step, shared by `train`, `bench`
//! and the tests), the [`session`] loop that runs it to the end with checkpoints, eval and
//! metrics, the [`Ranks`] a step spreads over, and [`bench`].

pub mod bench;
pub mod ranks;
pub mod session;
pub mod trainer;

pub use crate::components::{AdamW, Checkpoint, LossScaler, LrSchedule};
pub use ranks::Ranks;
pub use session::{EVAL_SEED_SALT, RunData, TrainOptions, TrainSummary, train};
pub use trainer::{
    Batches, Evaluation, Progress, StepOutput, TaskEvaluation, Trainer, evaluate, evaluate_task,
};

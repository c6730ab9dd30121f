//! Parallelism: sequence parallelism (a sequence split across ranks, every mixer computing
//! exactly what it computes on one device) and data parallelism (the batch split across
//! model replicas). Ranks are Burn devices reached through a [`Transport`]; the whole step
//! is one autodiff graph, so gradients cross the same transport back to the master weights.
//!
//! - [`sequence_layout`]: which positions each rank holds (zigzag or contiguous chunks).
//! - [`transport`]: how a tensor reaches a rank.
//! - [`ring_attention`]: softmax attention over a sharded sequence, K/V passed round a ring.
//! - [`state_passing`]: recurrent mixers (linear attention, SSM, causal pooling) carry their
//!   state from chunk to chunk, rank to rank (LASP).
//! - [`replicas`]: the model on each rank, attached to the master weights.
//! - [`ranks`]: data × sequence parallel ranks, and a batch's loss over them.

pub mod ranks;
pub mod replicas;
pub mod ring_attention;
pub mod sequence_layout;
pub mod state_passing;
pub mod transport;

pub use ranks::Ranks;
pub use replicas::replicate;
pub use sequence_layout::{SequenceLayout, Sharding};
pub use transport::{LocalDevices, Transport};

/// What a sharded forward pass needs: where each position lives and how to reach it.
pub struct SequenceParallel<'a> {
    pub layout: SequenceLayout,
    pub transport: &'a dyn Transport,
}

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

pub mod replicas;
pub mod ring_attention;
pub mod sequence_layout;
pub mod state_passing;
pub mod transport;

pub use replicas::replicate;
pub use sequence_layout::{SequenceLayout, Sharding};
pub use transport::{LocalDevices, Transport};

use serde::{Deserialize, Serialize};

use crate::device::{BackendKind, DeviceSpec};
use crate::options::{OptionError, fail};

/// What a sharded forward pass needs: where each position lives and how to reach it.
pub struct SequenceParallel<'a> {
    pub layout: SequenceLayout,
    pub transport: &'a dyn Transport,
}

/// `[parallelism]`: data and sequence parallelism. `data_parallel_degree ×
/// sequence_parallel_degree` ranks; rank `g · sequence_parallel_degree + s` holds shard s of
/// replica g's sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelismConfig {
    /// Model replicas, each taking an equal slice of every micro-batch; gradients averaged.
    pub data_parallel_degree: usize,
    /// Ranks each sequence is split across (ring attention / state passing).
    pub sequence_parallel_degree: usize,
    /// `zigzag` (rank r holds chunks r and 2N−1−r: balanced causal work) or `contiguous`.
    pub sequence_sharding: Sharding,
    /// The device of each rank, written like `training.device`; empty = every rank on
    /// `training.device` (logical ranks: the same results, no extra hardware).
    pub devices: Vec<DeviceSpec>,
}

impl ParallelismConfig {
    pub fn ranks(&self) -> usize {
        self.data_parallel_degree * self.sequence_parallel_degree
    }
}

impl Default for ParallelismConfig {
    fn default() -> Self {
        Self {
            data_parallel_degree: 1,
            sequence_parallel_degree: 1,
            sequence_sharding: Sharding::Zigzag,
            devices: Vec::new(),
        }
    }
}

impl ParallelismConfig {
    /// Checks of `[parallelism]` (keys relative to it) for micro-batches of `micro` sequences
    /// on `backend`.
    pub fn validate(&self, micro: usize, backend: BackendKind) -> Result<(), OptionError> {
        for (k, v) in [
            ("data_parallel_degree", self.data_parallel_degree),
            ("sequence_parallel_degree", self.sequence_parallel_degree),
        ] {
            if v == 0 {
                return fail(k, "must be at least 1 (1 = off)");
            }
        }
        if !micro.is_multiple_of(self.data_parallel_degree) {
            return fail(
                "data_parallel_degree",
                format!(
                    "{} replicas cannot share micro-batches of {micro} sequences equally: \
                     use a divisor of training.micro_batch_size (or batch_size)",
                    self.data_parallel_degree
                ),
            );
        }
        if !self.devices.is_empty() && self.devices.len() != self.ranks() {
            return fail(
                "devices",
                format!(
                    "{} devices for {} ranks (data_parallel_degree {} x sequence_parallel_degree {}): \
                     give one per rank, or none to put every rank on training.device",
                    self.devices.len(),
                    self.ranks(),
                    self.data_parallel_degree,
                    self.sequence_parallel_degree
                ),
            );
        }
        if backend == BackendKind::Cpu
            && let Some(DeviceSpec::Gpu(k)) = self
                .devices
                .iter()
                .find(|d| matches!(d, DeviceSpec::Gpu(_)))
        {
            return fail(
                "devices",
                format!("the cpu backend has one device (got {k}): use \"default\""),
            );
        }
        Ok(())
    }
}

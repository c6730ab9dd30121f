//! State passing for recurrent mixers (LASP, Sun et al. 2024): chunk after chunk in position
//! order, each rank mixes its chunk starting from the state the previous chunk ended in
//! (linear attention's `KᵀV` prefix, the SSM's scan state and conv inputs, a pooling
//! window), then sends that state to the next chunk's rank. Nothing quadratic crosses ranks.

use burn::prelude::*;

use super::{SequenceParallel, Transport};

/// A recurrent state that can move to another rank.
pub trait Carry {
    fn send(self, transport: &dyn Transport, rank: usize) -> Self;
}

/// `mix(rank, chunk, state in) → (output, state out)` over the chunks of every rank's shard
/// `xs[r]` `[b, t_r, d]`, in position order. Returns each rank's output shard.
pub fn pass_state<S: Carry>(
    xs: Vec<Tensor<3>>,
    sp: &SequenceParallel,
    mut mix: impl FnMut(usize, Tensor<3>, Option<S>) -> (Tensor<3>, S),
) -> Vec<Tensor<3>> {
    let layout = &sp.layout;
    let mut chunks: Vec<Option<Tensor<3>>> = vec![None; layout.n_chunks()];
    for (r, x) in xs.into_iter().enumerate() {
        for (c, x) in layout.split_shard(r, x, 1) {
            chunks[c] = Some(x);
        }
    }
    let mut outputs: Vec<Option<Tensor<3>>> = vec![None; layout.n_chunks()];
    let mut state: Option<S> = None;
    for (c, x) in chunks.into_iter().enumerate() {
        let (rank, _) = layout.owner(c);
        let incoming = state.take().map(|s| s.send(sp.transport, rank));
        let (y, next) = mix(rank, x.expect("every chunk has an owner"), incoming);
        outputs[c] = Some(y);
        state = Some(next);
    }
    gather_shards(outputs, sp)
}

/// Per-chunk tensors (indexed by chunk) → each rank's shard, chunks in shard order.
pub fn gather_shards(mut chunks: Vec<Option<Tensor<3>>>, sp: &SequenceParallel) -> Vec<Tensor<3>> {
    (0..sp.layout.ranks)
        .map(|r| {
            let parts = sp
                .layout
                .chunks_of(r)
                .into_iter()
                .map(|c| chunks[c].take().expect("every chunk is mixed once"))
                .collect();
            Tensor::cat(parts, 1)
        })
        .collect()
}

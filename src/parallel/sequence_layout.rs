//! Which positions of a sequence each rank holds.
//!
//! The sequence is cut into equal chunks. `Contiguous`: N chunks, rank r holds chunk r.
//! `Zigzag` (head-tail, for causal attention): 2N chunks, rank r holds chunks r and
//! 2N − 1 − r, so every rank has as many early (cheap) as late (expensive) queries and the
//! ring's work is balanced. A rank's shard is its chunks concatenated in position order.

use std::ops::Range;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    Zigzag,
    Contiguous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceLayout {
    pub ranks: usize,
    pub seq_len: usize,
    pub sharding: Sharding,
}

impl SequenceLayout {
    /// `seq_len` must split into [`Self::n_chunks`] equal chunks (the recipe checks it).
    pub fn new(ranks: usize, seq_len: usize, sharding: Sharding) -> Self {
        let layout = Self {
            ranks,
            seq_len,
            sharding,
        };
        assert!(
            ranks > 0 && seq_len.is_multiple_of(layout.n_chunks()),
            "seq_len {seq_len} does not split into {} chunks",
            layout.n_chunks()
        );
        layout
    }

    pub fn n_chunks(&self) -> usize {
        match self.sharding {
            Sharding::Zigzag => 2 * self.ranks,
            Sharding::Contiguous => self.ranks,
        }
    }

    pub fn chunk_len(&self) -> usize {
        self.seq_len / self.n_chunks()
    }

    /// The chunks rank `r` holds, in position order.
    pub fn chunks_of(&self, rank: usize) -> Vec<usize> {
        match self.sharding {
            Sharding::Zigzag => vec![rank, 2 * self.ranks - 1 - rank],
            Sharding::Contiguous => vec![rank],
        }
    }

    /// The rank holding `chunk`, and where in that rank's shard the chunk starts.
    pub fn owner(&self, chunk: usize) -> (usize, usize) {
        let rank = match self.sharding {
            Sharding::Zigzag if chunk >= self.ranks => 2 * self.ranks - 1 - chunk,
            _ => chunk,
        };
        let slot = self
            .chunks_of(rank)
            .iter()
            .position(|&c| c == chunk)
            .unwrap();
        (rank, slot * self.chunk_len())
    }

    /// Global positions of chunk `c`.
    pub fn chunk_positions(&self, chunk: usize) -> Range<usize> {
        let c = self.chunk_len();
        chunk * c..(chunk + 1) * c
    }

    /// Global positions of rank `r`'s shard, in shard order.
    pub fn positions(&self, rank: usize) -> Vec<usize> {
        self.chunks_of(rank)
            .into_iter()
            .flat_map(|c| self.chunk_positions(c))
            .collect()
    }

    /// Split `x` along `dim` (the sequence) into one shard per rank, each sent to its rank.
    pub fn shard<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        x: Tensor<D, K>,
        dim: usize,
        transport: &dyn Transport,
    ) -> Vec<Tensor<D, K>> {
        (0..self.ranks)
            .map(|r| {
                let parts = self
                    .chunks_of(r)
                    .into_iter()
                    .map(|c| {
                        x.clone()
                            .narrow(dim, c * self.chunk_len(), self.chunk_len())
                    })
                    .collect();
                transport.send(Tensor::cat(parts, dim), r)
            })
            .collect()
    }

    /// The inverse of [`Self::shard`], gathered on `device`.
    pub fn unshard<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        shards: Vec<Tensor<D, K>>,
        dim: usize,
        device: &Device,
    ) -> Tensor<D, K> {
        let mut chunks: Vec<Option<Tensor<D, K>>> = vec![None; self.n_chunks()];
        for (r, shard) in shards.into_iter().enumerate() {
            let shard = shard.to_device(device);
            for (i, c) in self.chunks_of(r).into_iter().enumerate() {
                let len = self.chunk_len();
                chunks[c] = Some(shard.clone().narrow(dim, i * len, len));
            }
        }
        Tensor::cat(chunks.into_iter().map(Option::unwrap).collect(), dim)
    }

    /// Rank `r`'s shard cut back into its chunks: `(chunk id, tensor)` in position order.
    pub fn split_shard<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        rank: usize,
        shard: Tensor<D, K>,
        dim: usize,
    ) -> Vec<(usize, Tensor<D, K>)> {
        let len = self.chunk_len();
        self.chunks_of(rank)
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, shard.clone().narrow(dim, i * len, len)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_balances_and_covers_every_position_once() {
        let l = SequenceLayout::new(4, 32, Sharding::Zigzag);
        let mut all: Vec<usize> = (0..4).flat_map(|r| l.positions(r)).collect();
        assert_eq!(l.positions(0)[..4], [0, 1, 2, 3]);
        assert_eq!(l.positions(0)[4..], [28, 29, 30, 31]);
        // Causal work of a rank ∝ Σ (position + 1): equal for every rank.
        let work: Vec<usize> = (0..4)
            .map(|r| l.positions(r).iter().map(|p| p + 1).sum())
            .collect();
        assert!(work.iter().all(|&w| w == work[0]), "{work:?}");
        all.sort();
        assert_eq!(all, (0..32).collect::<Vec<_>>());
        for c in 0..8 {
            let (r, start) = l.owner(c);
            assert_eq!(l.positions(r)[start], c * 4);
        }
    }
}

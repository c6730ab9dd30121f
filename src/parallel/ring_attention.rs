//! Ring attention (Liu et al. 2023): softmax attention over a sequence sharded across
//! ranks. Each rank keeps its queries; the key/value shards travel round the ring, one hop
//! per step, and after N steps every rank has attended to every shard. Each block's output
//! merges into the running output with the log-sum-exp rule (in f32):
//! `out ← out − σ(lse_blk − lse)·(out − out_blk)`, `lse ← lse − log σ(lse − lse_blk)`.
//! Blocks wholly in a query chunk's future (or wholly outside its window) are skipped.
//!
//! Backward is autodiff through the same graph: the K/V hops are `to_device`s, whose
//! backward sends dK/dV back along the ring to their owner. No rank ever holds another
//! rank's queries or more than one `[chunk, chunk]` block of scores at a time in forward;
//! for its backward it keeps each visited K/V shard (O(seq · d) per rank) and, in the naive
//! block form, each block's probabilities; with `tile` > 0 on flex, FlashAttention's
//! recomputing backward keeps only each block's output and log-sum-exp.

use burn::prelude::*;

use super::SequenceParallel;
use crate::attention::tiled::attend_block;
use crate::attention::{Visibility, merge, naive, repeat_kv};

/// Per rank: q `[b, h, t_r, dk]`, k `[b, kv_h, t_r, dk]`, v `[b, kv_h, t_r, dv]` of the
/// positions the layout gives it (kv heads shared by `h / kv_h` query heads) → its output
/// `[b, h, t_r, dv]`. With `tile` > 0 each block pair runs tiled in `tile`-sized tiles
/// (FlashAttention where the backend has it, so a rank's training memory grows linearly
/// with its shard); 0 = the naive block form.
pub fn ring_attention(
    q: Vec<Tensor<4>>,
    k: Vec<Tensor<4>>,
    v: Vec<Tensor<4>>,
    visibility: Visibility,
    tile: usize,
    sp: &SequenceParallel,
) -> Vec<Tensor<4>> {
    let layout = &sp.layout;
    let n = layout.ranks;
    let groups = q[0].dims()[1] / k[0].dims()[1];
    let span = |c: usize| {
        let p = layout.chunk_positions(c);
        (p.start, p.end)
    };
    let q_chunks: Vec<Vec<(usize, Tensor<4>)>> = q
        .into_iter()
        .enumerate()
        .map(|(r, q)| layout.split_shard(r, q, 2))
        .collect();
    let mut acc: Vec<Vec<Option<(Tensor<4>, Tensor<4>)>>> =
        q_chunks.iter().map(|c| vec![None; c.len()]).collect();
    // (k, v, the rank whose positions they are), as held by each rank.
    let mut held: Vec<(Tensor<4>, Tensor<4>, usize)> = k
        .into_iter()
        .zip(v)
        .enumerate()
        .map(|(r, (k, v))| (k, v, r))
        .collect();
    for step in 0..n {
        for (r, (k, v, owner)) in held.iter().enumerate() {
            let kv: Vec<(usize, Tensor<4>, Tensor<4>)> = layout
                .split_shard(*owner, k.clone(), 2)
                .into_iter()
                .zip(layout.split_shard(*owner, v.clone(), 2))
                .map(|((c, k), (_, v))| (c, repeat_kv(k, groups), repeat_kv(v, groups)))
                .collect();
            for (slot, (qc, q)) in q_chunks[r].iter().enumerate() {
                // A query chunk's own keys come first (step 0): every row sees itself, so
                // the running log-sum-exp is finite before any merge.
                let mut order: Vec<&(usize, Tensor<4>, Tensor<4>)> = kv.iter().collect();
                order.sort_by_key(|(kc, _, _)| kc != qc);
                for (kc, k, v) in order {
                    if visibility.all_hidden(span(*qc), span(*kc)) {
                        continue;
                    }
                    let starts = (span(*qc).0, span(*kc).0);
                    let block = if tile > 0 {
                        attend_block(q.clone(), k.clone(), v.clone(), starts, visibility, tile)
                    } else {
                        naive::attend(q.clone(), k.clone(), v.clone(), starts, visibility, None)
                    };
                    acc[r][slot] = Some(merge(acc[r][slot].take(), block));
                }
            }
        }
        if step + 1 < n {
            // One hop: rank r passes what it holds to rank r + 1.
            let mut next: Vec<Option<(Tensor<4>, Tensor<4>, usize)>> = vec![None; n];
            for (r, (k, v, owner)) in held.into_iter().enumerate() {
                let to = (r + 1) % n;
                next[to] = Some((sp.transport.send(k, to), sp.transport.send(v, to), owner));
            }
            held = next.into_iter().map(Option::unwrap).collect();
        }
    }
    acc.into_iter()
        .map(|chunks| {
            Tensor::cat(
                chunks
                    .into_iter()
                    .map(|a| a.expect("every query chunk sees its own keys").0)
                    .collect(),
                2,
            )
        })
        .collect()
}

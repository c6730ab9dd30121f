//! PoolFormer's pooling mixer (Yu et al., "MetaFormer Is Actually What You Need"):
//! `avgpool(x) − x`, no parameters. The causal form averages a trailing window of
//! `pool_size` tokens (fewer at the start: padding is not counted, as in PoolFormer's
//! `count_include_pad=False`); the symmetric form (PoolFormer's original, for
//! `model.causal = false`) averages a centred window. Padded positions of a batch count as
//! positions that do not exist: a window averages the real positions it covers.

use burn::module::Module;
use burn::prelude::*;

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{MixerContext, MixerOptions, ShardedForm, TokenMixer};
use crate::options::{OptionError, at_least_one, fail};
use crate::padding::Padding;
use crate::parallel::SequenceParallel;
use crate::parallel::state_passing::gather_shards;

#[derive(Module, Debug)]
pub struct Pool {
    pool_size: usize,
    causal: bool,
}

impl Pool {
    /// The pooling of `options` in a model that is causal or not (`model_causal`).
    pub fn new(options: &PoolOptions, model_causal: bool) -> Self {
        Pool {
            pool_size: options.pool_size,
            causal: options.causal.unwrap_or(model_causal),
        }
    }
}

impl Pool {
    /// Window `[lo, hi)` of position `t` in a sequence of `len`.
    fn window(&self, t: usize, len: usize) -> (usize, usize) {
        let k = self.pool_size;
        if self.causal {
            ((t + 1).saturating_sub(k), t + 1)
        } else {
            let before = (k - 1) / 2;
            (t.saturating_sub(before), (t + k - before).min(len))
        }
    }

    /// Fast form: window sums as differences of one prefix sum over time.
    pub fn forward_cumsum(&self, x: Tensor<3>) -> Tensor<3> {
        let t = x.dims()[1];
        self.pool_span(x, 0, 0..t, t)
    }

    /// [`Self::forward_cumsum`] of a padded batch: window sums of the real positions over
    /// their count (a window with none gives 0), from prefix sums of `x · valid` and `valid`.
    pub fn forward_padded_cumsum(&self, x: Tensor<3>, padding: &Padding) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let device = x.device();
        let valid = padding.column(); // [b, t, 1]
        let prefix = |v: Tensor<3>| {
            let width = v.dims()[2];
            Tensor::cat(vec![Tensor::zeros([b, 1, width], &device), v.cumsum(1)], 1)
        };
        let (sums, counts) = (prefix(x.clone() * valid.clone()), prefix(valid));
        let (lo, hi): (Vec<i64>, Vec<i64>) = (0..t)
            .map(|i| {
                let (l, h) = self.window(i, t);
                (l as i64, h as i64)
            })
            .unzip();
        let idx = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [t]), &device);
        let (lo, hi) = (idx(lo), idx(hi));
        let window = |p: Tensor<3>| p.clone().select(1, hi.clone()) - p.select(1, lo.clone());
        let (sums, counts) = (window(sums), window(counts));
        sums / counts.clamp_min(1.0) - x
    }

    /// The outputs at positions `out` of a sequence of `len`, from `x` holding positions
    /// `x_start..` (which must cover every window of `out`): window sums as differences of
    /// one prefix sum over `x`.
    fn pool_span(&self, x: Tensor<3>, x_start: usize, out: Range<usize>, len: usize) -> Tensor<3> {
        let [b, _, d] = x.dims();
        let n = out.len();
        let device = x.device();
        let zero = Tensor::<3>::zeros([b, 1, d], &device);
        // prefix[i] = Σ_{s<i} x_s over x's own positions, i = 0..=x's length
        let prefix = Tensor::cat(vec![zero, x.clone().cumsum(1)], 1);
        let (lo, hi): (Vec<i64>, Vec<i64>) = out
            .clone()
            .map(|i| {
                let (l, h) = self.window(i, len);
                ((l - x_start) as i64, (h - x_start) as i64)
            })
            .unzip();
        let counts: Vec<f32> = lo.iter().zip(&hi).map(|(l, h)| (h - l) as f32).collect();
        let idx = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device);
        let sums = prefix.clone().select(1, idx(hi)) - prefix.select(1, idx(lo));
        let counts = Tensor::<1>::from_data(TensorData::new(counts, [n]), &device);
        sums / counts.reshape([1, n, 1]) - x.narrow(1, out.start - x_start, n)
    }

    /// Positions a window reaches before and after its own: the halo each chunk needs from
    /// its neighbours under sequence parallelism.
    pub fn halo(&self) -> (usize, usize) {
        let k = self.pool_size;
        if self.causal {
            (k - 1, 0)
        } else {
            let before = (k - 1) / 2;
            (before, k - 1 - before)
        }
    }

    /// Reference form of a padded batch: one sequence and one position at a time, the
    /// mean of the window's real positions, read from the mask on the host.
    pub fn forward_padded_loop(&self, x: Tensor<3>, padding: &Padding) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let valid: Vec<f32> = padding.valid.to_data().try_to_vec().expect("f32 mask");
        let rows: Vec<Tensor<3>> = (0..b)
            .map(|s| {
                let seq = x.clone().narrow(0, s, 1);
                let out: Vec<Tensor<3>> = (0..t)
                    .map(|i| {
                        let (lo, hi) = self.window(i, t);
                        let real: Vec<Tensor<3>> = (lo..hi)
                            .filter(|&j| valid[s * t + j] > 0.5)
                            .map(|j| seq.clone().narrow(1, j, 1))
                            .collect();
                        match real.len() {
                            0 => Tensor::zeros([1, 1, d], &x.device()),
                            _ => Tensor::cat(real, 1).mean_dim(1),
                        }
                    })
                    .collect();
                Tensor::cat(out, 1)
            })
            .collect();
        Tensor::cat(rows, 0) - x
    }

    /// Reference form: average each window with a slice, one position at a time.
    pub fn forward_loop(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let rows: Vec<Tensor<3>> = (0..t)
            .map(|i| {
                let (lo, hi) = self.window(i, t);
                x.clone().slice([0..b, lo..hi, 0..d]).mean_dim(1)
            })
            .collect();
        Tensor::cat(rows, 1) - x
    }
}

/// The last `pool_size − 1` inputs, `[b, ≤ pool_size − 1, d]` (none while pool_size is 1).
#[derive(Clone, Debug)]
pub struct PoolWindow {
    pub recent: Option<Tensor<3>>,
}

impl TokenMixer for Pool {
    type Options = PoolOptions;
    type State = PoolWindow;
    const SHARDED: ShardedForm = ShardedForm::Halo;

    fn init(options: &PoolOptions, ctx: &MixerContext, _device: &Device) -> Self {
        Self::new(options, ctx.causal)
    }

    /// Decoding is causal: a centred window would need tokens not generated yet.
    fn step(&self, x: Tensor<3>, state: Option<PoolWindow>) -> (Tensor<3>, PoolWindow) {
        let [b, _, d] = x.dims();
        let window = match state.and_then(|s| s.recent) {
            Some(recent) => Tensor::cat(vec![recent, x.clone()], 1),
            None => x.clone(),
        };
        let y = window.clone().mean_dim(1) - x;
        let len = window.dims()[1];
        let keep = (self.pool_size - 1).min(len);
        let recent = (keep > 0).then(|| window.slice([0..b, len - keep..len, 0..d]));
        (y, PoolWindow { recent })
    }

    fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let y = match padding {
            Some(p) => self.forward_padded_cumsum(x, p),
            None => self.forward_cumsum(x),
        };
        (y, None)
    }

    /// Halo exchange: each chunk gets the few positions its windows reach into the chunks
    /// beside it (the recipe keeps chunks at least `pool_size` long), then pools locally.
    fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let layout = &sp.layout;
        let (before, after) = ranks[0].halo();
        let len = layout.chunk_len();
        assert!(before.max(after) <= len, "pooling halo longer than a chunk");
        let mut chunks: Vec<Option<Tensor<3>>> = vec![None; layout.n_chunks()];
        for (r, x) in xs.into_iter().enumerate() {
            for (c, x) in layout.split_shard(r, x, 1) {
                chunks[c] = Some(x);
            }
        }
        let chunks: Vec<Tensor<3>> = chunks.into_iter().map(Option::unwrap).collect();
        let outputs = (0..layout.n_chunks())
            .map(|c| {
                let (rank, _) = layout.owner(c);
                let mut parts = Vec::new();
                if c > 0 && before > 0 {
                    let prev = chunks[c - 1].clone().narrow(1, len - before, before);
                    parts.push(sp.transport.send(prev, rank));
                }
                parts.push(chunks[c].clone());
                if c + 1 < chunks.len() && after > 0 {
                    parts.push(
                        sp.transport
                            .send(chunks[c + 1].clone().narrow(1, 0, after), rank),
                    );
                }
                let start = layout.chunk_positions(c).start;
                let x_start = if c > 0 { start - before } else { start };
                Some(ranks[rank].pool_span(
                    Tensor::cat(parts, 1),
                    x_start,
                    start..start + len,
                    layout.seq_len,
                ))
            })
            .collect();
        (gather_shards(outputs, sp), None)
    }
}

/// `[model.pool]`: PoolFormer's pooling mixer, `avgpool(x) − x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolOptions {
    pub pool_size: usize,
    /// A trailing window (true) or a centred one (false); unset: as `model.causal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causal: Option<bool>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            pool_size: 3,
            causal: None,
        }
    }
}

impl MixerOptions for PoolOptions {
    fn conventions(&self, _ctx: &MixerContext) -> Vec<String> {
        vec![format!(
            "PoolFormer's pooling, causal: y_p = mean(x_q for max(0, p − {}) ≤ q ≤ p) − x_p; the \
             mean counts only positions that exist (fewer at the start); no weights",
            self.pool_size - 1
        )]
    }

    fn validate(&self, ctx: &MixerContext) -> Result<(), OptionError> {
        at_least_one(&[("pool_size", self.pool_size)])?;
        if self.causal == Some(false) && ctx.causal {
            return fail(
                "causal",
                "false (a centred window) sees future positions, which a causal model \
                 (model.causal = true) must not: leave it out, so the window follows \
                 model.causal",
            );
        }
        Ok(())
    }

    fn validate_sharded(&self, chunk_len: usize) -> Result<(), OptionError> {
        if self.pool_size > chunk_len + 1 {
            return fail(
                "pool_size",
                format!(
                    "{} reaches past a neighbouring chunk: sequence parallelism cuts sequences \
                     into chunks of {chunk_len}; use pool_size <= {}",
                    self.pool_size,
                    chunk_len + 1
                ),
            );
        }
        Ok(())
    }
}

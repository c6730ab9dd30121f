//! Which keys a query sees, by global position: the one mask predicate behind every
//! attention form here (naive, tiled, flash, ring), and the key blocks a query block visits.

use burn::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// Keys at or before the query only.
    pub causal: bool,
    /// Only keys less than `window` positions before the query (itself included); 0 = all.
    pub window: usize,
}

impl Visibility {
    /// Causal attention, limited to the last `window` keys when `window` > 0.
    pub fn causal(window: usize) -> Self {
        Self {
            causal: true,
            window,
        }
    }

    /// Query `i` may not see key `j`.
    pub fn hidden(&self, i: usize, j: usize) -> bool {
        (self.causal && j > i) || (self.window > 0 && j + self.window <= i)
    }

    /// The keys query `i` (global) sees among `len` keys from global position `k_start`,
    /// as local positions `[lo, hi)`: a contiguous range, empty where it sees none.
    #[inline(always)]
    pub fn visible_keys(&self, i: usize, (k_start, len): (usize, usize)) -> (usize, usize) {
        let hi = if self.causal { i + 1 } else { usize::MAX };
        let lo = if self.window > 0 {
            (i + 1).saturating_sub(self.window)
        } else {
            0
        };
        let local = |g: usize| g.saturating_sub(k_start).min(len);
        let (lo, hi) = (local(lo), local(hi));
        (lo.min(hi), hi)
    }

    /// No query of `[q0, q1)` sees any key of `[k0, k1)`: the keys lie wholly in the
    /// future, or wholly before the window.
    pub fn all_hidden(&self, (q0, q1): (usize, usize), (k0, k1): (usize, usize)) -> bool {
        let future = self.causal && k0 > q1 - 1;
        let too_old = self.window > 0 && k1 - 1 + self.window <= q0;
        future || too_old
    }

    /// Some query of `[q0, q1)` does not see some key of `[k0, k1)`: the newest key is past
    /// the first query, or the oldest is out of the last query's window.
    pub fn any_hidden(&self, (q0, q1): (usize, usize), (k0, k1): (usize, usize)) -> bool {
        self.hidden(q0, k1 - 1) || self.hidden(q1 - 1, k0)
    }

    /// Of `len` keys starting at global position `k_start`, cut in `block`s, the blocks
    /// (local positions) that query block `[q0, q1)` (global) sees, the one holding the
    /// diagonal first: where every query sees itself, a running max is then finite after
    /// the first block, so masked scores get weight 0 after it.
    pub fn key_blocks(
        &self,
        (q0, q1): (usize, usize),
        (k_start, len): (usize, usize),
        block: usize,
    ) -> Vec<(usize, usize)> {
        let global = |(k0, k1): (usize, usize)| (k_start + k0, k_start + k1);
        let mut blocks: Vec<(usize, usize)> = (0..len)
            .step_by(block)
            .map(|k0| (k0, (k0 + block).min(len)))
            .filter(|&k| !self.all_hidden((q0, q1), global(k)))
            .collect();
        let holds_diagonal = |&k: &(usize, usize)| {
            let (k0, k1) = global(k);
            (k0..k1).contains(&q0)
        };
        if let Some(diagonal) = blocks.iter().position(holds_diagonal) {
            blocks[..=diagonal].rotate_right(1);
        }
        blocks
    }

    /// `[1, 1, q, k]`, true where hidden; `None` when every key is visible.
    pub fn mask(
        &self,
        q: (usize, usize),
        k: (usize, usize),
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        let (q0, q1) = q;
        let (k0, k1) = k;
        self.any_hidden(q, k).then(|| {
            let qi = Tensor::<1, Int>::arange(q0 as i64..q1 as i64, device).reshape([q1 - q0, 1]);
            let kj = Tensor::<1, Int>::arange(k0 as i64..k1 as i64, device).reshape([1, k1 - k0]);
            let future = self.causal.then(|| kj.clone().greater(qi.clone()));
            let too_old =
                (self.window > 0).then(|| kj.add_scalar(self.window as i64).lower_equal(qi));
            let hidden = match (future, too_old) {
                (Some(f), Some(o)) => f.bool_or(o),
                (f, o) => f.or(o).expect("`any_hidden` found a hidden key"),
            };
            hidden.unsqueeze::<4>()
        })
    }

    /// The same mask as additive scores on the host, row-major `[q, k]`: 0 where visible,
    /// `hidden_value` where hidden; `None` when every key is visible.
    pub fn bias_values(
        &self,
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
        hidden_value: f32,
    ) -> Option<Vec<f32>> {
        self.any_hidden((q0, q1), (k0, k1)).then(|| {
            (q0..q1)
                .flat_map(|i| {
                    (k0..k1).map(move |j| if self.hidden(i, j) { hidden_value } else { 0.0 })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: the blocks in which some query sees some key.
    fn seen(
        v: Visibility,
        q: (usize, usize),
        k_start: usize,
        len: usize,
        block: usize,
    ) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = (0..len)
            .step_by(block)
            .map(|k0| (k0, (k0 + block).min(len)))
            .filter(|&(k0, k1)| (q.0..q.1).any(|i| (k0..k1).any(|j| !v.hidden(i, k_start + j))))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn key_blocks_are_exactly_the_blocks_some_query_sees_diagonal_first() {
        for v in [
            Visibility::causal(0),
            Visibility::causal(5),
            Visibility {
                causal: false,
                window: 0,
            },
        ] {
            for (q, k_start) in [((8, 12), 0), ((0, 4), 0), ((20, 24), 8), ((3, 7), 10)] {
                let mut got = v.key_blocks(q, (k_start, 16), 3);
                let holds_diagonal =
                    |&(k0, k1): &(usize, usize)| (k_start + k0..k_start + k1).contains(&q.0);
                if got.iter().any(holds_diagonal) {
                    assert!(
                        holds_diagonal(&got[0]),
                        "{v:?} {q:?}: diagonal not first in {got:?}"
                    );
                }
                got.sort();
                assert_eq!(
                    got,
                    seen(v, q, k_start, 16, 3),
                    "{v:?} q {q:?} keys from {k_start}"
                );
            }
        }
    }
}

//! ListOps as in the Long Range Arena (Tay et al. 2021, "Long Range Arena: A Benchmark for
//! Efficient Transformers"), after Nangia & Bowman 2018: classify the value (0–9) of a nested
//! expression such as `[MAX 2 9 [MIN 4 7 ] 0 ]`. The generator follows LRA's
//! `lra_benchmarks/data/listops.py` (`generate_tree`, `to_value`); tokens are the expression
//! split on whitespace, as LRA's input pipeline feeds it once its parentheses are stripped.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::example::{Example, Target};
use crate::options::{OptionError, fail};

/// The vocabulary: token id `i` is `LISTOPS_SYMBOLS[i]` (digits first, so a digit's id is its value).
pub const LISTOPS_SYMBOLS: [&str; 15] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "[MIN", "[MAX", "[MED", "[SM", "]",
];
const FIRST_OP: u32 = 10;
const END: u32 = 14;
/// LRA's `VALUE_P`: a node that may still branch is a plain value with probability 0.75.
const VALUE_P: f64 = 0.25;
/// Trees drawn per example before giving up on a length range that is (nearly) unreachable.
const MAX_ATTEMPTS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListOpsOptions {
    /// Deepest level of the tree, the root being level 1; only levels below it hold
    /// operators, so an expression nests at most `max_depth − 1` operators (LRA: 10).
    pub max_depth: usize,
    /// Most arguments of one operator; each has at least 2 (LRA: 10).
    pub max_args: usize,
    /// Fewest tokens in an example; shorter trees are drawn again (LRA: 500, with
    /// `task.seq_len` 2000 the most).
    pub min_length: usize,
}

impl Default for ListOpsOptions {
    fn default() -> Self {
        Self {
            max_depth: 4,
            max_args: 5,
            min_length: 16,
        }
    }
}

impl ListOpsOptions {
    pub fn validate(&self, seq_len: usize) -> Result<(), OptionError> {
        if self.max_depth == 0 {
            return fail("max_depth", "must be at least 1 (the root is level 1)");
        }
        if self.max_args < 2 {
            return fail(
                "max_args",
                format!(
                    "is {} but an operator takes at least 2 arguments: use 2 or more",
                    self.max_args
                ),
            );
        }
        if self.min_length == 0 {
            return fail("min_length", "must be at least 1");
        }
        if self.min_length > seq_len {
            return fail(
                "min_length",
                format!(
                    "is {} but task.seq_len (the longest example) is {seq_len}: use at most {seq_len}",
                    self.min_length
                ),
            );
        }
        let longest = self.longest_possible();
        if self.min_length > longest {
            return fail(
                "min_length",
                format!(
                    "is {} but max_depth {} with max_args {} makes at most {longest} tokens: \
                     lower min_length to at most {longest} or raise max_depth or max_args",
                    self.min_length, self.max_depth, self.max_args
                ),
            );
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        LISTOPS_SYMBOLS.len()
    }

    pub fn num_classes(&self) -> usize {
        10
    }

    /// Trees are drawn until one has between `min_length` and `seq_len` tokens (both
    /// included), as LRA rejects by length. Panics after `MAX_ATTEMPTS` misses.
    pub fn example(&self, seq_len: usize, rng: &mut ChaCha8Rng) -> Example {
        let mut tokens = Vec::with_capacity(seq_len);
        for _ in 0..MAX_ATTEMPTS {
            tokens.clear();
            // A tree is abandoned as soon as it outgrows seq_len; it would be rejected anyway.
            if let Some(value) = self.tree(1, seq_len, &mut tokens, rng)
                && tokens.len() >= self.min_length
            {
                return Example {
                    tokens,
                    target: Target::Label(value),
                };
            }
        }
        panic!(
            "task.listops: no tree of {MAX_ATTEMPTS} drawn had between min_length {} and \
             seq_len {seq_len} tokens (max_depth {}, max_args {}): lower min_length or raise \
             max_depth or max_args",
            self.min_length, self.max_depth, self.max_args
        );
    }

    /// Appends one (sub)tree at `depth` to `out` and returns its value, or `None` once `out`
    /// holds more than `limit` tokens.
    fn tree(
        &self,
        depth: usize,
        limit: usize,
        out: &mut Vec<u32>,
        rng: &mut ChaCha8Rng,
    ) -> Option<u32> {
        let r: f64 = if depth < self.max_depth {
            rng.random()
        } else {
            1.0
        };
        if r > VALUE_P {
            let v = rng.random_range(0..10u32);
            out.push(v);
            return (out.len() <= limit).then_some(v);
        }
        let op = FIRST_OP + rng.random_range(0..4u32);
        out.push(op);
        let n = rng.random_range(2..=self.max_args);
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            args.push(self.tree(depth + 1, limit, out, rng)?);
        }
        out.push(END);
        (out.len() <= limit).then(|| apply(op, &mut args))
    }

    /// Most tokens a tree can have: a node below `max_depth` with `max_args` such children.
    fn longest_possible(&self) -> usize {
        (1..self.max_depth).fold(1usize, |below, _| {
            below.saturating_mul(self.max_args).saturating_add(2)
        })
    }
}

/// LRA's `to_value`: MED is `int(np.median(..))` (an even count truncates the mean of the
/// two middle values), SM is the sum mod 10.
fn apply(op: u32, args: &mut [u32]) -> u32 {
    match op - FIRST_OP {
        0 => *args.iter().min().unwrap(),
        1 => *args.iter().max().unwrap(),
        2 => {
            args.sort_unstable();
            let m = args.len() / 2;
            if args.len() % 2 == 1 {
                args[m]
            } else {
                (args[m - 1] + args[m]) / 2
            }
        }
        _ => args.iter().sum::<u32>() % 10,
    }
}

/// The value of a whitespace-split expression (`["[MAX", "2", "9", "]"]` → 9); `None` when
/// it is not exactly one well-formed expression.
pub fn evaluate(tokens: &[&str]) -> Option<u32> {
    // One frame per open operator: its id and the values of its arguments so far.
    let mut stack: Vec<(u32, Vec<u32>)> = Vec::new();
    let mut result = None;
    for &t in tokens {
        let id = LISTOPS_SYMBOLS.iter().position(|s| *s == t)? as u32;
        let value = match id {
            0..=9 => id,
            END => {
                let (op, mut args) = stack.pop()?;
                if args.len() < 2 {
                    return None;
                }
                apply(op, &mut args)
            }
            op => {
                stack.push((op, Vec::new()));
                continue;
            }
        };
        match stack.last_mut() {
            Some((_, args)) => args.push(value),
            None if result.is_none() => result = Some(value),
            None => return None,
        }
    }
    if stack.is_empty() { result } else { None }
}

/// The example as the space-separated expression (`[MAX 2 9 ]`).
pub fn to_text(example: &Example) -> String {
    let words: Vec<&str> = example
        .tokens
        .iter()
        .map(|&t| LISTOPS_SYMBOLS[t as usize])
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn eval(s: &str) -> Option<u32> {
        evaluate(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn evaluates_each_operator() {
        assert_eq!(eval("[MAX 2 9 [MIN 4 7 ] 0 ]"), Some(9));
        assert_eq!(eval("[MED 1 2 3 4 ]"), Some(2)); // median 2.5 truncates to 2
        assert_eq!(eval("[MED 9 2 5 ]"), Some(5));
        assert_eq!(eval("[SM 7 8 [MIN 9 6 ] ]"), Some(1));
        assert_eq!(eval("4"), Some(4));
        for bad in ["[MAX 2 ]", "[MAX 2 3", "2 3", "]", "[MAX 2 10 ]", ""] {
            assert_eq!(eval(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn examples_respect_lengths_shape_and_label() {
        let o = ListOpsOptions::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let e = o.example(64, &mut rng);
            assert!((16..=64).contains(&e.tokens.len()));
            assert!(e.tokens.iter().all(|&t| (t as usize) < o.vocab_size()));
            let text = to_text(&e);
            let Target::Label(label) = e.target else {
                panic!()
            };
            assert_eq!(eval(&text), Some(label), "{text}");
            // Nesting never reaches max_depth operators; arity is within 2..=max_args.
            let (mut open, mut deepest) = (vec![0usize], 0);
            for w in text.split(' ') {
                *open.last_mut().unwrap() += 1;
                if w.starts_with('[') {
                    open.push(0);
                    deepest = deepest.max(open.len() - 1);
                } else if w == "]" {
                    let args = open.pop().unwrap() - 1;
                    assert!((2..=o.max_args).contains(&args), "{text}");
                }
            }
            assert!(deepest < o.max_depth, "{text}");
        }
        let again = o.example(64, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(again, o.example(64, &mut ChaCha8Rng::seed_from_u64(1)));
    }

    #[test]
    fn validation_names_the_numbers() {
        let o = ListOpsOptions::default();
        assert!(o.validate(64).is_ok());
        assert_eq!(o.validate(10).unwrap_err().key, "min_length");
        // Depth 2, 3 arguments: at most 2 + 3 = 5 tokens.
        let shallow = ListOpsOptions {
            max_depth: 2,
            max_args: 3,
            min_length: 6,
        };
        let e = shallow.validate(100).unwrap_err();
        assert!(e.message.contains("at most 5 tokens"), "{}", e.message);
        let ok = ListOpsOptions {
            min_length: 5,
            ..shallow.clone()
        };
        assert!(ok.validate(100).is_ok());
        let e = ok.example(5, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(e.tokens.len(), 5);
        assert_eq!(
            ListOpsOptions { max_args: 1, ..o }
                .validate(64)
                .unwrap_err()
                .key,
            "max_args"
        );
    }
}

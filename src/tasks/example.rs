//! One example of a task: the token ids a model reads and what it is scored on.

/// One example. Token id 0 is never special: padding is marked by a mask, not an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub target: Target,
}

/// What an example is scored on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One class for the whole sequence (classification).
    Label(u32),
    /// Tokens to predict at some positions: `(position, token)` — the output at `position`
    /// (which reads `tokens[..=position]` in a causal model) should be `token`. Every other
    /// position carries no loss.
    Tokens(Vec<(usize, u32)>),
}

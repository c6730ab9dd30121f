//! What every options section shares: the error that names a key and says what would be
//! valid, and the small checks behind such errors.

/// A value that cannot be used: the key (relative to the section that checks it) and a
/// message that says what would be valid.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionError {
    pub key: String,
    pub message: String,
}

impl OptionError {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The same error, its key under `section` (`"model"` + `"d_model"` → `"model.d_model"`).
    pub fn within(self, section: &str) -> Self {
        Self {
            key: format!("{section}.{}", self.key),
            message: self.message,
        }
    }
}

/// `Err` for `key` with `message`.
pub fn fail<T>(key: &str, message: impl Into<String>) -> Result<T, OptionError> {
    Err(OptionError::new(key, message))
}

/// `0 < x < ∞`: false for NaN and infinity (so neither in a recipe is let through).
pub fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// `0 <= x < ∞`, false for NaN and infinity.
pub fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

/// Refuse 0 for each `(key, value)`.
pub fn at_least_one(pairs: &[(&str, usize)]) -> Result<(), OptionError> {
    for (k, v) in pairs {
        if *v == 0 {
            return fail(k, "must be at least 1");
        }
    }
    Ok(())
}

/// The divisors of `n`, shortened when there are many: for "use a divisor of n (e.g. ...)".
pub fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n.is_multiple_of(*k))
        .map(|k| k.to_string())
        .collect();
    if d.len() > 8 {
        format!("{}, ..., {}", d[..6].join(", "), d[d.len() - 1])
    } else {
        d.join(", ")
    }
}

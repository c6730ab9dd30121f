//! What the kernels' unit tests share: comparing a fast form with its reference.

/// The largest `|a − b|` over `b`'s scale (at least 1): absolute near zero, relative for
/// large values.
pub fn max_relative_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max)
}

//! What the tests share, the kernels' unit tests and `tests/`: comparing a fast form with
//! its reference, and inputs drawn without the device's generator.

use burn::tensor::Distribution;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The largest `|a − b|` over `b`'s scale (at least 1): absolute near zero, relative for
/// large values.
pub fn max_relative_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max)
}

/// Test inputs from a generator of their own: Flex has one process-wide generator, which
/// the tests running beside each other draw from too, so its values differ run to run.
pub struct SeededValues(StdRng);

impl SeededValues {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// `n` values from `dist` (uniform or normal).
    pub fn draw(&mut self, n: usize, dist: Distribution) -> Vec<f32> {
        let rng = &mut self.0;
        (0..n)
            .map(|_| match dist {
                Distribution::Uniform(lo, hi) => rng.random_range(lo..hi) as f32,
                // Box–Muller: rand 0.9 has no normal distribution of its own.
                Distribution::Normal(mean, std) => {
                    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (mean + std * z) as f32
                }
                other => panic!("SeededValues: {other:?} is not drawn here"),
            })
            .collect()
    }
}

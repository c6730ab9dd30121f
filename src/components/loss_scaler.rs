//! Dynamic loss scaling for f16 (PyTorch's `GradScaler`): f16's range (max 65504, smallest
//! normal 6e-5) would flush small gradients to zero, so the loss is multiplied by `scale`
//! before backward and the gradients divided by it before the update. A step whose
//! gradients overflow is skipped and the scale backed off; after `growth_interval` good steps
//! in a row it grows again. The state is part of every checkpoint.

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, fail};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the last growth or backoff.
    pub good_steps: u64,
    /// Steps skipped for overflow over the whole run.
    pub skipped_steps: u64,
}

impl LossScaler {
    pub fn new(config: &LossScalerConfig) -> Self {
        Self {
            scale: config.init_scale,
            good_steps: 0,
            skipped_steps: 0,
        }
    }

    /// After a step's backward: `finite` is whether every gradient was finite. Returns
    /// whether the step may be applied.
    pub fn update(&mut self, finite: bool, config: &LossScalerConfig) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= config.growth_interval {
                self.scale *= config.growth_factor;
                self.good_steps = 0;
            }
        } else {
            self.scale *= config.backoff_factor;
            self.good_steps = 0;
            self.skipped_steps += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_a_run_of_good_steps() {
        let config = LossScalerConfig {
            init_scale: 1024.0,
            growth_interval: 3,
            ..Default::default()
        };
        let mut s = LossScaler::new(&config);
        assert!(!s.update(false, &config));
        assert_eq!((s.scale, s.skipped_steps), (512.0, 1));
        assert!(s.update(true, &config));
        assert!(s.update(true, &config));
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true, &config));
        assert_eq!((s.scale, s.good_steps), (1024.0, 0));
        // An overflow resets the run of good steps.
        s.update(true, &config);
        s.update(false, &config);
        s.update(true, &config);
        s.update(true, &config);
        assert_eq!((s.scale, s.skipped_steps), (512.0, 2));
    }
}

/// `[training.loss_scaler]`: PyTorch `GradScaler`'s dynamic loss scaling for f16. The loss
/// is multiplied by `scale` before backward; a step whose gradients overflow is skipped and
/// the scale multiplied by `backoff_factor`; after `growth_interval` good steps in a row it
/// is multiplied by `growth_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScalerConfig {
    /// Checks of `[training.loss_scaler]` (keys relative to it).
    pub fn validate(&self) -> Result<(), OptionError> {
        if !(self.init_scale >= 1.0 && self.init_scale.is_finite()) {
            return fail(
                "init_scale",
                format!("must be a finite number >= 1 (got {})", self.init_scale),
            );
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return fail(
                "growth_factor",
                format!("must be > 1 (got {})", self.growth_factor),
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return fail(
                "backoff_factor",
                format!("must be in (0, 1) (got {})", self.backoff_factor),
            );
        }
        if self.growth_interval == 0 {
            return fail("growth_interval", "must be at least 1");
        }
        Ok(())
    }
}

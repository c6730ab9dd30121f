//! Learning rate as a pure function of the step: linear warmup, then cosine or linear decay
//! to `min_lr` (nanoGPT's `get_lr`). Being pure, it needs no state of its own in a
//! checkpoint beyond the step.

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, fail};

#[derive(Debug, Clone)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay_steps: u64,
    pub decay: DecayKind,
}

impl LrSchedule {
    pub fn new(config: &LrSchedulerConfig, peak_lr: f64, total_steps: u64) -> Self {
        Self {
            peak_lr,
            min_lr: config.min_lr,
            warmup_steps: config.warmup_steps,
            decay_steps: if config.decay_steps == 0 {
                total_steps
            } else {
                config.decay_steps
            },
            decay: config.decay,
        }
    }

    /// The learning rate of update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if self.decay == DecayKind::Constant {
            return self.peak_lr;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let coeff = match self.decay {
            DecayKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            DecayKind::Linear => 1.0 - progress,
            DecayKind::Constant => 1.0,
        };
        self.min_lr + coeff * (self.peak_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: DecayKind) -> LrSchedule {
        LrSchedule::new(
            &LrSchedulerConfig {
                warmup_steps: 10,
                decay,
                decay_steps: 0,
                min_lr: 1e-4,
            },
            1e-3,
            110,
        )
    }

    #[test]
    fn warmup_then_decay_to_min() {
        for decay in [DecayKind::Cosine, DecayKind::Linear] {
            let s = schedule(decay);
            assert!(s.lr(0) < s.lr(5) && s.lr(5) < s.lr(9));
            assert!((s.lr(10) - 1e-3).abs() < 1e-12);
            assert!((s.lr(60) - 5.5e-4).abs() < 1e-12, "{decay:?} midpoint");
            assert!(s.lr(109) > 1e-4 && s.lr(109) < 1.1e-4);
            assert_eq!(s.lr(500), 1e-4);
        }
        assert_eq!(schedule(DecayKind::Constant).lr(100), 1e-3);
    }
}

/// `[lr_scheduler]`: linear warmup, then decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedulerConfig {
    pub warmup_steps: u64,
    pub decay: DecayKind,
    /// Step at which the decay reaches min_lr. 0 = training.steps.
    pub decay_steps: u64,
    pub min_lr: f64,
}

impl Default for LrSchedulerConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 100,
            decay: DecayKind::Cosine,
            decay_steps: 0,
            min_lr: 1e-4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayKind {
    Cosine,
    Linear,
    Constant,
}

impl LrSchedulerConfig {
    /// Checks of `[lr_scheduler]` (keys relative to it) for a run of `steps` steps that
    /// peaks at `peak_lr`.
    pub fn validate(&self, steps: u64, peak_lr: f64) -> Result<(), OptionError> {
        if self.warmup_steps > steps {
            return fail(
                "warmup_steps",
                format!(
                    "{} is more than training.steps = {steps}",
                    self.warmup_steps
                ),
            );
        }
        if self.decay_steps != 0 && self.decay_steps < self.warmup_steps {
            return fail(
                "decay_steps",
                format!(
                    "{} ends before warmup_steps = {}: use 0 (= training.steps) or at least {}",
                    self.decay_steps, self.warmup_steps, self.warmup_steps
                ),
            );
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= peak_lr) {
            return fail(
                "min_lr",
                format!(
                    "must be in [0, optimizer.lr = {peak_lr}] (got {})",
                    self.min_lr
                ),
            );
        }
        Ok(())
    }
}

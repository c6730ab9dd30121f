//! Learning rate as a pure function of the step: linear warmup, then cosine or linear decay
//! to `min_lr` (nanoGPT's `get_lr`). Being pure, it needs no state of its own in a
//! checkpoint beyond the step.

use crate::recipe::{DecayKind, LrSchedulerConfig};

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

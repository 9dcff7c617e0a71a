//! Learning-rate and coefficient schedules, as pure functions of the step (so resume needs no
//! schedule state).

/// The SAE width at which [`default_lr`] was measured best, and that rate: the quality benchmark
/// (BENCHMARKS.md) trained TopK with 4608 latents at 3e-4, 1e-3 and 3e-3; 1e-3 gave the lowest
/// FVU over all rows with under 1% dead latents (3e-3 lowered the inliers' FVU a little but doubled
/// the all-rows FVU and killed 10% of the latents).
pub const REFERENCE_LATENTS: usize = 4608;
pub const REFERENCE_LR: f64 = 1e-3;

/// Adam's default peak rate for an SAE of `latents` latents: [`REFERENCE_LR`] scaled by
/// 1/√(latents / [`REFERENCE_LATENTS`]), the width scaling of sparsify's default (after OpenAI's
/// "Scaling and evaluating sparse autoencoders"), so wider dictionaries take smaller steps.
pub fn default_lr(latents: usize) -> f64 {
    REFERENCE_LR * (REFERENCE_LATENTS as f64 / latents.max(1) as f64).sqrt()
}

/// Linear warm-up over `warmup_steps`, constant, then a linear decay to zero over the last
/// `decay_fraction` of `total_steps` (the SAELens / Anthropic schedule).
#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub decay_fraction: f64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let warm = if self.warmup_steps > 0 && step < self.warmup_steps {
            (step + 1) as f64 / self.warmup_steps as f64
        } else {
            1.0
        };
        let decay_steps = (self.total_steps as f64 * self.decay_fraction).round() as u64;
        let decay_start = self.total_steps.saturating_sub(decay_steps);
        let decay = if decay_steps > 0 && step >= decay_start {
            (self.total_steps - step) as f64 / decay_steps as f64
        } else {
            1.0
        };
        self.lr * warm.min(decay)
    }
}

/// A coefficient that ramps linearly from 0 to its value over the first `warmup_steps` (ReLU's
/// L1 coefficient, so early training is not dominated by the sparsity penalty).
pub fn warmed_up(value: f64, step: u64, warmup_steps: u64) -> f64 {
    if warmup_steps == 0 || step >= warmup_steps {
        value
    } else {
        value * (step + 1) as f64 / warmup_steps as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rate_falls_as_one_over_the_root_of_the_width() {
        assert_eq!(default_lr(4608), 1e-3);
        assert!((default_lr(4 * 4608) - 5e-4).abs() < 1e-15);
        assert!((default_lr(1152) - 2e-3).abs() < 1e-15);
    }

    #[test]
    fn warms_up_holds_then_decays_to_zero() {
        let s = LrSchedule { lr: 1.0, warmup_steps: 10, decay_fraction: 0.2, total_steps: 100 };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert_eq!(s.at(9), 1.0);
        assert_eq!(s.at(50), 1.0);
        assert_eq!(s.at(79), 1.0);
        assert!((s.at(80) - 1.0).abs() < 1e-12);
        assert!((s.at(90) - 0.5).abs() < 1e-12);
        assert!(s.at(99) > 0.0 && s.at(99) <= 0.05 + 1e-12);
    }

    #[test]
    fn coefficient_ramps() {
        assert_eq!(warmed_up(2.0, 0, 4), 0.5);
        assert_eq!(warmed_up(2.0, 3, 4), 2.0);
        assert_eq!(warmed_up(2.0, 7, 0), 2.0);
    }
}

//! Dead-latent tracking: how many tokens ago each latent last fired.

use tch::{Device, Kind, Tensor};

/// Per latent, the number of training tokens since it last fired. A latent is dead when that
/// reaches the window (`--dead-window` tokens, or the whole run when that is shorter).
pub struct DeadLatents {
    /// [d_sae] i64
    tokens_since_fired: Tensor,
    window: u64,
}

impl DeadLatents {
    pub fn new(d_sae: usize, window: u64, device: Device) -> Self {
        DeadLatents { tokens_since_fired: Tensor::zeros([d_sae as i64], (Kind::Int64, device)), window }
    }

    /// Restores the counters saved by a checkpoint.
    pub fn from_counters(counters: Tensor, window: u64, device: Device) -> Self {
        DeadLatents { tokens_since_fired: counters.to_kind(Kind::Int64).to_device(device), window }
    }

    pub fn counters(&self) -> &Tensor {
        &self.tokens_since_fired
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Records a step: `fired` [d_sae] (Bool) marks latents that fired on any of the step's
    /// `tokens` tokens (over every rank, when data-parallel).
    pub fn update(&mut self, fired: &Tensor, tokens: u64) {
        let _guard = tch::no_grad_guard();
        let _ = self.tokens_since_fired.f_add_scalar_(tokens as i64);
        let _ = self.tokens_since_fired.f_masked_fill_(fired, 0);
    }

    /// [d_sae] Bool: latents that have not fired within the window.
    pub fn mask(&self) -> Tensor {
        self.tokens_since_fired.ge(self.window as i64)
    }

    /// The dead fraction as a scalar tensor (no host synchronization).
    pub fn fraction(&self) -> Tensor {
        self.mask().to_kind(Kind::Float).mean(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latents_die_after_the_window_and_revive_when_they_fire() {
        let mut dead = DeadLatents::new(3, 10, Device::Cpu);
        let fired = Tensor::from_slice(&[true, false, false]);
        dead.update(&fired, 6);
        assert_eq!(dead.mask().sum(Kind::Int64).int64_value(&[]), 0);
        dead.update(&fired, 6);
        assert_eq!(Vec::<bool>::try_from(dead.mask()).unwrap(), vec![false, true, true]);
        dead.update(&Tensor::from_slice(&[false, true, false]), 1);
        assert_eq!(Vec::<bool>::try_from(dead.mask()).unwrap(), vec![false, false, true]);
        assert!((dead.fraction().double_value(&[]) - 1.0 / 3.0).abs() < 1e-6);
    }
}

//! Adam on plain tensors, so that its moments can be checkpointed and restored exactly
//! (tch's optimizer keeps them out of reach).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// Adam (Kingma & Ba) with bias correction and no weight decay, as SAE trainers use it.
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken so far (the `t` of the bias corrections).
    pub steps: u64,
    /// First and second moments, by parameter name.
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adam {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
        Adam { beta1, beta2, eps, steps: 0, moments: BTreeMap::new() }
    }

    /// One step over `params` (name, parameter) at learning rate `lr`. Parameters without a
    /// gradient are left alone.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2 = 1.0 - self.beta2.powi(t);
        for (name, param) in params {
            let grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let (m, v) = self.moments.entry(name.clone()).or_insert_with(|| (param.zeros_like(), param.zeros_like()));
            // m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
            let _ = m.f_mul_scalar_(self.beta1).and_then(|mut m| m.f_add_(&(&grad * (1.0 - self.beta1))));
            let _ = v.f_mul_scalar_(self.beta2).and_then(|mut v| v.f_add_(&(grad.square() * (1.0 - self.beta2))));
            // p ← p − lr · (m / bias1) / (sqrt(v / bias2) + ε)
            let denom = (&*v / bias2).sqrt() + self.eps;
            let update = (&*m / denom) * (lr / bias1);
            let _ = param.shallow_clone().f_sub_(&update);
        }
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (name, (m, v)) in &self.moments {
            out.push((format!("m.{name}"), m.shallow_clone()));
            out.push((format!("v.{name}"), v.shallow_clone()));
        }
        out
    }

    /// Restores what [`Adam::state`] returned (plus the step count, kept by the caller).
    pub fn load_state(&mut self, steps: u64, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        self.steps = steps;
        self.moments.clear();
        for (key, m) in tensors {
            if let Some(name) = key.strip_prefix("m.") {
                let v = tensors
                    .get(&format!("v.{name}"))
                    .ok_or_else(|| format!("Adam state has m.{name} but no v.{name}"))?;
                self.moments.insert(name.to_string(), (m.to_kind(Kind::Float), v.to_kind(Kind::Float)));
            }
        }
        Ok(())
    }
}

/// Scales all gradients down so that their joint L2 norm is at most `max_norm`; returns the norm
/// before clipping (a scalar tensor, so the caller decides when to synchronize on it).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    let squares: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
    let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
    // min(1, max_norm / norm) without a host round trip.
    let factor = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
    for g in &grads {
        let _ = g.shallow_clone().f_mul_(&factor);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_the_closed_form_first_step() {
        // After one step from zero moments, Adam moves each coordinate by lr·g/(|g|+ε') ≈ lr·sign(g).
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[3.0f32, -0.5])).sum(Kind::Float);
        loss.backward();
        let mut adam = Adam::new(0.9, 0.999, 1e-8);
        adam.step(&[("p".into(), p.shallow_clone())], 0.1);
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] - (-1.9)).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn state_round_trips() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (&p * 2.0).sum(Kind::Float).backward();
        let mut adam = Adam::new(0.9, 0.999, 1e-8);
        adam.step(&[("p".into(), p.shallow_clone())], 0.1);
        let saved: BTreeMap<String, Tensor> = adam.state().into_iter().collect();
        let mut restored = Adam::new(0.9, 0.999, 1e-8);
        restored.load_state(adam.steps, &saved).unwrap();
        assert_eq!(restored.state().len(), 2);
        assert_eq!(restored.steps, 1);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&p * &p).sum(Kind::Float).backward(); // grad = (6, 8), norm 10
        let params = [("p".to_string(), p.shallow_clone())];
        let before = clip_grad_norm(&params, 1.0).double_value(&[]);
        assert!((before - 10.0).abs() < 1e-4);
        let after = p.grad().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-4, "{after}");
    }
}

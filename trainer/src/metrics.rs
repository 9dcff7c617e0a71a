//! Training metrics: what every logged step records (`metrics.jsonl`), and how it is
//! accumulated between logs without a host synchronization per step.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::sae::ForwardOutput;

/// One line of `metrics.jsonl`: means over the steps since the previous line.
///
/// Losses are in the units of the normalized inputs (E‖x‖² = d_in, so predicting zero costs
/// about 1 per feature). FVU divides the MSE by the dataset's per-feature variance (from the
/// manifest), never by the batch's own, so it is comparable across batches and ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub mse: f64,
    pub fvu: f64,
    pub l0: f64,
    pub auxk: f64,
    pub sparsity: f64,
    pub lr: f64,
    /// Latents that have not fired in the last `dead_window` tokens.
    pub dead_fraction: f64,
    /// Share of wall time since the previous line spent waiting for data.
    pub data_wait_fraction: f64,
    pub tokens_per_s: f64,
}

/// Sums of the per-step loss terms since the last log, kept as tensors on the device.
#[derive(Default)]
pub struct StepAccumulator {
    sums: Option<Tensor>, // [5]: loss, mse, l0, auxk, sparsity
    steps: u64,
}

/// Means of an interval, read back from the device.
pub struct IntervalMeans {
    pub loss: f64,
    pub mse: f64,
    pub l0: f64,
    pub auxk: f64,
    pub sparsity: f64,
}

impl StepAccumulator {
    pub fn add(&mut self, out: &ForwardOutput) {
        let _guard = tch::no_grad_guard();
        let l0 = out.latents.ne(0.0).sum(Kind::Float) / out.latents.size()[0] as f64;
        let row =
            Tensor::stack(&[out.total.detach(), out.mse.detach(), l0, out.auxk.detach(), out.sparsity.detach()], 0);
        self.sums = Some(match self.sums.take() {
            Some(sums) => sums + row,
            None => row,
        });
        self.steps += 1;
    }

    /// The sums and the step count not yet logged, for a checkpoint (so that a resumed run logs
    /// exactly the rows an uninterrupted one does).
    pub fn pending(&self) -> (Option<Tensor>, u64) {
        (self.sums.as_ref().map(|s| s.detach().copy()), self.steps)
    }

    /// Replaces the unlogged sums (with their all-rank mean, in data-parallel training).
    pub fn replace_sums(&mut self, sums: Tensor) {
        self.sums = Some(sums);
    }

    /// Restores what [`StepAccumulator::pending`] returned.
    pub fn restore(sums: Option<Tensor>, steps: u64, device: tch::Device) -> Self {
        let sums = sums.filter(|_| steps > 0).map(|s| s.to_kind(Kind::Float).to_device(device));
        StepAccumulator { steps: if sums.is_some() { steps } else { 0 }, sums }
    }

    /// The means since the last call (one host synchronization), and a reset.
    pub fn take(&mut self) -> Option<IntervalMeans> {
        let sums = self.sums.take()?;
        let steps = std::mem::take(&mut self.steps) as f64;
        let v = Vec::<f64>::try_from(sums.to_kind(Kind::Double).to_device(tch::Device::Cpu)).ok()?;
        Some(IntervalMeans {
            loss: v[0] / steps,
            mse: v[1] / steps,
            l0: v[2] / steps,
            auxk: v[3] / steps,
            sparsity: v[4] / steps,
        })
    }
}

/// `metrics.jsonl`: one compact JSON object per line.
pub fn to_jsonl(rows: &[MetricsRow]) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut out, row).expect("metrics row");
        out.push(b'\n');
    }
    out
}

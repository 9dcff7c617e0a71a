//! Reconstruction statistics of an SAE over rows of activations: FVU (over all rows and over
//! inliers), MSE, L0, and each latent's firing density.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::sae::{Sae, SaeError};

/// Rows whose norm exceeds this multiple of the median norm are outliers (attention-sink-like
/// rows that carry a large share of the variance; see the README's evaluation notes).
pub const INLIER_NORM_MULTIPLE: f64 = 3.0;

/// Accumulates over batches of raw (unscaled) activations.
pub struct ReconstructionStats {
    /// The dataset mean [d_in], the reference point of the FVU's variance.
    mean: Tensor,
    /// Per row: squared error, squared deviation from the mean, norm.
    sq_err: Vec<f32>,
    sq_dev: Vec<f32>,
    norms: Vec<f32>,
    l0_sum: f64,
    /// [d_sae] f64: rows on which each latent fired.
    fired: Tensor,
    rows: u64,
}

/// The result of a pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionSummary {
    pub rows: u64,
    /// Σ‖x − x̂‖² / Σ‖x − mean‖² over every row.
    pub fvu: f64,
    /// The same over inliers: rows with norm ≤ INLIER_NORM_MULTIPLE × the median norm.
    pub fvu_inliers: f64,
    pub inlier_fraction: f64,
    /// Mean squared error per element, in the activations' own units.
    pub mse: f64,
    pub l0: f64,
    /// Latents that never fired in the pass.
    pub dead_fraction: f64,
    /// Per latent, the fraction of rows on which it fired.
    #[serde(skip)]
    pub density: Vec<f64>,
}

impl ReconstructionStats {
    pub fn new(mean: &[f64], d_sae: usize, device: Device) -> Self {
        ReconstructionStats {
            mean: Tensor::from_slice(mean).to_kind(Kind::Float).to_device(device),
            sq_err: Vec::new(),
            sq_dev: Vec::new(),
            norms: Vec::new(),
            l0_sum: 0.0,
            fired: Tensor::zeros([d_sae as i64], (Kind::Double, device)),
            rows: 0,
        }
    }

    /// Encodes and decodes `x` [rows, d_in] (raw activations) and records the results.
    pub fn add(&mut self, sae: &Sae, x: &Tensor) -> Result<(), SaeError> {
        let _guard = tch::no_grad_guard();
        let latents = sae.encode(x)?;
        let x_hat = sae.decode(&latents)?;
        let active = latents.ne(0.0);
        let per_row = |t: Tensor| Vec::<f32>::try_from(t.to_device(Device::Cpu)).expect("f32 rows");
        self.sq_err.extend(per_row((&x_hat - x).square().sum_dim_intlist(1, false, Kind::Float)));
        self.sq_dev.extend(per_row((x - &self.mean).square().sum_dim_intlist(1, false, Kind::Float)));
        self.norms.extend(per_row(x.norm_scalaropt_dim(2, [1], false)));
        self.l0_sum += active.sum(Kind::Double).double_value(&[]);
        self.fired += active.sum_dim_intlist(0, false, Kind::Double);
        self.rows += x.size()[0] as u64;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn summary(&self) -> ReconstructionSummary {
        let rows = self.rows.max(1) as f64;
        let mut sorted = self.norms.clone();
        sorted.sort_by(f32::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0) as f64;
        let cutoff = median * INLIER_NORM_MULTIPLE;
        let (mut err, mut dev, mut err_in, mut dev_in, mut inliers) = (0.0, 0.0, 0.0, 0.0, 0u64);
        for i in 0..self.norms.len() {
            let (e, v) = (self.sq_err[i] as f64, self.sq_dev[i] as f64);
            err += e;
            dev += v;
            if self.norms[i] as f64 <= cutoff {
                err_in += e;
                dev_in += v;
                inliers += 1;
            }
        }
        let density: Vec<f64> =
            Vec::<f64>::try_from(self.fired.to_device(Device::Cpu)).expect("counts").iter().map(|c| c / rows).collect();
        let d_in = self.mean.size()[0] as f64;
        ReconstructionSummary {
            rows: self.rows,
            fvu: err / dev.max(f64::MIN_POSITIVE),
            fvu_inliers: err_in / dev_in.max(f64::MIN_POSITIVE),
            inlier_fraction: inliers as f64 / rows,
            mse: err / (rows * d_in),
            l0: self.l0_sum / rows,
            dead_fraction: density.iter().filter(|&&d| d == 0.0).count() as f64 / density.len().max(1) as f64,
            density,
        }
    }
}

//! The decoder initialized from data: each latent starts as the direction of a real input row
//! (centred on b_dec), and the encoder as the decoder's transpose, scaled so that the first
//! reconstruction is right in the least-squares sense.
//!
//! Why: at a fixed token budget the SAE starts where the data is instead of at random directions
//! (initial FVU about 0.5 instead of about 1), and both the typical rows' and all rows' FVU end
//! lower (BENCHMARKS.md, issue 16 §2). Why the rows are picked apart: rows drawn at random
//! include near-copies of each other (the same token in the same kind of context), and a latent
//! that starts as a near-copy of another never wins its top-k place and stays dead; picking each
//! row only when its cosine with every row already picked is at most [`MAX_COSINE`] keeps the
//! start diverse.

use tch::{Device, Kind, Tensor};

use super::{row_topk, Architecture, Sae, SaeError};

/// A row becomes a latent's first direction only if its cosine with every direction already
/// picked is at most this.
pub const MAX_COSINE: f64 = 0.7;

/// Rows above this multiple of the candidates' median norm (attention-sink-like outliers) are
/// not picked: their directions are few and far from the typical rows.
const MAX_NORM_MULTIPLE: f64 = 3.0;

/// Candidates are compared with the directions picked so far in blocks of this many rows.
const BLOCK_ROWS: i64 = 256;

/// Rows read to initialize SAEs of up to `d_sae` latents: candidates enough for the cosine
/// limit to leave `d_sae` of them on typical data (measured: about 1.7 candidates per direction
/// at 0.7 on SmolLM2's layer 15), and [`PROBE_ROWS`] more to set the encoder's scale.
pub fn rows_to_read(d_sae: usize) -> usize {
    3 * d_sae + PROBE_ROWS
}

/// Rows that only set the encoder's scale (never picked as directions).
pub const PROBE_ROWS: usize = 4096;

impl Architecture {
    /// Whether a fresh SAE of this architecture starts from data rows. TopK and BatchTopK pick
    /// latents by rank, so the encoder's scale is free to set; ReLU and JumpReLU keep the random
    /// start (their thresholds and penalties were tuned on it, and it was not measured there).
    pub fn starts_from_data(&self) -> bool {
        matches!(self, Architecture::TopK { .. } | Architecture::BatchTopK { .. })
    }
}

impl Sae {
    /// Replaces the random decoder rows with directions picked from `rows` [n, d_in] (inputs as
    /// the SAE sees them, b_dec already set) and sets W_enc = c · W_decᵀ, b_enc = 0, with c the
    /// least-squares scale of the top-k reconstruction of the last rows. Latents left without a
    /// direction (too few distinct rows) keep their random one. Draws the order of the rows from
    /// torch's global RNG. Returns how many latents start from data.
    pub fn init_from_rows(&mut self, rows: &Tensor) -> Result<usize, SaeError> {
        self.check_rows(rows, "initialization rows", self.config.d_in)?;
        let k = match self.config.arch {
            Architecture::TopK { k } | Architecture::BatchTopK { k } => k as i64,
            _ => return Ok(0),
        };
        let _guard = tch::no_grad_guard();
        let rows = rows.to_kind(Kind::Float).to_device(self.vs.device());
        let n = rows.size()[0];
        if n == 0 {
            return Ok(0);
        }
        let probe_rows = (PROBE_ROWS as i64).min(n / 4);
        let centred = &rows - &self.b_dec;
        let picked = pick_directions(&centred.narrow(0, 0, n - probe_rows), self.config.d_sae as i64, MAX_COSINE);
        let count = picked.size()[0];
        let w_dec = self.w_dec.shallow_clone();
        if count > 0 {
            w_dec.narrow(0, 0, count).copy_(&picked);
        }
        let mut w_enc = self.w_enc.shallow_clone();
        w_enc.copy_(&w_dec.tr());
        let mut b_enc = self.b_enc.shallow_clone();
        let _ = b_enc.zero_();
        if probe_rows > 0 {
            let probe = centred.narrow(0, n - probe_rows, probe_rows);
            // Each row's own top k, for BatchTopK too (its batch-wide k·batch is the same on
            // average); with b_enc = 0 the reconstruction is linear in the encoder's scale.
            let unscaled = row_topk(&probe.matmul(&w_enc), k).matmul(&w_dec); // [probe, d_in]
            let scale = (&probe * &unscaled).sum(Kind::Float) / (&unscaled * &unscaled).sum(Kind::Float);
            let scale = scale.double_value(&[]);
            if scale.is_finite() && scale > 0.0 {
                let _ = w_enc.g_mul_scalar_(scale);
            }
        }
        Ok(count as usize)
    }
}

/// Up to `count` unit rows [≤ count, d] from `centred` [n, d]: the typical rows (norm at most
/// [`MAX_NORM_MULTIPLE`] × the median) taken in a random order, each kept only if its cosine
/// with every row kept before it is at most `max_cosine`.
fn pick_directions(centred: &Tensor, count: i64, max_cosine: f64) -> Tensor {
    let d = centred.size()[1];
    let norms = centred.norm_scalaropt_dim(2, [1i64].as_slice(), false); // [n]
    let typical = norms.le_tensor(&(norms.median() * MAX_NORM_MULTIPLE)).logical_and(&norms.gt(0.0));
    let candidates = centred.index_select(0, &typical.nonzero().squeeze_dim(1));
    let order = Tensor::randperm(candidates.size()[0], (Kind::Int64, candidates.device()));
    let candidates = candidates.index_select(0, &order);
    let units = &candidates / candidates.norm_scalaropt_dim(2, [1i64].as_slice(), true); // [m, d]
    let picked = Tensor::zeros([count, d], (Kind::Float, centred.device()));
    let mut have = 0i64;
    for block in units.split(BLOCK_ROWS, 0) {
        if have == count {
            break;
        }
        // Cosines with the directions picked before this block, then among the block's rows.
        let before = if have > 0 {
            block.matmul(&picked.narrow(0, 0, have).tr()).amax([1i64].as_slice(), false)
        } else {
            Tensor::full([block.size()[0]], f64::NEG_INFINITY, (Kind::Float, block.device()))
        };
        let before = host_values(&before);
        let within = host_values(&block.matmul(&block.tr())); // [rows × rows], row-major
        let rows = before.len();
        let mut kept: Vec<usize> = Vec::new();
        for i in 0..rows {
            let close_to_kept = kept.iter().any(|&j| f64::from(within[i * rows + j]) > max_cosine);
            if f64::from(before[i]) <= max_cosine && !close_to_kept && have + (kept.len() as i64) < count {
                kept.push(i);
            }
        }
        if !kept.is_empty() {
            let index =
                Tensor::from_slice(&kept.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(block.device());
            picked.narrow(0, have, kept.len() as i64).copy_(&block.index_select(0, &index));
            have += kept.len() as i64;
        }
    }
    picked.narrow(0, 0, have)
}

/// A float tensor's values on the host, flattened in row-major order.
fn host_values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).expect("f32 values")
}

//! The sparse autoencoder: parameters, the four architectures, and their losses.
//!
//! Every architecture shares one affine encoder and one linear decoder:
//!
//! ```text
//! pre     = (x - b_dec) @ W_enc + b_enc        x: [batch, d_in]  pre: [batch, d_sae]
//! latents = activation(pre)                     (ReLU, TopK, BatchTopK or JumpReLU)
//! x_hat   = latents @ W_dec + b_dec             x_hat: [batch, d_in]
//! ```
//!
//! Losses are means over rows (and over the `d_in` features for the reconstruction terms), so
//! they never depend on the batch's own statistics: splitting a batch across ranks and averaging
//! gives the same numbers. With inputs scaled so that E‖x‖² = d_in, `mse` is the per-feature
//! squared error and is directly comparable with 1 (predicting zero).
//!
//! What lives here and what does not: dead-latent *tracking* (how long since a latent fired)
//! belongs to the training loop; this module only *consumes* a dead mask, for AuxK. Coefficient
//! warm-up likewise belongs to the loop: [`ForwardOutput`] exposes the unweighted terms so the
//! loop can weight them itself.

mod data_init;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub use data_init::{rows_to_read, MAX_COSINE};

/// Default AuxK coefficient, from Gao et al. 2024 (appendix A.2).
pub const DEFAULT_AUXK_COEFF: f64 = 1.0 / 32.0;

/// BatchTopK's inference threshold follows an exponential moving average of the smallest
/// activation kept in each training batch; this is the weight of the newest batch.
pub const BATCHTOPK_THRESHOLD_EMA: f64 = 0.01;

/// Which activation turns pre-activations into latents, with its own hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", rename_all = "lowercase")]
pub enum Architecture {
    /// ReLU with an L1 penalty where each latent's term is weighted by its decoder row's norm
    /// (Anthropic, "Circuits Updates – April 2024"), so the penalty cannot be dodged by shrinking
    /// latents and growing decoder rows. The decoder is therefore left unconstrained.
    Relu { l1: f64 },
    /// Keep each row's k largest pre-activations, then ReLU them (Gao et al. 2024; SAELens).
    /// L0 ≤ k per row.
    TopK { k: usize },
    /// Training: keep the k·batch largest (ReLU'd) pre-activations over the whole batch, so the
    /// *mean* L0 is k (Bussmann et al. 2024). Inference: a single threshold for every latent,
    /// i.e. a JumpReLU (see [`BATCHTOPK_THRESHOLD_EMA`] and [`Sae::batchtopk_threshold`]).
    BatchTopK { k: usize },
    /// JumpReLU (Rajamanoharan et al. 2024): `z · H(z − θ)` with a learned per-latent θ stored as
    /// log θ, an L0 penalty, and straight-through estimators with a rectangle kernel of width
    /// `bandwidth` for the gradients that the step function does not have.
    JumpRelu { init_threshold: f64, bandwidth: f64, l0_coeff: f64 },
}

impl Architecture {
    /// The short name used in folder names and in SAELens' `cfg.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Relu { .. } => "relu",
            Architecture::TopK { .. } => "topk",
            Architecture::BatchTopK { .. } => "batchtopk",
            Architecture::JumpRelu { .. } => "jumprelu",
        }
    }

    /// Whether the method keeps decoder rows at unit norm, so the loop should call
    /// [`Sae::project_decoder_grad`] before and [`Sae::normalize_decoder`] after each step.
    /// ReLU is the exception: its L1 is weighted by the decoder norms instead.
    pub fn unit_norm_decoder(&self) -> bool {
        !matches!(self, Architecture::Relu { .. })
    }

    /// Whether dead latents get the AuxK loss (the TopK family only).
    pub fn uses_auxk(&self) -> bool {
        matches!(self, Architecture::TopK { .. } | Architecture::BatchTopK { .. })
    }

    /// The weight of [`ForwardOutput::sparsity`] in the total loss (0 for the TopK family, whose
    /// sparsity is structural).
    pub fn sparsity_coeff(&self) -> f64 {
        match self {
            Architecture::Relu { l1 } => *l1,
            Architecture::JumpRelu { l0_coeff, .. } => *l0_coeff,
            Architecture::TopK { .. } | Architecture::BatchTopK { .. } => 0.0,
        }
    }
}

/// AuxK settings (Gao et al. 2024): dead latents are asked to reconstruct the main model's
/// residual with their `k_aux` largest pre-activations, which gives them a gradient again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuxK {
    /// How many dead latents may fire in the auxiliary reconstruction. Gao et al. use a power of
    /// two near d_in / 2; sparsify uses exactly d_in / 2, as does [`SaeConfig::new`].
    pub k_aux: usize,
    pub coeff: f64,
}

/// Everything that defines an SAE's shape and objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeConfig {
    pub d_in: usize,
    pub d_sae: usize,
    pub arch: Architecture,
    pub auxk: AuxK,
}

impl SaeConfig {
    /// A configuration with the default AuxK (k_aux = d_in / 2, coefficient 1/32).
    pub fn new(d_in: usize, d_sae: usize, arch: Architecture) -> Self {
        let auxk = AuxK { k_aux: (d_in / 2).max(1), coeff: DEFAULT_AUXK_COEFF };
        SaeConfig { d_in, d_sae, arch, auxk }
    }

    /// Rejects shapes and hyper-parameters that make no sense, naming the offending value.
    pub fn validate(&self) -> Result<(), SaeError> {
        if self.d_in == 0 {
            return Err(SaeError::ZeroInputWidth);
        }
        if self.d_sae == 0 {
            return Err(SaeError::ZeroWidth);
        }
        match &self.arch {
            Architecture::TopK { k } | Architecture::BatchTopK { k } => {
                if *k == 0 {
                    return Err(SaeError::ZeroK);
                }
                if *k > self.d_sae {
                    return Err(SaeError::KExceedsWidth { k: *k, d_sae: self.d_sae });
                }
                if self.auxk.k_aux == 0 {
                    return Err(SaeError::BadHyperparameter { name: "k_aux", value: 0.0 });
                }
                check_non_negative("auxk coeff", self.auxk.coeff)?;
            }
            Architecture::Relu { l1 } => check_non_negative("l1", *l1)?,
            Architecture::JumpRelu { init_threshold, bandwidth, l0_coeff } => {
                check_positive("init_threshold", *init_threshold)?;
                check_positive("bandwidth", *bandwidth)?;
                check_non_negative("l0_coeff", *l0_coeff)?;
            }
        }
        Ok(())
    }
}

fn check_non_negative(name: &'static str, value: f64) -> Result<(), SaeError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(SaeError::BadHyperparameter { name, value })
    }
}

fn check_positive(name: &'static str, value: f64) -> Result<(), SaeError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(SaeError::BadHyperparameter { name, value })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SaeError {
    #[error("the SAE width (number of latents) is 0; it must be at least 1")]
    ZeroWidth,
    #[error("the input width d_in is 0; it must be at least 1")]
    ZeroInputWidth,
    #[error("k = 0: TopK and BatchTopK need k of at least 1")]
    ZeroK,
    #[error("k = {k} exceeds the SAE width d_sae = {d_sae}; k must be at most the number of latents")]
    KExceedsWidth { k: usize, d_sae: usize },
    #[error("{name} = {value} is out of range")]
    BadHyperparameter { name: &'static str, value: f64 },
    #[error("saved SAE state does not fit this SAE: {detail}")]
    StateMismatch { detail: String },
    #[error("{what} has shape {got:?}, expected {expected}")]
    Shape { what: &'static str, got: Vec<i64>, expected: String },
}

/// The result of a training forward pass. Loss terms are scalar tensors attached to the graph.
pub struct ForwardOutput {
    /// [batch, d_in]
    pub x_hat: Tensor,
    /// [batch, d_sae], the activations after the architecture's nonlinearity.
    pub latents: Tensor,
    /// mean over rows and features of (x − x_hat)².
    pub mse: Tensor,
    /// Unweighted sparsity penalty, mean over rows: the decoder-norm-weighted L1 for ReLU, the
    /// (straight-through) L0 for JumpReLU, 0 for the TopK family.
    pub sparsity: Tensor,
    /// Unweighted AuxK loss (0 unless the TopK family has dead latents), in the units of `mse`.
    pub auxk: Tensor,
    /// mse + sparsity_coeff · sparsity + auxk_coeff · auxk.
    pub total: Tensor,
}

impl ForwardOutput {
    /// Mean number of nonzero latents per row.
    pub fn l0(&self) -> f64 {
        let nonzero = self.latents.ne(0.0).to_kind(Kind::Float);
        nonzero.sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float).double_value(&[])
    }
}

/// A sparse autoencoder whose parameters live in a [`VarStore`] (so an optimizer can be built on
/// it and it can be saved), in fp32.
pub struct Sae {
    config: SaeConfig,
    vs: VarStore,
    /// [d_in, d_sae]
    w_enc: Tensor,
    /// [d_sae]
    b_enc: Tensor,
    /// [d_sae, d_in]; row i is latent i's direction.
    w_dec: Tensor,
    /// [d_in]
    b_dec: Tensor,
    /// JumpReLU only: [d_sae], log θ (log keeps θ positive under any gradient step).
    log_threshold: Option<Tensor>,
    /// BatchTopK only: [] the inference threshold, and [] how many batches have updated it.
    /// Both are non-trainable entries of the VarStore, so they are saved with the weights.
    batchtopk_threshold: Option<(Tensor, Tensor)>,
    /// The dtype of the encoder's and the dense decoder's matrix products: f32, or bf16 for
    /// autocast (the parameters, their gradients and the optimizer stay f32).
    matmul_kind: Kind,
}

impl Sae {
    /// Initializes as OpenAI and sparsify do: decoder rows random with unit norm, W_enc = W_decᵀ,
    /// b_enc = 0 and b_dec = 0 (set it to the dataset mean with [`Sae::set_decoder_bias`]).
    /// Draws from torch's global RNG, so `tch::manual_seed` makes it reproducible.
    pub fn new(config: SaeConfig, device: Device) -> Result<Self, SaeError> {
        config.validate()?;
        let (d_in, d_sae) = (config.d_in as i64, config.d_sae as i64);
        let vs = VarStore::new(device);
        let root = vs.root();

        let opts = (Kind::Float, device);
        let dirs = Tensor::randn([d_sae, d_in], opts);
        let dirs = &dirs / dirs.norm_scalaropt_dim(2, [1], true);
        let w_dec = root.var_copy("W_dec", &dirs);
        let w_enc = root.var_copy("W_enc", &dirs.tr().contiguous());
        let b_enc = root.zeros("b_enc", &[d_sae]);
        let b_dec = root.zeros("b_dec", &[d_in]);

        let log_threshold = match &config.arch {
            Architecture::JumpRelu { init_threshold, .. } => {
                let init = Tensor::full([d_sae], init_threshold.ln(), opts);
                Some(root.var_copy("log_threshold", &init))
            }
            _ => None,
        };
        let batchtopk_threshold = match &config.arch {
            Architecture::BatchTopK { .. } => Some((
                root.zeros_no_train("batchtopk_threshold", &[]),
                root.zeros_no_train("batchtopk_threshold_updates", &[]),
            )),
            _ => None,
        };
        Ok(Sae { config, vs, w_enc, b_enc, w_dec, b_dec, log_threshold, batchtopk_threshold, matmul_kind: Kind::Float })
    }

    /// Runs the large matrix products in bf16 (autocast, as on GPUs with bf16 tensor cores) or,
    /// with `false`, in f32. Master weights, gradients and Adam's state stay f32 either way.
    pub fn set_bf16_autocast(&mut self, enabled: bool) {
        self.matmul_kind = if enabled { Kind::BFloat16 } else { Kind::Float };
    }

    /// a @ b in the autocast dtype, returned as f32.
    fn matmul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        match self.matmul_kind {
            Kind::Float => a.matmul(b),
            kind => a.to_kind(kind).matmul(&b.to_kind(kind)).to_kind(Kind::Float),
        }
    }

    pub fn config(&self) -> &SaeConfig {
        &self.config
    }

    /// The parameters, for building an optimizer and for saving.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn w_enc(&self) -> &Tensor {
        &self.w_enc
    }
    pub fn b_enc(&self) -> &Tensor {
        &self.b_enc
    }
    pub fn w_dec(&self) -> &Tensor {
        &self.w_dec
    }
    pub fn b_dec(&self) -> &Tensor {
        &self.b_dec
    }

    /// The trainable parameters by name (`W_enc`, `W_dec`, `b_enc`, `b_dec`, `log_threshold`),
    /// sorted, for the optimizer.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every tensor of the SAE's state by name, trainable or not (BatchTopK's threshold too),
    /// sorted: what a checkpoint stores.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Copies saved state into this SAE. Every tensor of [`Sae::state_tensors`] must be present
    /// with its shape; extra names are refused too, since they mean another architecture.
    pub fn load_state_tensors(&mut self, saved: &std::collections::BTreeMap<String, Tensor>) -> Result<(), SaeError> {
        let _guard = tch::no_grad_guard();
        let mine = self.state_tensors();
        if saved.len() != mine.len() {
            return Err(SaeError::StateMismatch {
                detail: format!(
                    "saved tensors {:?}, this SAE has {:?}",
                    saved.keys().collect::<Vec<_>>(),
                    mine.iter().map(|(n, _)| n).collect::<Vec<_>>()
                ),
            });
        }
        for (name, tensor) in mine {
            let value =
                saved.get(&name).ok_or_else(|| SaeError::StateMismatch { detail: format!("no tensor `{name}`") })?;
            if value.size() != tensor.size() {
                return Err(SaeError::StateMismatch {
                    detail: format!("`{name}` has shape {:?}, expected {:?}", value.size(), tensor.size()),
                });
            }
            tensor.shallow_clone().copy_(&value.to_kind(tensor.kind()).to_device(tensor.device()));
        }
        Ok(())
    }

    /// The per-latent inference threshold [d_sae] for the architectures that have one
    /// (JumpReLU: exp(log θ); BatchTopK: its running threshold broadcast to every latent), which
    /// is what SAELens stores as `threshold`. `None` for ReLU and TopK.
    pub fn threshold(&self) -> Option<Tensor> {
        let _guard = tch::no_grad_guard();
        if let Some(log_threshold) = &self.log_threshold {
            return Some(log_threshold.exp());
        }
        self.batchtopk_threshold
            .as_ref()
            .map(|(threshold, _)| threshold.expand([self.config.d_sae as i64], false).copy())
    }

    /// BatchTopK's threshold buffer itself (shared storage; None for other architectures), so
    /// data-parallel training can keep the ranks' copies equal.
    pub fn batchtopk_threshold_tensor(&self) -> Option<Tensor> {
        self.batchtopk_threshold.as_ref().map(|(threshold, _)| threshold.shallow_clone())
    }

    /// BatchTopK's current inference threshold (None for other architectures).
    pub fn batchtopk_threshold(&self) -> Option<f64> {
        self.batchtopk_threshold.as_ref().map(|(threshold, _)| threshold.double_value(&[]))
    }

    /// Sets b_dec, typically to the dataset mean [d_in] (the geometric median works too).
    pub fn set_decoder_bias(&mut self, mean: &Tensor) -> Result<(), SaeError> {
        if mean.size() != [self.config.d_in as i64] {
            return Err(self.shape_error("decoder bias", mean, format!("[{}]", self.config.d_in)));
        }
        let _guard = tch::no_grad_guard();
        self.b_dec.shallow_clone().copy_(&mean.to_kind(Kind::Float).to_device(self.vs.device()));
        Ok(())
    }

    /// (x − b_dec) @ W_enc + b_enc: [batch, d_in] → [batch, d_sae]. Subtracting b_dec first
    /// centres the input on the point the decoder treats as its origin.
    pub fn pre_activations(&self, x: &Tensor) -> Result<Tensor, SaeError> {
        self.check_rows(x, "input", self.config.d_in)?;
        Ok(self.matmul(&(x - &self.b_dec), &self.w_enc) + &self.b_enc)
    }

    /// Latents for inference: [batch, d_in] → [batch, d_sae]. BatchTopK uses its threshold here,
    /// not the batch-wide top-k, so a row's code does not depend on the rest of its batch.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor, SaeError> {
        let pre = self.pre_activations(x)?;
        Ok(match &self.config.arch {
            Architecture::Relu { .. } => pre.relu(),
            Architecture::TopK { k } => row_topk(&pre, *k as i64),
            Architecture::BatchTopK { .. } => {
                let (threshold, _) = self.batchtopk_threshold.as_ref().expect("BatchTopK state");
                jump_relu(&pre, threshold)
            }
            Architecture::JumpRelu { .. } => {
                let threshold = self.log_threshold.as_ref().expect("JumpReLU state").exp();
                jump_relu(&pre, &threshold)
            }
        })
    }

    /// The non-zero latents of [`Sae::encode`] as triplets `(row, feature, value)`, each `[m]`,
    /// grouped by row in row order. TopK reads them off its top-k without building the dense code.
    pub fn encode_sparse(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor), SaeError> {
        if let Architecture::TopK { k } = self.config.arch {
            let pre = self.pre_activations(x)?;
            let (values, features) = pre.topk(k as i64, 1, true, true); // [n, k]
            let values = values.relu();
            let keep = values.gt(0.0);
            let rows = Tensor::arange(pre.size()[0], (Kind::Int64, pre.device())).unsqueeze(1).expand_as(&features);
            return Ok((rows.masked_select(&keep), features.masked_select(&keep), values.masked_select(&keep)));
        }
        let z = self.encode(x)?;
        let fires = z.gt(0.0);
        let at = fires.nonzero(); // [m, 2]
        Ok((at.select(1, 0), at.select(1, 1), z.masked_select(&fires)))
    }

    /// latents @ W_dec + b_dec: [batch, d_sae] → [batch, d_in].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, SaeError> {
        self.check_rows(latents, "latents", self.config.d_sae)?;
        Ok(self.matmul(latents, &self.w_dec) + &self.b_dec)
    }

    /// The training forward pass on x [batch, d_in]. `dead_mask` [d_sae] (Bool) marks the latents
    /// the loop considers dead; AuxK is 0 without it. For BatchTopK this also updates the
    /// inference threshold, hence `&mut self`.
    pub fn forward(&mut self, x: &Tensor, dead_mask: Option<&Tensor>) -> Result<ForwardOutput, SaeError> {
        let pre = self.pre_activations(x)?;
        let zero = || Tensor::zeros([], (Kind::Float, pre.device()));
        let (latents, sparsity) = match self.config.arch.clone() {
            Architecture::Relu { .. } => {
                let latents = pre.relu();
                // Σ_i f_i · ‖W_dec,i‖ per row, then the mean over rows.
                let dec_norms = self.w_dec.norm_scalaropt_dim(2, [1], false); // [d_sae]
                let l1 = (&latents * dec_norms).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float);
                (latents, l1)
            }
            Architecture::TopK { k } => {
                // Only k latents per row are active, so the decoder runs as a gather of k rows
                // per token (an embedding bag) instead of a dense [batch, d_sae] @ [d_sae, d_in]
                // product: forward and backward cost batch·k·d_in instead of batch·d_sae·d_in.
                let (top, indices) = pre.topk(k as i64, 1, true, false); // [batch, k]
                let values = top.relu();
                let x_hat = self.sparse_decode(&values, &indices) + &self.b_dec;
                let latents = tch::no_grad(|| pre.zeros_like().scatter(1, &indices, &values.detach()));
                return self.finish_forward(x, &pre, dead_mask, x_hat, latents, zero());
            }
            Architecture::BatchTopK { k } => (self.batch_topk_train(&pre, k as i64), zero()),
            Architecture::JumpRelu { bandwidth, .. } => self.jump_relu_train(&pre, bandwidth),
        };
        let x_hat = self.matmul(&latents, &self.w_dec) + &self.b_dec;
        self.finish_forward(x, &pre, dead_mask, x_hat, latents, sparsity)
    }

    /// The losses shared by every architecture, given its reconstruction and latents.
    fn finish_forward(
        &self,
        x: &Tensor,
        pre: &Tensor,
        dead_mask: Option<&Tensor>,
        x_hat: Tensor,
        latents: Tensor,
        sparsity: Tensor,
    ) -> Result<ForwardOutput, SaeError> {
        let zero = || Tensor::zeros([], (Kind::Float, pre.device()));
        let mse = (&x_hat - x).square().mean(Kind::Float);

        let auxk = match (self.config.arch.uses_auxk(), dead_mask) {
            (true, Some(dead)) => self.auxk_loss(pre, dead, &(x - &x_hat).detach())?,
            _ => zero(),
        };
        let total = total_loss(&mse, &sparsity, self.config.arch.sparsity_coeff(), &auxk, self.config.auxk.coeff);
        Ok(ForwardOutput { x_hat, latents, mse, sparsity, auxk, total })
    }

    /// Rescales every decoder row to unit norm, in place. Call it after each optimizer step for
    /// the architectures where [`Architecture::unit_norm_decoder`] holds.
    pub fn normalize_decoder(&mut self) {
        let _guard = tch::no_grad_guard();
        let norms = self.w_dec.norm_scalaropt_dim(2, [1], true).clamp_min(f64::EPSILON);
        let unit = &self.w_dec / norms;
        self.w_dec.shallow_clone().copy_(&unit);
    }

    /// Removes from W_dec's gradient the component parallel to each (unit) decoder row, so a step
    /// moves rows along the unit sphere instead of mostly changing their norm, which
    /// [`Sae::normalize_decoder`] would undo anyway (sparsify and OpenAI do both). Call between
    /// `backward` and the optimizer step; a no-op when there is no gradient yet.
    pub fn project_decoder_grad(&mut self) {
        let _guard = tch::no_grad_guard();
        let grad = self.w_dec.grad();
        if !grad.defined() {
            return;
        }
        let rows = &self.w_dec / self.w_dec.norm_scalaropt_dim(2, [1], true).clamp_min(f64::EPSILON);
        let parallel = (&grad * &rows).sum_dim_intlist(1, true, Kind::Float) * &rows; // [d_sae, d_in]
        let _ = grad.shallow_clone().f_sub_(&parallel).expect("project decoder gradient");
    }

    /// BatchTopK in training: the k·batch largest ReLU'd pre-activations over the whole batch
    /// survive, so the mean L0 is exactly k while single rows may use more or fewer. Also folds
    /// the smallest surviving activation into the inference threshold.
    fn batch_topk_train(&mut self, pre: &Tensor, k: i64) -> Tensor {
        let (batch, d_sae) = (pre.size()[0], pre.size()[1]);
        let flat = pre.relu().reshape([batch * d_sae]);
        let (values, indices) = flat.topk((k * batch).min(batch * d_sae), 0, true, false);
        let latents = flat.zeros_like().scatter(0, &indices, &values).reshape([batch, d_sae]);

        let _guard = tch::no_grad_guard();
        let kept = values.masked_select(&values.gt(0.0));
        if kept.numel() > 0 {
            let (threshold, updates) = self.batchtopk_threshold.as_mut().expect("BatchTopK state");
            let smallest = kept.min();
            // The first batch sets the threshold outright; later ones move it by an EMA, which
            // follows the drift of training better than an all-time mean.
            let weight = if updates.double_value(&[]) == 0.0 { 1.0 } else { BATCHTOPK_THRESHOLD_EMA };
            let updated = &*threshold + (smallest - &*threshold) * weight;
            threshold.copy_(&updated);
            let _ = updates.f_add_scalar_(1.0).expect("count threshold updates");
        }
        latents
    }

    /// JumpReLU in training, with the straight-through estimators of Rajamanoharan et al. 2024.
    /// Returns the latents and the L0 penalty (mean over rows).
    ///
    /// The step function H(z − θ) has no useful gradient, so both terms get pseudo-derivatives
    /// with respect to θ through a rectangle kernel K(u) = 1{|u| < ½} of width ε = bandwidth:
    ///   ∂/∂θ [z · H(z − θ)] = −(θ/ε) · K((z − θ)/ε)      (z itself gets the exact H(z − θ))
    ///   ∂/∂θ [H(z − θ)]     = −(1/ε) · K((z − θ)/ε)      (z gets nothing from the L0 term)
    /// They are built without a custom autograd function: `live = θ − θ.detach()` is exactly 0 in
    /// the forward pass but has ∂live/∂θ = 1, so `live · c` with a detached c adds nothing to the
    /// value and exactly c to θ's gradient. θ = exp(log θ), so autograd carries it on to log θ.
    fn jump_relu_train(&self, pre: &Tensor, bandwidth: f64) -> (Tensor, Tensor) {
        let theta = self.log_threshold.as_ref().expect("JumpReLU state").exp(); // [d_sae]
        let theta_value = theta.detach();
        let live = &theta - &theta_value; // [d_sae], value 0
        let fired = pre.detach().gt_tensor(&theta_value).to_kind(Kind::Float); // [batch, d_sae]
        let in_window = ((pre.detach() - &theta_value) / bandwidth).abs().lt(0.5).to_kind(Kind::Float); // [batch, d_sae]

        let latents = pre * &fired + &live * (&in_window * (-&theta_value / bandwidth));
        let l0_rows = &fired + &live * (&in_window * (-1.0 / bandwidth));
        let l0 = l0_rows.sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float);
        (latents, l0)
    }

    /// AuxK (Gao et al. 2024): the residual e = x − x_hat (detached: it is a target), rebuilt from
    /// the k_aux largest pre-activations among dead latents, ê = topk_dead(pre) @ W_dec (no b_dec:
    /// e has no offset to explain). Loss = mean((ê − e)²), in the units of `mse`. As in sparsify it
    /// is scaled by min(#dead / k_aux, 1), so a handful of dead latents does not pull as hard as
    /// many; with no dead latent it is exactly 0.
    fn auxk_loss(&self, pre: &Tensor, dead: &Tensor, residual: &Tensor) -> Result<Tensor, SaeError> {
        if dead.size() != [self.config.d_sae as i64] {
            return Err(self.shape_error("dead mask", dead, format!("[{}]", self.config.d_sae)));
        }
        let dead = dead.to_kind(Kind::Bool).to_device(pre.device());
        let num_dead = dead.sum(Kind::Int64).int64_value(&[]);
        if num_dead == 0 {
            return Ok(Tensor::zeros([], (Kind::Float, pre.device())));
        }
        let k_aux = (self.config.auxk.k_aux as i64).min(num_dead);
        let scale = (num_dead as f64 / self.config.auxk.k_aux as f64).min(1.0);
        // Live latents can never win the top-k: they are set to −∞ first.
        let dead_pre = pre.masked_fill(&dead.logical_not(), f64::NEG_INFINITY); // [batch, d_sae]
        let (values, indices) = dead_pre.topk(k_aux, 1, true, false); // [batch, k_aux]
        let residual_hat = self.sparse_decode(&values.relu(), &indices); // [batch, d_in]
        Ok((residual_hat - residual).square().mean(Kind::Float) * scale)
    }

    /// Σ_j values[:, j] · W_dec[indices[:, j]]: [batch, k] values and indices → [batch, d_in],
    /// differentiable in both the values and W_dec, at the cost of batch·k·d_in.
    fn sparse_decode(&self, values: &Tensor, indices: &Tensor) -> Tensor {
        let (batch, k) = (values.size()[0], values.size()[1]);
        let offsets = Tensor::arange_start_step(0, batch * k, k, (Kind::Int64, values.device()));
        let (sum, _, _, _) = Tensor::embedding_bag(
            &self.w_dec,
            &indices.reshape([batch * k]),
            &offsets,
            false,
            0, // mode: sum
            false,
            Some(values.reshape([batch * k])),
            false,
        );
        sum
    }

    fn check_rows(&self, t: &Tensor, what: &'static str, width: usize) -> Result<(), SaeError> {
        let size = t.size();
        if size.len() == 2 && size[1] == width as i64 {
            Ok(())
        } else {
            Err(self.shape_error(what, t, format!("[batch, {width}]")))
        }
    }

    fn shape_error(&self, what: &'static str, t: &Tensor, expected: String) -> SaeError {
        SaeError::Shape { what, got: t.size(), expected }
    }
}

/// The training objective, `mse + sparsity_coeff · sparsity + auxk_coeff · auxk`: the one place
/// it is written, for [`ForwardOutput::total`] and for the loop, which weights the sparsity term
/// with its warmed-up coefficient. Keep the order of the operations: resumed runs are compared
/// with uninterrupted ones bit for bit.
pub fn total_loss(mse: &Tensor, sparsity: &Tensor, sparsity_coeff: f64, auxk: &Tensor, auxk_coeff: f64) -> Tensor {
    mse + sparsity * sparsity_coeff + auxk * auxk_coeff
}

/// Keeps each row's k largest entries, ReLU'd; everything else 0. [batch, n] → [batch, n].
fn row_topk(pre: &Tensor, k: i64) -> Tensor {
    let (values, indices) = pre.topk(k, 1, true, false);
    pre.zeros_like().scatter(1, &indices, &values.relu())
}

/// z · 1{z > θ}, θ broadcast over rows ([] or [d_sae]). With θ ≥ 0 this is also ≥ 0.
fn jump_relu(pre: &Tensor, threshold: &Tensor) -> Tensor {
    pre * pre.gt_tensor(threshold).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests;

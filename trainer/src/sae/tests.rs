//! CPU tests at toy sizes. Each fixes torch's seed and uses one thread, so they are deterministic.

use super::*;
use tch::nn::OptimizerConfig;

/// Torch's RNG and thread count are process-wide and the test harness runs tests on parallel
/// threads, so each test holds this lock for its whole body to keep its random draws its own.
static TORCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[must_use = "hold the guard for the whole test"]
fn setup(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = TORCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    guard
}

fn topk(k: usize) -> Architecture {
    Architecture::TopK { k }
}

fn batch_topk(k: usize) -> Architecture {
    Architecture::BatchTopK { k }
}

fn jump_relu() -> Architecture {
    Architecture::JumpRelu { init_threshold: 0.01, bandwidth: 0.05, l0_coeff: 1e-3 }
}

fn all_architectures() -> Vec<Architecture> {
    vec![Architecture::Relu { l1: 1e-3 }, topk(4), batch_topk(4), jump_relu()]
}

fn sae(d_in: usize, d_sae: usize, arch: Architecture) -> Sae {
    Sae::new(SaeConfig::new(d_in, d_sae, arch), Device::Cpu).unwrap()
}

fn set(t: &Tensor, values: &[f32], shape: &[i64]) {
    let _guard = tch::no_grad_guard();
    t.shallow_clone().copy_(&Tensor::from_slice(values).reshape(shape));
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.detach().flatten(0, -1)).unwrap()
}

fn zero_grad(sae: &Sae) {
    for mut var in sae.var_store().trainable_variables() {
        var.zero_grad();
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

/// Nonzero latents in each row.
fn row_l0(latents: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(latents.ne(0.0).sum_dim_intlist(1, false, Kind::Int64)).unwrap()
}

fn decoder_row_norms(sae: &Sae) -> Vec<f32> {
    values(&sae.w_dec().norm_scalaropt_dim(2, [1], false))
}

/// Synthetic data with a known sparse structure: x = codes @ dictionary, where the dictionary has
/// `n_features` random unit rows and each code has about `active` nonzeros with magnitudes in
/// [0.5, 1.5). [rows, d_in]
fn sparse_data(rows: i64, d_in: i64, n_features: i64, active: f64) -> Tensor {
    let dictionary = Tensor::randn([n_features, d_in], (Kind::Float, Device::Cpu));
    let dictionary = &dictionary / dictionary.norm_scalaropt_dim(2, [1], true);
    let on = Tensor::rand([rows, n_features], (Kind::Float, Device::Cpu)).lt(active / n_features as f64);
    let magnitude = Tensor::rand([rows, n_features], (Kind::Float, Device::Cpu)) + 0.5;
    (magnitude * on.to_kind(Kind::Float)).matmul(&dictionary)
}

#[test]
fn shapes_of_every_output() {
    let _torch = setup(0);
    for arch in all_architectures() {
        let mut sae = sae(8, 32, arch.clone());
        let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
        let out = sae.forward(&x, None).unwrap();
        assert_eq!(out.x_hat.size(), [5, 8], "{arch:?}");
        assert_eq!(out.latents.size(), [5, 32], "{arch:?}");
        for term in [&out.mse, &out.sparsity, &out.auxk, &out.total] {
            assert_eq!(term.size(), Vec::<i64>::new(), "{arch:?}");
        }
        assert_eq!(sae.encode(&x).unwrap().size(), [5, 32], "{arch:?}");
        assert_eq!(sae.decode(&sae.encode(&x).unwrap()).unwrap().size(), [5, 8], "{arch:?}");
        assert_eq!(sae.w_enc().size(), [8, 32]);
        assert_eq!(sae.b_enc().size(), [32]);
        assert_eq!(sae.w_dec().size(), [32, 8]);
        assert_eq!(sae.b_dec().size(), [8]);
    }
}

#[test]
fn inputs_of_the_wrong_width_are_errors() {
    let _torch = setup(0);
    let mut sae = sae(8, 32, topk(4));
    let x = Tensor::zeros([5, 7], (Kind::Float, Device::Cpu));
    let err = sae.forward(&x, None).err().unwrap();
    assert!(err.to_string().contains("[5, 7]") && err.to_string().contains("[batch, 8]"), "{err}");
    assert!(sae.decode(&Tensor::zeros([5, 8], (Kind::Float, Device::Cpu))).is_err());
    assert!(sae.set_decoder_bias(&Tensor::zeros([7], (Kind::Float, Device::Cpu))).is_err());
}

#[test]
fn bad_widths_and_k_are_clear_errors() {
    let _torch = setup(0);
    let new = |d_in, d_sae, arch| Sae::new(SaeConfig::new(d_in, d_sae, arch), Device::Cpu).err();
    let err = new(8, 0, topk(4)).unwrap();
    assert_eq!(err, SaeError::ZeroWidth);
    assert!(err.to_string().contains("width") && err.to_string().contains('0'), "{err}");
    assert_eq!(new(0, 16, topk(4)).unwrap(), SaeError::ZeroInputWidth);

    let err = new(8, 16, topk(0)).unwrap();
    assert_eq!(err, SaeError::ZeroK);
    assert!(err.to_string().contains("k = 0"), "{err}");
    let err = new(8, 16, batch_topk(17)).unwrap();
    assert_eq!(err, SaeError::KExceedsWidth { k: 17, d_sae: 16 });
    assert!(err.to_string().contains("k = 17") && err.to_string().contains("d_sae = 16"), "{err}");
    assert!(new(8, 16, topk(16)).is_none(), "k = d_sae is allowed");

    let err = new(8, 16, Architecture::Relu { l1: -1.0 }).unwrap();
    assert!(err.to_string().contains("l1 = -1"), "{err}");
    let arch = Architecture::JumpRelu { init_threshold: 0.0, bandwidth: 0.01, l0_coeff: 1.0 };
    let err = new(8, 16, arch).unwrap();
    assert!(err.to_string().contains("init_threshold = 0"), "{err}");
}

#[test]
fn initialization_follows_openai_and_sparsify() {
    let _torch = setup(1);
    let sae = sae(6, 24, topk(3));
    for norm in decoder_row_norms(&sae) {
        assert!((norm - 1.0).abs() < 1e-5, "decoder row norm {norm}");
    }
    assert_close(&values(sae.w_enc()), &values(&sae.w_dec().tr().contiguous()));
    assert!(values(sae.b_enc()).iter().all(|&v| v == 0.0));
    assert!(values(sae.b_dec()).iter().all(|&v| v == 0.0));
    assert!(sae.w_dec().requires_grad() && sae.w_enc().requires_grad());
    // Only the four parameters are trainable for TopK.
    assert_eq!(sae.var_store().trainable_variables().len(), 4);
}

#[test]
fn decoder_bias_can_be_set_to_the_dataset_mean() {
    let _torch = setup(2);
    let mut sae = sae(3, 6, topk(2));
    let mean = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
    sae.set_decoder_bias(&mean).unwrap();
    assert_close(&values(sae.b_dec()), &[1.0, -2.0, 0.5]);
    assert!(sae.b_dec().requires_grad(), "b_dec stays a parameter");
}

#[test]
fn renormalization_restores_unit_decoder_rows() {
    let _torch = setup(3);
    let mut sae = sae(6, 12, topk(3));
    {
        let _guard = tch::no_grad_guard();
        let scales = Tensor::rand([12, 1], (Kind::Float, Device::Cpu)) * 5.0 + 0.1;
        let scaled = sae.w_dec() * scales;
        sae.w_dec().shallow_clone().copy_(&scaled);
    }
    assert!(decoder_row_norms(&sae).iter().any(|n| (n - 1.0).abs() > 0.01));
    sae.normalize_decoder();
    for norm in decoder_row_norms(&sae) {
        assert!((norm - 1.0).abs() < 1e-5, "decoder row norm {norm}");
    }
}

#[test]
fn gradient_projection_removes_the_part_parallel_to_decoder_rows() {
    let _torch = setup(4);
    let mut sae = sae(6, 12, topk(3));
    let x = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    sae.forward(&x, None).unwrap().total.backward();
    let grad = sae.w_dec().grad();
    let w_dec = sae.w_dec().detach();
    let parallel = |g: &Tensor| values(&(g * &w_dec).sum_dim_intlist(1, false, Kind::Float));
    assert!(parallel(&grad).iter().any(|p| p.abs() > 1e-4), "the test needs a parallel part");
    sae.project_decoder_grad();
    for p in parallel(&sae.w_dec().grad()) {
        assert!(p.abs() < 1e-6, "parallel component {p} left");
    }
}

/// d_in = 2, d_sae = 3, weights small enough to compute by hand.
fn hand_set(arch: Architecture) -> Sae {
    let sae = sae(2, 3, arch);
    set(sae.w_enc(), &[1.0, 0.0, 1.0, 0.0, 1.0, -1.0], &[2, 3]);
    set(sae.b_enc(), &[0.0, 0.5, 0.0], &[3]);
    set(sae.w_dec(), &[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], &[3, 2]);
    set(sae.b_dec(), &[1.0, 1.0], &[2]);
    sae
}

#[test]
fn encode_and_decode_match_hand_computed_values() {
    let _torch = setup(5);
    // x − b_dec = [2, 0] and [0, 3]
    // pre = (x − b_dec) @ W_enc + b_enc = [2, 0.5, 2] and [0, 3.5, −3]
    let x = Tensor::from_slice(&[3.0f32, 1.0, 1.0, 4.0]).reshape([2, 2]);
    let relu = hand_set(Architecture::Relu { l1: 0.0 });
    assert_close(&values(&relu.pre_activations(&x).unwrap()), &[2.0, 0.5, 2.0, 0.0, 3.5, -3.0]);
    let latents = relu.encode(&x).unwrap();
    assert_close(&values(&latents), &[2.0, 0.5, 2.0, 0.0, 3.5, 0.0]);
    // latents @ W_dec + b_dec: [2, 0.5, 2] → [2 + 1, 0.5 + 1] + 1 = [4, 2.5];
    //                          [0, 3.5, 0] → [0, 3.5] + 1 = [1, 4.5]
    assert_close(&values(&relu.decode(&latents).unwrap()), &[4.0, 2.5, 1.0, 4.5]);

    // TopK with k = 1 keeps the largest (ties broken arbitrarily; row 0 has a tie at 2).
    let top1 = hand_set(topk(1));
    let latents = values(&top1.encode(&x).unwrap());
    assert_eq!(latents[1], 0.0);
    assert!(latents[0] + latents[2] == 2.0 && latents[0] * latents[2] == 0.0, "{latents:?}");
    assert_close(&latents[3..], &[0.0, 3.5, 0.0]);
    // TopK with k = 3 keeps row 1's negative pre-activation as 0 (ReLU after top-k).
    let top3 = hand_set(topk(3));
    assert_close(&values(&top3.encode(&x).unwrap()), &[2.0, 0.5, 2.0, 0.0, 3.5, 0.0]);

    // JumpReLU with θ = 1 drops 0.5.
    let jump = hand_set(Architecture::JumpRelu { init_threshold: 1.0, bandwidth: 0.1, l0_coeff: 0.0 });
    assert_close(&values(&jump.threshold().unwrap()), &[1.0, 1.0, 1.0]);
    assert_close(&values(&jump.encode(&x).unwrap()), &[2.0, 0.0, 2.0, 0.0, 3.5, 0.0]);
}

#[test]
fn relu_sparsity_is_l1_weighted_by_decoder_norms() {
    let _torch = setup(6);
    let mut sae = hand_set(Architecture::Relu { l1: 0.5 });
    // Decoder row norms 1, 1, √0.5; latents [2, 0.5, 2] and [0, 3.5, 0].
    let x = Tensor::from_slice(&[3.0f32, 1.0, 1.0, 4.0]).reshape([2, 2]);
    let out = sae.forward(&x, None).unwrap();
    let want = ((2.0 + 0.5 + 2.0 * 0.5f64.sqrt()) + 3.5) / 2.0;
    assert!((scalar(&out.sparsity) - want).abs() < 1e-5, "{} vs {want}", scalar(&out.sparsity));
    // x_hat = [4, 2.5] and [1, 4.5]; errors [1, 1.5] and [0, 0.5]: mse = (1 + 2.25 + 0.25) / 4.
    assert!((scalar(&out.mse) - 0.875).abs() < 1e-6, "{}", scalar(&out.mse));
    assert!((scalar(&out.total) - (0.875 + 0.5 * want)).abs() < 1e-5);
}

#[test]
fn topk_never_exceeds_k_nonzeros_per_row() {
    let _torch = setup(7);
    for k in [1, 3, 8] {
        let mut sae = sae(16, 64, topk(k));
        let x = Tensor::randn([40, 16], (Kind::Float, Device::Cpu)) * 3.0;
        let train = row_l0(&sae.forward(&x, None).unwrap().latents);
        let infer = row_l0(&sae.encode(&x).unwrap());
        assert!(train.iter().chain(&infer).all(|&l0| l0 <= k as i64), "k = {k}: {train:?}");
        assert!(train.contains(&(k as i64)), "k = {k} is reached: {train:?}");
    }
}

#[test]
fn batch_topk_mean_l0_is_exactly_k_in_training() {
    let _torch = setup(8);
    for k in [1, 4, 10] {
        let mut sae = sae(16, 64, batch_topk(k));
        let x = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
        let out = sae.forward(&x, None).unwrap();
        assert_eq!(out.l0(), k as f64, "k = {k}");
        // Per row it is free to differ (otherwise it would just be TopK).
        let rows = row_l0(&out.latents);
        assert!(rows.iter().any(|&l0| l0 != k as i64), "k = {k}: {rows:?}");
    }
}

#[test]
fn batch_topk_inference_uses_the_running_threshold() {
    let _torch = setup(9);
    let mut sae = sae(16, 64, batch_topk(4));
    assert_eq!(sae.batchtopk_threshold(), Some(0.0));
    let x = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
    let out = sae.forward(&x, None).unwrap();
    // The first batch sets the threshold to its smallest kept activation.
    let kept = out.latents.masked_select(&out.latents.gt(0.0));
    let smallest = scalar(&kept.min());
    assert!((sae.batchtopk_threshold().unwrap() - smallest).abs() < 1e-6);
    // Inference is then a JumpReLU at that threshold, row by row.
    let latents = sae.encode(&x).unwrap();
    let pre = sae.pre_activations(&x).unwrap();
    let want = &pre * pre.gt(smallest).to_kind(Kind::Float);
    assert_close(&values(&latents), &values(&want));
    assert_close(&values(&sae.threshold().unwrap()), &vec![smallest as f32; 64]);
    // Later batches move it by an EMA of weight BATCHTOPK_THRESHOLD_EMA.
    let x2 = Tensor::randn([32, 16], (Kind::Float, Device::Cpu)) * 2.0;
    let out2 = sae.forward(&x2, None).unwrap();
    let smallest2 = scalar(&out2.latents.masked_select(&out2.latents.gt(0.0)).min());
    let want = smallest + BATCHTOPK_THRESHOLD_EMA * (smallest2 - smallest);
    assert!((sae.batchtopk_threshold().unwrap() - want).abs() < 1e-6);
}

#[test]
fn auxk_is_zero_without_dead_latents_and_positive_with_them() {
    let _torch = setup(10);
    for arch in [topk(2), batch_topk(2)] {
        let mut sae = sae(8, 32, arch.clone());
        let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        let none_dead = Tensor::zeros([32], (Kind::Bool, Device::Cpu));
        assert_eq!(scalar(&sae.forward(&x, Some(&none_dead)).unwrap().auxk), 0.0, "{arch:?}");
        assert_eq!(scalar(&sae.forward(&x, None).unwrap().auxk), 0.0, "{arch:?}");

        // The last 8 latents are dead.
        let dead = Tensor::arange(32, (Kind::Int64, Device::Cpu)).ge(24);
        let out = sae.forward(&x, Some(&dead)).unwrap();
        assert!(scalar(&out.auxk) > 0.0, "{arch:?}");
        let want = scalar(&out.mse) + DEFAULT_AUXK_COEFF * scalar(&out.auxk);
        assert!((scalar(&out.total) - want).abs() < 1e-6);

        // Its gradient reaches the dead latents' decoder rows and no live one's.
        zero_grad(&sae);
        out.auxk.backward();
        let row_grad = values(&sae.w_dec().grad().abs().sum_dim_intlist(1, false, Kind::Float));
        assert!(row_grad[..24].iter().all(|&g| g == 0.0), "{arch:?}: {row_grad:?}");
        assert!(row_grad[24..].iter().any(|&g| g > 0.0), "{arch:?}: {row_grad:?}");
    }
}

#[test]
fn auxk_reaches_dead_latents_only_for_the_topk_family() {
    let _torch = setup(11);
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let dead = Tensor::ones([32], (Kind::Bool, Device::Cpu));
    for arch in [Architecture::Relu { l1: 1e-3 }, jump_relu()] {
        let mut sae = sae(8, 32, arch.clone());
        assert_eq!(scalar(&sae.forward(&x, Some(&dead)).unwrap().auxk), 0.0, "{arch:?}");
    }
}

#[test]
fn jump_relu_threshold_gets_the_rectangle_kernel_gradient() {
    let _torch = setup(12);
    // One latent, θ = 1, ε = 0.5: the window is 0.75 < z < 1.25.
    let arch = Architecture::JumpRelu { init_threshold: 1.0, bandwidth: 0.5, l0_coeff: 1.0 };
    let mut sae = sae(1, 1, arch);
    set(sae.w_enc(), &[1.0], &[1, 1]);
    set(sae.w_dec(), &[0.0], &[1, 1]); // x_hat = b_dec = 0, so mse carries no θ gradient
                                       // z = 0.8 (in the window, below θ), 1.2 (in the window, above θ), 2.0 (outside).
    let x = Tensor::from_slice(&[0.8f32, 1.2, 2.0]).reshape([3, 1]);
    let out = sae.forward(&x, None).unwrap();
    assert_close(&values(&out.latents), &[0.0, 1.2, 2.0]);
    assert!((scalar(&out.sparsity) - 2.0 / 3.0).abs() < 1e-6, "L0 = 2 of 3 rows");

    // ∂L0/∂θ = mean over rows of −(1/ε)·K = −(2 / 0.5) / 3; ∂/∂logθ = θ · that.
    zero_grad(&sae);
    out.sparsity.backward();
    let log_threshold = sae.var_store().variables()["log_threshold"].grad();
    assert!((scalar(&log_threshold.sum(Kind::Float)) + 4.0 / 3.0).abs() < 1e-5);
    let w_enc_grad = sae.w_enc().grad();
    assert!(!w_enc_grad.defined() || scalar(&w_enc_grad.abs().sum(Kind::Float)) == 0.0, "L0 gives z no gradient");

    // ∂(Σ latents)/∂θ = −(θ/ε)·(rows in the window) = −2 · 2; ∂/∂z = H(z − θ): rows 2 and 3.
    zero_grad(&sae);
    let out = sae.forward(&x, None).unwrap();
    out.latents.sum(Kind::Float).backward();
    let log_threshold = sae.var_store().variables()["log_threshold"].grad();
    assert!((scalar(&log_threshold.sum(Kind::Float)) + 4.0).abs() < 1e-5);
    // ∂/∂W_enc = Σ_rows H · x = 1.2 + 2.0
    assert!((scalar(&sae.w_enc().grad().sum(Kind::Float)) - 3.2).abs() < 1e-5);
}

/// A few hundred Adam steps on data with a sparse structure must cut every architecture's loss.
/// The loop tracks dead latents the simple way (no firing in the last 50 steps) so that AuxK
/// takes part as it will in real training.
#[test]
fn training_lowers_the_loss_for_every_architecture() {
    let arches = [
        Architecture::Relu { l1: 1e-3 },
        topk(4),
        batch_topk(4),
        Architecture::JumpRelu { init_threshold: 0.05, bandwidth: 0.05, l0_coeff: 1e-3 },
    ];
    let steps = 400;
    for arch in arches {
        let _torch = setup(13);
        let data = sparse_data(2048, 16, 48, 2.0); // [2048, 16]
        let variance = scalar(&(&data - data.mean_dim(0, true, Kind::Float)).square().mean(Kind::Float));
        let mut sae = sae(16, 64, arch.clone());
        sae.set_decoder_bias(&data.mean_dim(0, false, Kind::Float)).unwrap();
        let mut opt = tch::nn::Adam::default().build(sae.var_store(), 3e-3).unwrap();
        let mut steps_since_fired = Tensor::zeros([64], (Kind::Int64, Device::Cpu));
        let mut losses = Vec::new();
        for step in 0..steps {
            let batch = data.narrow(0, (step as i64 * 64) % 2048, 64);
            let dead = steps_since_fired.gt(50);
            let out = sae.forward(&batch, Some(&dead)).unwrap();
            losses.push((scalar(&out.total), scalar(&out.mse), scalar(&dead.sum(Kind::Int64))));
            let fired = out.latents.ne(0.0).any_dim(0, false);
            steps_since_fired = (steps_since_fired + 1).masked_fill(&fired, 0);
            opt.zero_grad();
            out.total.backward();
            if arch.unit_norm_decoder() {
                sae.project_decoder_grad();
            }
            opt.step();
            if arch.unit_norm_decoder() {
                sae.normalize_decoder();
            }
        }
        let mean = |s: &[(f64, f64, f64)]| s.iter().map(|l| l.0).sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&losses[..10]), mean(&losses[steps - 10..]));
        let fvu = losses[steps - 10..].iter().map(|l| l.1).sum::<f64>() / 10.0 / variance;
        eprintln!(
            "{arch:?}: loss {first} → {last}, final FVU {fvu}, (total, mse, dead) {:?} → {:?}",
            losses[0],
            losses[steps - 1]
        );
        assert!(last < 0.3 * first, "{arch:?}: loss {first} → {last}");
        assert!(fvu < 0.3, "{arch:?}: final FVU {fvu}");
        if let Architecture::JumpRelu { init_threshold, .. } = arch {
            // The straight-through estimators really train θ.
            let moved = (sae.threshold().unwrap() - init_threshold).abs().max();
            assert!(scalar(&moved) > 1e-3, "θ moved by at most {}", scalar(&moved));
        }
    }
}

#[test]
fn topk_sparse_decoding_matches_the_dense_product_and_its_gradients() {
    let _guard = setup(11);
    let mut s = sae(12, 40, topk(5));
    let x = Tensor::randn([9, 12], (Kind::Float, Device::Cpu));
    let dead = Tensor::from_slice(&(0..40).map(|i| i % 3 == 0).collect::<Vec<bool>>());
    let out = s.forward(&x, Some(&dead)).unwrap();
    out.total.backward();
    let sparse_grads: Vec<Tensor> = [s.w_dec(), s.w_enc(), s.b_dec()].iter().map(|t| t.grad().copy()).collect();
    zero_grad(&s);

    // The same loss written densely: latents from the same top-k, decoded with a matmul.
    let pre = s.pre_activations(&x).unwrap();
    let (top, idx) = pre.topk(5, 1, true, false);
    let latents = pre.zeros_like().scatter(1, &idx, &top.relu());
    let x_hat = latents.matmul(s.w_dec()) + s.b_dec();
    assert_close(&values(&x_hat.detach()), &values(&out.x_hat.detach()));
    assert_close(&values(&latents.detach()), &values(&out.latents));
    let mse = (&x_hat - &x).square().mean(Kind::Float);
    let residual = (&x - &x_hat).detach();
    let dead_pre = pre.masked_fill(&dead.logical_not(), f64::NEG_INFINITY);
    // AuxK takes the top min(k_aux, dead) dead latents, scaled by min(dead / k_aux, 1).
    let (dead_latents, k_aux) = (14i64, 6i64);
    let (aux_values, aux_idx) = dead_pre.topk(k_aux.min(dead_latents), 1, true, false);
    let aux = pre.zeros_like().scatter(1, &aux_idx, &aux_values.relu()).matmul(s.w_dec());
    let auxk = (aux - residual).square().mean(Kind::Float) * (dead_latents as f64 / k_aux as f64).min(1.0);
    let total = mse + auxk * s.config().auxk.coeff;
    assert!((scalar(&total) - scalar(&out.total)).abs() < 1e-5);
    total.backward();
    for (got, t) in sparse_grads.iter().zip([s.w_dec(), s.w_enc(), s.b_dec()]) {
        assert_close(&values(got), &values(&t.grad()));
    }
}

#[test]
fn bf16_autocast_keeps_f32_parameters_and_close_results() {
    let _guard = setup(12);
    let x = Tensor::randn([16, 24], (Kind::Float, Device::Cpu));
    for arch in all_architectures() {
        tch::manual_seed(5);
        let mut full = sae(24, 48, arch.clone());
        tch::manual_seed(5);
        let mut half = sae(24, 48, arch.clone());
        half.set_bf16_autocast(true);
        let a = full.forward(&x, None).unwrap();
        let b = half.forward(&x, None).unwrap();
        let (ma, mb) = (scalar(&a.mse), scalar(&b.mse));
        assert!((ma - mb).abs() <= 0.05 * ma.abs() + 1e-3, "{arch:?}: mse {ma} vs {mb} in bf16");
        b.total.backward();
        assert_eq!(half.w_enc().grad().kind(), Kind::Float, "{arch:?}");
        assert_eq!(half.w_enc().kind(), Kind::Float);
    }
}

#[test]
fn sparse_encode_lists_the_dense_codes_non_zeros() {
    let _torch = setup(2);
    for arch in all_architectures() {
        let sae = sae(8, 16, arch);
        let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
        let (rows, features, values) = sae.encode_sparse(&x).unwrap();
        assert!(values.gt(0.0).all().int64_value(&[]) == 1, "only firing latents are listed");
        let rebuilt =
            Tensor::zeros([5, 16], (Kind::Float, Device::Cpu)).index_put(&[Some(rows), Some(features)], &values, false);
        assert!(rebuilt.equal(&sae.encode(&x).unwrap()));
    }
}

/// `per_cluster` noisy copies of each of the first `clusters` unit axes times 3, moved by `mean`:
/// rows [clusters × per_cluster, d_in] in a shuffled order.
fn clustered_rows(d_in: i64, clusters: i64, per_cluster: i64, mean: &Tensor) -> Tensor {
    let axes = Tensor::eye(d_in, (Kind::Float, Device::Cpu)).narrow(0, 0, clusters) * 3.0;
    let copies = axes.repeat([per_cluster, 1]);
    let noisy = &copies + Tensor::randn(copies.size(), (Kind::Float, Device::Cpu)) * 0.05;
    let order = Tensor::randperm(clusters * per_cluster, (Kind::Int64, Device::Cpu));
    noisy.index_select(0, &order) + mean
}

#[test]
fn a_fresh_topk_sae_starts_at_distinct_data_directions() {
    let _torch = setup(11);
    let mean = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 0.0, 2.0, 0.0, 0.0, -0.5]);
    // 240 rows: 180 candidates, 60 probe rows.
    let rows = clustered_rows(8, 5, 48, &mean);
    // k = 1: a row's own cluster direction beats every random one, so the first reconstruction
    // is all data directions.
    for arch in [topk(1), batch_topk(1)] {
        let mut sae = sae(8, 12, arch.clone());
        sae.set_decoder_bias(&mean).unwrap();
        let random_rows = values(&sae.w_dec().narrow(0, 5, 7));
        // Near-copies are refused, so each cluster gives one direction and 7 latents stay random.
        assert_eq!(sae.init_from_rows(&rows).unwrap(), 5, "{arch:?}");
        let picked = sae.w_dec().narrow(0, 0, 5);
        let axis_of_each = picked.abs().argmax(1, false);
        let mut axes = Vec::<i64>::try_from(&axis_of_each).unwrap();
        axes.sort();
        assert_eq!(axes, [0, 1, 2, 3, 4], "one direction per cluster");
        let cosines = picked.matmul(&picked.tr()) - Tensor::eye(5, (Kind::Float, Device::Cpu));
        assert!(scalar(&cosines.max()) <= MAX_COSINE, "{cosines}");
        for norm in decoder_row_norms(&sae) {
            assert!((norm - 1.0).abs() < 1e-5, "decoder row norm {norm}");
        }
        assert_close(&values(&sae.w_dec().narrow(0, 5, 7)), &random_rows);
        // W_enc = c · W_decᵀ with one c > 0, b_enc = 0.
        let ratio = sae.w_enc() / sae.w_dec().tr();
        let c = scalar(&ratio.get(0).get(0));
        assert!(c > 0.0 && ((ratio - c).abs().max().double_value(&[])) < 1e-4 * c, "not one scale");
        assert!(values(sae.b_enc()).iter().all(|&v| v == 0.0));
        // The very first reconstruction already explains most of these rows' variance.
        let latents = Tensor::zeros([240, 12], (Kind::Float, Device::Cpu));
        let pre = sae.pre_activations(&rows).unwrap();
        let (top, index) = pre.topk(1, 1, true, false);
        let latents = latents.scatter(1, &index, &top.relu());
        let error = (sae.decode(&latents).unwrap() - &rows).square().sum(Kind::Float);
        let variance = (&rows - rows.mean_dim([0i64].as_slice(), true, Kind::Float)).square().sum(Kind::Float);
        assert!(scalar(&(error / variance)) < 0.05, "{arch:?}: initial FVU too high");
    }
}

#[test]
fn relu_and_jumprelu_keep_their_random_start() {
    let _torch = setup(12);
    let rows = clustered_rows(8, 5, 48, &Tensor::zeros([8], (Kind::Float, Device::Cpu)));
    for arch in [Architecture::Relu { l1: 1e-3 }, jump_relu()] {
        assert!(!arch.starts_from_data());
        let mut sae = sae(8, 12, arch.clone());
        let before: Vec<Vec<f32>> = [sae.w_dec(), sae.w_enc(), sae.b_enc()].iter().map(|t| values(t)).collect();
        assert_eq!(sae.init_from_rows(&rows).unwrap(), 0, "{arch:?}");
        let after: Vec<Vec<f32>> = [sae.w_dec(), sae.w_enc(), sae.b_enc()].iter().map(|t| values(t)).collect();
        assert_eq!(before, after, "{arch:?}");
    }
}

#[test]
fn initialization_rows_of_another_width_are_refused() {
    let _torch = setup(13);
    let mut sae = sae(8, 12, topk(2));
    let err = sae.init_from_rows(&Tensor::zeros([40, 6], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("initialization rows"), "{err}");
}

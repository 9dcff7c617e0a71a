//! `sae train`: train one SAE, or a sweep of them in one pass, on an activation dataset.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use std::time::Duration;
use store::StoreOptions;
use trainer::sae::{Architecture, DEFAULT_AUXK_COEFF};

use tch::Device;
use trainer::dist::{Backend, DistEnv, ProcessGroup};
use trainer::train::{train, Member, RunSettings, TrainError, TrainRequest, TrainSummary};

use crate::cmd::eval::{evaluate, print_report, EvalArgs, EvalReport};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The activation dataset: a path, file://, s3://bucket/prefix or memory://.
    #[arg(long)]
    data: String,
    /// The hook to train on; needed only when the dataset holds several.
    #[arg(long)]
    hook: Option<String>,
    /// relu, topk, batchtopk or jumprelu.
    #[arg(long, default_value = "topk")]
    arch: String,
    /// Number of latents (default: 8 × d_model).
    #[arg(long)]
    latents: Option<usize>,
    /// Active latents per token (topk, batchtopk).
    #[arg(long, default_value_t = 32)]
    k: usize,
    /// L1 coefficient (relu), on the per-element MSE of inputs normalized to E‖x‖² = d_model.
    #[arg(long, default_value_t = 0.01)]
    l1: f64,
    /// L0 coefficient (jumprelu).
    #[arg(long, default_value_t = 1e-3)]
    l0_coeff: f64,
    /// Width of the straight-through estimators' kernel (jumprelu), in the units of the
    /// pre-activations of normalized inputs (about unit scale at initialization).
    #[arg(long, default_value_t = 0.05)]
    bandwidth: f64,
    /// Initial threshold of every latent (jumprelu).
    #[arg(long, default_value_t = 0.1)]
    init_threshold: f64,
    /// Dead latents reconstructing the residual in AuxK (default: d_model / 2).
    #[arg(long)]
    k_aux: Option<usize>,
    /// AuxK coefficient (topk, batchtopk).
    #[arg(long, default_value_t = DEFAULT_AUXK_COEFF)]
    auxk_coeff: f64,
    /// Training tokens over all ranks (default: one pass over the dataset; required with --follow).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Rows per step on each rank.
    #[arg(long, default_value_t = 4096)]
    batch_size: usize,
    /// Peak learning rate (Adam) (default: 1e-3 × √(4608 / latents), for the widest SAE of the
    /// run: the rate measured best at 4608 latents, scaled with width as sparsify scales it).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning-rate warm-up steps (default: 5% of the steps, at most 1000).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// The learning rate decays linearly to 0 over this last fraction of the steps.
    #[arg(long, default_value_t = 0.2)]
    lr_decay_fraction: f64,
    /// Steps over which relu's L1 and jumprelu's L0 coefficients ramp up (default: 5% of the steps).
    #[arg(long)]
    sparsity_warmup_steps: Option<u64>,
    /// Clip gradients to this global L2 norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A latent is dead when it has not fired in this many tokens (or the whole run, if shorter).
    #[arg(long, default_value_t = 10_000_000)]
    dead_window: u64,
    /// Write a checkpoint every N steps (and always on SIGINT/SIGTERM).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Log metrics (metrics.jsonl, progress bar) every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Where the SAE goes: a path, file://, s3://bucket/prefix or memory://.
    #[arg(long)]
    out: String,
    /// Train every combination in one pass, e.g. `--sweep latents=2304,4608 k=16,32`.
    /// Keys: latents, k, arch, l1, l0_coeff. Each SAE goes to `--out/<arch>-l<latents>-k<k>/`.
    #[arg(long, num_args = 1.., value_name = "KEY=V1,V2")]
    sweep: Vec<String>,
    /// Train on a dataset that capture is still writing (one pass, in commit order).
    #[arg(long)]
    follow: bool,
    /// Seconds a rank waits for the others in a collective before failing (data-parallel runs).
    #[arg(long, default_value_t = 600)]
    dist_timeout: u64,
    /// Shuffle rows within windows of this many row groups of the dataset (4096 rows each in a
    /// default capture); a number as large as the dataset's row groups shuffles each epoch whole,
    /// holding it in memory as f32. With --follow, each window is read once capture has
    /// committed it.
    #[arg(long, value_name = "ROW_GROUPS", default_value_t = store::reader::DEFAULT_WINDOW_ROW_GROUPS)]
    shuffle_window: usize,
    /// Read the dataset in stored order (for tests that pin the data order).
    #[arg(long, hide = true)]
    no_shuffle: bool,
    /// Run the SAE's large matrix products in bf16 with f32 master weights (for GPUs with bf16
    /// tensor cores; on most CPUs it is slower).
    #[arg(long)]
    bf16_autocast: bool,
    /// Leave out of training the rows whose norm exceeds this multiple of their batch's median
    /// norm (outliers such as attention sinks, which otherwise dominate the loss); off by default.
    #[arg(long, value_name = "MULTIPLE")]
    max_norm_multiple: Option<f64>,
    /// How a new TopK or BatchTopK SAE's decoder starts: `data` (directions of distinct dataset
    /// rows, read before the first step; better at a fixed budget) or `random` (unit directions,
    /// as releases before 2026-12 did: pass it to resume a run those began).
    #[arg(long, value_name = "data|random", default_value = "data")]
    decoder_init: trainer::train::DecoderInit,
    /// A TOML file with any of these flags as keys (`latents = 4608`, `[sweep] k = [16, 32]`);
    /// flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<String>,
    /// Skip the evaluation (FVU, L0, dead %, CE-loss score) after training.
    #[arg(long)]
    no_eval: bool,
    #[command(flatten)]
    eval: EvalArgs,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// The architecture named `name` with the flags' hyper-parameters.
fn architecture(name: &str, args: &Args, k: usize, l1: f64, l0_coeff: f64) -> Result<Architecture> {
    Ok(match name {
        "relu" => Architecture::Relu { l1 },
        "topk" => Architecture::TopK { k },
        "batchtopk" => Architecture::BatchTopK { k },
        "jumprelu" => {
            Architecture::JumpRelu { init_threshold: args.init_threshold, bandwidth: args.bandwidth, l0_coeff }
        }
        other => bail!("unknown architecture `{other}`: use relu, topk, batchtopk or jumprelu"),
    })
}

/// The SAEs to train: one from the flags, or every combination of the `--sweep` lists.
fn members(args: &Args, d_model: usize) -> Result<Vec<Member>> {
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in &args.sweep {
        let (key, values) =
            item.split_once('=').with_context(|| format!("--sweep `{item}`: expected KEY=V1,V2,..."))?;
        let key = key.trim().replace('-', "_");
        if !["latents", "k", "arch", "l1", "l0_coeff"].contains(&key.as_str()) {
            bail!("--sweep key `{key}` is not sweepable; use latents, k, arch, l1 or l0_coeff");
        }
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
        if values.is_empty() {
            bail!("--sweep `{item}` lists no values");
        }
        lists.insert(key, values);
    }
    let one = |key: &str, default: String| lists.get(key).cloned().unwrap_or_else(|| vec![default]);
    let latents = one("latents", args.latents.unwrap_or(8 * d_model).to_string());
    let ks = one("k", args.k.to_string());
    let archs = one("arch", args.arch.clone());
    let l1s = one("l1", args.l1.to_string());
    let l0s = one("l0_coeff", args.l0_coeff.to_string());
    let parse_usize =
        |key: &str, v: &str| v.parse::<usize>().with_context(|| format!("{key} `{v}` is not a whole number"));
    let parse_f64 = |key: &str, v: &str| v.parse::<f64>().with_context(|| format!("{key} `{v}` is not a number"));
    let mut out = Vec::new();
    for arch_name in &archs {
        for l in &latents {
            for k in &ks {
                for l1 in &l1s {
                    for l0 in &l0s {
                        let arch = architecture(
                            arch_name,
                            args,
                            parse_usize("k", k)?,
                            parse_f64("l1", l1)?,
                            parse_f64("l0_coeff", l0)?,
                        )?;
                        let d_sae = parse_usize("latents", l)?;
                        let name = if lists.is_empty() { String::new() } else { Member::sweep_name(d_sae, &arch) };
                        if out.iter().any(|m: &Member| m.name == name) {
                            continue; // a key that does not apply to this architecture (k for relu)
                        }
                        out.push(Member { name, d_sae, arch, k_aux: args.k_aux, auxk_coeff: args.auxk_coeff });
                    }
                }
            }
        }
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.model.threads {
        tch::set_num_threads(n);
    }
    let device = capture::device::parse_device(args.model.device.as_deref())?;
    let (device, group) = join_group(&args, device)?;
    let leader = group.as_ref().is_none_or(|g| g.rank() == 0);
    let store = StoreOptions::default();
    let (manifest, _) = store::load_manifest(&args.data, &store)
        .with_context(|| format!("cannot open the training data `{}`", args.data))?;
    let d_model = match &args.hook {
        Some(h) => manifest.hook(h).map(|h| h.d_model),
        None => manifest.hooks.first().map(|h| h.d_model),
    }
    .unwrap_or(0);
    if args.follow && args.max_tokens.is_none() {
        bail!("--follow needs --max-tokens: the dataset's size is not known while it is being written");
    }
    let world_size = group.as_ref().map_or(1, |g| g.world_size());
    let members = members(&args, d_model)?;
    let widest = members.iter().map(|m| m.d_sae).max().unwrap_or(1);
    let settings = run_settings(&args, args.max_tokens.unwrap_or(manifest.tokens), world_size, widest);
    let request = TrainRequest {
        data_url: args.data.clone(),
        out_url: args.out.clone(),
        hook: args.hook.clone(),
        settings,
        members,
        device,
        store: store.clone(),
        group,
        checkpoint_every: args.checkpoint_every,
        log_every: args.log_every,
        stop: stop_on_signals()?,
        progress: !args.quiet && !args.json,
    };
    let summaries = match train(&request) {
        Ok(s) => s,
        Err(e @ TrainError::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    if !leader {
        return Ok(()); // rank 0 reports (and evaluates) for everyone
    }
    report(&args, &summaries, &store)
}

/// Under torchrun or srun, joins the data-parallel group: NCCL on GPUs (each rank on the GPU of
/// its LOCAL_RANK), Gloo on CPU. Returns the device this rank trains on, and the group if any.
fn join_group(args: &Args, device: Device) -> Result<(Device, Option<ProcessGroup>)> {
    let dist_env = DistEnv::from_env()?;
    if args.follow && dist_env.as_ref().is_some_and(|env| env.world_size > 1) {
        // Ranks of a followed dataset could see different numbers of batches, and a rank left
        // waiting in a collective would only fail at the timeout.
        bail!("--follow trains in one process only; finish the capture, then train with several ranks");
    }
    Ok(match dist_env {
        None => (device, None),
        Some(env) => {
            let device = match device {
                Device::Cuda(_) => Device::Cuda(env.local_rank),
                other => other,
            };
            let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
            let group = ProcessGroup::new(&env, backend, Duration::from_secs(args.dist_timeout))?;
            (device, Some(group))
        }
    })
}

/// The run's settings from the flags: the warm-ups default to 5% of the steps, the learning rate
/// to [`trainer::schedule::default_lr`] of the widest SAE.
fn run_settings(args: &Args, max_tokens: u64, world_size: usize, widest_latents: usize) -> RunSettings {
    let total_steps = max_tokens.div_ceil((args.batch_size.max(1) * world_size) as u64);
    let five_percent = (total_steps / 20).min(1000);
    RunSettings {
        hook: args.hook.clone().unwrap_or_default(),
        max_tokens,
        batch_size: args.batch_size,
        world_size,
        lr: args.lr.unwrap_or_else(|| trainer::schedule::default_lr(widest_latents)),
        warmup_steps: args.warmup_steps.unwrap_or(five_percent),
        lr_decay_fraction: args.lr_decay_fraction,
        sparsity_warmup_steps: args.sparsity_warmup_steps.unwrap_or(five_percent),
        grad_clip: args.grad_clip,
        adam_betas: (0.9, 0.999),
        adam_eps: 1e-8,
        seed: args.seed,
        dead_window: args.dead_window,
        follow: args.follow,
        shuffle: !args.no_shuffle,
        shuffle_window: args.shuffle_window,
        bf16_autocast: args.bf16_autocast,
        max_norm_multiple: args.max_norm_multiple,
        decoder_init: args.decoder_init,
    }
}

/// The flag that SIGINT and SIGTERM set. A second signal ends the process at once; the first
/// asks for a checkpoint and a stop.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(stop)
}

/// Prints each summary (and, unless --no-eval, its evaluation), then with --json one object.
fn report(args: &Args, summaries: &[TrainSummary], store: &StoreOptions) -> Result<()> {
    let mut results = Vec::new();
    for summary in summaries {
        print_summary(summary);
        let eval = if args.no_eval {
            None
        } else {
            let report = evaluate(&summary.out_url, &args.data, &args.eval, &args.model, store)
                .with_context(|| format!("evaluating {}", summary.out_url))?;
            print_report(&report);
            Some(report)
        };
        results.push(result_json(summary, eval.as_ref()));
    }
    if args.json {
        let mut out = results[0].clone();
        if results.len() > 1 {
            out["saes"] = serde_json::Value::Array(results);
        }
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

fn print_summary(s: &TrainSummary) {
    let status = if s.already_finished {
        " (already finished; nothing trained)".to_string()
    } else if let Some(step) = s.resumed_from_step {
        format!(" (resumed from step {step})")
    } else {
        String::new()
    };
    println!("trained {} {}×{} → {}{status}", s.architecture, s.d_in, s.d_sae, s.out_url);
    println!(
        "  {} steps, {} tokens · last interval: FVU {:.4}, L0 {:.1}, MSE {:.4} · dead {:.2}% · waiting for data {:.1}% · {:.0} tokens/s",
        s.steps,
        s.tokens,
        s.fvu,
        s.l0,
        s.mse,
        100.0 * s.dead_fraction,
        100.0 * s.data_wait_fraction,
        s.tokens_per_s
    );
}

fn result_json(s: &TrainSummary, eval: Option<&EvalReport>) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("summary");
    if let Some(e) = eval {
        v["ce_loss_score"] = e.ce.ce_loss_score.into();
        v["delta_ce"] = e.ce.delta_ce.into();
        v["eval"] = serde_json::to_value(e).expect("eval");
    }
    v
}

/// Expands `--config FILE` into flags placed before the command line's own, so that the flags
/// given explicitly win (clap keeps the last occurrence). TOML keys are flag names (`-` or `_`);
/// `true` becomes a bare flag, `false` is dropped, and a `[sweep]` table becomes `--sweep`.
pub fn expand_config(argv: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = argv.iter().position(|a| a == "--config" || a.starts_with("--config=")) else {
        return Ok(argv);
    };
    let path = match argv[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => argv.get(pos + 1).cloned().context("--config needs a file")?,
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file `{path}`"))?;
    let table: toml::Table = text.parse().with_context(|| format!("config file `{path}` is not valid TOML"))?;
    let flags = toml_flags(&table, &path)?;
    // argv = [program, subcommand, ...]: insert after the subcommand.
    let at = 2.min(argv.len());
    let mut out = argv[..at].to_vec();
    out.extend(flags);
    out.extend(argv[at..].iter().cloned());
    Ok(out)
}

/// TOML keys as command-line flags (see [`expand_config`]); `path` names the file in errors.
pub fn toml_flags(table: &toml::Table, path: &str) -> Result<Vec<String>> {
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Table(sweep) if key == "sweep" => {
                flags.push("--sweep".to_string());
                for (k, list) in sweep {
                    let values: Vec<String> = match list {
                        toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<_>>()?,
                        other => vec![scalar(other)?],
                    };
                    flags.push(format!("{k}={}", values.join(",")));
                }
            }
            toml::Value::Boolean(true) => flags.push(flag),
            toml::Value::Boolean(false) => {}
            other => {
                flags.push(flag);
                flags.push(scalar(other).with_context(|| format!("config key `{key}` in `{path}`"))?);
            }
        }
    }
    Ok(flags)
}

fn scalar(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("expected a number, string or boolean, found {}", other.type_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flags_come_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(&path, "latents = 4608\nfollow = true\nno_eval = false\n[sweep]\nk = [16, 32]\n").unwrap();
        let argv: Vec<String> = ["sae", "train", "--config", path.to_str().unwrap(), "--latents", "2304"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = expand_config(argv).unwrap();
        let joined = out.join(" ");
        assert!(joined.starts_with("sae train --follow --latents 4608 --sweep k=16,32 --config"), "{joined}");
        assert!(joined.ends_with("--latents 2304"), "{joined}");
    }
}

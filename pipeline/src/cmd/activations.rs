use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use capture::tokenizer::TextTokenizer;
use capture::{HookPoint, Hooks, Model};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Kind, Tensor};

use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hook to read, named as in TransformerLens.
    #[arg(long, default_value = "blocks.15.hook_resid_post")]
    hook: String,
    /// Text to run; may be given several times. Without it, --text-file is read.
    #[arg(long)]
    prompt: Vec<String>,
    /// A text file; documents are separated by lines holding only `%` (the fortune format).
    #[arg(long, default_value = "/usr/share/games/fortunes/fortunes")]
    text_file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    context_len: usize,
    /// Stop after this many tokens.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Run the whole model and compute logits even though only the hook is read (turns off
    /// early exit; for benchmarking it).
    #[arg(long)]
    full_forward: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let hook = model.network.parse_hook(&args.hook)?;
    if args.context_len < 2 {
        bail!("--context-len must be at least 2 (the first position of each window is not counted)");
    }
    let windows = token_windows(&args, &model.tokenizer)?;
    let total_tokens: usize = windows.iter().map(Vec::len).sum();
    let started = std::time::Instant::now();
    let acts = hook_rows(&args, &model, hook, windows)?;
    let secs = started.elapsed().as_secs_f64();
    let norms = acts.norm_scalaropt_dim(2, [1], false);
    let median_norm = norms.median().double_value(&[]);
    let stats = serde_json::json!({
        "hook": hook.to_string(),
        "rows": acts.size()[0],
        "d_model": acts.size()[1],
        "mean": acts.mean(Kind::Float).double_value(&[]),
        "std": acts.std(true).double_value(&[]),
        "norm_median": median_norm,
        "norm_mean": norms.mean(Kind::Float).double_value(&[]),
        "norm_max": norms.max().double_value(&[]),
        "outlier_rows": norms.gt(3.0 * median_norm).sum(Kind::Int64).int64_value(&[]),
        "tokens": total_tokens,
        "tokens_per_s": total_tokens as f64 / secs,
        "early_exit": !args.full_forward,
    });
    if args.json {
        println!("{stats}");
    } else {
        print_table(hook, &stats);
    }
    Ok(())
}

/// The token windows to run: each `--prompt` as one window, or else `--text-file`'s documents
/// joined by EOS and packed into full windows of `--context-len` (the last partial one dropped).
fn token_windows(args: &Args, tokenizer: &TextTokenizer) -> Result<Vec<Vec<i64>>> {
    let windows: Vec<Vec<i64>> = if args.prompt.is_empty() {
        let text = std::fs::read_to_string(&args.text_file)
            .with_context(|| format!("cannot read {}", args.text_file.display()))?;
        let eos = tokenizer.eos_id.map(|e| e as i64);
        let mut stream = Vec::new();
        for doc in text.split("\n%\n").map(str::trim).filter(|d| !d.is_empty()) {
            stream.extend(tokenizer.encode(doc)?.into_iter().map(|t| t as i64));
            stream.extend(eos);
            if stream.len() >= args.max_tokens {
                break;
            }
        }
        stream.truncate(args.max_tokens);
        stream.chunks_exact(args.context_len).map(<[i64]>::to_vec).collect()
    } else {
        args.prompt
            .iter()
            .map(|p| Ok(tokenizer.encode(p)?.into_iter().map(|t| t as i64).collect()))
            .collect::<Result<_>>()?
    };
    if windows.is_empty() {
        bail!("no window of {} tokens could be made from {}", args.context_len, args.text_file.display());
    }
    Ok(windows)
}

/// The hook's activations over `windows`, as `[rows, d]` f32 rows on the CPU, without position
/// 0 of any window (an attention sink with an outlier norm), with a progress bar.
fn hook_rows(args: &Args, model: &Model, hook: HookPoint, windows: Vec<Vec<i64>>) -> Result<Tensor> {
    let total_tokens: usize = windows.iter().map(Vec::len).sum();
    let bar = ProgressBar::new(total_tokens as u64).with_style(
        ProgressStyle::with_template("{spinner} forward [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut rows: Vec<Tensor> = Vec::new();
    // Prompts may differ in length, so only full windows are batched together.
    let batches: Vec<Vec<Vec<i64>>> = if args.prompt.is_empty() {
        windows.chunks(args.batch_size).map(<[_]>::to_vec).collect()
    } else {
        windows.into_iter().map(|w| vec![w]).collect()
    };
    for batch in batches {
        let len = batch[0].len() as i64;
        let flat: Vec<i64> = batch.concat();
        let tokens = Tensor::from_slice(&flat).view([batch.len() as i64, len]);
        let mut hooks = Hooks::new().capture([hook]);
        let out = model.network.forward(&tokens, None, &mut hooks, args.full_forward)?;
        // [batch, seq, d]; attn.hook_z's [batch, seq, n_heads, head_dim] becomes one row per token.
        let acts = out.hooks[&hook].flatten(2, -1);
        if len > 1 {
            rows.push(
                acts.narrow(1, 1, len - 1)
                    .reshape([-1, acts.size()[2]])
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu),
            );
        }
        bar.inc(flat.len() as u64);
    }
    bar.finish_and_clear();
    if rows.is_empty() {
        bail!("every window has a single token, and the first position is not counted");
    }
    Ok(Tensor::cat(&rows, 0))
}

fn print_table(hook: HookPoint, stats: &serde_json::Value) {
    println!("{} over {} rows (first position of each window left out)", hook, stats["rows"]);
    for key in ["d_model", "mean", "std", "norm_median", "norm_mean", "norm_max", "outlier_rows", "tokens_per_s"] {
        let v = &stats[key];
        match v.as_f64() {
            Some(f) if !v.is_i64() && !v.is_u64() => println!("  {key:<14} {f:.4}"),
            _ => println!("  {key:<14} {v}"),
        }
    }
    println!("  (outlier_rows: rows whose norm exceeds 3x the median)");
}

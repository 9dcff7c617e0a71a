//! `sae capture`: corpus → tokenizer → model → activation dataset.
//!
//! Stages and the threads that run them:
//! 1. a tokenizer thread packs the corpus into windows and sends batches of them over a bounded
//!    channel (batch b is always windows [b·B, (b+1)·B) of the global window order, so a resumed
//!    run or a worker computes exactly the same matrix products, and so the same bits);
//! 2. this thread runs the model up to the deepest hook and turns each batch into rows;
//! 3. the store's writer converts rows to the stored dtype and encodes Parquet on its own thread,
//!    uploads on its tokio runtime, and commits each shard; `append` blocks only when storage is
//!    slower than the model (bounded queues, so memory stays bounded);
//! 4. the manifest is created last (single worker), or by `sae dataset finalize`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use capture::HookPoint;
use crossbeam_channel::bounded;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use store::{
    CorpusIdentity, CreatedInfo, DatasetHeader, DatasetWriter, Dtype, HookSpec, ModelIdentity, TokenizerIdentity,
    WriterOptions,
};

use capture::windows::Window;

use crate::capture_rows::{keep_rows, rows_of_batch};
use crate::corpus_source::{CorpusArgs, WindowSource};
use crate::model_args::ModelArgs;
use crate::workers::WorkerSlot;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Hook to capture (TransformerLens name); repeat for several hooks in one pass.
    #[arg(long = "hook", default_value = "blocks.15.hook_resid_post")]
    hooks: Vec<String>,
    /// Rows (tokens) the dataset will hold, over all workers.
    #[arg(long, default_value_t = 100_000)]
    max_tokens: u64,
    /// Where to write the dataset: a path, file://, s3://bucket/prefix or memory://.
    #[arg(long, required_unless_present = "list_hooks")]
    out: Option<String>,
    /// Print the loaded model's hook names (one per line, in forward order) and exit.
    #[arg(long)]
    list_hooks: bool,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    context_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Also store position 0 of every window (an attention sink whose norm is an outlier).
    #[arg(long)]
    keep_first_position: bool,
    /// Stored dtype of the activations: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    store_dtype: String,
    /// zstd level of the shards.
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 256)]
    shard_mib: u64,
    /// Rows per Parquet row group (the reader's unit of work).
    #[arg(long, default_value_t = 4096)]
    row_group_rows: usize,
    /// Threads that encode row groups (zstd and the byte-planar split); the shards are the same
    /// bytes whatever the count. Default: the cores, at most 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    encode_threads: Option<u16>,
    /// This worker's index (0-based); default from SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or RANK.
    #[arg(long)]
    worker: Option<usize>,
    /// Number of workers; default from SLURM_ARRAY_TASK_COUNT, SAE_WORKERS or WORLD_SIZE.
    #[arg(long)]
    workers: Option<usize>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

impl Args {
    /// The dataset URL; clap requires `--out` unless `--list-hooks` is given, which returns early.
    fn out(&self) -> &str {
        self.out.as_deref().expect("clap requires --out unless --list-hooks")
    }
}

/// What makes two captures the same dataset; stored in the header so that resuming with other
/// settings is refused. Worker flags, device and logging are deliberately not part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CaptureConfig {
    corpus: String,
    corpus_format: String,
    max_tokens: u64,
    batch_size: usize,
    first_position: usize,
    compute_dtype: String,
}

/// Which global rows and batches this worker captures. Batch `b` is always windows
/// `[b·B, (b+1)·B)`, so the plan depends on the configuration and the worker slot alone.
struct RowPlan {
    first_position: usize,
    rows_per_window: u64,
    rows_per_batch: u64,
    /// This worker's batches.
    my_batches: std::ops::Range<u64>,
    /// Global rows this worker owns: `[first_row, end_row)`.
    first_row: u64,
    end_row: u64,
}

impl RowPlan {
    fn new(args: &Args, slot: &WorkerSlot) -> RowPlan {
        let first_position = usize::from(!args.keep_first_position);
        let rows_per_window = (args.context_len - first_position) as u64;
        let rows_per_batch = rows_per_window * args.batch_size as u64;
        let my_batches = slot.batch_range(args.max_tokens.div_ceil(rows_per_batch));
        let first_row = my_batches.start * rows_per_batch;
        let end_row = (my_batches.end * rows_per_batch).min(args.max_tokens);
        RowPlan { first_position, rows_per_window, rows_per_batch, my_batches, first_row, end_row }
    }
}

pub fn run(mut args: Args) -> Result<()> {
    let started = Instant::now();
    let slot = WorkerSlot::resolve(args.worker, args.workers)?;
    if args.context_len < 2 {
        bail!("--context-len must be at least 2");
    }
    if args.batch_size == 0 || args.max_tokens == 0 {
        bail!("--batch-size and --max-tokens must be positive");
    }
    let store_dtype = Dtype::parse(&args.store_dtype).context("--store-dtype")?;
    if args.model.dtype.is_none() && !args.list_hooks {
        if let Some(dtype) = dtype_of_existing_capture(args.out())? {
            tracing::info!("{} holds a capture computed in {dtype}: continuing in {dtype}", args.out());
            args.model.dtype = Some(dtype);
        }
    }
    let model = args.model.load()?;
    if args.list_hooks {
        for hook in model.network.hook_points() {
            println!("{hook}");
        }
        return Ok(());
    }
    let mut hooks = args.hooks.iter().map(|h| model.network.parse_hook(h)).collect::<Result<Vec<_>, _>>()?;
    hooks.sort();
    hooks.dedup();
    let plan = RowPlan::new(&args, &slot);
    let source = WindowSource::open(&args.corpus, &model.tokenizer, args.context_len)?;
    let header = dataset_header(&args, &model, &hooks, &source, plan.first_position)?;
    if let Some(done) = already_finished_or_different(args.out(), &header)? {
        return report(&args, &done, started, None);
    }
    let opts = WriterOptions {
        dtype: store_dtype,
        zstd_level: args.zstd_level,
        shard_mib: args.shard_mib,
        row_group_rows: args.row_group_rows,
        worker: slot.store_id(),
        encode_threads: args.encode_threads.map_or_else(store::default_encode_threads, usize::from),
        ..WriterOptions::default()
    };
    let mut writer = DatasetWriter::create(args.out(), header, opts)
        .with_context(|| format!("cannot write the dataset at {}", args.out()))?;
    let resume_row = plan.first_row + writer.committed_rows();
    if writer.committed_rows() > 0 {
        tracing::info!(rows = writer.committed_rows(), "resuming after the rows this worker already committed");
    }
    let loop_started = Instant::now();
    let (written, model_tokens) = capture_rows(&args, &plan, &model, &hooks, &source, &mut writer, resume_row)?;
    if written < plan.end_row {
        tracing::warn!(
            rows = written - plan.first_row,
            wanted = plan.end_row - plan.first_row,
            "the corpus ended before --max-tokens: the dataset holds what there was"
        );
    }
    if slot.count > 1 {
        let records = writer.finish_part(slot.count)?;
        eprintln!(
            "worker {} of {} done: {} shards; run `sae dataset finalize {}` once every worker is done",
            slot.index,
            slot.count,
            records.len(),
            args.out()
        );
        return Ok(());
    }
    let manifest = writer.finish()?;
    let capture_seconds = loop_started.elapsed().as_secs_f64();
    tracing::debug!(seconds = capture_seconds, shards = manifest.shards.len(), "manifest committed");
    let info = store::info(args.out(), &store::StoreOptions::default())?;
    let captured = written.saturating_sub(resume_row);
    let compute_dtype = capture::device::dtype_name(model.network.kind());
    report(
        &args,
        &info,
        started,
        Some(Throughput { rows: captured, model_tokens, seconds: capture_seconds, compute_dtype }),
    )
}

/// The header that names this capture: model, tokenizer, hooks, corpus and the settings that
/// make two captures the same dataset.
fn dataset_header(
    args: &Args,
    model: &capture::Model,
    hooks: &[HookPoint],
    source: &WindowSource,
    first_position: usize,
) -> Result<DatasetHeader> {
    let config = CaptureConfig {
        corpus: source.identity().name.clone(),
        corpus_format: source.format().to_string(),
        max_tokens: args.max_tokens,
        batch_size: args.batch_size,
        first_position,
        compute_dtype: format!("{:?}", model.network.kind()),
    };
    Ok(DatasetHeader {
        model: ModelIdentity { name: model.name.clone(), file_sha256: model.file_sha256()? },
        tokenizer: TokenizerIdentity { name: model.name.clone(), sha256: model.tokenizer.digest()? },
        hooks: hooks.iter().map(|&h| HookSpec { name: h.to_string(), d_model: model.network.hook_width(h) }).collect(),
        context_len: args.context_len,
        corpus: CorpusIdentity { detail: serde_json::to_string(&config)?, ..source.identity().clone() },
        created: CreatedInfo::from_process(),
    })
}

/// Runs the model over this worker's batches from the one holding `resume_row` and appends
/// rows `[resume_row, end_row)` to `writer`. Returns the global row reached (below `end_row`
/// when the corpus ended first) and the tokens the model ran.
fn capture_rows(
    args: &Args,
    plan: &RowPlan,
    model: &capture::Model,
    hooks: &[HookPoint],
    source: &WindowSource,
    writer: &mut DatasetWriter,
    resume_row: u64,
) -> Result<(u64, u64)> {
    let batch_size = args.batch_size;
    let first_batch = resume_row / plan.rows_per_batch;
    // The last batch holds only the windows that reach --max-tokens. That depends on the
    // configuration alone, so every run (resumed or split) still computes the same batches.
    let end_window = (plan.my_batches.end * batch_size as u64).min(args.max_tokens.div_ceil(plan.rows_per_window));
    let windows = source.windows(first_batch * batch_size as u64, end_window)?;
    let (rx, producer) = spawn_tokenizer(windows, batch_size)?;
    let bar = ProgressBar::new(plan.end_row.saturating_sub(resume_row)).with_style(
        ProgressStyle::with_template(
            "{spinner} capture [{bar:30}] {human_pos}/{human_len} tokens {per_sec} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut row = first_batch * plan.rows_per_batch;
    let mut model_tokens = 0u64;
    while row < plan.end_row {
        let Ok(windows) = rx.recv() else { break };
        let windows = windows?;
        let mut rows = rows_of_batch(model, hooks, &windows, plan.first_position)?;
        model_tokens += (windows.len() * args.context_len) as u64;
        let batch_rows = rows.rows() as u64;
        // Keep only [resume_row, end_row) of this batch's global rows.
        let keep_from = resume_row.saturating_sub(row) as usize;
        let keep_to = (plan.end_row - row).min(batch_rows) as usize;
        keep_rows(&mut rows, keep_from..keep_to);
        bar.inc(rows.rows() as u64);
        writer.append(rows)?;
        let committed = writer.progress();
        bar.set_message(format!("{} shards, {} committed", committed.shards, indicatif::HumanBytes(committed.bytes)));
        row += batch_rows;
        if windows.len() < batch_size {
            break;
        }
    }
    drop(rx);
    bar.finish_and_clear();
    // A closed channel ends the loop; only a tokenizer thread that returned means the corpus ended.
    if let Err(panic) = producer.join() {
        bail!("the tokenizer thread panicked: {}", store::panic_message(&*panic));
    }
    Ok((row.min(plan.end_row), model_tokens))
}

type WindowBatches = crossbeam_channel::Receiver<Result<Vec<Window>>>;

/// Packs `windows` into batches of `batch_size` on a thread of its own; a short batch or an
/// error is the last thing it sends.
fn spawn_tokenizer(
    mut windows: impl Iterator<Item = capture::Result<Window>> + Send + 'static,
    batch_size: usize,
) -> Result<(WindowBatches, std::thread::JoinHandle<()>)> {
    let (tx, rx) = bounded::<Result<Vec<Window>>>(4);
    let producer = std::thread::Builder::new().name("sae-tokenize".into()).spawn(move || loop {
        let batch = windows.by_ref().take(batch_size).collect::<capture::Result<Vec<Window>>>().map_err(Into::into);
        let last = !matches!(&batch, Ok(b) if b.len() == batch_size);
        if matches!(&batch, Ok(b) if b.is_empty()) || tx.send(batch).is_err() || last {
            return;
        }
    })?;
    Ok((rx, producer))
}

fn already_finished_or_different(out: &str, header: &DatasetHeader) -> Result<Option<store::DatasetInfo>> {
    let info = match store::info(out, &store::StoreOptions::default()) {
        Ok(info) => info,
        Err(store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let existing = DatasetHeader {
        model: info.model.clone(),
        tokenizer: info.tokenizer.clone(),
        hooks: info.hooks.iter().map(|h| HookSpec { name: h.name.clone(), d_model: h.d_model }).collect(),
        context_len: info.context_len,
        corpus: info.corpus.clone(),
        created: info.created.clone(),
    };
    let differences = existing.differences(header);
    if !differences.is_empty() {
        bail!(
            "{out} holds a different capture: {}. Use another --out, or delete it to start over",
            differences.join("; ")
        );
    }
    Ok(info.is_final.then_some(info))
}

/// The compute dtype (as `--dtype` spells it) of the capture that `out` already holds, finished
/// or in progress; None when it holds none. Without `--dtype`, a capture continues in it, so a job
/// requeued onto a CPU of another kind (whose default differs) resumes instead of being refused.
fn dtype_of_existing_capture(out: &str) -> Result<Option<String>> {
    let info = match store::info(out, &store::StoreOptions::default()) {
        Ok(info) => info,
        Err(store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let config: serde_json::Value = serde_json::from_str(&info.corpus.detail).unwrap_or_default();
    let Some(saved) = config["compute_dtype"].as_str() else { return Ok(None) };
    // The header spells the kind as `dataset_header` writes it.
    let kinds = [tch::Kind::Float, tch::Kind::BFloat16, tch::Kind::Half];
    Ok(kinds.into_iter().find(|kind| format!("{kind:?}") == saved).map(capture::device::dtype_name))
}

/// What this run captured: stored rows, tokens the model ran over (position 0 of each window
/// included), and seconds from the first batch to the committed manifest.
#[derive(Default)]
struct Throughput {
    rows: u64,
    model_tokens: u64,
    seconds: f64,
    /// The model's compute dtype (`f32`, `bf16`, `f16`).
    compute_dtype: String,
}

/// The summary; `captured` is `None` when the dataset was already finished.
fn report(args: &Args, info: &store::DatasetInfo, started: Instant, captured: Option<Throughput>) -> Result<()> {
    let secs = started.elapsed().as_secs_f64();
    let was_finished = captured.is_none();
    let t = captured.unwrap_or_default();
    let per_s = |n: u64| if t.seconds > 0.0 { n as f64 / t.seconds } else { 0.0 };
    let tokens_per_s = per_s(t.rows);
    let summary = serde_json::json!({
        "url": args.out(),
        "already_finished": was_finished,
        "captured_tokens": t.rows,
        "capture_seconds": t.seconds,
        "tokens_per_s": tokens_per_s,
        "model_tokens_per_s": per_s(t.model_tokens),
        "compute_dtype": (!was_finished).then_some(&t.compute_dtype),
        "tokens": info.tokens,
        "hooks": info.hooks.iter().map(|h| &h.name).collect::<Vec<_>>(),
        "shards": info.shards,
        "bytes": info.bytes,
        "bytes_per_element": info.bytes_per_element,
        "wall_seconds": secs,
    });
    if args.json {
        println!("{summary}");
    } else {
        if was_finished {
            println!("{} is already a finished dataset; nothing to capture", args.out());
        }
        println!("tokens      {}", info.tokens);
        println!("hooks       {}", info.hooks.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "));
        println!("shards      {}", info.shards);
        println!("bytes       {} ({:.3} B/elem, {})", info.bytes, info.bytes_per_element, info.dtype.name());
        if !was_finished {
            let model = format!("{} model", t.compute_dtype);
            println!("throughput  {tokens_per_s:.1} stored tokens/s ({model}, encoding and upload, after loading)");
        }
        println!("wall time   {secs:.1} s");
    }
    Ok(())
}

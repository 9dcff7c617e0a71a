//! Opening a reader: the dataset's hooks from its manifest (or, in follow mode, its header), the
//! checks of the options against them, the plan, and the fetch task started.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Semaphore};

use super::fetch::{kib_permits, produce_final, BufPool, Ctx};
use super::follow::produce_follow;
use super::plan::{Plan, RgRef};
use super::{Fetched, OutputDtype, Reader, ReaderOptions, Source};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::location::{open_store_with, Location};
use crate::manifest::{HeaderFile, Manifest, ShardEntry, HEADER_KEY, MANIFEST_KEY};
use crate::records::{read_header, read_manifest};
use crate::runtime::runtime;

impl Reader {
    /// Open the dataset at `url` for reading.
    pub fn open(url: &str, opts: ReaderOptions) -> Result<Reader> {
        let loc = open_store_with(url, &opts.store)?;
        Self::open_at(loc, opts)
    }

    /// [`Reader::open`] on an already opened location.
    pub fn open_at(loc: Location, opts: ReaderOptions) -> Result<Reader> {
        let rt = Arc::new(runtime()?);
        let (manifest, header) = rt.block_on(async {
            let m = read_manifest(&loc).await?;
            let h = if m.is_none() { read_header(&loc).await? } else { None };
            Ok::<_, Error>((m, h))
        })?;
        let (hooks, dtype) = dataset_hooks(&loc, manifest.as_ref(), header.as_ref(), &opts)?;
        let d = hook_width(&loc, &hooks, &opts)?;
        let out_dtype = match opts.output {
            OutputDtype::Stored => dtype,
            OutputDtype::F32 => Dtype::F32,
        };
        let pool = decoding_pool(opts.decode_threads)?;
        // Follow mode registers shards as it discovers them (its jobs index that list), even
        // when the manifest is already there.
        let shards = match &opts.follow {
            None => manifest.as_ref().map(|m| m.shards.clone()).unwrap_or_default(),
            Some(_) => Vec::new(),
        };
        let ctx = Arc::new(Ctx {
            loc,
            hook: opts.hook.clone(),
            d,
            dtype,
            out_dtype,
            with_tokens: opts.with_tokens,
            shards: Mutex::new(shards.clone()),
            metas: Mutex::new(HashMap::new()),
            pool,
            buffers: Arc::new(BufPool {
                bufs: Mutex::new(Vec::new()),
                max: opts.prefetch_row_groups + opts.window_row_groups + 4,
            }),
        });
        check_window_fits(manifest.as_ref(), d * out_dtype.size(), &opts)?;
        let source = Arc::new(plan_source(manifest.is_some(), &shards, &opts)?);
        let (rx, producer) = start_fetching(&rt, &ctx, &source, &opts);
        let cursor = opts.start;
        let row = cursor.batch * opts.batch_rows as u64;
        Ok(Reader {
            rt,
            rx,
            producer: Some(producer),
            ended: false,
            ctx,
            source,
            opts,
            cursor,
            row,
            window: None,
            done: false,
            manifest,
        })
    }
}

/// The dataset's hooks (name, d_model) and stored dtype: from the manifest, or from the header
/// of a dataset still being written when reading it in follow mode.
fn dataset_hooks(
    loc: &Location,
    manifest: Option<&Manifest>,
    header: Option<&HeaderFile>,
    opts: &ReaderOptions,
) -> Result<(Vec<(String, usize)>, Dtype)> {
    match (manifest, header) {
        (Some(m), _) => Ok((m.hooks.iter().map(|h| (h.name.clone(), h.d_model)).collect(), m.dtype)),
        (None, Some(h)) if opts.follow.is_some() => {
            Ok((h.header.hooks.iter().map(|h| (h.name.clone(), h.d_model)).collect(), h.encoding.dtype))
        }
        (None, Some(_)) => Err(Error::NotFound {
            url: loc.url.clone(),
            what: format!("the dataset is not final (no {MANIFEST_KEY}); read it in follow mode"),
        }),
        (None, None) => {
            Err(Error::NotFound { url: loc.url.clone(), what: format!("no {MANIFEST_KEY} or {HEADER_KEY}") })
        }
    }
}

/// `d_model` of the hook asked for, which must exist and match `opts.d_model` when given.
fn hook_width(loc: &Location, hooks: &[(String, usize)], opts: &ReaderOptions) -> Result<usize> {
    let d = match hooks.iter().find(|(n, _)| n == &opts.hook) {
        None => {
            return Err(Error::NoSuchHook {
                url: loc.url.clone(),
                hook: opts.hook.clone(),
                have: hooks.iter().map(|(n, d)| format!("{n} (d_model {d})")).collect(),
            });
        }
        Some((_, d)) => *d,
    };
    if let Some(wanted) = opts.d_model {
        if wanted != d {
            return Err(Error::WrongDModel { url: loc.url.clone(), hook: opts.hook.clone(), found: d, wanted });
        }
    }
    Ok(d)
}

fn decoding_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("sae-store-decode-{i}"))
        .build()
        .map_err(|e| Error::Start { what: "decoding threads", cause: e.to_string() })
}

/// The bytes-in-flight budget must hold one window of the largest row groups, or the reader
/// would wait for itself.
fn check_window_fits(manifest: Option<&Manifest>, row_bytes: usize, opts: &ReaderOptions) -> Result<()> {
    let (largest, window) = window_shape(manifest, opts);
    if window * kib_permits(largest * row_bytes) > kib_permits(opts.max_bytes_in_flight) {
        return Err(Error::invalid(format!(
            "max_bytes_in_flight {} cannot hold a window of {} row groups ({} bytes); raise it or lower window_row_groups",
            opts.max_bytes_in_flight,
            opts.window_row_groups,
            largest * row_bytes * window
        )));
    }
    Ok(())
}

/// The least `max_bytes_in_flight` with which a reader holds one shuffle window of `manifest`'s
/// largest row groups and still fetches `prefetch_row_groups` more ahead of it, counted as the
/// fetcher counts (whole KiB per row group of `row_bytes`-byte decoded rows). A caller that
/// raises `window_row_groups` raises the budget to at least this.
pub fn window_budget(manifest: Option<&Manifest>, row_bytes: usize, opts: &ReaderOptions) -> usize {
    let (largest, window) = window_shape(manifest, opts);
    (window + opts.prefetch_row_groups) * kib_permits(largest * row_bytes) * 1024
}

/// The rows of the largest row group and the row groups in one window: never more than the
/// dataset has (in follow mode, with no final manifest, not yet known).
fn window_shape(manifest: Option<&Manifest>, opts: &ReaderOptions) -> (usize, usize) {
    let row_groups = || manifest.iter().flat_map(|m| &m.shards).flat_map(|s| s.row_groups.iter().copied());
    let largest = row_groups().max().unwrap_or(0) as usize;
    let window = match manifest {
        Some(_) => opts.window_row_groups.clamp(1, row_groups().count().max(1)),
        None => opts.window_row_groups.max(1),
    };
    (largest, window)
}

/// A plan of the manifest's row groups when reading a final dataset, follow mode otherwise.
fn plan_source(is_final: bool, shards: &[ShardEntry], opts: &ReaderOptions) -> Result<Source> {
    if !is_final || opts.follow.is_some() {
        // World 0 would divide by zero when row groups are dealt by identity.
        if opts.world == 0 || opts.rank >= opts.world {
            return Err(Error::invalid(format!("rank {} is not in a world of {}", opts.rank, opts.world)));
        }
        return Ok(Source::Follow);
    }
    let all: Vec<RgRef> = shards
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            s.row_groups.iter().enumerate().map(move |(ri, &rows)| RgRef { shard: si as u32, rg: ri as u32, rows })
        })
        .collect();
    let plan = Plan::new(all, opts)?;
    if opts.start.batch >= plan.batches_per_epoch {
        return Err(Error::invalid(format!(
            "cursor {:?} is past the end of an epoch of {} batches (was it saved with another batch size, world or dataset?)",
            opts.start, plan.batches_per_epoch
        )));
    }
    Ok(Source::Final(plan))
}

type FetchTask = (mpsc::Receiver<Result<Fetched>>, tokio::task::JoinHandle<()>);

/// Spawns the task that fetches and decodes row groups ahead of the reader.
fn start_fetching(rt: &Runtime, ctx: &Arc<Ctx>, source: &Arc<Source>, opts: &ReaderOptions) -> FetchTask {
    let (tx, rx) = mpsc::channel(2);
    let sem = Arc::new(Semaphore::new(kib_permits(opts.max_bytes_in_flight)));
    let producer = match &**source {
        Source::Final(_) => {
            let (ctx2, src2, o2) = (ctx.clone(), source.clone(), opts.clone());
            rt.spawn(async move { produce_final(ctx2, src2, o2, tx, sem).await })
        }
        Source::Follow => {
            let (ctx2, o2) = (ctx.clone(), opts.clone());
            rt.spawn(async move { produce_follow(ctx2, o2, tx, sem).await })
        }
    };
    (rx, producer)
}

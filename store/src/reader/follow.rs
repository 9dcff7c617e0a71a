//! Follow mode: reading a dataset that is still being written. Shards are picked up as their
//! commit records appear, each row group owned by one rank by its identity, and the reading ends
//! once `manifest.json` exists and every shard it lists was read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use super::fetch::{pump, Ctx};
use super::plan::{Job, RgRef};
use super::window::Window;
use super::{Batch, Fetched, Reader, ReaderOptions};
use crate::error::{Error, Result};
use crate::manifest::ShardEntry;
use crate::records::{list_commits, read_manifest};
use crate::rng::{permutation, SplitMix64};

impl Reader {
    /// Follow mode: row groups in commit order, rows shuffled within windows; single pass.
    pub(super) fn next_follow(&mut self) -> Result<Option<Batch>> {
        let b = self.opts.batch_rows;
        let mut batch = self.new_batch(b);
        let mut filled = 0usize;
        while filled < b {
            if self.window.as_ref().is_none_or(|w| self.row >= w.end()) {
                match self.next_follow_window()? {
                    Some(w) => self.window = Some(w),
                    None => break,
                }
            }
            filled += self.copy_from_window(&mut batch, b - filled);
        }
        if filled == 0 || (filled < b && self.opts.drop_last) {
            return Ok(None);
        }
        batch.rows = filled;
        batch.cursor = self.cursor;
        self.cursor.batch += 1;
        batch.next = self.cursor;
        Ok(Some(batch))
    }

    /// The follow-mode window after the current one that holds row `self.row` (None: the data
    /// ended). A resumed reader starts past row 0: the windows before its row are formed exactly
    /// as the first reader formed them, then dropped.
    fn next_follow_window(&mut self) -> Result<Option<Window>> {
        let mut start = self.window.take().map_or(0, |w| w.end());
        loop {
            let mut rgs = Vec::new();
            while rgs.len() < self.opts.window_row_groups.max(1) {
                match self.recv()? {
                    Some(d) => rgs.push(d),
                    None => break,
                }
            }
            if rgs.is_empty() {
                return Ok(None);
            }
            let rows: u64 = rgs.iter().map(|d| d.rows as u64).sum();
            if start + rows <= self.row {
                start += rows;
                continue;
            }
            // The window's first row is unique per window: it keys the permutation.
            let key = [self.opts.seed, 0, self.opts.rank as u64, self.opts.world as u64, start, 0x666f6c];
            let permute = |rows| self.opts.shuffle.then(|| permutation(rows, &mut SplitMix64::keyed(&key)));
            return Ok(Some(Window::new(0, start, rgs, permute)));
        }
    }
}

/// Every shard of a dataset being written, from its manifest once there is one (then the list is
/// complete) or else from the commit records so far. Returns (final, shards).
pub(super) async fn list_shards(ctx: &Ctx) -> Result<(bool, Vec<ShardEntry>)> {
    if let Some(m) = read_manifest(&ctx.loc).await? {
        return Ok((true, m.shards));
    }
    let commits = list_commits(&ctx.loc, None).await?;
    Ok((false, commits.into_iter().map(|c| c.shard).collect()))
}

/// Registers a newly discovered shard and returns the jobs of its row groups that this rank owns.
pub(super) fn follow_jobs(ctx: &Ctx, s: ShardEntry, o: &ReaderOptions) -> Vec<Job> {
    let idx = {
        let mut v = ctx.shards.lock().unwrap();
        v.push(s.clone());
        v.len() - 1
    };
    let mut jobs = Vec::new();
    for (ri, &rows) in s.row_groups.iter().enumerate() {
        // Ranks may discover commits in different orders, so the owner of a row group depends
        // only on its identity: (shard key, row group index).
        let owner =
            crc32c::crc32c_append(crc32c::crc32c(s.key.as_bytes()), &(ri as u64).to_le_bytes()) as u64 % o.world as u64;
        if owner == o.rank as u64 {
            jobs.push(Job {
                epoch: 0,
                window: 0,
                window_row_start: 0,
                window_len: 1,
                rg: RgRef { shard: idx as u32, rg: ri as u32, rows },
            });
        }
    }
    jobs
}

/// The jobs of the shards an interrupted reader had discovered, in its order.
pub(super) async fn replay_jobs(ctx: &Ctx, o: &ReaderOptions, replay: &[String]) -> Result<Vec<Job>> {
    let (_, shards) = list_shards(ctx).await?;
    let mut by_key: HashMap<String, ShardEntry> = shards.into_iter().map(|s| (s.key.clone(), s)).collect();
    let mut jobs = Vec::new();
    for key in replay {
        let s = by_key.remove(key).ok_or_else(|| Error::ReaderFailed {
            url: ctx.loc.url.clone(),
            detail: format!(
                "shard `{key}`, read before the run was interrupted, is no longer committed; the run cannot resume in the same order"
            ),
        })?;
        jobs.extend(follow_jobs(ctx, s, o));
    }
    Ok(jobs)
}

pub(super) async fn produce_follow(
    ctx: Arc<Ctx>,
    o: ReaderOptions,
    tx: mpsc::Sender<Result<Fetched>>,
    sem: Arc<Semaphore>,
) {
    let fo = o.follow.clone().unwrap_or_default();
    let mut seen: HashSet<String> = fo.replay.iter().cloned().collect();
    if !fo.replay.is_empty() {
        let jobs = match replay_jobs(&ctx, &o, &fo.replay).await {
            Ok(jobs) => jobs,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if !pump(jobs, &ctx, &sem, o.prefetch_row_groups, &tx).await {
            return;
        }
    }
    let mut last_new = tokio::time::Instant::now();
    loop {
        #[cfg(test)]
        crate::failpoints::hit("follow_poll", &ctx.loc.url);
        let (is_final, shards) = match list_shards(&ctx).await {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let new: Vec<ShardEntry> = shards.into_iter().filter(|s| !seen.contains(&s.key)).collect();
        if !new.is_empty() {
            last_new = tokio::time::Instant::now();
        }
        let mut jobs = Vec::new();
        for s in new {
            seen.insert(s.key.clone());
            jobs.extend(follow_jobs(&ctx, s, &o));
        }
        if !pump(jobs, &ctx, &sem, o.prefetch_row_groups, &tx).await {
            return;
        }
        if is_final {
            let _ = tx.send(Ok(Fetched::End)).await;
            return;
        }
        if fo.idle_timeout.is_some_and(|t| last_new.elapsed() > t) {
            let _ = tx.send(Err(Error::FollowIdle { url: ctx.loc.url.clone(), idle: fo.idle_timeout.unwrap() })).await;
            return;
        }
        tokio::time::sleep(fo.poll).await;
    }
}

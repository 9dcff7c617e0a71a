//! Which share of a job this process does: `--worker I --workers N`, or the batch system's
//! variables when the flags are absent.

use anyhow::{bail, Context, Result};

/// This process's index among `count` workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSlot {
    pub index: usize,
    pub count: usize,
}

impl WorkerSlot {
    /// The flags win; then Slurm job arrays (`SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`),
    /// Kubernetes indexed jobs (`JOB_COMPLETION_INDEX` with `--workers` or `SAE_WORKERS`), then
    /// torchrun's `RANK`/`WORLD_SIZE`; otherwise a single worker.
    pub fn resolve(worker: Option<usize>, workers: Option<usize>) -> Result<Self> {
        Self::resolve_with(worker, workers, |k| std::env::var(k).ok())
    }

    fn resolve_with(
        worker: Option<usize>,
        workers: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let parse = |key: &str| -> Result<Option<usize>> {
            env(key)
                .map(|v| v.trim().parse::<usize>().with_context(|| format!("{key}={v:?} is not a whole number")))
                .transpose()
        };
        let slot = if let Some(index) = worker {
            WorkerSlot { index, count: workers.context("--worker needs --workers")? }
        } else if let (Some(index), Some(count)) = (parse("SLURM_ARRAY_TASK_ID")?, parse("SLURM_ARRAY_TASK_COUNT")?) {
            WorkerSlot { index, count: workers.unwrap_or(count) }
        } else if let Some(index) = parse("JOB_COMPLETION_INDEX")? {
            let count = workers
                .or(parse("SAE_WORKERS")?)
                .context("JOB_COMPLETION_INDEX is set: give the worker count with --workers or SAE_WORKERS")?;
            WorkerSlot { index, count }
        } else if let (Some(index), Some(count)) = (parse("RANK")?, parse("WORLD_SIZE")?) {
            WorkerSlot { index, count: workers.unwrap_or(count) }
        } else {
            WorkerSlot { index: 0, count: workers.unwrap_or(1) }
        };
        if slot.count == 0 || slot.index >= slot.count {
            bail!("worker {} of {} is out of range (workers are numbered 0..{})", slot.index, slot.count, slot.count);
        }
        Ok(slot)
    }

    /// The contiguous range of `total` batches this worker owns. Contiguous ranges make the
    /// merged dataset (workers in index order) row-for-row equal to a single worker's.
    pub fn batch_range(self, total: u64) -> std::ops::Range<u64> {
        let share = |i: usize| total * i as u64 / self.count as u64;
        share(self.index)..share(self.index + 1)
    }

    /// The store's worker id: zero-padded so that lexical order is index order.
    pub fn store_id(self) -> String {
        format!("w{:05}", self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn flags_win_over_the_environment() {
        let slot = WorkerSlot::resolve_with(Some(1), Some(3), env(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap();
        assert_eq!(slot, WorkerSlot { index: 1, count: 3 });
    }

    #[test]
    fn batch_systems_are_read_in_order() {
        let slurm =
            env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("RANK", "0"), ("WORLD_SIZE", "2")]);
        assert_eq!(WorkerSlot::resolve_with(None, None, slurm).unwrap(), WorkerSlot { index: 2, count: 4 });
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3"), ("SAE_WORKERS", "5")]);
        assert_eq!(WorkerSlot::resolve_with(None, None, k8s).unwrap(), WorkerSlot { index: 3, count: 5 });
        assert!(WorkerSlot::resolve_with(None, None, env(&[("JOB_COMPLETION_INDEX", "3")])).is_err());
        let torchrun = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        assert_eq!(WorkerSlot::resolve_with(None, None, torchrun).unwrap(), WorkerSlot { index: 1, count: 2 });
        assert_eq!(WorkerSlot::resolve_with(None, None, env(&[])).unwrap(), WorkerSlot { index: 0, count: 1 });
    }

    #[test]
    fn bad_slots_are_refused() {
        assert!(WorkerSlot::resolve_with(Some(2), Some(2), env(&[])).is_err());
        assert!(WorkerSlot::resolve_with(Some(0), None, env(&[])).is_err());
        assert!(WorkerSlot::resolve_with(None, None, env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).is_err());
    }

    #[test]
    fn batch_ranges_cover_everything_once_in_order() {
        for count in 1..6 {
            let mut next = 0;
            for index in 0..count {
                let r = WorkerSlot { index, count }.batch_range(17);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 17);
        }
        assert!(WorkerSlot { index: 3, count: 10 }.store_id() < WorkerSlot { index: 10, count: 11 }.store_id());
    }
}

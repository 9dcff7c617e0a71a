//! The plan of a final dataset: its row groups dealt to ranks each epoch, cut into windows,
//! and the batch arithmetic that makes every rank yield the same number of batches.

use super::ReaderOptions;
use crate::error::{Error, Result};
use crate::rng::{permutation, SplitMix64};

/// A row group of the dataset, in global order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RgRef {
    pub shard: u32,
    pub rg: u32,
    pub rows: u64,
}

/// The row groups of one rank for one epoch, in reading order: a pure function of
/// (seed, epoch, rank, world).
pub(crate) fn rank_row_groups(
    all: &[RgRef],
    seed: u64,
    epoch: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
) -> Vec<RgRef> {
    let order: Vec<u32> = if shuffle {
        permutation(all.len(), &mut SplitMix64::keyed(&[seed, epoch, 0x7267]))
    } else {
        (0..all.len() as u32).collect()
    };
    let (owner, _) = deal(all, &order, world);
    order.into_iter().filter(|&i| owner[i as usize] == rank).map(|i| all[i as usize]).collect()
}

/// Rows of every rank (epoch-invariant: the loads depend only on the multiset of sizes).
pub(super) fn rank_loads(all: &[RgRef], world: usize) -> Vec<u64> {
    let order: Vec<u32> = (0..all.len() as u32).collect();
    deal(all, &order, world).1
}

/// Deals the row groups `order` lists to `world` ranks: longest first (stable: equal sizes keep
/// their order in `order`), each onto the least loaded rank (the lowest on ties). Returns the
/// rank of every row group (indexed like `all`) and the rows each rank got.
pub(super) fn deal(all: &[RgRef], order: &[u32], world: usize) -> (Vec<usize>, Vec<u64>) {
    let mut by_size = order.to_vec();
    by_size.sort_by(|a, b| all[*b as usize].rows.cmp(&all[*a as usize].rows));
    let mut loads = vec![0u64; world];
    let mut owner = vec![0usize; all.len()];
    for i in by_size {
        let r = (0..world).min_by_key(|&r| (loads[r], r)).unwrap();
        loads[r] += all[i as usize].rows;
        owner[i as usize] = r;
    }
    (owner, loads)
}

/// One row group to fetch, with where it sits in the rank's stream.
#[derive(Clone, Debug)]
pub(super) struct Job {
    pub(super) epoch: u64,
    pub(super) window: u64,
    /// Row index (within the rank's epoch) of the window's first row.
    pub(super) window_row_start: u64,
    pub(super) window_len: usize,
    pub(super) rg: RgRef,
}

/// The static part of a plan: the dataset's row groups and the batch arithmetic.
pub(super) struct Plan {
    pub(super) all: Vec<RgRef>,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) shuffle: bool,
    pub(super) seed: u64,
    pub(super) window: usize,
    pub(super) batch_rows: u64,
    /// Rows yielded per epoch by this rank (= batches_per_epoch * batch_rows with drop_last).
    pub(super) epoch_rows: u64,
    pub(super) batches_per_epoch: u64,
}

impl Plan {
    pub(super) fn new(all: Vec<RgRef>, o: &ReaderOptions) -> Result<Plan> {
        if o.world == 0 || o.rank >= o.world {
            return Err(Error::invalid(format!("rank {} is not in a world of {}", o.rank, o.world)));
        }
        if o.batch_rows == 0 {
            return Err(Error::invalid("batch_rows must be > 0"));
        }
        if !o.drop_last && o.world > 1 {
            return Err(Error::invalid("drop_last = false needs world = 1 (every rank must yield the same batches)"));
        }
        if all.len() < o.world {
            return Err(Error::invalid(format!(
                "the dataset has {} row groups, fewer than the {} ranks: every rank needs at least one (write smaller row groups)",
                all.len(),
                o.world
            )));
        }
        let loads = rank_loads(&all, o.world);
        let min_rows = *loads.iter().min().unwrap();
        let b = o.batch_rows as u64;
        let (batches_per_epoch, epoch_rows) =
            if o.drop_last { (min_rows / b, (min_rows / b) * b) } else { (min_rows.div_ceil(b), min_rows) };
        if batches_per_epoch == 0 {
            return Err(Error::invalid(format!(
                "rank {} gets {} rows per epoch, less than one batch of {}",
                o.rank, min_rows, o.batch_rows
            )));
        }
        Ok(Plan {
            all,
            rank: o.rank,
            world: o.world,
            shuffle: o.shuffle,
            seed: o.seed,
            window: o.window_row_groups.max(1),
            batch_rows: b,
            epoch_rows,
            batches_per_epoch,
        })
    }

    /// The jobs of one epoch, starting with the window that holds row `from_row`.
    pub(super) fn epoch_jobs(&self, epoch: u64, from_row: u64) -> Vec<Job> {
        let rgs = rank_row_groups(&self.all, self.seed, epoch, self.rank, self.world, self.shuffle);
        let mut jobs = Vec::new();
        let mut row = 0u64;
        for (w, chunk) in rgs.chunks(self.window).enumerate() {
            let rows: u64 = chunk.iter().map(|r| r.rows).sum();
            let start = row;
            row += rows;
            if row <= from_row || start >= self.epoch_rows {
                continue;
            }
            for rg in chunk {
                jobs.push(Job { epoch, window: w as u64, window_row_start: start, window_len: chunk.len(), rg: *rg });
            }
        }
        jobs
    }

    pub(super) fn window_perm(&self, epoch: u64, window: u64, rows: usize) -> Option<Vec<u32>> {
        self.shuffle.then(|| {
            permutation(
                rows,
                &mut SplitMix64::keyed(&[self.seed, epoch, self.rank as u64, self.world as u64, window, 0x726f77]),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn rgs(sizes: &[u64]) -> Vec<RgRef> {
        sizes.iter().enumerate().map(|(i, &rows)| RgRef { shard: 0, rg: i as u32, rows }).collect()
    }

    #[test]
    fn ranks_get_disjoint_balanced_row_groups() {
        let all = rgs(&[100, 100, 100, 100, 100, 37, 100, 100, 100, 12]);
        for epoch in 0..3 {
            let mut seen = HashSet::new();
            let mut loads = Vec::new();
            for rank in 0..3 {
                let mine = rank_row_groups(&all, 9, epoch, rank, 3, true);
                loads.push(mine.iter().map(|r| r.rows).sum::<u64>());
                for r in mine {
                    assert!(seen.insert(r.rg), "row group {} dealt twice", r.rg);
                }
            }
            assert_eq!(seen.len(), all.len());
            let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(hi - lo <= 100, "{loads:?}");
            assert_eq!(rank_loads(&all, 3).iter().sum::<u64>(), loads.iter().sum::<u64>());
        }
        // Epochs differ, the same epoch is reproducible.
        assert_ne!(rank_row_groups(&all, 9, 0, 0, 1, true), rank_row_groups(&all, 9, 1, 0, 1, true));
        assert_eq!(rank_row_groups(&all, 9, 1, 0, 1, true), rank_row_groups(&all, 9, 1, 0, 1, true));
        assert_eq!(rank_row_groups(&all, 9, 1, 0, 1, false), all);
    }

    #[test]
    fn plan_refuses_more_ranks_than_row_groups() {
        let mut o = ReaderOptions::new("h", 10);
        o.world = 4;
        o.rank = 1;
        let e = Plan::new(rgs(&[100, 100, 100]), &o).err().unwrap().to_string();
        assert!(e.contains("3 row groups, fewer than the 4 ranks"), "{e}");
    }
}

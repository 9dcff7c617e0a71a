//! A window of decoded row groups whose rows are read in a permuted order, and the copying of
//! its rows into batches.

use super::fetch::Decoded;
use super::Batch;

/// Consecutive row groups of a rank's stream, read as one shuffled unit.
pub(super) struct Window {
    pub(super) epoch: u64,
    pub(super) start: u64,
    pub(super) rgs: Vec<Decoded>,
    /// Window row -> (row group index in `rgs`, row in it), in reading order.
    pub(super) order: Vec<(u32, u32)>,
}

impl Window {
    /// The window of row groups `rgs` that starts at row `start` of the rank's stream, its rows
    /// in stored order or in the order of `permute(rows)` when that gives a permutation.
    pub(super) fn new(
        epoch: u64,
        start: u64,
        rgs: Vec<Decoded>,
        permute: impl FnOnce(usize) -> Option<Vec<u32>>,
    ) -> Window {
        let mut flat: Vec<(u32, u32)> = Vec::with_capacity(rgs.iter().map(|d| d.rows).sum());
        for (i, d) in rgs.iter().enumerate() {
            flat.extend((0..d.rows as u32).map(|r| (i as u32, r)));
        }
        let order = match permute(flat.len()) {
            Some(p) => p.into_iter().map(|i| flat[i as usize]).collect(),
            None => flat,
        };
        Window { epoch, start, rgs, order }
    }

    /// One past the window's last row.
    pub(super) fn end(&self) -> u64 {
        self.start + self.order.len() as u64
    }
}

/// Append rows `from..from + n` of the window to the batch, copying runs of consecutive rows
/// at once. A batch that is exactly one whole row group (unshuffled reading with the batch size
/// equal to the row group size) takes that row group's buffer without copying.
pub(super) fn copy_rows(w: &mut Window, from: usize, n: usize, batch: &mut Batch, row_bytes: usize) {
    let end = from + n;
    let mut k = from;
    while k < end {
        let (rg, r0) = w.order[k];
        let mut len = 1;
        while k + len < end && w.order[k + len] == (rg, r0 + len as u32) {
            len += 1;
        }
        let d = &mut w.rgs[rg as usize];
        let r0 = r0 as usize;
        if batch.bytes.is_empty() && r0 == 0 && len == d.rows && len == batch.rows && d.acts.len() == len * row_bytes {
            batch.bytes = std::mem::take(&mut d.acts);
            if batch.tokens.is_some() {
                batch.tokens = d.tokens.take();
            }
        } else {
            if batch.bytes.is_empty() {
                batch.bytes.reserve_exact(batch.rows * row_bytes);
            }
            batch.bytes.extend_from_slice(&d.acts[r0 * row_bytes..(r0 + len) * row_bytes]);
            if let (Some(t), Some(src)) = (batch.tokens.as_mut(), d.tokens.as_ref()) {
                t.sequence_id.extend_from_slice(&src.sequence_id[r0..r0 + len]);
                t.position.extend_from_slice(&src.position[r0..r0 + len]);
                t.token_id.extend_from_slice(&src.token_id[r0..r0 + len]);
            }
        }
        k += len;
    }
}

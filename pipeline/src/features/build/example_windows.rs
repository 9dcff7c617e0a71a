//! The second pass of `sae features build`: it reads the same rows again, in the same order,
//! only around each kept example, and fills the example's window with the stored token ids and
//! the feature's activation at each token (re-encoded). Windows never cross a sequence.

use anyhow::{Context, Result};
use capture::Model;
use store::reader::Batch;
use tch::{Device, Tensor};
use trainer::sae::Sae;

use super::{progress, DatasetRows, TokenText};
use crate::features::set::Example;

/// One token slot of one example's window to fill in the second pass.
struct Slot {
    row: u64,
    example: usize,
    /// Offset from the example's row, −context..=context.
    offset: i64,
}

/// What the second pass reads for one slot: its row's identity, token and the feature's activation.
#[derive(Clone, Copy)]
struct SlotValue {
    sequence_id: u64,
    position: u32,
    token_id: u32,
    activation: f32,
}

/// The second pass: token ids and the feature's activations for every example's window.
pub(super) fn fill_windows(
    dataset: &DatasetRows,
    model: &Model,
    rows: u64,
    context: usize,
    examples: &mut [(Example, u64)],
) -> Result<()> {
    let slots = window_slots(examples, rows, context);
    let found = read_slots(dataset, rows, &slots, examples)?;
    assemble_windows(model, &slots, found, examples)
}

/// The rows within `context` of each example's row, sorted by row.
fn window_slots(examples: &[(Example, u64)], rows: u64, context: usize) -> Vec<Slot> {
    let n = context as i64;
    let mut slots: Vec<Slot> = Vec::with_capacity(examples.len() * (2 * context + 1));
    for (i, (_, row)) in examples.iter().enumerate() {
        for offset in -n..=n {
            let r = *row as i64 + offset;
            if r >= 0 && (r as u64) < rows {
                slots.push(Slot { row: r as u64, example: i, offset });
            }
        }
    }
    slots.sort_unstable_by_key(|s| s.row);
    slots
}

/// Reads the first `rows` rows again and returns, per slot, its row's identity, token and the
/// example's feature activation there (`None` for a slot whose row was not reached).
fn read_slots(
    dataset: &DatasetRows,
    rows: u64,
    slots: &[Slot],
    examples: &[(Example, u64)],
) -> Result<Vec<Option<SlotValue>>> {
    let mut found: Vec<Option<SlotValue>> = vec![None; slots.len()];
    let bar = progress(rows, "examples");
    let mut start_row = 0u64;
    let mut next = 0usize;
    for batch in dataset.open()? {
        if next == slots.len() || start_row >= rows {
            break;
        }
        let batch = batch?;
        let end_row = start_row + batch.rows as u64;
        let first = next;
        while next < slots.len() && slots[next].row < end_row {
            next += 1;
        }
        if first < next {
            let values = batch_slot_values(dataset.sae, &batch, start_row, &slots[first..next], examples)?;
            for (at, value) in found[first..next].iter_mut().zip(values) {
                *at = Some(value);
            }
        }
        bar.inc(batch.rows as u64);
        start_row = end_row;
    }
    bar.finish_and_clear();
    Ok(found)
}

/// The values of `slots`, all in `batch` (whose first row is global row `start_row`): the
/// distinct rows some window needs are re-encoded together.
fn batch_slot_values(
    sae: &Sae,
    batch: &Batch,
    start_row: u64,
    slots: &[Slot],
    examples: &[(Example, u64)],
) -> Result<Vec<SlotValue>> {
    let tokens = batch.tokens.as_ref().context("the reader returned no token columns")?;
    let device = sae.w_dec().device();
    let mut local: Vec<i64> = slots.iter().map(|s| (s.row - start_row) as i64).collect();
    local.dedup();
    let x = Tensor::from_slice(&batch.to_f32()).view([batch.rows as i64, batch.d as i64]);
    let x = x.index_select(0, &Tensor::from_slice(&local)).to_device(device);
    let z = sae.encode(&x)?; // [distinct rows, d_sae]
    let mut which = Vec::with_capacity(slots.len());
    let mut feature = Vec::with_capacity(slots.len());
    let mut at = 0usize;
    for s in slots {
        while local[at] != (s.row - start_row) as i64 {
            at += 1;
        }
        which.push(at as i64);
        feature.push(examples[s.example].0.feature as i64);
    }
    let index =
        [Some(Tensor::from_slice(&which).to_device(device)), Some(Tensor::from_slice(&feature).to_device(device))];
    let values = Vec::<f32>::try_from(z.index(&index).to_device(Device::Cpu))?;
    Ok(slots
        .iter()
        .zip(values)
        .map(|(s, activation)| {
            let r = (s.row - start_row) as usize;
            SlotValue {
                sequence_id: tokens.sequence_id[r],
                position: tokens.position[r],
                token_id: tokens.token_id[r],
                activation,
            }
        })
        .collect())
}

/// Gathers each example's slots by offset, then keeps the run around the centre that stays in
/// the example's window (same sequence, consecutive positions).
fn assemble_windows(
    model: &Model,
    slots: &[Slot],
    found: Vec<Option<SlotValue>>,
    examples: &mut [(Example, u64)],
) -> Result<()> {
    let mut by_example: Vec<Vec<(i64, SlotValue)>> = vec![Vec::new(); examples.len()];
    for (slot, value) in slots.iter().zip(found) {
        if let Some(v) = value {
            by_example[slot.example].push((slot.offset, v));
        }
    }
    let mut token_text = TokenText::new(model);
    for ((example, _), mut window) in examples.iter_mut().zip(by_example) {
        window.sort_unstable_by_key(|(offset, _)| *offset);
        let centre = window.iter().position(|(o, _)| *o == 0).context("an example's own row was not read back")?;
        let (sequence, position) = (window[centre].1.sequence_id, window[centre].1.position);
        let belongs =
            |(offset, v): &(i64, SlotValue)| v.sequence_id == sequence && v.position as i64 == position as i64 + offset;
        let mut lo = centre;
        while lo > 0 && belongs(&window[lo - 1]) && window[lo - 1].0 == window[lo].0 - 1 {
            lo -= 1;
        }
        let mut hi = centre;
        while hi + 1 < window.len() && belongs(&window[hi + 1]) && window[hi + 1].0 == window[hi].0 + 1 {
            hi += 1;
        }
        example.sequence_id = sequence;
        example.position = position;
        example.center = (centre - lo) as u32;
        for (_, v) in &window[lo..=hi] {
            example.token_ids.push(v.token_id);
            example.token_activations.push(v.activation);
            example.tokens.push(token_text.get(v.token_id)?);
        }
    }
    Ok(())
}

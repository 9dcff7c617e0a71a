//! The model stage of capture: a batch of token windows in, one row per stored token out.

use anyhow::Result;
use capture::windows::Window;
use capture::{HookPoint, Hooks, Model};
use store::RowBatch;
use tch::{Device, Kind, Tensor};

/// Runs `windows` (all of the same length) through the model up to the deepest of `hooks`, and
/// returns their rows: every position from `first_position` on (1 leaves out each window's
/// attention-sink position 0), activations as f32 in row-major `[rows, d_model]` per hook.
pub fn rows_of_batch(
    model: &Model,
    hooks: &[HookPoint],
    windows: &[Window],
    first_position: usize,
) -> Result<RowBatch> {
    let len = windows[0].tokens.len();
    anyhow::ensure!(windows.iter().all(|w| w.tokens.len() == len), "windows in a batch must have the same length");
    let flat: Vec<i64> = windows.iter().flat_map(|w| w.tokens.iter().map(|&t| t as i64)).collect();
    let tokens = Tensor::from_slice(&flat).view([windows.len() as i64, len as i64]);
    let mut request = Hooks::new().capture(hooks.iter().copied());
    let out = model.network.forward(&tokens, None, &mut request, false)?;

    let kept = len - first_position;
    let mut batch = RowBatch {
        sequence_id: Vec::with_capacity(windows.len() * kept),
        position: Vec::with_capacity(windows.len() * kept),
        token_id: Vec::with_capacity(windows.len() * kept),
        activations: Vec::with_capacity(hooks.len()),
    };
    for w in windows {
        for (position, &token) in w.tokens.iter().enumerate().skip(first_position) {
            batch.sequence_id.push(w.sequence_id);
            batch.position.push(position as u32);
            batch.token_id.push(token);
        }
    }
    for hook in hooks {
        // [windows, len, d]; attn.hook_z's [windows, len, n_heads, head_dim] is stored flat.
        let acts = out.hooks[hook].flatten(2, -1);
        let d = acts.size()[2];
        let kept_acts = acts.narrow(1, first_position as i64, kept as i64).reshape([-1, d]); // [rows, d]
        let kept_acts = kept_acts.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let values = Vec::<f32>::try_from(kept_acts.view([-1]))?;
        batch.activations.push((hook.to_string(), values));
    }
    Ok(batch)
}

/// Keeps only `range` of the batch's rows (a resumed run drops rows already committed; the last
/// batch drops rows past `--max-tokens`).
pub fn keep_rows(batch: &mut RowBatch, range: std::ops::Range<usize>) {
    let rows = batch.rows();
    if range == (0..rows) {
        return;
    }
    fn cut_vec<T>(v: &mut Vec<T>, range: &std::ops::Range<usize>, width: usize) {
        v.truncate(range.end * width);
        v.drain(..range.start * width);
    }
    cut_vec(&mut batch.sequence_id, &range, 1);
    cut_vec(&mut batch.position, &range, 1);
    cut_vec(&mut batch.token_id, &range, 1);
    for (_, values) in batch.activations.iter_mut() {
        let width = values.len() / rows;
        cut_vec(values, &range, width);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rows_cuts_every_column_alike() {
        let mut batch = RowBatch {
            sequence_id: vec![0, 0, 1, 1],
            position: vec![1, 2, 1, 2],
            token_id: vec![10, 11, 12, 13],
            activations: vec![("h".into(), vec![0., 0.5, 1., 1.5, 2., 2.5, 3., 3.5])],
        };
        keep_rows(&mut batch, 1..3);
        assert_eq!(batch.sequence_id, vec![0, 1]);
        assert_eq!(batch.position, vec![2, 1]);
        assert_eq!(batch.token_id, vec![11, 12]);
        assert_eq!(batch.activations[0].1, vec![1., 1.5, 2., 2.5]);
    }
}

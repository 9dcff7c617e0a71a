//! The CE-loss score: how much of the model's next-token ability survives when the SAE's
//! reconstruction replaces the activations at its hook.
//!
//! ```text
//! score = (CE_zero − CE_sae) / (CE_zero − CE_clean)
//! ```
//!
//! CE_clean runs the model untouched; CE_sae splices the reconstruction in at the hook; CE_zero
//! splices in zeros. Splicing covers every position except each window's first (the attention
//! sink, which capture does not store either). CE is the mean next-token cross-entropy over the
//! predictions made from positions 1..L−2 (position 0's prediction is the same in all three
//! runs, so it is left out). A reconstruction equal to the activations scores exactly 1, and one
//! that outputs zeros scores exactly 0.
//!
//! The windows are rebuilt from the token ids stored in the dataset's last shard: each
//! `sequence_id`'s stored rows in position order. Capture does not store position 0, so a rebuilt
//! window is the captured window without its first token.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use capture::{HookPoint, Hooks, Model};
use serde::{Deserialize, Serialize};
use store::reader::TokenColumns;
use tch::{Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CeScore {
    pub ce_clean: f64,
    pub ce_sae: f64,
    pub ce_zero_ablation: f64,
    /// (CE_zero − CE_sae) / (CE_zero − CE_clean).
    pub ce_loss_score: f64,
    /// CE_sae − CE_clean, in nats.
    pub delta_ce: f64,
    /// Tokens in the evaluated windows.
    pub tokens: u64,
    pub windows: usize,
}

/// Token windows from stored token columns: rows grouped by `sequence_id`, in position order,
/// taken in order of first appearance until `max_tokens` tokens are gathered (whole windows;
/// at least one). Windows shorter than 3 tokens hold no spliced prediction and are skipped.
pub fn windows_from_tokens(cols: &TokenColumns, max_tokens: usize) -> Vec<Vec<u32>> {
    let mut by_sequence: BTreeMap<u64, Vec<(u32, u32)>> = BTreeMap::new();
    let mut order = Vec::new();
    for i in 0..cols.token_id.len() {
        let rows = by_sequence.entry(cols.sequence_id[i]).or_insert_with(|| {
            order.push(cols.sequence_id[i]);
            Vec::new()
        });
        rows.push((cols.position[i], cols.token_id[i]));
    }
    let mut windows = Vec::new();
    let mut tokens = 0;
    for sequence in order {
        if tokens >= max_tokens {
            break;
        }
        let mut rows = by_sequence.remove(&sequence).unwrap_or_default();
        rows.sort_unstable();
        if rows.len() < 3 {
            continue;
        }
        tokens += rows.len();
        windows.push(rows.into_iter().map(|(_, t)| t).collect());
    }
    windows
}

/// Runs the score over `windows` in batches of `batch` windows of equal length.
/// `reconstruct` maps activations [rows, d_model] (in the model's dtype) to their replacement.
pub fn ce_loss_score(
    model: &Model,
    hook: HookPoint,
    windows: &[Vec<u32>],
    batch: usize,
    reconstruct: &dyn Fn(&Tensor) -> Tensor,
) -> Result<CeScore> {
    ensure!(!windows.is_empty(), "no token windows to evaluate the CE-loss score on");
    let mut by_len: BTreeMap<usize, Vec<&Vec<u32>>> = BTreeMap::new();
    for w in windows {
        by_len.entry(w.len()).or_default().push(w);
    }
    let (mut clean, mut sae, mut zero, mut count) = (0.0, 0.0, 0.0, 0u64);
    let mut tokens = 0u64;
    for group in by_len.values() {
        for chunk in group.chunks(batch.max(1)) {
            let len = chunk[0].len() as i64;
            let flat: Vec<i64> = chunk.iter().flat_map(|w| w.iter().map(|&t| t as i64)).collect();
            let ids = Tensor::from_slice(&flat).view([chunk.len() as i64, len]).to_device(model.network.device());
            tokens += flat.len() as u64;
            let (c, n) = summed_ce(model, &ids, None)?;
            clean += c;
            count += n;
            sae += summed_ce(model, &ids, Some((hook, reconstruct)))?.0;
            let zeros = |x: &Tensor| x.zeros_like();
            zero += summed_ce(model, &ids, Some((hook, &zeros)))?.0;
        }
    }
    let n = count.max(1) as f64;
    let (ce_clean, ce_sae, ce_zero) = (clean / n, sae / n, zero / n);
    Ok(CeScore {
        ce_clean,
        ce_sae,
        ce_zero_ablation: ce_zero,
        ce_loss_score: (ce_zero - ce_sae) / (ce_zero - ce_clean),
        delta_ce: ce_sae - ce_clean,
        tokens,
        windows: windows.len(),
    })
}

/// A hook and what replaces its activations ([rows, d] -> [rows, d]).
type Splice<'a> = (HookPoint, &'a dyn Fn(&Tensor) -> Tensor);

/// Summed next-token cross-entropy of predictions from positions 1..L−2, and their count;
/// with a splice, positions 1.. of the hook's activations are replaced first.
fn summed_ce(model: &Model, ids: &Tensor, splice: Option<Splice>) -> Result<(f64, u64)> {
    let _guard = tch::no_grad_guard();
    let mut hooks = Hooks::new();
    if let Some((hook, reconstruct)) = splice {
        hooks = hooks.intervene(hook, move |x: &Tensor| {
            // x: [batch, len, d]; keep position 0, replace the rest.
            let (b, len, d) = (x.size()[0], x.size()[1], x.size()[2]);
            let rest = x.narrow(1, 1, len - 1).reshape([b * (len - 1), d]);
            let replaced = reconstruct(&rest).to_kind(x.kind()).reshape([b, len - 1, d]);
            Some(Tensor::cat(&[x.narrow(1, 0, 1), replaced], 1))
        });
    }
    let out = model.network.forward(ids, None, &mut hooks, true)?;
    let logits = out.logits.expect("logits were asked for"); // [batch, len, vocab]
    let len = logits.size()[1];
    // Predictions made at positions 1..len-2 of targets 2..len-1.
    let predictions = logits.narrow(1, 1, len - 2).to_kind(Kind::Float);
    let targets = ids.narrow(1, 2, len - 2);
    let logp = predictions.log_softmax(-1, Kind::Float);
    let picked = logp.gather(2, &targets.unsqueeze(-1), false).squeeze_dim(-1); // [batch, len-2]
    Ok((-picked.sum(Kind::Double).double_value(&[]), picked.numel() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn windows(model: &Model) -> Vec<Vec<u32>> {
        let texts = [
            "The best way to predict the future is to invent it. Computers are useless; they only give answers.",
            "Q: How many programmers does it take to change a light bulb? A: None, that is a hardware problem.",
            "Always remember that you are absolutely unique. Just like everyone else, as the saying goes.",
        ];
        texts.iter().map(|t| model.tokenizer.encode(t).unwrap()[..16].to_vec()).collect()
    }

    #[test]
    fn identity_scores_exactly_one_and_zeros_exactly_zero() {
        tch::set_num_threads(2);
        let model = Model::load(&capture::model::default_model_path(), Device::Cpu, Kind::Float).unwrap();
        let hook = HookPoint::parse("blocks.15.hook_resid_post", model.network.n_layers()).unwrap();
        let windows = windows(&model);
        let identity = |x: &Tensor| x.copy();
        let score = ce_loss_score(&model, hook, &windows, 2, &identity).unwrap();
        assert_eq!(score.ce_loss_score, 1.0, "{score:?}");
        assert_eq!(score.delta_ce, 0.0);
        assert!(score.ce_zero_ablation > score.ce_clean + 1.0, "zero-ablation should hurt: {score:?}");
        let zeros = |x: &Tensor| x.zeros_like();
        let score = ce_loss_score(&model, hook, &windows, 2, &zeros).unwrap();
        assert_eq!(score.ce_loss_score, 0.0, "{score:?}");
        // Something in between scores in between.
        let half = |x: &Tensor| x * 0.5;
        let score = ce_loss_score(&model, hook, &windows, 2, &half).unwrap();
        assert!(score.ce_loss_score > 0.0 && score.ce_loss_score < 1.0, "{score:?}");
    }

    #[test]
    fn windows_follow_sequences_in_position_order() {
        let cols = TokenColumns {
            sequence_id: vec![5, 5, 9, 5, 9, 9, 7],
            position: vec![2, 1, 1, 3, 3, 2, 1],
            token_id: vec![52, 51, 91, 53, 93, 92, 71],
        };
        assert_eq!(windows_from_tokens(&cols, 100), vec![vec![51, 52, 53], vec![91, 92, 93]]);
        assert_eq!(windows_from_tokens(&cols, 2), vec![vec![51, 52, 53]]);
    }
}

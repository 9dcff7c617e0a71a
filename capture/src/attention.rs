//! Causal self-attention over heads that are already projected (and rotated): grouped-query
//! heads, an optional sliding window, and a per-layer KV cache.

use tch::{Kind, Tensor};

/// One layer's keys and values of the positions seen so far, each `[batch, n_kv_heads, seen, head_dim]`.
pub type LayerCache = Option<(Tensor, Tensor)>;

/// Appends `k` and `v` to `cache` (when decoding incrementally) and returns the keys and values
/// of every position so far.
pub fn extend_cache(cache: Option<&mut LayerCache>, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
    let Some(slot) = cache else { return (k, v) };
    let (k, v) = match slot.take() {
        Some((k_past, v_past)) => (Tensor::cat(&[k_past, k], 2), Tensor::cat(&[v_past, v], 2)),
        None => (k, v),
    };
    *slot = Some((k.shallow_clone(), v.shallow_clone()));
    (k, v)
}

/// Softmax attention of `q` `[batch, n_heads, t, head_dim]` (absolute positions `start..start+t`)
/// over `k`, `v` `[batch, n_kv_heads, total, head_dim]` (positions `0..total`), each query seeing
/// the keys at or before its position and, with a `window`, only the last `window` of them (key
/// j is seen from position i when `i - window < j <= i`, as transformers' sliding mask).
/// `scale` multiplies the scores (default `1/sqrt(head_dim)`). Returns `[batch, n_heads, t, head_dim]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: i64,
    window: Option<usize>,
    scale: Option<f64>,
) -> Tensor {
    let t = q.size()[2];
    let total = k.size()[2];
    // Each K/V head serves n_heads / n_kv_heads query heads; SDPA's enable_gqa broadcasts them.
    let gqa = q.size()[1] != k.size()[1];
    // A window shorter than the sequence so far is the only case that differs from plain causal.
    let window = window.map(|w| w as i64).filter(|&w| total > w);
    let sdpa = |mask: Option<Tensor>, causal: bool| {
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, gqa)
    };
    match window {
        None if start == 0 => sdpa(None, true),
        // One new token attends to everything cached: no mask needed.
        None if t == 1 => sdpa(None, false),
        _ => sdpa(Some(visible_keys(start, t, total, window.map(|w| w as usize), q.device())), false),
    }
}

/// [`causal_attention`] with the scores soft-capped before the mask, `cap * tanh(scores / cap)`
/// (Gemma 2), written out because SDPA has no soft-cap; the softmax runs in f32, as in
/// transformers' eager attention.
pub fn softcapped_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: i64,
    window: Option<usize>,
    scale: f64,
    cap: f64,
) -> Tensor {
    let (n_heads, n_kv_heads) = (q.size()[1], k.size()[1]);
    let (k, v) = if n_heads == n_kv_heads {
        (k.shallow_clone(), v.shallow_clone())
    } else {
        let repeat = n_heads / n_kv_heads;
        (k.repeat_interleave_self_int(repeat, 1, None), v.repeat_interleave_self_int(repeat, 1, None))
    }; // [b, h, total, hd]
    let scores = q.matmul(&k.transpose(2, 3)) * scale; // [b, h, t, total]
    let scores = (scores / cap).tanh() * cap;
    let visible = visible_keys(start, q.size()[2], k.size()[2], window, q.device());
    let scores = scores.masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v) // [b, h, t, hd]
}

/// `[t, total]`, true where query `i` (position `start + i`) may attend to key `j`.
fn visible_keys(start: i64, t: i64, total: i64, window: Option<usize>, device: tch::Device) -> Tensor {
    let qpos = Tensor::arange_start(start, start + t, (Kind::Int64, device)).unsqueeze(1); // [t, 1]
    let kpos = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0); // [1, total]
    let mut visible = kpos.le_tensor(&qpos);
    if let Some(w) = window {
        visible = visible.logical_and(&kpos.gt_tensor(&(&qpos - w as i64)));
    }
    visible
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Plain softmax attention with an explicit visibility rule, for comparison.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, start: i64, window: Option<i64>) -> Tensor {
        let (t, total, hd) = (q.size()[2], k.size()[2], q.size()[3]);
        let scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
        let mut mask = vec![f32::NEG_INFINITY; (t * total) as usize];
        for i in 0..t {
            for j in 0..total {
                let p = start + i;
                if j <= p && window.is_none_or(|w| j > p - w) {
                    mask[(i * total + j) as usize] = 0.0;
                }
            }
        }
        let mask = Tensor::from_slice(&mask).view([t, total]);
        (scores + mask).softmax(-1, Kind::Float).matmul(v)
    }

    #[test]
    fn windowed_and_cached_attention_match_explicit_softmax() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) =
            (Tensor::randn([1, 2, 3, 4], opts), Tensor::randn([1, 2, 7, 4], opts), Tensor::randn([1, 2, 7, 4], opts));
        for (start, window) in [(4, None), (4, Some(2)), (4, Some(5)), (4, Some(100))] {
            let ours = causal_attention(&q, &k, &v, start, window.map(|w| w as usize), None);
            let theirs = reference(&q, &k, &v, start, window);
            assert!(ours.allclose(&theirs, 1e-5, 1e-6, false), "start {start}, window {window:?}");
        }
        let q0 = Tensor::randn([1, 2, 7, 4], opts);
        let ours = causal_attention(&q0, &k, &v, 0, Some(3), None);
        assert!(ours.allclose(&reference(&q0, &k, &v, 0, Some(3)), 1e-5, 1e-6, false));
        // A cap far above every score changes nothing.
        let capped = softcapped_causal_attention(&q0, &k, &v, 0, Some(3), 0.5, 1e9);
        assert!(capped.allclose(&reference(&q0, &k, &v, 0, Some(3)), 1e-5, 1e-6, false));
    }
}

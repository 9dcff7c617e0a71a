//! Nearest features by the cosine similarity of their decoder rows, within one SAE or into
//! another (of another size: how features split across widths), for one feature or for all.
//!
//! Similarities are computed against the candidate dictionary in chunks of rows, keeping a
//! running top-k, so memory stays bounded for dictionaries of millions of latents.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Rows of the candidate dictionary compared per matrix product.
pub const CHUNK_ROWS: i64 = 65_536;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Neighbor {
    pub feature: i64,
    pub cosine: f64,
}

/// Decoder rows scaled to unit norm: [d_sae, d_in].
pub fn unit_rows(w_dec: &Tensor) -> Tensor {
    let w = w_dec.detach().to_kind(Kind::Float);
    &w / w.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// The `top` rows of `candidates` (unit rows [n, d]) most similar to `query` (a unit row [d]),
/// best first, leaving out row `exclude` (the query itself, within one SAE).
pub fn nearest(query: &Tensor, candidates: &Tensor, top: usize, exclude: Option<i64>) -> Result<Vec<Neighbor>> {
    let (n, d) = (candidates.size()[0], candidates.size()[1]);
    if query.size() != [d] {
        bail!("the query feature has width {:?}, the other SAE's decoder rows have width {d}", query.size());
    }
    let _guard = tch::no_grad_guard();
    let mut best: Vec<Neighbor> = Vec::new();
    let mut start = 0;
    while start < n {
        let len = CHUNK_ROWS.min(n - start);
        let sims = candidates.narrow(0, start, len).mv(query); // [len]
        let k = (top as i64 + 1).min(len);
        let (values, indices) = sims.topk(k, 0, true, true);
        let values = Vec::<f32>::try_from(values)?;
        let indices = Vec::<i64>::try_from(indices)?;
        for (v, i) in values.into_iter().zip(indices) {
            let feature = start + i;
            if Some(feature) != exclude {
                best.push(Neighbor { feature, cosine: v as f64 });
            }
        }
        best.sort_by(|a, b| b.cosine.total_cmp(&a.cosine).then(a.feature.cmp(&b.feature)));
        best.truncate(top);
        start += len;
    }
    Ok(best)
}

/// For every row of `unit` (unit rows [n_rows, d]), its `top` nearest other rows, nearest first,
/// as (row, cosine). Query rows go in chunks so a chunk's similarities stay under 256 MiB.
pub fn all_nearest(unit: &Tensor, top: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let _guard = tch::no_grad_guard();
    let n_rows = unit.size()[0];
    let top = (top as i64).min(n_rows - 1);
    if top <= 0 {
        return Ok(vec![Vec::new(); n_rows as usize]);
    }
    let mut out = Vec::with_capacity(n_rows as usize);
    let chunk = ((1i64 << 26) / n_rows).max(1);
    let mut start = 0;
    while start < n_rows {
        let len = chunk.min(n_rows - start);
        let sims = unit.narrow(0, start, len).matmul(&unit.tr()); // [len, n_rows]
                                                                  // A row is not its own neighbour.
        let own = Tensor::arange_start(start, start + len, (Kind::Int64, unit.device())).unsqueeze(1);
        let (values, ids) = sims.scatter_value(1, &own, f64::NEG_INFINITY).topk(top, 1, true, true);
        let ids = Vec::<i64>::try_from(ids.to_device(tch::Device::Cpu).flatten(0, -1))?;
        let values = Vec::<f32>::try_from(values.to_device(tch::Device::Cpu).flatten(0, -1))?;
        out.extend(
            ids.chunks(top as usize)
                .zip(values.chunks(top as usize))
                .map(|(ids, values)| ids.iter().map(|&i| i as u32).zip(values.iter().copied()).collect()),
        );
        start += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_equals_brute_force_across_chunks_and_self_similarity_is_one() {
        tch::manual_seed(3);
        let rows = unit_rows(&Tensor::randn([CHUNK_ROWS + 777, 16], (Kind::Float, tch::Device::Cpu)));
        let query = rows.get(5);
        assert!((query.dot(&query).double_value(&[]) - 1.0).abs() < 1e-6);
        let got = nearest(&query, &rows, 10, Some(5)).unwrap();
        // Brute force: every similarity, sorted.
        let sims = Vec::<f32>::try_from(rows.mv(&query)).unwrap();
        let mut all: Vec<(i64, f32)> =
            sims.iter().enumerate().map(|(i, &s)| (i as i64, s)).filter(|(i, _)| *i != 5).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let want: Vec<i64> = all[..10].iter().map(|(i, _)| *i).collect();
        assert_eq!(got.iter().map(|n| n.feature).collect::<Vec<_>>(), want);
        // Including itself, a feature is its own nearest neighbour, at similarity 1.
        let with_self = nearest(&query, &rows, 1, None).unwrap();
        assert_eq!(with_self[0].feature, 5);
        assert!((with_self[0].cosine - 1.0).abs() < 1e-5);
    }

    #[test]
    fn all_nearest_agrees_with_nearest_for_every_row() {
        tch::manual_seed(4);
        let rows = unit_rows(&Tensor::randn([300, 8], (Kind::Float, tch::Device::Cpu)));
        let all = all_nearest(&rows, 5).unwrap();
        assert_eq!(all.len(), 300);
        for f in [0i64, 17, 299] {
            let want: Vec<u32> =
                nearest(&rows.get(f), &rows, 5, Some(f)).unwrap().iter().map(|n| n.feature as u32).collect();
            assert_eq!(all[f as usize].iter().map(|(i, _)| *i).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn widths_must_match() {
        let a = unit_rows(&Tensor::ones([4, 8], (Kind::Float, tch::Device::Cpu)));
        let q = Tensor::ones([6], (Kind::Float, tch::Device::Cpu));
        assert!(nearest(&q, &a, 2, None).unwrap_err().to_string().contains("width"));
    }
}

//! Encoding appended f32 rows into the stored dtype, byte-planar (the layout BYTE_STREAM_SPLIT
//! pages are cut from), with each hook's statistics accumulated in the same pass.

use crate::format::Dtype;
use crate::manifest::HookStats;

/// Encode f32 rows into byte-planar rows of `dtype` (see `format::to_planar`), adding the
/// stored (rounded) values to `st` in f64.
pub(crate) fn encode_rows_planar(dtype: Dtype, src: &[f32], d: usize, out: &mut Vec<u8>, st: &mut HookStats) {
    let s = dtype.size();
    let start = out.len();
    out.resize(start + src.len() * s, 0);
    for (row, dst) in src.chunks_exact(d).zip(out[start..].chunks_exact_mut(d * s)) {
        let mut sq = 0f64;
        match dtype {
            Dtype::Bf16 | Dtype::F16 => {
                let (lo, hi) = dst.split_at_mut(d);
                for (j, &x) in row.iter().enumerate() {
                    let (bits, v) = if dtype == Dtype::Bf16 {
                        let h = half::bf16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    } else {
                        let h = half::f16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    };
                    lo[j] = bits as u8;
                    hi[j] = (bits >> 8) as u8;
                    let v = v as f64;
                    st.sum[j] += v;
                    sq += v * v;
                }
            }
            Dtype::F32 => {
                for (j, &x) in row.iter().enumerate() {
                    for (b, byte) in x.to_le_bytes().into_iter().enumerate() {
                        dst[b * d + j] = byte;
                    }
                    let v = x as f64;
                    st.sum[j] += v;
                    sq += v * v;
                }
            }
        }
        st.sum_sq_norm += sq;
        st.count += 1;
    }
}

/// Add rows of stored values (row-major, `d` per row) to `st`, in f64. (The reference for
/// `encode_rows_planar`'s fused statistics.)
#[cfg(test)]
pub(crate) fn accumulate_stats(dtype: Dtype, bytes: &[u8], d: usize, st: &mut HookStats) {
    let row_bytes = d * dtype.size();
    let mut row = Vec::with_capacity(d);
    for r in bytes.chunks_exact(row_bytes) {
        row.clear();
        dtype.decode_to_f32(r, &mut row);
        let mut sq = 0f64;
        for (s, &v) in st.sum.iter_mut().zip(&row) {
            let v = v as f64;
            *s += v;
            sq += v * v;
        }
        st.sum_sq_norm += sq;
        st.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;

    #[test]
    fn fused_encoding_matches_encode_then_planarize() {
        let d = 7;
        let src: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.731).sin() * 40.0).collect();
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let mut fused = Vec::new();
            let mut st = HookStats::new(d);
            encode_rows_planar(dtype, &src, d, &mut fused, &mut st);
            let mut le = Vec::new();
            dtype.encode_f32(&src, &mut le);
            let mut planar = Vec::new();
            format::to_planar(&le, d, dtype.size(), &mut planar);
            assert_eq!(fused, planar, "{dtype:?}");
            let mut want = HookStats::new(d);
            accumulate_stats(dtype, &le, d, &mut want);
            assert_eq!(st, want, "{dtype:?}");
        }
    }
}

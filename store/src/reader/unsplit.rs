//! The byte-planar decoding kernels: BYTE_STREAM_SPLIT pages un-split straight into
//! little-endian rows of the output dtype, 8x8 blocks at a time.

use crate::format::Dtype;

/// Un-split one BYTE_STREAM_SPLIT page of `n` byte-planar rows straight into little-endian
/// output rows. Stream `b * d + j` holds byte `b` of element `j` of every row.
pub(crate) fn unsplit_planar(dtype: Dtype, out_dtype: Dtype, buf: &[u8], n: usize, d: usize, out: &mut [u8]) {
    assert_eq!(buf.len(), n * d * dtype.size());
    assert_eq!(out.len(), n * d * out_dtype.size());
    match (dtype.size(), out_dtype.size()) {
        (2, 4) if dtype == Dtype::F16 => {
            let mut tmp = vec![0u8; n * d * 2];
            unsplit_blocks::<2, 2>(buf, n, d, &mut tmp);
            for (o, c) in out.chunks_exact_mut(4).zip(tmp.chunks_exact(2)) {
                o.copy_from_slice(&half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().to_le_bytes());
            }
        }
        (2, 4) => unsplit_blocks::<2, 4>(buf, n, d, out), // bf16 -> f32: the top two bytes
        (2, 2) => unsplit_blocks::<2, 2>(buf, n, d, out),
        (4, 4) => unsplit_blocks::<4, 4>(buf, n, d, out),
        other => unreachable!("element sizes {other:?}"),
    }
}

const UNSPLIT_TILE: usize = 8;

/// The 4 bytes of `x` spread to the even bytes of a u64.
#[inline(always)]
fn spread_bytes(x: u32) -> u64 {
    let mut v = x as u64;
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    (v | (v << 8)) & 0x00FF_00FF_00FF_00FF
}

/// The 2 u16 of `x` spread to the low halves of the two u32 lanes of a u64.
#[inline(always)]
fn spread_u16s(x: u32) -> u64 {
    let v = x as u64;
    (v | (v << 16)) & 0x0000_FFFF_0000_FFFF
}

/// Transpose an 8x8 byte matrix held as 8 little-endian u64 rows.
#[inline(always)]
fn transpose8(m: [u64; 8]) -> [u64; 8] {
    let mut m = m;
    for r in 0..4 {
        let (a, b) = (m[r], m[r + 4]);
        m[r] = (a & 0x0000_0000_FFFF_FFFF) | (b << 32);
        m[r + 4] = (a >> 32) | (b & 0xFFFF_FFFF_0000_0000);
    }
    for r in [0, 1, 4, 5] {
        let (a, b) = (m[r], m[r + 2]);
        m[r] = (a & 0x0000_FFFF_0000_FFFF) | ((b & 0x0000_FFFF_0000_FFFF) << 16);
        m[r + 2] = ((a >> 16) & 0x0000_FFFF_0000_FFFF) | (b & 0xFFFF_0000_FFFF_0000);
    }
    for r in [0, 2, 4, 6] {
        let (a, b) = (m[r], m[r + 1]);
        m[r] = (a & 0x00FF_00FF_00FF_00FF) | ((b & 0x00FF_00FF_00FF_00FF) << 8);
        m[r + 1] = ((a >> 8) & 0x00FF_00FF_00FF_00FF) | (b & 0xFF00_FF00_FF00_FF00);
    }
    m
}

/// `S`-byte planar elements to `OS`-byte little-endian elements (the `S` bytes go to the top
/// of each output element), in blocks of 8 rows x 8 elements transposed in registers.
fn unsplit_blocks<const S: usize, const OS: usize>(buf: &[u8], n: usize, d: usize, out: &mut [u8]) {
    let shift = OS - S;
    let (n8, d8) = (n / 8 * 8, d / 8 * 8);
    // Tiles of UNSPLIT_TILE elements: their streams are read sequentially over all rows (few
    // enough for the prefetcher), and each row's tile of output is a cache line or two.
    for jt in (0..d8).step_by(UNSPLIT_TILE) {
        for i0 in (0..n8).step_by(8) {
            for j0 in (jt..(jt + UNSPLIT_TILE).min(d8)).step_by(8) {
                let mut planes = [[0u64; 8]; S];
                for (b, plane) in planes.iter_mut().enumerate() {
                    let mut m = [0u64; 8];
                    for (jj, w) in m.iter_mut().enumerate() {
                        let off = (b * d + j0 + jj) * n + i0;
                        *w = u64::from_le_bytes(buf[off..off + 8].try_into().unwrap());
                    }
                    *plane = transpose8(m);
                }
                if S == 2 && OS == 4 {
                    // bf16 -> f32: interleave low and high bytes into u16 pairs, then place each pair
                    // in the top half of a u32 lane, two lanes per u64 store.
                    for (ii, (&lo, &hi)) in planes[0].iter().zip(&planes[1]).enumerate() {
                        let o = ((i0 + ii) * d + j0) * 4;
                        let row = &mut out[o..o + 32];
                        for half_ in 0..2 {
                            let pairs = spread_bytes((lo >> (32 * half_)) as u32)
                                | (spread_bytes((hi >> (32 * half_)) as u32) << 8);
                            for q in 0..2 {
                                let two = spread_u16s((pairs >> (32 * q)) as u32) << 16;
                                let at = half_ * 16 + q * 8;
                                row[at..at + 8].copy_from_slice(&two.to_le_bytes());
                            }
                        }
                    }
                    continue;
                }
                for ii in 0..8 {
                    let o = ((i0 + ii) * d + j0) * OS;
                    let row = &mut out[o..o + 8 * OS];
                    for k in 0..8 {
                        for (b, plane) in planes.iter().enumerate() {
                            row[k * OS + shift + b] = (plane[ii] >> (8 * k)) as u8;
                        }
                    }
                }
            }
        }
    }
    // Edges: rows past the last multiple of 8, and elements past the last multiple of 8.
    let mut scalar = |i: usize, j: usize| {
        let o = (i * d + j) * OS;
        out[o..o + shift].fill(0);
        for b in 0..S {
            out[o + shift + b] = buf[(b * d + j) * n + i];
        }
    };
    for i in n8..n {
        for j in 0..d {
            scalar(i, j);
        }
    }
    for i in 0..n8 {
        for j in d8..d {
            scalar(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;

    #[test]
    fn unsplit_matches_the_naive_transpose() {
        for (dt, odt) in
            [(Dtype::Bf16, Dtype::F32), (Dtype::Bf16, Dtype::Bf16), (Dtype::F32, Dtype::F32), (Dtype::F16, Dtype::F16)]
        {
            for (n, d) in [(8, 8), (21, 13), (64, 24), (3, 5), (16, 16), (35, 40), (48, 17)] {
                let s = dt.size();
                // Planar rows, then BYTE_STREAM_SPLIT: stream p holds byte p of every row.
                let rows_le: Vec<u8> = (0..n * d * s).map(|i| (i * 31 % 253) as u8).collect();
                let mut planar = Vec::new();
                format::to_planar(&rows_le, d, s, &mut planar);
                let w = d * s;
                let mut split = vec![0u8; n * w];
                for i in 0..n {
                    for p in 0..w {
                        split[p * n + i] = planar[i * w + p];
                    }
                }
                let mut out = vec![0u8; n * d * odt.size()];
                unsplit_planar(dt, odt, &split, n, d, &mut out);
                let want = if odt == dt {
                    rows_le.clone()
                } else {
                    let mut f = Vec::new();
                    format::planar_to_f32_bytes(dt, &planar, d, &mut f);
                    f
                };
                assert_eq!(out, want, "{dt:?}->{odt:?} n {n} d {d}");
            }
        }
    }
}

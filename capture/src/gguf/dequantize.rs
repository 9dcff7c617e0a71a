//! GGML block formats decoded to f32.

use half::{bf16, f16};
use rayon::prelude::*;

use super::{DequantizeError, GgmlType};

/// Dequantizes `n` elements of type `ty` from `bytes`, which must hold exactly `n` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantizeError> {
    let (per_block, block_bytes) = ty.block_layout().ok_or(DequantizeError::Unsupported(ty))?;
    let expected = ty.byte_len(n as u64).and_then(|len| usize::try_from(len).ok());
    if !n.is_multiple_of(per_block) || expected != Some(bytes.len()) {
        let expected = (n / per_block).saturating_mul(block_bytes);
        return Err(DequantizeError::WrongLength { ty, elements: n, expected, actual: bytes.len() });
    }
    let mut out = vec![0f32; n];
    // Blocks are independent, so dequantize chunks of blocks in parallel.
    const BLOCKS_PER_TASK: usize = 4096;
    out.par_chunks_mut(per_block * BLOCKS_PER_TASK).zip(bytes.par_chunks(block_bytes * BLOCKS_PER_TASK)).for_each(
        |(out, bytes)| {
            for (out, block) in out.chunks_exact_mut(per_block).zip(bytes.chunks_exact(block_bytes)) {
                dequantize_block(ty, block, out);
            }
        },
    );
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        // d: f16 scale, then 32 signed bytes: x = d * q.
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        // d: f16 scale, then 16 bytes of nibbles: low nibbles are elements 0..16, high 16..32;
        // x = d * (q - 8).
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }
        // d: f16 scale, m: f16 minimum, then 16 bytes of nibbles as in Q4_0; x = d * q + m.
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = d * (q & 0x0F) as f32 + m;
                out[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        GgmlType::Other(_) => unreachable!("checked by block_layout"),
    }
}

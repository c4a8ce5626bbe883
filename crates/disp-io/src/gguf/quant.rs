//! Decoding of the ggml tensor types this crate supports, and llama.cpp-compatible reference
//! quantisers for Q8_0, Q4_0 and Q4_1 (used by the writer to make test files).
use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

use super::format::GgmlType;

/// Values per block of Q8_0, Q4_0 and Q4_1.
pub const QK: usize = 32;
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK;
pub const Q4_0_BLOCK_BYTES: usize = 2 + QK / 2;
pub const Q4_1_BLOCK_BYTES: usize = 4 + QK / 2;

/// Decodes `bytes` (a whole tensor of `ty`) into `out`, which must hold exactly its values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = ty.bytes_for(out.len() as u64);
    ensure!(expected == Some(bytes.len() as u64), "{} values of type {ty} need {expected:?} bytes, got {}", out.len(), bytes.len());
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                if let &[b0, b1, b2, b3] = b {
                    *o = f32::from_le_bytes([b0, b1, b2, b3]);
                }
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, block) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q8_0_BLOCK_BYTES)) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (v, &q) in o.iter_mut().zip(&block[2..]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, block) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_0_BLOCK_BYTES)) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let (low, high) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in low.iter_mut().zip(high).zip(&block[2..]) {
                    *l = d * (f32::from(q & 0x0f) - 8.0);
                    *h = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, block) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_1_BLOCK_BYTES)) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let (low, high) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in low.iter_mut().zip(high).zip(&block[4..]) {
                    *l = f32::from(q & 0x0f) * d + m;
                    *h = f32::from(q >> 4) * d + m;
                }
            }
        }
        other => bail!("cannot decode GGUF type {other}"),
    }
    Ok(())
}

/// Encodes f32 values as `ty` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1). Quantised types need a
/// whole number of 32-value blocks.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
        ensure!(values.len().is_multiple_of(QK), "{} values are not a whole number of {QK}-value {ty} blocks", values.len());
    }
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quantize_q8_0(values),
        GgmlType::Q4_0 => quantize_q4_0(values),
        GgmlType::Q4_1 => quantize_q4_1(values),
        other => bail!("cannot encode GGUF type {other}"),
    })
}

/// Q8_0 as llama.cpp's `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d).
/// Panics unless `values.len()` is a multiple of 32.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % QK, 0, "Q8_0 needs whole 32-value blocks");
    let mut out = Vec::with_capacity(values.len() / QK * Q8_0_BLOCK_BYTES);
    for block in values.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // f32::round rounds half away from zero, like C's roundf.
        out.extend(block.iter().map(|&v| (v * inverse).round() as i8 as u8));
    }
    out
}

/// Q4_0 as llama.cpp's `quantize_row_q4_0_ref`: the value of largest magnitude maps to -8,
/// d = that value / -8, q = min(15, trunc(x / d + 8.5)).
/// Panics unless `values.len()` is a multiple of 32.
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % QK, 0, "Q4_0 needs whole 32-value blocks");
    let mut out = Vec::with_capacity(values.len() / QK * Q4_0_BLOCK_BYTES);
    for block in values.chunks_exact(QK) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let nibble = |v: f32| ((v * inverse + 8.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            out.push(nibble(block[j]) | (nibble(block[j + QK / 2]) << 4));
        }
    }
    out
}

/// Q4_1 as llama.cpp's `quantize_row_q4_1_ref`: m = min, d = (max - min) / 15,
/// q = min(15, trunc((x - m) / d + 0.5)).
/// Panics unless `values.len()` is a multiple of 32.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % QK, 0, "Q4_1 needs whole 32-value blocks");
    let mut out = Vec::with_capacity(values.len() / QK * Q4_1_BLOCK_BYTES);
    for block in values.chunks_exact(QK) {
        let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let nibble = |v: f32| (((v - min) * inverse + 0.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            out.push(nibble(block[j]) | (nibble(block[j + QK / 2]) << 4));
        }
    }
    out
}

//! Block-quantized weight formats with GGUF's exact byte layouts (ggml-common.h).
//!
//! Every format stores a row as a run of fixed-size blocks; a block holds `block_size()`
//! weights in `block_bytes()` bytes, little-endian, scales as f16. Rows must be a whole
//! number of blocks, so a quantized `[N, K]` matrix is `N * K / block_size()` blocks with
//! no padding, and any row (or block-aligned slice of one) can be decoded alone. That is
//! what the kernels rely on: they dequantise a block at a time inside the dot product and
//! never hold more than one weight row in f32.

// is_multiple_of is newer than the MSRV (1.85).

use half::f16;

use crate::error::{Error, Result};

/// A block-quantized weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 32 weights: `d: f16`, `qs: [i8; 32]`; `x = d * q`.
    Q8_0,
    /// 32 weights: `d: f16`, `qs: [u8; 16]` (low nibbles = weights 0..16, high = 16..32);
    /// `x = d * (q - 8)`.
    Q4_0,
    /// 32 weights: `d: f16`, `m: f16`, `qs: [u8; 16]` (nibbles as Q4_0); `x = d * q + m`.
    Q4_1,
    /// 256 weights in 8 sub-blocks of 32: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (six-bit
    /// scale and min per sub-block), `qs: [u8; 128]`; `x = d*sc * q - dmin*m`.
    Q4K,
}

impl QuantType {
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 => 32,
            QuantType::Q4K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q4K => 144,
        }
    }

    /// Lower-case name as llama.cpp writes it.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q4K => "q4_k",
        }
    }

    /// The format named `s` (`q8_0`, `q4_0`, `q4_1`, `q4_k`, any case).
    pub fn parse(s: &str) -> Option<QuantType> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Some(QuantType::Q8_0),
            "q4_0" => Some(QuantType::Q4_0),
            "q4_1" => Some(QuantType::Q4_1),
            "q4_k" => Some(QuantType::Q4K),
            _ => None,
        }
    }

    /// GGML's type id (`ggml_type`) of this format.
    pub fn ggml_type(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 8,
            QuantType::Q4K => 12,
        }
    }

    /// The format of GGML type id `t`, if it is one of ours.
    pub fn from_ggml_type(t: u32) -> Option<QuantType> {
        match t {
            2 => Some(QuantType::Q4_0),
            3 => Some(QuantType::Q4_1),
            8 => Some(QuantType::Q8_0),
            12 => Some(QuantType::Q4K),
            _ => None,
        }
    }

    /// Bytes that `n` weights occupy, or `None` unless `n` is a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.block_bytes())
    }

    /// Checks that a `[.., K]` tensor of `n` weights with rows of `k` can be stored in this
    /// format in exactly `bytes` bytes.
    pub fn check(self, what: &str, n: usize, k: usize, bytes: usize) -> Result<()> {
        if !k.is_multiple_of(self.block_size()) {
            return Err(Error::weight(
                what,
                format!(
                    "rows of {k} are not a whole number of {}-weight {} blocks",
                    self.block_size(),
                    self.name()
                ),
            ));
        }
        match self.bytes_for(n) {
            Some(b) if b == bytes => Ok(()),
            want => Err(Error::weight(
                what,
                format!(
                    "{} bytes given, {n} {} weights need {want:?}",
                    bytes,
                    self.name()
                ),
            )),
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Six-bit scale and min of sub-block `j` of a Q4_K block (`get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one block into `out` (`block_size()` values).
#[inline]
pub fn dequantize_block(qt: QuantType, b: &[u8], out: &mut [f32]) {
    match qt {
        QuantType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out[..32].iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        QuantType::Q4_0 => {
            let d = f16_at(b, 0);
            let (lo, hi) = out[..32].split_at_mut(16);
            for (j, &q) in b[2..18].iter().enumerate() {
                lo[j] = d * ((q & 0xF) as i32 - 8) as f32;
                hi[j] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }
        QuantType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let (lo, hi) = out[..32].split_at_mut(16);
            for (j, &q) in b[4..20].iter().enumerate() {
                lo[j] = d * (q & 0xF) as f32 + m;
                hi[j] = d * (q >> 4) as f32 + m;
            }
        }
        QuantType::Q4K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            // Four 64-weight groups; each uses 32 bytes of qs: low nibbles, then high.
            for g in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * g, scales);
                let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * g..32 * g + 32];
                let o = &mut out[64 * g..64 * g + 64];
                for l in 0..32 {
                    o[l] = d1 * (q[l] & 0xF) as f32 - min1;
                    o[32 + l] = d2 * (q[l] >> 4) as f32 - min2;
                }
            }
        }
    }
}

/// Decodes whole blocks: `bytes` must be a multiple of `block_bytes()` and `out` exactly
/// `block_size()` values per block.
pub fn dequantize(qt: QuantType, bytes: &[u8], out: &mut [f32]) {
    let (bs, bb) = (qt.block_size(), qt.block_bytes());
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        dequantize_block(qt, b, o);
    }
}

/// Decodes `dst.len()` weights starting at weight `start` of a quantized buffer; `start`
/// need not be block-aligned (blocks are decoded whole and the overlap copied).
pub fn dequantize_range(qt: QuantType, bytes: &[u8], start: usize, dst: &mut [f32]) {
    let (bs, bb) = (qt.block_size(), qt.block_bytes());
    let mut tmp = [0f32; 256];
    let mut done = 0;
    while done < dst.len() {
        let pos = start + done;
        let (blk, off) = (pos / bs, pos % bs);
        let take = (bs - off).min(dst.len() - done);
        if off == 0 && take == bs {
            dequantize_block(
                qt,
                &bytes[blk * bb..(blk + 1) * bb],
                &mut dst[done..done + bs],
            );
        } else {
            dequantize_block(qt, &bytes[blk * bb..(blk + 1) * bb], &mut tmp[..bs]);
            dst[done..done + take].copy_from_slice(&tmp[off..off + take]);
        }
        done += take;
    }
}

/// Quantizes f32 weights (a whole number of blocks) the way llama.cpp's reference
/// quantizers do (`quantize_row_*_ref`). Q4_K uses a simpler search than llama.cpp's
/// (min/max per sub-block, then six-bit scales); the layout is exact.
pub fn quantize(qt: QuantType, x: &[f32]) -> Result<Vec<u8>> {
    let bytes = qt.bytes_for(x.len()).ok_or_else(|| {
        Error::msg(format!(
            "quantize {}: {} values are not a whole number of {}-value blocks",
            qt.name(),
            x.len(),
            qt.block_size()
        ))
    })?;
    let mut out = Vec::with_capacity(bytes);
    for blk in x.chunks_exact(qt.block_size()) {
        match qt {
            QuantType::Q8_0 => {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QuantType::Q4_0 => {
                // The value of largest magnitude maps to -8.
                let mx = blk
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = mx / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
                }
            }
            QuantType::Q4_1 => {
                let mn = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (mx - mn) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
                let q = |v: f32| (((v - mn) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
                }
            }
            QuantType::Q4K => quantize_q4k_block(blk, &mut out),
        }
    }
    Ok(out)
}

/// One Q4_K block: per sub-block `x ≈ sc*d * q - m*dmin` with `q` in 0..16 and six-bit
/// `sc`, `m`; the mins are clamped at zero as in llama.cpp (a sub-block's min is ≤ 0).
fn quantize_q4k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let mn = sub.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
        let mx = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (mx - mn) / 15.0;
        mins[j] = -mn;
    }
    let max_scale = scales.iter().copied().fold(0f32, f32::max);
    let max_min = mins.iter().copied().fold(0f32, f32::max);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = ((inv_scale * scales[j]).round() as i32).clamp(0, 63) as u8;
        lm[j] = ((inv_min * mins[j]).round() as i32).clamp(0, 63) as u8;
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut sc = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            sc[j - 4] |= (ls[j] >> 4) << 6;
            sc[j] |= (lm[j] >> 4) << 6;
        }
    }
    let mut l = [0u8; 256];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dd = d.to_f32() * s as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = (((x[32 * j + ii] + dm) / dd).round() as i32).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&sc);
    for g in 0..4 {
        for ii in 0..32 {
            out.push(l[64 * g + ii] | (l[64 * g + 32 + ii] << 4));
        }
    }
}

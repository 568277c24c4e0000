//! Inner loops: AVX2+FMA(+F16C) intrinsics on x86-64 when the CPU has them (checked at
//! run time), portable loops elsewhere.
//!
//! The portable loops are generic over whether `mul_add` may be used (without hardware FMA
//! it is a slow libm call); aarch64 always has FMA. On aarch64 they are the NEON path: NEON
//! is in aarch64's baseline, and the loops are written (independent accumulators, fixed-width
//! chunks) so that LLVM vectorises them.
//!
//! Quantized weights (GGUF blocks) are decoded block by block in registers inside the dot
//! products ([`qdots`], decode) or into a small f32 buffer ([`dequantize`], GEMM tiles),
//! never as a whole matrix. [`dequantize`] gives each weight bitwise as
//! [`crate::quant::dequantize_block`] does; [`qdots`] factors each 32 weights as
//! `scale * q + offset` (see there). Activations stay f32 throughout: the only difference
//! from the f32 reference path (dequantize, then dot) is the order and grouping of f32 sums.
//!
//! `VISI_CPU_SIMD=off` forces the portable loops (tests, comparisons).

use std::sync::OnceLock;

use half::f16;

use crate::quant::QuantType;

/// Rows of the GEMM register block.
pub(crate) const MR: usize = 6;
/// Columns of the GEMM register block (two AVX registers).
pub(crate) const NR: usize = 16;
/// Most rows [`dots`] handles in one pass over a weight row.
pub(crate) const DOTS_MAX_ROWS: usize = 4;

/// Whether the platform has hardware FMA in its baseline (aarch64 does).
const BASELINE_FMA: bool = cfg!(target_arch = "aarch64");

/// Dot product of the common prefix of `a` and `b`, f32 accumulation.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has avx2, fma and f16c (checked just above).
        return unsafe { avx2::dot(a, b) };
    }
    portable::dot::<BASELINE_FMA>(a, b)
}

/// `o[c] = Σ_j w[j] · v[j*stride + off + c]` for `c < o.len()`, skipping zero weights
/// (their rows are never read): the `P·V` of one attention row.
#[inline]
pub(crate) fn weighted_rows(o: &mut [f32], w: &[f32], v: &[f32], stride: usize, off: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `dot`; the function checks that every row it reads is in `v`.
        return unsafe { avx2::weighted_rows(o, w, v, stride, off) };
    }
    portable::weighted_rows::<BASELINE_FMA>(o, w, v, stride, off)
}

/// A weight row (`f32` or `f16`) of length `k`.
#[derive(Clone, Copy)]
pub(crate) enum Row<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// `out[r] = x[r*k..(r+1)*k] · w` for `out.len() <= DOTS_MAX_ROWS` rows: the weight row is
/// read (and converted) once for all of them.
#[inline]
pub(crate) fn dots(x: &[f32], k: usize, w: Row<'_>, out: &mut [f32]) {
    debug_assert!(out.len() <= DOTS_MAX_ROWS && x.len() >= out.len() * k);
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `dot`; `dots_m` checks every slice length it relies on.
        unsafe {
            match out.len() {
                1 => avx2::dots_m::<1>(x, k, w, out),
                2 => avx2::dots_m::<2>(x, k, w, out),
                3 => avx2::dots_m::<3>(x, k, w, out),
                _ => avx2::dots_m::<4>(x, k, w, out),
            }
        }
        return;
    }
    portable::dots::<BASELINE_FMA>(x, k, w, out)
}

/// `out[r] = x[r*k..(r+1)*k] · w` for a quantized weight row `w` (`k` weights, whole blocks of
/// `qt`) and `out.len() <= DOTS_MAX_ROWS` rows: each block is read and decoded once for all
/// rows. `xs` holds the sums of every 32 activations ([`chunk_sums`] of `x`).
///
/// Every format's weight is `scale * q + offset` per 32 weights, `q` a small integer, so a
/// 32-weight dot is `scale * Σ x·q + offset * Σ x`: the SIMD kernel multiplies the f32
/// activations by the integers (exact in f32) and applies the scale once per 32, the offset
/// through the precomputed sums. The sums are f32 and in a different order than the
/// dequantize-then-dot reference, nothing more (activations are never quantized).
#[inline]
pub(crate) fn qdots(x: &[f32], xs: &[f32], k: usize, qt: QuantType, w: &[u8], out: &mut [f32]) {
    debug_assert!(out.len() <= DOTS_MAX_ROWS && x.len() >= out.len() * k);
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `dot`; `qdots_m` checks every slice length it relies on.
        unsafe { avx2::qdots(x, xs, k, qt, w, out) };
        return;
    }
    portable::qdots::<BASELINE_FMA>(x, k, qt, w, out)
}

/// Sums of every 32 consecutive values of `x` (whose length is a multiple of 32): the
/// `xs` of [`qdots`].
pub(crate) fn chunk_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32).map(|c| c.iter().sum()).collect()
}

/// Decodes whole blocks of `bytes` into `out` (`block_size()` values per block), bitwise as
/// [`crate::quant::dequantize`].
#[inline]
pub(crate) fn dequantize(qt: QuantType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `dot`; the function checks both lengths.
        unsafe { avx2::dequantize(qt, bytes, out) };
        return;
    }
    crate::quant::dequantize(qt, bytes, out)
}

/// Whether the SIMD kernels may run: `VISI_CPU_SIMD=off` (or `0`, `portable`) forces the
/// portable loops. Read once.
fn simd_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        !matches!(
            std::env::var("VISI_CPU_SIMD").as_deref(),
            Ok("off" | "0" | "portable")
        )
    })
}

/// The instruction set the CPU kernels use on this machine, in words.
pub(crate) fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return "avx2+fma+f16c";
    }
    if cfg!(target_arch = "aarch64") {
        "neon (portable loops, vectorised)"
    } else {
        "portable"
    }
}

/// The GEMM register block over packed panels `a [kb][MR]`, `b [kb][NR]`.
#[inline]
pub(crate) fn micro(kb: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `dot`; `micro` checks both panel lengths.
        return unsafe { avx2::micro(kb, a, b) };
    }
    portable::micro::<BASELINE_FMA>(kb, a, b)
}

mod portable {
    use super::{QuantType, Row, MR, NR};

    #[inline(always)]
    fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    pub(super) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        // Eight independent accumulators hide the add latency and let LLVM vectorise.
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    pub(super) fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = fmadd::<FMA>(a, *xi, *yi);
        }
    }

    pub(super) fn weighted_rows<const FMA: bool>(
        o: &mut [f32],
        w: &[f32],
        v: &[f32],
        stride: usize,
        off: usize,
    ) {
        o.fill(0.0);
        let d = o.len();
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                axpy::<FMA>(o, wj, &v[j * stride + off..j * stride + off + d]);
            }
        }
    }

    pub(super) fn dots<const FMA: bool>(x: &[f32], k: usize, w: Row<'_>, out: &mut [f32]) {
        let mut buf = [0f32; 256];
        for o in out.iter_mut() {
            *o = 0.0;
        }
        let mut k0 = 0;
        while k0 < k {
            let kb = 256.min(k - k0);
            let wb: &[f32] = match w {
                Row::F32(v) => &v[k0..k0 + kb],
                Row::F16(v) => {
                    use half::slice::HalfFloatSliceExt;
                    v[k0..k0 + kb].convert_to_f32_slice(&mut buf[..kb]);
                    &buf[..kb]
                }
            };
            for (r, o) in out.iter_mut().enumerate() {
                *o += dot::<FMA>(&x[r * k + k0..r * k + k0 + kb], wb);
            }
            k0 += kb;
        }
    }

    pub(super) fn qdots<const FMA: bool>(
        x: &[f32],
        k: usize,
        qt: QuantType,
        w: &[u8],
        out: &mut [f32],
    ) {
        let (bs, bb) = (qt.block_size(), qt.block_bytes());
        let mut buf = [0f32; 256];
        for o in out.iter_mut() {
            *o = 0.0;
        }
        for (i, blk) in w.chunks_exact(bb).take(k / bs).enumerate() {
            crate::quant::dequantize_block(qt, blk, &mut buf[..bs]);
            for (r, o) in out.iter_mut().enumerate() {
                let x0 = r * k + i * bs;
                *o += dot::<FMA>(&x[x0..x0 + bs], &buf[..bs]);
            }
        }
    }

    pub(super) fn micro<const FMA: bool>(kb: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
        let mut acc = [[0f32; NR]; MR];
        for (av, bv) in a[..kb * MR]
            .chunks_exact(MR)
            .zip(b[..kb * NR].chunks_exact(NR))
        {
            for r in 0..MR {
                for j in 0..NR {
                    acc[r][j] = fmadd::<FMA>(av[r], bv[j], acc[r][j]);
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantType, Row, MR, NR};

    #[inline]
    pub(super) fn available() -> bool {
        // The macro caches its answer in an atomic, so this is cheap on the hot path.
        super::simd_allowed()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Eight weights from `w` at `i` as f32 (converted with F16C when f16).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_w(w: Row<'_>, i: usize) -> __m256 {
        match w {
            Row::F32(v) => _mm256_loadu_ps(v.as_ptr().add(i)),
            Row::F16(v) => _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i)),
        }
    }

    #[inline(always)]
    fn w_at(w: Row<'_>, i: usize) -> f32 {
        match w {
            Row::F32(v) => v[i],
            Row::F16(v) => v[i].to_f32(),
        }
    }

    fn row_len(w: Row<'_>) -> usize {
        match w {
            Row::F32(v) => v.len(),
            Row::F16(v) => v.len(),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, c) in acc.iter_mut().enumerate() {
                let j = i + 8 * u;
                *c = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), *c);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_rows(
        o: &mut [f32],
        w: &[f32],
        v: &[f32],
        stride: usize,
        off: usize,
    ) {
        let d = o.len();
        if let Some(last) = w.iter().rposition(|&x| x != 0.0) {
            assert!(last * stride + off + d <= v.len());
        } else {
            o.fill(0.0);
            return;
        }
        let pv = v.as_ptr().add(off);
        // 32 output columns live in four registers across all rows: no store per row.
        let mut c0 = 0;
        while c0 < d {
            let cw = 32.min(d - c0);
            if cw == 32 {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (j, &wj) in w.iter().enumerate() {
                    if wj != 0.0 {
                        let (wv, r) = (_mm256_set1_ps(wj), pv.add(j * stride + c0));
                        for (u, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r.add(8 * u)), *a);
                        }
                    }
                }
                for (u, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * u), *a);
                }
            } else {
                let oc = &mut o[c0..c0 + cw];
                oc.fill(0.0);
                for (j, &wj) in w.iter().enumerate() {
                    if wj != 0.0 {
                        let r = &v[j * stride + off + c0..j * stride + off + c0 + cw];
                        for (oi, vi) in oc.iter_mut().zip(r) {
                            *oi = wj.mul_add(*vi, *oi);
                        }
                    }
                }
            }
            c0 += cw;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots_m<const M: usize>(x: &[f32], k: usize, w: Row<'_>, out: &mut [f32]) {
        assert!(row_len(w) >= k && x.len() >= M * k && out.len() >= M);
        let px = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let mut i = 0;
        while i + 16 <= k {
            let (w0, w1) = (load_w(w, i), load_w(w, i + 8));
            for (r, c) in acc.iter_mut().enumerate() {
                let xr = px.add(r * k + i);
                c[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, c[0]);
                c[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, c[1]);
            }
            i += 16;
        }
        if i + 8 <= k {
            let w0 = load_w(w, i);
            for (r, c) in acc.iter_mut().enumerate() {
                c[0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(r * k + i)), w0, c[0]);
            }
            i += 8;
        }
        for (r, c) in acc.iter().enumerate() {
            let mut s = hsum(_mm256_add_ps(c[0], c[1]));
            for j in i..k {
                s = x[r * k + j].mul_add(w_at(w, j), s);
            }
            out[r] = s;
        }
    }

    // GGUF formats as const-generic tags, so each fused kernel is compiled per format.
    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;
    const Q4K: u8 = 3;

    /// Weights and bytes per block of format `F`.
    const fn layout(f: u8) -> (usize, usize) {
        match f {
            Q8_0 => (32, 34),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            _ => (256, 144),
        }
    }

    /// The little-endian f16 at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The low 8 bytes of `v` as unsigned integers, in f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// The 32 nibbles of `qs` (16 bytes: low nibbles, then high ones) as four f32 vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles16(qs: __m128i) -> [__m256; 4] {
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
        [
            u8x8(lo),
            u8x8(_mm_srli_si128(lo, 8)),
            u8x8(hi),
            u8x8(_mm_srli_si128(hi, 8)),
        ]
    }

    /// Weights `32j..32j+32` of the format-`F` block at `b`, computed with exactly the
    /// operations of `quant::dequantize_block` (multiply, then add; never fused).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk<const F: u8>(b: *const u8, j: usize) -> [__m256; 4] {
        match F {
            Q8_0 => {
                let d = _mm256_set1_ps(half_at(b));
                let q = b.add(2);
                let mut w = [_mm256_setzero_ps(); 4];
                for (u, wu) in w.iter_mut().enumerate() {
                    let v = _mm_loadl_epi64(q.add(8 * u) as *const __m128i);
                    *wu = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
                }
                w
            }
            Q4_0 => {
                // d * (q - 8): q - 8 is exact in f32, as in the reference's integer subtract.
                let d = _mm256_set1_ps(half_at(b));
                let eight = _mm256_set1_ps(8.0);
                let mut q = nibbles16(_mm_loadu_si128(b.add(2) as *const __m128i));
                // Loops, not closures: a closure would not inherit the target features.
                for v in q.iter_mut() {
                    *v = _mm256_mul_ps(d, _mm256_sub_ps(*v, eight));
                }
                q
            }
            Q4_1 => {
                let d = _mm256_set1_ps(half_at(b));
                let m = _mm256_set1_ps(half_at(b.add(2)));
                let mut q = nibbles16(_mm_loadu_si128(b.add(4) as *const __m128i));
                for v in q.iter_mut() {
                    *v = _mm256_add_ps(_mm256_mul_ps(d, *v), m);
                }
                q
            }
            _ => {
                // Q4_K sub-block j: 32 bytes of qs per pair of sub-blocks, low nibbles for
                // the even one, high for the odd one.
                let scales = std::slice::from_raw_parts(b.add(4), 12);
                let (sc, mn) = crate::quant::scale_min_k4(j, scales);
                let d = _mm256_set1_ps(half_at(b) * sc as f32);
                let min = _mm256_set1_ps(half_at(b.add(2)) * mn as f32);
                let q = b.add(16 + 32 * (j / 2));
                let (mut v0, mut v1) = (
                    _mm_loadu_si128(q as *const __m128i),
                    _mm_loadu_si128(q.add(16) as *const __m128i),
                );
                if j % 2 == 1 {
                    v0 = _mm_srli_epi16(v0, 4);
                    v1 = _mm_srli_epi16(v1, 4);
                }
                let mask = _mm_set1_epi8(0x0F);
                let (v0, v1) = (_mm_and_si128(v0, mask), _mm_and_si128(v1, mask));
                let mut q = [
                    u8x8(v0),
                    u8x8(_mm_srli_si128(v0, 8)),
                    u8x8(v1),
                    u8x8(_mm_srli_si128(v1, 8)),
                ];
                for v in q.iter_mut() {
                    *v = _mm256_sub_ps(_mm256_mul_ps(d, *v), min);
                }
                q
            }
        }
    }

    /// The two little-endian f16 at `p` (a block's `d` and `m`/`dmin`) as f32. Reads 4
    /// bytes: every block is longer than that.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves_at(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// Weights `32j..32j+32` of the format-`F` block at `b` as `scale * q + offset`: the
    /// integers `q` (exact in f32 lanes), `scale` and `offset`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn raw<const F: u8>(b: *const u8, j: usize) -> ([__m256; 4], f32, f32) {
        match F {
            Q8_0 => {
                let q = b.add(2);
                let mut w = [_mm256_setzero_ps(); 4];
                for (u, wu) in w.iter_mut().enumerate() {
                    let v = _mm_loadl_epi64(q.add(8 * u) as *const __m128i);
                    *wu = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                }
                (w, halves_at(b).0, 0.0)
            }
            Q4_0 => {
                let d = halves_at(b).0;
                let q = nibbles16(_mm_loadu_si128(b.add(2) as *const __m128i));
                (q, d, -8.0 * d)
            }
            Q4_1 => {
                let (d, m) = halves_at(b);
                let q = nibbles16(_mm_loadu_si128(b.add(4) as *const __m128i));
                (q, d, m)
            }
            _ => {
                let scales = std::slice::from_raw_parts(b.add(4), 12);
                let (sc, mn) = crate::quant::scale_min_k4(j, scales);
                let (d, dmin) = halves_at(b);
                let q = b.add(16 + 32 * (j / 2));
                let (mut v0, mut v1) = (
                    _mm_loadu_si128(q as *const __m128i),
                    _mm_loadu_si128(q.add(16) as *const __m128i),
                );
                if j % 2 == 1 {
                    v0 = _mm_srli_epi16(v0, 4);
                    v1 = _mm_srli_epi16(v1, 4);
                }
                let mask = _mm_set1_epi8(0x0F);
                let (v0, v1) = (_mm_and_si128(v0, mask), _mm_and_si128(v1, mask));
                let q = [
                    u8x8(v0),
                    u8x8(_mm_srli_si128(v0, 8)),
                    u8x8(v1),
                    u8x8(_mm_srli_si128(v1, 8)),
                ];
                (q, d * sc as f32, -(dmin * mn as f32))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn qdots(
        x: &[f32],
        xs: &[f32],
        k: usize,
        qt: QuantType,
        w: &[u8],
        out: &mut [f32],
    ) {
        macro_rules! by_rows {
            ($f:expr) => {
                match out.len() {
                    1 => qdots_m::<1, { $f }>(x, xs, k, w, out),
                    2 => qdots_m::<2, { $f }>(x, xs, k, w, out),
                    3 => qdots_m::<3, { $f }>(x, xs, k, w, out),
                    _ => qdots_m::<4, { $f }>(x, xs, k, w, out),
                }
            };
        }
        match qt {
            QuantType::Q8_0 => by_rows!(Q8_0),
            QuantType::Q4_0 => by_rows!(Q4_0),
            QuantType::Q4_1 => by_rows!(Q4_1),
            QuantType::Q4K => by_rows!(Q4K),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qdots_m<const M: usize, const F: u8>(
        x: &[f32],
        xs: &[f32],
        k: usize,
        w: &[u8],
        out: &mut [f32],
    ) {
        let (bs, bb) = layout(F);
        let nc = k / 32;
        assert!(
            k.is_multiple_of(bs)
                && w.len() >= k / bs * bb
                && x.len() >= M * k
                && xs.len() >= M * nc
                && out.len() >= M
        );
        let px = x.as_ptr();
        // One accumulator per row, indexed by constants only, so it stays in a register (a
        // chunk's ~25 instructions outlast the scaled FMA's latency anyway).
        let mut acc = [_mm256_setzero_ps(); M];
        let mut offs = [0f32; M];
        for blk in 0..k / bs {
            let b = w.as_ptr().add(blk * bb);
            for j in 0..bs / 32 {
                let (q, scale, offset) = raw::<F>(b, j);
                let c = blk * (bs / 32) + j;
                let sv = _mm256_set1_ps(scale);
                for r in 0..M {
                    let xr = px.add(r * k + 32 * c);
                    let p0 = _mm256_mul_ps(_mm256_loadu_ps(xr), q[0]);
                    let p1 = _mm256_mul_ps(_mm256_loadu_ps(xr.add(8)), q[1]);
                    let p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(16)), q[2], p0);
                    let p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(24)), q[3], p1);
                    acc[r] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), sv, acc[r]);
                    if F != Q8_0 {
                        offs[r] = offset.mul_add(*xs.get_unchecked(r * nc + c), offs[r]);
                    }
                }
            }
        }
        for r in 0..M {
            out[r] = hsum(acc[r]) + offs[r];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(qt: QuantType, bytes: &[u8], out: &mut [f32]) {
        match qt {
            QuantType::Q8_0 => dequantize_f::<Q8_0>(bytes, out),
            QuantType::Q4_0 => dequantize_f::<Q4_0>(bytes, out),
            QuantType::Q4_1 => dequantize_f::<Q4_1>(bytes, out),
            QuantType::Q4K => dequantize_f::<Q4K>(bytes, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_f<const F: u8>(bytes: &[u8], out: &mut [f32]) {
        let (bs, bb) = layout(F);
        let blocks = (bytes.len() / bb).min(out.len() / bs);
        let po = out.as_mut_ptr();
        for blk in 0..blocks {
            let b = bytes.as_ptr().add(blk * bb);
            for j in 0..bs / 32 {
                let o = po.add(blk * bs + 32 * j);
                for (u, v) in chunk::<F>(b, j).iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * u), *v);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn micro(kb: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
        assert!(a.len() >= kb * MR && b.len() >= kb * NR);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // MR x 2 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 ymm registers.
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        for kk in 0..kb {
            let b0 = _mm256_loadu_ps(pb.add(kk * NR));
            let b1 = _mm256_loadu_ps(pb.add(kk * NR + 8));
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*pa.add(kk * MR + r));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
        }
        let mut out = [[0f32; NR]; MR];
        for (o, cr) in out.iter_mut().zip(&c) {
            _mm256_storeu_ps(o.as_mut_ptr(), cr[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), cr[1]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! Every SIMD kernel against the f32 reference (weights decoded by
    //! `quant::dequantize_block`, sums in f64), with the portable loops checked the same way.

    use super::*;
    use crate::quant;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    const ALL: [QuantType; 4] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4K,
    ];

    /// `x[r] · w` in f64, and `Σ |x·w|` to scale the tolerance.
    fn reference(x: &[f32], k: usize, w: &[f32], rows: usize) -> Vec<(f64, f64)> {
        (0..rows)
            .map(|r| {
                let (mut s, mut a) = (0f64, 0f64);
                for i in 0..k {
                    let p = x[r * k + i] as f64 * w[i] as f64;
                    s += p;
                    a += p.abs();
                }
                (s, a)
            })
            .collect()
    }

    fn check(what: &str, got: &[f32], want: &[(f64, f64)]) {
        for (r, (g, (w, a))) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * a + 1e-6;
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{what}: row {r}: {g} vs {w} (tol {tol})"
            );
        }
    }

    #[test]
    fn quantized_dots_match_the_reference_on_every_path() {
        let mut rng = Lcg(7);
        for qt in ALL {
            // Several blocks, and a one-block row.
            for k in [qt.block_size(), 3 * 256] {
                let wf = rng.vec(k);
                let wq = quant::quantize(qt, &wf).unwrap();
                let mut wd = vec![0f32; k];
                quant::dequantize(qt, &wq, &mut wd);
                for rows in 1..=DOTS_MAX_ROWS {
                    let x = rng.vec(rows * k);
                    let want = reference(&x, k, &wd, rows);
                    let mut got = vec![0f32; rows];
                    let xs = chunk_sums(&x);
                    qdots(&x, &xs, k, qt, &wq, &mut got);
                    check(&format!("qdots {qt} k={k} m={rows}"), &got, &want);
                    let mut got = vec![0f32; rows];
                    portable::qdots::<false>(&x, k, qt, &wq, &mut got);
                    check(&format!("portable {qt} k={k} m={rows}"), &got, &want);
                    let mut got = vec![0f32; rows];
                    portable::qdots::<true>(&x, k, qt, &wq, &mut got);
                    check(&format!("portable fma {qt} k={k} m={rows}"), &got, &want);
                    #[cfg(target_arch = "x86_64")]
                    if avx2::available() {
                        let mut got = vec![0f32; rows];
                        // SAFETY: the CPU has the features (checked just above).
                        unsafe { avx2::qdots(&x, &xs, k, qt, &wq, &mut got) };
                        check(&format!("avx2 {qt} k={k} m={rows}"), &got, &want);
                    }
                }
            }
        }
    }

    #[test]
    fn simd_dequantize_is_bitwise_the_reference() {
        let mut rng = Lcg(11);
        for qt in ALL {
            let n = 4 * 256;
            let wq = quant::quantize(qt, &rng.vec(n)).unwrap();
            let mut want = vec![0f32; n];
            quant::dequantize(qt, &wq, &mut want);
            let mut got = vec![0f32; n];
            dequantize(qt, &wq, &mut got);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{qt}"
            );
        }
    }

    #[test]
    fn float_dots_match_the_reference_on_every_path() {
        let mut rng = Lcg(3);
        // Ragged lengths exercise every tail loop.
        for k in [1, 7, 8, 15, 16, 17, 100, 576] {
            let wf = rng.vec(k);
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            for rows in 1..=DOTS_MAX_ROWS {
                let x = rng.vec(rows * k);
                for (name, row, wref) in
                    [("f32", Row::F32(&wf), &wf), ("f16", Row::F16(&wh), &wh32)]
                {
                    let want = reference(&x, k, wref, rows);
                    let mut got = vec![0f32; rows];
                    dots(&x, k, row, &mut got);
                    check(&format!("dots {name} k={k} m={rows}"), &got, &want);
                    let mut got = vec![0f32; rows];
                    portable::dots::<false>(&x, k, row, &mut got);
                    check(&format!("portable {name} k={k} m={rows}"), &got, &want);
                }
            }
        }
    }
}

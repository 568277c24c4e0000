//! Inner loops: AVX2+FMA(+F16C) intrinsics on x86-64 when the CPU has them (checked at
//! run time), portable loops elsewhere.
//!
//! The portable loops are generic over whether `mul_add` may be used (without hardware FMA
//! it is a slow libm call); aarch64 always has FMA.

use half::f16;

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
    use super::{Row, MR, NR};

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

    use super::{Row, MR, NR};

    #[inline]
    pub(super) fn available() -> bool {
        // The macro caches its answer in an atomic, so this is cheap on the hot path.
        std::arch::is_x86_feature_detected!("avx2")
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

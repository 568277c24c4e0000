//! Row-wise and elementwise kernels over f32 slices. Shapes are validated by the caller.

use rayon::prelude::*;

use crate::backend::RopeParams;

/// Rows per rayon task for cheap row kernels, so tiny tensors are not split at all.
fn min_rows(n: usize) -> usize {
    (16 * 1024 / n.max(1)).max(1)
}

/// Elementwise `f` over `x`, in parallel for large inputs.
pub(crate) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_iter_mut()
        .zip(x)
        .with_min_len(16 * 1024)
        .for_each(|(o, &v)| *o = f(v));
    out
}

/// `f(a, b)` where `b` has `a`'s length or is one row of `n` broadcast over `a`'s rows.
pub(crate) fn binary(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    if b.len() == a.len() {
        out.par_iter_mut()
            .zip(a.par_iter().zip(b))
            .with_min_len(16 * 1024)
            .for_each(|(o, (&x, &y))| *o = f(x, y));
    } else if n > 0 {
        out.par_chunks_mut(n)
            .zip(a.par_chunks(n))
            .with_min_len(min_rows(n))
            .for_each(|(o, ar)| {
                for ((oi, &x), &y) in o.iter_mut().zip(ar).zip(b) {
                    *oi = f(x, y);
                }
            });
    }
    out
}

/// GELU with erf, evaluated in f64 so the f32 result is correctly rounded in practice.
pub(crate) fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// `x · sigmoid(1.702 x)` as HF's `QuickGELUActivation` computes it in f32.
pub(crate) fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(1.702 * x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(g) · u`.
pub(crate) fn silu_mul(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}

/// Applies `f(row_in, row_out)` to every row of `n` columns, in parallel.
fn rows(x: &[f32], n: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if n > 0 {
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(min_rows(n))
            .for_each(|(o, r)| f(r, o));
    }
    out
}

/// RMSNorm over rows of `n`: `x / sqrt(mean(x²) + eps) * w`, HF order of operations.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f32> {
    rows(x, n, |r, o| {
        // f64 sum: the reference should not carry a summation-order error.
        let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms as f32 + eps).sqrt();
        for ((oi, &v), &wi) in o.iter_mut().zip(r).zip(w) {
            *oi = wi * (v * inv);
        }
    })
}

/// LayerNorm over rows of `n` with biased variance.
pub(crate) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], n: usize, eps: f32) -> Vec<f32> {
    rows(x, n, |r, o| {
        let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = r
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let inv = 1.0 / (var + f64::from(eps)).sqrt();
        for (((oi, &v), &wi), &bi) in o.iter_mut().zip(r).zip(w).zip(b) {
            *oi = (((f64::from(v) - mean) * inv) as f32) * wi + bi;
        }
    })
}

/// Max-subtracted softmax over rows of `n`.
pub(crate) fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    rows(x, n, |r, o| {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (oi, &v) in o.iter_mut().zip(r) {
            *oi = (v - max).exp();
            sum += *oi;
        }
        for oi in o.iter_mut() {
            *oi /= sum;
        }
    })
}

/// HF's `inv_freq` in f32: `1 / theta^(arange(0, d, 2) / d)`, divided by a linear factor.
pub(crate) fn inv_freq(p: &RopeParams) -> Vec<f32> {
    let d = p.head_dim;
    (0..d / 2)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            let pow = f64::from(p.theta).powf(f64::from(e)) as f32;
            // transformers' linear rope scaling divides inv_freq (not the positions).
            (1.0 / pow) / p.scaling_factor
        })
        .collect()
}

/// Rotate-half RoPE of `x [S, W]` (`W` a multiple of `head_dim`) at `positions [S]`.
pub(crate) fn rope(x: &[f32], w: usize, positions: &[u32], p: &RopeParams) -> Vec<f32> {
    let inv = inv_freq(p);
    let (d, half) = (p.head_dim, p.head_dim / 2);
    let mut out = vec![0f32; x.len()];
    if w == 0 {
        return out;
    }
    out.par_chunks_mut(w)
        .zip(x.par_chunks(w))
        .zip(positions)
        .with_min_len(min_rows(w))
        .for_each_init(
            || (vec![0f32; half], vec![0f32; half]),
            |(cos, sin), ((o, r), &pos)| {
                for (i, f) in inv.iter().enumerate() {
                    // The angle is rounded to f32 as in HF; cos/sin of it are then exact.
                    let a = f64::from(pos as f32 * f);
                    cos[i] = a.cos() as f32;
                    sin[i] = a.sin() as f32;
                }
                for (oh, xh) in o.chunks_exact_mut(d).zip(r.chunks_exact(d)) {
                    let (x1, x2) = xh.split_at(half);
                    let (o1, o2) = oh.split_at_mut(half);
                    for i in 0..half {
                        o1[i] = x1[i] * cos[i] + (-x2[i]) * sin[i];
                        o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
                    }
                }
            },
        );
    out
}

/// First index of the largest value per row of `n`; NaN counts as largest, like torch.
pub(crate) fn argmax(x: &[f32], n: usize) -> Vec<u32> {
    if n == 0 {
        return vec![0; 0];
    }
    x.par_chunks(n)
        .with_min_len(min_rows(n))
        .map(|r| {
            let mut best = 0usize;
            for (j, &v) in r.iter().enumerate().skip(1) {
                let b = r[best];
                if !b.is_nan() && (v > b || v.is_nan()) {
                    best = j;
                }
            }
            best as u32
        })
        .collect()
}

/// Unfolds non-overlapping `patch × patch` tiles of `pixels [C, H, W]` into rows
/// `[(H/patch)*(W/patch), C*patch*patch]`, each in the conv weight's `(c, ky, kx)` order.
pub(crate) fn im2col(pixels: &[f32], c: usize, h: usize, w: usize, patch: usize) -> Vec<f32> {
    let (gh, gw) = (h / patch, w / patch);
    let kdim = c * patch * patch;
    let mut cols = vec![0f32; gh * gw * kdim]; // [gh*gw, C*p*p]
    if kdim == 0 {
        return cols;
    }
    cols.par_chunks_mut(kdim).enumerate().for_each(|(pi, row)| {
        let (py, px) = (pi / gw, pi % gw);
        for ch in 0..c {
            for ky in 0..patch {
                let src = ch * h * w + (py * patch + ky) * w + px * patch;
                let dst = (ch * patch + ky) * patch;
                row[dst..dst + patch].copy_from_slice(&pixels[src..src + patch]);
            }
        }
    });
    cols
}

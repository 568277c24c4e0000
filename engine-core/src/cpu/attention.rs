//! Attention, its last-row probabilities, and per-token contributions (VisiPruner).
//!
//! Work is split over (query, head) pairs; each keeps one row of scores at a time, so the
//! score matrix never exists. Masks zero probabilities after the softmax (no
//! renormalisation) and zeroed keys are skipped in `P·V`.

use rayon::prelude::*;

use super::simd;
use crate::backend::{AttentionMask, AttentionParams, MaskAction};

/// Applies `mask`'s rules to `prob[0..len]` (the visible keys) of the query at cache row
/// `row`: covered keys are zeroed; a sink rule's zeroed sum is put back on its target key.
pub(crate) fn apply_mask(mask: &AttentionMask, row: usize, prob: &mut [f32]) {
    let rules = mask.rules();
    if rules.is_empty() {
        return;
    }
    let mut sunk = 0f32;
    for (j, p) in prob.iter_mut().enumerate() {
        match rules.action(row, j) {
            None | Some(MaskAction::Keep) => {}
            Some(MaskAction::Zero) => *p = 0.0,
            Some(MaskAction::Sink { .. }) => {
                sunk += *p;
                *p = 0.0;
            }
        }
    }
    if let Some(to) = rules.sink_target(row) {
        if to < prob.len() {
            prob[to] = sunk;
        }
    }
}

/// Masked softmax probabilities of one query (`qv [head_dim]`) over keys `0..visible` of kv
/// head column offset `koff`, written to `prob` (resized to `visible`).
#[allow(clippy::too_many_arguments)]
fn probs_row(
    qv: &[f32],
    k: &[f32],
    kw: usize,
    koff: usize,
    visible: usize,
    p: &AttentionParams,
    row: usize,
    prob: &mut Vec<f32>,
) {
    let d = qv.len();
    prob.clear();
    prob.extend(
        (0..visible).map(|j| simd::dot(qv, &k[j * kw + koff..j * kw + koff + d]) * p.scale),
    );
    let max = prob.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in prob.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in prob.iter_mut() {
        *x /= sum;
    }
    apply_mask(&p.mask, row, prob);
}

fn visible_keys(p: &AttentionParams, row: usize) -> usize {
    if p.causal {
        row + 1
    } else {
        p.kv_len
    }
}

/// Queries per task: enough work per task, few enough tasks to balance two to many cores.
const QUERY_BLOCK: usize = 16;

/// `q [sq, H*D]`, `k`/`v [L, KvH*D]` (validated by [`check`]) → `[sq, H*D]`.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sq: usize,
    p: &AttentionParams,
) -> Vec<f32> {
    let (h, d) = (p.num_heads, p.head_dim);
    let group = p.num_heads / p.num_kv_heads;
    let (qw, kw) = (h * d, p.num_kv_heads * d);
    // Head-major work order: a head's keys and values (kv_len x head_dim) stay in cache
    // while all its queries use them; the result is transposed back at the end.
    let mut by_head = vec![0f32; h * sq * d]; // [H, sq, D]
    if sq == 0 {
        return by_head;
    }
    by_head
        .par_chunks_mut(sq * d)
        .enumerate()
        .for_each(|(hh, oh)| {
            let koff = (hh / group) * d;
            oh.par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(qb, ob)| {
                    let mut prob = Vec::with_capacity(p.kv_len);
                    for (ii, o) in ob.chunks_exact_mut(d).enumerate() {
                        let i = qb * QUERY_BLOCK + ii;
                        let row = p.q_offset + i;
                        let qv = &q[i * qw + hh * d..i * qw + (hh + 1) * d];
                        probs_row(qv, k, kw, koff, visible_keys(p, row), p, row, &mut prob);
                        // Masked keys are exact zeros: their value rows are never read.
                        simd::weighted_rows(o, &prob, v, kw, koff);
                    }
                });
        });
    let mut out = vec![0f32; sq * qw]; // [sq, H*D]
    out.par_chunks_mut(qw)
        .enumerate()
        .with_min_len(8)
        .for_each(|(i, orow)| {
            for (hh, o) in orow.chunks_exact_mut(d).enumerate() {
                o.copy_from_slice(&by_head[(hh * sq + i) * d..(hh * sq + i + 1) * d]);
            }
        });
    out
}

/// Probabilities of the last query (`sq >= 1`) for every head → `[H, kv_len]`, zero past
/// the keys the query can see.
pub(crate) fn last_row(q: &[f32], k: &[f32], sq: usize, p: &AttentionParams) -> Vec<f32> {
    let (h, d) = (p.num_heads, p.head_dim);
    let group = p.num_heads / p.num_kv_heads;
    let (qw, kw) = (h * d, p.num_kv_heads * d);
    let i = sq - 1;
    let row = p.q_offset + i;
    let visible = visible_keys(p, row);
    let mut out = vec![0f32; h * p.kv_len]; // [H, kv_len]
    out.par_chunks_mut(p.kv_len)
        .enumerate()
        .for_each(|(hh, o)| {
            let mut prob = Vec::with_capacity(visible);
            let qv = &q[i * qw + hh * d..i * qw + (hh + 1) * d];
            probs_row(qv, k, kw, (hh / group) * d, visible, p, row, &mut prob);
            o[..visible].copy_from_slice(&prob);
        });
    out
}

/// `probs [H, kv_len]`, `v [L, KvH*D]` → `[end-start, 2]` of `[‖c_j‖, cos(o − c_j, o)]`.
pub(crate) fn token_contributions(
    probs: &[f32],
    v: &[f32],
    p: &AttentionParams,
    start: usize,
    end: usize,
) -> Vec<f32> {
    let (h, d, n) = (p.num_heads, p.head_dim, p.kv_len);
    let group = p.num_heads / p.num_kv_heads;
    let kw = p.num_kv_heads * d;
    // o = Σ_j c_j, accumulated in key order like the attention output itself.
    let mut o = vec![0f32; h * d]; // [H*D]
    o.par_chunks_mut(d).enumerate().for_each(|(hh, oh)| {
        simd::weighted_rows(oh, &probs[hh * n..(hh + 1) * n], v, kw, (hh / group) * d);
    });
    let o_norm2: f64 = o.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let mut out = vec![0f32; (end - start) * 2]; // [end-start, 2]
    out.par_chunks_mut(2)
        .enumerate()
        .with_min_len(8)
        .for_each(|(t, pair)| {
            let j = start + t;
            // f64 sums: cos is compared against thresholds like 0.999, close to 1.
            let (mut c2, mut rc2, mut rco) = (0f64, 0f64, 0f64);
            for hh in 0..h {
                let pj = probs[hh * n + j];
                let koff = (hh / group) * d;
                for dd in 0..d {
                    let c = f64::from(pj * v[j * kw + koff + dd]);
                    let oi = f64::from(o[hh * d + dd]);
                    let r = oi - c;
                    c2 += c * c;
                    rc2 += r * r;
                    rco += r * oi;
                }
            }
            let cos = if rc2 == 0.0 || o_norm2 == 0.0 {
                1.0
            } else {
                rco / (rc2.sqrt() * o_norm2.sqrt())
            };
            pair[0] = c2.sqrt() as f32;
            pair[1] = cos as f32;
        });
    out
}

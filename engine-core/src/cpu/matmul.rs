//! `y = x·Wᵀ + b` with `W [N, K]` in f32, f16 or GGUF blocks, f32 accumulation.
//!
//! Few rows (decode): a matrix-vector kernel that streams each weight row once and dots it
//! with every input row. Many rows (prefill): a packed GEMM, blocked over K (so a weight tile
//! stays in cache) and over N, with an `MR × NR` register block; f16 weights are converted
//! tile by tile while packing, never as a whole matrix.

use rayon::prelude::*;

use super::simd::{self, Row, MR, NR};
use super::storage::Floats;

/// Up to this many rows, the matrix-vector kernel wins: packing costs more than it saves.
/// Measured on SmolLM2-135M Q4_1 (2 Zen 4 cores): a 19-token prefill ran about 2x faster on
/// the matrix-vector path than on the GEMM, a 57-token one alike, a 510-token one 2x slower.
const GEMV_MAX_ROWS: usize = 32;

/// K-block: a packed `[KB][NB]` weight tile is 64 KiB of f32.
const KB: usize = 256;
/// N-block width (a multiple of `NR`).
const NB: usize = 64;
/// Rows of `x` per task.
const MC: usize = 128;

/// `x [m, k]`, `w [n, k]`, `bias [n]` → `[m, n]`. Slices must have those lengths.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: Floats<'_>,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = if m == 0 || n == 0 || k == 0 {
        vec![0f32; m * n]
    } else if m <= GEMV_MAX_ROWS {
        gemv(x, m, k, w, n)
    } else {
        gemm(x, m, k, w, n)
    };
    if let Some(b) = bias {
        if n > 0 {
            y.par_chunks_mut(n).with_min_len(16).for_each(|row| {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            });
        }
    }
    y
}

/// Few rows: every weight row is read (and decoded) once and dotted with all `m` rows,
/// `DOTS_MAX_ROWS` at a time. Quantized rows with at most `DOTS_MAX_ROWS` inputs (decode) are
/// decoded in registers inside the dot products; otherwise a row is decoded once into a
/// per-task f32 buffer (L1-resident) and reused by every group of inputs.
fn gemv(x: &[f32], m: usize, k: usize, w: Floats<'_>, n: usize) -> Vec<f32> {
    let mut yt = vec![0f32; n * m]; // [n, m]: one chunk per weight row
    let few = m <= simd::DOTS_MAX_ROWS;
    // Per-32 activation sums for the quantized kernel's offsets, once per call.
    let xs = match w {
        Floats::Quant(..) if few => simd::chunk_sums(&x[..m * k]),
        _ => Vec::new(),
    };
    yt.par_chunks_mut(m)
        .enumerate()
        .with_min_len(64)
        .for_each_init(Vec::new, |buf, (j, out)| {
            let row = match w {
                Floats::F32(v) => Row::F32(&v[j * k..(j + 1) * k]),
                Floats::F16(v) if few => Row::F16(&v[j * k..(j + 1) * k]),
                Floats::Quant(qt, b) if few => {
                    // Rows are whole blocks (checked at upload).
                    let rb = k / qt.block_size() * qt.block_bytes();
                    simd::qdots(x, &xs, k, qt, &b[j * rb..(j + 1) * rb], out);
                    return;
                }
                _ => {
                    buf.resize(k, 0.0);
                    w.read_into(j * k, buf);
                    Row::F32(buf)
                }
            };
            for (g, o) in out.chunks_mut(simd::DOTS_MAX_ROWS).enumerate() {
                simd::dots(&x[g * simd::DOTS_MAX_ROWS * k..], k, row, o);
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n]; // [m, n]
    for j in 0..n {
        for r in 0..m {
            y[r * n + j] = yt[j * m + r];
        }
    }
    y
}

/// One task's share of the output: rows `m0..m0+mc`, columns `n0..n0+nw`.
struct Task {
    m0: usize,
    mc: usize,
    n0: usize,
    nw: usize,
}

fn gemm(x: &[f32], m: usize, k: usize, w: Floats<'_>, n: usize) -> Vec<f32> {
    // Enough tasks for every thread to stay busy: split M first (each task packs its own
    // weight tiles, so splitting N costs nothing extra), then N when M alone is too short.
    let threads = rayon::current_num_threads().max(1);
    let mchunks = m.div_ceil(MC);
    let mc = m.div_ceil(mchunks).next_multiple_of(MR);
    let mchunks = m.div_ceil(mc);
    let want = 4 * threads;
    let nsplit = want.div_ceil(mchunks).clamp(1, n.div_ceil(NR));
    let nw = n.div_ceil(nsplit).next_multiple_of(NR);
    let mut tasks = Vec::new();
    for mi in 0..mchunks {
        let m0 = mi * mc;
        let mut n0 = 0;
        while n0 < n {
            tasks.push(Task {
                m0,
                mc: mc.min(m - m0),
                n0,
                nw: nw.min(n - n0),
            });
            n0 += nw;
        }
    }
    let tiles: Vec<Vec<f32>> = tasks.par_iter().map(|t| gemm_tile(x, k, w, t)).collect();
    let mut y = vec![0f32; m * n]; // [m, n]
    for (t, tile) in tasks.iter().zip(&tiles) {
        for r in 0..t.mc {
            let dst = (t.m0 + r) * n + t.n0;
            y[dst..dst + t.nw].copy_from_slice(&tile[r * t.nw..(r + 1) * t.nw]);
        }
    }
    y
}

/// `x[m0.., :] · w[n0.., :]ᵀ` for one task → `[mc, nw]`.
fn gemm_tile(x: &[f32], k: usize, w: Floats<'_>, t: &Task) -> Vec<f32> {
    let mblocks = t.mc.div_ceil(MR);
    let mut tile = vec![0f32; t.mc * t.nw]; // [mc, nw]
    let mut apack = vec![0f32; mblocks * MR * KB]; // [mblocks][kb][MR]
    let mut bpack = vec![0f32; NB * KB]; // [panels][kb][NR]
    let mut wrow = vec![0f32; KB];
    let mut k0 = 0;
    while k0 < k {
        let kb = KB.min(k - k0);
        // Pack the rows of x for this K-block, MR rows interleaved; missing rows are zero.
        for i in 0..mblocks {
            let panel = &mut apack[i * kb * MR..(i + 1) * kb * MR];
            for r in 0..MR {
                let row = i * MR + r;
                if row < t.mc {
                    let src = &x[(t.m0 + row) * k + k0..(t.m0 + row) * k + k0 + kb];
                    for (kk, v) in src.iter().enumerate() {
                        panel[kk * MR + r] = *v;
                    }
                } else {
                    for kk in 0..kb {
                        panel[kk * MR + r] = 0.0;
                    }
                }
            }
        }
        let mut nb0 = 0;
        while nb0 < t.nw {
            let nbw = NB.min(t.nw - nb0);
            let panels = nbw.div_ceil(NR);
            // Pack (and convert) the weight tile as NR-wide panels; missing columns are zero.
            for j in 0..panels * NR {
                let (p, jj) = (j / NR, j % NR);
                let panel = &mut bpack[p * kb * NR..(p + 1) * kb * NR];
                if j < nbw {
                    let wr = &mut wrow[..kb];
                    w.read_into((t.n0 + nb0 + j) * k + k0, wr);
                    for (kk, v) in wr.iter().enumerate() {
                        panel[kk * NR + jj] = *v;
                    }
                } else {
                    for kk in 0..kb {
                        panel[kk * NR + jj] = 0.0;
                    }
                }
            }
            for p in 0..panels {
                let bp = &bpack[p * kb * NR..(p + 1) * kb * NR];
                let cols = NR.min(nbw - p * NR);
                for i in 0..mblocks {
                    let acc = simd::micro(kb, &apack[i * kb * MR..(i + 1) * kb * MR], bp);
                    for (r, accr) in acc.iter().enumerate().take(MR.min(t.mc - i * MR)) {
                        let base = (i * MR + r) * t.nw + nb0 + p * NR;
                        for (o, a) in tile[base..base + cols].iter_mut().zip(accr) {
                            *o += a;
                        }
                    }
                }
            }
            nb0 += nbw;
        }
        k0 += kb;
    }
    tile
}

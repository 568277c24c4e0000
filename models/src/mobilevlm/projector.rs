//! The LDPv2 projector (`LDPNetV2Projector` in the authors' `vision_projector.py`):
//! `FeatureIRLayer` (Linear, GELU, Linear), `TokenDownLayer` (`AdaptiveAvgPool2d((12, 12))`
//! over the patch grid) and `PosInjectLayer` (depthwise 3×3 conv, padding 1, bias, added to
//! its input).

use engine_core::weights::Weights;
use engine_core::{Backend, Error, HostData, Result, Tensor};

use crate::nn::Linear;

/// The LDPv2 projector's tensors (names below `model.`) for a tower of width `vision_hidden`
/// and a decoder of width `hidden`.
pub fn manifest(vision_hidden: usize, hidden: usize) -> Vec<(String, Vec<usize>)> {
    let p = "mm_projector";
    vec![
        (format!("{p}.mlp.mlp.0.weight"), vec![hidden, vision_hidden]),
        (format!("{p}.mlp.mlp.0.bias"), vec![hidden]),
        (format!("{p}.mlp.mlp.2.weight"), vec![hidden, hidden]),
        (format!("{p}.mlp.mlp.2.bias"), vec![hidden]),
        (format!("{p}.peg.peg.0.weight"), vec![hidden, 1, 3, 3]),
        (format!("{p}.peg.peg.0.bias"), vec![hidden]),
    ]
}

/// MobileVLM V2's projector.
pub struct LdpV2Projector {
    fc1: Linear, // mlp.mlp.0: [H, Dv]
    fc2: Linear, // mlp.mlp.2: [H, H]
    /// Depthwise conv weight `[H, 3, 3]` (row-major taps per channel), f32 on the host.
    peg_w: Vec<f32>,
    /// Depthwise conv bias `[H]`.
    peg_b: Vec<f32>,
    hidden: usize,
    out_grid: usize,
}

impl LdpV2Projector {
    /// Loads `mlp.mlp.{0,2}` and `peg.peg.0` below `w` (`model.mm_projector`).
    pub fn load(w: &Weights, vision_hidden: usize, hidden: usize, out_grid: usize) -> Result<Self> {
        let peg = w.pp("peg.peg.0");
        Ok(LdpV2Projector {
            fc1: Linear::load(&w.pp("mlp.mlp.0"), vision_hidden, hidden, true)?,
            fc2: Linear::load(&w.pp("mlp.mlp.2"), hidden, hidden, true)?,
            peg_w: peg.host_f32("weight", &[hidden, 1, 3, 3])?,
            peg_b: peg.host_f32("bias", &[hidden])?,
            hidden,
            out_grid,
        })
    }

    /// `[g², Dv]` patch features → `[out_grid², H]` image embeddings.
    pub fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let n = x.dims()[0];
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            return Err(Error::msg(format!(
                "the LDPv2 projector needs a square patch grid, got {n} features"
            )));
        }
        let h = self.fc1.forward(b, x)?; // [g², H]
        let h = b.gelu(&h)?;
        let h = self.fc2.forward(b, &h)?; // [g², H]
                                          // The pool and the depthwise conv run on the host (no kernel for them yet): one
                                          // readback of g²·H floats per image.
        let host = b.to_vec_f32(&h)?; // sync
        let pooled = adaptive_avg_pool_2d(&host, g, self.out_grid, self.hidden); // [o², H]
        let out = self.pos_inject(&pooled);
        let o = self.out_grid;
        b.upload(HostData::F32(&out), vec![o * o, self.hidden].into())
    }

    /// `PosInjectLayer`: `conv(x) + x` over the `[o, o]` token grid, channel by channel.
    fn pos_inject(&self, x: &[f32]) -> Vec<f32> {
        let (o, c) = (self.out_grid, self.hidden);
        let mut out = vec![0f32; o * o * c];
        for ch in 0..c {
            let w = &self.peg_w[ch * 9..ch * 9 + 9];
            for i in 0..o {
                for j in 0..o {
                    let mut acc = self.peg_b[ch];
                    for di in 0..3 {
                        for dj in 0..3 {
                            let (r, s) = (i + di, j + dj); // shifted by the padding of 1
                            if r == 0 || s == 0 || r > o || s > o {
                                continue;
                            }
                            acc += w[di * 3 + dj] * x[((r - 1) * o + (s - 1)) * c + ch];
                        }
                    }
                    out[(i * o + j) * c + ch] = acc + x[(i * o + j) * c + ch];
                }
            }
        }
        out
    }
}

/// `AdaptiveAvgPool2d((out, out))` over tokens laid out as a row-major `[g, g]` grid of
/// `c`-wide rows (`[g², c]` → `[out², c]`). Output cell `i` averages input rows
/// `floor(i·g/out) .. ceil((i+1)·g/out)` (PyTorch's windows; they overlap when `out` does
/// not divide `g`), and likewise for columns.
pub fn adaptive_avg_pool_2d(x: &[f32], g: usize, out: usize, c: usize) -> Vec<f32> {
    let start = |i: usize| i * g / out;
    let end = |i: usize| ((i + 1) * g).div_ceil(out);
    let mut y = vec![0f32; out * out * c];
    for oi in 0..out {
        for oj in 0..out {
            let (r0, r1, c0, c1) = (start(oi), end(oi), start(oj), end(oj));
            let count = ((r1 - r0) * (c1 - c0)) as f32;
            let dst = &mut y[(oi * out + oj) * c..(oi * out + oj + 1) * c];
            for r in r0..r1 {
                for s in c0..c1 {
                    let src = &x[(r * g + s) * c..(r * g + s + 1) * c];
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d += v;
                    }
                }
            }
            for d in dst.iter_mut() {
                *d /= count;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_24_to_12_is_2x2_mean() {
        let (g, o) = (24, 12);
        let x: Vec<f32> = (0..g * g).map(|i| i as f32).collect();
        let y = adaptive_avg_pool_2d(&x, g, o, 1);
        for i in 0..o {
            for j in 0..o {
                let want = (x[2 * i * g + 2 * j]
                    + x[2 * i * g + 2 * j + 1]
                    + x[(2 * i + 1) * g + 2 * j]
                    + x[(2 * i + 1) * g + 2 * j + 1])
                    / 4.0;
                assert_eq!(y[i * o + j], want, "cell {i},{j}");
            }
        }
    }

    #[test]
    fn pool_uneven_windows_overlap_like_pytorch() {
        // 5 -> 3: PyTorch's windows are [0,2), [1,4), [3,5).
        let x: Vec<f32> = (0..25).map(|i| i as f32).collect();
        let y = adaptive_avg_pool_2d(&x, 5, 3, 1);
        let mean = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            let n = (rows.len() * cols.len()) as f32;
            rows.flat_map(|r| cols.clone().map(move |c| (r * 5 + c) as f32))
                .sum::<f32>()
                / n
        };
        assert_eq!(y[0], mean(0..2, 0..2));
        assert_eq!(y[4], mean(1..4, 1..4));
        assert_eq!(y[5], mean(1..4, 3..5));
        assert_eq!(y[8], mean(3..5, 3..5));
    }
}

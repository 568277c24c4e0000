//! `linear` and `patch_embed`: the matrix-vector and matrix-matrix kernels (portable,
//! subgroup and quantized), their row cutoffs, and the quantized-weight layout.

use std::sync::atomic::Ordering;

use engine_core::{Backend, DType, Error, HostData, QuantType, Result, Shape, Tensor};
use half::f16;

use crate::ctx::PipelineKey;
use crate::uniforms::{CopyP, MatmulP};
use engine_core::checks::{check_linear, check_patch_embed};

use super::*;
use crate::backend::GpuBackend;

/// Rows up to which `linear` uses the matrix-vector kernels where they reduce each row in the
/// same order as the gemm kernels (`gemv_sg8`/`gemm_sg8`) or where nothing else is at stake
/// (quantized `*_q_sg8`): every M up to 16 then gives a row the same bits (a server batching
/// the decode rows of up to 16 sequences).
pub(crate) const GEMV_MAX_ROWS: usize = 16;

/// The same for the portable kernels, whose gemv (lanes split K) and gemm (one chain per
/// output) reduce in different orders: kept at 8 so that a conversation's follow-up of 9 or
/// more new rows equals a fresh run there; rows of 1..=8 agree with each other, not with 9+.
pub(crate) const GEMV_MAX_ROWS_PORTABLE: usize = 8;

/// Largest K for the `gemm*_sg8` kernels: their K loop runs K / 8 times, which must stay
/// under llvmpipe's 65535-iteration cap per invocation.
pub(crate) const SG8_MAX_K: usize = 32_768;

/// Largest K for the `gemv*_sg8` kernels at M = 16: gemv_sg8 runs (K / 8)·(M + 1) loop
/// iterations, gemv_q_sg8 about (K / 32)·(5M + 5); both under the cap.
pub(crate) const GEMV_SG8_MAX_K: usize = 24_576;

/// Row counts at which `gemv_sg8` takes its TILE variant (gemm_sg8's generated body with
/// RS = M x rows and [`GEMV_SG8_TILE_CL`] weight rows per lane, one subgroup per
/// workgroup): more FMAs per x broadcast than 4 weight rows per lane, measured ~10% less
/// CPU time at M = 8 on llava-1b's MLP shapes (gemm_lab, llvmpipe), about even at M = 5
/// and slower at M = 2 and 4. The FMA chain of each output is the same in both variants
/// (and in gemm_sg8), so a row's bits do not depend on M.
pub(crate) const GEMV_SG8_TILE_ROWS: std::ops::RangeInclusive<usize> = 6..=8;

/// Weight rows per lane in `gemv_sg8`'s TILE variant (a workgroup covers 8 × CL rows).
pub(crate) const GEMV_SG8_TILE_CL: usize = 16;

/// Whether `upload_quant` re-packs rows of `k` weights of format `qt` on the device: Q8_0
/// and Q4_0 blocks (34 and 18 bytes) are not word-aligned, so a row with an even number of
/// blocks is stored as [its f16 scales][its runs of quants] instead (same bytes and row size;
/// every quant word aligned; see shaders/wgsl/quant.wgsl). Odd block counts stay as in GGUF.
pub(crate) fn repacked(qt: QuantType, k: usize) -> bool {
    matches!(qt, QuantType::Q8_0 | QuantType::Q4_0)
        && k.is_multiple_of(qt.block_size())
        && (k / qt.block_size()).is_multiple_of(2)
}

/// Row `src` (GGUF blocks of format `qt`) in the re-packed layout of [`repacked`].
pub(crate) fn repack_row(qt: QuantType, src: &[u8], dst: &mut [u8]) {
    let bb = qt.block_bytes();
    let nb = src.len() / bb;
    let (scales, quants) = dst.split_at_mut(2 * nb);
    for (j, blk) in src.chunks_exact(bb).enumerate() {
        scales[2 * j..2 * j + 2].copy_from_slice(&blk[..2]);
        quants[(bb - 2) * j..(bb - 2) * (j + 1)].copy_from_slice(&blk[2..]);
    }
}

/// The `{{QT}}`, `{{QBS}}`, `{{QBB}}`, `{{QPK}}` substitutions of the `*_q` kernels for
/// weights of format `qt` with rows of `k`.
pub(crate) fn quant_key(key: PipelineKey, qt: QuantType, k: usize) -> PipelineKey {
    let [code, bs, bb] = shaders::QUANT_SUBS[match qt {
        QuantType::Q8_0 => 0,
        QuantType::Q4_0 => 1,
        QuantType::Q4_1 => 2,
        QuantType::Q4K => 3,
    }];
    key.sub("QT", code)
        .sub("QBS", bs)
        .sub("QBB", bb)
        .sub("QPK", u32::from(repacked(qt, k)))
}

impl GpuBackend {
    /// `linear` on validated operands: x `[m, k]` f32 (one buffer), w `[n, k]` (any chunks).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_raw(
        &self,
        cx: &Chunk,
        m: usize,
        k: usize,
        w: &Tensor,
        n: usize,
        bias: Option<&Chunk>,
        out: &Chunk,
    ) -> Result<()> {
        const OP: &str = "linear";
        if m == 0 || n == 0 {
            return Ok(());
        }
        let w16 = w.dtype() == DType::F16;
        let sw = st(w, OP)?;
        let quant = matches!(w.dtype(), DType::Quant(_));
        // Software adapters: the subgroup-broadcast kernels (same dispatch grids as below).
        // Whether they apply depends on the weights and K only, never on M.
        let sg8_path = self.ctx.sg8_cpu
            && k > 0
            && k <= GEMV_SG8_MAX_K
            && (quant || (w16 && k.is_multiple_of(8)));
        let gemv_max = if sg8_path {
            GEMV_MAX_ROWS
        } else {
            GEMV_MAX_ROWS_PORTABLE
        };
        let gemv = m <= gemv_max && k > 0;
        let sg8_max = if gemv { GEMV_SG8_MAX_K } else { SG8_MAX_K };
        let sg8 = self.ctx.sg8_cpu && w16 && k > 0 && k.is_multiple_of(8) && k <= sg8_max;
        let coop = !gemv && !quant && k > 0 && self.ctx.coop.load(Ordering::Relaxed);
        let sg8_tile = sg8 && gemv && !quant && GEMV_SG8_TILE_ROWS.contains(&m);
        let key = if let DType::Quant(qt) = w.dtype() {
            // upload_quant guarantees whole blocks per row (so K % 32 == 0 and K > 0).
            if k == 0 || !k.is_multiple_of(qt.block_size()) {
                return Err(Error::shape(
                    OP,
                    format!(
                        "{qt} weights need K a multiple of {}, got {k}",
                        qt.block_size()
                    ),
                ));
            }
            // Software adapters: the subgroup-broadcast variants (same grids again).
            let qsg8 = self.ctx.sg8_cpu && k <= sg8_max;
            let name = match (gemv, qsg8) {
                (true, true) => "gemv_q_sg8",
                (true, false) => "gemv_q",
                (false, true) => "gemm_q_sg8",
                (false, false) => "gemm_q",
            };
            let key = quant_key(PipelineKey::new(name, "main"), qt, k);
            if gemv {
                key.sub("M", m as u32)
            } else {
                key
            }
        } else if coop {
            PipelineKey::new("gemm_coop", "main")
        } else if sg8 && gemv {
            let key = PipelineKey::new("gemv_sg8", "main").sub("M", m as u32);
            if sg8_tile {
                key.flag(true, "TILE").sub("CL", GEMV_SG8_TILE_CL as u32)
            } else {
                key
            }
        } else if sg8 {
            PipelineKey::new("gemm_sg8", "main")
        } else if gemv {
            let vec = if w16 {
                k.is_multiple_of(8)
            } else {
                k.is_multiple_of(4)
            };
            PipelineKey::new("gemv", "main")
                .flag(vec, "VEC")
                .sub("M", m as u32)
        } else {
            PipelineKey::new("gemm", "main").flag(k.is_multiple_of(4), "VEC")
        };
        let pipe = self
            .ctx
            .pipeline(key.flag(w16, "W16").flag(bias.is_some(), "BIAS"))?;
        for c in &sw.chunks {
            if k > 0 && (c.elem0 % k != 0 || c.elems % k != 0) {
                return Err(Error::msg(format!(
                    "linear: weight chunk at element {} does not hold whole rows of {k}",
                    c.elem0
                )));
            }
            // K = 0: one dispatch writes the bias (or zeros) to every column.
            let (n_off, rows) = match (c.elem0.checked_div(k), c.elems.checked_div(k)) {
                (Some(a), Some(b)) => (a, b),
                _ => (0, n),
            };
            let prm = MatmulP {
                m: u32_of(OP, "rows", m)?,
                k: u32_of(OP, "features", k)?,
                rows: u32_of(OP, "rows", rows)?,
                n: u32_of(OP, "outputs", n)?,
                n_off: u32_of(OP, "offset", n_off)?,
                p0: 0,
                p1: 0,
                p2: 0,
            };
            let mut binds = vec![cx.bind(1), c.bind(2)];
            if let Some(b) = bias {
                binds.push(b.bind(3));
            }
            binds.push(out.bind(4));
            let g = if sg8_tile {
                // One workgroup (one subgroup) per 8 × CL weight rows, all M rows in it.
                let gy = u32_of(OP, "groups", rows.div_ceil(8 * GEMV_SG8_TILE_CL))?;
                if gy > self.ctx.max_groups {
                    return Err(Error::TooLarge {
                        what: format!("linear: [{m}, {k}] x [{rows}, {k}]"),
                        bytes: (m * rows) as u64,
                        limit: u64::from(self.ctx.max_groups) * 8 * GEMV_SG8_TILE_CL as u64,
                    });
                }
                [1, gy.max(1), 1]
            } else if gemv {
                self.grid(OP, rows.div_ceil(32))?
            } else if coop {
                // 32×32 blocks of y: weight rows along x, activation rows along y.
                let gx = u32_of(OP, "groups", rows.div_ceil(32))?;
                let gy = u32_of(OP, "groups", m.div_ceil(32))?;
                if gx > self.ctx.max_groups || gy > self.ctx.max_groups {
                    return Err(Error::TooLarge {
                        what: format!("linear: [{m}, {k}] x [{rows}, {k}]"),
                        bytes: (m * rows) as u64,
                        limit: u64::from(self.ctx.max_groups) * 32,
                    });
                }
                [gx.max(1), gy, 1]
            } else if sg8 {
                // M tiles along x: consecutive workgroups share one weight tile in cache.
                let (tm, tn) = shaders::GEMM_SG8_TILE;
                let gx = u32_of(OP, "groups", m.div_ceil(tm as usize))?;
                let gy = u32_of(OP, "groups", rows.div_ceil(tn as usize))?;
                if gx > self.ctx.max_groups || gy > self.ctx.max_groups {
                    return Err(Error::TooLarge {
                        what: format!("linear: [{m}, {k}] x [{rows}, {k}]"),
                        bytes: (m * rows) as u64,
                        limit: u64::from(self.ctx.max_groups) * u64::from(tm),
                    });
                }
                [gx, gy.max(1), 1]
            } else {
                let gx = u32_of(OP, "groups", rows.div_ceil(64))?;
                let gy = u32_of(OP, "groups", m.div_ceil(64))?;
                if gx > self.ctx.max_groups || gy > self.ctx.max_groups {
                    return Err(Error::TooLarge {
                        what: format!("linear: [{m}, {k}] x [{rows}, {k}]"),
                        bytes: (m * rows) as u64,
                        limit: u64::from(self.ctx.max_groups) * 64,
                    });
                }
                [gx.max(1), gy, 1]
            };
            self.ctx.dispatch(&pipe, &prm, &binds, g)?;
            if k == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The load-time parity check of `gemm_coop`: a gemm with f16 and f32 weights, a bias,
    /// and M, N, K that are not multiples of the 32×32 block or of 8, on the matrix units
    /// and on the tiled gemm; `linear` keeps `gemm_coop` only when every output agrees within
    /// f32 summation-order noise (anything else, a compile error included, leaves it off).
    /// Whether `linear` takes the subgroup-broadcast `*_sg8` kernels on this adapter (a
    /// software adapter whose subgroups are exactly 8 wide): their gemv and gemm share one
    /// reduction order, so rows agree up to 16 per call (else up to 8). For tests, which
    /// cannot tell from `DeviceInfo` alone (SwiftShader has subgroups, not 8-wide ones).
    pub fn sg8_kernels(&self) -> bool {
        self.ctx.sg8_cpu
    }

    pub(crate) fn enable_coop_if_exact(&self) {
        let (m, k, n) = (40usize, 76usize, 45usize);
        let val = |i: usize, s: usize| ((i.wrapping_mul(s) % 1009) as f32) / 1009.0 - 0.5;
        let x: Vec<f32> = (0..m * k).map(|i| val(i, 7919)).collect();
        let wf: Vec<f32> = (0..n * k).map(|i| val(i, 104_729)).collect();
        let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let bias: Vec<f32> = (0..n).map(|i| val(i, 31)).collect();
        let run = |coop: bool| -> Result<Vec<Vec<f32>>> {
            self.ctx.coop.store(coop, Ordering::Relaxed);
            let xt = self.upload(HostData::F32(&x), Shape::from([m, k]))?;
            let bt = self.upload(HostData::F32(&bias), Shape::from(n))?;
            let mut out = Vec::new();
            for w in [
                self.upload(HostData::F16(&wh), Shape::from([n, k]))?,
                self.upload(HostData::F32(&wf), Shape::from([n, k]))?,
            ] {
                out.push(self.to_vec_f32(&self.linear(&xt, &w, Some(&bt))?)?);
            }
            Ok(out)
        };
        let exact = match (run(true), run(false)) {
            (Ok(a), Ok(b)) => a
                .iter()
                .flatten()
                .zip(b.iter().flatten())
                .all(|(g, w)| (g - w).abs() <= 1e-4 * (1.0 + w.abs()) && g.is_finite()),
            _ => false,
        };
        self.ctx.coop.store(exact, Ordering::Relaxed);
    }

    pub(crate) fn op_linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        let (k, n) = check_linear(x, w, b)?;
        if let Some(b) = b {
            need(b, DType::F32, OP)?;
        }
        need(x, DType::F32, OP)?;
        if !matches!(w.dtype(), DType::Quant(_)) {
            need_float(w, OP)?;
        }
        let m = x.shape().rows();
        let cx = one(x, OP)?;
        let cb = b.map(|b| one(b, OP)).transpose()?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let out = self.empty(dims, DType::F32, OP)?; // [.., N]
        self.linear_raw(cx, m, k, w, n, cb, one(&out, OP)?)?;
        Ok(out)
    }

    pub(crate) fn op_patch_embed(
        &self,
        pixels: &Tensor,
        w: &Tensor,
        patch: usize,
    ) -> Result<Tensor> {
        const OP: &str = "patch_embed";
        let (c, h, wd, d) = check_patch_embed(OP, pixels, w, patch)?;
        need(pixels, DType::F32, OP)?;
        need_float(w, OP)?;
        let (gh, gw) = (h / patch, wd / patch);
        let np = gh * gw;
        let kdim = c * patch * patch;
        let cols = self.empty([np, kdim], DType::F32, OP)?; // [P, C*p*p]
        let count = np * kdim;
        if count > 0 {
            let (cp, cc) = (one(pixels, OP)?, one(&cols, OP)?);
            let pipe = self.ctx.pipeline(PipelineKey::new("copy", "im2col"))?;
            let u = |v: usize| u32_of(OP, "size", v);
            let prm = CopyP {
                u0: u(count)?,
                u1: u(c)?,
                u2: u(h)?,
                u3: u(wd)?,
                u4: u(patch)?,
                u5: u(gw)?,
                u6: u(kdim)?,
                u7: 0,
            };
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[cp.bind(4), cc.bind(5)],
                self.grid(OP, count.div_ceil(256))?,
            )?;
        }
        let w2 = w.reshape([d, kdim])?;
        let out = self.empty([np, d], DType::F32, OP)?; // [P, D]
        self.linear_raw(one(&cols, OP)?, np, kdim, &w2, d, None, one(&out, OP)?)?;
        Ok(out)
    }

    pub(crate) fn op_linear_batch_rows(&self) -> usize {
        // Every path's gemv covers at least GEMV_MAX_ROWS_PORTABLE rows, each row reduced
        // the same way whatever M; past its cutoff the portable gemm reduces differently.
        GEMV_MAX_ROWS_PORTABLE
    }

    pub(crate) fn op_linear_prefill_rows(&self) -> usize {
        // Past every path's gemv cutoff: the gemm kernels, whose rows do not depend on M.
        GEMV_MAX_ROWS.max(GEMV_MAX_ROWS_PORTABLE) + 1
    }
}

//! Attention: the flash, subgroup (`attn_sg8`) and per-query kernels, the last-row
//! probabilities and the token contributions VisiPruner reads.

use engine_core::{AttentionParams, Backend, DType, Error, Result, Tensor};

use crate::ctx::PipelineKey;
use crate::uniforms::{AttentionP, ContribP, FlashP, ProbsP, Sg8P};
use crate::variants::Prefill;
use engine_core::checks::{check_attention, check_attention_last_row, check_token_contributions};

use super::*;
use crate::backend::GpuBackend;

/// Whether the K/V operands of an attention op are an f16 cache (`KV16` kernels) or f32; both
/// must share the dtype.
pub(crate) fn kv16(op: &'static str, kv: &[&Tensor]) -> Result<bool> {
    let first = kv.first().map_or(DType::F32, |t| t.dtype());
    for t in kv {
        if t.dtype() != first || !matches!(first, DType::F32 | DType::F16) {
            return Err(Error::DType {
                op,
                dtype: t.dtype(),
            });
        }
    }
    Ok(first == DType::F16)
}

/// Bytes of the score buffer of one `attn_sg8` chunk (heads × queries × keys f32; a 640-token
/// prefill of 32 heads is one chunk, 52 MB). Smaller chunks (16 MiB, 4 MiB) that stay in the
/// last-level cache measured no faster on lavapipe, and each chunk is two more passes.
pub(crate) const SG8_SCORES: u64 = 64 << 20;

/// Longest cache `attn_sg8` takes: attn_pv_sg8 walks 8 keys per iteration plus its 128-key
/// block maxes per query, and llvmpipe stops an invocation after 65535 loop iterations; longer
/// caches run the keys-split flash kernel.
pub(crate) const SG8_MAX_KEYS: usize = 1 << 17;

/// Queries per subgroup of the `attn_sg8` passes for a call of `sq` queries: 32 (the register
/// block that makes the products compute-bound) once a call has that many, fewer for short
/// calls (decode: 1). Only speed depends on it, never a query's bits.
pub(crate) fn sg8_queries(sq: usize) -> usize {
    match sq {
        0..=1 => 1,
        2..=4 => 4,
        5..=8 => 8,
        _ => 32,
    }
}

/// Default tile sizes of `flash_attn` for head size `d`: (BQ queries, BK keys, TPR lanes per query),
/// the largest of the preferred sizes whose workgroup memory fits `wg_storage` bytes with K/V
/// tiles of `kv_bytes` per element; `None` when `d` is not a multiple of 4 or nothing fits.
pub(crate) fn flash_tiles(
    d: usize,
    kv_bytes: usize,
    wg_storage: usize,
) -> Option<(usize, usize, usize)> {
    if d == 0 || !d.is_multiple_of(4) {
        return None;
    }
    // Lanes per query: a power of two up to 8 that divides the vec4 columns.
    let tpr = [8, 4, 2, 1]
        .into_iter()
        .find(|t| (d / 4).is_multiple_of(*t))?;
    let mem = |bq: usize, bk: usize| bq * d * 4 + 2 * bk * d * kv_bytes + bq * bk * 4 + 16 * bq;
    for bq in [16, 8, 4] {
        for bk in [32, 16, 8, 4] {
            if mem(bq, bk) <= wg_storage && bq * tpr <= 256 {
                return Some((bq, bk, tpr));
            }
        }
    }
    None
}

impl GpuBackend {
    /// Records the masked softmax probabilities of q's last row into `out` `[H, kv_len]`.
    pub(crate) fn last_row_probs(
        &self,
        cq: &Chunk,
        ck: &Chunk,
        sq: usize,
        p: &AttentionParams,
        k16: bool,
        out: &Chunk,
    ) -> Result<()> {
        const OP: &str = "attention_last_row";
        let pipe = self
            .ctx
            .pipeline(PipelineKey::new("attention_probs", "main").flag(k16, "KV16"))?;
        let prm = ProbsP::new(sq, p, u32_of(OP, "head_dim", p.head_dim)?);
        let g = self.grid(OP, p.num_heads)?;
        if g[1] > 1 {
            return Err(Error::shape(
                OP,
                format!("{} heads is too many", p.num_heads),
            ));
        }
        self.ctx
            .dispatch(&pipe, &prm, &[cq.bind(1), ck.bind(2), out.bind(3)], g)
    }

    /// Records `o[h*D + d] = Σ_j probs[h, j] · v[j, kvh*D + d]` (zero probabilities skipped);
    /// returns the uniform (shared with `contrib_main`, which also reads `start..end`).
    // The two chunks, the op's parameters and their dtype, the key range and the output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn weighted_values(
        &self,
        cp: &Chunk,
        cv: &Chunk,
        p: &AttentionParams,
        v16: bool,
        start: usize,
        end: usize,
        out: &Chunk,
    ) -> Result<ContribP> {
        const OP: &str = "attention";
        let c = |v: usize| u32_of(OP, "size", v);
        let prm = ContribP {
            h: c(p.num_heads)?,
            d: c(p.head_dim)?,
            n: c(p.kv_len)?,
            group: c(p.num_heads / p.num_kv_heads)?,
            kw: c(p.num_kv_heads * p.head_dim)?,
            start: c(start)?,
            count: c(end - start)?,
            pad: 0,
        };
        let pipe = self
            .ctx
            .pipeline(PipelineKey::new("contrib", "contrib_o").flag(v16, "KV16"))?;
        let hd = p.num_heads * p.head_dim;
        self.ctx.dispatch(
            &pipe,
            &prm,
            &[cp.bind(1), cv.bind(2), out.bind(3)],
            self.grid(OP, hd.div_ceil(256))?,
        )?;
        Ok(prm)
    }

    /// Split-KV flash attention over `sq` queries (prefill and decode alike): the adapter's
    /// variant (`flash_attn` tiles or the keys-split `flash_attn_k`; one query per workgroup
    /// for decode) runs every (query, head) over fixed splits of the keys, then
    /// `flash_combine` reduces the splits. The splits and the variant depend on the adapter
    /// and head shape only, so a query's result does not depend on how many queries the
    /// call holds (batch invariance).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        sq: usize,
        kv16: bool,
        out: Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        let d = p.head_dim;
        let (cq, ck, cv, co) = (one(q, OP)?, one(k, OP)?, one(v, OP)?, one(&out, OP)?);
        let c = |v: usize| u32_of(OP, "size", v);
        let mut variant = self.prefill_variant(d, kv16);
        if variant == Prefill::Sg8 {
            if p.kv_len <= SG8_MAX_KEYS {
                return self.attn_sg8(q, k, v, p, sq, kv16, out);
            }
            // Longer caches: the keys-split kernel (its default tiles).
            variant = Prefill::Keys(16, 32);
        }
        let split = self.kv_split(d, kv16, variant);
        // Decode (and short calls): one query per workgroup; the per-query arithmetic is the
        // same for every BQ.
        let (key, bq) = match variant {
            Prefill::Tiled(bq, bk, tpr) => {
                let bq = if sq < bq { 1 } else { bq };
                (
                    PipelineKey::new("flash_attn", "main")
                        .sub("BQ", c(bq)?)
                        .sub("BK", c(bk)?)
                        .sub("TPR", c(tpr)?)
                        .sub("WG", c(bq * tpr)?),
                    bq,
                )
            }
            Prefill::Keys(bq, wg) => {
                let bq = if sq < bq { 1 } else { bq };
                (
                    PipelineKey::new("flash_attn_k", "main")
                        .sub("BQ", c(bq)?)
                        .sub("WG", c(wg)?)
                        .sub("NC", c((d / 4).div_ceil(wg))?),
                    bq,
                )
            }
            Prefill::Sg8 => return Err(Error::internal("sg8 attention took the flash path")),
        };
        let pipe = self
            .ctx
            .pipeline(key.flag(kv16, "KV16").sub("HEAD_DIM", c(d)?))?;
        let kv_end = if p.causal {
            (p.q_offset + sq).min(p.kv_len)
        } else {
            p.kv_len
        };
        let nsplit = kv_end.div_ceil(split).max(1);
        // The [queries, heads, splits, D + 3] f32 partials must fit one binding: a long
        // prompt (LLaVA-NeXT-7B's 3,027 queries over 32 heads, 152 MB) runs in query chunks.
        // A query's result does not depend on the other queries of the call, so the chunks
        // give the same bits (and each chunk, seeing no more keys, fits).
        let per_query = (p.num_heads * nsplit * (d + 3) * 4) as u64;
        let rows = (self.ctx.max_binding / per_query.max(1)).max(1) as usize;
        if sq > rows {
            for q0 in (0..sq).step_by(rows) {
                let n = rows.min(sq - q0);
                let pc = AttentionParams {
                    q_offset: p.q_offset + q0,
                    ..*p
                };
                let oc = self.empty([n, p.num_heads * d], DType::F32, OP)?;
                let oc = self.flash(&self.slice_rows(q, q0, n)?, k, v, &pc, n, kv16, oc)?;
                self.write_rows(&out, q0, &oc)?;
            }
            return Ok(out);
        }
        let g = [c(sq.div_ceil(bq))?, c(p.num_heads)?, c(nsplit)?];
        if g.iter().any(|&x| x > self.ctx.max_groups) {
            return Err(Error::shape(
                OP,
                format!(
                    "{sq} queries x {} heads x {} keys is too many",
                    p.num_heads, p.kv_len
                ),
            ));
        }
        // [Sq, H, nsplit, D+3]: each split's running max, normaliser, sink sum and P·V.
        let part = self.empty([sq, p.num_heads, nsplit, d + 3], DType::F32, OP)?;
        let cp = one(&part, OP)?;
        let prm = FlashP {
            split: c(split)?,
            nsplit: c(nsplit)?,
            kb0: 0,
            kb1: c(kv_end)?,
            first: 1,
            last: 0,
            ..FlashP::new(sq, p)
        };
        self.ctx.dispatch(
            &pipe,
            &prm,
            &[cq.bind(1), ck.bind(2), cv.bind(3), co.bind(4), cp.bind(5)],
            g,
        )?;
        let combine = self.ctx.pipeline(
            PipelineKey::new("flash_combine", "main")
                .flag(kv16, "KV16")
                .sub("HEAD_DIM", c(d)?),
        )?;
        self.ctx.dispatch(
            &combine,
            &prm,
            &[cv.bind(3), co.bind(4), cp.bind(5)],
            self.grid(OP, sq * p.num_heads)?,
        )?;
        Ok(out)
    }

    /// Attention on software adapters with 8-wide subgroups (`Prefill::Sg8`, head sizes a
    /// multiple of 64): per chunk of heads (and queries, for long caches) whose scores fit
    /// [`SG8_SCORES`] bytes, `attn_qk_sg8` writes the scores and per-block row maxes, and
    /// `attn_pv_sg8` turns them into probabilities (masks included), multiplies by V and
    /// normalises. Every score, row sum and output is a chain in a fixed order whatever the
    /// number of queries per subgroup ([`sg8_queries`]), and chunks only group queries, so a
    /// query's result does not depend on the call (batch invariance).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn_sg8(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        sq: usize,
        kv16: bool,
        out: Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        let d = p.head_dim;
        let (cq, ck, cv, co) = (one(q, OP)?, one(k, OP)?, one(v, OP)?, one(&out, OP)?);
        let c = |v: usize| u32_of(OP, "size", v);
        let h = p.num_heads;
        let rs = sg8_queries(sq);
        let key = |name: &'static str| {
            PipelineKey::new(name, "main")
                .flag(kv16, "KV16")
                .sub("RS", rs as u32)
                .sub("HEAD_DIM", d as u32)
        };
        let qk = self.ctx.pipeline(key("attn_qk_sg8"))?;
        // Mask rules or not: the same bits for keys no rule covers, so only speed depends on it.
        let masked = !p.mask.rules().as_slice().is_empty();
        let pv = self.ctx.pipeline(key("attn_pv_sg8").flag(masked, "MASK"))?;
        // Score rows: the keys the call's last query sees, rounded up to whole 8-key steps of
        // attn_pv_sg8. Chunks: whole heads while the scores of all queries fit, else one head
        // and whole query blocks.
        let kv_end = if p.causal {
            (p.q_offset + sq).min(p.kv_len)
        } else {
            p.kv_len
        };
        let kpad = kv_end.div_ceil(8).max(1) * 8;
        let kblock = shaders::ATTN_QK_KEYS as usize;
        let nkb = kpad.div_ceil(kblock);
        let budget = (SG8_SCORES.min(self.ctx.max_binding) / 4) as usize;
        let (hc, qc) = if sq * kpad <= budget {
            ((budget / (sq * kpad)).clamp(1, h), sq)
        } else {
            (1, (budget / kpad / rs).max(1) * rs)
        };
        let scores = self.empty([hc * qc * kpad], DType::F32, OP)?;
        let maxes = self.empty([hc * qc * nkb], DType::F32, OP)?;
        let (cs, cm) = (one(&scores, OP)?, one(&maxes, OP)?);
        let base = Sg8P {
            kpad: c(kpad)?,
            nkb: c(nkb)?,
            ..Sg8P::new(sq, p)
        };
        for q0 in (0..sq).step_by(qc) {
            let nq = qc.min(sq - q0);
            for h0 in (0..h).step_by(hc) {
                let nh = hc.min(h - h0);
                let prm = Sg8P {
                    sq: c(nq)?,
                    q_offset: c(p.q_offset + q0)?,
                    nh: c(nh)?,
                    q0: c(q0)?,
                    h0: c(h0)?,
                    ..base
                };
                let chunk_end = if p.causal {
                    (p.q_offset + q0 + nq).min(p.kv_len)
                } else {
                    p.kv_len
                };
                let blocks = [c(nq.div_ceil(rs))?, c(chunk_end.div_ceil(kblock))?, c(nh)?];
                if blocks.iter().any(|&x| x > self.ctx.max_groups) {
                    return Err(Error::shape(
                        OP,
                        format!("{sq} queries x {h} heads x {} keys is too many", p.kv_len),
                    ));
                }
                self.ctx.dispatch(
                    &qk,
                    &prm,
                    &[cq.bind(1), ck.bind(2), cs.bind(3), cm.bind(4)],
                    blocks,
                )?;
                self.ctx.dispatch(
                    &pv,
                    &prm,
                    &[cs.bind(1), cv.bind(2), co.bind(3), cm.bind(4)],
                    [blocks[0], blocks[2], 1],
                )?;
            }
        }
        Ok(out)
    }

    /// Keys one invocation of `variant` may walk in one dispatch on a software adapter
    /// (llvmpipe stops a loop nest after 65535 iterations: the iterations one invocation
    /// runs per key tile, counted from the kernel's loops); unbounded elsewhere.
    pub(crate) fn keys_per_pass(&self, variant: Prefill, d: usize) -> usize {
        if self.ctx.info.device_type != "cpu" {
            return usize::MAX;
        }
        let d4 = d / 4;
        match variant {
            Prefill::Tiled(bq, bk, tpr) => {
                let wg = bq * tpr;
                let per_tile = (bk * d4).div_ceil(wg)
                    + (bq * bk).div_ceil(wg) * (d4 + 1)
                    + 3 * bk
                    + bk * (d4 / tpr + 1)
                    + d4 / tpr;
                (60_000 / per_tile).max(1) * bk
            }
            Prefill::Keys(bq, wg) => {
                let nc = d4.div_ceil(wg);
                let per_tile = d4 * (bq + 1) + 3 * bq + 2 * wg + wg * nc * (bq + 1) + bq * nc;
                (60_000 / per_tile).max(1) * wg
            }
            // One loop iteration per 8 keys (attn_pv_sg8).
            Prefill::Sg8 => SG8_MAX_KEYS,
        }
    }

    /// The per-query attention kernel (`attention.wgsl`) over f32 K/V, for head sizes the
    /// flash kernels do not take; decode too (one query's arithmetic does not depend on how
    /// many queries the call holds).
    pub(crate) fn attention_per_query(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        sq: usize,
        out: Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        let (cq, ck, cv) = (one(q, OP)?, one(k, OP)?, one(v, OP)?);
        let d = p.head_dim;
        // Keys per tile: the K and V tiles (2·TK·D f32) fit the workgroup memory.
        let tk = (self.ctx.wg_storage as usize / (8 * d)).min(16);
        if tk == 0 || d > 1024 {
            return Err(Error::shape(
                OP,
                format!("head_dim {d} is too large for this adapter"),
            ));
        }
        let co = one(&out, OP)?;
        let pipe = self.ctx.pipeline(
            PipelineKey::new("attention", "main")
                .sub("HEAD_DIM", d as u32)
                .sub("TK", tk as u32),
        )?;
        let prm = AttentionP::new(sq, p);
        let g = [
            u32_of(OP, "groups", sq.div_ceil(64))?,
            u32_of(OP, "heads", p.num_heads)?,
            1,
        ];
        if g[0] > self.ctx.max_groups || g[1] > self.ctx.max_groups {
            return Err(Error::shape(
                OP,
                format!("{sq} queries x {} heads is too many", p.num_heads),
            ));
        }
        // Keys per dispatch: all of them on GPUs; on software adapters few enough that an
        // invocation's loop nest stays under llvmpipe's 65535-iteration cap (about 2·D + 4
        // iterations per key), the running softmax state carried between passes.
        let kv_end = if p.causal {
            (p.q_offset + sq).min(p.kv_len)
        } else {
            p.kv_len
        };
        let per_pass = if self.ctx.info.device_type == "cpu" {
            ((60_000 / (2 * d + 4)) / tk * tk).max(tk)
        } else {
            kv_end.max(1)
        };
        let passes = kv_end.div_ceil(per_pass).max(1);
        let state = if passes > 1 {
            self.empty([sq, p.num_heads, d + 3], DType::F32, OP)? // [Sq, H, D+3]: m, l, S, o
        } else {
            self.empty([4], DType::F32, OP)? // bound but never touched
        };
        let cs = one(&state, OP)?;
        for pass in 0..passes {
            let (kb0, kb1) = (pass * per_pass, ((pass + 1) * per_pass).min(kv_end));
            let prm = AttentionP {
                kb0: u32_of(OP, "key", kb0)?,
                kb1: u32_of(OP, "key", kb1)?,
                first: u32::from(pass == 0),
                last: u32::from(pass + 1 == passes),
                ..prm
            };
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[cq.bind(1), ck.bind(2), cv.bind(3), co.bind(4), cs.bind(5)],
                g,
            )?;
        }
        Ok(out)
    }

    pub(crate) fn op_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        let sq = check_attention(OP, q.dims(), &[k.dims(), v.dims()], p)?;
        need(q, DType::F32, OP)?;
        let kv16 = kv16(OP, &[k, v])?;
        let d = p.head_dim;
        let out = self.empty([sq, p.num_heads * d], DType::F32, OP)?;
        if sq == 0 {
            return Ok(out);
        }
        if d.is_multiple_of(4) {
            return self.flash(q, k, v, p, sq, kv16, out);
        }
        // Head sizes that are not a multiple of 4 (no model here has them): the per-query
        // kernel over an f32 copy of the keys and values.
        let (k, v) = if kv16 {
            (self.cast(k, DType::F32)?, self.cast(v, DType::F32)?)
        } else {
            (k.clone(), v.clone())
        };
        self.attention_per_query(q, &k, &v, p, sq, out)
    }

    pub(crate) fn op_attention_last_row(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        const OP: &str = "attention_last_row";
        let sq = check_attention_last_row(q, k, p)?;
        need(q, DType::F32, OP)?;
        let k16 = kv16(OP, &[k])?;
        let (cq, ck) = (one(q, OP)?, one(k, OP)?);
        let out = self.empty([p.num_heads, p.kv_len], DType::F32, OP)?; // [H, kv_len]
        self.last_row_probs(cq, ck, sq, p, k16, one(&out, OP)?)?;
        Ok(out)
    }

    pub(crate) fn op_token_contributions(
        &self,
        probs: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        start: usize,
        end: usize,
    ) -> Result<Tensor> {
        const OP: &str = "token_contributions";
        check_token_contributions(OP, probs, v, p, start, end)?;
        need(probs, DType::F32, OP)?;
        let v16 = kv16(OP, &[v])?;
        let (cp, cv) = (one(probs, OP)?, one(v, OP)?);
        let out = self.empty([end - start, 2], DType::F32, OP)?; // [end-start, 2]
        if end == start {
            return Ok(out);
        }
        let o = self.empty([p.num_heads * p.head_dim], DType::F32, OP)?; // [H*D]: the output
        let (co, cout) = (one(&o, OP)?, one(&out, OP)?);
        let prm = self.weighted_values(cp, cv, p, v16, start, end, co)?;
        let p2 = self
            .ctx
            .pipeline(PipelineKey::new("contrib", "contrib_main").flag(v16, "KV16"))?;
        self.ctx.dispatch(
            &p2,
            &prm,
            &[cp.bind(1), cv.bind(2), co.bind(4), cout.bind(5)],
            self.grid(OP, end - start)?,
        )?;
        Ok(out)
    }
}

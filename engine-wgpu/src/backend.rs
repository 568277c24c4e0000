//! `engine_core::Backend` on wgpu: validation (as the CPU reference does), tensor storage,
//! and one method per op recording WGSL dispatches into the current batch.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use engine_core::{
    AttentionParams, Backend, DType, DeviceInfo, Error, HostData, QuantType, Result, RopeParams,
    Shape, Storage, Tensor,
};
use half::f16;

use crate::ctx::{lock, Bind, Ctx, PipelineKey};
use crate::uniforms::{
    ArgmaxP, AttentionP, ContribP, CopyP, ElementwiseP, EmbeddingP, EmbeddingQP, FlashP, MatmulP,
    NormP, ProbsP, RopeP, Sg8P,
};
use crate::variants::Prefill;
use bytemuck::Zeroable;
use engine_core::checks::{
    check_argmax, check_attention, check_attention_last_row, check_broadcast, check_concat_rows,
    check_embedding, check_gather_rows, check_ids, check_layer_norm, check_linear,
    check_patch_embed, check_rms_norm, check_rope, check_row_indices, check_rows, check_silu_mul,
    check_slice_rows, check_token_contributions, check_upload, check_upload_quant,
    check_write_rows, check_zeros,
};

/// Host copies of small `U32` uploads are kept so ids/indices can be range-checked without a
/// device round trip.
const SHADOW_MAX: usize = 1 << 16;
/// Rows up to which `linear` uses the matrix-vector kernels where they reduce each row in the
/// same order as the gemm kernels (`gemv_sg8`/`gemm_sg8`) or where nothing else is at stake
/// (quantized `*_q_sg8`): every M up to 16 then gives a row the same bits (a server batching
/// the decode rows of up to 16 sequences).
const GEMV_MAX_ROWS: usize = 16;
/// The same for the portable kernels, whose gemv (lanes split K) and gemm (one chain per
/// output) reduce in different orders: kept at 8 so that a conversation's follow-up of 9 or
/// more new rows equals a fresh run there; rows of 1..=8 agree with each other, not with 9+.
const GEMV_MAX_ROWS_PORTABLE: usize = 8;
/// Largest K for the `gemm*_sg8` kernels: their K loop runs K / 8 times, which must stay
/// under llvmpipe's 65535-iteration cap per invocation.
const SG8_MAX_K: usize = 32_768;
/// Largest K for the `gemv*_sg8` kernels at M = 16: gemv_sg8 runs (K / 8)·(M + 1) loop
/// iterations, gemv_q_sg8 about (K / 32)·(5M + 5); both under the cap.
const GEMV_SG8_MAX_K: usize = 24_576;
/// Row counts at which `gemv_sg8` takes its TILE variant (gemm_sg8's generated body with
/// RS = M x rows and [`GEMV_SG8_TILE_CL`] weight rows per lane, one subgroup per
/// workgroup): more FMAs per x broadcast than 4 weight rows per lane, measured ~10% less
/// CPU time at M = 8 on llava-1b's MLP shapes (gemm_lab, llvmpipe), about even at M = 5
/// and slower at M = 2 and 4. The FMA chain of each output is the same in both variants
/// (and in gemm_sg8), so a row's bits do not depend on M.
const GEMV_SG8_TILE_ROWS: std::ops::RangeInclusive<usize> = 6..=8;
/// Weight rows per lane in `gemv_sg8`'s TILE variant (a workgroup covers 8 × CL rows).
const GEMV_SG8_TILE_CL: usize = 16;

/// One buffer of a tensor: elements `elem0..elem0 + elems` of the tensor.
pub(crate) struct Chunk {
    pub buf: wgpu::Buffer,
    /// Pool size class (or exact size for upload buffers).
    pub class: u64,
    pub elem0: usize,
    pub elems: usize,
    /// Bytes holding the chunk's elements (f16 are packed two per u32 word).
    pub bytes: u64,
}

/// GPU memory behind a [`Tensor`]: one buffer, or several (split by rows) when the tensor is
/// larger than one storage binding. Buffers return to the pool on drop.
pub struct GpuStorage {
    chunks: Vec<Chunk>,
    ctx: Arc<Ctx>,
    shadow: Option<Vec<u32>>,
}

impl std::fmt::Debug for GpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStorage")
            .field("chunks", &self.chunks.len())
            .field("bytes", &self.chunks.iter().map(|c| c.bytes).sum::<u64>())
            .finish()
    }
}

impl GpuStorage {
    /// Number of device buffers holding the tensor (more than one when it was split).
    pub fn buffers(&self) -> usize {
        self.chunks.len()
    }
}

impl Storage for GpuStorage {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn backend_name(&self) -> &'static str {
        "wgpu"
    }
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        for c in self.chunks.drain(..) {
            self.ctx.release(c.buf, c.class);
        }
    }
}

/// Bytes of `n` elements of `dtype` on the device (f16 packed two per u32; quantized blocks
/// as raw bytes padded to a whole u32 word).
fn dev_bytes(dtype: DType, n: usize) -> u64 {
    match dtype {
        DType::F16 | DType::BF16 => (n as u64).div_ceil(2) * 4,
        DType::Quant(q) => {
            let (bs, bb) = (q.block_size() as u64, q.block_bytes() as u64);
            ((n as u64).div_ceil(bs) * bb).div_ceil(4) * 4
        }
        _ => n as u64 * 4,
    }
}

/// Rejects quantized tensors in ops that only move floats or ids.
fn not_quant(t: &Tensor, op: &'static str) -> Result<()> {
    match t.dtype() {
        d @ DType::Quant(_) => Err(Error::DType { op, dtype: d }),
        _ => Ok(()),
    }
}

/// Whether `upload_quant` re-packs rows of `k` weights of format `qt` on the device: Q8_0
/// and Q4_0 blocks (34 and 18 bytes) are not word-aligned, so a row with an even number of
/// blocks is stored as [its f16 scales][its runs of quants] instead (same bytes and row size;
/// every quant word aligned; see shaders/wgsl/quant.wgsl). Odd block counts stay as in GGUF.
fn repacked(qt: QuantType, k: usize) -> bool {
    matches!(qt, QuantType::Q8_0 | QuantType::Q4_0)
        && k.is_multiple_of(qt.block_size())
        && (k / qt.block_size()).is_multiple_of(2)
}

/// Row `src` (GGUF blocks of format `qt`) in the re-packed layout of [`repacked`].
fn repack_row(qt: QuantType, src: &[u8], dst: &mut [u8]) {
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
fn quant_key(key: PipelineKey, qt: QuantType, k: usize) -> PipelineKey {
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

/// RoPE frequency tables by (head_dim, theta bits, scaling bits).
type InvFreqCache = HashMap<(usize, u32, u32), Tensor>;

/// The wgpu backend. Cheap to clone (an `Arc` to the device context).
#[derive(Clone)]
pub struct GpuBackend {
    pub(crate) ctx: Arc<Ctx>,
    inv_freq: Arc<Mutex<InvFreqCache>>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBackend({})", self.ctx.info.adapter)
    }
}

fn st<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a GpuStorage> {
    t.storage_as::<GpuStorage>(op)
}

/// The single buffer of `t`; tensors split over several bindings only work in ops that
/// stream chunks (`linear`, `embedding`, `to_vec_*`).
fn one<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a Chunk> {
    let s = st(t, op)?;
    match s.chunks.as_slice() {
        [c] => Ok(c),
        _ => Err(Error::TooLarge {
            what: format!("{op}: operand {}", t.shape()),
            bytes: s.chunks.iter().map(|c| c.bytes).sum(),
            limit: s.ctx.max_binding,
        }),
    }
}

fn need(t: &Tensor, dtype: DType, op: &'static str) -> Result<()> {
    if t.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            dtype: t.dtype(),
        })
    }
}

fn need_float(t: &Tensor, op: &'static str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 => Ok(()),
        d => Err(Error::DType { op, dtype: d }),
    }
}

/// Whether the K/V operands of an attention op are an f16 cache (`KV16` kernels) or f32; both
/// must share the dtype.
fn kv16(op: &'static str, kv: &[&Tensor]) -> Result<bool> {
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
const SG8_SCORES: u64 = 64 << 20;

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

fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} {v} does not fit in 32 bits")))
}

impl GpuBackend {
    /// A new storage buffer holding `host` (its length a multiple of 16), written through a
    /// mapping at creation; the staged bytes are counted so that loads submit as they go.
    fn buffer_with(&self, host: &[u8], what: &str) -> Result<wgpu::Buffer> {
        let size = host.len() as u64;
        let buf = self.ctx.create(size, what, true)?;
        {
            let mut view = buf
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Device(format!("{what}: mapping a buffer: {e}")))?;
            view.copy_from_slice(host);
        }
        buf.unmap();
        self.ctx.staged_upload(size)?;
        Ok(buf)
    }

    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        GpuBackend {
            ctx,
            inv_freq: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Workgroup grid for `groups` workgroups: x up to the per-dimension limit, then y.
    fn grid(&self, op: &'static str, groups: usize) -> Result<[u32; 3]> {
        let maxd = self.ctx.max_groups.max(1) as usize;
        let x = groups.min(maxd);
        let y = if x == 0 { 0 } else { groups.div_ceil(x) };
        if y > maxd {
            return Err(Error::TooLarge {
                what: format!("{op}: {groups} workgroups"),
                bytes: groups as u64,
                limit: (maxd * maxd) as u64,
            });
        }
        Ok([x as u32, y as u32, 1])
    }

    fn wrap(&self, chunks: Vec<Chunk>, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let s = GpuStorage {
            chunks,
            ctx: self.ctx.clone(),
            shadow: None,
        };
        Tensor::from_storage(Arc::new(s), shape.into(), dtype)
    }

    /// A new single-buffer tensor (contents undefined: every op writes all of it).
    fn empty(&self, shape: impl Into<Shape>, dtype: DType, op: &'static str) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let bytes = dev_bytes(dtype, n);
        if bytes > self.ctx.max_binding {
            return Err(Error::TooLarge {
                what: format!("{op}: result {shape} {dtype}"),
                bytes,
                limit: self.ctx.max_binding,
            });
        }
        let (buf, class) = self.ctx.alloc(bytes, op)?;
        Ok(self.wrap(
            vec![Chunk {
                buf,
                class,
                elem0: 0,
                elems: n,
                bytes,
            }],
            shape,
            dtype,
        ))
    }

    /// Copies `count` elements: `src` from element `src_off` to `dst` from element `dst_off`.
    fn copy_elems(
        &self,
        dtype: DType,
        dst: &Chunk,
        dst_off: usize,
        src: &Chunk,
        src_off: usize,
        count: usize,
    ) -> Result<()> {
        const OP: &str = "copy";
        if count == 0 {
            return Ok(());
        }
        if dtype != DType::F16
            || (dst_off.is_multiple_of(2) && src_off.is_multiple_of(2) && count.is_multiple_of(2))
        {
            let es = if dtype == DType::F16 { 2 } else { 4 };
            let (so, d_o, n) = (
                (src_off * es) as u64,
                (dst_off * es) as u64,
                (count * es) as u64,
            );
            self.ctx
                .encode(|enc| enc.copy_buffer_to_buffer(&src.buf, so, &dst.buf, d_o, n));
            return Ok(());
        }
        // f16 at odd element offsets: a bit-exact kernel that merges half words.
        let w0 = dst_off / 2;
        let words = (dst_off + count).div_ceil(2) - w0;
        let pipe = self.ctx.pipeline(PipelineKey::new("copy", "copy16"))?;
        let c = |v| u32_of(OP, "offset", v);
        let prm = CopyP {
            u0: c(dst_off)?,
            u1: c(src_off)?,
            u2: c(count)?,
            u3: c(w0)?,
            u4: c(words)?,
            u5: 0,
            u6: 0,
            u7: 0,
        };
        let g = self.grid(OP, words.div_ceil(256))?;
        self.ctx.dispatch(
            &pipe,
            &prm,
            &[Bind(1, &src.buf, src.bytes), Bind(3, &dst.buf, dst.bytes)],
            g,
        )
    }

    fn unary(&self, op: &'static str, x: &Tensor, code: u32) -> Result<Tensor> {
        need(x, DType::F32, op)?;
        let cx = one(x, op)?;
        let out = self.empty(x.shape().clone(), DType::F32, op)?;
        let n = x.elem_count();
        if n > 0 {
            let co = one(&out, op)?;
            let pipe = self
                .ctx
                .pipeline(PipelineKey::new("elementwise", "unary").konst("OP", code))?;
            let prm = ElementwiseP {
                len: u32_of(op, "length", n)?,
                n: 0,
                b_len: 0,
                pad: 0,
            };
            let g = self.grid(op, n.div_ceil(256))?;
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[Bind(1, &cx.buf, cx.bytes), Bind(3, &co.buf, co.bytes)],
                g,
            )?;
        }
        Ok(out)
    }

    fn binary(&self, op: &'static str, a: &Tensor, b: &Tensor, code: u32) -> Result<Tensor> {
        need(a, DType::F32, op)?;
        need(b, DType::F32, op)?;
        let (ca, cb) = (one(a, op)?, one(b, op)?);
        let out = self.empty(a.shape().clone(), DType::F32, op)?;
        let n = a.elem_count();
        if n > 0 {
            let co = one(&out, op)?;
            let pipe = self
                .ctx
                .pipeline(PipelineKey::new("elementwise", "binary").konst("OP", code))?;
            let prm = ElementwiseP {
                len: u32_of(op, "length", n)?,
                n: u32_of(op, "width", a.shape().last_dim())?,
                b_len: u32_of(op, "length", b.elem_count())?,
                pad: 0,
            };
            let g = self.grid(op, n.div_ceil(256))?;
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[
                    Bind(1, &ca.buf, ca.bytes),
                    Bind(2, &cb.buf, cb.bytes),
                    Bind(3, &co.buf, co.bytes),
                ],
                g,
            )?;
        }
        Ok(out)
    }

    /// One row-wise norm/softmax kernel: `extra` are the (binding, tensor) parameter vectors.
    fn rows_op(
        &self,
        op: &'static str,
        entry: &'static str,
        x: &Tensor,
        extra: &[(u32, &Tensor)],
        eps: f32,
    ) -> Result<Tensor> {
        need(x, DType::F32, op)?;
        let n = x.shape().last_dim();
        let rows = x.shape().rows();
        let cx = one(x, op)?;
        let out = self.empty(x.shape().clone(), DType::F32, op)?;
        if rows > 0 && n > 0 {
            let co = one(&out, op)?;
            let mut binds = vec![Bind(1, &cx.buf, cx.bytes)];
            for (i, t) in extra {
                need(t, DType::F32, op)?;
                let c = one(t, op)?;
                binds.push(Bind(*i, &c.buf, c.bytes));
            }
            binds.push(Bind(4, &co.buf, co.bytes));
            let pipe = self.ctx.pipeline(PipelineKey::new("norm", entry))?;
            let prm = NormP {
                rows: u32_of(op, "rows", rows)?,
                n: u32_of(op, "width", n)?,
                eps,
                pad: 0,
            };
            let g = self.grid(op, rows)?;
            self.ctx.dispatch(&pipe, &prm, &binds, g)?;
        }
        Ok(out)
    }

    /// `linear` on validated operands: x `[m, k]` f32 (one buffer), w `[n, k]` (any chunks).
    #[allow(clippy::too_many_arguments)]
    fn linear_raw(
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
            let mut binds = vec![Bind(1, &cx.buf, cx.bytes), Bind(2, &c.buf, c.bytes)];
            if let Some(b) = bias {
                binds.push(Bind(3, &b.buf, b.bytes));
            }
            binds.push(Bind(4, &out.buf, out.bytes));
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

    fn inv_freq(&self, p: &RopeParams) -> Result<Tensor> {
        let key = (p.head_dim, p.theta.to_bits(), p.scaling_factor.to_bits());
        if let Some(t) = lock(&self.inv_freq).get(&key) {
            return Ok(t.clone());
        }
        // Exactly the CPU reference's table (engine-core cpu/ops.rs inv_freq).
        let d = p.head_dim;
        let v: Vec<f32> = (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                let pow = f64::from(p.theta).powf(f64::from(e)) as f32;
                (1.0 / pow) / p.scaling_factor
            })
            .collect();
        let n = v.len();
        let t = self.upload(HostData::F32(&v), Shape::from(n))?;
        lock(&self.inv_freq).insert(key, t.clone());
        Ok(t)
    }

    /// Records the masked softmax probabilities of q's last row into `out` `[H, kv_len]`.
    fn last_row_probs(
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
        self.ctx.dispatch(
            &pipe,
            &prm,
            &[
                Bind(1, &cq.buf, cq.bytes),
                Bind(2, &ck.buf, ck.bytes),
                Bind(3, &out.buf, out.bytes),
            ],
            g,
        )
    }

    /// Records `o[h*D + d] = Σ_j probs[h, j] · v[j, kvh*D + d]` (zero probabilities skipped);
    /// returns the uniform (shared with `contrib_main`, which also reads `start..end`).
    // The two chunks, the op's parameters and their dtype, the key range and the output.
    #[allow(clippy::too_many_arguments)]
    fn weighted_values(
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
            &[
                Bind(1, &cp.buf, cp.bytes),
                Bind(2, &cv.buf, cv.bytes),
                Bind(3, &out.buf, out.bytes),
            ],
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
    fn flash(
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
            &[
                Bind(1, &cq.buf, cq.bytes),
                Bind(2, &ck.buf, ck.bytes),
                Bind(3, &cv.buf, cv.bytes),
                Bind(4, &co.buf, co.bytes),
                Bind(5, &cp.buf, cp.bytes),
            ],
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
            &[
                Bind(3, &cv.buf, cv.bytes),
                Bind(4, &co.buf, co.bytes),
                Bind(5, &cp.buf, cp.bytes),
            ],
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
    fn attn_sg8(
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
                    &[
                        Bind(1, &cq.buf, cq.bytes),
                        Bind(2, &ck.buf, ck.bytes),
                        Bind(3, &cs.buf, cs.bytes),
                        Bind(4, &cm.buf, cm.bytes),
                    ],
                    blocks,
                )?;
                self.ctx.dispatch(
                    &pv,
                    &prm,
                    &[
                        Bind(1, &cs.buf, cs.bytes),
                        Bind(2, &cv.buf, cv.bytes),
                        Bind(3, &co.buf, co.bytes),
                        Bind(4, &cm.buf, cm.bytes),
                    ],
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
    fn attention_per_query(
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
                &[
                    Bind(1, &cq.buf, cq.bytes),
                    Bind(2, &ck.buf, ck.bytes),
                    Bind(3, &cv.buf, cv.bytes),
                    Bind(4, &co.buf, co.bytes),
                    Bind(5, &cs.buf, cs.bytes),
                ],
                g,
            )?;
        }
        Ok(out)
    }

    /// Host copy of a small uploaded `U32` tensor, if one was kept.
    fn shadow<'a>(&self, t: &'a Tensor, op: &'static str) -> Result<Option<&'a [u32]>> {
        Ok(st(t, op)?.shadow.as_deref())
    }

    /// Reads every chunk of `t` back as raw bytes in element order.
    fn read_raw(&self, t: &Tensor, op: &'static str) -> Result<Vec<Vec<u8>>> {
        let s = st(t, op)?;
        let parts: Vec<(&wgpu::Buffer, u64)> = s.chunks.iter().map(|c| (&c.buf, c.bytes)).collect();
        self.ctx.read(&parts)
    }
}

impl Backend for GpuBackend {
    fn device_info(&self) -> DeviceInfo {
        self.ctx.info.clone()
    }

    fn upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor> {
        check_upload(data.len(), &shape)?;
        let n = shape.elem_count();
        // BF16 converts like the CPU backend: to f16 when every value is finite in f16.
        let bf_h: Vec<f16>;
        let bf_f: Vec<f32>;
        let data = match data {
            HostData::BF16(v) => {
                let h: Vec<f16> = v.iter().map(|x| f16::from_f32(x.to_f32())).collect();
                if h.iter().all(|x| x.is_finite()) {
                    bf_h = h;
                    HostData::F16(&bf_h)
                } else {
                    bf_f = v.iter().map(|x| x.to_f32()).collect();
                    HostData::F32(&bf_f)
                }
            }
            d => d,
        };
        let dtype = data.dtype();
        let total = dev_bytes(dtype, n);
        // Split by first-dim rows when one binding cannot hold the tensor.
        let row = if shape.rank() == 0 || shape.dims()[0] == 0 {
            n.max(1)
        } else {
            n / shape.dims()[0]
        };
        let mut per = if total <= self.ctx.max_binding || row == 0 {
            n.max(1)
        } else {
            let rows = (self.ctx.max_binding / dev_bytes(dtype, row).max(1)) as usize;
            // f16 chunks must start on a word boundary: an even number of odd-length rows.
            let rows = if dtype == DType::F16 && row % 2 == 1 {
                rows & !1
            } else {
                rows
            };
            if rows == 0 {
                return Err(Error::TooLarge {
                    what: format!("one row of tensor {shape} {dtype}"),
                    bytes: dev_bytes(dtype, row),
                    limit: self.ctx.max_binding,
                });
            }
            rows * row
        };
        per = per.max(1);
        let mut chunks = Vec::new();
        let mut e0 = 0;
        while e0 < n || (n == 0 && chunks.is_empty()) {
            let elems = per.min(n - e0);
            let bytes = dev_bytes(dtype, elems);
            let size = bytes.max(16).div_ceil(16) * 16;
            // The mapped view is write-only: stage the padded bytes and copy them once.
            let mut host = vec![0u8; size as usize];
            match data {
                HostData::F32(v) => {
                    host[..elems * 4].copy_from_slice(bytemuck::cast_slice(&v[e0..e0 + elems]))
                }
                HostData::U32(v) => {
                    host[..elems * 4].copy_from_slice(bytemuck::cast_slice(&v[e0..e0 + elems]))
                }
                HostData::F16(v) => {
                    let b: &[u8] = bytemuck::cast_slice(&v[e0..e0 + elems]);
                    host[..b.len()].copy_from_slice(b);
                }
                // Converted to F16 or F32 above.
                HostData::BF16(_) => {}
            }
            let buf = self.buffer_with(&host, &format!("tensor {shape} {dtype}"))?;
            chunks.push(Chunk {
                buf,
                class: size,
                elem0: e0,
                elems,
                bytes,
            });
            e0 += elems;
            if n == 0 {
                break;
            }
        }
        let shadow = match data {
            HostData::U32(v) if v.len() <= SHADOW_MAX => Some(v.to_vec()),
            _ => None,
        };
        let s = GpuStorage {
            chunks,
            ctx: self.ctx.clone(),
            shadow,
        };
        Ok(Tensor::from_storage(Arc::new(s), shape, dtype))
    }

    fn upload_quant(&self, qt: QuantType, bytes: &[u8], shape: Shape) -> Result<Tensor> {
        let (n, k) = check_upload_quant(qt, bytes.len(), &shape)?;
        // The raw GGUF blocks, rows back to back (Q8_0/Q4_0 rows re-packed when `repacked`;
        // otherwise the kernels decode unaligned blocks), split by whole rows when one
        // binding cannot hold them like f16 weights; each chunk padded to a whole u32 word.
        let rows = n.checked_div(k).unwrap_or(0);
        let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
        let per_rows = if dev_bytes(DType::Quant(qt), n) <= self.ctx.max_binding || row_bytes == 0 {
            rows.max(1)
        } else {
            let r = (self.ctx.max_binding.saturating_sub(3) / row_bytes as u64) as usize;
            if r == 0 {
                return Err(Error::TooLarge {
                    what: format!("one row of tensor {shape} {qt}"),
                    bytes: row_bytes as u64,
                    limit: self.ctx.max_binding,
                });
            }
            r
        };
        let mut chunks = Vec::new();
        let mut r0 = 0;
        loop {
            let nr = per_rows.min(rows - r0);
            let raw = &bytes[r0 * row_bytes..(r0 + nr) * row_bytes];
            let words = (raw.len() as u64).div_ceil(4) * 4;
            let size = words.max(16).div_ceil(16) * 16;
            let mut host = vec![0u8; size as usize];
            if repacked(qt, k) && row_bytes > 0 {
                for (src, dst) in raw
                    .chunks_exact(row_bytes)
                    .zip(host.chunks_exact_mut(row_bytes))
                {
                    repack_row(qt, src, dst);
                }
            } else {
                host[..raw.len()].copy_from_slice(raw);
            }
            let buf = self.buffer_with(&host, &format!("tensor {shape} {qt}"))?;
            chunks.push(Chunk {
                buf,
                class: size,
                elem0: r0 * k,
                elems: nr * k,
                bytes: words.max(4),
            });
            r0 += nr;
            if r0 >= rows {
                break;
            }
        }
        Ok(self.wrap(chunks, shape, DType::Quant(qt)))
    }

    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
        check_zeros(dtype)?;
        let t = self.empty(shape, dtype, "zeros")?;
        let c = one(&t, "zeros")?;
        let size = c.bytes.div_ceil(4) * 4;
        if size > 0 {
            self.ctx
                .encode(|enc| enc.clear_buffer(&c.buf, 0, Some(size.min(c.buf.size()))));
        }
        Ok(t)
    }

    fn to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        const OP: &str = "to_vec_f32";
        need_float(t, OP)?;
        let parts = self.read_raw(t, OP)?;
        let s = st(t, OP)?;
        let mut out = Vec::with_capacity(t.elem_count());
        for (c, raw) in s.chunks.iter().zip(parts) {
            match t.dtype() {
                DType::F32 => out.extend(
                    raw.chunks_exact(4)
                        .take(c.elems)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                _ => out.extend(
                    raw.chunks_exact(2)
                        .take(c.elems)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
        }
        Ok(out)
    }

    fn to_vec_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        const OP: &str = "to_vec_u32";
        need(t, DType::U32, OP)?;
        let parts = self.read_raw(t, OP)?;
        let mut out = Vec::with_capacity(t.elem_count());
        for raw in parts {
            out.extend(
                raw.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        out.truncate(t.elem_count());
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        self.ctx.sync()
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
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

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_broadcast("add", a, b)?;
        self.binary("add", a, b, 0)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_broadcast("mul", a, b)?;
        self.binary("mul", a, b, 1)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary("gelu", x, 0)
    }

    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary("quick_gelu", x, 1)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        check_silu_mul(gate, up)?;
        self.binary("silu_mul", gate, up, 2)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        check_rms_norm(x, w)?;
        self.rows_op("rms_norm", "rms_norm", x, &[(2, w)], eps)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        check_layer_norm(x, w, b)?;
        self.rows_op("layer_norm", "layer_norm", x, &[(2, w), (3, b)], eps)
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax";
        check_rows(OP, x)?;
        self.rows_op(OP, "softmax", x, &[], 0.0)
    }

    fn rope(&self, x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<Tensor> {
        const OP: &str = "rope";
        let (s, w) = check_rope(x, positions, p)?;
        need(x, DType::F32, OP)?;
        need(positions, DType::U32, OP)?;
        let inv = self.inv_freq(p)?;
        let (cx, cp, ci) = (one(x, OP)?, one(positions, OP)?, one(&inv, OP)?);
        let out = self.empty([s, w], DType::F32, OP)?;
        let total = s * w / 2;
        if total > 0 {
            let co = one(&out, OP)?;
            let pipe = self.ctx.pipeline(PipelineKey::new("rope", "main"))?;
            let prm = RopeP {
                rows: u32_of(OP, "rows", s)?,
                width: u32_of(OP, "width", w)?,
                head_dim: p.head_dim as u32,
                pad: 0,
            };
            let g = self.grid(OP, total.div_ceil(256))?;
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[
                    Bind(1, &cx.buf, cx.bytes),
                    Bind(2, &cp.buf, cp.bytes),
                    Bind(3, &ci.buf, ci.bytes),
                    Bind(4, &co.buf, co.bytes),
                ],
                g,
            )?;
        }
        Ok(out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> Result<Tensor> {
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

    fn attention_last_row(&self, q: &Tensor, k: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        const OP: &str = "attention_last_row";
        let sq = check_attention_last_row(q, k, p)?;
        need(q, DType::F32, OP)?;
        let k16 = kv16(OP, &[k])?;
        let (cq, ck) = (one(q, OP)?, one(k, OP)?);
        let out = self.empty([p.num_heads, p.kv_len], DType::F32, OP)?; // [H, kv_len]
        self.last_row_probs(cq, ck, sq, p, k16, one(&out, OP)?)?;
        Ok(out)
    }

    fn token_contributions(
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
            &[
                Bind(1, &cp.buf, cp.bytes),
                Bind(2, &cv.buf, cv.bytes),
                Bind(4, &co.buf, co.bytes),
                Bind(5, &cout.buf, cout.bytes),
            ],
            self.grid(OP, end - start)?,
        )?;
        Ok(out)
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        let (vocab, d) = check_embedding(table, ids)?;
        need(ids, DType::U32, OP)?;
        let quant = match table.dtype() {
            DType::Quant(qt) => {
                if !d.is_multiple_of(qt.block_size()) {
                    return Err(Error::shape(
                        OP,
                        format!("{qt} table rows of {d} are not whole blocks"),
                    ));
                }
                Some(qt)
            }
            _ => {
                need_float(table, OP)?;
                None
            }
        };
        let checked = match self.shadow(ids, OP)? {
            Some(v) => {
                check_ids(v, vocab)?;
                true
            }
            None => false,
        };
        let s = ids.elem_count();
        let ci = one(ids, OP)?;
        let out = if checked {
            self.empty([s, d], DType::F32, OP)?
        } else {
            // Ids made on the device were not range-checked: rows of bad ids stay zero.
            self.zeros(Shape::from([s, d]), DType::F32)?
        };
        if s == 0 || d == 0 {
            return Ok(out);
        }
        let cout = one(&out, OP)?;
        let w16 = table.dtype() == DType::F16;
        let (pipe, g) = match quant {
            // One invocation per 32-weight sub-block of an output row.
            Some(qt) => (
                self.ctx
                    .pipeline(quant_key(PipelineKey::new("embedding_q", "main"), qt, d))?,
                self.grid(OP, (s * d / 32).div_ceil(256))?,
            ),
            None => (
                self.ctx
                    .pipeline(PipelineKey::new("embedding", "main").flag(w16, "W16"))?,
                self.grid(OP, (s * d).div_ceil(256))?,
            ),
        };
        for c in &st(table, OP)?.chunks {
            if c.elem0 % d != 0 || c.elems % d != 0 {
                return Err(Error::msg(format!(
                    "embedding: table chunk at element {} does not hold whole rows of {d}",
                    c.elem0
                )));
            }
            let (v0, v1) = (c.elem0 / d, (c.elem0 + c.elems) / d);
            let (s32, d32) = (u32_of(OP, "ids", s)?, u32_of(OP, "width", d)?);
            let (v0, v1) = (v0 as u32, v1 as u32);
            let binds = [
                Bind(1, &ci.buf, ci.bytes),
                Bind(2, &c.buf, c.bytes),
                Bind(3, &cout.buf, cout.bytes),
            ];
            if quant.is_some() {
                let prm = EmbeddingQP {
                    s: s32,
                    k: d32,
                    v0,
                    v1,
                };
                self.ctx.dispatch(&pipe, &prm, &binds, g)?;
            } else {
                let prm = EmbeddingP {
                    s: s32,
                    d: d32,
                    v0,
                    v1,
                };
                self.ctx.dispatch(&pipe, &prm, &binds, g)?;
            }
        }
        Ok(out)
    }

    fn gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_rows";
        let (m, n) = check_gather_rows(x, idx)?;
        need(idx, DType::U32, OP)?;
        if let Some(v) = self.shadow(idx, OP)? {
            check_row_indices(v, m)?;
        }
        // The kernel moves 32-bit words: f16 rows must be whole words.
        let words = match x.dtype() {
            DType::F32 | DType::U32 => n,
            DType::F16 if n % 2 == 0 => n / 2,
            dt => return Err(Error::DType { op: OP, dtype: dt }),
        };
        let r = idx.elem_count();
        let (cx, ci) = (one(x, OP)?, one(idx, OP)?);
        let out = self.empty([r, n], x.dtype(), OP)?;
        let count = r * words;
        if count > 0 {
            let co = one(&out, OP)?;
            let pipe = self.ctx.pipeline(PipelineKey::new("copy", "gather32"))?;
            let prm = CopyP {
                u0: u32_of(OP, "size", count)?,
                u1: words as u32,
                ..CopyP::zeroed()
            };
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[
                    Bind(1, &cx.buf, cx.bytes),
                    Bind(2, &ci.buf, ci.bytes),
                    Bind(3, &co.buf, co.bytes),
                ],
                self.grid(OP, count.div_ceil(256))?,
            )?;
        }
        Ok(out)
    }

    fn slice_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "slice_rows";
        check_slice_rows(x, start, len)?;
        let dims = x.dims();
        if matches!(x.dtype(), DType::BF16 | DType::Quant(_)) {
            return Err(Error::DType {
                op: OP,
                dtype: x.dtype(),
            });
        }
        let n: usize = dims[1..].iter().product();
        let mut out_dims = dims.to_vec();
        out_dims[0] = len;
        let out = self.empty(out_dims, x.dtype(), OP)?;
        let (e0, count) = (start * n, len * n);
        if count == 0 {
            return Ok(out);
        }
        // Slices of a split tensor work when they fall inside one chunk.
        let src = st(x, OP)?
            .chunks
            .iter()
            .find(|c| c.elem0 <= e0 && e0 + count <= c.elem0 + c.elems)
            .ok_or_else(|| Error::TooLarge {
                what: format!(
                    "{OP}: rows {start}..{} across buffers of {}",
                    start + len,
                    x.shape()
                ),
                bytes: dev_bytes(x.dtype(), count),
                limit: self.ctx.max_binding,
            })?;
        self.copy_elems(x.dtype(), one(&out, OP)?, 0, src, e0 - src.elem0, count)?;
        Ok(out)
    }

    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "concat_rows";
        let rows = check_concat_rows(parts)?;
        let first = parts[0];
        let mut dims = first.dims().to_vec();
        dims[0] = rows;
        let out = self.empty(dims, first.dtype(), OP)?;
        let co = one(&out, OP)?;
        let mut off = 0;
        for t in parts {
            let c = one(t, OP)?;
            self.copy_elems(first.dtype(), co, off, c, 0, t.elem_count())?;
            off += t.elem_count();
        }
        Ok(out)
    }

    fn write_rows(&self, dst: &Tensor, row: usize, src: &Tensor) -> Result<()> {
        const OP: &str = "write_rows";
        let (r, n) = check_write_rows(dst, row, src)?;
        not_quant(dst, OP)?;
        if src.dtype() == DType::F32 && dst.dtype() == DType::F16 {
            // An f16 KV cache: the rows are rounded to f16 first (a new tensor, so never the
            // destination itself).
            let h = self.cast(src, DType::F16)?;
            return self.write_rows(dst, row, &h);
        }
        if src.dtype() != dst.dtype() {
            return Err(Error::DType {
                op: OP,
                dtype: src.dtype(),
            });
        }
        let cd = one(dst, OP)?;
        // A buffer cannot be both the source and the destination of one copy: stage it.
        if Arc::ptr_eq(dst.storage(), src.storage()) {
            let tmp = self.slice_rows(src, 0, r)?;
            return self.copy_elems(dst.dtype(), cd, row * n, one(&tmp, OP)?, 0, r * n);
        }
        self.copy_elems(dst.dtype(), cd, row * n, one(src, OP)?, 0, r * n)
    }

    fn patch_embed(&self, pixels: &Tensor, w: &Tensor, patch: usize) -> Result<Tensor> {
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
                &[Bind(4, &cp.buf, cp.bytes), Bind(5, &cc.buf, cc.bytes)],
                self.grid(OP, count.div_ceil(256))?,
            )?;
        }
        let w2 = w.reshape([d, kdim])?;
        let out = self.empty([np, d], DType::F32, OP)?; // [P, D]
        self.linear_raw(one(&cols, OP)?, np, kdim, &w2, d, None, one(&out, OP)?)?;
        Ok(out)
    }

    fn linear_batch_rows(&self) -> usize {
        // Every path's gemv covers at least GEMV_MAX_ROWS_PORTABLE rows, each row reduced
        // the same way whatever M; past its cutoff the portable gemm reduces differently.
        GEMV_MAX_ROWS_PORTABLE
    }

    fn linear_prefill_rows(&self) -> usize {
        // Past every path's gemv cutoff: the gemm kernels, whose rows do not depend on M.
        GEMV_MAX_ROWS.max(GEMV_MAX_ROWS_PORTABLE) + 1
    }

    fn argmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "argmax";
        let n = check_argmax(x)?;
        need(x, DType::F32, OP)?;
        let rows = x.shape().rows();
        let cx = one(x, OP)?;
        let out = self.empty([rows], DType::U32, OP)?;
        if rows > 0 {
            let co = one(&out, OP)?;
            let pipe = self.ctx.pipeline(PipelineKey::new("argmax", "main"))?;
            let prm = ArgmaxP {
                rows: u32_of(OP, "rows", rows)?,
                n: u32_of(OP, "width", n)?,
                p0: 0,
                p1: 0,
            };
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[Bind(1, &cx.buf, cx.bytes), Bind(2, &co.buf, co.bytes)],
                self.grid(OP, rows)?,
            )?;
        }
        Ok(out)
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        let (src_t, entry) = match (x.dtype(), dtype) {
            (DType::F32, DType::F32) | (DType::F16, DType::F16) => {
                // Same dtype: a copy (tensors are values), scalars included.
                let out = self.empty(x.shape().clone(), x.dtype(), OP)?;
                self.copy_elems(x.dtype(), one(&out, OP)?, 0, one(x, OP)?, 0, x.elem_count())?;
                return Ok(out);
            }
            (DType::F32, DType::F16) => (x, "cast_to_f16"),
            (DType::F16, DType::F32) => (x, "cast_to_f32"),
            (DType::U32, _) => {
                return Err(Error::DType {
                    op: OP,
                    dtype: DType::U32,
                })
            }
            (_, other) => {
                return Err(Error::DType {
                    op: OP,
                    dtype: other,
                })
            }
        };
        let n = x.elem_count();
        let cx = one(src_t, OP)?;
        let out = self.empty(x.shape().clone(), dtype, OP)?;
        if n > 0 {
            let co = one(&out, OP)?;
            let pipe = self.ctx.pipeline(PipelineKey::new("copy", entry))?;
            let prm = CopyP {
                u0: u32_of(OP, "size", n)?,
                ..CopyP::zeroed()
            };
            let (binds, threads) = if entry == "cast_to_f16" {
                (
                    [Bind(4, &cx.buf, cx.bytes), Bind(3, &co.buf, co.bytes)],
                    n.div_ceil(2),
                )
            } else {
                ([Bind(1, &cx.buf, cx.bytes), Bind(5, &co.buf, co.bytes)], n)
            };
            self.ctx
                .dispatch(&pipe, &prm, &binds, self.grid(OP, threads.div_ceil(256))?)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::size_class;

    #[test]
    fn size_classes_bound_waste() {
        for b in [
            1u64,
            17,
            1000,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            262_668_288,
        ] {
            let c = size_class(b);
            assert!(c >= b && c.is_multiple_of(16), "{b} -> {c}");
            assert!(
                c <= b.max(256) + b.max(256) / 4,
                "{b} -> {c} wastes too much"
            );
        }
    }
}

//! Moving tensors between host and device: uploads (f32/f16/bf16/u32 and quantized
//! blocks), zeros, readbacks, casts and device-side copies.

use std::sync::Arc;

use engine_core::{DType, Error, HostData, QuantType, Result, Shape, Tensor};
use half::f16;

use crate::ctx::PipelineKey;
use crate::uniforms::CopyP;
use bytemuck::Zeroable;
use engine_core::checks::{check_upload, check_upload_quant, check_zeros};

use super::linear::*;
use super::*;
use crate::backend::GpuBackend;

impl GpuBackend {
    /// A new storage buffer holding `host` (its length a multiple of 16), written through a
    /// mapping at creation; the staged bytes are counted so that loads submit as they go.
    pub(crate) fn buffer_with(&self, host: &[u8], what: &str) -> Result<wgpu::Buffer> {
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

    /// Copies `count` elements: `src` from element `src_off` to `dst` from element `dst_off`.
    pub(crate) fn copy_elems(
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
        self.ctx
            .dispatch(&pipe, &prm, &[src.bind(1), dst.bind(3)], g)
    }

    /// Host copy of a small uploaded `U32` tensor, if one was kept.
    pub(crate) fn shadow<'a>(&self, t: &'a Tensor, op: &'static str) -> Result<Option<&'a [u32]>> {
        Ok(st(t, op)?.shadow.as_deref())
    }

    /// Reads every chunk of `t` back as raw bytes in element order.
    pub(crate) fn read_raw(&self, t: &Tensor, op: &'static str) -> Result<Vec<Vec<u8>>> {
        let s = st(t, op)?;
        let parts: Vec<(&wgpu::Buffer, u64)> = s.chunks.iter().map(|c| (&c.buf, c.bytes)).collect();
        self.ctx.read(&parts)
    }

    pub(crate) fn op_upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor> {
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

    pub(crate) fn op_upload_quant(
        &self,
        qt: QuantType,
        bytes: &[u8],
        shape: Shape,
    ) -> Result<Tensor> {
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

    pub(crate) fn op_zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
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

    pub(crate) fn op_to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
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

    pub(crate) fn op_to_vec_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
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

    pub(crate) fn op_cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
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
                ([cx.bind(4), co.bind(3)], n.div_ceil(2))
            } else {
                ([cx.bind(1), co.bind(5)], n)
            };
            self.ctx
                .dispatch(&pipe, &prm, &binds, self.grid(OP, threads.div_ceil(256))?)?;
        }
        Ok(out)
    }
}

//! Row and elementwise ops: add/mul, activations, norms, softmax, argmax, and the data
//! movement of rows (embedding, gather, slice, concat, write).

use std::sync::Arc;

use engine_core::{Backend, DType, Error, Result, Shape, Tensor};

use crate::ctx::PipelineKey;
use crate::uniforms::{ArgmaxP, CopyP, ElementwiseP, EmbeddingP, EmbeddingQP, NormP};
use bytemuck::Zeroable;
use engine_core::checks::{
    check_argmax, check_broadcast, check_concat_rows, check_embedding, check_gather_rows,
    check_ids, check_layer_norm, check_rms_norm, check_row_indices, check_rows, check_silu_mul,
    check_slice_rows, check_write_rows,
};

use super::linear::*;
use super::*;
use crate::backend::GpuBackend;

impl GpuBackend {
    pub(crate) fn unary(&self, op: &'static str, x: &Tensor, code: u32) -> Result<Tensor> {
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
            self.ctx
                .dispatch(&pipe, &prm, &[cx.bind(1), co.bind(3)], g)?;
        }
        Ok(out)
    }

    pub(crate) fn binary(
        &self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        code: u32,
    ) -> Result<Tensor> {
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
            self.ctx
                .dispatch(&pipe, &prm, &[ca.bind(1), cb.bind(2), co.bind(3)], g)?;
        }
        Ok(out)
    }

    /// One row-wise norm/softmax kernel: `extra` are the (binding, tensor) parameter vectors.
    pub(crate) fn rows_op(
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
            let mut binds = vec![cx.bind(1)];
            for (i, t) in extra {
                need(t, DType::F32, op)?;
                let c = one(t, op)?;
                binds.push(c.bind(*i));
            }
            binds.push(co.bind(4));
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

    pub(crate) fn op_add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_broadcast("add", a, b)?;
        self.binary("add", a, b, 0)
    }

    pub(crate) fn op_mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_broadcast("mul", a, b)?;
        self.binary("mul", a, b, 1)
    }

    pub(crate) fn op_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary("gelu", x, 0)
    }

    pub(crate) fn op_quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.unary("quick_gelu", x, 1)
    }

    pub(crate) fn op_silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        check_silu_mul(gate, up)?;
        self.binary("silu_mul", gate, up, 2)
    }

    pub(crate) fn op_rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        check_rms_norm(x, w)?;
        self.rows_op("rms_norm", "rms_norm", x, &[(2, w)], eps)
    }

    pub(crate) fn op_layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        check_layer_norm(x, w, b)?;
        self.rows_op("layer_norm", "layer_norm", x, &[(2, w), (3, b)], eps)
    }

    pub(crate) fn op_softmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax";
        check_rows(OP, x)?;
        self.rows_op(OP, "softmax", x, &[], 0.0)
    }

    pub(crate) fn op_embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
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
            let binds = [ci.bind(1), c.bind(2), cout.bind(3)];
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

    pub(crate) fn op_gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
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
                &[cx.bind(1), ci.bind(2), co.bind(3)],
                self.grid(OP, count.div_ceil(256))?,
            )?;
        }
        Ok(out)
    }

    pub(crate) fn op_slice_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
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

    pub(crate) fn op_concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
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

    pub(crate) fn op_write_rows(&self, dst: &Tensor, row: usize, src: &Tensor) -> Result<()> {
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

    pub(crate) fn op_argmax(&self, x: &Tensor) -> Result<Tensor> {
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
            self.ctx
                .dispatch(&pipe, &prm, &[cx.bind(1), co.bind(2)], self.grid(OP, rows)?)?;
        }
        Ok(out)
    }
}

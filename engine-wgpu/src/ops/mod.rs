//! The wgpu backend's ops, one file per family, each an `impl GpuBackend` block that
//! `backend.rs` delegates to; this file holds the device storage of a tensor and the
//! helpers the op files share.

pub(crate) mod attention;
mod linear;
mod rope;
mod rows;
mod transfer;

use std::sync::Arc;

use engine_core::{DType, Error, Result, Shape, Storage, Tensor};

use crate::ctx::{Bind, Ctx};

use crate::backend::GpuBackend;

/// Host copies of small `U32` uploads are kept so ids/indices can be range-checked without a
/// device round trip.
pub(crate) const SHADOW_MAX: usize = 1 << 16;

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

impl Chunk {
    /// This chunk's elements bound at `@binding(slot)` of a kernel: the buffer and the byte
    /// size always come from the same chunk.
    pub(crate) fn bind(&self, slot: u32) -> Bind<'_> {
        Bind(slot, &self.buf, self.bytes)
    }
}

/// GPU memory behind a [`Tensor`]: one buffer, or several (split by rows) when the tensor is
/// larger than one storage binding. Buffers return to the pool on drop.
pub struct GpuStorage {
    pub(crate) chunks: Vec<Chunk>,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) shadow: Option<Vec<u32>>,
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
pub(crate) fn dev_bytes(dtype: DType, n: usize) -> u64 {
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
pub(crate) fn not_quant(t: &Tensor, op: &'static str) -> Result<()> {
    match t.dtype() {
        d @ DType::Quant(_) => Err(Error::DType { op, dtype: d }),
        _ => Ok(()),
    }
}

pub(crate) fn st<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a GpuStorage> {
    t.storage_as::<GpuStorage>(op)
}

/// The single buffer of `t`; tensors split over several bindings only work in ops that
/// stream chunks (`linear`, `embedding`, `to_vec_*`).
pub(crate) fn one<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a Chunk> {
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

pub(crate) fn need(t: &Tensor, dtype: DType, op: &'static str) -> Result<()> {
    if t.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            dtype: t.dtype(),
        })
    }
}

pub(crate) fn need_float(t: &Tensor, op: &'static str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 => Ok(()),
        d => Err(Error::DType { op, dtype: d }),
    }
}

pub(crate) fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} {v} does not fit in 32 bits")))
}

impl GpuBackend {
    /// Workgroup grid for `groups` workgroups: x up to the per-dimension limit, then y.
    pub(crate) fn grid(&self, op: &'static str, groups: usize) -> Result<[u32; 3]> {
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

    pub(crate) fn wrap(&self, chunks: Vec<Chunk>, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let s = GpuStorage {
            chunks,
            ctx: self.ctx.clone(),
            shadow: None,
        };
        Tensor::from_storage(Arc::new(s), shape.into(), dtype)
    }

    /// A new single-buffer tensor (contents undefined: every op writes all of it).
    pub(crate) fn empty(
        &self,
        shape: impl Into<Shape>,
        dtype: DType,
        op: &'static str,
    ) -> Result<Tensor> {
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
}

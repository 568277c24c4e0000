//! Host memory behind a CPU tensor.

use std::any::Any;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{self, QuantType};
use crate::shape::Shape;
use crate::tensor::{Storage, Tensor};

/// The elements of a CPU tensor. F16 stays f16 in memory (weights of a 7B model would not
/// fit as f32); kernels convert on the fly.
pub(crate) enum CpuData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
    /// GGUF blocks of `len` weights (a whole number of blocks), decoded inside the kernels.
    Quant {
        qt: QuantType,
        bytes: Vec<u8>,
        len: usize,
    },
}

impl CpuData {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuData::F32(_) => DType::F32,
            CpuData::F16(_) => DType::F16,
            CpuData::U32(_) => DType::U32,
            CpuData::Quant { qt, .. } => DType::Quant(*qt),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CpuData::F32(v) => v.len(),
            CpuData::F16(v) => v.len(),
            CpuData::U32(v) => v.len(),
            CpuData::Quant { len, .. } => *len,
        }
    }

    /// The data as f32, or a dtype error naming `op`.
    pub(crate) fn f32s(&self, op: &'static str) -> Result<&[f32]> {
        match self {
            CpuData::F32(v) => Ok(v),
            other => Err(Error::DType {
                op,
                dtype: other.dtype(),
            }),
        }
    }

    /// The data as u32, or a dtype error naming `op`.
    pub(crate) fn u32s(&self, op: &'static str) -> Result<&[u32]> {
        match self {
            CpuData::U32(v) => Ok(v),
            other => Err(Error::DType {
                op,
                dtype: other.dtype(),
            }),
        }
    }

    /// A float matrix (f32 or f16), or a dtype error naming `op`.
    pub(crate) fn floats(&self, op: &'static str) -> Result<Floats<'_>> {
        match self {
            CpuData::F32(v) => Ok(Floats::F32(v)),
            CpuData::F16(v) => Ok(Floats::F16(v)),
            CpuData::Quant { qt, bytes, .. } => Ok(Floats::Quant(*qt, bytes)),
            CpuData::U32(_) => Err(Error::DType {
                op,
                dtype: DType::U32,
            }),
        }
    }
}

/// Borrowed float data that may be f16 (weights, embedding tables).
#[derive(Clone, Copy)]
pub(crate) enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// Quantized blocks; `read_into` dequantises the covering blocks.
    Quant(QuantType, &'a [u8]),
}

impl Floats<'_> {
    /// Copies `len` elements from `start` into `dst` as f32.
    #[inline]
    pub(crate) fn read_into(&self, start: usize, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let len = dst.len();
        match self {
            Floats::F32(v) => dst.copy_from_slice(&v[start..start + len]),
            // half converts with F16C/NEON when the CPU has it (runtime detection).
            Floats::F16(v) => v[start..start + len].convert_to_f32_slice(dst),
            Floats::Quant(qt, b) => {
                let (bs, bb) = (qt.block_size(), qt.block_bytes());
                if start.is_multiple_of(bs) && len.is_multiple_of(bs) {
                    // Whole blocks (every matmul tile and embedding row): the SIMD decoder.
                    let b0 = start / bs * bb;
                    super::simd::dequantize(*qt, &b[b0..b0 + len / bs * bb], dst)
                } else {
                    quant::dequantize_range(*qt, b, start, dst)
                }
            }
        }
    }
}

/// Storage of a CPU tensor. The lock exists for [`crate::Backend::write_rows`], the one op
/// that mutates a tensor (a KV cache) in place; every other op takes read locks.
pub struct CpuStorage {
    data: RwLock<CpuData>,
}

impl std::fmt::Debug for CpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the elements: weights are gigabytes.
        match self.data.try_read() {
            Ok(d) => write!(f, "CpuStorage {{ dtype: {}, len: {} }}", d.dtype(), d.len()),
            Err(_) => f.write_str("CpuStorage { <locked> }"),
        }
    }
}

impl Storage for CpuStorage {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn backend_name(&self) -> &'static str {
        "cpu"
    }
}

impl CpuStorage {
    pub(crate) fn read(&self) -> Result<RwLockReadGuard<'_, CpuData>> {
        self.data
            .read()
            .map_err(|_| Error::Device("cpu tensor lock poisoned by a panic".into()))
    }
    pub(crate) fn write(&self) -> Result<RwLockWriteGuard<'_, CpuData>> {
        self.data
            .write()
            .map_err(|_| Error::Device("cpu tensor lock poisoned by a panic".into()))
    }
}

/// The CPU storage of `t`, or `WrongBackend` naming `op`.
pub(crate) fn storage<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CpuStorage> {
    t.storage_as::<CpuStorage>(op)
}

/// Read access to the elements of `t`.
pub(crate) fn read<'a>(t: &'a Tensor, op: &'static str) -> Result<RwLockReadGuard<'a, CpuData>> {
    storage(t, op)?.read()
}

/// Wraps freshly computed data as a tensor (the caller guarantees the element count).
pub(crate) fn tensor(data: CpuData, shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    debug_assert_eq!(data.len(), shape.elem_count());
    let dtype = data.dtype();
    Tensor::from_storage(
        Arc::new(CpuStorage {
            data: RwLock::new(data),
        }),
        shape,
        dtype,
    )
}

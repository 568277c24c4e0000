//! The cheap-clone tensor handle.

use std::any::Any;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Shape;

/// Backend-owned memory behind a [`Tensor`]. Each backend downcasts to its own type.
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn as_any(&self) -> &dyn Any;
    /// Short name of the backend that owns this storage (for error messages).
    fn backend_name(&self) -> &'static str;
}

/// A contiguous row-major tensor on some device: shape, dtype and shared storage.
///
/// Cloning is cheap (an `Arc`). Tensors are values: ops return new tensors, except
/// [`crate::Backend::write_rows`], which writes into a preallocated cache tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    storage: Arc<dyn Storage>,
}

impl Tensor {
    /// Wraps backend storage. Backends call this; users get tensors from a backend.
    pub fn from_storage(storage: Arc<dyn Storage>, shape: Shape, dtype: DType) -> Self {
        Tensor {
            shape,
            dtype,
            storage,
        }
    }
    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }
    /// The backend-owned storage behind this handle.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    /// Downcasts the storage to a backend's concrete type.
    pub fn storage_as<S: 'static>(&self, op: &'static str) -> Result<&S> {
        self.storage
            .as_any()
            .downcast_ref::<S>()
            .ok_or(Error::WrongBackend { op })
    }
    /// Same data, new shape with the same element count (no copy).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {} as {}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            shape,
            dtype: self.dtype,
            storage: self.storage.clone(),
        })
    }
    /// `(rows, cols)` of a rank-2 tensor.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        self.shape.dims2(op)
    }
}

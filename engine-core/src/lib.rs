//! engine-core: the device-independent half of visi.
//!
//! Shapes, dtypes, the cheap [`Tensor`] handle, the object-safe [`Backend`] trait (one method
//! per op), typed [`Error`]s, and [`cpu::CpuBackend`], the plain-Rust f32 reference backend
//! that every GPU kernel is tested against and that also runs real models (`--device cpu`).

pub mod backend;
pub mod checks;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod files;
pub mod gguf;
pub mod quant;
pub mod shape;
pub mod tensor;
pub mod weights;

pub use backend::{
    AttentionMask, AttentionParams, Backend, DeviceInfo, HostData, MaskAction, MaskRule, MaskRules,
    RopeParams, MAX_MASK_RULES, OPEN_END,
};
pub use cpu::CpuBackend;
pub use dtype::DType;
pub use error::{Error, Result};
pub use quant::QuantType;
pub use shape::Shape;
pub use tensor::{Storage, Tensor};

//! Typed errors of the engine. Libraries return these; only the CLI and tests use anyhow.

use crate::dtype::DType;

/// Result with the engine's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure the engine reports, by kind (the CLI maps kinds to exit statuses).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// An op got a dtype it does not support.
    #[error("{op}: unsupported dtype {dtype}")]
    DType { op: &'static str, dtype: DType },

    /// A tensor made by one backend was handed to another.
    #[error("{op}: tensor belongs to another backend")]
    WrongBackend { op: &'static str },

    /// A tensor is larger than the device can hold.
    #[error("{what} needs {bytes} bytes, more than the device allows ({limit} bytes)")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// The device ran out of memory.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),

    /// The device was lost or failed in a way the engine cannot recover from.
    #[error("device failure: {0}")]
    Device(String),

    /// No usable adapter or device.
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),

    /// A weight is missing or does not match what the config says.
    #[error("tensor `{name}`: {msg}")]
    Weight { name: String, msg: String },

    /// A file could not be read or is malformed.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    /// Anything else about the input, with a message that says what.
    #[error("{0}")]
    Msg(String),

    /// An inconsistency inside the engine (a scheduler or pruner contract broken, a cache
    /// in a state it should never reach): a bug, not the user's input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Shape`] for `op`.
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    /// An [`Error::Weight`] naming the tensor.
    pub fn weight(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Weight {
            name: name.into(),
            msg: msg.into(),
        }
    }
    /// An [`Error::File`] naming the file.
    pub fn file(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
    /// An [`Error::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    /// An [`Error::Msg`].
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

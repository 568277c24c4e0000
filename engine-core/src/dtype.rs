//! Element types.

use crate::quant::QuantType;

/// Element type of a tensor as it lives on a device.
///
/// Activations are always `F32`. Weight matrices and embedding tables may be `F16`
/// (packed two to a 32-bit word on GPUs). `BF16` only exists as an *input* format: the
/// backends convert it when uploading (to `F16` when every value fits, else to `F32`).
/// `U32` holds token ids, indices and positions. `Quant` weight matrices `[N, K]` stay in
/// their GGUF block layout on the device and are dequantised inside the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    /// A block-quantized weight format (see [`QuantType`]).
    Quant(QuantType),
}

impl DType {
    /// Bytes per element; for a quantized type, bytes per *block* (see [`DType::bytes_for`]).
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Quant(q) => q.block_bytes(),
        }
    }

    /// Bytes that `n` elements occupy; `None` for a quantized type when `n` is not a whole
    /// number of blocks (or on overflow).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        match self {
            DType::Quant(q) => q.bytes_for(n),
            d => n.checked_mul(d.size_in_bytes()),
        }
    }

    /// Lower-case name as used in checkpoints and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::Quant(q) => q.name(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

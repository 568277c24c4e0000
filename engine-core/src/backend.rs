//! The object-safe backend trait: one method per op.
//!
//! Conventions shared by every backend (the CPU backend is the reference):
//! - Activations are `F32`, row-major, contiguous. "Rows" are the leading dimensions
//!   flattened, "columns" the last dimension.
//! - Weight matrices follow the checkpoint layout `[out_features, in_features]` and may be
//!   `F16`, `F32` or block-quantized (`DType::Quant`, both backends); `linear` computes `y = x·Wᵀ + b` accumulating in f32.
//! - Norm weights, biases, position tables: `F32`. Indices, token ids, positions: `U32`.
//! - Only `to_vec_*` (and `sync`) wait for the device; every other op only records work.

use half::{bf16, f16};

use crate::error::Result;
use crate::shape::Shape;
use crate::tensor::Tensor;
use crate::DType;

/// Host data to upload, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum HostData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// Converted on upload: to `F16` when every value is finite in f16, else to `F32`.
    BF16(&'a [bf16]),
    U32(&'a [u32]),
}

impl HostData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::U32(v) => v.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype of the data.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
            HostData::U32(_) => DType::U32,
        }
    }
}

/// What a backend runs on, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `"cpu"` or `"wgpu"`.
    pub backend: String,
    /// Adapter name (`"llvmpipe (LLVM 15.0.6, 256 bits)"`, `"NVIDIA H100"`, or the CPU).
    pub adapter: String,
    /// wgpu backend (`"vulkan"`, `"metal"`, `"dx12"`, `"gl"`) or `"native"` for the CPU.
    pub api: String,
    /// `"discrete"`, `"integrated"`, `"virtual"`, `"cpu"`, `"other"`.
    pub device_type: String,
    /// Largest single buffer the backend may allocate, in bytes.
    pub max_buffer_size: u64,
    /// Largest storage-buffer binding, in bytes (tensors above it are split internally).
    pub max_binding_size: u64,
    /// Whether f16 arithmetic in shaders is used.
    pub shader_f16: bool,
    /// Whether subgroup operations are used.
    pub subgroups: bool,
}

/// Rotary position embedding, HF "rotate half" convention.
///
/// For each head `x = [x1, x2]` (halves of `head_dim`), `inv_freq[i] = theta^(-2i/head_dim)`,
/// `angle = (pos / scaling_factor) * inv_freq[i]`, and
/// `out = [x1·cos − x2·sin, x2·cos + x1·sin]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    /// Per-head dimension (rotated in two halves).
    pub head_dim: usize,
    /// Rotary base (`rope_theta`).
    pub theta: f32,
    /// Linear rope scaling factor (1.0 when the config has none).
    pub scaling_factor: f32,
}

/// Post-softmax masks of VisiPruner's shallow stage (see shared/docs/visipruner.md).
///
/// `image_start..image_end` is the image span `[s, e)` in *cache row* coordinates (the same
/// coordinates as query rows `q_offset + i`). Probabilities are zeroed after the softmax
/// with no renormalisation; the zeroed value products are not computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionMask {
    /// Plain causal (or full) attention.
    #[default]
    None,
    /// Layer 0, policy `sink`: for every query row `i >= s`, probabilities on image keys are
    /// zeroed; for text queries (`i >= e`) their sum `S_i` is put back on key `s`.
    Layer0Sink {
        image_start: usize,
        image_end: usize,
    },
    /// Layer 0, policy `split`: image queries lose all image keys; text queries lose the
    /// first half of the image span (`[s, s + (e - s) / 2)`).
    Layer0Split {
        image_start: usize,
        image_end: usize,
    },
    /// Layers `0 < l < shallow_mid_layer`: text queries (`i >= e`) lose all image keys.
    TextToImage {
        image_start: usize,
        image_end: usize,
    },
}

impl AttentionMask {
    /// The image span `[s, e)` the mask acts on, if any.
    pub fn image_span(&self) -> Option<(usize, usize)> {
        match *self {
            AttentionMask::None => None,
            AttentionMask::Layer0Sink {
                image_start,
                image_end,
            }
            | AttentionMask::Layer0Split {
                image_start,
                image_end,
            }
            | AttentionMask::TextToImage {
                image_start,
                image_end,
            } => Some((image_start, image_end)),
        }
    }
}

/// Parameters of [`Backend::attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` under GQA).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Causal: query row `i` sits at cache row `q_offset + i` and sees keys `0..=q_offset+i`.
    /// Not causal (CLIP): every query sees all `kv_len` keys.
    pub causal: bool,
    /// Cache row of the first query (the number of rows cached before this call).
    pub q_offset: usize,
    /// Number of valid rows in `k`/`v` (the cache may be longer).
    pub kv_len: usize,
    /// Which keys each query may attend to.
    pub mask: AttentionMask,
}

/// One method per op. Object-safe: models hold `&dyn Backend` / `Arc<dyn Backend>`.
pub trait Backend: Send + Sync {
    /// What this backend runs on.
    fn device_info(&self) -> DeviceInfo;

    // ----- memory -----

    /// Uploads host data as a tensor of `shape` (element counts must agree).
    fn upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor>;
    /// Uploads a block-quantized weight matrix `[.., K]` in GGUF's layout (`K` a multiple of
    /// the block size, `bytes` exactly the blocks). Backends without quantized kernels
    /// answer `Error::DType`.
    fn upload_quant(&self, qt: crate::QuantType, bytes: &[u8], shape: Shape) -> Result<Tensor> {
        let _ = (bytes, shape);
        Err(crate::Error::DType {
            op: "upload_quant",
            dtype: DType::Quant(qt),
        })
    }
    /// A zero-filled tensor (used for KV caches).
    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor>;
    /// Reads an `F32` or `F16` tensor back as f32. Synchronises with the device.
    fn to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// Reads a `U32` tensor back. Synchronises with the device.
    fn to_vec_u32(&self, t: &Tensor) -> Result<Vec<u32>>;
    /// Submits recorded work and waits for it (for timing).
    fn sync(&self) -> Result<()>;

    // ----- linear algebra -----

    /// `x [.., K] f32`, `w [N, K] f16|f32`, `b [N] f32` → `[.., N]`: `y = x·Wᵀ + b`, f32
    /// accumulation. Backends pick a matrix-vector kernel when there are few rows.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;

    // ----- elementwise -----

    /// `a + b`; `b` has `a`'s shape or is a row `[N]` broadcast over `a`'s rows.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// `a * b`; same broadcasting as `add`.
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// GELU with erf (PyTorch `gelu`, approximate="none").
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    /// `x * sigmoid(1.702 x)` (CLIP).
    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor>;
    /// `silu(gate) * up`, same shapes.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    // ----- normalisation -----

    /// `x / sqrt(mean(x²) + eps) * w` over the last dim; `w [N] f32`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor>;
    /// `(x − mean) / sqrt(var + eps) * w + b` over the last dim (biased variance).
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor>;
    /// Softmax over the last dim.
    fn softmax(&self, x: &Tensor) -> Result<Tensor>;

    // ----- positions and attention -----

    /// Rotary embedding of `x [S, H*head_dim]` with explicit `positions [S] u32`.
    fn rope(&self, x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<Tensor>;
    /// Multi-head attention `softmax(q·kᵀ·scale + causal) · v`, probabilities in f32.
    ///
    /// `q [Sq, num_heads*head_dim]` f32; `k`, `v [L, num_kv_heads*head_dim]` f32 or f16 (a
    /// cache; scores, softmax and `P·V` accumulate in f32 either way) with `L >= kv_len`;
    /// query head `h` uses kv head `h / (num_heads / num_kv_heads)`.
    /// Returns `[Sq, num_heads*head_dim]`. The mask is applied as documented on
    /// [`AttentionMask`]; the full score matrix is never required to exist.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> Result<Tensor>;
    /// Attention probabilities of the *last* query row only: `[num_heads, kv_len]`, f32, with
    /// `p`'s causal rule and mask (used by pruning policies; small).
    fn attention_last_row(&self, q: &Tensor, k: &Tensor, p: &AttentionParams) -> Result<Tensor>;
    /// Per-token contributions to one query's attention output (VisiPruner middle/deep).
    ///
    /// `probs [num_heads, kv_len]` (from [`Backend::attention_last_row`]), `v [L, num_kv_heads*head_dim]`
    /// f32 or f16.
    /// With `c_j = concat_h(probs[h, j] · v_h[j])` and `o = Σ_{j<kv_len} c_j`, returns
    /// `[end - start, 2]`: for each key `j` in `start..end`, `[‖c_j‖₂, cos(o − c_j, o)]`.
    /// (cos is 1 when `o − c_j` or `o` is zero.)
    fn token_contributions(
        &self,
        probs: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        start: usize,
        end: usize,
    ) -> Result<Tensor>;

    // ----- gathers, copies, reductions -----

    /// Rows of a `[V, D] f16|f32` table for `ids [S] u32` → `[S, D] f32`.
    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor>;
    /// Rows of `x [M, N] f32` for `idx [R] u32` → `[R, N]` (hidden states of kept tokens).
    fn gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor>;
    /// Rows `start..start+len` of `x [M, N]` → `[len, N]`.
    fn slice_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor>;
    /// Concatenation along the first dimension; all parts share the trailing dims.
    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor>;
    /// Writes `src [R, N]` into rows `row..row+R` of `dst [L, N]` in place (KV cache append).
    /// Same dtypes, or `F32` rows into an `F16` tensor (an f16 KV cache; rounded to nearest).
    fn write_rows(&self, dst: &Tensor, row: usize, src: &Tensor) -> Result<()>;
    /// 2-D convolution with square kernel = stride = `patch`, no padding, no bias:
    /// `pixels [C, H, W] f32`, `w [D, C, patch, patch] f16|f32` → `[(H/patch)*(W/patch), D]`
    /// in row-major patch order.
    fn patch_embed(&self, pixels: &Tensor, w: &Tensor, patch: usize) -> Result<Tensor>;
    /// Index of the largest value of each row (first on ties): `x [M, N]` → `[M] u32`.
    fn argmax(&self, x: &Tensor) -> Result<Tensor>;
    /// Converts between `F32` and `F16`.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
}

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

/// What a mask rule does to the probabilities it covers (after the softmax, no
/// renormalisation; the zeroed `P·V` products are not computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaskAction {
    /// Zero them.
    #[default]
    Zero,
    /// Zero them and put their sum back on key `to` (VisiPruner's layer-0 sink).
    Sink {
        /// The key (cache row) that receives the sum; inside the rule's keys.
        to: usize,
    },
    /// Leave them as they are: a rule placed before broader ones carves keys or queries out
    /// of them (e.g. the text between two images out of a rule over both images' keys).
    Keep,
}

/// One attention-mask rule: queries at cache rows `queries` lose keys `keys` (half-open
/// ranges, ends clipped to what each query sees). For each (query, key) pair the first rule
/// covering it decides. This one definition is what the CPU backend, the WGSL kernels and
/// the FLOPs counter all read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MaskRule {
    /// Query cache rows `[start, end)`.
    pub queries: (usize, usize),
    /// Key cache rows `[start, end)`.
    pub keys: (usize, usize),
    /// Zero, or zero and redirect to a sink key.
    pub action: MaskAction,
}

impl MaskRule {
    /// Whether the rule covers query `row` and key `j`.
    pub fn covers(&self, row: usize, j: usize) -> bool {
        row >= self.queries.0 && row < self.queries.1 && j >= self.keys.0 && j < self.keys.1
    }
}

/// Most rules one attention call takes (the WGSL kernels test them without a loop).
/// Sixteen hold VisiPruner's shallow masks over five separate images (see
/// `pruner::ShallowMask::attention_mask_runs`).
pub const MAX_MASK_RULES: usize = 16;

/// Query rows "to the end of the sequence".
pub const OPEN_END: usize = u32::MAX as usize;

/// A list of mask rules (at most [`MAX_MASK_RULES`]; `Copy`, so parameters stay cheap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MaskRules {
    rules: [MaskRule; MAX_MASK_RULES],
    len: usize,
}

impl MaskRules {
    /// Rules from a slice; errors past [`MAX_MASK_RULES`], on reversed ranges, on a sink
    /// outside its keys, or on two sinks with different targets for one query row (a
    /// query redirects to one key at most).
    pub fn new(rules: &[MaskRule]) -> std::result::Result<Self, String> {
        if rules.len() > MAX_MASK_RULES {
            return Err(format!(
                "{} mask rules, at most {MAX_MASK_RULES}",
                rules.len()
            ));
        }
        for (i, r) in rules.iter().enumerate() {
            if r.queries.0 > r.queries.1 || r.keys.0 > r.keys.1 {
                return Err(format!("mask rule {i} has a reversed range"));
            }
            if let MaskAction::Sink { to } = r.action {
                if r.keys.0 < r.keys.1 && (to < r.keys.0 || to >= r.keys.1) {
                    return Err(format!("mask rule {i} sinks to key {to} outside its keys"));
                }
                for (k, o) in rules.iter().enumerate().take(i) {
                    if let MaskAction::Sink { to: t2 } = o.action {
                        let overlap = r.queries.0.max(o.queries.0) < r.queries.1.min(o.queries.1);
                        if overlap && t2 != to {
                            return Err(format!(
                                "mask rules {k} and {i} sink one query to two keys"
                            ));
                        }
                    }
                }
            }
        }
        let mut out = MaskRules::default();
        out.rules[..rules.len()].copy_from_slice(rules);
        out.len = rules.len();
        Ok(out)
    }

    /// The rules, in order.
    pub fn as_slice(&self) -> &[MaskRule] {
        &self.rules[..self.len]
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What happens to key `j` of the query at `row`: `None` keeps it.
    pub fn action(&self, row: usize, j: usize) -> Option<MaskAction> {
        self.as_slice()
            .iter()
            .find(|r| r.covers(row, j))
            .map(|r| r.action)
    }

    /// The key the query at `row` redirects its sunk probabilities to, if any.
    pub fn sink_target(&self, row: usize) -> Option<usize> {
        self.as_slice().iter().find_map(|r| match r.action {
            MaskAction::Sink { to }
                if row >= r.queries.0 && row < r.queries.1 && r.keys.0 < r.keys.1 =>
            {
                Some(to)
            }
            _ => None,
        })
    }
}

/// Post-softmax masks of VisiPruner's shallow stage (see shared/docs/visipruner.md), named;
/// [`AttentionMask::rules`] is their one definition as data, and `Rules` carries any other
/// method's rules.
///
/// `image_start..image_end` is the image span `[s, e)` in *cache row* coordinates (the same
/// coordinates as query rows `q_offset + i`). Probabilities are zeroed after the softmax
/// with no renormalisation; the zeroed value products are not computed.
// `Copy` keeps `AttentionParams` cheap to pass around; the rules variant is a few hundred
// bytes on the stack, once per attention call.
#[allow(clippy::large_enum_variant)]
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
    /// Explicit rules (another pruning method's masks).
    Rules(MaskRules),
}

impl AttentionMask {
    /// The image span `[s, e)` a named mask acts on, if any.
    pub fn image_span(&self) -> Option<(usize, usize)> {
        match *self {
            AttentionMask::None | AttentionMask::Rules(_) => None,
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

    /// The mask as rules: the single definition every backend and the FLOPs counter use.
    pub fn rules(&self) -> MaskRules {
        let zero = |queries, keys| MaskRule {
            queries,
            keys,
            action: MaskAction::Zero,
        };
        let none = MaskRule::default();
        let (list, n) = match *self {
            AttentionMask::None => ([none; 2], 0),
            AttentionMask::Rules(r) => return r,
            // An empty span has no image probabilities to move.
            AttentionMask::Layer0Sink {
                image_start: s,
                image_end: e,
            } if s < e => (
                [
                    zero((s, e), (s, e)),
                    MaskRule {
                        queries: (e, OPEN_END),
                        keys: (s, e),
                        action: MaskAction::Sink { to: s },
                    },
                ],
                2,
            ),
            AttentionMask::Layer0Split {
                image_start: s,
                image_end: e,
            } => (
                [
                    zero((s, e), (s, e)),
                    zero((e, OPEN_END), (s, s + (e - s) / 2)),
                ],
                2,
            ),
            AttentionMask::TextToImage {
                image_start: s,
                image_end: e,
            } => ([zero((e, OPEN_END), (s, e)), none], 1),
            AttentionMask::Layer0Sink { .. } => ([none; 2], 0),
        };
        let mut out = MaskRules::default();
        out.rules[..n].copy_from_slice(&list[..n]);
        out.len = n;
        out
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
    /// [`AttentionMask`]; the full score matrix is never required to exist. A query's row
    /// must not depend on how many queries the call holds (one query in decode gives the
    /// bits it gets inside a prefill), which prefix reuse and batched decode rely on.
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
    /// The most rows a [`Backend::linear`] call may have for every row's result to be the
    /// same bits as that row computed alone (its few-rows, decode kernels; calls with more
    /// rows run kernels whose rows are independent of the row count too, but round
    /// differently). Batched decode steps put at most this many sequences in one call, so a
    /// sequence's tokens never depend on what runs beside it.
    fn linear_batch_rows(&self) -> usize {
        1
    }
    /// The fewest rows from which every [`Backend::linear`] call gives each row the same
    /// bits whatever the row count (its many-rows, prefill kernels). Prefill pads smaller
    /// calls up to it, so a follow-up turn that adds a few tokens computes them exactly as
    /// a fresh prefill of the whole prompt does.
    fn linear_prefill_rows(&self) -> usize {
        1
    }
    /// Converts between `F32` and `F16`.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
}

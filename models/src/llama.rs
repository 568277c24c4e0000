//! The Llama decoder (`LlamaForCausalLM`) and its layer scheduler.
//!
//! Prefill runs the decoder layer by layer. Before each layer the pruner says which
//! shallow mask applies and what must be captured; after it, the pruner may return the
//! image tokens to keep, and the scheduler gathers the hidden states (and the position
//! ids, which stay the unpruned ones) so every later layer, and its KV cache, holds only
//! those rows.

use engine_core::weights::Weights;
use engine_core::{AttentionMask, AttentionParams, Backend, HostData, Result, RopeParams, Tensor};
use engine_core::{DType, Error};
use pruner::{Capture, ShallowMask};

use crate::config::TextConfig;
use crate::nn::{Linear, RmsNorm};

struct LlamaLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// The decoder: embeddings, layers, final norm and lm_head.
pub struct Llama {
    cfg: TextConfig,
    embed_tokens: Tensor, // [V, H]
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
    lm_head: Tensor, // [V, H] (the embedding table when tied)
}

/// One layer's KV cache: `[capacity, kv_heads*head_dim]` keys and values, `len` rows valid.
pub struct LayerKv {
    /// Keys `[capacity, kv_heads * head_dim]` in the cache's dtype (f16 or f32).
    pub k: Tensor,
    /// Values `[capacity, kv_heads * head_dim]` in the cache's dtype.
    pub v: Tensor,
    /// Rows filled.
    pub len: usize,
    /// Rows allocated.
    pub capacity: usize,
}

impl LayerKv {
    /// Zeroed keys and values for `capacity` rows of width `kv_dim`, stored as `dtype`
    /// (`F16` or `F32`).
    pub fn new(b: &dyn Backend, capacity: usize, kv_dim: usize, dtype: DType) -> Result<Self> {
        let shape = engine_core::Shape::from((capacity, kv_dim));
        Ok(LayerKv {
            k: b.zeros(shape.clone(), dtype)?,
            v: b.zeros(shape, dtype)?,
            len: 0,
            capacity,
        })
    }

    /// Grows the cache (doubling, at least to `rows`) so it holds `rows` rows; the valid
    /// rows are copied on the device.
    pub fn reserve(&mut self, b: &dyn Backend, rows: usize) -> Result<()> {
        if rows <= self.capacity {
            return Ok(());
        }
        let cap = rows.max(self.capacity.saturating_mul(2));
        let width = self.k.dims()[1];
        let mut grown = LayerKv::new(b, cap, width, self.k.dtype())?;
        if self.len > 0 {
            b.write_rows(&grown.k, 0, &b.slice_rows(&self.k, 0, self.len)?)?;
            b.write_rows(&grown.v, 0, &b.slice_rows(&self.v, 0, self.len)?)?;
        }
        grown.len = self.len;
        *self = grown;
        Ok(())
    }
}

/// Per-layer KV caches; each layer's length is what that layer processed.
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
    /// Element type of the layers' K and V: `F16` (the default: half the bytes; the
    /// backends' attention reads it and keeps scores and softmax in f32) or `F32`.
    pub dtype: DType,
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache::new(DType::F16)
    }
}

impl KvCache {
    /// An empty cache whose layers will hold K and V as `dtype` (`F16` or `F32`).
    pub fn new(dtype: DType) -> Self {
        KvCache {
            layers: Vec::new(),
            dtype,
        }
    }
    /// Rows held per layer.
    pub fn lens(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.len).collect()
    }
    /// Bytes of keys and values actually held (valid rows, in the cache's dtype).
    pub fn bytes_used(&self, kv_dim: usize) -> u64 {
        self.layers
            .iter()
            .map(|l| (2 * l.len * kv_dim * self.dtype.size_in_bytes()) as u64)
            .sum()
    }
}

/// What prefill did, for reports and decode.
#[derive(Clone, Debug, Default)]
pub struct PrefillStats {
    /// Sequence length each layer processed.
    pub layer_seq_lens: Vec<usize>,
    /// Image tokens each layer processed.
    pub layer_image_lens: Vec<usize>,
    /// Shallow mask each layer ran with.
    pub layer_masks: Vec<ShallowMask>,
    /// Each layer's image rows (cache rows) as ascending runs `[start, end)`, one per image
    /// still holding tokens (what its mask and captures acted on).
    pub layer_image_runs: Vec<Vec<(usize, usize)>>,
}

/// Where the image sits in the prompt: rows `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    /// First image token position.
    pub start: usize,
    /// One past the last image token position.
    pub end: usize,
}

impl Llama {
    /// Loads a Llama decoder: `model` holds `embed_tokens`, `layers.N`, `norm`;
    /// `lm_head` holds `weight` (absent when embeddings are tied).
    pub fn load(model: &Weights, lm_head: &Weights, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let embed_tokens = model.get("embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let w = model.pp(format!("layers.{l}"));
            let a = w.pp("self_attn");
            let m = w.pp("mlp");
            layers.push(LlamaLayer {
                input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                q_proj: Linear::load(&a.pp("q_proj"), h, q_dim, cfg.attention_bias)?,
                k_proj: Linear::load(&a.pp("k_proj"), h, kv_dim, cfg.attention_bias)?,
                v_proj: Linear::load(&a.pp("v_proj"), h, kv_dim, cfg.attention_bias)?,
                o_proj: Linear::load(&a.pp("o_proj"), q_dim, h, cfg.attention_bias)?,
                post_attention_layernorm: RmsNorm::load(
                    &w.pp("post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                gate_proj: Linear::load(&m.pp("gate_proj"), h, i, cfg.mlp_bias)?,
                up_proj: Linear::load(&m.pp("up_proj"), h, i, cfg.mlp_bias)?,
                down_proj: Linear::load(&m.pp("down_proj"), i, h, cfg.mlp_bias)?,
            });
        }
        let norm = RmsNorm::load(&model.pp("norm"), h, cfg.rms_norm_eps)?;
        let lm_head = if lm_head.contains("weight") {
            lm_head.get("weight", &[cfg.vocab_size, h])?
        } else if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            return Err(Error::weight(
                lm_head.full_name("weight"),
                "missing (and tie_word_embeddings is false)",
            ));
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The decoder's hyper-parameters.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings: `ids` → `[S, H]`.
    pub fn embed(&self, b: &dyn Backend, ids: &[u32]) -> Result<Tensor> {
        let ids = b.upload(HostData::U32(ids), ids.len().into())?;
        b.embedding(&self.embed_tokens, &ids)
    }

    fn kv_dim(&self) -> usize {
        self.cfg.num_key_value_heads * self.cfg.head_dim
    }

    fn attn_params(&self, q_offset: usize, kv_len: usize, mask: AttentionMask) -> AttentionParams {
        AttentionParams {
            num_heads: self.cfg.num_attention_heads,
            num_kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            scale: (self.cfg.head_dim as f32).powf(-0.5),
            causal: true,
            q_offset,
            kv_len,
            mask,
        }
    }

    fn rope(&self) -> RopeParams {
        RopeParams {
            head_dim: self.cfg.head_dim,
            theta: self.cfg.rope_theta,
            scaling_factor: self.cfg.rope_scaling_factor,
        }
    }

    /// One decoder layer over `h [S, H]` whose rows sit at cache rows `kv.len..kv.len+S`.
    /// Returns the new hidden states and, when asked, the captured pruning data.
    // The arguments are the layer's inputs as the paper writes them; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward(
        &self,
        b: &dyn Backend,
        layer: usize,
        h: &Tensor,
        positions: &Tensor,
        kv: &mut LayerKv,
        mask: AttentionMask,
        capture: Option<(Capture, &[(usize, usize)])>,
    ) -> Result<(Tensor, Captured)> {
        let s = h.dims()[0];
        // Prefill rows always take the backend's many-rows kernels (see `Rows::Prefill`).
        let rows = Rows::Prefill(b.linear_prefill_rows());
        let (q, k, v) = self.qkv(b, layer, h, positions, rows)?;
        kv.reserve(b, kv.len + s)?;
        b.write_rows(&kv.k, kv.len, &k)?;
        b.write_rows(&kv.v, kv.len, &v)?;
        let params = self.attn_params(kv.len, kv.len + s, mask);
        // A query's result does not depend on how many queries the call holds (the
        // backends' attention contract, engine-wgpu/tests/batch.rs), so a follow-up's one
        // new row equals the same row of a fresh prefill.
        let attn = b.attention(&q, &kv.k, &kv.v, &params)?; // [S, heads*hd]
                                                            // Image rows come in runs (one per image span still holding tokens): statistics are
                                                            // taken per run and concatenated in row order, which is the pruner's offset order.
        let captured = match capture {
            None | Some((Capture::Nothing, _)) => Captured::None,
            Some((Capture::Contributions, runs)) => {
                let probs = b.attention_last_row(&q, &kv.k, &params)?; // [heads, kv_len]
                let mut out = Vec::new();
                for &(start, end) in runs {
                    let stats = b.token_contributions(&probs, &kv.v, &params, start, end)?; // [n, 2]
                    let stats = b.to_vec_f32(&stats)?; // sync: small, per decision layer
                    out.extend(stats.chunks_exact(2).map(|c| (c[0], c[1])));
                }
                Captured::Contributions(out)
            }
            Some((Capture::LastRowProbs, runs)) => {
                let probs = b.attention_last_row(&q, &kv.k, &params)?; // [heads, kv_len]
                let probs = b.to_vec_f32(&probs)?; // sync: heads × kv_len floats, once
                let heads = self.cfg.num_attention_heads;
                let len = params.kv_len;
                let avg = runs
                    .iter()
                    .flat_map(|&(start, end)| start..end)
                    .map(|j| (0..heads).map(|hh| probs[hh * len + j]).sum::<f32>() / heads as f32)
                    .collect();
                Captured::LastRowImageAttention(avg)
            }
        };
        kv.len += s;
        Ok((self.finish_layer(b, layer, h, &attn, rows)?, captured))
    }

    /// The input norm, Q/K/V projections and RoPE of one layer over `h [S, H]`, every row
    /// at its own position: `(q [S, heads*hd], k, v [S, kv_heads*hd])`.
    fn qkv(
        &self,
        b: &dyn Backend,
        layer: usize,
        h: &Tensor,
        positions: &Tensor,
        rows: Rows,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let layer = &self.layers[layer];
        let x = layer.input_layernorm.forward(b, h)?;
        let s = x.dims()[0];
        let xp = rows.pad(b, &x)?;
        let q = rows.unpad(b, layer.q_proj.forward(b, &xp)?, s)?; // [S, heads*hd]
        let k = rows.unpad(b, layer.k_proj.forward(b, &xp)?, s)?; // [S, kv_heads*hd]
        let v = rows.unpad(b, layer.v_proj.forward(b, &xp)?, s)?; // [S, kv_heads*hd]
        let q = b.rope(&q, positions, &self.rope())?;
        let k = b.rope(&k, positions, &self.rope())?;
        Ok((q, k, v))
    }

    /// The rest of one layer after attention: output projection, residual, MLP, residual.
    fn finish_layer(
        &self,
        b: &dyn Backend,
        layer: usize,
        h: &Tensor,
        attn: &Tensor,
        rows: Rows,
    ) -> Result<Tensor> {
        let layer = &self.layers[layer];
        let s = h.dims()[0];
        let o = rows.unpad(b, layer.o_proj.forward(b, &rows.pad(b, attn)?)?, s)?; // [S, H]
        let h = b.add(h, &o)?;
        let x = layer.post_attention_layernorm.forward(b, &h)?;
        // Padded once for gate and up; the padded rows of `m` are dropped after down.
        let xp = rows.pad(b, &x)?;
        let m = match rows {
            // A decode step's few rows always fit one binding.
            Rows::Decode => self.mlp(b, layer, &xp)?,
            Rows::Prefill(_) => self.mlp_in_blocks(b, layer, &xp, rows)?,
        };
        let m = rows.unpad(b, m, s)?; // [S, H]
        b.add(&h, &m)
    }

    /// [`Self::mlp`] over prefill rows `xp [S', H]` in row blocks whose [rows, I] f32
    /// intermediates fit one binding of the backend (lavapipe's 128 MiB holds 2,340 rows of
    /// Mistral-7B's 14,336: LLaVA-NeXT prompts run longer). Rows of the MLP are independent
    /// and every block keeps at least the prefill class's rows, so the blocks give each row
    /// the bits of one call.
    fn mlp_in_blocks(
        &self,
        b: &dyn Backend,
        layer: &LlamaLayer,
        xp: &Tensor,
        rows: Rows,
    ) -> Result<Tensor> {
        let sp = xp.dims()[0];
        let width = (self.cfg.intermediate_size * 4).max(1) as u64;
        let block = ((b.device_info().max_binding_size / width) as usize)
            .max(rows.min_rows())
            .max(1);
        if sp <= block {
            return self.mlp(b, layer, xp);
        }
        let mut parts = Vec::with_capacity(sp.div_ceil(block));
        for r0 in (0..sp).step_by(block) {
            let n = block.min(sp - r0);
            // A short last block is padded back into the prefill class.
            let xb = rows.pad(b, &b.slice_rows(xp, r0, n)?)?;
            parts.push(rows.unpad(b, self.mlp(b, layer, &xb)?, n)?);
        }
        b.concat_rows(&parts.iter().collect::<Vec<_>>())
    }

    /// `down(silu(gate(x)) * up(x))` of one layer over `x [S, H]`.
    fn mlp(&self, b: &dyn Backend, layer: &LlamaLayer, x: &Tensor) -> Result<Tensor> {
        let g = layer.gate_proj.forward(b, x)?; // [S, I]
        let u = layer.up_proj.forward(b, x)?; // [S, I]
        let m = b.silu_mul(&g, &u)?;
        layer.down_proj.forward(b, &m)
    }

    /// One decode step of one layer for `B` independent sequences: row `i` of `h [B, H]` is
    /// sequence `i`'s next token at `positions[i]`, appended to `kvs[i]`. The projections
    /// and the MLP run as one `M = B` matmul (the weights are read once); each row attends
    /// only to its own cache, unmasked. Row `i`'s result equals a step of sequence `i` alone
    /// as long as the backend's `linear` gives a row the same result whatever M is (the
    /// batch-invariance contract, tested per backend).
    pub(crate) fn layer_step_rows(
        &self,
        b: &dyn Backend,
        layer: usize,
        h: &Tensor,
        positions: &Tensor,
        kvs: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let n = h.dims()[0];
        if n != kvs.len() || n == 0 {
            return Err(Error::internal(format!(
                "batched step: {n} rows for {} caches",
                kvs.len()
            )));
        }
        let (q, k, v) = self.qkv(b, layer, h, positions, Rows::Decode)?;
        // The new K/V rows rounded to each cache's element type once for the whole batch
        // (an elementwise cast: row i's bits are those of casting row i alone), instead of
        // one cast per sequence: a dispatch costs the same for 1 row as for 8 on llvmpipe.
        let mut cast: Vec<(DType, Tensor, Tensor)> = Vec::new();
        for kv in kvs.iter() {
            let dt = kv.k.dtype();
            if !cast.iter().any(|c| c.0 == dt) {
                let (kc, vc) = if dt == k.dtype() {
                    (k.clone(), v.clone())
                } else {
                    (b.cast(&k, dt)?, b.cast(&v, dt)?)
                };
                cast.push((dt, kc, vc));
            }
        }
        let mut parts = Vec::with_capacity(n);
        for (i, kv) in kvs.iter_mut().enumerate() {
            let row = |t: &Tensor| {
                if n == 1 {
                    Ok(t.clone())
                } else {
                    b.slice_rows(t, i, 1)
                }
            };
            let dt = kv.k.dtype();
            let (_, kc, vc) = cast
                .iter()
                .find(|c| c.0 == dt)
                .ok_or_else(|| Error::internal("batched step: no cast rows"))?;
            let (qi, ki, vi) = (row(&q)?, row(kc)?, row(vc)?);
            kv.reserve(b, kv.len + 1)?;
            b.write_rows(&kv.k, kv.len, &ki)?;
            b.write_rows(&kv.v, kv.len, &vi)?;
            let params = self.attn_params(kv.len, kv.len + 1, AttentionMask::None);
            parts.push(b.attention(&qi, &kv.k, &kv.v, &params)?); // [1, heads*hd]
            kv.len += 1;
        }
        let attn = if n == 1 {
            parts
                .pop()
                .ok_or_else(|| Error::internal("batched step: no rows"))?
        } else {
            let refs: Vec<&Tensor> = parts.iter().collect();
            b.concat_rows(&refs)? // [B, heads*hd]
        };
        self.finish_layer(b, layer, h, &attn, Rows::Decode)
    }

    /// An empty KV cache for one layer with room for `capacity` rows of `dtype`.
    pub(crate) fn new_layer_kv(
        &self,
        b: &dyn Backend,
        capacity: usize,
        dtype: DType,
    ) -> Result<LayerKv> {
        LayerKv::new(b, capacity.max(1), self.kv_dim(), dtype)
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Final norm and lm_head over the last row of `h [S, H]`: logits `[1, V]`.
    pub(crate) fn logits_last(&self, b: &dyn Backend, h: &Tensor) -> Result<Tensor> {
        let last = h.dims()[0] - 1;
        let x = b.slice_rows(h, last, 1)?; // [1, H]
        self.logits_rows(b, &x)
    }

    /// Final norm and lm_head over every row of `h [B, H]`: logits `[B, V]`.
    pub(crate) fn logits_rows(&self, b: &dyn Backend, h: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(b, h)?;
        b.linear(&x, &self.lm_head, None)
    }

    /// Bytes per cached row across K and V of one layer, for a cache of `dtype`.
    pub fn kv_row_bytes(&self, dtype: DType) -> usize {
        2 * self.kv_dim() * dtype.size_in_bytes()
    }
}

/// Which of the backend's `linear` kernel classes a layer's rows take. A backend gives a
/// row the same bits for any row count up to [`Backend::linear_batch_rows`] (its decode
/// kernels) and for any row count from [`Backend::linear_prefill_rows`] on (its prefill
/// kernels), but the classes round differently. Prefill rows therefore always take the many-rows class, padded with
/// zero rows when there are few (a follow-up turn that adds three tokens computes them
/// exactly as the fresh run over the whole conversation does), and decode rows always the
/// few-rows class (a batched step is grouped to fit it).
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// At least this many rows per `linear` call.
    Prefill(usize),
    /// As they come (at most `linear_batch_rows` per call).
    Decode,
}

impl Rows {
    /// The fewest rows a `linear` call of the class takes (1 for decode).
    fn min_rows(self) -> usize {
        match self {
            Rows::Prefill(min) => min,
            Rows::Decode => 1,
        }
    }

    /// `x [S, C]` with zero rows appended up to the class's minimum.
    fn pad(self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let s = x.dims()[0];
        match self {
            Rows::Prefill(min) if s < min => {
                let z = b.zeros((min - s, x.dims()[1]).into(), DType::F32)?;
                b.concat_rows(&[x, &z])
            }
            _ => Ok(x.clone()),
        }
    }

    /// The first `s` rows of `y` (dropping what [`Rows::pad`] added).
    fn unpad(self, b: &dyn Backend, y: Tensor, s: usize) -> Result<Tensor> {
        if y.dims()[0] == s {
            Ok(y)
        } else {
            b.slice_rows(&y, 0, s)
        }
    }
}

/// What a layer captured for the pruner.
pub(crate) enum Captured {
    None,
    Contributions(Vec<(f32, f32)>),
    LastRowImageAttention(Vec<f32>),
}

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
use pruner::{Action, Capture, LayerView, Pruner, ShallowMask};

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
    /// Keys `[capacity, kv_heads * head_dim]` f32.
    pub k: Tensor,
    /// Values `[capacity, kv_heads * head_dim]` f32.
    pub v: Tensor,
    /// Rows filled.
    pub len: usize,
    /// Rows allocated.
    pub capacity: usize,
}

/// Per-layer KV caches; each layer's length is what that layer processed.
#[derive(Default)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Rows held per layer.
    pub fn lens(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.len).collect()
    }
    /// Bytes of keys and values actually held (valid rows, f32).
    pub fn bytes_used(&self, kv_dim: usize) -> u64 {
        self.layers
            .iter()
            .map(|l| (2 * l.len * kv_dim * 4) as u64)
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

    /// Token embeddings of `ids` with `image [N, H]` spliced over `span` (which must hold
    /// exactly N positions inside the prompt): `[S, H]`.
    pub fn embed_with_image(
        &self,
        b: &dyn Backend,
        ids: &[u32],
        span: ImageSpan,
        image: &Tensor,
    ) -> Result<Tensor> {
        self.embed_with_images(b, ids, &[span], &[image])
    }

    /// Token embeddings of `ids` with `images[i] [N_i, H]` spliced over `spans[i]` (in
    /// prompt order, not overlapping, each holding exactly its N_i positions): `[S, H]`.
    pub fn embed_with_images(
        &self,
        b: &dyn Backend,
        ids: &[u32],
        spans: &[ImageSpan],
        images: &[&Tensor],
    ) -> Result<Tensor> {
        if spans.len() != images.len() {
            return Err(Error::msg(format!(
                "{} image spans but {} images",
                spans.len(),
                images.len()
            )));
        }
        let mut parts = Vec::with_capacity(2 * spans.len() + 1);
        let mut at = 0;
        for (span, image) in spans.iter().zip(images) {
            let n = image.dims()[0];
            if span.start < at || span.end - span.start != n || span.end > ids.len() {
                return Err(Error::msg(format!(
                    "image span {}..{} does not hold the {n} image embeddings (prompt of {} tokens)",
                    span.start,
                    span.end,
                    ids.len()
                )));
            }
            if span.start > at {
                parts.push(self.embed(b, &ids[at..span.start])?); // [s, H]
            }
            parts.push((*image).clone()); // [N, H]
            at = span.end;
        }
        if at < ids.len() || parts.is_empty() {
            parts.push(self.embed(b, &ids[at..])?); // [S - e, H]
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        b.concat_rows(&refs) // [S, H]
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
    fn layer_forward(
        &self,
        b: &dyn Backend,
        layer: &LlamaLayer,
        h: &Tensor,
        positions: &Tensor,
        kv: &mut LayerKv,
        mask: AttentionMask,
        capture: Option<(Capture, &[(usize, usize)])>,
    ) -> Result<(Tensor, Captured)> {
        let s = h.dims()[0];
        let x = layer.input_layernorm.forward(b, h)?;
        let q = layer.q_proj.forward(b, &x)?; // [S, heads*hd]
        let k = layer.k_proj.forward(b, &x)?; // [S, kv_heads*hd]
        let v = layer.v_proj.forward(b, &x)?; // [S, kv_heads*hd]
        let q = b.rope(&q, positions, &self.rope())?;
        let k = b.rope(&k, positions, &self.rope())?;
        if kv.len + s > kv.capacity {
            return Err(Error::msg(format!(
                "KV cache full: {} + {s} rows > capacity {}",
                kv.len, kv.capacity
            )));
        }
        b.write_rows(&kv.k, kv.len, &k)?;
        b.write_rows(&kv.v, kv.len, &v)?;
        let params = self.attn_params(kv.len, kv.len + s, mask);
        let attn = b.attention(&q, &kv.k, &kv.v, &params)?; // [S, heads*hd]
                                                            // Image rows come in runs (one per image span still holding tokens); statistics are
                                                            // taken per run and concatenated, in row order, which is the pruner's offset order.
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
        let o = layer.o_proj.forward(b, &attn)?; // [S, H]
        let h = b.add(h, &o)?;
        let x = layer.post_attention_layernorm.forward(b, &h)?;
        let g = layer.gate_proj.forward(b, &x)?; // [S, I]
        let u = layer.up_proj.forward(b, &x)?; // [S, I]
        let m = b.silu_mul(&g, &u)?;
        let m = layer.down_proj.forward(b, &m)?; // [S, H]
        Ok((b.add(&h, &m)?, captured))
    }

    fn new_layer_kv(&self, b: &dyn Backend, capacity: usize) -> Result<LayerKv> {
        let shape = engine_core::Shape::from((capacity, self.kv_dim()));
        Ok(LayerKv {
            k: b.zeros(shape.clone(), DType::F32)?,
            v: b.zeros(shape, DType::F32)?,
            len: 0,
            capacity,
        })
    }

    /// Runs the prompt `embeds [S, H]` through every layer with `pruner` driving the
    /// schedule; fills `cache` (one entry per layer, `extra` free rows for decode) and
    /// returns the logits of the last prompt position `[1, V]`. `images` are the image
    /// spans in prompt order: the pruner sees every position of every span as one list of
    /// image tokens (offsets `0..Σ len` in prompt order).
    pub fn prefill(
        &self,
        b: &dyn Backend,
        embeds: &Tensor,
        images: &[ImageSpan],
        pruner: &mut dyn Pruner,
        cache: &mut KvCache,
        extra: usize,
    ) -> Result<(Tensor, PrefillStats)> {
        self.prefill_observed(b, embeds, images, pruner, cache, extra, &mut |_| Ok(()))
    }

    /// [`Llama::prefill`] calling `after_layer(l)` once layer `l` (and any gather the
    /// pruner asked for after it) has been recorded; benchmarks sync there to time layers.
    // prefill's arguments plus the observer; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_observed(
        &self,
        b: &dyn Backend,
        embeds: &Tensor,
        images: &[ImageSpan],
        pruner: &mut dyn Pruner,
        cache: &mut KvCache,
        extra: usize,
        after_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<(Tensor, PrefillStats)> {
        let seq = embeds.dims()[0];
        let mut h = embeds.clone();
        let mut positions: Vec<u32> = (0..seq as u32).collect();
        let mut pos_t = b.upload(HostData::U32(&positions), seq.into())?;
        let mut at = 0;
        for sp in images {
            if sp.start < at || sp.end < sp.start || sp.end > seq {
                return Err(Error::msg(format!(
                    "image span {}..{} is out of order or outside the prompt of {seq} tokens",
                    sp.start, sp.end
                )));
            }
            at = sp.end;
        }
        let has_image = !images.is_empty();
        // Original offsets (over all spans, in prompt order) of the image rows still present,
        // and the rows of the current sequence they sit at (both ascending).
        let mut img_rows: Vec<usize> = images.iter().flat_map(|sp| sp.start..sp.end).collect();
        let mut img: Vec<usize> = (0..img_rows.len()).collect();
        let mut stats = PrefillStats::default();
        cache.layers.clear();
        for (l, layer) in self.layers.iter().enumerate() {
            let cur = h.dims()[0];
            let n_img = img.len();
            let (mask_kind, capture) = if has_image && n_img > 0 {
                (pruner.mask(l), pruner.capture(l))
            } else {
                (ShallowMask::None, Capture::Nothing)
            };
            let runs = row_runs(&img_rows);
            let span = match runs[..] {
                [] => (cur, cur),
                [one] => one,
                _ if mask_kind == ShallowMask::None => (cur, cur),
                _ => {
                    return Err(Error::msg(format!(
                        "layer {l}: shallow attention masks over {} separate image spans are not implemented (prune with a method without shallow masks, e.g. FastV, or one image)",
                        runs.len()
                    )))
                }
            };
            let mask = match mask_kind {
                ShallowMask::None => AttentionMask::None,
                ShallowMask::Layer0Sink => AttentionMask::Layer0Sink {
                    image_start: span.0,
                    image_end: span.1,
                },
                ShallowMask::Layer0Split => AttentionMask::Layer0Split {
                    image_start: span.0,
                    image_end: span.1,
                },
                ShallowMask::TextToImage => AttentionMask::TextToImage {
                    image_start: span.0,
                    image_end: span.1,
                },
            };
            let mut kv = self.new_layer_kv(b, cur + extra)?;
            let (nh, captured) =
                self.layer_forward(b, layer, &h, &pos_t, &mut kv, mask, Some((capture, &runs)))?;
            cache.layers.push(kv);
            h = nh;
            stats.layer_seq_lens.push(cur);
            stats.layer_image_lens.push(n_img);
            stats.layer_masks.push(mask_kind);
            if !has_image || n_img == 0 {
                after_layer(l)?;
                continue;
            }
            let (contributions, last_row) = match &captured {
                Captured::None => (None, None),
                Captured::Contributions(c) => (Some(c.as_slice()), None),
                Captured::LastRowImageAttention(a) => (None, Some(a.as_slice())),
            };
            let view = LayerView {
                layer: l,
                num_layers: self.layers.len(),
                image_tokens: &img,
                contributions,
                last_row_image_attention: last_row,
            };
            let action = pruner
                .after_layer(&view)
                .map_err(|e| Error::msg(e.to_string()))?;
            if let Action::Keep(keep) = action {
                // Rows of the current sequence to keep: every text row, the kept image rows.
                let mut keep_row = vec![true; cur];
                for &r in &img_rows {
                    keep_row[r] = false;
                }
                for off in &keep {
                    let i = img.binary_search(off).map_err(|_| {
                        Error::msg(format!(
                            "pruner kept image token {off}, which layer {l} did not hold"
                        ))
                    })?;
                    keep_row[img_rows[i]] = true;
                }
                let mut is_image = vec![false; cur];
                for &r in &img_rows {
                    is_image[r] = true;
                }
                let rows: Vec<u32> = (0..cur)
                    .filter(|&r| keep_row[r])
                    .map(|r| r as u32)
                    .collect();
                img_rows = rows
                    .iter()
                    .enumerate()
                    .filter(|(_, &r)| is_image[r as usize])
                    .map(|(i, _)| i)
                    .collect();
                let idx = b.upload(HostData::U32(&rows), rows.len().into())?;
                h = b.gather_rows(&h, &idx)?; // [S', H]
                positions = rows.iter().map(|&r| positions[r as usize]).collect();
                pos_t = b.upload(HostData::U32(&positions), positions.len().into())?;
                img = keep;
            }
            after_layer(l)?;
        }
        let last = h.dims()[0] - 1;
        let x = b.slice_rows(&h, last, 1)?; // [1, H]
        let x = self.norm.forward(b, &x)?;
        let logits = b.linear(&x, &self.lm_head, None)?; // [1, V]
        Ok((logits, stats))
    }

    /// One decode step for `token` at unpruned `position`: every layer attends to its own
    /// cache (no masks). Returns logits `[1, V]`.
    pub fn decode_step(
        &self,
        b: &dyn Backend,
        token: u32,
        position: u32,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let mut h = self.embed(b, &[token])?; // [1, H]
        let pos = b.upload(HostData::U32(&[position]), 1.into())?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (nh, _) = self.layer_forward(b, layer, &h, &pos, kv, AttentionMask::None, None)?;
            h = nh;
        }
        let x = self.norm.forward(b, &h)?;
        b.linear(&x, &self.lm_head, None)
    }

    /// Bytes per cached row across K and V of one layer.
    pub fn kv_row_bytes(&self) -> usize {
        2 * self.kv_dim() * 4
    }
}

/// Maximal runs `[start, end)` of consecutive rows in an ascending row list.
fn row_runs(rows: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &r in rows {
        match runs.last_mut() {
            Some(last) if last.1 == r => last.1 = r + 1,
            _ => runs.push((r, r + 1)),
        }
    }
    runs
}

enum Captured {
    None,
    Contributions(Vec<(f32, f32)>),
    LastRowImageAttention(Vec<f32>),
}

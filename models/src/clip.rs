//! The CLIP vision tower (`CLIPVisionModel`), as far as LLaVA uses it: embeddings,
//! pre-LayerNorm and the encoder layers up to the selected feature layer.

use engine_core::weights::Weights;
use engine_core::{AttentionMask, AttentionParams, Backend, Result, Tensor};

use crate::config::{FeatureSelect, LlavaConfig, VisionConfig};
use crate::nn::{activate, LayerNorm, Linear};

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
}

struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP ViT encoder producing LLaVA's image features.
pub struct ClipVision {
    cfg: VisionConfig,
    patch_embedding: Tensor,    // [D, 3, P, P]
    class_embedding: Tensor,    // [1, D] f32
    position_embedding: Tensor, // [1 + grid², D] f32
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    select: FeatureSelect,
}

impl ClipVision {
    /// Loads `vision_model.*` below `w`; only the layers up to the feature layer.
    pub fn load(w: &Weights, cfg: &LlavaConfig) -> Result<Self> {
        let vc = &cfg.vision;
        let d = vc.hidden_size;
        let w = w.pp("vision_model");
        let emb = w.pp("embeddings");
        let p = vc.patch_size;
        let patch_embedding = emb.get("patch_embedding.weight", &[d, vc.num_channels, p, p])?;
        let class_embedding = emb.get_f32("class_embedding", &[d])?.reshape([1, d])?;
        let position_embedding =
            emb.get_f32("position_embedding.weight", &[vc.num_patches() + 1, d])?;
        let pre_layrnorm = LayerNorm::load(&w.pp("pre_layrnorm"), d, vc.layer_norm_eps)?;
        let mut layers = Vec::new();
        for i in 0..cfg.vision_layers_to_run() {
            let l = w.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(ClipLayer {
                layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), d, vc.layer_norm_eps)?,
                self_attn: ClipAttention {
                    q_proj: Linear::load(&a.pp("q_proj"), d, d, true)?,
                    k_proj: Linear::load(&a.pp("k_proj"), d, d, true)?,
                    v_proj: Linear::load(&a.pp("v_proj"), d, d, true)?,
                    out_proj: Linear::load(&a.pp("out_proj"), d, d, true)?,
                },
                layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), d, vc.layer_norm_eps)?,
                fc1: Linear::load(&l.pp("mlp.fc1"), d, vc.intermediate_size, true)?,
                fc2: Linear::load(&l.pp("mlp.fc2"), vc.intermediate_size, d, true)?,
            });
        }
        Ok(ClipVision {
            cfg: vc.clone(),
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            select: cfg.vision_feature_select_strategy,
        })
    }

    /// `pixels [3, S, S]` → image features `[N, D]` (N = grid², or grid² + 1 with `full`).
    pub fn forward(&self, b: &dyn Backend, pixels: &Tensor) -> Result<Tensor> {
        let vc = &self.cfg;
        let d = vc.hidden_size;
        let heads = vc.num_attention_heads;
        let patches = b.patch_embed(pixels, &self.patch_embedding, vc.patch_size)?; // [grid², D]
        let x = b.concat_rows(&[&self.class_embedding, &patches])?; // [T, D]
        let x = b.add(&x, &self.position_embedding)?;
        let mut h = self.pre_layrnorm.forward(b, &x)?;
        let t = vc.num_patches() + 1;
        let params = AttentionParams {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: d / heads,
            scale: ((d / heads) as f32).powf(-0.5),
            causal: false,
            q_offset: 0,
            kv_len: t,
            mask: AttentionMask::None,
        };
        for layer in &self.layers {
            let x = layer.layer_norm1.forward(b, &h)?;
            let a = &layer.self_attn;
            let q = a.q_proj.forward(b, &x)?; // [T, D]
            let k = a.k_proj.forward(b, &x)?; // [T, D]
            let v = a.v_proj.forward(b, &x)?; // [T, D]
            let o = b.attention(&q, &k, &v, &params)?; // [T, D]
            let o = a.out_proj.forward(b, &o)?;
            h = b.add(&h, &o)?;
            let x = layer.layer_norm2.forward(b, &h)?;
            let x = layer.fc1.forward(b, &x)?; // [T, I]
            let x = activate(b, vc.hidden_act, &x)?;
            let x = layer.fc2.forward(b, &x)?; // [T, D]
            h = b.add(&h, &x)?;
        }
        match self.select {
            FeatureSelect::Default => b.slice_rows(&h, 1, t - 1), // CLS dropped
            FeatureSelect::Full => Ok(h),
        }
    }

    /// The vision tower's hyper-parameters.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
}

/// LLaVA's multi-modal projector: Linear, activation, Linear.
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: crate::config::Activation,
}

impl Projector {
    /// Loads `linear_1` and `linear_2` below `w`.
    pub fn load(w: &Weights, cfg: &LlavaConfig) -> Result<Self> {
        let vd = cfg.vision.hidden_size;
        let td = cfg.text.hidden_size;
        Ok(Projector {
            linear_1: Linear::load(&w.pp("linear_1"), vd, td, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), td, td, true)?,
            act: cfg.projector_hidden_act,
        })
    }

    /// `[N, vision_hidden]` → `[N, text_hidden]`.
    pub fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(b, x)?;
        let h = activate(b, self.act, &h)?;
        self.linear_2.forward(b, &h)
    }
}

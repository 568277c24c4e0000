//! Synthetic LLaVA models for benchmarks: real shapes, seeded random f16 weights, no file.
//!
//! [`SyntheticSource`] is a [`WeightSource`] holding every tensor name of a llava-hf
//! checkpoint (old naming) as f16. Tensors of the same shape and role share one seeded
//! random buffer on the host, so the host holds one buffer per distinct shape (about
//! 0.5 GB for LLaVA-1.5-7B) instead of the whole model; each tensor is still uploaded to
//! its own device buffer, so the device sees a full-size model. Norm weights are ones and
//! biases zeros, which keeps activations finite through any depth.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use engine_core::weights::{WeightSource, WeightView, Weights};
use engine_core::{Backend, DType, Error, Result, Tensor};
use half::f16;

use crate::clip::{ClipVision, Projector};
use crate::config::LlavaConfig;
use crate::llama::Llama;

/// A named model shape for synthetic benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticShape {
    /// A few-MB model with LLaVA's 576 image tokens (tests, smoke runs).
    Tiny,
    /// CLIP ViT-L/14-336 + a TinyLlama-1.1B-shaped decoder.
    Llava1b,
    /// LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B.
    Llava7b,
    /// LLaVA-NeXT with the tiny decoder and a small CLIP at 336 px (llava-v1.6's pinpoints:
    /// a square image takes the 2x2 grid, 2,928 image tokens).
    NextTiny,
    /// llava-v1.6-mistral-7b: CLIP ViT-L/14-336 + Mistral-7B (GQA 32/8, rope_theta 1e6).
    LlavaNext7b,
}

const CLIP_L_336: &str = r#"{"hidden_size":1024,"intermediate_size":4096,"num_hidden_layers":24,
 "num_attention_heads":16,"image_size":336,"patch_size":14,"num_channels":3,
 "layer_norm_eps":1e-5,"hidden_act":"quick_gelu"}"#;

impl SyntheticShape {
    /// Parses `tiny`, `llava-1b`, `llava-7b`, `next-tiny` or `llava-next-7b`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "llava-1b" => Ok(Self::Llava1b),
            "llava-7b" => Ok(Self::Llava7b),
            "next-tiny" => Ok(Self::NextTiny),
            "llava-next-7b" => Ok(Self::LlavaNext7b),
            other => Err(Error::msg(format!(
                "unknown shape {other:?} (expected tiny, llava-1b, llava-7b, next-tiny or llava-next-7b)"
            ))),
        }
    }

    /// The name [`SyntheticShape::parse`] accepts.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Llava1b => "llava-1b",
            Self::Llava7b => "llava-7b",
            Self::NextTiny => "next-tiny",
            Self::LlavaNext7b => "llava-next-7b",
        }
    }

    /// The llava-hf `config.json` of this shape.
    pub fn config_json(&self) -> String {
        let next =
            r#""architectures":["LlavaNextForConditionalGeneration"],"model_type":"llava_next","#;
        let (text, vision, image_token, head) = match self {
            Self::Tiny => (
                r#"{"vocab_size":1024,"hidden_size":64,"intermediate_size":176,
                 "num_hidden_layers":12,"num_attention_heads":4,"num_key_value_heads":2,
                 "head_dim":16,"max_position_embeddings":2048,"rms_norm_eps":1e-5}"#,
                r#"{"hidden_size":32,"intermediate_size":64,"num_hidden_layers":3,
                 "num_attention_heads":2,"image_size":336,"patch_size":14,"num_channels":3,
                 "layer_norm_eps":1e-5,"hidden_act":"quick_gelu"}"#,
                1000,
                "",
            ),
            Self::NextTiny => (
                r#"{"model_type":"mistral","vocab_size":1024,"hidden_size":64,
                 "intermediate_size":176,"num_hidden_layers":12,"num_attention_heads":4,
                 "num_key_value_heads":2,"head_dim":16,"max_position_embeddings":4096,
                 "rms_norm_eps":1e-5,"rope_theta":1000000.0,"sliding_window":null}"#,
                r#"{"hidden_size":32,"intermediate_size":64,"num_hidden_layers":3,
                 "num_attention_heads":2,"image_size":336,"patch_size":14,"num_channels":3,
                 "layer_norm_eps":1e-5,"hidden_act":"quick_gelu"}"#,
                1000,
                next,
            ),
            Self::LlavaNext7b => (
                r#"{"model_type":"mistral","vocab_size":32064,"hidden_size":4096,
                 "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
                 "num_key_value_heads":8,"max_position_embeddings":32768,"rms_norm_eps":1e-5,
                 "rope_theta":1000000.0,"sliding_window":null}"#,
                CLIP_L_336,
                32000,
                next,
            ),
            Self::Llava1b => (
                r#"{"vocab_size":32000,"hidden_size":2048,"intermediate_size":5632,
                 "num_hidden_layers":22,"num_attention_heads":32,"num_key_value_heads":4,
                 "max_position_embeddings":2048,"rms_norm_eps":1e-5}"#,
                CLIP_L_336,
                31999,
                "",
            ),
            Self::Llava7b => (
                r#"{"vocab_size":32064,"hidden_size":4096,"intermediate_size":11008,
                 "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,
                 "max_position_embeddings":4096,"rms_norm_eps":1e-5}"#,
                CLIP_L_336,
                32000,
                "",
            ),
        };
        format!(
            r#"{{{head}"text_config":{text},"vision_config":{vision},"image_token_index":{image_token},
             "projector_hidden_act":"gelu","vision_feature_layer":-2,
             "vision_feature_select_strategy":"default"}}"#
        )
    }

    /// The parsed config of this shape.
    pub fn config(&self) -> Result<LlavaConfig> {
        LlavaConfig::from_json_str(&self.config_json())
    }
}

/// What a synthetic tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fill {
    Random,
    Ones,
    Zeros,
}

/// A [`WeightSource`] with every tensor a llava-hf checkpoint (old naming) has for `cfg`,
/// as f16 (see the module docs for what is shared).
pub struct SyntheticSource {
    entries: BTreeMap<String, (Vec<usize>, Fill)>,
    data: HashMap<(Fill, Vec<usize>), Vec<u8>>,
    logical_bytes: u64,
}

/// The tensor list for `cfg`, each with how it is filled.
fn entries(cfg: &LlavaConfig) -> BTreeMap<String, (Vec<usize>, Fill)> {
    let mut e: BTreeMap<String, (Vec<usize>, Fill)> = BTreeMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let fill = if name.ends_with(".bias") {
            Fill::Zeros
        } else if name.contains("norm") && name.ends_with(".weight") {
            Fill::Ones
        } else {
            Fill::Random
        };
        e.insert(name, (shape.to_vec(), fill));
    };
    let (v, t) = (&cfg.vision, &cfg.text);
    let d = v.hidden_size;
    let vt = "vision_tower.vision_model";
    put(
        format!("{vt}.embeddings.patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
    );
    put(format!("{vt}.embeddings.class_embedding"), &[d]);
    put(
        format!("{vt}.embeddings.position_embedding.weight"),
        &[v.num_patches() + 1, d],
    );
    for n in ["weight", "bias"] {
        put(format!("{vt}.pre_layrnorm.{n}"), &[d]);
        put(format!("{vt}.post_layernorm.{n}"), &[d]);
    }
    for i in 0..v.num_hidden_layers {
        let l = format!("{vt}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            put(format!("{l}.{ln}.weight"), &[d]);
            put(format!("{l}.{ln}.bias"), &[d]);
        }
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(format!("{l}.self_attn.{p}.weight"), &[d, d]);
            put(format!("{l}.self_attn.{p}.bias"), &[d]);
        }
        put(format!("{l}.mlp.fc1.weight"), &[v.intermediate_size, d]);
        put(format!("{l}.mlp.fc1.bias"), &[v.intermediate_size]);
        put(format!("{l}.mlp.fc2.weight"), &[d, v.intermediate_size]);
        put(format!("{l}.mlp.fc2.bias"), &[d]);
    }
    let h = t.hidden_size;
    if cfg.arch == crate::config::Arch::MobileVlm {
        for (name, shape) in crate::mobilevlm::projector::manifest(d, h) {
            put(name, &shape);
        }
    } else {
        let mm = "multi_modal_projector";
        put(format!("{mm}.linear_1.weight"), &[h, d]);
        put(format!("{mm}.linear_1.bias"), &[h]);
        put(format!("{mm}.linear_2.weight"), &[h, h]);
        put(format!("{mm}.linear_2.bias"), &[h]);
    }
    let lm = "language_model.model";
    let q_dim = t.num_attention_heads * t.head_dim;
    let kv_dim = t.num_key_value_heads * t.head_dim;
    let i = t.intermediate_size;
    put(format!("{lm}.embed_tokens.weight"), &[t.vocab_size, h]);
    for l in 0..t.num_hidden_layers {
        let p = format!("{lm}.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h]);
        put(format!("{p}.post_attention_layernorm.weight"), &[h]);
        put(format!("{p}.self_attn.q_proj.weight"), &[q_dim, h]);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv_dim, h]);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv_dim, h]);
        put(format!("{p}.self_attn.o_proj.weight"), &[h, q_dim]);
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h]);
        put(format!("{p}.mlp.up_proj.weight"), &[i, h]);
        put(format!("{p}.mlp.down_proj.weight"), &[h, i]);
    }
    put(format!("{lm}.norm.weight"), &[h]);
    if cfg.arch == crate::config::Arch::LlavaNext {
        put("image_newline".to_string(), &[h]);
    }
    put(
        "language_model.lm_head.weight".to_string(),
        &[t.vocab_size, h],
    );

    e
}

/// Every tensor (name, shape) a llava-hf checkpoint of `cfg` holds, as [`SyntheticSource`]
/// lists them (old naming); for memory estimates without generating weights.
pub fn tensor_shapes(cfg: &LlavaConfig) -> Vec<(String, Vec<usize>)> {
    entries(cfg).into_iter().map(|(n, (s, _))| (n, s)).collect()
}

impl SyntheticSource {
    /// Builds the tensor list for `cfg` and generates one buffer per distinct (role, shape)
    /// from `seed`.
    pub fn new(cfg: &LlavaConfig, seed: u64) -> Self {
        let e = entries(cfg);
        let mut data = HashMap::new();
        let mut logical_bytes = 0u64;
        for (shape, fill) in e.values() {
            let n: usize = shape.iter().product();
            logical_bytes += 2 * n as u64;
            data.entry((*fill, shape.clone()))
                .or_insert_with(|| generate(*fill, shape, seed));
        }
        SyntheticSource {
            entries: e,
            data,
            logical_bytes,
        }
    }

    /// Bytes the host actually holds (one buffer per distinct role and shape).
    pub fn host_bytes(&self) -> u64 {
        self.data.values().map(|v| v.len() as u64).sum()
    }
}

/// Seeded f16 values for one (role, shape): uniform in ±1/sqrt(fan_in) for random tensors
/// (fan_in = the product of all dims but the first), so every matmul keeps unit scale.
fn generate(fill: Fill, shape: &[usize], seed: u64) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let value = match fill {
        Fill::Ones => Some(f16::ONE),
        Fill::Zeros => Some(f16::ZERO),
        Fill::Random => None,
    };
    if let Some(x) = value {
        return std::iter::repeat_n(x.to_le_bytes(), n).flatten().collect();
    }
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let a = 1.0 / (fan_in as f32).sqrt();
    // The shape enters the seed so equal-sized tensors of different shapes differ.
    let mut s = shape
        .iter()
        .fold(seed ^ 0x5157_4e54, |h, &d| splitmix(h ^ d as u64));
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let u = (splitmix(s) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        out.extend_from_slice(&f16::from_f32(a * (2.0 * u - 1.0)).to_le_bytes());
    }
    out
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl WeightSource for SyntheticSource {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        let (shape, fill) = self
            .entries
            .get(name)
            .ok_or_else(|| Error::weight(name, "missing from the synthetic model"))?;
        let bytes = self
            .data
            .get(&(*fill, shape.clone()))
            .ok_or_else(|| Error::weight(name, "synthetic buffer missing (bug)"))?;
        Ok(WeightView {
            dtype: DType::F16,
            shape,
            bytes,
        })
    }
    /// The model's size as a checkpoint would store it (f16), not the host bytes.
    fn total_bytes(&self) -> u64 {
        self.logical_bytes
    }
}

/// A LLaVA built from a [`SyntheticSource`]: vision tower, projector and decoder on one
/// backend (no tokenizer or image processor: benchmarks feed ids and pixels directly).
pub struct SyntheticLlava {
    /// The shape's config.
    pub cfg: LlavaConfig,
    /// CLIP up to the feature layer.
    pub vision: ClipVision,
    /// The multi-modal projector.
    pub projector: Projector,
    /// The decoder (shared with sessions).
    pub llama: Arc<Llama>,
    /// LLaVA-NeXT's `image_newline` `[1, H]` (f32).
    pub image_newline: Option<Tensor>,
    /// Bytes of weights as an f16 checkpoint would hold them.
    pub weight_bytes: u64,
    /// Peak bytes of generated weights on the host while loading.
    pub host_bytes: u64,
    /// Milliseconds spent generating and uploading.
    pub load_ms: f64,
}

impl SyntheticLlava {
    /// Generates `shape`'s weights from `seed` and uploads them to `backend`; the host
    /// buffers are freed once uploaded.
    pub fn load(shape: SyntheticShape, seed: u64, backend: Arc<dyn Backend>) -> Result<Self> {
        Self::load_quantized(shape, seed, backend, None)
    }

    /// [`SyntheticLlava::load`], quantizing every matrix whose rows are whole blocks to
    /// `quant` as it uploads (see `Weights::with_quant`); `weight_bytes` stays the f16 count.
    pub fn load_quantized(
        shape: SyntheticShape,
        seed: u64,
        backend: Arc<dyn Backend>,
        quant: Option<engine_core::QuantType>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let cfg = shape.config()?;
        let source = Arc::new(SyntheticSource::new(&cfg, seed));
        let (weight_bytes, host_bytes) = (source.total_bytes(), source.host_bytes());
        let w = Weights::new(source, backend.clone()).with_quant(quant);
        let vision = ClipVision::load(&w.pp("vision_tower"), &cfg)?;
        let projector = Projector::load(&w.pp("multi_modal_projector"), &cfg)?;
        let llama = Arc::new(Llama::load(
            &w.pp("language_model.model"),
            &w.pp("language_model.lm_head"),
            &cfg.text,
        )?);
        let h = cfg.text.hidden_size;
        let image_newline = match cfg.arch {
            crate::config::Arch::LlavaNext => {
                Some(w.get_f32("image_newline", &[h])?.reshape([1, h])?)
            }
            crate::config::Arch::Llava | crate::config::Arch::MobileVlm => None,
        };
        backend.sync()?;
        Ok(SyntheticLlava {
            cfg,
            vision,
            projector,
            llama,
            image_newline,
            weight_bytes,
            host_bytes,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Vision tower and projector: `pixels [3, S, S]` → image embeddings `[N, H]`. For
    /// LLaVA-NeXT shapes the image is [`SyntheticLlava::next_layout`]'s, every tile taking
    /// `pixels`: the tower runs once per tile and the features are packed with newlines.
    pub fn encode(&self, b: &dyn Backend, pixels: &Tensor) -> Result<Tensor> {
        let one = |b: &dyn Backend| -> Result<Tensor> {
            let features = self.vision.forward(b, pixels)?; // [g², Dv]
            self.projector.forward(b, &features) // [g², H]
        };
        let (Some(layout), Some(newline)) = (self.next_layout()?, &self.image_newline) else {
            return one(b);
        };
        let projected = (0..1 + layout.tiles.0 * layout.tiles.1)
            .map(|_| one(b))
            .collect::<Result<Vec<_>>>()?;
        crate::llava::pack_next_features(b, &projected, newline, &layout)
    }

    /// LLaVA-NeXT shapes: the layout benchmarks use, a square image on the largest square
    /// pinpoint (672x672 on llava-v1.6: 2x2 tiles, 2,928 image tokens); `None` otherwise.
    pub fn next_layout(&self) -> Result<Option<crate::preprocess_next::NextLayout>> {
        bench_next_layout(&self.cfg)
    }
}

/// The LLaVA-NeXT layout of a benchmark image for `cfg` (see [`SyntheticLlava::next_layout`]).
pub fn bench_next_layout(cfg: &LlavaConfig) -> Result<Option<crate::preprocess_next::NextLayout>> {
    if cfg.arch != crate::config::Arch::LlavaNext {
        return Ok(None);
    }
    let side = cfg
        .image_grid_pinpoints
        .iter()
        .filter(|(h, w)| h == w)
        .map(|&(h, _)| h)
        .max()
        .unwrap_or(cfg.vision.image_size);
    crate::preprocess_next::NextLayout::new(
        (side, side),
        &cfg.image_grid_pinpoints,
        cfg.vision.image_size,
        cfg.vision.patch_size,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_have_the_documented_sizes() {
        let c = SyntheticShape::Llava7b.config().unwrap();
        assert_eq!(
            (
                c.text.num_hidden_layers,
                c.text.hidden_size,
                c.text.intermediate_size,
                c.text.vocab_size
            ),
            (32, 4096, 11008, 32064)
        );
        assert_eq!((c.vision_layers_to_run(), c.image_tokens()), (23, 576));
        let c = SyntheticShape::Llava1b.config().unwrap();
        assert_eq!(
            (
                c.text.num_hidden_layers,
                c.text.num_key_value_heads,
                c.text.head_dim
            ),
            (22, 4, 64)
        );
        assert_eq!(SyntheticShape::Tiny.config().unwrap().image_tokens(), 576);
        assert!(SyntheticShape::parse("llava-13b").is_err());
    }

    #[test]
    fn source_is_deterministic_and_shares_equal_shapes() {
        let cfg = SyntheticShape::Tiny.config().unwrap();
        let a = SyntheticSource::new(&cfg, 3);
        let b = SyntheticSource::new(&cfg, 3);
        let c = SyntheticSource::new(&cfg, 4);
        let name = "language_model.model.layers.2.mlp.up_proj.weight";
        let (va, vb, vc) = (
            a.view(name).unwrap(),
            b.view(name).unwrap(),
            c.view(name).unwrap(),
        );
        assert_eq!(va.shape, &[176, 64]);
        assert_eq!(va.bytes, vb.bytes, "same seed, same bytes");
        assert_ne!(va.bytes, vc.bytes, "other seed, other bytes");
        assert!(
            a.host_bytes() < a.total_bytes(),
            "equal shapes share a buffer"
        );
        let norm = a
            .view("language_model.model.layers.0.input_layernorm.weight")
            .unwrap();
        assert!(norm.bytes.chunks(2).all(|x| x == f16::ONE.to_le_bytes()));
    }

    /// The analytic side of the issue's target (fusion=12, keep=10, exit=18 on LLaVA-7B,
    /// prompt 640 with the image at 35..611): printed with `--nocapture` for the README.
    #[test]
    fn llava7b_target_schedule_flops_ratio() {
        use pruner::{LayerSchedule, ShallowMask};
        let cfg = SyntheticShape::Llava7b.config().unwrap();
        let (s, n, len) = (35, 576, 640);
        let sched: Vec<LayerSchedule> = (0..32)
            .map(|l| {
                let img = match l {
                    _ if l <= 12 => n,
                    _ if l < 18 => 10,
                    _ => 0,
                };
                let mask = match l {
                    0 => ShallowMask::Layer0Sink,
                    _ if l < 6 => ShallowMask::TextToImage,
                    _ => ShallowMask::None,
                };
                LayerSchedule {
                    seq_len: len - n + img,
                    image: std::iter::once(s..s + img).collect(),
                    mask,
                }
            })
            .collect();
        let f = pruner::prefill_flops(&cfg.flops_shape(), &sched).unwrap();
        let dec = (f.prefill - f.vision) as f64;
        let dense = (f.prefill_dense - f.vision) as f64;
        let ratio = dense / dec;
        println!(
            "llava-7b fusion=12,keep=10,exit=18: decoder prefill {:.2} vs dense {:.2} TFLOP, ratio {ratio:.3}; with vision {:.3}",
            dec / 1e12,
            dense / 1e12,
            f.prefill_dense as f64 / f.prefill as f64
        );
        assert!(ratio > 2.0 && ratio < 3.0, "ratio {ratio}");
    }
}

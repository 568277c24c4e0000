//! llava-hf `config.json`: the fields the engine uses, with transformers' defaults for
//! every key a checkpoint may omit (llava-1.5-7b-hf leaves most of `text_config` out).

use std::path::Path;

use engine_core::{Error, Result};
use serde_json::{Map, Value};

/// The Llama decoder's hyper-parameters (`text_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary base.
    pub rope_theta: f32,
    /// Linear rope scaling factor (1.0 without `rope_scaling`).
    pub rope_scaling_factor: f32,
    /// Whether `lm_head` shares `embed_tokens`.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether MLP projections have biases.
    pub mlp_bias: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

/// Activation of an MLP or the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP's `quick_gelu`).
    QuickGelu,
}

/// The CLIP vision tower's hyper-parameters (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Encoder layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// MLP activation.
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patch tokens (CLS excluded).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// How image features are selected from the vision tower's hidden states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token.
    Default,
    /// Keep every token, CLS included.
    Full,
}

/// The multimodal architectures visi implements (`architectures[0]`, `model_type`).
pub const SUPPORTED_ARCHITECTURES: &[(&str, &str)] = &[
    ("LlavaForConditionalGeneration", "llava"),
    ("LlavaNextForConditionalGeneration", "llava_next"),
    ("MobileLlamaForCausalLM", "mobilevlm"),
];

/// The decoder `model_type`s visi implements.
pub const SUPPORTED_TEXT_MODEL_TYPES: &[&str] = &["llama", "mistral"];

/// One line listing [`SUPPORTED_ARCHITECTURES`] for refusals.
pub fn supported_list() -> String {
    SUPPORTED_ARCHITECTURES
        .iter()
        .map(|(a, m)| format!("{a} (model_type {m})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which of the supported multimodal architectures a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Arch {
    /// LLaVA-1.5 (`LlavaForConditionalGeneration`): one 336 crop per image.
    #[default]
    Llava,
    /// LLaVA-NeXT / llava-v1.6 (`LlavaNextForConditionalGeneration`): any-resolution tiles.
    LlavaNext,
    /// MobileVLM V2 (`MobileLlamaForCausalLM`, `mm_projector_type: ldpnetv2`): one padded
    /// 336 image, 144 tokens after the LDPv2 projector ([`crate::mobilevlm`]).
    MobileVlm,
}

impl Arch {
    /// The transformers class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Arch::Llava => "LlavaForConditionalGeneration",
            Arch::LlavaNext => "LlavaNextForConditionalGeneration",
            Arch::MobileVlm => "MobileLlamaForCausalLM",
        }
    }

    /// Reads `architectures[0]` and `model_type` of a config's top level and refuses,
    /// naming it, any architecture visi does not implement. A config with neither key
    /// is taken as LLaVA-1.5 (older hand-written configs).
    pub fn detect(root: &Map<String, Value>) -> Result<Self> {
        let arch = match root.get("architectures") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => match a.first() {
                None => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(v) => {
                    return Err(Error::msg(format!(
                        "key `architectures`: expected a list of strings, got {v}"
                    )))
                }
            },
            Some(v) => {
                return Err(Error::msg(format!(
                    "key `architectures`: expected a list of strings, got {v}"
                )))
            }
        };
        let model_type = match root.get("model_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(v) => {
                return Err(Error::msg(format!(
                    "key `model_type`: expected a string, got {v}"
                )))
            }
        };
        let by_arch = arch.map(|a| SUPPORTED_ARCHITECTURES.iter().position(|(n, _)| *n == a));
        let by_type = model_type.map(|m| SUPPORTED_ARCHITECTURES.iter().position(|(_, t)| *t == m));
        let refuse = || {
            let what = match (arch, model_type) {
                (Some(a), Some(m)) => format!("{a} (model_type {m})"),
                (Some(a), None) => a.to_string(),
                (None, Some(m)) => format!("model_type {m}"),
                (None, None) => "this model".to_string(),
            };
            Err(Error::msg(format!(
                "architecture {what} is not supported; visi implements {}",
                supported_list()
            )))
        };
        let idx = match (by_arch, by_type) {
            (Some(None), _) | (_, Some(None)) => return refuse(),
            (Some(Some(a)), Some(Some(t))) if a != t => return refuse(),
            (Some(Some(i)), _) | (None, Some(Some(i))) => i,
            (None, None) => 0,
        };
        Ok(match idx {
            0 => Arch::Llava,
            1 => Arch::LlavaNext,
            _ => Arch::MobileVlm,
        })
    }
}

/// A llava-hf `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` config.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    /// Which architecture (LLaVA-1.5 or LLaVA-NeXT).
    pub arch: Arch,
    /// LLaVA-NeXT's `image_grid_pinpoints` as `(height, width)` pairs (empty for LLaVA-1.5).
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// The Llama decoder's config (`text_config`).
    pub text: TextConfig,
    /// The CLIP vision tower's config (`vision_config`).
    pub vision: VisionConfig,
    /// Token id of `<image>` in the tokenizer.
    pub image_token_index: u32,
    /// Projector activation.
    pub projector_hidden_act: Activation,
    /// Index into the vision tower's hidden states (negative counts from the end).
    pub vision_feature_layer: i64,
    /// Which vision tokens feed the projector (CLS dropped by `default`).
    pub vision_feature_select_strategy: FeatureSelect,
}

impl LlavaConfig {
    /// Reads and validates `config.json`; errors name the file and key.
    pub fn from_file(path: &Path) -> Result<Self> {
        if crate::mobilevlm::config::is_mobilevlm(path)? {
            // Its vision config is its tower's (`mm_vision_tower`), next to the checkpoint.
            let dir = path.parent().unwrap_or(Path::new("."));
            return crate::mobilevlm::config::read_dir_config(dir, None);
        }
        let text =
            engine_core::files::read_text_limited(path, engine_core::files::MAX_CONFIG_BYTES)?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Msg(m) => Error::file(path, m),
            other => other,
        })
    }

    /// Parses a config from JSON text (errors are `Error::Msg` naming the key).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| Error::msg(format!("invalid JSON: {e}")))?;
        let root = root
            .as_object()
            .ok_or_else(|| Error::msg("expected a JSON object"))?;
        let arch = Arch::detect(root)?;
        if arch == Arch::MobileVlm {
            // Its vision config lives with its tower (`mm_vision_tower`), not in config.json.
            return Err(Error::msg(
                "this is a MobileVLM config (MobileLlamaForCausalLM): its vision tower's config is read from `mm_vision_tower` (LlavaConfig::from_file, models::mobilevlm::read_config)",
            ));
        }
        let empty = Map::new();
        let tc = obj(root, "text_config")?.unwrap_or(&empty);
        let vc = obj(root, "vision_config")?;
        let text = TextConfig::from_map(tc, "text_config.")?;
        let vision = match vc {
            Some(vc) => VisionConfig::from_map(vc, "vision_config.")?,
            None => VisionConfig::llava_default(),
        };
        let strategy = match str_or(root, "vision_feature_select_strategy", "default")? {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            other => {
                return Err(Error::msg(format!(
                    "key `vision_feature_select_strategy`: expected \"default\" or \"full\", got {other:?}"
                )))
            }
        };
        let feature_layer = match root.get("vision_feature_layer") {
            None | Some(Value::Null) => -2,
            Some(v) => v.as_i64().ok_or_else(|| {
                Error::msg(format!(
                    "key `vision_feature_layer`: expected an integer, got {v} (lists of layers are not supported)"
                ))
            })?,
        };
        let n = vision.num_hidden_layers as i64;
        if feature_layer < -(n + 1) || feature_layer > n {
            return Err(Error::msg(format!(
                "key `vision_feature_layer`: {feature_layer} is outside the vision tower's {n} layers"
            )));
        }
        let image_grid_pinpoints = match arch {
            Arch::Llava | Arch::MobileVlm => Vec::new(),
            Arch::LlavaNext => {
                if strategy == FeatureSelect::Full {
                    // transformers' pack_image_features cannot view grid² + 1 rows as a grid.
                    return Err(Error::msg(
                        "key `vision_feature_select_strategy`: \"full\" does not work with LLaVA-NeXT's tiles (transformers refuses it too)",
                    ));
                }
                pinpoints(root.get("image_grid_pinpoints"), vision.image_size)?
            }
        };
        let cfg = LlavaConfig {
            arch,
            image_grid_pinpoints,
            text,
            vision,
            image_token_index: u32::try_from(usize_or(root, "image_token_index", "", 32000)?)
                .map_err(|_| Error::msg("key `image_token_index`: too large"))?,
            projector_hidden_act: act(root, "projector_hidden_act", "", "gelu")?,
            vision_feature_layer: feature_layer,
            vision_feature_select_strategy: strategy,
        };
        if cfg.image_token_index as usize >= cfg.text.vocab_size {
            return Err(Error::msg(format!(
                "key `image_token_index`: {} is not below text_config.vocab_size {}",
                cfg.image_token_index, cfg.text.vocab_size
            )));
        }
        // The image span is found by this id: were it BOS, the prompt's first token would
        // be taken for the image.
        if Some(cfg.image_token_index) == cfg.text.bos_token_id {
            return Err(Error::msg(format!(
                "key `image_token_index`: {} is text_config.bos_token_id",
                cfg.image_token_index
            )));
        }
        Ok(cfg)
    }

    /// How many encoder layers must run to produce the selected hidden state.
    pub fn vision_layers_to_run(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64;
        let idx = if self.vision_feature_layer < 0 {
            n + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        idx as usize
    }

    /// The shapes `pruner::prefill_flops` needs.
    pub fn flops_shape(&self) -> pruner::FlopsShape {
        let (t, v) = (&self.text, &self.vision);
        pruner::FlopsShape {
            text: pruner::TextShape {
                hidden: t.hidden_size,
                intermediate: t.intermediate_size,
                heads: t.num_attention_heads,
                kv_heads: t.num_key_value_heads,
                head_dim: t.head_dim,
                vocab: t.vocab_size,
                num_layers: t.num_hidden_layers,
            },
            vision: pruner::VisionShape {
                layers: self.vision_layers_to_run(),
                hidden: v.hidden_size,
                intermediate: v.intermediate_size,
                tokens: v.num_patches() + 1,
                passes: 1,
            },
            projector: pruner::ProjectorShape {
                in_dim: v.hidden_size,
                hidden: t.hidden_size,
                out_dim: t.hidden_size,
            },
        }
    }

    /// Image tokens per image fed to the decoder.
    pub fn image_tokens(&self) -> usize {
        if self.arch == Arch::MobileVlm {
            return crate::mobilevlm::IMAGE_TOKENS;
        }
        match self.vision_feature_select_strategy {
            FeatureSelect::Default => self.vision.num_patches(),
            FeatureSelect::Full => self.vision.num_patches() + 1,
        }
    }
}

impl TextConfig {
    /// Parses a (possibly partial) Llama config; `pre` prefixes key names in errors.
    pub fn from_map(m: &Map<String, Value>, pre: &str) -> Result<Self> {
        let model_type = match m.get("model_type") {
            None | Some(Value::Null) => "llama",
            Some(v) => v.as_str().ok_or_else(|| {
                Error::msg(format!("key `{pre}model_type`: expected a string, got {v}"))
            })?,
        };
        if !SUPPORTED_TEXT_MODEL_TYPES.contains(&model_type) {
            return Err(Error::msg(format!(
                "key `{pre}model_type`: decoder {model_type:?} is not supported; visi implements {}",
                SUPPORTED_TEXT_MODEL_TYPES.join(", ")
            )));
        }
        // MistralConfig's defaults differ from LlamaConfig's where a checkpoint omits keys.
        let mistral = model_type == "mistral";
        let hidden = usize_or(m, "hidden_size", pre, 4096)?;
        let heads = usize_or(m, "num_attention_heads", pre, 32)?;
        let kv_heads = usize_or(
            m,
            "num_key_value_heads",
            pre,
            if mistral { 8 } else { heads },
        )?;
        if heads == 0 || hidden % heads != 0 && !m.contains_key("head_dim") {
            return Err(Error::msg(format!(
                "key `{pre}num_attention_heads`: {heads} does not divide hidden_size {hidden}"
            )));
        }
        let head_dim = usize_or(m, "head_dim", pre, hidden / heads.max(1))?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::msg(format!(
                "key `{pre}num_key_value_heads`: {kv_heads} does not divide num_attention_heads {heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(Error::msg(format!(
                "key `{pre}head_dim`: {head_dim} must be even for RoPE"
            )));
        }
        let rope_scaling_factor = match m.get("rope_scaling") {
            None | Some(Value::Null) => 1.0,
            Some(Value::Object(rs)) => {
                let ty = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match ty {
                    // transformers refuses linear scaling without a factor; 1.0 would
                    // silently run unscaled.
                    "linear" => match rs.get("factor") {
                        None | Some(Value::Null) => {
                            return Err(Error::msg(format!(
                                "key `{pre}rope_scaling.factor`: missing (linear rope scaling needs a factor)"
                            )))
                        }
                        Some(_) => f32_or(rs, "factor", &format!("{pre}rope_scaling."), 1.0)?,
                    },
                    "default" => 1.0,
                    other => {
                        return Err(Error::msg(format!(
                            "key `{pre}rope_scaling`: rope type {other:?} is not supported (linear only)"
                        )))
                    }
                }
            }
            Some(v) => {
                return Err(Error::msg(format!(
                    "key `{pre}rope_scaling`: expected an object, got {v}"
                )))
            }
        };
        let eos_token_ids = match m.get("eos_token_id") {
            None | Some(Value::Null) => vec![2],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::msg(format!("key `{pre}eos_token_id`: expected integers")))?,
            Some(v) => vec![v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    Error::msg(format!("key `{pre}eos_token_id`: expected an integer"))
                })?],
        };
        let cfg = TextConfig {
            vocab_size: usize_or(m, "vocab_size", pre, 32000)?,
            hidden_size: hidden,
            intermediate_size: usize_or(
                m,
                "intermediate_size",
                pre,
                if mistral { 14336 } else { 11008 },
            )?,
            num_hidden_layers: usize_or(m, "num_hidden_layers", pre, 32)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: usize_or(
                m,
                "max_position_embeddings",
                pre,
                if mistral { 4096 * 32 } else { 2048 },
            )?,
            rms_norm_eps: f32_or(m, "rms_norm_eps", pre, 1e-6)?,
            rope_theta: f32_or(m, "rope_theta", pre, 10000.0)?,
            rope_scaling_factor,
            tie_word_embeddings: bool_or(m, "tie_word_embeddings", pre, false)?,
            attention_bias: bool_or(m, "attention_bias", pre, false)?,
            mlp_bias: bool_or(m, "mlp_bias", pre, false)?,
            bos_token_id: match m.get("bos_token_id") {
                None | Some(Value::Null) => Some(1),
                Some(v) => Some(v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(
                    || Error::msg(format!("key `{pre}bos_token_id`: expected an integer")),
                )?),
            },
            eos_token_ids,
        };
        if mistral {
            // A window narrower than the context changes attention; visi has no sliding
            // window, so such a checkpoint is refused rather than answered wrongly.
            let window = match m.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    Error::msg(format!(
                        "key `{pre}sliding_window`: expected an integer or null, got {v}"
                    ))
                })? as usize),
            };
            if let Some(w) = window.filter(|&w| w < cfg.max_position_embeddings) {
                return Err(Error::msg(format!(
                    "key `{pre}sliding_window`: a sliding window of {w} narrower than the context of {} is not supported (null or at least max_position_embeddings)",
                    cfg.max_position_embeddings
                )));
            }
        }
        cfg.check(|k| format!("{pre}{k}"))?;
        Ok(cfg)
    }

    /// Range checks shared by `config.json` and GGUF metadata: sizes positive, epsilons and
    /// rope parameters positive and finite, special tokens inside the vocabulary. `key`
    /// maps a field name to the key that holds it in the source (for the message).
    pub fn check(&self, key: impl Fn(&str) -> String) -> Result<()> {
        let bad = |k: &str, why: String| Err(Error::msg(format!("key `{}`: {why}", key(k))));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(k, "must be positive".into());
            }
        }
        // NaN fails every comparison, so `!(x > 0)` rejects it too.
        for (k, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
            ("rope_scaling.factor", self.rope_scaling_factor),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(k, format!("{v} must be a positive finite number"));
            }
        }
        for (k, id) in self
            .bos_token_id
            .iter()
            .map(|&b| ("bos_token_id", b))
            .chain(self.eos_token_ids.iter().map(|&e| ("eos_token_id", e)))
        {
            if id as usize >= self.vocab_size {
                return bad(
                    k,
                    format!("{id} is outside the vocabulary of {}", self.vocab_size),
                );
            }
        }
        Ok(())
    }
}

impl VisionConfig {
    /// The CLIP ViT-L/14-336 that LlavaConfig assumes when `vision_config` is absent.
    pub fn llava_default() -> Self {
        VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        }
    }

    /// Parses a (possibly partial) CLIP vision config with CLIPVisionConfig's defaults.
    pub fn from_map(m: &Map<String, Value>, pre: &str) -> Result<Self> {
        if let Some(mt) = m.get("model_type").and_then(|v| v.as_str()) {
            if mt != "clip_vision_model" {
                return Err(Error::msg(format!(
                    "key `{pre}model_type`: {mt:?} is not supported (clip_vision_model only)"
                )));
            }
        }
        let cfg = VisionConfig {
            hidden_size: usize_or(m, "hidden_size", pre, 768)?,
            intermediate_size: usize_or(m, "intermediate_size", pre, 3072)?,
            num_hidden_layers: usize_or(m, "num_hidden_layers", pre, 12)?,
            num_attention_heads: usize_or(m, "num_attention_heads", pre, 12)?,
            image_size: usize_or(m, "image_size", pre, 224)?,
            patch_size: usize_or(m, "patch_size", pre, 32)?,
            num_channels: usize_or(m, "num_channels", pre, 3)?,
            layer_norm_eps: f32_or(m, "layer_norm_eps", pre, 1e-5)?,
            hidden_act: act(m, "hidden_act", pre, "quick_gelu")?,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::msg(format!(
                "key `{pre}num_attention_heads`: {} does not divide hidden_size {}",
                cfg.num_attention_heads, cfg.hidden_size
            )));
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::msg(format!(
                "key `{pre}patch_size`: {} does not divide image_size {}",
                cfg.patch_size, cfg.image_size
            )));
        }
        if cfg.num_channels != 3 {
            return Err(Error::msg(format!(
                "key `{pre}num_channels`: only 3 (RGB) is supported"
            )));
        }
        cfg.check(|k| format!("{pre}{k}"))?;
        Ok(cfg)
    }

    /// Range checks shared by `config.json` and mmproj metadata (`key` names the source key).
    pub fn check(&self, key: impl Fn(&str) -> String) -> Result<()> {
        let bad = |k: &str, why: String| Err(Error::msg(format!("key `{}`: {why}", key(k))));
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("image_size", self.image_size),
        ] {
            if v == 0 {
                return bad(k, "must be positive".into());
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(
                "layer_norm_eps",
                format!("{} must be a positive finite number", self.layer_norm_eps),
            );
        }
        Ok(())
    }
}

/// LlavaNextConfig's default `image_grid_pinpoints`.
pub const DEFAULT_PINPOINTS: [(usize, usize); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// Most tiles one pinpoint may cut (llava-v1.6 uses at most 4; this bounds work per image).
pub const MAX_TILES: usize = 64;

/// Parses `image_grid_pinpoints` (`[[height, width], ...]`); every side must be a positive
/// multiple of the tower's `image_size`.
pub fn pinpoints(v: Option<&Value>, image_size: usize) -> Result<Vec<(usize, usize)>> {
    let key = "image_grid_pinpoints";
    let list = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_PINPOINTS.to_vec()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(Error::msg(format!(
                "key `{key}`: expected a list of [height, width] pairs, got {v}"
            )))
        }
    };
    if list.is_empty() || list.len() > 256 {
        return Err(Error::msg(format!(
            "key `{key}`: expected 1 to 256 [height, width] pairs, got {}",
            list.len()
        )));
    }
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        let pair = p
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)));
        let Some((h, w)) = pair else {
            return Err(Error::msg(format!(
                "key `{key}`: expected [height, width] pairs of integers, got {p}"
            )));
        };
        if h == 0
            || w == 0
            || !h.is_multiple_of(image_size)
            || !w.is_multiple_of(image_size)
            || (h / image_size) * (w / image_size) > MAX_TILES
        {
            return Err(Error::msg(format!(
                "key `{key}`: [{h}, {w}] must be positive multiples of the vision tower's image_size {image_size}, at most {MAX_TILES} tiles"
            )));
        }
        out.push((h, w));
    }
    Ok(out)
}

pub(crate) fn obj<'a>(
    m: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(v) => Err(Error::msg(format!(
            "key `{key}`: expected an object, got {v}"
        ))),
    }
}

pub(crate) fn usize_or(
    m: &Map<String, Value>,
    key: &str,
    pre: &str,
    default: usize,
) -> Result<usize> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
            Error::msg(format!(
                "key `{pre}{key}`: expected a non-negative integer, got {v}"
            ))
        }),
    }
}

fn f32_or(m: &Map<String, Value>, key: &str, pre: &str, default: f32) -> Result<f32> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x as f32),
            _ => Err(Error::msg(format!(
                "key `{pre}{key}`: expected a number, got {v}"
            ))),
        },
    }
}

fn bool_or(m: &Map<String, Value>, key: &str, pre: &str, default: bool) -> Result<bool> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| {
            Error::msg(format!("key `{pre}{key}`: expected true or false, got {v}"))
        }),
    }
}

pub(crate) fn str_or<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    default: &'a str,
) -> Result<&'a str> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_str()
            .ok_or_else(|| Error::msg(format!("key `{key}`: expected a string, got {v}"))),
    }
}

pub(crate) fn act(
    m: &Map<String, Value>,
    key: &str,
    pre: &str,
    default: &str,
) -> Result<Activation> {
    match str_or(m, key, default)? {
        "gelu" => Ok(Activation::Gelu),
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => Err(Error::msg(format!(
            "key `{pre}{key}`: activation {other:?} is not supported (gelu, quick_gelu)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_7b_config_fills_llama_defaults() {
        // The text_config of llava-hf/llava-1.5-7b-hf as published: most keys omitted.
        let cfg = LlavaConfig::from_json_str(
            r#"{"architectures":["LlavaForConditionalGeneration"],"ignore_index":-100,
            "image_token_index":32000,"model_type":"llava","pad_token_id":32001,
            "projector_hidden_act":"gelu",
            "text_config":{"architectures":["LlamaForCausalLM"],"max_position_embeddings":4096,
              "model_type":"llama","rms_norm_eps":1e-05,"torch_dtype":"float16","vocab_size":32064},
            "tie_word_embeddings":false,"torch_dtype":"float16","transformers_version":"4.36.0.dev0",
            "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,
              "model_type":"clip_vision_model","num_attention_heads":16,"num_hidden_layers":24,
              "patch_size":14,"projection_dim":768,"vocab_size":32000},
            "vision_feature_layer":-2,"vision_feature_select_strategy":"default","vocab_size":32064}"#,
        )
        .unwrap();
        assert_eq!(cfg.text.hidden_size, 4096);
        assert_eq!(cfg.text.num_hidden_layers, 32);
        assert_eq!(cfg.text.num_key_value_heads, 32);
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.text.intermediate_size, 11008);
        assert_eq!(cfg.text.vocab_size, 32064);
        assert_eq!(cfg.vision.num_patches(), 576);
        assert_eq!(cfg.image_tokens(), 576);
        assert_eq!(cfg.vision_layers_to_run(), 23);
        assert_eq!(cfg.vision.hidden_act, Activation::QuickGelu);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = LlavaConfig::from_json_str(r#"{"text_config":{"hidden_size":"big"}}"#).unwrap_err();
        assert!(e.to_string().contains("text_config.hidden_size"), "{e}");
        let e = LlavaConfig::from_json_str(r#"{"vision_config":{"patch_size":5}}"#).unwrap_err();
        assert!(e.to_string().contains("vision_config.patch_size"), "{e}");
        let e =
            LlavaConfig::from_json_str(r#"{"vision_feature_select_strategy":"cls"}"#).unwrap_err();
        assert!(
            e.to_string().contains("vision_feature_select_strategy"),
            "{e}"
        );
        let e = LlavaConfig::from_json_str("[1,2").unwrap_err();
        assert!(e.to_string().contains("invalid JSON"), "{e}");
        let e = LlavaConfig::from_json_str(
            r#"{"text_config":{"rope_scaling":{"type":"dynamic","factor":2.0}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling"), "{e}");
    }

    #[test]
    fn linear_rope_scaling_is_read() {
        let cfg = LlavaConfig::from_json_str(
            r#"{"text_config":{"rope_scaling":{"type":"linear","factor":2.0},"num_key_value_heads":8,"vocab_size":32064}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text.rope_scaling_factor, 2.0);
        assert_eq!(cfg.text.num_key_value_heads, 8);
    }

    #[test]
    fn unknown_architectures_are_refused_by_name() {
        for (json, name) in [
            (
                r#"{"architectures":["Qwen2VLForConditionalGeneration"],"model_type":"qwen2_vl"}"#,
                "Qwen2VLForConditionalGeneration (model_type qwen2_vl)",
            ),
            (r#"{"model_type":"idefics3"}"#, "model_type idefics3"),
            (
                r#"{"architectures":["PaliGemmaForConditionalGeneration"]}"#,
                "PaliGemmaForConditionalGeneration",
            ),
        ] {
            let e = LlavaConfig::from_json_str(json).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            assert!(e.contains("LlavaNextForConditionalGeneration"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = LlavaConfig::from_json_str(r#"{"text_config":{"model_type":"qwen2"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text_config.model_type") && e.contains("qwen2"),
            "{e}"
        );
        // Mistral with a window narrower than its context would attend differently.
        let e = LlavaConfig::from_json_str(
            r#"{"text_config":{"model_type":"mistral","max_position_embeddings":32768}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sliding_window"), "{e}");
    }

    #[test]
    fn llava_v16_mistral_config_is_read() {
        // llava-hf/llava-v1.6-mistral-7b-hf's config.json (keys as published).
        let cfg = LlavaConfig::from_json_str(
            r#"{"architectures":["LlavaNextForConditionalGeneration"],"ignore_index":-100,
            "image_grid_pinpoints":[[336,672],[672,336],[672,672],[1008,336],[336,1008]],
            "image_token_index":32000,"model_type":"llava_next","projector_hidden_act":"gelu",
            "text_config":{"_name_or_path":"mistralai/Mistral-7B-Instruct-v0.2",
              "architectures":["MistralForCausalLM"],"intermediate_size":14336,
              "max_position_embeddings":32768,"model_type":"mistral","num_key_value_heads":8,
              "rms_norm_eps":1e-05,"rope_theta":1000000.0,"sliding_window":null,
              "torch_dtype":"bfloat16","vocab_size":32064},
            "torch_dtype":"float16","use_image_newline_parameter":true,
            "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,
              "model_type":"clip_vision_model","num_attention_heads":16,"num_hidden_layers":24,
              "patch_size":14,"projection_dim":768,"vocab_size":32000},
            "vision_feature_layer":-2,"vision_feature_select_strategy":"default","vocab_size":32064}"#,
        )
        .unwrap();
        assert_eq!(cfg.arch, Arch::LlavaNext);
        assert_eq!(cfg.image_grid_pinpoints.len(), 5);
        assert_eq!(cfg.image_grid_pinpoints[3], (1008, 336));
        assert_eq!(cfg.text.rope_theta, 1e6);
        assert_eq!(cfg.text.num_key_value_heads, 8);
        assert_eq!(cfg.text.max_position_embeddings, 32768);
    }
}

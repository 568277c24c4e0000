//! The llama.cpp LLaVA pair: a Llama text GGUF (`general.architecture = llama`) plus an
//! `mmproj` GGUF (`general.architecture = clip`, `clip.has_llava_projector`) holding the
//! CLIP tower (`v.*`) and the projector (`mm.0`, `mm.2`), as llama.cpp's
//! `convert_hf_to_gguf.py` and `examples/llava/convert_image_encoder_to_gguf.py` write them.
//!
//! Reading maps both files onto llava-hf's (transformers < 4.52) tensor names so the same
//! loaders build the model; writing ([`write_pair`]) goes the other way from a llava-hf
//! directory. Format facts that shape this code:
//! * the converter stores only the CLIP layers that run: `clip.vision.block_count` is the
//!   number of layers to keep and the feature is the last kept layer's output, no
//!   post-LayerNorm (llava-hf's `vision_feature_layer = -2` drops the last layer);
//! * llama.cpp's mmproj names CLIP's `mlp.fc1` `ffn_down` and `mlp.fc2` `ffn_up`;
//! * the `mlp` projector drops CLS (llava-hf's `default` feature strategy) and uses GELU;
//! * the text file's Q/K rows are permuted for ggml's RoPE (see [`crate::gguf`]);
//! * a LLaVA-1.6 (LLaVA-NeXT) mmproj also holds `clip.vision.image_grid_pinpoints` (the
//!   `(height, width)` pairs flattened), usually `clip.vision.image_aspect_ratio = anyres`
//!   and `clip.vision.mm_patch_merge_type = spatial_unpad`, and the `model.image_newline`
//!   vector; the pair then loads as `LlavaNextForConditionalGeneration`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine_core::gguf::{GgufFile, GgufTensorOut, GgufValue};
use engine_core::weights::{open_safetensors, WeightSource, WeightView};
use engine_core::{DType, Error, QuantType, Result};
use half::f16;

use crate::config::{Activation, FeatureSelect, LlavaConfig, TextConfig, VisionConfig};
use crate::gguf::{text_config, LlamaGguf};
use crate::preprocess::{ImageProcessor, ResizeTarget};
use crate::prompt::IMAGE_PLACEHOLDER;

/// llava-hf name (below `vision_tower.` / `multi_modal_projector.`) of an mmproj tensor.
pub fn mmproj_hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "v.class_embd" => Some("vision_tower.vision_model.embeddings.class_embedding"),
        "v.patch_embd.weight" => {
            Some("vision_tower.vision_model.embeddings.patch_embedding.weight")
        }
        "v.position_embd.weight" => {
            Some("vision_tower.vision_model.embeddings.position_embedding.weight")
        }
        "v.pre_ln.weight" => Some("vision_tower.vision_model.pre_layrnorm.weight"),
        "v.pre_ln.bias" => Some("vision_tower.vision_model.pre_layrnorm.bias"),
        "v.post_ln.weight" => Some("vision_tower.vision_model.post_layernorm.weight"),
        "v.post_ln.bias" => Some("vision_tower.vision_model.post_layernorm.bias"),
        "mm.0.weight" => Some("multi_modal_projector.linear_1.weight"),
        "mm.0.bias" => Some("multi_modal_projector.linear_1.bias"),
        "mm.2.weight" => Some("multi_modal_projector.linear_2.weight"),
        "mm.2.bias" => Some("multi_modal_projector.linear_2.bias"),
        // LLaVA-1.6: the row separator (llama.cpp keeps haotian-liu's `model.` prefix).
        "model.image_newline" => Some("image_newline"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("v.blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_out" => "self_attn.out_proj",
        "ln1" => "layer_norm1",
        "ln2" => "layer_norm2",
        // llama.cpp's names, swapped relative to their role: fc1 is the up projection.
        "ffn_down" => "mlp.fc1",
        "ffn_up" => "mlp.fc2",
        _ => return None,
    };
    Some(format!(
        "vision_tower.vision_model.encoder.layers.{layer}.{hf}.{suffix}"
    ))
}

/// The mmproj name of a llava-hf vision or projector tensor (inverse of [`mmproj_hf_name`]).
pub fn mmproj_gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        "v.class_embd",
        "v.patch_embd.weight",
        "v.position_embd.weight",
        "v.pre_ln.weight",
        "v.pre_ln.bias",
        "v.post_ln.weight",
        "v.post_ln.bias",
        "mm.0.weight",
        "mm.0.bias",
        "mm.2.weight",
        "mm.2.bias",
        "model.image_newline",
    ];
    if let Some(g) = fixed
        .iter()
        .find(|g| mmproj_hf_name(g).as_deref() == Some(hf))
    {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("vision_tower.vision_model.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.out_proj" => "attn_out",
        "layer_norm1" => "ln1",
        "layer_norm2" => "ln2",
        "mlp.fc1" => "ffn_down",
        "mlp.fc2" => "ffn_up",
        _ => return None,
    };
    Some(format!("v.blk.{layer}.{g}.{suffix}"))
}

/// Both files of a pair seen as one llava-hf checkpoint (old naming): the decoder under
/// `language_model.`, the tower under `vision_tower.`, the projector under
/// `multi_modal_projector.`.
pub struct PairSource {
    text: LlamaGguf,
    mmproj: Arc<GgufFile>,
    /// llava-hf name → (from the text file?, name in that source).
    names: BTreeMap<String, (bool, String)>,
}

impl WeightSource for PairSource {
    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        match self.names.get(name) {
            Some((true, n)) => self.text.view(n),
            Some((false, n)) => self.mmproj.view(n),
            None => Err(Error::weight(name, "missing from the GGUF pair")),
        }
    }
    fn total_bytes(&self) -> u64 {
        self.text.total_bytes() + self.mmproj.total_bytes()
    }
}

/// Everything a LLaVA needs from a GGUF pair, before weights are uploaded.
pub struct PairParts {
    /// Config assembled from both files' metadata.
    pub config: LlavaConfig,
    /// Rebuilt from the text file's `tokenizer.ggml.*` metadata.
    pub tokenizer: tokenizers::Tokenizer,
    /// CLIP preprocessing at the tower's size with the mmproj's mean/std.
    pub processor: ImageProcessor,
    /// Tensors of both files under llava-hf names.
    pub source: Arc<dyn WeightSource>,
}

fn mm_u(f: &GgufFile, key: &str) -> Result<usize> {
    let v = f.get_u64(key)?;
    usize::try_from(v).map_err(|_| Error::file(f.path(), format!("{key} = {v} is too large")))
}

fn f64_triple(f: &GgufFile, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
    let Some(v) = f.get(key) else {
        return Ok(default);
    };
    let arr = v
        .as_array()
        .filter(|a| a.len() == 3)
        .ok_or_else(|| Error::file(f.path(), format!("`{key}` is not an array of 3 numbers")))?;
    let mut out = [0.0; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x
            .as_f64()
            .ok_or_else(|| Error::file(f.path(), format!("`{key}` holds a non-number")))?;
    }
    Ok(out)
}

/// The vision config of an mmproj file: `block_count` layers, all of which run.
pub fn mmproj_vision_config(f: &GgufFile) -> Result<VisionConfig> {
    let arch = f.get_str("general.architecture")?;
    if arch != "clip" {
        return Err(Error::file(
            f.path(),
            format!("general.architecture is `{arch}`, not `clip`: not an mmproj file"),
        ));
    }
    if f.get("clip.has_llava_projector")
        .and_then(GgufValue::as_bool)
        != Some(true)
    {
        return Err(Error::file(
            f.path(),
            "clip.has_llava_projector is not true: not a LLaVA mmproj file",
        ));
    }
    match f.get("clip.projector_type").and_then(GgufValue::as_str) {
        None | Some("mlp") => {}
        Some(other) => {
            return Err(Error::file(
                f.path(),
                format!("projector type `{other}` is not supported (only `mlp`, LLaVA-1.5)"),
            ))
        }
    }
    let layers = mm_u(f, "clip.vision.block_count")?;
    // The converter truncates the tower to max(feature_layer); one layer that is the last
    // kept one is what LLaVA-1.5 uses. Several (granite's multi-layer features) are not.
    if let Some(v) = f.get("clip.vision.feature_layer") {
        let fl: Vec<u64> = v
            .as_array()
            .map(|a| a.iter().filter_map(GgufValue::as_u64).collect())
            .unwrap_or_default();
        if fl != [layers as u64] {
            return Err(Error::file(
                f.path(),
                format!("clip.vision.feature_layer {fl:?} is not supported (only the last of the {layers} stored layers)"),
            ));
        }
    }
    let hidden = mm_u(f, "clip.vision.embedding_length")?;
    let heads = mm_u(f, "clip.vision.attention.head_count")?;
    let image_size = mm_u(f, "clip.vision.image_size")?;
    let patch_size = mm_u(f, "clip.vision.patch_size")?;
    if heads == 0 || hidden % heads != 0 || patch_size == 0 || image_size % patch_size != 0 {
        return Err(Error::file(
            f.path(),
            format!("inconsistent vision tower: width {hidden}, {heads} heads, image {image_size} px, patch {patch_size} px"),
        ));
    }
    let cfg = VisionConfig {
        hidden_size: hidden,
        intermediate_size: mm_u(f, "clip.vision.feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        image_size,
        patch_size,
        num_channels: 3,
        layer_norm_eps: f.get_f64("clip.vision.attention.layer_norm_epsilon")? as f32,
        hidden_act: if f.get("clip.use_gelu").and_then(GgufValue::as_bool) == Some(true) {
            Activation::Gelu
        } else {
            Activation::QuickGelu
        },
    };
    cfg.check(|k| {
        match k {
            "hidden_size" => "clip.vision.embedding_length",
            "intermediate_size" => "clip.vision.feed_forward_length",
            "num_hidden_layers" => "clip.vision.block_count",
            "image_size" => "clip.vision.image_size",
            "layer_norm_eps" => "clip.vision.attention.layer_norm_epsilon",
            other => other,
        }
        .to_string()
    })
    .map_err(|e| Error::file(f.path(), e.to_string()))?;
    Ok(cfg)
}

/// LLaVA-1.6's any-resolution grid of an mmproj (`(height, width)` pinpoints; empty for a
/// LLaVA-1.5 mmproj): llama.cpp's converter flattens `image_grid_pinpoints` into
/// `clip.vision.image_grid_pinpoints` and stores `model.image_newline`. The pair must have
/// both, and the anyres/spatial_unpad packing LLaVA-NeXT uses when it names one.
pub fn mmproj_pinpoints(f: &GgufFile, vc: &VisionConfig) -> Result<Vec<(usize, usize)>> {
    let grid = f.get("clip.vision.image_grid_pinpoints");
    let newline = f.tensor_info("model.image_newline");
    match (grid, newline) {
        (None, None) => return Ok(Vec::new()),
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::file(
                f.path(),
                "a LLaVA-1.6 mmproj needs both clip.vision.image_grid_pinpoints and model.image_newline (one is missing)",
            ))
        }
        _ => {}
    }
    for (key, want) in [
        ("clip.vision.image_aspect_ratio", "anyres"),
        ("clip.vision.mm_patch_merge_type", "spatial_unpad"),
    ] {
        if let Some(v) = f.get(key) {
            if v.as_str() != Some(want) {
                return Err(Error::file(
                    f.path(),
                    format!("{key} is {v:?}; visi implements LLaVA-NeXT's `{want}` only"),
                ));
            }
        }
    }
    let flat: Vec<u64> = grid
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    if flat.is_empty() || !flat.len().is_multiple_of(2) || flat.len() > 512 {
        return Err(Error::file(
            f.path(),
            format!(
                "clip.vision.image_grid_pinpoints holds {} values, not (height, width) pairs of positive integers",
                flat.len()
            ),
        ));
    }
    let pairs = serde_json::Value::from(
        flat.chunks_exact(2)
            .map(|p| serde_json::json!([p[0], p[1]]))
            .collect::<Vec<_>>(),
    );
    crate::config::pinpoints(Some(&pairs), vc.image_size)
        .map_err(|e| Error::file(f.path(), format!("clip.vision.image_grid_pinpoints: {e}")))
}

/// Opens a pair, checks that its halves fit each other, and assembles config, tokenizer,
/// processor and a weight source.
pub fn open_pair(text: &Path, mmproj: &Path) -> Result<PairParts> {
    let tf = Arc::new(GgufFile::open(text)?);
    let mf = Arc::new(GgufFile::open(mmproj)?);
    let tc: TextConfig = text_config(&tf)?;
    let vc = mmproj_vision_config(&mf)?;
    let mut tokenizer = crate::gguf::tokenizer(&tf)?;
    // llama.cpp has no image token; llava-hf conversions carry `<image>`. Without one an
    // id past the vocabulary stands for the span (it is never embedded).
    let image_token_index = match tokenizer.token_to_id(IMAGE_PLACEHOLDER) {
        Some(id) => id,
        None => {
            let id = tokenizer.get_vocab_size(true) as u32;
            tokenizer.add_special_tokens(&[tokenizers::AddedToken::from(IMAGE_PLACEHOLDER, true)]);
            tokenizer.token_to_id(IMAGE_PLACEHOLDER).unwrap_or(id)
        }
    };
    // The projector must map the tower's width to the decoder's.
    let shape_of = |name: &str| mf.tensor_info(name).map(|t| t.shape.clone());
    let want = [
        ("mm.0.weight", vec![tc.hidden_size, vc.hidden_size]),
        ("mm.2.weight", vec![tc.hidden_size, tc.hidden_size]),
    ];
    for (name, shape) in want {
        match shape_of(name) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(Error::file(
                    mmproj,
                    format!("{name} is {s:?} but the text model needs {shape:?} (vision width {}, text hidden {}): the mmproj does not belong to this text model", vc.hidden_size, tc.hidden_size),
                ))
            }
            None => return Err(Error::file(mmproj, format!("{name} is missing"))),
        }
    }
    let image_grid_pinpoints = mmproj_pinpoints(&mf, &vc)?;
    if let Some(t) = mf.tensor_info("model.image_newline") {
        if t.shape != [tc.hidden_size] {
            return Err(Error::file(
                mmproj,
                format!(
                    "model.image_newline is {:?} but the text model's hidden size is {}",
                    t.shape, tc.hidden_size
                ),
            ));
        }
    }
    let config = LlavaConfig {
        arch: if image_grid_pinpoints.is_empty() {
            crate::config::Arch::Llava
        } else {
            crate::config::Arch::LlavaNext
        },
        image_grid_pinpoints,
        text: tc.clone(),
        vision: vc.clone(),
        image_token_index,
        projector_hidden_act: Activation::Gelu,
        vision_feature_layer: -1,
        vision_feature_select_strategy: FeatureSelect::Default,
    };
    let s = vc.image_size;
    let processor = ImageProcessor {
        size: ResizeTarget::ShortestEdge(s),
        crop_size: (s, s),
        image_mean: f64_triple(
            &mf,
            "clip.vision.image_mean",
            ImageProcessor::default().image_mean,
        )?,
        image_std: f64_triple(
            &mf,
            "clip.vision.image_std",
            ImageProcessor::default().image_std,
        )?,
        ..Default::default()
    };
    crate::checks::check_processor(&processor, &config, mmproj)?;
    let text_src = LlamaGguf::new(tf, &tc)?;
    let mut names = BTreeMap::new();
    for n in text_src.names() {
        names.insert(format!("language_model.{n}"), (true, n));
    }
    for info in mf.tensor_infos() {
        if let Some(hf) = mmproj_hf_name(&info.name) {
            names.insert(hf, (false, info.name.clone()));
        }
    }
    Ok(PairParts {
        config,
        tokenizer,
        processor,
        source: Arc::new(PairSource {
            text: text_src,
            mmproj: mf,
            names,
        }),
    })
}

// ---------------------------------------------------------------------------------------
// writing (visi-cli quantize)
// ---------------------------------------------------------------------------------------

/// What [`write_pair`] wrote.
#[derive(Clone, Debug)]
pub struct WrittenPair {
    /// `<name>.<quant>.gguf`.
    pub text: PathBuf,
    /// `mmproj-<name>.f16.gguf`.
    pub mmproj: PathBuf,
    /// Text matrices stored in the requested type / kept f16 because their rows are not
    /// whole blocks.
    pub quantized: usize,
    /// See `quantized`.
    pub fallback_f16: usize,
}

/// The text file's type: F16 or a quantized type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairType {
    /// Every matrix f16, vectors f32.
    F16,
    /// Matrices whose rows are whole blocks in this type, the others f16.
    Quant(QuantType),
}

impl PairType {
    /// `f16`, `q8_0`, `q4_0`, `q4_1`, `q4_k`.
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("f16") {
            return Some(PairType::F16);
        }
        QuantType::parse(s).map(PairType::Quant)
    }
    /// The name used in file names (`f16`, `q8_0`, ...).
    pub fn name(&self) -> String {
        match self {
            PairType::F16 => "f16".into(),
            PairType::Quant(q) => q.name().to_string(),
        }
    }
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_MOSTLY_*).
    fn file_type(&self) -> u32 {
        match self {
            PairType::F16 => 1,
            PairType::Quant(QuantType::Q4_0) => 2,
            PairType::Quant(QuantType::Q4_1) => 3,
            PairType::Quant(QuantType::Q8_0) => 7,
            PairType::Quant(QuantType::Q4K) => 15,
        }
    }
}

/// Any stored dtype as f32 (writing reads llava-hf's f16/bf16/f32).
fn to_f32(v: &WeightView<'_>) -> Vec<f32> {
    let b = v.bytes;
    match v.dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::Quant(q) => {
            let mut out = vec![0f32; v.shape.iter().product::<usize>()];
            engine_core::quant::dequantize(q, b, &mut out);
            out
        }
        DType::U32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
    }
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// llama.cpp's Q/K row permutation (HF "rotate half" pairs → ggml's adjacent pairs):
/// GGUF row `h*d + 2i + t` holds HF row `h*d + t*d/2 + i`.
fn permute_rows(x: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || x.len() != rows * cols
    {
        return Err(Error::msg(format!(
            "{rows} rows cannot be split into {heads} heads of rotary pairs"
        )));
    }
    let d = rows / heads;
    let mut out = vec![0.0; x.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for t in 0..2 {
                let g = h * d + 2 * i + t;
                let hf = h * d + t * (d / 2) + i;
                out[g * cols..(g + 1) * cols].copy_from_slice(&x[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The text GGUF name of a llava-hf decoder tensor (below `language_model.`), with the
/// heads to permute over for Q/K.
fn text_gguf_name(hf: &str, cfg: &TextConfig) -> Option<(String, Option<usize>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let (g, heads) = match part {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(cfg.num_attention_heads)),
        "self_attn.k_proj" => ("attn_k", Some(cfg.num_key_value_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{g}.{suffix}"), heads))
}

/// `tokenizer.ggml.*` metadata from a `tokenizer.json` of the Llama kind (BPE with byte
/// fallback and `▁` spaces). Scores are `-rank` of the first merge that makes a token (0
/// for unmerged ones), so SentencePiece-style best-score-first merging (llama.cpp) and
/// [`crate::gguf::spm_merges`] both reproduce the file's merge order.
fn tokenizer_metadata(path: &Path, cfg: &TextConfig) -> Result<Vec<(String, GgufValue)>> {
    let text =
        engine_core::files::read_text_limited(path, engine_core::files::MAX_TOKENIZER_BYTES)?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let model = &j["model"];
    if model["type"] != "BPE" || model["byte_fallback"] != true {
        return Err(Error::file(
            path,
            "only Llama-style tokenizers (BPE with byte_fallback) can be written as tokenizer.ggml.model = llama",
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::file(path, "model.vocab is not an object"))?;
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size];
    let mut put = |id: u64, t: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "token `{t}` has id {id}, past the model's vocabulary of {}",
                    cfg.vocab_size
                ),
            )
        })?;
        *slot = Some(t.to_string());
        Ok(())
    };
    for (t, id) in vocab {
        put(id.as_u64().unwrap_or(u64::MAX), t)?;
    }
    let mut special = std::collections::HashSet::new();
    let mut added = std::collections::HashSet::new();
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        put(id, t)?;
        if a["special"] == true {
            special.insert(id as usize);
        } else {
            added.insert(id as usize);
        }
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| Error::file(path, "model.merges is not an array"))?;
    let mut rank: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (r, m) in merges.iter().enumerate() {
        let joined = match m {
            serde_json::Value::String(s) => s.replacen(' ', "", 1),
            serde_json::Value::Array(p) => p.iter().filter_map(|x| x.as_str()).collect(),
            _ => continue,
        };
        rank.entry(joined).or_insert(r);
    }
    let mut toks = Vec::with_capacity(tokens.len());
    let mut scores = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.into_iter().enumerate() {
        // Rows of the embedding with no token (padding to a multiple) get a placeholder.
        let t = t.unwrap_or_else(|| format!("[PAD{i}]"));
        let is_byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        let ty = if special.contains(&i) {
            3
        } else if added.contains(&i) {
            4
        } else if is_byte {
            6
        } else {
            1
        };
        scores.push(GgufValue::F32(
            rank.get(&t).map_or(0.0, |&r| -(r as f32) - 1.0),
        ));
        types.push(GgufValue::I32(ty));
        toks.push(GgufValue::String(t));
    }
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            GgufValue::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(toks)),
        (
            "tokenizer.ggml.scores".to_string(),
            GgufValue::Array(scores),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types),
        ),
    ];
    if let Some(b) = cfg.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| vocab.get(u))
        .and_then(|v| v.as_u64());
    if let Some(u) = unk {
        md.push((
            "tokenizer.ggml.unknown_token_id".into(),
            GgufValue::U32(u as u32),
        ));
    }
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(cfg.bos_token_id.is_some()),
    ));
    md.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(false),
    ));
    Ok(md)
}

/// The output paths for `out`: a directory (existing, or ending in `/`) gets
/// `<dir>/<name>.<type>.gguf` and `<dir>/mmproj-<name>.f16.gguf` with `name` the model
/// directory's name; anything else is a prefix `<prefix>.<type>.gguf` and
/// `<parent>/mmproj-<prefix name>.f16.gguf`.
pub fn pair_paths(model_dir: &Path, out: &Path, ty: PairType) -> (PathBuf, PathBuf) {
    let as_dir = out.is_dir() || out.to_string_lossy().ends_with('/');
    let (dir, name) = if as_dir {
        let name = model_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        (out.to_path_buf(), name)
    } else {
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (dir, name)
    };
    (
        dir.join(format!("{name}.{}.gguf", ty.name())),
        dir.join(format!("mmproj-{name}.f16.gguf")),
    )
}

/// Converts a llava-hf directory to the llama.cpp pair: the decoder in `ty` (matrices
/// whose rows are not whole blocks stay f16, vectors f32, as llama.cpp falls back), the
/// CLIP tower and projector in f16 (vectors f32) with only the layers that run.
/// `progress(done, total)` counts tensors. Nothing is written when a target exists and
/// `force` is false; the inputs are only read.
pub fn write_pair(
    model_dir: &Path,
    out: &Path,
    ty: PairType,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<WrittenPair> {
    let cfg = LlavaConfig::from_file(&model_dir.join("config.json"))?;
    if cfg.vision_feature_select_strategy != FeatureSelect::Default {
        return Err(Error::file(
            model_dir.join("config.json"),
            "vision_feature_select_strategy `full` has no llama.cpp mmproj equivalent (its mlp projector always drops CLS)",
        ));
    }
    if cfg.projector_hidden_act != Activation::Gelu {
        return Err(Error::file(
            model_dir.join("config.json"),
            "projector_hidden_act must be gelu for llama.cpp's mlp projector",
        ));
    }
    // An existing non-directory `--out` (`/dev/full`, a file) would be taken as a prefix
    // and write beside it (into /dev): refuse it.
    if out.exists() && !out.is_dir() {
        return Err(Error::file(
            out,
            "exists and is not a directory (give a directory or a new file name prefix)",
        ));
    }
    let (text_path, mmproj_path) = pair_paths(model_dir, out, ty);
    for p in [&text_path, &mmproj_path] {
        if p.exists() && !force {
            return Err(Error::file(p, "already exists (pass --force to overwrite)"));
        }
    }
    if let Some(dir) = text_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::file(dir, "output directory does not exist"));
        }
    }
    let src = open_safetensors(model_dir)?;
    // Every size the written file states must be one the checkpoint holds (a config with
    // 10^9 layers would otherwise be written into a GGUF that cannot load).
    crate::checks::check_layers(
        &cfg,
        src.as_ref(),
        "config.json: text_config.num_hidden_layers",
    )?;
    let pp = model_dir.join("preprocessor_config.json");
    let proc = if pp.exists() {
        let p = ImageProcessor::from_file(&pp)?;
        crate::checks::check_processor(&p, &cfg, &pp)?;
        p
    } else {
        ImageProcessor::default()
    };
    let (lm, head, vt, mm) = if src.contains("language_model.model.embed_tokens.weight") {
        ("language_model.", "language_model.", "", "")
    } else if src.contains("model.language_model.embed_tokens.weight") {
        ("model.language_", "", "model.", "model.")
    } else {
        return Err(Error::weight(
            "language_model.model.embed_tokens.weight",
            "missing: not a llava-hf checkpoint",
        ));
    };
    // Old-naming name of every tensor (the mapping below is written for it).
    let old_name = |n: &str| -> Option<String> {
        if let Some(r) = n.strip_prefix(lm) {
            if lm == "model.language_" {
                return Some(format!(
                    "language_model.model.{}",
                    r.strip_prefix("model.")?
                ));
            }
            return Some(format!("language_model.{r}"));
        }
        if head.is_empty() && n == "lm_head.weight" {
            return Some("language_model.lm_head.weight".into());
        }
        if n == "image_newline" || n == "model.image_newline" {
            return Some("image_newline".into());
        }
        n.strip_prefix(vt)
            .filter(|r| r.starts_with("vision_tower."))
            .or_else(|| {
                n.strip_prefix(mm)
                    .filter(|r| r.starts_with("multi_modal_projector."))
            })
            .map(str::to_string)
    };
    let names = src.names();
    let total = names.len();
    let keep_layers = cfg.vision_layers_to_run();
    let tc = &cfg.text;
    let mut text_t = Vec::new();
    let mut mm_t = Vec::new();
    let (mut quantized, mut fallback) = (0, 0);
    for (done, n) in names.iter().enumerate() {
        progress(done, total);
        let Some(old) = old_name(n) else { continue };
        let v = src.view(n)?;
        let shape = v.shape.to_vec();
        if let Some(hf) = old.strip_prefix("language_model.") {
            let Some((g, heads)) = text_gguf_name(hf, tc) else {
                continue;
            };
            let mut x = to_f32(&v);
            if let (Some(h), [rows, cols]) = (heads, &shape[..]) {
                x = permute_rows(&x, *rows, *cols, h)
                    .map_err(|e| Error::weight(n, e.to_string()))?;
            } else if let (Some(h), [rows]) = (heads, &shape[..]) {
                x = permute_rows(&x, *rows, 1, h).map_err(|e| Error::weight(n, e.to_string()))?;
            }
            let (dtype, bytes) = match (ty, &shape[..]) {
                (_, [_]) => (DType::F32, f32_bytes(&x)),
                (PairType::Quant(q), [_, k]) if k % q.block_size() == 0 => {
                    quantized += 1;
                    (
                        DType::Quant(q),
                        engine_core::quant::quantize(q, &x)
                            .map_err(|e| Error::weight(n, e.to_string()))?,
                    )
                }
                (PairType::Quant(_), _) => {
                    fallback += 1;
                    (DType::F16, f16_bytes(&x))
                }
                (PairType::F16, _) => (DType::F16, f16_bytes(&x)),
            };
            text_t.push(GgufTensorOut {
                name: g,
                dtype,
                shape,
                bytes,
            });
        } else if let Some(g) = mmproj_gguf_name(&old) {
            if g.starts_with("v.post_ln") {
                continue; // LLaVA never runs the post-LayerNorm
            }
            if let Some(layer) = g
                .strip_prefix("v.blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, _)| l.parse::<usize>().ok())
            {
                if layer >= keep_layers {
                    continue; // layers past the feature layer never run
                }
            }
            let x = to_f32(&v);
            // The converter's rule: 4-D (the patch convolution) and 2-D `.weight` f16.
            let half = shape.len() == 4 || (shape.len() == 2 && g.ends_with(".weight"));
            let (dtype, bytes) = if half {
                (DType::F16, f16_bytes(&x))
            } else {
                (DType::F32, f32_bytes(&x))
            };
            mm_t.push(GgufTensorOut {
                name: g,
                dtype,
                shape,
                bytes,
            });
        }
    }
    progress(total, total);

    let name = text_path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_end_matches(&format!(".{}.gguf", ty.name()))
                .to_string()
        })
        .unwrap_or_default();
    let u32v = |x: usize| GgufValue::U32(x as u32);
    let mut tmd: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.clone())),
        ("llama.block_count".into(), u32v(tc.num_hidden_layers)),
        (
            "llama.context_length".into(),
            u32v(tc.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32v(tc.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32v(tc.intermediate_size),
        ),
        (
            "llama.attention.head_count".into(),
            u32v(tc.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(tc.num_key_value_heads),
        ),
        ("llama.rope.freq_base".into(), GgufValue::F32(tc.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(tc.rms_norm_eps),
        ),
        ("llama.attention.key_length".into(), u32v(tc.head_dim)),
        ("llama.attention.value_length".into(), u32v(tc.head_dim)),
        ("general.file_type".into(), GgufValue::U32(ty.file_type())),
        ("llama.vocab_size".into(), u32v(tc.vocab_size)),
        ("llama.rope.dimension_count".into(), u32v(tc.head_dim)),
    ];
    if tc.rope_scaling_factor != 1.0 {
        tmd.push((
            "llama.rope.scaling.type".into(),
            GgufValue::String("linear".into()),
        ));
        tmd.push((
            "llama.rope.scaling.factor".into(),
            GgufValue::F32(tc.rope_scaling_factor),
        ));
    }
    tmd.extend(tokenizer_metadata(&model_dir.join("tokenizer.json"), tc)?);
    tmd.push(("general.quantization_version".into(), GgufValue::U32(2)));

    let vc = &cfg.vision;
    let f32a =
        |a: [f64; 3]| GgufValue::Array(a.iter().map(|&v| GgufValue::F32(v as f32)).collect());
    let mut mmd: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String("clip".into()),
        ),
        ("clip.has_text_encoder".into(), GgufValue::Bool(false)),
        ("clip.has_vision_encoder".into(), GgufValue::Bool(true)),
        ("clip.has_llava_projector".into(), GgufValue::Bool(true)),
        ("general.file_type".into(), GgufValue::U32(1)),
        ("general.name".into(), GgufValue::String(name)),
        (
            "general.description".into(),
            GgufValue::String("image encoder for LLaVA".into()),
        ),
        (
            "clip.projector_type".into(),
            GgufValue::String("mlp".into()),
        ),
        ("clip.vision.image_size".into(), u32v(vc.image_size)),
        ("clip.vision.patch_size".into(), u32v(vc.patch_size)),
        ("clip.vision.embedding_length".into(), u32v(vc.hidden_size)),
        (
            "clip.vision.feed_forward_length".into(),
            u32v(vc.intermediate_size),
        ),
        ("clip.vision.projection_dim".into(), u32v(vc.hidden_size)),
        (
            "clip.vision.attention.head_count".into(),
            u32v(vc.num_attention_heads),
        ),
        (
            "clip.vision.attention.layer_norm_epsilon".into(),
            GgufValue::F32(vc.layer_norm_eps),
        ),
        ("clip.vision.block_count".into(), u32v(keep_layers)),
        ("clip.vision.image_mean".into(), f32a(proc.image_mean)),
        ("clip.vision.image_std".into(), f32a(proc.image_std)),
        (
            "clip.use_gelu".into(),
            GgufValue::Bool(vc.hidden_act == Activation::Gelu),
        ),
    ];
    if cfg.arch == crate::config::Arch::LlavaNext {
        // What llama.cpp's converter writes from LLaVA-1.6's vision config (config_vit.json):
        // the pinpoints flattened, anyres tiling, spatial_unpad packing.
        let flat = cfg
            .image_grid_pinpoints
            .iter()
            .flat_map(|&(h, w)| [GgufValue::I32(h as i32), GgufValue::I32(w as i32)])
            .collect();
        mmd.push((
            "clip.vision.image_grid_pinpoints".into(),
            GgufValue::Array(flat),
        ));
        mmd.push((
            "clip.vision.image_aspect_ratio".into(),
            GgufValue::String("anyres".into()),
        ));
        mmd.push((
            "clip.vision.mm_patch_merge_type".into(),
            GgufValue::String("spatial_unpad".into()),
        ));
        if !mm_t.iter().any(|t| t.name == "model.image_newline") {
            return Err(Error::weight(
                "image_newline",
                "missing: not a LLaVA-NeXT checkpoint",
            ));
        }
    }
    let text_bytes = engine_core::gguf::to_gguf_bytes(&tmd, &text_t)?;
    let mm_bytes = engine_core::gguf::to_gguf_bytes(&mmd, &mm_t)?;
    // Both files or neither: a text model without its mmproj is no pair.
    engine_core::files::write_files_atomic(
        &[(&text_path, &text_bytes), (&mmproj_path, &mm_bytes)],
        force,
    )?;
    Ok(WrittenPair {
        text: text_path,
        mmproj: mmproj_path,
        quantized,
        fallback_f16: fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmproj_names_round_trip() {
        let g = [
            "v.class_embd",
            "v.patch_embd.weight",
            "v.position_embd.weight",
            "v.pre_ln.bias",
            "mm.0.weight",
            "mm.2.bias",
            "v.blk.1.attn_q.weight",
            "v.blk.0.attn_out.bias",
            "v.blk.2.ffn_down.weight",
            "v.blk.2.ffn_up.bias",
            "v.blk.0.ln1.weight",
            "v.blk.0.ln2.bias",
        ];
        for n in g {
            let hf = mmproj_hf_name(n).unwrap_or_else(|| panic!("{n}: no HF name"));
            assert_eq!(mmproj_gguf_name(&hf).as_deref(), Some(n), "{n} -> {hf}");
        }
        assert_eq!(
            mmproj_hf_name("v.blk.2.ffn_down.weight").as_deref(),
            Some("vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight")
        );
        assert_eq!(mmproj_hf_name("v.blk.x.ln1.weight"), None);
        assert_eq!(mmproj_hf_name("mm.1.weight"), None);
    }

    #[test]
    fn pair_paths_for_a_directory_and_a_prefix() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llava-mha");
        let q8 = PairType::parse("q8_0").expect("q8_0");
        let (t, m) = pair_paths(&model, Path::new("/nonexistent/out/"), q8);
        assert_eq!(t, Path::new("/nonexistent/out/tiny-llava-mha.q8_0.gguf"));
        assert_eq!(
            m,
            Path::new("/nonexistent/out/mmproj-tiny-llava-mha.f16.gguf")
        );
        let (t, m) = pair_paths(&model, Path::new("/nonexistent/out/llava7b"), PairType::F16);
        assert_eq!(t, Path::new("/nonexistent/out/llava7b.f16.gguf"));
        assert_eq!(m, Path::new("/nonexistent/out/mmproj-llava7b.f16.gguf"));
        assert_eq!(
            PairType::parse("Q4_K").map(|t| t.name()),
            Some("q4_k".into())
        );
        assert_eq!(PairType::parse("q5_k"), None);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        let (rows, cols, heads) = (12, 3, 3);
        let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&x, rows, cols, heads).expect("permute");
        // Row 1 of head 0 in GGUF order is HF row d/2 = 2.
        assert_eq!(&p[cols..2 * cols], &x[2 * cols..3 * cols]);
        assert!(permute_rows(&x, rows, cols, 5).is_err());
    }
}

//! MobileVLM V2's `config.json` (a Llama config plus the authors' `mm_*` keys) and where its
//! vision tower comes from.
//!
//! The authors' `CLIPVisionTower` always reads the tower's config and image processor from
//! `mm_vision_tower`; its weights come from the checkpoint when it holds
//! `model.vision_tower.vision_tower.vision_model.*`, else from that directory too. visi
//! resolves `mm_vision_tower` as a directory (absolute, or relative to the model
//! directory), else as a repo id in the Hugging Face cache; `--vision-tower DIR` overrides it.

use std::path::{Path, PathBuf};

use engine_core::weights::WeightSource;
use engine_core::{Error, Result};
use serde_json::{Map, Value};

use crate::config::{
    str_or, usize_or, Activation, Arch, FeatureSelect, LlavaConfig, TextConfig, VisionConfig,
};
use crate::preprocess::{ImageProcessor, ResizeTarget};

/// The prefix of a vision tower stored inside a MobileVLM checkpoint.
pub const TOWER_PREFIX: &str = "model.vision_tower.vision_tower";

/// The released models' `mm_vision_tower`, whose config visi knows without its directory.
pub const CLIP_L_336: &str = "openai/clip-vit-large-patch14-336";

/// Where the vision tower's weights are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TowerSource {
    /// `model.vision_tower.vision_tower.vision_model.*` in the checkpoint.
    Checkpoint,
    /// A `CLIPVisionModel` (or `CLIPModel`) directory: `vision_model.*`.
    Dir(PathBuf),
}

/// A MobileVLM directory's config, image processor and tower location.
#[derive(Clone, Debug)]
pub struct MobileVlmSetup {
    /// The config in the engine's terms (`arch` = [`Arch::MobileVlm`]).
    pub cfg: LlavaConfig,
    /// The tower's `preprocessor_config.json` (CLIP's defaults at its size when absent).
    pub processor: ImageProcessor,
    /// Where the tower's weights come from.
    pub tower: TowerSource,
    /// The directory the tower's config came from (`None`: the built-in CLIP-L/336).
    pub tower_dir: Option<PathBuf>,
}

fn refuse(path: &Path, key: &str, msg: String) -> Error {
    Error::file(path, format!("key `{key}`: {msg}"))
}

static VISION_TOWER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the process-wide `--vision-tower DIR` (the CLI's flag): it overrides every MobileVLM
/// config's `mm_vision_tower` where no explicit directory is passed. Set once; a second
/// call is ignored.
pub fn set_default_vision_tower(dir: PathBuf) {
    let _ = VISION_TOWER.set(dir);
}

/// The config of the MobileVLM directory `dir` as [`read_config`] gives it, with the
/// checkpoint's tensor names read from its headers only (for checks before loading).
pub fn read_dir_config(dir: &Path, vision_tower: Option<&Path>) -> Result<LlavaConfig> {
    let source = engine_core::weights::open_safetensors(dir)?;
    Ok(read_config(dir, source.as_ref(), vision_tower)?.cfg)
}

/// A JSON file's top-level object (size-limited read; errors name the file).
fn read_object(path: &Path) -> Result<Map<String, Value>> {
    let text = engine_core::files::read_text_limited(path, engine_core::files::MAX_CONFIG_BYTES)?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::file(path, "expected a JSON object")),
        Err(e) => Err(Error::file(path, format!("invalid JSON: {e}"))),
    }
}

/// Whether the `config.json` at `path` describes MobileVLM (read before choosing a loader).
pub fn is_mobilevlm(path: &Path) -> Result<bool> {
    let root = read_object(path)?;
    let arch = Arch::detect(&root).map_err(|e| match e {
        Error::Msg(m) => Error::file(path, m),
        other => other,
    })?;
    Ok(arch == Arch::MobileVlm)
}

/// Reads `dir/config.json`, finds the vision tower (`vision_tower` overrides
/// `mm_vision_tower`) and checks the parts against each other. `source` is the checkpoint
/// (to see whether it holds the tower).
pub fn read_config(
    dir: &Path,
    source: &dyn WeightSource,
    vision_tower: Option<&Path>,
) -> Result<MobileVlmSetup> {
    let path = dir.join("config.json");
    let root = &read_object(&path)?;
    let m = |e: Error| match e {
        Error::Msg(m) => Error::file(&path, m),
        other => other,
    };
    // What the released V2 models set; anything else runs differently upstream.
    for (key, default, want, why) in [
        (
            "mm_projector_type",
            "linear",
            "ldpnetv2",
            "MobileVLM V2's \"ldpnetv2\" only",
        ),
        (
            "image_aspect_ratio",
            "",
            "pad",
            "MobileVLM V2's \"pad\" only",
        ),
        // `cls_patch` gives 577 tokens, which the projector's square grid cannot hold.
        (
            "mm_vision_select_feature",
            "patch",
            "patch",
            "\"patch\" only with ldpnetv2",
        ),
    ] {
        let got = str_or(root, key, default).map_err(m)?;
        if got != want {
            return Err(refuse(
                &path,
                key,
                format!("{got:?} is not supported ({why})"),
            ));
        }
    }
    if root.get("mm_use_im_start_end").and_then(Value::as_bool) == Some(true) {
        return Err(refuse(
            &path,
            "mm_use_im_start_end",
            "true is not supported".into(),
        ));
    }
    // The decoder keys are a LlamaConfig's at the top level.
    let mut tm: Map<String, Value> = root.clone();
    tm.insert("model_type".into(), Value::String("llama".into()));
    let text_cfg = TextConfig::from_map(&tm, "").map_err(m)?;
    let spec = str_or(root, "mm_vision_tower", "").map_err(m)?;
    let inside = source.contains(&format!(
        "{TOWER_PREFIX}.vision_model.embeddings.patch_embedding.weight"
    ));
    let tower_dir = match vision_tower.or(VISION_TOWER.get().map(PathBuf::as_path)) {
        Some(d) if d.is_dir() => Some(d.to_path_buf()),
        Some(d) => return Err(Error::file(d, "--vision-tower: not a directory")),
        None => resolve_tower(dir, spec),
    };
    let (vision, processor) = match &tower_dir {
        Some(td) => read_tower(td)?,
        None if inside && spec == CLIP_L_336 => {
            let v = VisionConfig::llava_default();
            let s = v.image_size;
            let p = ImageProcessor {
                size: ResizeTarget::ShortestEdge(s),
                crop_size: (s, s),
                ..Default::default()
            };
            (v, p)
        }
        None => {
            let why = if inside {
                "its config and image processor"
            } else {
                "its weights (the checkpoint has no model.vision_tower.*), config and image processor"
            };
            return Err(refuse(
                &path,
                "mm_vision_tower",
                format!(
                    "{spec:?} is neither a directory (absolute or relative to {}) nor a model in the Hugging Face cache, and no --vision-tower DIR was given: MobileVLM reads the vision tower's {why} from there",
                    dir.display()
                ),
            ));
        }
    };
    let mm_hidden = usize_or(root, "mm_hidden_size", "", vision.hidden_size).map_err(m)?;
    if mm_hidden != vision.hidden_size {
        return Err(refuse(
            &path,
            "mm_hidden_size",
            format!(
                "{mm_hidden} but the vision tower's hidden_size is {}",
                vision.hidden_size
            ),
        ));
    }
    let layer = match root.get("mm_vision_select_layer") {
        None | Some(Value::Null) => -2,
        Some(v) => v.as_i64().ok_or_else(|| {
            refuse(
                &path,
                "mm_vision_select_layer",
                format!("expected an integer, got {v}"),
            )
        })?,
    };
    let n = vision.num_hidden_layers as i64;
    if layer < -(n + 1) || layer > n {
        return Err(refuse(
            &path,
            "mm_vision_select_layer",
            format!("{layer} is outside the vision tower's {n} layers"),
        ));
    }
    // The image span is placed by position (tokenizer_image_token), never found by id: any
    // id below the vocabulary that is not BOS serves as the placeholder.
    let placeholder = if text_cfg.bos_token_id == Some(0) {
        1
    } else {
        0
    };
    let cfg = LlavaConfig {
        arch: Arch::MobileVlm,
        image_grid_pinpoints: Vec::new(),
        text: text_cfg,
        vision,
        image_token_index: placeholder,
        projector_hidden_act: Activation::Gelu,
        vision_feature_layer: layer,
        vision_feature_select_strategy: FeatureSelect::Default,
    };
    crate::checks::check_processor(&processor, &cfg, &path)?;
    Ok(MobileVlmSetup {
        cfg,
        processor,
        tower: if inside {
            TowerSource::Checkpoint
        } else {
            TowerSource::Dir(tower_dir.clone().expect("refused above when absent"))
        },
        tower_dir,
    })
}

/// `mm_vision_tower` as a directory: absolute, relative to the model directory, or a repo
/// id in the Hugging Face cache.
fn resolve_tower(model_dir: &Path, spec: &str) -> Option<PathBuf> {
    if spec.is_empty() {
        return None;
    }
    let p = Path::new(spec);
    let rel = model_dir.join(p);
    if p.is_absolute() && p.is_dir() {
        return Some(p.to_path_buf());
    }
    if rel.is_dir() {
        return Some(rel);
    }
    if crate::hub::looks_like_repo_id(spec) {
        return crate::hub::resolve_model(spec).ok();
    }
    None
}

/// A tower directory's vision config (`CLIPVisionModel`'s flat one, or `CLIPModel`'s
/// `vision_config`) and its image processor.
fn read_tower(dir: &Path) -> Result<(VisionConfig, ImageProcessor)> {
    let path = dir.join("config.json");
    let root = &read_object(&path)?;
    let (m, pre) = match root.get("model_type").and_then(Value::as_str) {
        Some("clip") => match root.get("vision_config").and_then(Value::as_object) {
            Some(v) => (v, "vision_config."),
            None => return Err(Error::file(&path, "key `vision_config`: missing")),
        },
        _ => (root, ""),
    };
    let vision = VisionConfig::from_map(m, pre).map_err(|e| match e {
        Error::Msg(m) => Error::file(&path, m),
        other => other,
    })?;
    let pp = dir.join("preprocessor_config.json");
    let processor = if pp.exists() {
        ImageProcessor::from_file(&pp)?
    } else {
        let s = vision.image_size;
        ImageProcessor {
            size: ResizeTarget::ShortestEdge(s),
            crop_size: (s, s),
            ..Default::default()
        }
    };
    Ok((vision, processor))
}

//! Checks of a model's parts against each other, done before anything is allocated or
//! uploaded: the config's layer counts against the tensors the checkpoint holds (a layer
//! count of 10^9 must fail by name, not by a 784 GB allocation), tensor shapes against the
//! config (for `info`), and the image processor against the vision tower.

use std::path::Path;

use engine_core::weights::WeightSource;
use engine_core::{Error, Result};

use crate::config::{Arch, LlavaConfig};
use crate::preprocess::{ImageProcessor, ResizeTarget};

/// Whether `names` holds a tensor ending in `suffix` (either llava-hf naming, or a GGUF
/// source renamed to HF names).
fn has_suffix(names: &[String], suffix: &str) -> bool {
    names.iter().any(|n| n.ends_with(suffix))
}

/// The decoder's `num_hidden_layers` (and the vision layers that run) must be layers the
/// checkpoint holds. Checked on the names only, before any per-layer state is allocated.
pub fn check_layers(cfg: &LlavaConfig, source: &dyn WeightSource, key_text: &str) -> Result<()> {
    let names = source.names();
    check_text_layers(cfg.text.num_hidden_layers, &names, key_text)?;
    let v = cfg.vision_layers_to_run();
    if cfg.arch == Arch::MobileVlm && !mobilevlm_tower_inside(source) {
        return Ok(()); // the tower is in its own directory
    }
    if v > names.len()
        || (v > 0
            && !has_suffix(
                &names,
                &format!("encoder.layers.{}.layer_norm1.weight", v - 1),
            ))
    {
        return Err(Error::msg(format!(
            "the config's vision tower runs {v} layers but the checkpoint has no vision layer {}",
            v.saturating_sub(1)
        )));
    }
    Ok(())
}

/// [`check_layers`] for a text model alone; `key` names the layer count's key in messages.
pub fn check_text_layers(n: usize, names: &[String], key: &str) -> Result<()> {
    let last = n.saturating_sub(1);
    // A layer has at least one tensor, so more layers than tensors can never be held.
    if n > names.len() || !has_suffix(names, &format!("layers.{last}.input_layernorm.weight")) {
        return Err(Error::msg(format!(
            "{key} is {n} but the checkpoint has no decoder layer {last} ({} tensors in all)",
            names.len()
        )));
    }
    Ok(())
}

/// Every tensor the engine loads for `cfg` is present with the shape the config implies
/// (`info`'s check; loading does the same one tensor at a time). Tensors the engine does
/// not load (`post_layernorm`, vision layers past the feature layer, a tied `lm_head`) may
/// be absent. Call [`check_layers`] first: the expected list has one entry per layer.
pub fn check_shapes(cfg: &LlavaConfig, source: &dyn WeightSource) -> Result<()> {
    let new_naming = source.contains("model.language_model.embed_tokens.weight");
    let mobile = cfg.arch == Arch::MobileVlm;
    let tower_elsewhere = mobile && !mobilevlm_tower_inside(source);
    let run = cfg.vision_layers_to_run();
    for (old, shape) in crate::synthetic::tensor_shapes(cfg) {
        let name = if mobile {
            mobilevlm_name(&old)
        } else if new_naming {
            new_name(&old)
        } else {
            old.clone()
        };
        let optional = old.contains("post_layernorm")
            || (old.ends_with("lm_head.weight") && cfg.text.tie_word_embeddings)
            || vision_layer(&old).is_some_and(|l| l >= run)
            || (tower_elsewhere && old.starts_with("vision_tower."));
        if !source.contains(&name) {
            if optional {
                continue;
            }
            return Err(Error::weight(name, "missing"));
        }
        let view = source.view(&name)?;
        if view.shape != shape.as_slice() {
            return Err(Error::weight(
                name,
                format!(
                    "has shape {:?}, but the config implies {shape:?}",
                    view.shape
                ),
            ));
        }
    }
    Ok(())
}

fn mobilevlm_tower_inside(source: &dyn WeightSource) -> bool {
    source.contains(&format!(
        "{}.vision_model.embeddings.patch_embedding.weight",
        crate::mobilevlm::config::TOWER_PREFIX
    ))
}

/// A manifest name (llava-hf's old naming) as MobileVLM's checkpoint spells it.
fn mobilevlm_name(old: &str) -> String {
    if let Some(r) = old.strip_prefix("language_model.model.") {
        format!("model.{r}")
    } else if let Some(r) = old.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{r}")
    } else if let Some(r) = old.strip_prefix("vision_tower.") {
        format!("{}.{r}", crate::mobilevlm::config::TOWER_PREFIX)
    } else {
        format!("model.{old}")
    }
}

fn new_name(old: &str) -> String {
    if let Some(r) = old.strip_prefix("language_model.model.") {
        format!("model.language_model.{r}")
    } else if let Some(r) = old.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{r}")
    } else {
        format!("model.{old}")
    }
}

fn vision_layer(name: &str) -> Option<usize> {
    let r = name.split("encoder.layers.").nth(1)?;
    r.split('.').next()?.parse().ok()
}

/// The processor must produce exactly the tower's `image_size` square, with usable
/// statistics; `origin` names the file the processor came from.
pub fn check_processor(p: &ImageProcessor, cfg: &LlavaConfig, origin: &Path) -> Result<()> {
    if p.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err(Error::file(
            origin,
            format!("image_std {:?} must be finite and non-zero", p.image_std),
        ));
    }
    if p.image_mean.iter().any(|m| !m.is_finite()) {
        return Err(Error::file(
            origin,
            format!("image_mean {:?} must be finite", p.image_mean),
        ));
    }
    let s = cfg.vision.image_size;
    let out = if p.do_center_crop {
        Some(p.crop_size)
    } else {
        match (p.do_resize, &p.size) {
            (true, ResizeTarget::Exact { height, width }) => Some((*height, *width)),
            _ => None,
        }
    };
    match out {
        Some(hw) if hw == (s, s) => Ok(()),
        Some((h, w)) => Err(Error::file(
            origin,
            format!(
                "crop_size {h}x{w} does not match the vision tower's image_size {s} (config.json vision_config.image_size)"
            ),
        )),
        None => Err(Error::file(
            origin,
            format!(
                "without do_center_crop or a fixed size the images would not be the vision tower's {s}x{s}"
            ),
        )),
    }
}

/// A tokenizer may hold fewer tokens than the embedding table (llava-hf pads it to a
/// multiple of 64) but never more: its ids past the table have no embedding.
pub fn check_tokenizer(tokens: usize, cfg: &LlavaConfig, origin: &Path) -> Result<()> {
    let v = cfg.text.vocab_size;
    if tokens > v {
        return Err(Error::file(
            origin,
            format!("the tokenizer has {tokens} tokens, more than the model's vocab_size {v}"),
        ));
    }
    Ok(())
}

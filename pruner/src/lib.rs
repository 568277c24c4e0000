//! Visual-token pruning policies for multimodal prefill: VisiPruner (arXiv 2510.17205),
//! FastV, DivPrune (before the decoder), and a dense no-op, plus an analytic prefill FLOPs counter.
//!
//! The crate knows nothing about tensors or backends. The model's layer scheduler asks a
//! [`Pruner`] per layer which attention mask to apply ([`Pruner::mask`]) and what to
//! capture ([`Pruner::capture`]), runs the layer, and hands back a [`LayerView`]; the
//! pruner answers with an [`Action`]. This keeps every decision unit-testable on the CPU
//! with synthetic data. The exact semantics follow `docs/visipruner.md`.
//!
//! # Several image spans (LLaVA-NeXT, several images per prompt)
//!
//! A prompt may hold several image spans (one per `<image>`, in prompt order), and a
//! LLaVA-NeXT span holds more than patch tokens: the base tile's patches, the unpadded tile
//! rows and one `image_newline` per row. The definition the engine implements, and
//! `tools/visipruner_ref.py` reproduces:
//!
//! - **Image tokens** are every position of every span, newline rows and base tile
//!   included. Their offsets ([`LayerView::image_tokens`], `kept_image_tokens` in reports)
//!   run over all spans together in prompt order: offset `k` is the `k`-th image position
//!   of the prompt. Text between spans is text.
//! - **Middle and deep** statistics (contributions `c_j`, `cos_j`, norms) and **FastV**'s
//!   last-row attention run over all image tokens still present, of every span; a pruning
//!   decision keeps or drops tokens of any span, and the kept ones keep their original
//!   position ids. Text rows are never dropped.
//! - **Shallow masks** act on (query kind, key kind) pairs, exactly as over one span, with
//!   every position of every span an image key and every other row text. When the image
//!   rows present form one contiguous run (one image, or images with no text between
//!   them) they are `docs/visipruner.md`'s one-span masks over that run. Over several
//!   separate runs (text between images; [`ShallowMask::attention_mask_runs`]):
//!   - layer-0 `sink`: every query from the first image row on loses all image keys; each
//!     text query (also one between two images) puts its former image mass back on the
//!     first image key of the prompt (one sink for the whole prompt, as with one span);
//!   - layer-0 `split`: image queries lose all image keys (of every image); text queries
//!     lose the first half (rounded down) of every run;
//!   - `text_to_image`: text queries lose all image keys; image queries are untouched.
//!
//!   The engine writes them as mask rules (`Keep` rules carve the text between images out
//!   of broader ones): 2 rules per image (3 less one for `split`), at most
//!   [`engine_core::MAX_MASK_RULES`] (16): up to 8 images (5 with `split`). Past that an
//!   explicit config is refused at the layer, naming the image count, and the paper
//!   default runs without its shallow stage and says so.

mod config;
mod divprune;
mod fastv;
mod flops;
mod policy;
#[cfg(test)]
mod testutil;
mod visi;

pub use config::{
    ConfigError, DivPruneConfig, FastVConfig, Layer0Policy, Mode, PruneConfig, VisiConfig,
};
pub use config::{FASTV_DEFAULT_K, FASTV_DEFAULT_RATIO};
pub use divprune::{divprune_order, divprune_select, Preselected};
pub use fastv::FastV;
pub use flops::{
    prefill_flops, FlopsError, FlopsReport, FlopsShape, LayerSchedule, ProjectorShape, TextShape,
    VisionShape,
};
pub use policy::{Action, Capture, Dense, LayerView, PruneError, PruneReport, Pruner, ShallowMask};
pub use visi::{ForcedSchedule, VisiPruner, SILENT_COS, SILENT_LAYERS_TO_EXIT};

/// A pruning config resolved for one request: checked once against the model's depth and
/// the prompt's image spans ([`PrunePlan::new`]); its pruners build without checking again.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    config: PruneConfig,
    num_layers: usize,
    image_tokens: Vec<usize>,
}

impl PrunePlan {
    /// Checks `config` against a decoder of `num_layers` layers and a prompt whose image
    /// spans hold `image_tokens[i]` tokens (layer keys, then the budget).
    pub fn new(
        config: PruneConfig,
        num_layers: usize,
        image_tokens: &[usize],
    ) -> Result<Self, ConfigError> {
        config.validate(num_layers)?;
        config.check_budget(image_tokens)?;
        Ok(PrunePlan {
            config,
            num_layers,
            image_tokens: image_tokens.to_vec(),
        })
    }

    /// The config it runs.
    pub fn config(&self) -> &PruneConfig {
        &self.config
    }

    /// Tokens of each image span it was checked against.
    pub fn image_tokens(&self) -> &[usize] {
        &self.image_tokens
    }

    /// The pruner for one prefill (no second validation; the error only guards keys that
    /// validation already required).
    pub fn build(&self) -> Result<Box<dyn Pruner>, ConfigError> {
        let n = self.num_layers;
        Ok(match &self.config {
            PruneConfig::Dense => Box::new(Dense),
            PruneConfig::VisiPruner(v) => Box::new(VisiPruner::from_checked(v.clone(), n)?),
            PruneConfig::FastV(f) => Box::new(FastV::from_checked(*f, n)),
            PruneConfig::DivPrune(d) => Box::new(Preselected::divprune(d.keep, Vec::new())),
        })
    }
}

/// Validates `cfg` against a model with `num_layers` decoder layers and builds its pruner.
pub fn build(cfg: &PruneConfig, num_layers: usize) -> Result<Box<dyn Pruner>, ConfigError> {
    cfg.validate(num_layers)?;
    Ok(match cfg {
        PruneConfig::Dense => Box::new(Dense),
        PruneConfig::VisiPruner(v) => Box::new(VisiPruner::new(v.clone(), num_layers)?),
        PruneConfig::FastV(f) => Box::new(FastV::new(*f, num_layers)?),
        // The selection happens before the decoder (the model's preselection step, which
        // hands the decoder a shorter prompt); without one nothing was kept.
        PruneConfig::DivPrune(d) => Box::new(Preselected::divprune(d.keep, Vec::new())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_validates_before_constructing() {
        let cfg = PruneConfig::paper_default();
        // shallow_mid_layer = 6 needs at least 7 layers.
        let err = build(&cfg, 6).err().expect("6 layers must be rejected");
        assert!(err.to_string().contains("shallow_mid_layer"), "{err}");
        let p = build(&cfg, 32).expect("paper default fits 32 layers");
        assert_eq!(p.report().method, "visipruner");
        let p = build(&PruneConfig::Dense, 32).expect("dense always builds");
        assert_eq!(p.report().method, "dense");
        let f = PruneConfig::from_json(r#"{"method":"fastv","k":2,"ratio":0.5}"#).unwrap();
        assert_eq!(build(&f, 32).unwrap().report().method, "fastv");
    }
}

//! Visual-token pruning policies for multimodal prefill: VisiPruner (arXiv 2510.17205),
//! FastV, and a dense no-op, plus an analytic prefill FLOPs counter.
//!
//! The crate knows nothing about tensors or backends. The model's layer scheduler asks a
//! [`Pruner`] per layer which attention mask to apply ([`Pruner::mask`]) and what to
//! capture ([`Pruner::capture`]), runs the layer, and hands back a [`LayerView`]; the
//! pruner answers with an [`Action`]. This keeps every decision unit-testable on the CPU
//! with synthetic data. The exact semantics follow `docs/visipruner.md`.

mod config;
mod fastv;
mod flops;
mod policy;
#[cfg(test)]
mod testutil;
mod visi;

pub use config::{ConfigError, FastVConfig, Layer0Policy, Mode, PruneConfig, VisiConfig};
pub use fastv::FastV;
pub use flops::{
    prefill_flops, FlopsError, FlopsReport, FlopsShape, LayerSchedule, ProjectorShape, TextShape,
    VisionShape,
};
pub use policy::{Action, Capture, Dense, LayerView, PruneError, PruneReport, Pruner, ShallowMask};
pub use visi::{ForcedSchedule, VisiPruner, SILENT_COS, SILENT_LAYERS_TO_EXIT};

/// Validates `cfg` against a model with `num_layers` decoder layers and builds its pruner.
pub fn build(cfg: &PruneConfig, num_layers: usize) -> Result<Box<dyn Pruner>, ConfigError> {
    cfg.validate(num_layers)?;
    Ok(match cfg {
        PruneConfig::Dense => Box::new(Dense),
        PruneConfig::VisiPruner(v) => Box::new(VisiPruner::new(v.clone(), num_layers)?),
        PruneConfig::FastV(f) => Box::new(FastV::new(*f, num_layers)?),
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

//! VisiPruner: shallow masks, fusion-layer token selection, and the deep-layer exit.
//!
//! Threshold comparisons happen in f32: the reference compares f32 tensors with Python
//! floats, and PyTorch casts the scalar to the tensor's dtype, so `norm > 0.2` means
//! `norm > 0.2f32`. Comparing in f64 instead would flip decisions for values exactly
//! at a threshold. NaN inputs follow IEEE comparisons, as in the reference: a NaN cosine
//! never fires fusion and never counts as silent, and a NaN norm is never kept.

use crate::config::{ConfigError, Layer0Policy, PruneConfig, VisiConfig};
use crate::policy::{contributions, Tracker};
use crate::{Action, Capture, LayerView, PruneError, PruneReport, Pruner, ShallowMask};

/// A layer is vision-silent when every remaining image token has `cos >= SILENT_COS`.
pub const SILENT_COS: f32 = 0.999;
/// Vision-silent layers (not necessarily consecutive) after which image tokens are dropped.
pub const SILENT_LAYERS_TO_EXIT: u32 = 2;

#[derive(Debug, Clone, Copy)]
struct Middle {
    /// shallow_mid_layer: fusion is looked for only on layers strictly above it.
    after: usize,
    layer_threshold: f32,
    tokens_threshold: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deep {
    Off,
    /// Count silent layers once a selection exists.
    AfterSelection,
    /// No middle stage: drop every image token from this layer on.
    FixedFrom(usize),
}

/// Decisions forced onto VisiPruner's code path (benchmarks on random weights, whose
/// contributions would not make realistic decisions): every mask, capture and gather is
/// the real one; only the middle-stage trigger and K, and the deep exit, are imposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcedSchedule {
    /// Layer whose middle-stage check "fires"; must be above `shallow_mid_layer`.
    pub fusion_layer: usize,
    /// Image tokens kept at fusion, evenly spaced over those the layer processed.
    pub keep: usize,
    /// First text-only layer (needs the deep stage; at least `fusion_layer + 2`).
    pub text_only_from: Option<usize>,
}

impl ForcedSchedule {
    /// `keep` of the `image` tokens, evenly spaced (the centre of each of `keep` equal
    /// strata), ascending; all of them when `keep >= image.len()`.
    pub fn select(image: &[usize], keep: usize) -> Vec<usize> {
        let n = image.len();
        if keep >= n {
            return image.to_vec();
        }
        // (2i+1)n / 2k is strictly increasing in i and below n for i < k <= n.
        (0..keep)
            .map(|i| image[(2 * i + 1) * n / (2 * keep)])
            .collect()
    }
}

/// The VisiPruner policy (see `docs/visipruner.md`).
#[derive(Debug, Clone)]
pub struct VisiPruner {
    cfg: VisiConfig,
    num_layers: usize,
    /// (shallow_mid_layer, layer-0 policy) when the shallow stage is on.
    shallow: Option<(usize, Layer0Policy)>,
    middle: Option<Middle>,
    deep: Deep,
    tracker: Tracker,
    fusion_layer: Option<usize>,
    kept: Option<Vec<usize>>,
    silent_layers: u32,
    text_only_from: Option<usize>,
    forced: Option<ForcedSchedule>,
}

impl VisiPruner {
    /// Validates `cfg` for a model with `num_layers` decoder layers and builds the policy.
    pub fn new(cfg: VisiConfig, num_layers: usize) -> Result<Self, ConfigError> {
        PruneConfig::VisiPruner(cfg.clone()).validate(num_layers)?;
        Self::from_checked(cfg, num_layers)
    }

    /// [`VisiPruner::new`] for a config already validated (a [`crate::PrunePlan`]).
    pub(crate) fn from_checked(cfg: VisiConfig, num_layers: usize) -> Result<Self, ConfigError> {
        // validate() guarantees presence; these errors only guard against a future mismatch.
        let missing = |key: &'static str| ConfigError::Missing {
            key,
            when: "by the enabled stages",
            range: "present".to_string(),
        };
        let m = cfg.mode;
        let smid = if m.shallow || m.middle {
            Some(
                cfg.shallow_mid_layer
                    .ok_or_else(|| missing("shallow_mid_layer"))?,
            )
        } else {
            None
        };
        let shallow = match (m.shallow, smid) {
            (true, Some(s)) => Some((s, cfg.layer0)),
            _ => None,
        };
        let middle = match (m.middle, smid) {
            (true, Some(after)) => Some(Middle {
                after,
                layer_threshold: cfg
                    .layer_threshold
                    .ok_or_else(|| missing("layer_threshold"))?
                    as f32,
                tokens_threshold: cfg
                    .tokens_threshold
                    .ok_or_else(|| missing("tokens_threshold"))?
                    as f32,
            }),
            _ => None,
        };
        let deep = match (m.deep, m.middle) {
            (false, _) => Deep::Off,
            (true, true) => Deep::AfterSelection,
            (true, false) => Deep::FixedFrom(
                cfg.mid_deep_layer
                    .ok_or_else(|| missing("mid_deep_layer"))?,
            ),
        };
        Ok(VisiPruner {
            cfg,
            num_layers,
            shallow,
            middle,
            deep,
            tracker: Tracker::new(num_layers),
            fusion_layer: None,
            kept: None,
            silent_layers: 0,
            text_only_from: None,
            forced: None,
        })
    }

    /// VisiPruner with its decisions forced to `forced` (see [`ForcedSchedule`]). `cfg`
    /// must enable the middle stage, and the deep stage when an exit is forced.
    pub fn forced(
        cfg: VisiConfig,
        num_layers: usize,
        forced: ForcedSchedule,
    ) -> Result<Self, ConfigError> {
        let mut p = Self::new(cfg, num_layers)?;
        let m = p.middle.ok_or(ConfigError::Missing {
            key: "mode",
            when: "for a forced schedule",
            range: "a mode containing \"middle\"".to_string(),
        })?;
        let f = forced.fusion_layer;
        if f <= m.after || f + 1 >= num_layers {
            return Err(ConfigError::OutOfRange {
                key: "fusion",
                value: f.to_string(),
                range: format!(
                    "an integer in ({}, {}) (above shallow_mid_layer, below the last layer)",
                    m.after,
                    num_layers.saturating_sub(1)
                ),
            });
        }
        if let Some(e) = forced.text_only_from {
            if p.deep != Deep::AfterSelection {
                return Err(ConfigError::Missing {
                    key: "mode",
                    when: "for a forced exit",
                    range: "a mode containing \"deep\"".to_string(),
                });
            }
            // The exit is taken on layer e-1's deep capture, and the last layer is never captured.
            if e < f + 2 || e + 1 > num_layers {
                return Err(ConfigError::OutOfRange {
                    key: "exit",
                    value: e.to_string(),
                    range: format!("an integer in [{}, {}]", f + 2, num_layers - 1),
                });
            }
        }
        p.forced = Some(forced);
        Ok(p)
    }

    /// The forced schedule, when this pruner runs one.
    pub fn forced_schedule(&self) -> Option<ForcedSchedule> {
        self.forced
    }

    fn images_gone(&self, layer: usize) -> bool {
        self.tracker.no_image_left() || self.text_only_from.is_some_and(|t| layer >= t)
    }

    /// Middle stage: on the fusion layer, select K; otherwise nothing.
    fn middle_step(&mut self, view: &LayerView, m: Middle) -> Result<Action, PruneError> {
        let c = contributions(view)?;
        let k: Vec<usize> = if let Some(fs) = self.forced {
            // The capture was computed and checked like the real one; only the decision differs.
            if view.layer != fs.fusion_layer {
                return Ok(Action::Continue);
            }
            ForcedSchedule::select(view.image_tokens, fs.keep)
        } else {
            // Strict <: a cosine exactly at the threshold is not a fusion.
            if !c.iter().any(|&(_, cos)| cos < m.layer_threshold) {
                return Ok(Action::Continue);
            }
            // Strict >: a norm exactly at the threshold is dropped.
            view.image_tokens
                .iter()
                .zip(c)
                .filter(|(_, &(norm, _))| norm > m.tokens_threshold)
                .map(|(&j, _)| j)
                .collect()
        };
        self.fusion_layer = Some(view.layer);
        self.kept = Some(k.clone());
        if view.layer + 1 == self.num_layers {
            // The report still names the fusion layer, but no layer is left to prune.
            return Ok(Action::Continue);
        }
        if k.is_empty() {
            self.text_only_from = Some(view.layer + 1);
        }
        Ok(Action::Keep(k))
    }

    /// Deep stage: count vision-silent layers; at the second, drop the rest.
    fn deep_step(&mut self, view: &LayerView) -> Result<Action, PruneError> {
        let c = contributions(view)?;
        if let Some(fs) = self.forced {
            // Forced: not silent until the layer before the forced exit, then exit there.
            return Ok(match fs.text_only_from {
                Some(e) if view.layer + 1 == e => {
                    self.silent_layers = SILENT_LAYERS_TO_EXIT;
                    self.text_only_from = Some(e);
                    Action::Keep(Vec::new())
                }
                _ => Action::Continue,
            });
        }
        if !c.iter().all(|&(_, cos)| cos >= SILENT_COS) {
            return Ok(Action::Continue);
        }
        self.silent_layers += 1;
        if self.silent_layers < SILENT_LAYERS_TO_EXIT {
            return Ok(Action::Continue);
        }
        self.text_only_from = Some(view.layer + 1);
        Ok(Action::Keep(Vec::new()))
    }
}

impl Pruner for VisiPruner {
    fn mask(&self, layer: usize) -> ShallowMask {
        if self.images_gone(layer) {
            return ShallowMask::None;
        }
        match self.shallow {
            Some((smid, layer0)) if layer < smid => match (layer, layer0) {
                (0, Layer0Policy::Sink) => ShallowMask::Layer0Sink,
                (0, Layer0Policy::Split) => ShallowMask::Layer0Split,
                (0, Layer0Policy::None) => ShallowMask::None,
                _ => ShallowMask::TextToImage,
            },
            _ => ShallowMask::None,
        }
    }

    fn capture(&self, layer: usize) -> Capture {
        if layer >= self.num_layers || self.images_gone(layer) {
            return Capture::Nothing;
        }
        match (self.fusion_layer, self.middle) {
            // Looked for up to and including the last layer, so the reported fusion layer
            // matches the reference even when nothing is left to prune.
            (None, Some(m)) if layer > m.after => Capture::Contributions,
            // A silent count on the last layer could change nothing, so skip its capture.
            (Some(f), _)
                if self.deep == Deep::AfterSelection
                    && layer > f
                    && layer + 1 < self.num_layers
                    && self.silent_layers < SILENT_LAYERS_TO_EXIT =>
            {
                Capture::Contributions
            }
            _ => Capture::Nothing,
        }
    }

    fn after_layer(&mut self, view: &LayerView) -> Result<Action, PruneError> {
        self.tracker.check(view)?;
        let action = match (self.capture(view.layer), self.fusion_layer, self.middle) {
            (Capture::Contributions, None, Some(m)) => self.middle_step(view, m)?,
            (Capture::Contributions, Some(_), _) => self.deep_step(view)?,
            _ => match self.deep {
                Deep::FixedFrom(from)
                    if view.layer + 1 == from && !view.image_tokens.is_empty() =>
                {
                    self.text_only_from = Some(from);
                    Action::Keep(Vec::new())
                }
                _ => Action::Continue,
            },
        };
        self.tracker.advance(view, &action);
        Ok(action)
    }

    fn first_decision_layer(&self) -> Option<usize> {
        if self.forced.is_some() {
            return Some(0);
        }
        let middle = self.middle.map(|m| m.after + 1);
        let fixed = match self.deep {
            Deep::FixedFrom(from) => Some(from.saturating_sub(1)),
            _ => None,
        };
        match (middle, fixed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn report(&self) -> PruneReport {
        PruneReport {
            method: "visipruner".to_string(),
            config: PruneConfig::VisiPruner(self.cfg.clone()).to_json(),
            fusion_layer: self.fusion_layer,
            kept_image_tokens: self.kept.clone(),
            text_only_from_layer: self.text_only_from,
        }
    }

    fn reset(&mut self) {
        self.tracker.reset();
        self.fusion_layer = None;
        self.kept = None;
        self.silent_layers = 0;
        self.text_only_from = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{drive, no_attn, no_contrib, Rng, Trace};
    use crate::Mode;

    const L: usize = 32;
    const N: usize = 576;
    const SMID: usize = 6;
    const LT: f32 = 0.995;
    const TT: f32 = 0.2;

    fn cfg(mode: &str, extra: &str) -> VisiConfig {
        let text = format!(
            r#"{{"mode":{mode},"shallow_mid_layer":{SMID},"layer_threshold":0.995,"tokens_threshold":0.2{extra}}}"#
        );
        match PruneConfig::from_json(&text) {
            Ok(PruneConfig::VisiPruner(v)) => v,
            other => panic!("test config {text} did not parse: {other:?}"),
        }
    }

    fn pruner(c: VisiConfig) -> VisiPruner {
        VisiPruner::new(c, L).unwrap_or_else(|e| panic!("test config invalid: {e}"))
    }

    fn full() -> VisiPruner {
        pruner(cfg(r#"["shallow","middle","deep"]"#, ""))
    }

    /// Quiet contributions: every cos well above both thresholds, random norms.
    fn quiet(rng: &mut Rng, n: usize) -> Vec<(f32, f32)> {
        (0..n)
            .map(|_| (rng.uniform(0.0, 0.4), rng.uniform(0.9995, 1.0)))
            .collect()
    }

    /// Fires fusion on `fire` (one planted low cosine), quiet elsewhere; on layers in
    /// `loud` after fusion, one token gets a cosine below the silent bound.
    struct Script {
        rng: Rng,
        fire: usize,
        loud: Vec<usize>,
        norms: Vec<f32>,
    }

    impl Script {
        fn new(seed: u64, fire: usize, loud: &[usize]) -> Self {
            let mut rng = Rng::new(seed);
            let norms = (0..N).map(|_| rng.uniform(0.0, 0.4)).collect();
            Script {
                rng,
                fire,
                loud: loud.to_vec(),
                norms,
            }
        }

        fn layer(&mut self, layer: usize, image: &[usize]) -> Vec<(f32, f32)> {
            let mut c = quiet(&mut self.rng, image.len());
            for (slot, &j) in c.iter_mut().zip(image) {
                slot.0 = self.norms[j];
            }
            if (layer == self.fire || self.loud.contains(&layer)) && !c.is_empty() {
                let i = self.rng.below(c.len());
                c[i].1 = self.rng.uniform(0.5, 0.99);
            }
            c
        }

        fn expected_k(&self) -> Vec<usize> {
            (0..N).filter(|&j| self.norms[j] > TT).collect()
        }
    }

    fn run(p: &mut VisiPruner, s: &mut Script) -> Trace {
        drive(p, L, N, |l, img| s.layer(l, img), no_attn)
    }

    #[test]
    fn shallow_masks_follow_layer0_policy() {
        for (layer0, want0) in [
            ("sink", ShallowMask::Layer0Sink),
            ("split", ShallowMask::Layer0Split),
            ("none", ShallowMask::None),
        ] {
            let p = pruner(cfg(r#"["shallow"]"#, &format!(r#","layer0":"{layer0}""#)));
            assert_eq!(p.mask(0), want0, "layer0 {layer0}: layer 0");
            for l in 1..SMID {
                assert_eq!(
                    p.mask(l),
                    ShallowMask::TextToImage,
                    "layer0 {layer0}: layer {l}"
                );
            }
            for l in SMID..L {
                assert_eq!(p.mask(l), ShallowMask::None, "layer0 {layer0}: layer {l}");
            }
        }
        let p = pruner(cfg(r#"["middle","deep"]"#, ""));
        for l in 0..L {
            assert_eq!(p.mask(l), ShallowMask::None, "no shallow stage: layer {l}");
        }
    }

    #[test]
    fn shallow_only_drops_nothing_and_captures_nothing() {
        let mut p = pruner(cfg(r#"["shallow"]"#, ""));
        let t = drive(&mut p, L, N, no_contrib, no_attn);
        assert!(t.keeps().is_empty(), "keeps: {:?}", t.keeps());
        let r = p.report();
        assert_eq!(
            (r.fusion_layer, r.kept_image_tokens, r.text_only_from_layer),
            (None, None, None)
        );
    }

    #[test]
    fn fusion_fires_first_on_smid_plus_one_never_on_smid() {
        // Every layer would fire, including smid itself.
        let mut rng = Rng::new(11);
        let mut p = full();
        let t = drive(
            &mut p,
            L,
            N,
            |_, img| {
                let mut c = quiet(&mut rng, img.len());
                c[0].1 = 0.1;
                c
            },
            no_attn,
        );
        assert_eq!(
            t.captures[SMID],
            Capture::Nothing,
            "smid must not be captured"
        );
        assert_eq!(t.captures[SMID + 1], Capture::Contributions);
        assert_eq!(p.report().fusion_layer, Some(SMID + 1));
        assert_eq!(
            t.keeps()[0].0,
            SMID + 1,
            "Keep is returned on the fusion layer"
        );
        // Even if the scheduler hands over contributions at smid, nothing happens there.
        let mut p = full();
        let image: Vec<usize> = (0..N).collect();
        let loud = vec![(0.5f32, 0.1f32); N];
        for layer in 0..=SMID {
            let v = LayerView {
                layer,
                num_layers: L,
                image_tokens: &image,
                contributions: Some(&loud),
                last_row_image_attention: None,
            };
            assert_eq!(
                p.after_layer(&v).unwrap(),
                Action::Continue,
                "layer {layer}"
            );
        }
        assert_eq!(p.report().fusion_layer, None);
    }

    #[test]
    fn seeded_fusion_selects_k_by_norm_as_original_offsets() {
        for seed in 0..20u64 {
            let mut pick = Rng::new(1000 + seed);
            let fire = SMID + 1 + pick.below(L - SMID - 3);
            let mut s = Script::new(seed, fire, &[]);
            let mut p = full();
            let t = run(&mut p, &mut s);
            let want = s.expected_k();
            let r = p.report();
            assert_eq!(r.fusion_layer, Some(fire), "seed {seed}: fusion layer");
            assert_eq!(r.kept_image_tokens.as_ref(), Some(&want), "seed {seed}: K");
            assert_eq!(
                t.keeps()[0],
                (fire, want.clone()),
                "seed {seed}: first Keep"
            );
            // The fusion layer itself still processes every image token.
            assert_eq!(t.image[fire].len(), N, "seed {seed}: fusion layer input");
            assert_eq!(t.image[fire + 1], want, "seed {seed}: layer after fusion");
            // Before fusion: captures exactly on smid+1..=fire.
            let caps = t.layer_captures_until(fire);
            assert_eq!(
                caps,
                (SMID + 1..=fire).collect::<Vec<_>>(),
                "seed {seed}: captures"
            );
        }
    }

    impl Trace {
        fn layer_captures_until(&self, last: usize) -> Vec<usize> {
            self.layers_capturing(Capture::Contributions)
                .into_iter()
                .filter(|&l| l <= last)
                .collect()
        }
    }

    #[test]
    fn no_fusion_keeps_everything_and_checks_every_eligible_layer() {
        let mut rng = Rng::new(5);
        let mut p = full();
        let t = drive(&mut p, L, N, |_, img| quiet(&mut rng, img.len()), no_attn);
        assert!(t.keeps().is_empty(), "keeps: {:?}", t.keeps());
        assert_eq!(
            t.layers_capturing(Capture::Contributions),
            (SMID + 1..L).collect::<Vec<_>>(),
            "middle looks at every layer > smid, the last one included"
        );
        let r = p.report();
        assert_eq!(
            (r.fusion_layer, r.kept_image_tokens, r.text_only_from_layer),
            (None, None, None)
        );
    }

    #[test]
    fn empty_k_drops_all_image_tokens_after_fusion() {
        let fire = 10;
        let mut p = full();
        let t = drive(
            &mut p,
            L,
            N,
            |l, img| {
                // All norms at most the threshold: nothing survives.
                let mut c = vec![(TT, 1.0); img.len()];
                if l == fire {
                    c[3].1 = 0.0;
                }
                c
            },
            no_attn,
        );
        assert_eq!(t.keeps(), vec![(fire, vec![])]);
        let r = p.report();
        assert_eq!(r.fusion_layer, Some(fire));
        assert_eq!(r.kept_image_tokens, Some(vec![]));
        assert_eq!(r.text_only_from_layer, Some(fire + 1));
        assert!(
            t.layers_capturing(Capture::Contributions)
                .iter()
                .all(|&l| l <= fire),
            "no deep captures without image tokens: {:?}",
            t.layers_capturing(Capture::Contributions)
        );
    }

    #[test]
    fn thresholds_are_compared_exactly_as_specified() {
        let image: Vec<usize> = (0..4).collect();
        let layer = SMID + 1;
        let step = |c: &[(f32, f32)]| {
            let mut p = full();
            let mut out = Action::Continue;
            for l in 0..=layer {
                let v = LayerView {
                    layer: l,
                    num_layers: L,
                    image_tokens: &image,
                    contributions: Some(c),
                    last_row_image_attention: None,
                };
                out = p.after_layer(&v).unwrap();
            }
            out
        };
        // cos exactly at layer_threshold: strict <, no fusion.
        assert_eq!(
            step(&[(0.5, LT); 4]),
            Action::Continue,
            "cos == layer_threshold"
        );
        // One ulp below fires.
        let below = f32::from_bits(LT.to_bits() - 1);
        let c = [(0.5, 1.0), (0.5, below), (0.5, 1.0), (0.5, 1.0)];
        assert_eq!(
            step(&c),
            Action::Keep(vec![0, 1, 2, 3]),
            "cos one ulp below"
        );
        // norm exactly at tokens_threshold is dropped; one ulp above is kept.
        let above = f32::from_bits(TT.to_bits() + 1);
        let c = [(TT, 0.0), (above, 1.0), (0.0, 1.0), (1.0, 1.0)];
        assert_eq!(
            step(&c),
            Action::Keep(vec![1, 3]),
            "norm == tokens_threshold"
        );
    }

    #[test]
    fn nan_never_fires_never_silent_never_kept() {
        let image: Vec<usize> = (0..3).collect();
        let mut p = full();
        let nan_cos = [(0.5, f32::NAN); 3];
        for l in 0..=SMID + 1 {
            let v = LayerView {
                layer: l,
                num_layers: L,
                image_tokens: &image,
                contributions: Some(&nan_cos),
                last_row_image_attention: None,
            };
            assert_eq!(p.after_layer(&v).unwrap(), Action::Continue, "layer {l}");
        }
        let c = [(f32::NAN, 0.0), (0.5, 1.0), (0.5, 1.0)];
        let v = LayerView {
            layer: SMID + 2,
            num_layers: L,
            image_tokens: &image,
            contributions: Some(&c),
            last_row_image_attention: None,
        };
        assert_eq!(p.after_layer(&v).unwrap(), Action::Keep(vec![1, 2]));
        // Deep: a NaN cosine makes the layer not silent.
        let kept = [1usize, 2];
        for (i, l) in (SMID + 3..SMID + 6).enumerate() {
            let c = [(0.5, f32::NAN), (0.5, 1.0)];
            let v = LayerView {
                layer: l,
                num_layers: L,
                image_tokens: &kept,
                contributions: Some(&c),
                last_row_image_attention: None,
            };
            assert_eq!(
                p.after_layer(&v).unwrap(),
                Action::Continue,
                "deep layer {i}"
            );
        }
        assert_eq!(p.report().text_only_from_layer, None);
    }

    #[test]
    fn deep_counts_silent_layers_not_necessarily_consecutive() {
        for seed in 0..10u64 {
            let fire = 9;
            // After fusion: layer 10 silent, 11-12 loud, 13 silent -> exit after 13.
            let mut s = Script::new(seed, fire, &[11, 12]);
            let mut p = full();
            let t = run(&mut p, &mut s);
            let k = s.expected_k();
            assert_eq!(
                t.keeps(),
                vec![(fire, k.clone()), (13, vec![])],
                "seed {seed}"
            );
            let r = p.report();
            assert_eq!(r.text_only_from_layer, Some(14), "seed {seed}");
            assert_eq!(
                r.kept_image_tokens,
                Some(k.clone()),
                "seed {seed}: report keeps K"
            );
            assert_eq!(
                t.layers_capturing(Capture::Contributions),
                (SMID + 1..=13).collect::<Vec<_>>(),
                "seed {seed}: captures stop once the image is gone"
            );
            for l in 14..L {
                assert!(
                    t.image[l].is_empty(),
                    "seed {seed}: layer {l} still has image tokens"
                );
                assert_eq!(t.masks[l], ShallowMask::None, "seed {seed}: layer {l}");
            }
            assert_eq!(t.image[13], k, "seed {seed}: layer 13 processes K");
        }
    }

    #[test]
    fn deep_silent_needs_every_cos_at_least_0999() {
        let image: Vec<usize> = (0..3).collect();
        let fire = SMID + 1;
        let mut p = full();
        let view = |layer, c| LayerView {
            layer,
            num_layers: L,
            image_tokens: &image,
            contributions: Some(c),
            last_row_image_attention: None,
        };
        let quiet = [(0.5f32, 1.0f32); 3];
        for l in 0..fire {
            p.after_layer(&view(l, &quiet)).unwrap();
        }
        let fire_c = [(0.5, 0.9), (0.5, 1.0), (0.5, 1.0)];
        assert_eq!(
            p.after_layer(&view(fire, &fire_c)).unwrap(),
            Action::Keep(vec![0, 1, 2])
        );
        // Just below the silent bound on one token: not silent.
        let almost = [
            (0.5, SILENT_COS),
            (0.5, f32::from_bits(SILENT_COS.to_bits() - 1)),
            (0.5, 1.0),
        ];
        for l in fire + 1..fire + 4 {
            assert_eq!(
                p.after_layer(&view(l, &almost)).unwrap(),
                Action::Continue,
                "layer {l}"
            );
        }
        // Exactly at the bound counts (>=): two such layers end the image.
        let exact = [(0.5, SILENT_COS); 3];
        assert_eq!(
            p.after_layer(&view(fire + 4, &exact)).unwrap(),
            Action::Continue
        );
        assert_eq!(
            p.after_layer(&view(fire + 5, &exact)).unwrap(),
            Action::Keep(vec![])
        );
        assert_eq!(p.report().text_only_from_layer, Some(fire + 6));
    }

    #[test]
    fn fusion_layer_itself_is_not_counted_silent() {
        // Fusion at 7 with a layer whose other tokens are silent; then one silent layer.
        let mut s = Script::new(3, 7, &[]);
        let mut p = full();
        let t = run(&mut p, &mut s);
        // 8 and 9 are silent: exit after 9, not after 8.
        assert_eq!(t.keeps()[1].0, 9);
        assert_eq!(p.report().text_only_from_layer, Some(10));
    }

    #[test]
    fn middle_without_deep_never_exits() {
        let mut s = Script::new(4, 12, &[]);
        let mut p = pruner(cfg(r#"["shallow","middle"]"#, ""));
        let t = run(&mut p, &mut s);
        assert_eq!(t.keeps(), vec![(12, s.expected_k())]);
        assert_eq!(
            t.layers_capturing(Capture::Contributions),
            (SMID + 1..=12).collect::<Vec<_>>()
        );
        assert_eq!(p.report().text_only_from_layer, None);
    }

    #[test]
    fn fusion_fires_only_once() {
        // Loud layers after fusion only delay the deep exit; they never reselect.
        let mut s = Script::new(8, 8, &[9, 10, 11]);
        let mut p = full();
        let t = run(&mut p, &mut s);
        assert_eq!(t.keeps(), vec![(8, s.expected_k()), (13, vec![])]);
        assert_eq!(p.report().fusion_layer, Some(8));
    }

    #[test]
    fn fusion_on_last_layer_is_reported_but_prunes_nothing() {
        let last = L - 1;
        let mut s = Script::new(9, last, &[]);
        let mut p = full();
        let t = run(&mut p, &mut s);
        assert!(t.keeps().is_empty(), "keeps: {:?}", t.keeps());
        let r = p.report();
        assert_eq!(r.fusion_layer, Some(last));
        assert_eq!(r.kept_image_tokens, Some(s.expected_k()));
        assert_eq!(r.text_only_from_layer, None, "no layer after the last one");
    }

    #[test]
    fn deep_never_captures_the_last_layer() {
        let fire = L - 3;
        let mut s = Script::new(10, fire, &[]);
        let mut p = full();
        let t = run(&mut p, &mut s);
        // L-2 is the one silent layer that can matter; L-1 is not captured.
        assert_eq!(t.captures[L - 2], Capture::Contributions);
        assert_eq!(t.captures[L - 1], Capture::Nothing);
        assert_eq!(t.keeps().len(), 1);
        assert_eq!(p.report().text_only_from_layer, None);
    }

    #[test]
    fn deep_without_middle_drops_from_mid_deep_layer() {
        for (mode, from) in [(r#"["deep"]"#, 20), (r#"["shallow","deep"]"#, 3)] {
            let mut p = pruner(cfg(mode, &format!(r#","mid_deep_layer":{from}"#)));
            let t = drive(&mut p, L, N, no_contrib, no_attn);
            assert_eq!(t.keeps(), vec![(from - 1, vec![])], "{mode}");
            let r = p.report();
            assert_eq!(r.text_only_from_layer, Some(from), "{mode}");
            assert_eq!(
                (r.fusion_layer, r.kept_image_tokens),
                (None, None),
                "{mode}"
            );
            assert!(
                t.image[from - 1].len() == N && t.image[from].is_empty(),
                "{mode}"
            );
            // With shallow and mid_deep_layer < shallow_mid_layer, masks stop with the image.
            for l in from..L {
                assert_eq!(t.masks[l], ShallowMask::None, "{mode}: layer {l}");
            }
        }
    }

    #[test]
    fn deep_with_middle_ignores_mid_deep_layer() {
        let mut rng = Rng::new(2);
        let mut p = pruner(cfg(r#"["middle","deep"]"#, r#","mid_deep_layer":8"#));
        let t = drive(&mut p, L, N, |_, img| quiet(&mut rng, img.len()), no_attn);
        assert!(t.keeps().is_empty(), "keeps: {:?}", t.keeps());
    }

    #[test]
    fn reset_forgets_the_previous_prompt() {
        let mut p = full();
        let mut s = Script::new(21, 8, &[]);
        run(&mut p, &mut s);
        assert!(p.report().fusion_layer.is_some());
        p.reset();
        let r = p.report();
        assert_eq!(
            (r.fusion_layer, r.kept_image_tokens, r.text_only_from_layer),
            (None, None, None)
        );
        assert_eq!(
            p.capture(SMID + 1),
            Capture::Contributions,
            "middle is armed again"
        );
        assert_eq!(p.mask(0), ShallowMask::Layer0Sink);
        let mut s = Script::new(22, 15, &[17]);
        let t = run(&mut p, &mut s);
        assert_eq!(t.keeps(), vec![(15, s.expected_k()), (18, vec![])]);
        assert_eq!(p.report().fusion_layer, Some(15));
    }

    #[test]
    fn report_carries_method_and_effective_config() {
        let c = cfg(r#"["shallow","middle","deep"]"#, r#","layer0":"split""#);
        let p = pruner(c.clone());
        let r = p.report();
        assert_eq!(r.method, "visipruner");
        assert_eq!(r.config, PruneConfig::VisiPruner(c).to_json());
        assert_eq!(r.config["layer0"], "split");
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "method",
            "config",
            "fusion_layer",
            "kept_image_tokens",
            "text_only_from_layer",
        ] {
            assert!(json.get(key).is_some(), "report JSON lacks {key}: {json}");
        }
    }

    #[test]
    fn contract_violations_name_the_layer() {
        let image: Vec<usize> = (0..4).collect();
        let mut p = full();
        for l in 0..=SMID {
            let v = LayerView {
                layer: l,
                num_layers: L,
                image_tokens: &image,
                contributions: None,
                last_row_image_attention: None,
            };
            p.after_layer(&v).unwrap();
        }
        let mut v = LayerView {
            layer: SMID + 1,
            num_layers: L,
            image_tokens: &image,
            contributions: None,
            last_row_image_attention: None,
        };
        let err = p.after_layer(&v).unwrap_err();
        assert_eq!(
            err,
            PruneError::MissingCapture {
                layer: SMID + 1,
                what: "contributions"
            }
        );
        let short = [(0.5, 1.0); 3];
        v.contributions = Some(&short);
        let err = p.after_layer(&v).unwrap_err();
        assert_eq!(
            err,
            PruneError::Length {
                layer: SMID + 1,
                what: "contributions",
                got: 3,
                expected: 4
            }
        );
        // A failed call does not advance: the same layer can be retried.
        let ok = [(0.5, 1.0); 4];
        v.contributions = Some(&ok);
        assert_eq!(p.after_layer(&v).unwrap(), Action::Continue);
        let err = p.after_layer(&v).unwrap_err();
        assert_eq!(
            err,
            PruneError::LayerOrder {
                got: SMID + 1,
                expected: SMID + 2
            }
        );
    }

    #[test]
    fn prompt_without_image_is_left_alone() {
        for mode in [r#"["shallow","middle","deep"]"#, r#"["deep"]"#] {
            let mut p = pruner(cfg(mode, r#","mid_deep_layer":4"#));
            let t = drive(&mut p, L, 0, |_, img| vec![(1.0, 0.0); img.len()], no_attn);
            assert!(t.keeps().is_empty(), "{mode}: keeps {:?}", t.keeps());
            assert_eq!(p.report().text_only_from_layer, None, "{mode}");
        }
    }

    #[test]
    fn mode_struct_matches_parsed_config() {
        let c = cfg(r#"["deep","middle"]"#, "");
        assert_eq!(
            c.mode,
            Mode {
                shallow: false,
                middle: true,
                deep: true
            }
        );
    }

    fn forced(fusion: usize, keep: usize, exit: Option<usize>) -> VisiPruner {
        let fs = ForcedSchedule {
            fusion_layer: fusion,
            keep,
            text_only_from: exit,
        };
        VisiPruner::forced(cfg(r#"["shallow","middle","deep"]"#, ""), L, fs)
            .unwrap_or_else(|e| panic!("forced {fusion}/{keep}/{exit:?}: {e}"))
    }

    #[test]
    fn forced_select_is_evenly_spaced_and_ascending() {
        let image: Vec<usize> = (0..N).collect();
        assert_eq!(ForcedSchedule::select(&image, 4), vec![72, 216, 360, 504]);
        assert_eq!(ForcedSchedule::select(&image, 1), vec![288]);
        assert_eq!(ForcedSchedule::select(&image, 0), Vec::<usize>::new());
        assert_eq!(ForcedSchedule::select(&image[..3], 9), vec![0, 1, 2]);
        for k in 1..=N {
            let s = ForcedSchedule::select(&image, k);
            assert_eq!(s.len(), k, "k {k}: length");
            if let Some(i) = s.windows(2).position(|w| w[0] >= w[1]) {
                panic!(
                    "k {k}: entry {i} = {} not below entry {} = {}",
                    s[i],
                    i + 1,
                    s[i + 1]
                );
            }
        }
    }

    #[test]
    fn forced_schedule_runs_the_real_captures_with_imposed_decisions() {
        for seed in 0..5u64 {
            // Contributions that would fire fusion on every layer and never be silent:
            // the forced decisions must win over them.
            let mut rng = Rng::new(seed);
            let (f, k, e) = (12, 10, 18);
            let mut p = forced(f, k, Some(e));
            let t = drive(
                &mut p,
                L,
                N,
                |_, img| {
                    let mut c = quiet(&mut rng, img.len());
                    c[0].1 = 0.1;
                    c
                },
                no_attn,
            );
            let want_k = ForcedSchedule::select(&(0..N).collect::<Vec<_>>(), k);
            assert_eq!(
                t.keeps(),
                vec![(f, want_k.clone()), (e - 1, vec![])],
                "seed {seed}"
            );
            // Same captures as the real policy: middle on smid+1..=f, deep on f+1..e-1.
            assert_eq!(
                t.layers_capturing(Capture::Contributions),
                (SMID + 1..e).collect::<Vec<_>>(),
                "seed {seed}: captures"
            );
            for l in 0..L {
                let want = match l {
                    _ if l <= f => N,
                    _ if l < e => k,
                    _ => 0,
                };
                assert_eq!(
                    t.image[l].len(),
                    want,
                    "seed {seed}: layer {l} image tokens"
                );
            }
            assert_eq!(t.masks[0], ShallowMask::Layer0Sink, "seed {seed}");
            assert_eq!(t.masks[SMID - 1], ShallowMask::TextToImage, "seed {seed}");
            let r = p.report();
            assert_eq!(
                (r.fusion_layer, r.kept_image_tokens, r.text_only_from_layer),
                (Some(f), Some(want_k), Some(e)),
                "seed {seed}: report"
            );
        }
    }

    #[test]
    fn forced_without_exit_keeps_k_to_the_end() {
        let mut rng = Rng::new(7);
        let mut p = forced(9, 100, None);
        let t = drive(&mut p, L, N, |_, img| quiet(&mut rng, img.len()), no_attn);
        assert_eq!(t.keeps().len(), 1, "keeps: {:?}", t.keeps());
        assert_eq!(t.image[L - 1].len(), 100);
        assert_eq!(p.report().text_only_from_layer, None);
        // Reset re-arms the same forced schedule.
        p.reset();
        let t = drive(&mut p, L, N, |_, img| quiet(&mut rng, img.len()), no_attn);
        assert_eq!(t.keeps()[0].0, 9);
    }

    #[test]
    fn forced_schedule_rejects_impossible_layers() {
        let c = || cfg(r#"["shallow","middle","deep"]"#, "");
        let fs = |f, e| ForcedSchedule {
            fusion_layer: f,
            keep: 10,
            text_only_from: e,
        };
        for (f, e, key) in [
            (SMID, None, "fusion"),
            (L - 1, None, "fusion"),
            (12, Some(13), "exit"),
            (12, Some(L), "exit"),
        ] {
            let err = VisiPruner::forced(c(), L, fs(f, e)).err();
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(key), "fusion {f} exit {e:?}: got {msg:?}");
        }
        // The last legal exit: layer L-2 is the last one deep-captured.
        let mut p = VisiPruner::forced(c(), L, fs(12, Some(L - 1))).unwrap();
        let t = drive(&mut p, L, N, |_, img| vec![(0.5, 1.0); img.len()], no_attn);
        assert_eq!(t.keeps().last().map(|k| k.0), Some(L - 2));
        assert!(t.image[L - 1].is_empty(), "layer L-1 must be text-only");
        let no_deep = cfg(r#"["shallow","middle"]"#, "");
        assert!(VisiPruner::forced(no_deep.clone(), L, fs(12, Some(18))).is_err());
        assert!(VisiPruner::forced(no_deep, L, fs(12, None)).is_ok());
        let no_middle = cfg(r#"["shallow"]"#, "");
        assert!(VisiPruner::forced(no_middle, L, fs(12, None)).is_err());
    }
}

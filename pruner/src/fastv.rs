//! FastV (Chen et al., 2024): after layer K-1, keep the image tokens the last prompt token
//! attends to most (attention averaged over heads) and run layers K.. on them.

use crate::config::{ConfigError, FastVConfig, PruneConfig};
use crate::policy::{last_row, Tracker};
use crate::{Action, Capture, LayerView, PruneError, PruneReport, Pruner, ShallowMask};
use std::cmp::Ordering;

/// The FastV policy.
#[derive(Debug, Clone)]
pub struct FastV {
    cfg: FastVConfig,
    tracker: Tracker,
    kept: Option<Vec<usize>>,
    text_only_from: Option<usize>,
}

impl FastV {
    /// Image tokens kept out of `n` when dropping the fraction `ratio`:
    /// `round(n * (1 - ratio))`, halves away from zero (576 at 0.5 -> 288; 3 at 0.5 -> 2).
    /// Rounding rather than truncating makes `ratio` the nearest achievable drop fraction.
    pub fn keep_count(n: usize, ratio: f64) -> usize {
        let k = (n as f64 * (1.0 - ratio)).round();
        // ratio in [0, 1) keeps k in [0, n]; the clamp only guards a hand-built config.
        (k.max(0.0) as usize).min(n)
    }

    /// Validates `cfg` for a model with `num_layers` decoder layers and builds the policy.
    pub fn new(cfg: FastVConfig, num_layers: usize) -> Result<Self, ConfigError> {
        PruneConfig::FastV(cfg).validate(num_layers)?;
        Ok(Self::from_checked(cfg, num_layers))
    }

    /// [`FastV::new`] for a config already validated (a [`crate::PrunePlan`]).
    pub(crate) fn from_checked(cfg: FastVConfig, num_layers: usize) -> Self {
        FastV {
            cfg,
            tracker: Tracker::new(num_layers),
            kept: None,
            text_only_from: None,
        }
    }

    fn select(&self, view: &LayerView) -> Result<Vec<usize>, PruneError> {
        let attn = last_row(view)?;
        if let Some((index, &value)) = attn.iter().enumerate().find(|(_, a)| !a.is_finite()) {
            return Err(PruneError::NonFinite {
                layer: view.layer,
                what: "last_row_image_attention",
                index,
                value,
            });
        }
        let mut order: Vec<usize> = (0..attn.len()).collect();
        // Highest attention first; ties go to the lower index. Finite, so never None.
        order.sort_by(|&a, &b| {
            attn[b]
                .partial_cmp(&attn[a])
                .unwrap_or(Ordering::Equal)
                .then(a.cmp(&b))
        });
        let keep = match self.cfg.keep {
            Some(n) => n.min(attn.len()),
            None => Self::keep_count(attn.len(), self.cfg.ratio),
        };
        order.truncate(keep);
        order.sort_unstable();
        Ok(order.into_iter().map(|i| view.image_tokens[i]).collect())
    }
}

impl Pruner for FastV {
    fn mask(&self, _layer: usize) -> ShallowMask {
        ShallowMask::None
    }

    fn first_decision_layer(&self) -> Option<usize> {
        Some(self.cfg.k.saturating_sub(1))
    }

    fn capture(&self, layer: usize) -> Capture {
        if layer + 1 == self.cfg.k && self.kept.is_none() && !self.tracker.no_image_left() {
            Capture::LastRowProbs
        } else {
            Capture::Nothing
        }
    }

    fn after_layer(&mut self, view: &LayerView) -> Result<Action, PruneError> {
        self.tracker.check(view)?;
        let action =
            if self.capture(view.layer) == Capture::LastRowProbs && !view.image_tokens.is_empty() {
                let k = self.select(view)?;
                if k.is_empty() {
                    self.text_only_from = Some(self.cfg.k);
                }
                self.kept = Some(k.clone());
                Action::Keep(k)
            } else {
                Action::Continue
            };
        self.tracker.advance(view, &action);
        Ok(action)
    }

    fn report(&self) -> PruneReport {
        PruneReport {
            method: "fastv".to_string(),
            config: PruneConfig::FastV(self.cfg).to_json(),
            fusion_layer: None,
            kept_image_tokens: self.kept.clone(),
            text_only_from_layer: self.text_only_from,
        }
    }

    fn reset(&mut self) {
        self.tracker.reset();
        self.kept = None;
        self.text_only_from = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{drive, no_contrib, Rng};

    const L: usize = 32;

    fn fastv(k: usize, ratio: f64) -> FastV {
        FastV::new(
            FastVConfig {
                k,
                ratio,
                keep: None,
            },
            L,
        )
        .unwrap_or_else(|e| panic!("k {k} ratio {ratio}: {e}"))
    }

    #[test]
    fn keep_count_rounds_half_away_from_zero() {
        assert_eq!(FastV::keep_count(576, 0.5), 288);
        assert_eq!(FastV::keep_count(576, 0.75), 144);
        assert_eq!(FastV::keep_count(576, 0.0), 576);
        assert_eq!(FastV::keep_count(3, 0.5), 2, "1.5 rounds up");
        assert_eq!(FastV::keep_count(2, 0.75), 1, "0.5 rounds up");
        assert_eq!(FastV::keep_count(1, 0.6), 0, "0.4 rounds down");
        assert_eq!(FastV::keep_count(0, 0.5), 0);
    }

    #[test]
    fn captures_only_layer_k_minus_1_and_keeps_from_k() {
        let mut p = fastv(3, 0.5);
        let mut rng = Rng::new(1);
        let t = drive(&mut p, L, 10, no_contrib, |_, img| {
            img.iter().map(|_| rng.uniform(0.0, 1.0)).collect()
        });
        assert_eq!(t.layers_capturing(Capture::LastRowProbs), vec![2]);
        let keeps = t.keeps();
        assert_eq!(keeps.len(), 1);
        assert_eq!(keeps[0].0, 2, "Keep after layer k-1");
        assert_eq!(keeps[0].1.len(), 5);
        assert_eq!(t.image[3], keeps[0].1, "layer k runs pruned");
        assert!(t.masks.iter().all(|&m| m == ShallowMask::None));
    }

    #[test]
    fn seeded_selection_is_top_by_attention_ties_to_lower_index() {
        for seed in 0..20u64 {
            let mut rng = Rng::new(seed);
            let n = 1 + rng.below(600);
            let ratio = rng.below(100) as f64 / 100.0;
            // Coarse values make ties common.
            let attn: Vec<f32> = (0..n).map(|_| rng.below(8) as f32 / 8.0).collect();
            let mut p = fastv(2, ratio);
            let t = drive(&mut p, L, n, no_contrib, |_, _| attn.clone());
            let got = t
                .keeps()
                .first()
                .map(|(_, k)| k.clone())
                .unwrap_or_default();
            // Brute force: j is kept iff fewer than keep tokens beat it under (attn desc, index asc).
            let keep = FastV::keep_count(n, ratio);
            let want: Vec<usize> = (0..n)
                .filter(|&j| {
                    let better = (0..n)
                        .filter(|&i| attn[i] > attn[j] || (attn[i] == attn[j] && i < j))
                        .count();
                    better < keep
                })
                .collect();
            assert_eq!(got, want, "seed {seed}: n {n} ratio {ratio}");
            assert_eq!(
                p.report().kept_image_tokens,
                Some(want),
                "seed {seed}: report"
            );
        }
    }

    #[test]
    fn hand_picked_selection() {
        let image = [0usize, 1, 2, 3, 4, 5];
        let attn = [0.1f32, 0.3, 0.3, 0.05, 0.3, 0.2];
        let mut p = fastv(1, 0.5);
        let v = LayerView {
            layer: 0,
            num_layers: L,
            image_tokens: &image,
            contributions: None,
            last_row_image_attention: Some(&attn),
        };
        // Three kept: the three 0.3s (indices 1, 2, 4) beat 0.2.
        assert_eq!(p.after_layer(&v).unwrap(), Action::Keep(vec![1, 2, 4]));
        let mut p = fastv(1, 0.75);
        // round(1.5) = 2: tie among the 0.3s goes to indices 1 and 2.
        assert_eq!(p.after_layer(&v).unwrap(), Action::Keep(vec![1, 2]));
    }

    #[test]
    fn keep_budget_is_exact_and_ranks_like_ratio() {
        let mut rng = Rng::new(7);
        let attn: Vec<f32> = (0..576).map(|_| rng.uniform(0.0, 1.0)).collect();
        let kept = |cfg: FastVConfig| {
            let mut p = FastV::new(cfg, L).unwrap();
            drive(&mut p, L, attn.len(), no_contrib, |_, _| attn.clone());
            p.report().kept_image_tokens.unwrap()
        };
        for n in [1usize, 64, 128, 192, 576] {
            let k = kept(FastVConfig {
                k: 2,
                ratio: 0.0,
                keep: Some(n),
            });
            assert_eq!(k.len(), n);
            // The same tokens as the ratio that keeps n.
            let r = kept(FastVConfig {
                k: 2,
                ratio: 1.0 - n as f64 / 576.0,
                keep: None,
            });
            assert_eq!(k, r, "keep {n}");
        }
    }

    #[test]
    fn zero_kept_means_text_only_from_k() {
        let mut p = fastv(4, 0.6);
        let t = drive(&mut p, L, 1, no_contrib, |_, img| vec![0.5; img.len()]);
        assert_eq!(t.keeps(), vec![(3, vec![])]);
        assert_eq!(p.report().text_only_from_layer, Some(4));
    }

    #[test]
    fn rejects_missing_wrong_length_and_nan_attention() {
        let image = [0usize, 1, 2];
        let mut p = fastv(1, 0.5);
        let mut v = LayerView {
            layer: 0,
            num_layers: L,
            image_tokens: &image,
            contributions: None,
            last_row_image_attention: None,
        };
        assert_eq!(
            p.after_layer(&v).unwrap_err(),
            PruneError::MissingCapture {
                layer: 0,
                what: "last_row_image_attention"
            }
        );
        let short = [0.1f32; 2];
        v.last_row_image_attention = Some(&short);
        assert!(matches!(
            p.after_layer(&v),
            Err(PruneError::Length {
                layer: 0,
                got: 2,
                expected: 3,
                ..
            })
        ));
        let nan = [0.1f32, f32::NAN, 0.2];
        v.last_row_image_attention = Some(&nan);
        assert!(matches!(
            p.after_layer(&v),
            Err(PruneError::NonFinite {
                layer: 0,
                index: 1,
                ..
            })
        ));
    }

    #[test]
    fn reset_and_report() {
        let mut p = fastv(2, 0.5);
        drive(&mut p, L, 4, no_contrib, |_, _| vec![0.4, 0.1, 0.3, 0.2]);
        let r = p.report();
        assert_eq!(r.method, "fastv");
        assert_eq!(
            r.config,
            serde_json::json!({"method":"fastv","k":2,"ratio":0.5})
        );
        assert_eq!(r.fusion_layer, None);
        assert_eq!(r.kept_image_tokens, Some(vec![0, 2]));
        assert_eq!(r.text_only_from_layer, None);
        p.reset();
        assert_eq!(p.report().kept_image_tokens, None);
        assert_eq!(p.capture(1), Capture::LastRowProbs);
        drive(&mut p, L, 4, no_contrib, |_, _| vec![0.1, 0.4, 0.2, 0.3]);
        assert_eq!(p.report().kept_image_tokens, Some(vec![1, 3]));
    }
}

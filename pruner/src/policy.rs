//! The interface between the layer scheduler and a pruning policy.

use serde::Serialize;
use serde_json::Value;

/// The attention mask a prefill layer applies to image keys (after the softmax, no
/// renormalisation); the scheduler maps it to an engine mask over the layer's image span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShallowMask {
    /// Plain causal attention.
    None,
    /// Layer-0 `sink`: zero every query `i >= s` on image keys, then give each text query
    /// its former total image probability on the first image key `s`.
    Layer0Sink,
    /// Layer-0 `split`: zero image queries on image keys, and text queries on the first
    /// [`ShallowMask::split_hidden`] image keys.
    Layer0Split,
    /// Zero text queries (`i >= e`) on image keys; image queries are untouched.
    TextToImage,
}

impl ShallowMask {
    /// How many leading image keys `Layer0Split` hides from text queries: the first half of
    /// the span, rounded down (576 -> 288). Engine and FLOPs counter share this definition.
    pub const fn split_hidden(image_len: usize) -> usize {
        image_len / 2
    }

    /// The engine mask this stage means over image rows `[s, e)` (cache rows); its
    /// [`engine_core::AttentionMask::rules`] are what every backend and the FLOPs counter run.
    pub fn attention_mask(self, s: usize, e: usize) -> engine_core::AttentionMask {
        use engine_core::AttentionMask as M;
        match self {
            ShallowMask::None => M::None,
            ShallowMask::Layer0Sink => M::Layer0Sink {
                image_start: s,
                image_end: e,
            },
            ShallowMask::Layer0Split => M::Layer0Split {
                image_start: s,
                image_end: e,
            },
            ShallowMask::TextToImage => M::TextToImage {
                image_start: s,
                image_end: e,
            },
        }
    }
}

impl ShallowMask {
    /// The engine mask this stage means over image rows that form the ascending, disjoint
    /// `runs` `[start, end)` of cache rows (one run per image span still holding tokens,
    /// runs of adjacent spans merged). One run is [`ShallowMask::attention_mask`]; over
    /// several the stage acts on every image key of every run (see the crate docs):
    /// - `Layer0Sink`: every query from the first image row on loses all image keys; text
    ///   queries put that mass back on the first image key of the prompt;
    /// - `Layer0Split`: image queries lose all image keys; text queries lose the first
    ///   [`ShallowMask::split_hidden`] keys of every run;
    /// - `TextToImage`: text queries lose all image keys.
    ///
    /// Written as rules in which `Keep` rules first carve the text between runs out of the
    /// broader ones. Errors when they need more than [`engine_core::MAX_MASK_RULES`] rules
    /// (2 per run, 3 per run less one for `Layer0Split`).
    pub fn attention_mask_runs(
        self,
        runs: &[(usize, usize)],
    ) -> Result<engine_core::AttentionMask, String> {
        use engine_core::{AttentionMask as M, MaskAction, MaskRule, MaskRules, OPEN_END};
        let (first, last) = match (runs.first(), runs.last()) {
            (Some(f), Some(l)) if runs.len() > 1 && self != ShallowMask::None => (*f, *l),
            (Some(&(s, e)), _) => return Ok(self.attention_mask(s, e)),
            _ => return Ok(M::None),
        };
        let rule = |queries, keys, action| MaskRule {
            queries,
            keys,
            action,
        };
        let all_keys = (first.0, last.1);
        // Text keys between runs stay visible to every query.
        let mut rules: Vec<MaskRule> = runs
            .windows(2)
            .map(|w| rule((first.0, OPEN_END), (w[0].1, w[1].0), MaskAction::Keep))
            .collect();
        // Text query rows: after each run up to the next one (the last: to the end).
        let text_rows = |i: usize| (runs[i].1, runs.get(i + 1).map_or(OPEN_END, |r| r.0));
        match self {
            ShallowMask::None => {}
            ShallowMask::Layer0Sink => {
                let sink = MaskAction::Sink { to: first.0 };
                rules.extend((0..runs.len()).map(|i| rule(text_rows(i), all_keys, sink)));
                rules.push(rule(all_keys, all_keys, MaskAction::Zero));
            }
            ShallowMask::Layer0Split => {
                rules.extend(
                    runs.iter()
                        .map(|&(s, e)| rule((s, e), (first.0, e), MaskAction::Zero)),
                );
                rules.extend(runs.iter().map(|&(s, e)| {
                    rule(
                        (first.1, OPEN_END),
                        (s, s + ShallowMask::split_hidden(e - s)),
                        MaskAction::Zero,
                    )
                }));
            }
            ShallowMask::TextToImage => {
                rules.extend(
                    runs.iter()
                        .map(|&(s, e)| rule((s, e), (0, OPEN_END), MaskAction::Keep)),
                );
                rules.push(rule((first.1, OPEN_END), all_keys, MaskAction::Zero));
            }
        }
        let rules = MaskRules::new(&rules).map_err(|e| {
            format!(
                "the shallow mask over {} separate images: {e} (prune with a method without shallow masks, e.g. FastV, or fewer images)",
                runs.len()
            )
        })?;
        Ok(M::Rules(rules))
    }
}

/// What the scheduler must compute while running a layer, for [`Pruner::after_layer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capture {
    /// Nothing beyond the layer's output.
    Nothing,
    /// For the last prompt token `t` and each image token `j` the layer processed, with
    /// `c_j = concat_h(P_h[t,j] V_h[j])` and `o = sum over all keys` (before o_proj):
    /// `(||c_j||_2, cos(o - c_j, o))`.
    Contributions,
    /// The last prompt token's attention probability on each image token, mean over heads.
    LastRowProbs,
}

/// What the scheduler hands the pruner after running one prefill layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    /// The layer just run.
    pub layer: usize,
    /// Decoder layers in the model.
    pub num_layers: usize,
    /// Original offsets (inside the image span) of the image tokens this layer processed.
    pub image_tokens: &'a [usize],
    /// Per entry of `image_tokens`: `(||c_j||, cos(o - c_j, o))`, when asked for.
    pub contributions: Option<&'a [(f32, f32)]>,
    /// Per entry of `image_tokens`: last-row attention probability mean over heads, when asked for.
    pub last_row_image_attention: Option<&'a [f32]>,
}

/// The pruner's answer after a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Later layers process the same tokens as this one.
    Continue,
    /// Every later layer processes only these image tokens (original offsets, ascending;
    /// empty drops them all). This layer's output is unchanged.
    Keep(Vec<usize>),
}

/// What a pruner decided for the last prompt, for the `--json` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneReport {
    /// `"dense"`, `"visipruner"` or `"fastv"`.
    pub method: String,
    /// The effective configuration ([`crate::PruneConfig::to_json`]).
    pub config: Value,
    /// The layer whose middle-stage check selected K (VisiPruner only).
    pub fusion_layer: Option<usize>,
    /// The selected image tokens as 0-based offsets inside the image span.
    pub kept_image_tokens: Option<Vec<usize>>,
    /// The first layer that processes no image tokens.
    pub text_only_from_layer: Option<usize>,
}

/// A scheduler/pruner contract violation, naming the layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PruneError {
    /// A layer index past the model's end.
    #[error("layer {layer} is out of range for a model with {num_layers} layers")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    /// Layers reported out of order or skipped.
    #[error("after_layer got layer {got}, expected layer {expected} (call it once per layer, in order, from layer 0 after reset)")]
    LayerOrder { got: usize, expected: usize },
    /// The view disagrees with the model the pruner was built for.
    #[error(
        "layer {layer}: view says the model has {got} layers, the pruner was built for {expected}"
    )]
    NumLayers {
        layer: usize,
        got: usize,
        expected: usize,
    },
    /// `image_tokens` is malformed or disagrees with earlier decisions.
    #[error("layer {layer}: image_tokens {reason}")]
    ImageTokens { layer: usize, reason: String },
    /// The capture the pruner asked for is absent.
    #[error("layer {layer}: the pruner asked for {what} but the view carries none")]
    MissingCapture { layer: usize, what: &'static str },
    /// A capture whose length differs from `image_tokens`.
    #[error(
        "layer {layer}: {what} has {got} entries but the layer processed {expected} image tokens"
    )]
    Length {
        layer: usize,
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// A capture value that cannot be ranked.
    #[error("layer {layer}: {what}[{index}] = {value} is not finite")]
    NonFinite {
        layer: usize,
        what: &'static str,
        index: usize,
        value: f32,
    },
}

/// A visual-token pruning policy driven layer by layer during prefill (decode never
/// consults it). Call [`Pruner::after_layer`] once per layer, in order, from layer 0.
pub trait Pruner: Send {
    /// The mask to apply while running `layer`.
    fn mask(&self, layer: usize) -> ShallowMask;
    /// What the scheduler must capture while running `layer`.
    fn capture(&self, layer: usize) -> Capture;
    /// Digests a finished layer; a `Keep` applies to every later layer.
    fn after_layer(&mut self, view: &LayerView) -> Result<Action, PruneError>;
    /// The decisions taken so far for the current prompt.
    fn report(&self) -> PruneReport;
    /// The first layer after which this pruner may change the rows later layers process
    /// (a later prompt's schedule can only part from an earlier one's after it, so the
    /// scheduler keeps layer outputs from there on); `None` when it never prunes.
    fn first_decision_layer(&self) -> Option<usize> {
        Some(0)
    }
    /// Forgets the previous prompt.
    fn reset(&mut self);
}

/// A pruner that never masks, captures or drops anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dense;

impl Pruner for Dense {
    fn mask(&self, _layer: usize) -> ShallowMask {
        ShallowMask::None
    }
    fn capture(&self, _layer: usize) -> Capture {
        Capture::Nothing
    }
    fn after_layer(&mut self, _view: &LayerView) -> Result<Action, PruneError> {
        Ok(Action::Continue)
    }
    fn first_decision_layer(&self) -> Option<usize> {
        None
    }
    fn report(&self) -> PruneReport {
        PruneReport {
            method: "dense".to_string(),
            config: crate::PruneConfig::Dense.to_json(),
            fusion_layer: None,
            kept_image_tokens: None,
            text_only_from_layer: None,
        }
    }
    fn reset(&mut self) {}
}

/// Shared bookkeeping: checks that views arrive in order and carry the image tokens the
/// earlier decisions imply, so a scheduler bug surfaces at the layer where it happens.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    num_layers: usize,
    next_layer: usize,
    /// Image tokens the next layer processes; learned from layer 0's view.
    image: Option<Vec<usize>>,
}

impl Tracker {
    pub(crate) fn new(num_layers: usize) -> Self {
        Tracker {
            num_layers,
            next_layer: 0,
            image: None,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next_layer = 0;
        self.image = None;
    }

    /// True once the remaining image tokens are known to be none.
    pub(crate) fn no_image_left(&self) -> bool {
        self.image.as_ref().is_some_and(|v| v.is_empty())
    }

    /// Image tokens the next layer processes, once known.
    #[cfg(test)]
    pub(crate) fn image(&self) -> Option<&[usize]> {
        self.image.as_deref()
    }

    pub(crate) fn check(&self, view: &LayerView) -> Result<(), PruneError> {
        if view.num_layers != self.num_layers {
            return Err(PruneError::NumLayers {
                layer: view.layer,
                got: view.num_layers,
                expected: self.num_layers,
            });
        }
        if view.layer >= self.num_layers {
            return Err(PruneError::LayerOutOfRange {
                layer: view.layer,
                num_layers: self.num_layers,
            });
        }
        if view.layer != self.next_layer {
            return Err(PruneError::LayerOrder {
                got: view.layer,
                expected: self.next_layer,
            });
        }
        match &self.image {
            None => {
                if let Some(i) = view.image_tokens.windows(2).position(|w| w[0] >= w[1]) {
                    return Err(PruneError::ImageTokens {
                        layer: view.layer,
                        reason: format!(
                            "must be strictly ascending, but entry {} is {} and entry {} is {}",
                            i,
                            view.image_tokens[i],
                            i + 1,
                            view.image_tokens[i + 1]
                        ),
                    });
                }
            }
            Some(expected) if expected.as_slice() != view.image_tokens => {
                let first_diff = expected
                    .iter()
                    .zip(view.image_tokens)
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.len().min(view.image_tokens.len()));
                return Err(PruneError::ImageTokens {
                    layer: view.layer,
                    reason: format!(
                        "differ from the tokens kept so far: {} entries vs {} expected, first difference at entry {}",
                        view.image_tokens.len(),
                        expected.len(),
                        first_diff
                    ),
                });
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Records a checked view and the action taken on it.
    pub(crate) fn advance(&mut self, view: &LayerView, action: &Action) {
        if self.image.is_none() {
            self.image = Some(view.image_tokens.to_vec());
        }
        if let Action::Keep(k) = action {
            self.image = Some(k.clone());
        }
        self.next_layer = view.layer + 1;
    }
}

/// The captured contributions, checked against the view's image tokens.
pub(crate) fn contributions<'a>(view: &LayerView<'a>) -> Result<&'a [(f32, f32)], PruneError> {
    let c = view.contributions.ok_or(PruneError::MissingCapture {
        layer: view.layer,
        what: "contributions",
    })?;
    check_len(view, "contributions", c.len())?;
    Ok(c)
}

/// The captured last-row attention, checked against the view's image tokens.
pub(crate) fn last_row<'a>(view: &LayerView<'a>) -> Result<&'a [f32], PruneError> {
    let a = view
        .last_row_image_attention
        .ok_or(PruneError::MissingCapture {
            layer: view.layer,
            what: "last_row_image_attention",
        })?;
    check_len(view, "last_row_image_attention", a.len())?;
    Ok(a)
}

fn check_len(view: &LayerView, what: &'static str, got: usize) -> Result<(), PruneError> {
    if got == view.image_tokens.len() {
        Ok(())
    } else {
        Err(PruneError::Length {
            layer: view.layer,
            what,
            got,
            expected: view.image_tokens.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(layer: usize, image: &[usize]) -> LayerView<'_> {
        LayerView {
            layer,
            num_layers: 4,
            image_tokens: image,
            contributions: None,
            last_row_image_attention: None,
        }
    }

    #[test]
    fn dense_never_acts() {
        let mut d = Dense;
        let image: Vec<usize> = (0..8).collect();
        for layer in 0..4 {
            assert_eq!(d.mask(layer), ShallowMask::None, "layer {layer}");
            assert_eq!(d.capture(layer), Capture::Nothing, "layer {layer}");
            assert_eq!(
                d.after_layer(&view(layer, &image)).unwrap(),
                Action::Continue
            );
        }
        let r = d.report();
        assert_eq!(
            (r.fusion_layer, r.kept_image_tokens, r.text_only_from_layer),
            (None, None, None)
        );
    }

    #[test]
    fn tracker_rejects_contract_violations() {
        let image = [0, 1, 2, 3];
        let mut t = Tracker::new(4);
        let err = t.check(&view(1, &image)).unwrap_err();
        assert_eq!(
            err,
            PruneError::LayerOrder {
                got: 1,
                expected: 0
            }
        );
        let err = t.check(&view(4, &image)).unwrap_err();
        assert_eq!(
            err,
            PruneError::LayerOutOfRange {
                layer: 4,
                num_layers: 4
            }
        );
        let mut v = view(0, &image);
        v.num_layers = 5;
        assert!(matches!(
            t.check(&v),
            Err(PruneError::NumLayers {
                got: 5,
                expected: 4,
                ..
            })
        ));
        let err = t.check(&view(0, &[0, 2, 2])).unwrap_err().to_string();
        assert!(err.contains("layer 0") && err.contains("entry 1"), "{err}");

        t.check(&view(0, &image)).unwrap();
        t.advance(&view(0, &image), &Action::Keep(vec![1, 3]));
        assert_eq!(t.image(), Some(&[1, 3][..]));
        let err = t.check(&view(1, &image)).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains("differ"), "{err}");
        t.check(&view(1, &[1, 3])).unwrap();
        t.reset();
        assert_eq!(t.image(), None);
        t.check(&view(0, &image)).unwrap();
    }

    #[test]
    fn capture_length_mismatch_names_the_layer() {
        let image = [0, 1, 2];
        let c = [(0.5f32, 0.9f32); 2];
        let mut v = view(2, &image);
        assert_eq!(
            contributions(&v).unwrap_err(),
            PruneError::MissingCapture {
                layer: 2,
                what: "contributions"
            }
        );
        v.contributions = Some(&c);
        let err = contributions(&v).unwrap_err().to_string();
        assert!(
            err.starts_with("layer 2: contributions has 2 entries"),
            "{err}"
        );
        let a = [0.1f32; 4];
        v.last_row_image_attention = Some(&a);
        let err = last_row(&v).unwrap_err().to_string();
        assert!(
            err.contains("4 entries") && err.contains("3 image tokens"),
            "{err}"
        );
    }
}

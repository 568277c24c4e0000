//! DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
//! Multimodal Models", CVPR 2025; github.com/vbdi/divprune): before the decoder, keep a
//! max-min diverse subset of each image's projected embeddings.
//!
//! The authors' selection (`LlavaMetaForCausalLM.DivPrune` in their
//! `LLaVA/llava/model/llava_arch.py`) over the image rows `x` of one image:
//! - distances `D = 1 - cos(x_i, x_j)` (rows scaled to unit length, then a Gram matrix);
//! - pick 0: the column whose *second* smallest distance (its nearest other token; the
//!   smallest is its own ~0) is largest;
//! - pick i > 0: the column whose smallest distance to the picks so far is largest;
//! - `argmax` takes the first (lowest) index among equal scores; the picks, sorted, are
//!   the rows kept. Upstream then drops the other rows from the decoder input and the kept
//!   rows are numbered on: position ids run 0..S'-1 over the shorter prompt.
//!
//! One deviation, in a degenerate case: upstream's argmax runs over every column, the
//! picked ones included (whose score is their ~0 self-distance). When every remaining token
//! lies at distance ~0 from a pick (duplicate patches: flat image regions), upstream may
//! pick a token again and feed it twice. Here picked tokens are never picked again, so
//! exactly `keep` distinct tokens survive; until upstream's first repeat the two orders are
//! the same. Distances are computed in f64 (upstream's dtype is the model's; float32 and
//! float64 agree on every fixture run in `tools/divprune_ref.py` whose margin is above
//! float noise). A zero row (no direction) is at distance 1 from every token.

use crate::config::{DivPruneConfig, PruneConfig};
use crate::{Action, Capture, LayerView, PruneError, PruneReport, Pruner, ShallowMask};

/// Rows of `x` (`n` rows of `dim`, row-major) scaled to unit length, in f64.
fn unit_rows(x: &[f32], dim: usize) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    for row in out.chunks_mut(dim.max(1)) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

fn dist(u: &[f64], dim: usize, i: usize, j: usize) -> f64 {
    let (a, b) = (&u[i * dim..(i + 1) * dim], &u[j * dim..(j + 1) * dim]);
    1.0 - a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>()
}

/// First index of the largest value among those `allowed`; `None` when none is.
fn argmax(scores: &[f64], allowed: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (j, &s) in scores.iter().enumerate() {
        if !allowed(j) {
            continue;
        }
        // Only a strictly larger score replaces the best so far: ties keep the lower index
        // (NaN never arises: zero rows are handled before).
        let better = match best {
            None => true,
            Some(b) => s.partial_cmp(&scores[b]) == Some(std::cmp::Ordering::Greater),
        };
        if better {
            best = Some(j);
        }
    }
    best
}

/// DivPrune's picks over the `n = x.len() / dim` image rows `x`, in the order the greedy
/// selection takes them (`keep.min(n)` distinct indices; see the module docs).
pub fn divprune_order(x: &[f32], dim: usize, keep: usize) -> Vec<usize> {
    let n = x.len().checked_div(dim).unwrap_or(0);
    let keep = keep.min(n);
    if keep == 0 {
        return Vec::new();
    }
    let u = unit_rows(&x[..n * dim], dim);
    let zero: Vec<bool> = u.chunks(dim).map(|r| r.iter().all(|&v| v == 0.0)).collect();
    let d = |i: usize, j: usize| {
        if zero[i] || zero[j] {
            1.0
        } else {
            dist(&u, dim, i, j)
        }
    };
    // Pick 0: each column's second smallest distance over all rows (itself included).
    let mut score: Vec<f64> = (0..n)
        .map(|j| {
            let (mut lo, mut second) = (f64::INFINITY, f64::INFINITY);
            for i in 0..n {
                let v = d(i, j);
                if v < lo {
                    second = lo;
                    lo = v;
                } else if v < second {
                    second = v;
                }
            }
            // One token alone has no neighbour: upstream cannot run; it is simply kept.
            if n == 1 {
                0.0
            } else {
                second
            }
        })
        .collect();
    let mut picked = vec![false; n];
    let mut order = Vec::with_capacity(keep);
    let first = argmax(&score, |_| true).unwrap_or(0);
    order.push(first);
    picked[first] = true;
    // From pick 1 on: the smallest distance to any pick, updated one pick at a time.
    score = (0..n).map(|j| d(first, j)).collect();
    while order.len() < keep {
        let Some(p) = argmax(&score, |j| !picked[j]) else {
            break;
        };
        order.push(p);
        picked[p] = true;
        for (j, s) in score.iter_mut().enumerate() {
            let v = d(p, j);
            if v < *s {
                *s = v;
            }
        }
    }
    order
}

/// [`divprune_order`], sorted: the rows kept, in prompt order.
pub fn divprune_select(x: &[f32], dim: usize, keep: usize) -> Vec<usize> {
    let mut k = divprune_order(x, dim, keep);
    k.sort_unstable();
    k
}

/// The pruner of a method that selected its image tokens before the decoder (DivPrune):
/// the decoder runs dense on the shorter prompt, and the report states the method, its
/// config and the kept tokens (offsets over the original image positions of the prompt).
#[derive(Debug, Clone)]
pub struct Preselected {
    config: PruneConfig,
    kept: Vec<usize>,
}

impl Preselected {
    /// A pre-decoder selection of `kept` (ascending offsets over all image positions).
    pub fn new(config: PruneConfig, kept: Vec<usize>) -> Self {
        Preselected { config, kept }
    }

    /// DivPrune's config at `keep` tokens per image.
    pub fn divprune(keep: usize, kept: Vec<usize>) -> Self {
        Self::new(PruneConfig::DivPrune(DivPruneConfig { keep }), kept)
    }
}

impl Pruner for Preselected {
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
            method: self.config.method().to_string(),
            config: self.config.to_json(),
            fusion_layer: None,
            kept_image_tokens: Some(self.kept.clone()),
            text_only_from_layer: None,
        }
    }
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// Upstream's algorithm written the way upstream writes it (full distance matrix,
    /// argmax over every column, picked ones included).
    fn upstream_like(x: &[f32], dim: usize, keep: usize) -> Vec<usize> {
        let n = x.len() / dim;
        let u = unit_rows(x, dim);
        let m: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| dist(&u, dim, i, j)).collect())
            .collect();
        let mut s: Vec<usize> = Vec::new();
        for i in 0..keep {
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let mut col: Vec<f64> = if i == 0 {
                        (0..n).map(|r| m[r][j]).collect()
                    } else {
                        s.iter().map(|&r| m[r][j]).collect()
                    };
                    col.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    if i == 0 {
                        col[1]
                    } else {
                        col[0]
                    }
                })
                .collect();
            s.push(argmax(&scores, |_| true).unwrap());
        }
        s
    }

    #[test]
    fn matches_the_upstream_formulation_on_random_rows() {
        for seed in 0..10u64 {
            let mut rng = Rng::new(seed);
            // Generic directions (dim >= 3): no two tokens coincide, so upstream never repeats.
            let (n, dim) = (20 + rng.below(60), 3 + rng.below(12));
            let x: Vec<f32> = (0..n * dim).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let keep = 1 + rng.below(n / 2);
            let got = divprune_order(&x, dim, keep);
            assert_eq!(
                got,
                upstream_like(&x, dim, keep),
                "seed {seed} n {n} dim {dim}"
            );
            let mut dedup = got.clone();
            dedup.sort_unstable();
            dedup.dedup();
            assert_eq!(dedup.len(), keep, "seed {seed}: distinct picks");
        }
    }

    #[test]
    fn hand_picked_max_min() {
        // Directions at 0, 10, 90 and 180 degrees (2-D): the first pick is the token whose
        // nearest neighbour is farthest (90 deg: 80 from 10, 90 from 0 and 180), then the
        // farthest from it, etc.
        let deg = |a: f32| {
            let r = a.to_radians();
            [r.cos(), r.sin()]
        };
        let x: Vec<f32> = [0.0f32, 10.0, 90.0, 180.0]
            .iter()
            .flat_map(|&a| deg(a))
            .collect();
        // Pick 0: nearest-other distances: 0 -> 1-cos10, 10 -> 1-cos10, 90 -> 1-cos80,
        // 180 -> 1-cos90 = 1: token 3 (180 deg). Pick 1: farthest from 180 deg is 0 deg
        // (distance 2). Pick 2: min distance to {180, 0}: 10 deg -> 1-cos10, 90 -> 1: 90.
        assert_eq!(divprune_order(&x, 2, 3), vec![3, 0, 2]);
        assert_eq!(divprune_select(&x, 2, 3), vec![0, 2, 3]);
        assert_eq!(
            divprune_select(&x, 2, 9),
            vec![0, 1, 2, 3],
            "keep caps at n"
        );
        assert_eq!(divprune_select(&x, 2, 0), Vec::<usize>::new());
    }

    #[test]
    fn duplicates_are_never_picked_twice() {
        // Four copies of one direction and one other: upstream would pick a copy again.
        let x = [1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let got = divprune_order(&x, 2, 4);
        assert_eq!(got.len(), 4);
        let mut d = got.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 4, "{got:?}");
        // A zero row is at distance 1 from everything and is never NaN.
        let z = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0];
        assert_eq!(divprune_select(&z, 2, 2).len(), 2);
    }

    #[test]
    fn preselected_reports_method_and_kept() {
        let p = Preselected::divprune(64, vec![1, 5]);
        let r = p.report();
        assert_eq!(r.method, "divprune");
        assert_eq!(r.config, serde_json::json!({"method":"divprune","keep":64}));
        assert_eq!(r.kept_image_tokens, Some(vec![1, 5]));
        assert_eq!(p.first_decision_layer(), None);
    }
}

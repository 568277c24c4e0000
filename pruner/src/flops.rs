//! Analytic prefill FLOPs: `2*M*N*K` per matmul, as actually scheduled.
//!
//! Counted: vision tower layers (q, k, v, o, full attention, MLP), the projector, each
//! decoder layer (q, k, v, o, causal QKᵀ and P·V per head, gate/up/down) and lm_head on the
//! last row. Not counted: norms, softmax, RoPE, activations, biases, embeddings and the
//! patch embedding: they are small and identical with and without pruning. Masked
//! attention still computes QKᵀ (the softmax normalises over every key), but the P·V
//! products a mask zeroes are skipped and not counted.

use crate::ShallowMask;
use serde::Serialize;
use std::ops::Range;

/// Decoder (language model) shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TextShape {
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size (lm_head rows).
    pub vocab: usize,
    /// Decoder layers.
    pub num_layers: usize,
}

/// Vision tower shape, counting only the layers run up to the feature layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VisionShape {
    /// Encoder layers actually run (LLaVA-1.5 with feature layer -2: 23 of 24).
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Tokens per image including CLS (577 for ViT-L/14 at 336 px).
    pub tokens: usize,
    /// Vision-tower passes per prompt: 1 per LLaVA-1.5 image, 1 + tiles per LLaVA-NeXT
    /// image (its base tile and every grid tile go through the tower).
    pub passes: usize,
}

/// Two-layer MLP projector shape (LLaVA-1.5 `mlp2x_gelu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProjectorShape {
    /// Input width (vision hidden).
    pub in_dim: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Output width (text hidden).
    pub out_dim: usize,
}

/// Every shape the FLOPs count needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlopsShape {
    /// Language model.
    pub text: TextShape,
    /// Vision tower.
    pub vision: VisionShape,
    /// Projector.
    pub projector: ProjectorShape,
}

/// What one decoder layer ran in prefill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSchedule {
    /// Tokens in the layer's sequence.
    pub seq_len: usize,
    /// Image tokens' rows inside this layer's sequence: ascending, disjoint runs `[s, e)`
    /// (one per image still holding tokens; empty or an empty run when there are none).
    pub image: Vec<Range<usize>>,
    /// The mask applied.
    pub mask: ShallowMask,
}

impl LayerSchedule {
    /// Image tokens the layer processes (over every run).
    pub fn image_tokens(&self) -> usize {
        self.image.iter().map(|r| r.len()).sum()
    }

    fn runs(&self) -> Vec<(usize, usize)> {
        self.image
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| (r.start, r.end))
            .collect()
    }
}

/// Prefill FLOPs as run and for the same prompt run dense.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlopsReport {
    /// Everything as scheduled (vision, projector, decoder, lm_head).
    pub prefill: u64,
    /// The same prompt with no pruning and no masks.
    pub prefill_dense: u64,
    /// QKᵀ and P·V work over image keys, as scheduled.
    pub attention_image: u64,
    /// QKᵀ and P·V work over image keys, dense.
    pub attention_image_dense: u64,
    /// Vision tower plus projector (included in both prefill totals).
    pub vision: u64,
    /// Each decoder layer as scheduled.
    pub per_layer: Vec<u64>,
}

/// A schedule the counter cannot make sense of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlopsError {
    /// Schedule and model disagree on the layer count.
    #[error("schedule has {got} layers but the model has {expected}")]
    LayerCount { got: usize, expected: usize },
    /// A layer with no tokens.
    #[error("layer {layer}: empty sequence")]
    EmptySequence { layer: usize },
    /// An image span outside its sequence.
    #[error("layer {layer}: image span {start}..{end} does not fit a sequence of {seq_len}")]
    ImageSpan {
        layer: usize,
        start: usize,
        end: usize,
        seq_len: usize,
    },
    /// A layer whose text part differs from layer 0's: pruning only removes image tokens.
    #[error("layer {layer}: {what} (pruning only removes image tokens)")]
    NotAPruning { layer: usize, what: String },
    /// A count beyond u64.
    #[error("FLOPs count overflows u64")]
    Overflow,
    /// A shallow mask the engine cannot express either (too many separate images).
    #[error("layer {layer}: {reason}")]
    Mask { layer: usize, reason: String },
}

/// Counts prefill FLOPs for `schedule` (one entry per decoder layer; layer 0 holds the full
/// prompt) and for the same prompt dense.
pub fn prefill_flops(
    shape: &FlopsShape,
    schedule: &[LayerSchedule],
) -> Result<FlopsReport, FlopsError> {
    let t = &shape.text;
    if schedule.len() != t.num_layers {
        return Err(FlopsError::LayerCount {
            got: schedule.len(),
            expected: t.num_layers,
        });
    }
    check_schedule(schedule)?;
    let Some(first) = schedule.first() else {
        // No decoder layers: nothing but lm_head would run, and there is no prompt to size.
        return Ok(FlopsReport {
            prefill: 0,
            prefill_dense: 0,
            attention_image: 0,
            attention_image_dense: 0,
            vision: 0,
            per_layer: Vec::new(),
        });
    };
    let dense_layer = LayerSchedule {
        seq_len: first.seq_len,
        image: first.image.clone(),
        mask: ShallowMask::None,
    };
    let dense = decoder_layer(t, &dense_layer)?;

    let mut per_layer = Vec::with_capacity(schedule.len());
    let (mut decoder, mut attention_image) = (0u64, 0u64);
    for (layer, l) in schedule.iter().enumerate() {
        let c = decoder_layer(t, l).map_err(|e| match e {
            FlopsError::Mask { reason, .. } => FlopsError::Mask { layer, reason },
            other => other,
        })?;
        per_layer.push(c.total);
        decoder = add(&[decoder, c.total])?;
        attention_image = add(&[attention_image, c.attention_image])?;
    }
    let n_layers = u(t.num_layers);
    let decoder_dense = mul(&[n_layers, dense.total])?;
    let attention_image_dense = mul(&[n_layers, dense.attention_image])?;

    let vision = vision_flops(shape, first.image_tokens())?;
    // lm_head: only the last prompt row produces the first token's logits.
    let lm_head = mul(&[2, u(t.hidden), u(t.vocab)])?;
    Ok(FlopsReport {
        prefill: add(&[vision, decoder, lm_head])?,
        prefill_dense: add(&[vision, decoder_dense, lm_head])?,
        attention_image,
        attention_image_dense,
        vision,
        per_layer,
    })
}

/// Attention (query, key) pairs over image keys whose P·V product `mask` zeroes, for a
/// causal layer of `seq_len` tokens with the image rows in `runs`: counted from the mask's
/// rules (the definition the backends run; the first rule covering a pair decides), a
/// sink's target key staying live (it carries the folded image mass).
fn masked_pairs(
    seq_len: u64,
    runs: &[(usize, usize)],
    mask: ShallowMask,
) -> Result<u64, FlopsError> {
    let all = mask
        .attention_mask_runs(runs)
        .map_err(|reason| FlopsError::Mask { layer: 0, reason })?
        .rules();
    let rules = all.as_slice();
    if rules.is_empty() {
        return Ok(0);
    }
    let seq = usize::try_from(seq_len).map_err(|_| FlopsError::Overflow)?;
    // Rows are grouped into runs where the same rules cover the query; within a run each
    // row's covered keys grow by one per row at most, so count row by row only over the
    // rows some rule covers.
    let mut total = 0u64;
    let mut bounds: Vec<usize> = rules
        .iter()
        .flat_map(|r| [r.queries.0.min(seq), r.queries.1.min(seq)])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut iv: Vec<(usize, usize)> = Vec::with_capacity(rules.len());
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let active: Vec<_> = rules
            .iter()
            .filter(|r| r.queries.0 <= lo && lo < r.queries.1)
            .collect();
        if active.is_empty() {
            continue;
        }
        for i in lo..hi {
            // Keys decided by an earlier rule (kept or zeroed), as sorted disjoint intervals.
            iv.clear();
            let mut covered = 0usize;
            for r in &active {
                let (a, b) = (r.keys.0, r.keys.1.min(i + 1));
                if a >= b {
                    continue;
                }
                if !matches!(r.action, engine_core::MaskAction::Keep) {
                    covered += b - a - overlap(&iv, a, b);
                }
                insert_interval(&mut iv, a, b);
            }
            let live_sink = all.sink_target(i).is_some_and(|to| {
                to <= i
                    && matches!(
                        all.action(i, to),
                        Some(engine_core::MaskAction::Sink { .. })
                    )
            });
            total = total
                .checked_add(u(covered - usize::from(live_sink && covered > 0)))
                .ok_or(FlopsError::Overflow)?;
        }
    }
    Ok(total)
}

/// Length of `[a, b)` already inside the sorted disjoint intervals `iv`.
fn overlap(iv: &[(usize, usize)], a: usize, b: usize) -> usize {
    iv.iter()
        .map(|&(x, y)| y.min(b).saturating_sub(x.max(a)))
        .sum()
}

/// Adds `[a, b)` to the sorted disjoint intervals `iv`, merging what touches it.
fn insert_interval(iv: &mut Vec<(usize, usize)>, a: usize, b: usize) {
    let (mut lo, mut hi) = (a, b);
    iv.retain(|&(x, y)| {
        if y < lo || x > hi {
            true
        } else {
            lo = lo.min(x);
            hi = hi.max(y);
            false
        }
    });
    let at = iv.partition_point(|&(x, _)| x < lo);
    iv.insert(at, (lo, hi));
}

struct LayerCost {
    total: u64,
    attention_image: u64,
}

fn decoder_layer(t: &TextShape, l: &LayerSchedule) -> Result<LayerCost, FlopsError> {
    let s = u(l.seq_len);
    let (h, i) = (u(t.hidden), u(t.intermediate));
    let q_dim = mul(&[u(t.heads), u(t.head_dim)])?;
    let kv_dim = mul(&[u(t.kv_heads), u(t.head_dim)])?;
    let proj = add(&[
        mul(&[2, s, h, q_dim])?,     // q_proj
        mul(&[2, 2, s, h, kv_dim])?, // k_proj, v_proj
        mul(&[2, s, q_dim, h])?,     // o_proj
        mul(&[3, 2, s, h, i])?,      // gate, up, down
    ])?;
    // Per head, QKᵀ and P·V each cost 2*head_dim per (query, key) pair.
    let per_pair = mul(&[2, u(t.head_dim), u(t.heads)])?;
    let pairs = mul(&[s, s + 1])? / 2;
    // Every query from an image row on sees it: a run [a, a + n) has n(s - a) - n(n - 1)/2
    // (query, key) pairs on its keys.
    let runs = l.runs();
    let mut image_pairs = 0u64;
    for &(a, e) in &runs {
        let n = u(e - a);
        let pairs = mul(&[n, s - u(a)])?
            .checked_sub(mul(&[n, n.saturating_sub(1)])? / 2)
            .ok_or(FlopsError::Overflow)?;
        image_pairs = add(&[image_pairs, pairs])?;
    }
    let live_image_pairs = image_pairs
        .checked_sub(masked_pairs(s, &runs, l.mask)?)
        .ok_or(FlopsError::Overflow)?;
    let qk = mul(&[per_pair, pairs])?;
    let pv = mul(&[per_pair, pairs - image_pairs + live_image_pairs])?;
    Ok(LayerCost {
        total: add(&[proj, qk, pv])?,
        attention_image: add(&[
            mul(&[per_pair, image_pairs])?,
            mul(&[per_pair, live_image_pairs])?,
        ])?,
    })
}

/// Vision tower and projector for one image of `image_tokens` LLM tokens (none: no image).
fn vision_flops(shape: &FlopsShape, image_tokens: usize) -> Result<u64, FlopsError> {
    if image_tokens == 0 {
        return Ok(0);
    }
    let v = &shape.vision;
    let (t, h, i) = (u(v.tokens), u(v.hidden), u(v.intermediate));
    let layer = add(&[
        mul(&[4, 2, t, h, h])?, // q, k, v, o
        mul(&[2, 2, t, t, h])?, // QKᵀ and P·V over all heads, bidirectional
        mul(&[2, 2, t, h, i])?, // fc1, fc2
    ])?;
    let p = &shape.projector;
    let n = u(image_tokens);
    let projector = add(&[
        mul(&[2, n, u(p.in_dim), u(p.hidden)])?,
        mul(&[2, n, u(p.hidden), u(p.out_dim)])?,
    ])?;
    add(&[mul(&[u(v.layers), u(v.passes), layer])?, projector])
}

fn check_schedule(schedule: &[LayerSchedule]) -> Result<(), FlopsError> {
    let Some(first) = schedule.first() else {
        return Ok(());
    };
    let n0 = first.image_tokens();
    let text = first.seq_len.saturating_sub(n0);
    for (layer, l) in schedule.iter().enumerate() {
        if l.seq_len == 0 {
            return Err(FlopsError::EmptySequence { layer });
        }
        let mut at = 0;
        for r in &l.image {
            if r.start > r.end || r.end > l.seq_len || (r.start < at && !r.is_empty()) {
                return Err(FlopsError::ImageSpan {
                    layer,
                    start: r.start,
                    end: r.end,
                    seq_len: l.seq_len,
                });
            }
            at = at.max(r.end);
        }
        let n = l.image_tokens();
        let not_pruning = |what: String| Err(FlopsError::NotAPruning { layer, what });
        if l.seq_len - n != text {
            return not_pruning(format!("{} text tokens, layer 0 has {text}", l.seq_len - n));
        }
        if n > n0 {
            return not_pruning(format!("{n} image tokens, layer 0 has {n0}"));
        }
        // With one image the text before it never moves (with several, a first image
        // pruned away leaves the next one first).
        let start = |s: &LayerSchedule| s.image.iter().find(|r| !r.is_empty()).map(|r| r.start);
        if let (Some(a), Some(b), 1) = (start(l), start(first), first.image.len()) {
            if a != b {
                return not_pruning(format!("image starts at {a}, layer 0's at {b}"));
            }
        }
    }
    Ok(())
}

fn u(x: usize) -> u64 {
    // usize is at most 64 bits on every target this engine runs on.
    x as u64
}

fn mul(xs: &[u64]) -> Result<u64, FlopsError> {
    xs.iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x))
        .ok_or(FlopsError::Overflow)
}

fn add(xs: &[u64]) -> Result<u64, FlopsError> {
    xs.iter()
        .try_fold(0u64, |acc, &x| acc.checked_add(x))
        .ok_or(FlopsError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// The small shape the hand-computed case uses.
    fn tiny() -> FlopsShape {
        FlopsShape {
            text: TextShape {
                hidden: 4,
                intermediate: 6,
                heads: 2,
                kv_heads: 1,
                head_dim: 2,
                vocab: 10,
                num_layers: 2,
            },
            vision: VisionShape {
                layers: 1,
                hidden: 2,
                intermediate: 3,
                tokens: 3,
                passes: 1,
            },
            projector: ProjectorShape {
                in_dim: 2,
                hidden: 3,
                out_dim: 4,
            },
        }
    }

    fn llava7b() -> FlopsShape {
        FlopsShape {
            text: TextShape {
                hidden: 4096,
                intermediate: 11008,
                heads: 32,
                kv_heads: 32,
                head_dim: 128,
                vocab: 32000,
                num_layers: 32,
            },
            vision: VisionShape {
                layers: 23,
                hidden: 1024,
                intermediate: 4096,
                tokens: 577,
                passes: 1,
            },
            projector: ProjectorShape {
                in_dim: 1024,
                hidden: 4096,
                out_dim: 4096,
            },
        }
    }

    fn layer(seq_len: usize, image: Range<usize>, mask: ShallowMask) -> LayerSchedule {
        LayerSchedule {
            seq_len,
            image: vec![image],
            mask,
        }
    }

    #[test]
    fn hand_computed_small_case() {
        // Prompt: 1 prefix token, 2 image tokens at 1..3, 2 suffix tokens (S = 5).
        // Layer 0 masks text->image; layer 1 keeps one image token (S = 4).
        let sched = [
            layer(5, 1..3, ShallowMask::TextToImage),
            layer(4, 1..2, ShallowMask::None),
        ];
        let r = prefill_flops(&tiny(), &sched).unwrap();
        // Dense layer, S=5: q 2*5*4*4=160, k 80, v 80, o 160; mlp 3*2*5*4*6=720;
        // 15 causal pairs * 2*2*2 = 120 for QKᵀ and 120 for P·V: 1440.
        // Layer 0: 4 text->image pairs skipped in P·V: 1440 - 4*8 = 1408.
        // Layer 1, S=4: proj 384, mlp 576, 10 pairs -> 80 + 80: 1120.
        assert_eq!(r.per_layer, vec![1408, 1120]);
        // Vision: q,k,v,o 4*2*3*2*2=96, attention 2*2*3*3*2=72, mlp 2*2*3*2*3=72 -> 240;
        // projector for 2 tokens: 2*2*2*3=24 + 2*2*3*4=48 -> 72.
        assert_eq!(r.vision, 312);
        // lm_head: 2*4*10 = 80.
        assert_eq!(r.prefill, 1408 + 1120 + 312 + 80);
        assert_eq!(r.prefill_dense, 2 * 1440 + 312 + 80);
        // Image pairs, S=5, n=2: 3 image->image + 2*2 text->image = 7; 8 FLOPs each.
        // Dense: (7 + 7) * 8 per layer. Layer 0: QKᵀ 7*8, P·V 3*8. Layer 1 (n=1): 3 pairs both.
        assert_eq!(r.attention_image_dense, 2 * 14 * 8);
        assert_eq!(r.attention_image, (7 + 3) * 8 + (3 + 3) * 8);
    }

    /// Pairs zeroed by `mask`, straight from the spec's definitions over a full P matrix.
    fn brute_masked(seq: usize, img: Range<usize>, mask: ShallowMask) -> u64 {
        let (s, e) = (img.start, img.end);
        let half = s + ShallowMask::split_hidden(img.len());
        let mut zeroed = 0;
        for i in 0..seq {
            for j in 0..=i {
                let image_key = (s..e).contains(&j);
                let text_query = i >= e;
                let image_query = (s..e).contains(&i);
                let z = match mask {
                    ShallowMask::None => false,
                    ShallowMask::TextToImage => text_query && image_key,
                    ShallowMask::Layer0Sink => image_key && i >= s && !(text_query && j == s),
                    ShallowMask::Layer0Split => {
                        (image_query && image_key) || (text_query && (s..half).contains(&j))
                    }
                };
                zeroed += u64::from(z);
            }
        }
        zeroed
    }

    #[test]
    fn seeded_masked_pairs_match_brute_force() {
        let mut rng = Rng::new(7);
        for case in 0..200 {
            let (prefix, n, suffix) = (rng.below(5), rng.below(9), rng.below(6));
            let seq = prefix + n + suffix;
            if seq == 0 {
                continue;
            }
            let img = prefix..prefix + n;
            for mask in [
                ShallowMask::None,
                ShallowMask::TextToImage,
                ShallowMask::Layer0Sink,
                ShallowMask::Layer0Split,
            ] {
                let got = masked_pairs(u(seq), &[(img.start, img.end)], mask).unwrap();
                let want = brute_masked(seq, img.clone(), mask);
                assert_eq!(
                    got, want,
                    "case {case}: {mask:?} prefix {prefix} n {n} suffix {suffix}"
                );
            }
        }
    }

    /// Pairs zeroed over several image runs, from the multi-image definition (crate docs):
    /// masks act on (query kind, key kind), text between images is text.
    fn brute_masked_runs(seq: usize, runs: &[(usize, usize)], mask: ShallowMask) -> u64 {
        let image = |x: usize| runs.iter().any(|&(a, b)| (a..b).contains(&x));
        let first_half = |x: usize| {
            runs.iter()
                .any(|&(a, b)| (a..a + ShallowMask::split_hidden(b - a)).contains(&x))
        };
        let s0 = runs[0].0;
        let mut zeroed = 0;
        for i in 0..seq {
            for j in 0..=i {
                let (ik, iq) = (image(j), image(i));
                let z = match mask {
                    ShallowMask::None => false,
                    ShallowMask::TextToImage => !iq && ik,
                    ShallowMask::Layer0Sink => ik && i >= s0 && (iq || j != s0),
                    ShallowMask::Layer0Split => (iq && ik) || (!iq && first_half(j)),
                };
                zeroed += u64::from(z);
            }
        }
        zeroed
    }

    #[test]
    fn seeded_masked_pairs_over_several_images_match_the_definition() {
        let mut rng = Rng::new(11);
        for case in 0..200 {
            let k = 2 + rng.below(4); // 2..=5 images
            let mut runs = Vec::new();
            let mut at = rng.below(4);
            for _ in 0..k {
                let n = 1 + rng.below(6);
                runs.push((at, at + n));
                at += n + 1 + rng.below(3); // text between images
            }
            let seq = runs[k - 1].1 + rng.below(5);
            for mask in [
                ShallowMask::TextToImage,
                ShallowMask::Layer0Sink,
                ShallowMask::Layer0Split,
            ] {
                let got = masked_pairs(u(seq), &runs, mask).unwrap();
                let want = brute_masked_runs(seq, &runs, mask);
                assert_eq!(got, want, "case {case}: {mask:?} runs {runs:?} seq {seq}");
            }
        }
        // Six separate images need 17 rules for the split mask: refused by name.
        let six: Vec<_> = (0..6).map(|i| (3 * i, 3 * i + 2)).collect();
        let err = masked_pairs(20, &six, ShallowMask::Layer0Split).unwrap_err();
        assert!(err.to_string().contains("6 separate images"), "{err}");
    }

    #[test]
    fn split_and_sink_hand_counts() {
        // n = 4 image tokens at 1..5, 3 suffix tokens: 10 image->image pairs.
        assert_eq!(
            masked_pairs(8, &[(1, 5)], ShallowMask::Layer0Sink).unwrap(),
            10 + 3 * 3
        );
        assert_eq!(
            masked_pairs(8, &[(1, 5)], ShallowMask::Layer0Split).unwrap(),
            10 + 3 * 2
        );
        assert_eq!(
            masked_pairs(8, &[(1, 5)], ShallowMask::TextToImage).unwrap(),
            3 * 4
        );
    }

    fn paper_like_schedule(fusion: usize, k: usize, exit: usize) -> Vec<LayerSchedule> {
        let (prefix, n, suffix) = (35, 576, 40);
        (0..32)
            .map(|l| {
                let kept = if l <= fusion {
                    n
                } else if l < exit {
                    k
                } else {
                    0
                };
                let mask = match l {
                    0 => ShallowMask::Layer0Sink,
                    1..=5 => ShallowMask::TextToImage,
                    _ => ShallowMask::None,
                };
                layer(prefix + kept + suffix, prefix..prefix + kept, mask)
            })
            .collect()
    }

    #[test]
    fn dense_equals_pruned_when_nothing_is_pruned() {
        let dense: Vec<_> = (0..32)
            .map(|_| layer(651, 35..611, ShallowMask::None))
            .collect();
        let r = prefill_flops(&llava7b(), &dense).unwrap();
        assert_eq!(r.prefill, r.prefill_dense);
        assert_eq!(r.attention_image, r.attention_image_dense);
        assert!(r.per_layer.iter().all(|&x| x == r.per_layer[0]));
    }

    #[test]
    fn pruning_and_masks_reduce_flops() {
        let shape = llava7b();
        // Masks only: same sequences, P·V shrinks.
        let masks_only = paper_like_schedule(31, 576, 32);
        let r = prefill_flops(&shape, &masks_only).unwrap();
        assert!(r.prefill < r.prefill_dense, "{r:?}");
        assert!(r.attention_image < r.attention_image_dense, "{r:?}");
        // Full pipeline: fusion at 9 keeps 20 tokens, text only from 12.
        let r = prefill_flops(&shape, &paper_like_schedule(9, 20, 12)).unwrap();
        assert!(r.prefill < r.prefill_dense, "{r:?}");
        let image_saving = 1.0 - r.attention_image as f64 / r.attention_image_dense as f64;
        let total_saving = 1.0 - r.prefill as f64 / r.prefill_dense as f64;
        // The paper reports ~99% vision attention and ~54% FLOPs saved on this model.
        assert!(
            image_saving > 0.6,
            "image attention saving {image_saving:.3}"
        );
        assert!(
            (0.3..0.8).contains(&total_saving),
            "total saving {total_saving:.3}"
        );
        assert_eq!(
            r.per_layer[12], r.per_layer[31],
            "text-only layers cost the same"
        );
        assert!(r.per_layer[10] < r.per_layer[9], "layer 10 runs on K only");
    }

    #[test]
    fn no_image_means_no_vision_cost() {
        let sched: Vec<_> = (0..2).map(|_| layer(5, 2..2, ShallowMask::None)).collect();
        let r = prefill_flops(&tiny(), &sched).unwrap();
        assert_eq!(r.vision, 0);
        assert_eq!((r.attention_image, r.attention_image_dense), (0, 0));
        assert_eq!(r.prefill, r.prefill_dense);
    }

    #[test]
    fn schedule_errors() {
        let shape = tiny();
        let ok = layer(5, 1..3, ShallowMask::None);
        let err = |sched: &[LayerSchedule]| prefill_flops(&shape, sched).unwrap_err();
        assert_eq!(
            err(std::slice::from_ref(&ok)),
            FlopsError::LayerCount {
                got: 1,
                expected: 2
            }
        );
        assert_eq!(
            err(&[ok.clone(), layer(0, 0..0, ShallowMask::None)]),
            FlopsError::EmptySequence { layer: 1 }
        );
        assert!(matches!(
            err(&[ok.clone(), layer(4, 1..5, ShallowMask::None)]),
            FlopsError::ImageSpan { layer: 1, .. }
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = layer(5, 3..1, ShallowMask::None);
        assert!(matches!(
            err(&[reversed, ok.clone()]),
            FlopsError::ImageSpan { layer: 0, .. }
        ));
        // Text shrank: not a pruning of image tokens.
        let msg = err(&[ok.clone(), layer(4, 1..3, ShallowMask::None)]).to_string();
        assert!(
            msg.starts_with("layer 1: 2 text tokens, layer 0 has 3"),
            "{msg}"
        );
        // Image grew.
        let msg = err(&[layer(4, 1..2, ShallowMask::None), ok.clone()]).to_string();
        assert!(msg.contains("layer 1") && msg.contains("image"), "{msg}");
        // Image moved.
        let msg = err(&[ok.clone(), layer(5, 2..4, ShallowMask::None)]).to_string();
        assert!(msg.contains("image starts at 2"), "{msg}");
        let mut huge = tiny();
        huge.text.vocab = usize::MAX;
        let sched = [ok.clone(), ok];
        assert_eq!(
            prefill_flops(&huge, &sched).unwrap_err(),
            FlopsError::Overflow
        );
    }
}

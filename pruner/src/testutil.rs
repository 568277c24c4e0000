//! Test helpers: a seeded generator and a scheduler stand-in that drives a pruner.

use crate::{Action, Capture, LayerView, Pruner, ShallowMask};

/// SplitMix64: tiny, seeded, and good enough for synthetic attention data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Everything a run through all layers produced, indexed by layer.
#[derive(Debug, Default)]
pub struct Trace {
    pub masks: Vec<ShallowMask>,
    pub captures: Vec<Capture>,
    pub actions: Vec<Action>,
    /// Image tokens each layer processed.
    pub image: Vec<Vec<usize>>,
}

impl Trace {
    /// Layers whose action was a `Keep`, with the kept tokens.
    pub fn keeps(&self) -> Vec<(usize, Vec<usize>)> {
        self.actions
            .iter()
            .enumerate()
            .filter_map(|(l, a)| match a {
                Action::Keep(k) => Some((l, k.clone())),
                Action::Continue => None,
            })
            .collect()
    }

    /// Layers on which `want` was requested.
    pub fn layers_capturing(&self, want: Capture) -> Vec<usize> {
        (0..self.captures.len())
            .filter(|&l| self.captures[l] == want)
            .collect()
    }
}

/// Plays the scheduler: per layer asks mask and capture, supplies only the requested
/// capture (from `contrib` or `attn`, given the layer and its image tokens), applies Keep.
pub fn drive(
    p: &mut dyn Pruner,
    num_layers: usize,
    n_image: usize,
    mut contrib: impl FnMut(usize, &[usize]) -> Vec<(f32, f32)>,
    mut attn: impl FnMut(usize, &[usize]) -> Vec<f32>,
) -> Trace {
    let mut image: Vec<usize> = (0..n_image).collect();
    let mut t = Trace::default();
    for layer in 0..num_layers {
        let cap = p.capture(layer);
        t.masks.push(p.mask(layer));
        t.captures.push(cap);
        t.image.push(image.clone());
        let c = (cap == Capture::Contributions).then(|| contrib(layer, &image));
        let a = (cap == Capture::LastRowProbs).then(|| attn(layer, &image));
        let view = LayerView {
            layer,
            num_layers,
            image_tokens: &image,
            contributions: c.as_deref(),
            last_row_image_attention: a.as_deref(),
        };
        let action = p
            .after_layer(&view)
            .unwrap_or_else(|e| panic!("layer {layer}: after_layer failed: {e}"));
        if let Action::Keep(k) = &action {
            assert!(
                k.windows(2).all(|w| w[0] < w[1]),
                "layer {layer}: Keep must be strictly ascending: {k:?}"
            );
            assert!(
                k.iter().all(|j| image.contains(j)),
                "layer {layer}: Keep {k:?} names tokens not processed ({image:?})"
            );
            image = k.clone();
        }
        t.actions.push(action);
    }
    t
}

/// A contributions closure that is never expected to be called.
pub fn no_contrib(layer: usize, _image: &[usize]) -> Vec<(f32, f32)> {
    panic!("layer {layer}: contributions were requested but the test expected none")
}

/// An attention closure that is never expected to be called.
pub fn no_attn(layer: usize, _image: &[usize]) -> Vec<f32> {
    panic!("layer {layer}: last-row attention was requested but the test expected none")
}

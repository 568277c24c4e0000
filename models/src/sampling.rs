//! Next-token selection: greedy at temperature 0, else temperature, top-k and top-p
//! (applied in that order, as transformers does) with a seeded PRNG, so the same seed gives
//! the same tokens.

use engine_core::{Error, Result};

/// Sampling settings. `temperature == 0` is greedy (top-k / top-p are then ignored).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; in `(0, 1]`, 1 disables.
    pub top_p: f32,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges; errors name the parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::msg(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::msg(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// Whether this is plain argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// SplitMix64: tiny, fast and good enough for drawing tokens; fully determined by the seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks tokens from logits according to [`SamplingParams`].
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// Validates `params` and seeds the generator.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
        })
    }

    /// The settings in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// One token from `logits` (one row, vocabulary long).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::msg("sampling from empty logits"));
        }
        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }
        let t = self.params.temperature;
        // Candidates sorted by logit, highest first (ties: lower id first, deterministic).
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        if idx.is_empty() {
            return Err(Error::msg("sampling: every logit is NaN"));
        }
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            idx.truncate(self.params.top_k);
        }
        let max = logits[idx[0] as usize] as f64 / t as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i as usize] as f64 / t as f64 - max).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            // Smallest prefix whose mass reaches top_p (at least one token).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (p, &i) in probs.iter().zip(&idx) {
            if u < *p {
                return Ok(i);
            }
            u -= p;
        }
        // Rounding left `u` past the last bucket: the last candidate.
        Ok(idx[idx.len() - 1])
    }
}

/// Index of the largest value, the first one on ties (as torch.argmax); NaN never wins.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(seed: u64, n: usize) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect()
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = logits(7, 500);
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.9,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..64).map(|_| s.sample(&l).unwrap()).collect()
        };
        let mut s = Sampler::new(p).unwrap();
        let b: Vec<u32> = (0..64).map(|_| s.sample(&l).unwrap()).collect();
        assert_eq!(a, b);
        let mut s = Sampler::new(SamplingParams { seed: 43, ..p }).unwrap();
        let c: Vec<u32> = (0..64).map(|_| s.sample(&l).unwrap()).collect();
        assert_ne!(a, c, "a different seed should change some draw");
    }

    #[test]
    fn top_k_one_and_greedy_are_argmax() {
        let l = logits(3, 100);
        let want = argmax(&l);
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.sample(&l).unwrap(), want);
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 1,
            top_p: 1.0,
            seed: 1,
        })
        .unwrap();
        for step in 0..20 {
            assert_eq!(k1.sample(&l).unwrap(), want, "step {step}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~all the mass: top_p 0.5 must always pick it.
        let mut l = vec![0.0f32; 50];
        l[17] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 9,
        })
        .unwrap();
        for step in 0..50 {
            assert_eq!(s.sample(&l).unwrap(), 17, "step {step}");
        }
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for (t, p) in [
            (-1.0, 1.0),
            (f32::NAN, 1.0),
            (1.0, 0.0),
            (1.0, 1.5),
            (1.0, f32::NAN),
        ] {
            let e = Sampler::new(SamplingParams {
                temperature: t,
                top_k: 0,
                top_p: p,
                seed: 0,
            });
            assert!(e.is_err(), "temperature {t} top_p {p} accepted");
        }
    }
}

//! Quality accounting for weight formats: the logits a model produces step by step, and how
//! a quantized model's logits and greedy tokens compare with a baseline's (the checkpoint as
//! stored, f16 for llava-hf).
//!
//! Greedy agreement is measured teacher-forced: the quantized model is fed the baseline's
//! greedy tokens, so one early disagreement does not make every later step disagree too; the
//! free-running view (how many leading greedy tokens are identical) is reported beside it.

use engine_core::Result;
use pruner::PruneConfig;

use crate::sampling::argmax;
use crate::session::{PrefixKey, PromptInput, Session};

/// Full logits of `steps` consecutive positions: the last prompt position after prefill,
/// then one decode step per token. The token fed after step `i` is `forced[i]` when given
/// (teacher forcing; it must hold at least `steps - 1` ids), else step `i`'s own argmax
/// (greedy). Runs in `session` (its earlier contents are reused where they apply).
pub fn step_logits(
    session: &mut Session,
    prompt: PromptInput,
    prune: &PruneConfig,
    steps: usize,
    forced: Option<&[u32]>,
) -> Result<Vec<Vec<f32>>> {
    if let Some(f) = forced {
        if f.len() + 1 < steps {
            return Err(engine_core::Error::msg(format!(
                "teacher forcing {steps} steps needs {} tokens, got {}",
                steps - 1,
                f.len()
            )));
        }
    }
    let layers = session.llama().config().num_hidden_layers;
    let mut pruner = pruner::build(prune, layers)
        .map_err(|e| engine_core::Error::msg(format!("pruning config: {e}")))?;
    let pre = session.prefill(prompt, pruner.as_mut(), &PrefixKey::from(prune), steps)?;
    let mut rows = Vec::with_capacity(steps);
    if steps == 0 {
        return Ok(rows);
    }
    let b = session.backend().clone();
    rows.push(b.to_vec_f32(&pre.logits)?);
    for i in 1..steps {
        let prev = match forced {
            Some(f) => f[i - 1],
            None => argmax(&rows[i - 1]),
        };
        let logits = session.step(prev)?; // [1, V]
        rows.push(b.to_vec_f32(&logits)?);
    }
    Ok(rows)
}

/// How one model's step logits compare with a baseline's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitComparison {
    /// Largest |a − b| over the first step's logits.
    pub first_max_abs: f64,
    /// RMS of the first step's logit difference over the RMS of the baseline's logits.
    pub first_rel_rms: f64,
    /// Mean over steps of the per-step relative RMS difference.
    pub mean_rel_rms: f64,
    /// Steps compared.
    pub steps: usize,
    /// Steps (teacher-forced) whose argmax equals the baseline's.
    pub greedy_agree: usize,
}

impl LogitComparison {
    /// `greedy_agree / steps` (1 when nothing was compared).
    pub fn agreement(&self) -> f64 {
        if self.steps == 0 {
            1.0
        } else {
            self.greedy_agree as f64 / self.steps as f64
        }
    }
}

/// Compares `other`'s step logits (teacher-forced on the baseline's greedy tokens) with
/// `base`'s, step by step over the common steps. Rows of different lengths are an error.
pub fn compare_logits(base: &[Vec<f32>], other: &[Vec<f32>]) -> Result<LogitComparison> {
    let steps = base.len().min(other.len());
    let mut c = LogitComparison {
        steps,
        ..Default::default()
    };
    let mut rel_sum = 0.0;
    for (i, (a, q)) in base.iter().zip(other).enumerate() {
        if a.len() != q.len() {
            return Err(engine_core::Error::msg(format!(
                "step {i}: baseline has {} logits, the other model {}",
                a.len(),
                q.len()
            )));
        }
        let (mut diff2, mut base2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(q) {
            let d = (x as f64 - y as f64).abs();
            diff2 += d * d;
            base2 += x as f64 * x as f64;
            max_abs = max_abs.max(d);
        }
        let rel = if base2 > 0.0 {
            (diff2 / base2).sqrt()
        } else {
            diff2.sqrt()
        };
        if i == 0 {
            c.first_max_abs = max_abs;
            c.first_rel_rms = rel;
        }
        rel_sum += rel;
        if argmax(a) == argmax(q) {
            c.greedy_agree += 1;
        }
    }
    c.mean_rel_rms = if steps > 0 {
        rel_sum / steps as f64
    } else {
        0.0
    };
    Ok(c)
}

/// Greedy tokens of a sequence of step logits (each row's argmax).
pub fn greedy_tokens(rows: &[Vec<f32>]) -> Vec<u32> {
    rows.iter().map(|r| argmax(r)).collect()
}

/// How many leading tokens two sequences share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_fully() {
        let base = vec![vec![0.0, 2.0, 1.0], vec![3.0, 1.0, 0.0]];
        let c = compare_logits(&base, &base).unwrap();
        assert_eq!(c.steps, 2);
        assert_eq!(c.greedy_agree, 2);
        assert_eq!(c.first_max_abs, 0.0);
        assert_eq!(c.mean_rel_rms, 0.0);
    }

    #[test]
    fn errors_and_disagreements_are_counted() {
        let base = vec![vec![0.0, 2.0, 1.0], vec![3.0, 1.0, 0.0]];
        // Step 0: argmax still 1, diff (0, 0.5, 0) → rel rms 0.5/sqrt(5). Step 1: argmax flips.
        let other = vec![vec![0.0, 1.5, 1.0], vec![1.0, 2.0, 0.0]];
        let c = compare_logits(&base, &other).unwrap();
        assert_eq!(c.greedy_agree, 1);
        assert!((c.first_max_abs - 0.5).abs() < 1e-12);
        assert!((c.first_rel_rms - 0.5 / 5f64.sqrt()).abs() < 1e-12);
        let step1 = (4.0f64 + 1.0).sqrt() / 10f64.sqrt();
        assert!((c.mean_rel_rms - (0.5 / 5f64.sqrt() + step1) / 2.0).abs() < 1e-12);
        assert_eq!(c.agreement(), 0.5);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(compare_logits(&[vec![1.0, 2.0]], &[vec![1.0]]).is_err());
    }

    #[test]
    fn prefix_and_greedy() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(greedy_tokens(&[vec![0.0, 1.0], vec![2.0, 1.0]]), vec![1, 0]);
    }
}

//! Decode tokens/s of a synthetic shape's text decoder per weight format, on the wgpu backend
//! (the adapter `auto` picks, lavapipe included). Only the decoder is built, and the prompt
//! is 16 text tokens, so this measures decode without `visi-cli bench`'s 640-token prefill
//! (too slow for every format on a software adapter).
//!
//! `cargo run --release -p models --example quant_decode -- llava-1b f16,q8_0,q4_0,q4_1,q4_k 16`

use std::sync::Arc;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
use engine_core::weights::Weights;
use engine_core::{Backend, QuantType};
use models::llama::Llama;
use models::sampling::{Sampler, SamplingParams};
use models::session::{PromptInput, Session};
use models::synthetic::{SyntheticShape, SyntheticSource};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shape = SyntheticShape::parse(args.first().map_or("tiny", String::as_str))?;
    let formats = args
        .get(1)
        .map_or("f16,q8_0,q4_0,q4_1,q4_k", String::as_str);
    let steps: usize = args.get(2).map_or(Ok(16), |s| s.parse())?;
    let b: Arc<dyn Backend> = engine_wgpu::open(&engine_wgpu::GpuOptions::default())?;
    let cfg = shape.config()?;
    println!(
        "{} decoder on {} ({} layers, hidden {}), {steps} decode steps after a 16-token prompt",
        shape.name(),
        b.device_info().adapter,
        cfg.text.num_hidden_layers,
        cfg.text.hidden_size
    );
    let source = Arc::new(SyntheticSource::new(&cfg, 0));
    for f in formats.split(',') {
        let q = match f {
            "f16" => None,
            other => Some(QuantType::parse(other).ok_or(format!("unknown format {other}"))?),
        };
        let w = Weights::new(source.clone(), b.clone()).with_quant(q);
        let t0 = Instant::now();
        let llama = Arc::new(Llama::load(
            &w.pp("language_model.model"),
            &w.pp("language_model.lm_head"),
            &cfg.text,
        )?);
        b.sync()?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let ids: Vec<u32> = (1..=16).collect();
        let mut session = Session::new(llama, b.clone());
        let pre = session.prefill(
            PromptInput {
                ids: &ids,
                images: &[],
            },
            &mut pruner::Dense,
            &models::session::PrefixKey::dense(),
            steps + 4,
        )?;
        let mut greedy = Sampler::new(SamplingParams::default())?;
        let mut dec = session
            .decode(pre.logits, &mut greedy, 1 + 4 + steps)
            .ignore_eos();
        // The first token, then 4 warm-up steps that compile the decode pipelines.
        for tok in dec.by_ref().take(5) {
            tok?;
        }
        let t = Instant::now();
        for tok in dec {
            tok?;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{f:>5}: {:7.2} tok/s ({:.1} ms/token; load {load_ms:.0} ms)",
            steps as f64 / s,
            s * 1e3 / steps as f64
        );
    }
    Ok(())
}

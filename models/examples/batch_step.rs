//! Cost of one batched decode step (`session::step_batch`, what `serve`'s `decode_batch`
//! runs: the linear layers as one M = B matmul, attention per sequence) at B = 1, 2, 4, 8
//! on a synthetic shape's text decoder, on the wgpu backend (the adapter `auto` picks,
//! lavapipe included). The batch sizes take turns step by step, so a busy machine slows
//! them alike; prints the best and median step per B and their ratios to B = 1.
//!
//! `cargo run --release -p models --example batch_step -- llava-1b 12`

use std::sync::Arc;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
use engine_core::weights::Weights;
use engine_core::Backend;
use models::llama::Llama;
use models::session::{step_batch, PromptInput, Session};
use models::synthetic::{SyntheticShape, SyntheticSource};

const BATCHES: [usize; 4] = [1, 2, 4, 8];

/// This process's CPU time (all threads, user + system) in clock ticks of 10 ms, from /proc
/// (0 elsewhere): on lavapipe the device work runs on this process's threads, so summed
/// over the steps it measures a step's work even where other jobs share the cores.
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shape = SyntheticShape::parse(args.first().map_or("tiny", String::as_str))?;
    let rounds: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let b: Arc<dyn Backend> = engine_wgpu::open(&engine_wgpu::GpuOptions::default())?;
    let cfg = shape.config()?;
    println!(
        "{} decoder on {} ({} layers, hidden {}), {rounds} rounds of one step per B",
        shape.name(),
        b.device_info().adapter,
        cfg.text.num_hidden_layers,
        cfg.text.hidden_size
    );
    let source = Arc::new(SyntheticSource::new(&cfg, 0));
    let w = Weights::new(source, b.clone());
    let llama = Arc::new(Llama::load(
        &w.pp("language_model.model"),
        &w.pp("language_model.lm_head"),
        &cfg.text,
    )?);
    let max_b = BATCHES[BATCHES.len() - 1];
    let mut sessions = Vec::with_capacity(max_b);
    for s in 0..max_b {
        // Different 16-token prompts: the rows of a step differ, as in a server.
        let ids: Vec<u32> = (1..=16)
            .map(|i| (i * 7 + s as u32 * 13) % 1000 + 1)
            .collect();
        let mut session = Session::new(llama.clone(), b.clone());
        session.prefill(
            PromptInput {
                ids: &ids,
                images: &[],
            },
            &mut pruner::Dense,
            &models::session::PrefixKey::dense(),
            rounds + 8,
        )?;
        sessions.push(session);
    }
    b.sync()?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); BATCHES.len()];
    let mut cpu = vec![0u64; BATCHES.len()];
    // Round 0 compiles each B's pipelines and is not counted.
    for r in 0..=rounds {
        for (bi, &nb) in BATCHES.iter().enumerate() {
            let mut refs: Vec<&mut Session> = sessions.iter_mut().take(nb).collect();
            let tokens: Vec<u32> = (0..nb as u32).map(|i| 100 + i + r as u32).collect();
            let (t, c0) = (Instant::now(), cpu_ticks());
            let logits = step_batch(&mut refs, &tokens)?;
            b.sync()?;
            drop(logits);
            if r > 0 {
                times[bi].push(t.elapsed().as_secs_f64());
                cpu[bi] += cpu_ticks() - c0;
            }
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let (b1, m1) = stats(&mut times[0].clone());
    let cpu_ms = |bi: usize| cpu[bi] as f64 * 10.0 / rounds.max(1) as f64;
    println!(
        "    B   best ms  median ms  best/B=1  median/B=1  tokens/s (median)  CPU ms/step  CPU/B=1"
    );
    for (bi, &nb) in BATCHES.iter().enumerate() {
        let (best, med) = stats(&mut times[bi]);
        println!(
            "{nb:>5} {:>9.1} {:>10.1} {:>9.2} {:>11.2} {:>18.2} {:>12.1} {:>8.2}",
            best * 1e3,
            med * 1e3,
            best / b1,
            med / m1,
            nb as f64 / med,
            cpu_ms(bi),
            cpu_ms(bi) / cpu_ms(0).max(1e-9)
        );
    }
    Ok(())
}

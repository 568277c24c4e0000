//! Batch invariance of the one generation core (`models::session::step_batch` and
//! `decode_batch`), the contract the server's continuous batching rests on: a sequence's
//! logits and tokens are the same whether it steps alone or beside others, whatever the
//! others are (other prompts, other pruning configs and so other per-layer KV lengths,
//! other samplers, sequences joining and leaving between steps), on the CPU and the GPU
//! backend. Checked bit for bit on the logits, not within a tolerance.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use engine_core::{Backend, CpuBackend};
use models::llava::{Answer, GenerateOptions, Llava};
use models::prompt::Template;
use models::sampling::SamplingParams;
use models::session::{decode_batch, step_batch, DecodeItem, Session};
use pruner::PruneConfig;
use visi_tests::{first_difference, fixtures, gpu_backend_or_skip, references};

fn backends(test: &str) -> Result<Vec<Arc<dyn Backend>>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
    if let Some(g) = gpu_backend_or_skip(test)? {
        v.push(g);
    }
    Ok(v)
}

/// The requests of one run: question, pruning config, sampling.
fn requests() -> Vec<(&'static str, Option<PruneConfig>, SamplingParams)> {
    let sampled = |seed| SamplingParams {
        temperature: 0.9,
        top_k: 0,
        top_p: 0.95,
        seed,
    };
    vec![
        (
            "What is shown in this image?",
            None,
            SamplingParams::default(),
        ),
        (
            "Describe the colours in detail.",
            Some(PruneConfig::Dense),
            sampled(7),
        ),
        ("Is there a circle?", None, sampled(11)),
        (
            "Count the shapes, then name each one of them.",
            Some(PruneConfig::Dense),
            SamplingParams::default(),
        ),
        ("What colour is the background?", None, sampled(3)),
    ]
}

/// Starts request `i` in a fresh session.
fn start(llava: &Llava, i: usize, steps: usize) -> Result<(Session, Answer)> {
    let (q, prune, sampling) = requests()[i].clone();
    let img = models::load_image(&fixtures().join("images/square.png"))?;
    let enc = llava.encode_image(&img, models::PadMode::Crop)?;
    let prompt = llava.prompt(Template::VicunaV1, q, true)?;
    let opts = GenerateOptions {
        template: Template::VicunaV1,
        max_new_tokens: steps,
        prune,
        sampling,
        ..Default::default()
    };
    let mut session = llava.session();
    let answer = llava.begin(&mut session, &prompt, std::slice::from_ref(&enc), &opts)?;
    Ok((session, answer))
}

#[test]
fn batched_steps_equal_lone_steps_bit_for_bit() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    for b in backends("batched_steps_equal_lone_steps_bit_for_bit")? {
        let dev = b.device_info().backend;
        let llava = Llava::load(&r.model_dir, b.clone())?;
        let n = requests().len();
        // Teacher-forced tokens, the same for both runs.
        let feed = |i: usize, t: usize| ((i * 131 + t * 17) % 500 + 3) as u32;
        let steps = 4;
        // Alone.
        let mut lone = Vec::new();
        for i in 0..n {
            let (mut s, _) = start(&llava, i, steps)?;
            let mut rows = Vec::new();
            for t in 0..steps {
                rows.push(b.to_vec_f32(&s.step(feed(i, t))?)?);
            }
            lone.push(rows);
        }
        // Together, every subset size from 1 to n: sequence i joins at step i - 1 of
        // the first, so the batch grows 1, 2, ..., n.
        let mut sessions = Vec::new();
        for i in 0..n {
            sessions.push(start(&llava, i, steps)?.0);
        }
        let mut done = vec![0usize; n];
        for round in 0..(steps + n) {
            let active: Vec<usize> = (0..n).filter(|&i| i <= round && done[i] < steps).collect();
            if active.is_empty() {
                break;
            }
            let tokens: Vec<u32> = active.iter().map(|&i| feed(i, done[i])).collect();
            let mut refs: Vec<&mut Session> = sessions
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, s)| s)
                .collect();
            let logits = b.to_vec_f32(&step_batch(&mut refs, &tokens)?)?;
            let v = logits.len() / active.len();
            for (row, &i) in active.iter().enumerate() {
                let got = &logits[row * v..(row + 1) * v];
                let want = &lone[i][done[i]];
                let diff = got
                    .iter()
                    .zip(want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                ensure!(
                    diff == 0,
                    "{dev}: request {i} step {} in a batch of {}: {diff} of {v} logits differ from its lone step",
                    done[i],
                    active.len()
                );
                done[i] += 1;
            }
        }
        ensure!(
            done.iter().all(|&d| d == steps),
            "{dev}: not every step ran"
        );
        println!("{dev}: {n} sequences, batches of 1..={n}: logits bit-identical to lone steps");
    }
    Ok(())
}

#[test]
fn batched_decoding_equals_lone_generation() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    for b in backends("batched_decoding_equals_lone_generation")? {
        let dev = b.device_info().backend;
        let llava = Llava::load(&r.model_dir, b.clone())?;
        let n = requests().len();
        let steps = 10;
        let mut want = Vec::new();
        for i in 0..n {
            let (mut s, mut a) = start(&llava, i, steps)?;
            let mut toks = Vec::new();
            while let Some(t) = llava.next_token(&mut s, &mut a) {
                toks.push(t?);
            }
            want.push(toks);
        }
        // Staggered: request i joins after 2i rounds; each leaves when it ends.
        let mut live: Vec<(usize, Session, Answer)> = Vec::new();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut next = 0;
        for round in 0.. {
            while next < n && round >= 2 * next {
                let (s, a) = start(&llava, next, steps)?;
                live.push((next, s, a));
                next += 1;
            }
            if live.is_empty() && next == n {
                break;
            }
            ensure!(round < 1000, "{dev}: batched decoding does not end");
            let results = {
                let mut items: Vec<DecodeItem> = live
                    .iter_mut()
                    .map(|(_, s, a)| (s, &mut a.decode, &mut a.sampler))
                    .collect();
                decode_batch(&mut items)
            };
            for ((i, _, a), r) in live.iter_mut().zip(results) {
                if let Some(t) = r {
                    let t = t?;
                    a.push_token(t);
                    got[*i].push(t);
                }
            }
            live.retain(|(_, _, a)| !a.decode.is_done());
        }
        for i in 0..n {
            if let Some(d) = first_difference(&got[i], &want[i]) {
                anyhow::bail!("{dev}: request {i} batched vs alone: {d}");
            }
        }
        println!(
            "{dev}: {n} staggered requests (greedy and seeded sampling, dense and VisiPruner) decode the same tokens batched as alone"
        );
    }
    Ok(())
}

//! Batch invariance of the one generation core (`models::session::step_batch` and
//! `decode_batch`), the contract the server's continuous batching rests on: a sequence's
//! logits and tokens are the same whether it steps alone or beside others, whatever the
//! others are (other prompts, other pruning configs and so other per-layer KV lengths,
//! other samplers, sequences joining and leaving between steps), on the CPU and the GPU
//! backend. Checked bit for bit on the logits, not within a tolerance. Ten sequences:
//! more than either backend's `linear_batch_rows`, so the grouping of a step is covered
//! (without it, lavapipe's many-rows kernels change the rounding).

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use engine_core::Backend;
use models::llava::{Answer, GenerateOptions, Llava};
use models::prompt::Template;
use models::sampling::SamplingParams;
use models::session::{decode_batch, step_batch, DecodeItem, Session};
use pruner::PruneConfig;
use visi_tests::{first_difference, fixtures, gpu_backend_or_skip, references};

fn backends(test: &str) -> Result<Vec<Arc<dyn Backend>>> {
    visi_tests::test_backends(test)
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
        ("Where is the square?", Some(PruneConfig::Dense), sampled(5)),
        (
            "Is it a photo or a drawing?",
            None,
            SamplingParams::default(),
        ),
        ("Name one object.", None, sampled(13)),
        (
            "What would you change in this picture, and why?",
            Some(PruneConfig::Dense),
            sampled(17),
        ),
        ("Answer in one word: shape?", None, sampled(19)),
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

/// A prompt that extends the session's previous one by only a few tokens computes those
/// rows with the prefill kernels, as the fresh run over the whole prompt does: without the
/// padding to the many-rows class, the few new rows take the decode kernels (another
/// rounding) and the follow-up's logits drift from the fresh run's.
#[test]
fn short_extensions_equal_fresh_prefills_bit_for_bit() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    for b in backends("short_extensions_equal_fresh_prefills_bit_for_bit")? {
        let dev = b.device_info().backend;
        let llava = Llava::load(&r.model_dir, b.clone())?;
        let img = models::load_image(&fixtures().join("images/square.png"))?;
        let enc = llava.encode_image(&img, models::PadMode::Crop)?;
        let base = llava.prompt(Template::VicunaV1, "What is shown in this image?", true)?;
        for prune in [Some(PruneConfig::Dense), None] {
            let opts = GenerateOptions {
                template: Template::VicunaV1,
                max_new_tokens: 3,
                prune: prune.clone(),
                keep_first_logits: true,
                ..Default::default()
            };
            let mut session = llava.session();
            llava.generate_in(
                &mut session,
                &base,
                std::slice::from_ref(&enc),
                &opts,
                &mut |_| {},
                &|| false,
            )?;
            for extra in 1..=3usize {
                let mut p = base.clone();
                p.ids.extend((0..extra).map(|i| 400 + i as u32));
                let turn = llava.generate_in(
                    &mut session,
                    &p,
                    std::slice::from_ref(&enc),
                    &opts,
                    &mut |_| {},
                    &|| false,
                )?;
                let fresh =
                    llava.generate_ids(&p, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
                ensure!(
                    turn.reused_tokens == p.ids.len() - 1,
                    "{dev}: reused {} of {} tokens, want all but the last",
                    turn.reused_tokens,
                    p.ids.len()
                );
                let (a, f) = (
                    turn.first_logits.as_deref().context("logits")?,
                    fresh.first_logits.as_deref().context("logits")?,
                );
                let diff = a
                    .iter()
                    .zip(f)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
                ensure!(
                    diff == 0,
                    "{dev} {:?}: +{extra} tokens: {diff} logits differ from the fresh prefill",
                    prune.as_ref().map(|c| c.to_json().to_string())
                );
                ensure!(turn.tokens == fresh.tokens, "{dev}: tokens differ");
            }
        }
        println!("{dev}: prompts extended by 1-3 tokens give the fresh prefill's logits bit for bit, dense and VisiPruner");
    }
    Ok(())
}

#[test]
fn prefill_under_a_small_binding_limit_equals_the_default() -> Result<()> {
    // A 256 KiB binding limit on the wgpu backend: the tiny model's [S, 128] MLP
    // intermediates of a ~700-token text prompt (over 350 KB) no longer fit one binding and
    // run in row blocks, as LLaVA-NeXT-7B's [3027, 14336] do under lavapipe's 128 MiB.
    // (Text only: the fixture's 336-pixel image rows alone pass 256 KiB.) Logits and tokens
    // must equal the unlimited backend's bit for bit.
    let Some(full) = gpu_backend_or_skip("prefill_under_a_small_binding_limit_equals_the_default")?
    else {
        return Ok(());
    };
    let small = engine_wgpu::open(&engine_wgpu::GpuOptions {
        max_binding_override: Some(256 << 10),
        ..Default::default()
    })?;
    let r = references()?
        .into_iter()
        .find(|r| r.name == "tiny-llava-mha")
        .context("no tiny-llava-mha fixture")?;
    let text = "Describe the red square and the blue circle in detail. ".repeat(60);
    let mut got = Vec::new();
    for b in [full, small] {
        let llava = Llava::load(&r.model_dir, b)?;
        let p = llava.prompt(Template::VicunaV1, &text, false)?;
        let opts = GenerateOptions {
            template: Template::VicunaV1,
            max_new_tokens: 4,
            prune: Some(PruneConfig::Dense),
            keep_first_logits: true,
            ..Default::default()
        };
        let g = llava.generate_ids(&p, &[], &opts, &mut |_| {})?;
        got.push((p.ids.len(), g.tokens, g.first_logits.context("logits")?));
    }
    let (rows, wt, wl) = &got[0];
    ensure!(
        *rows * 128 * 4 > 256 << 10,
        "the prompt ({rows} rows) no longer exceeds the limit"
    );
    let (_, t, l) = &got[1];
    let diff = l
        .iter()
        .zip(wl)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    ensure!(
        diff == 0 && t == wt,
        "{diff} logits differ, tokens {t:?} vs {wt:?}"
    );
    println!("{rows}-row prefill under a 256 KiB binding limit equals the default bit for bit");
    Ok(())
}

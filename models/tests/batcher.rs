//! The library batcher (`models::scheduler::Batcher`) and the typed prefix key, on the
//! tiny LLaVA fixture (CPU backend; the batched rows also on the wgpu adapter):
//! - every request batched (mixed pruning configs, greedy and seeded sampling, a text-only
//!   prompt, more requests than the batch holds, chunked prefill) gives exactly the tokens,
//!   text, pruning decisions and KV lengths of a lone `Session` run of it;
//! - cancelling a running request ends it with a prefix of its lone answer and leaves the
//!   others untouched; cancelling a queued one drops it;
//! - a session's rows are reused under an equal pruning config only: two different
//!   configs never share a prefix, and equal ones (however they were built) always do.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use engine_core::{Backend, CpuBackend, DType};
use models::llava::{EncodedImage, GenerateOptions, Generation, Llava};
use models::prompt::{PromptIds, Template};
use models::sampling::SamplingParams;
use models::scheduler::{Batcher, BatcherConfig, StreamEvent};
use models::session::{ImageInput, PrefixKey, PromptInput};
use models::PadMode;
use pruner::{FastVConfig, PruneConfig};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The CPU backend, and the wgpu adapter when one opens (with `CI` set it must).
fn backends(test: &str) -> Result<Vec<Arc<dyn Backend>>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
    match engine_wgpu::open(&Default::default()) {
        Ok(b) => {
            let i = b.device_info();
            eprintln!("{test}: wgpu adapter {} ({})", i.adapter, i.api);
            v.push(b);
        }
        Err(e) if std::env::var_os("CI").is_some() => {
            return Err(format!("{test}: CI is set but no GPU backend opened: {e}").into())
        }
        Err(e) => eprintln!("SKIP {test} on the GPU: no wgpu backend ({e})"),
    }
    Ok(v)
}

fn model() -> Result<(Llava, EncodedImage)> {
    model_on(Arc::new(CpuBackend::new()))
}

fn model_on(b: Arc<dyn Backend>) -> Result<(Llava, EncodedImage)> {
    let llava = Llava::load(&fixtures().join("tiny-llava-gqa"), b)?;
    let img = models::load_image(&fixtures().join("images/square.png"))?;
    let enc = llava.encode_image(&img, PadMode::Crop)?;
    Ok((llava, enc))
}

fn fastv(ratio: f64) -> PruneConfig {
    PruneConfig::FastV(FastVConfig {
        k: 2,
        ratio,
        keep: None,
    })
}

/// Question, with the image, pruning, sampling.
fn requests() -> Vec<(&'static str, bool, Option<PruneConfig>, SamplingParams)> {
    // Nucleus sampling, each request its own seed.
    let sampled = |seed| SamplingParams {
        seed,
        temperature: 0.8,
        top_p: 0.9,
        ..SamplingParams::default()
    };
    vec![
        (
            "What is shown in this image?",
            true,
            None,
            SamplingParams::default(),
        ),
        (
            "Describe the colours.",
            true,
            Some(PruneConfig::Dense),
            sampled(7),
        ),
        ("Is there a circle?", true, Some(fastv(0.5)), sampled(11)),
        ("Say hello.", false, None, SamplingParams::default()),
        (
            "Where is the square?",
            true,
            Some(fastv(0.75)),
            SamplingParams::default(),
        ),
        ("Name one object.", true, None, sampled(13)),
    ]
}

fn request(
    llava: &Llava,
    enc: &EncodedImage,
    i: usize,
) -> Result<(PromptIds, Vec<EncodedImage>, GenerateOptions)> {
    let (q, with_image, prune, sampling) = requests()[i].clone();
    let prompt = llava.prompt(Template::VicunaV1, q, with_image)?;
    let images = if with_image {
        vec![enc.clone()]
    } else {
        vec![]
    };
    let opts = GenerateOptions {
        template: Template::VicunaV1,
        max_new_tokens: 6 + 2 * i,
        prune,
        sampling,
        kv_dtype: DType::F32,
        ..Default::default()
    };
    Ok((prompt, images, opts))
}

/// Tokens streamed, then the generation, of one request's events.
fn collect(rx: &Receiver<StreamEvent>) -> Result<(Vec<u32>, String, Generation, bool)> {
    let mut toks = Vec::new();
    let mut text = String::new();
    for ev in rx.try_iter() {
        match ev {
            StreamEvent::Token { id, text: t } => {
                toks.push(id);
                text.push_str(t.as_deref().unwrap_or(""));
            }
            StreamEvent::Done {
                generation,
                cancelled,
            } => return Ok((toks, text, *generation, cancelled)),
            StreamEvent::Dropped => return Err("dropped".into()),
            StreamEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err("no Done event".into())
}

fn same_answer(i: usize, got: &Generation, want: &Generation) -> Result<()> {
    let ctx = format!("request {i}");
    if got.tokens != want.tokens {
        return Err(format!("{ctx}: tokens {:?} != lone {:?}", got.tokens, want.tokens).into());
    }
    if got.text != want.text {
        return Err(format!("{ctx}: text {:?} != lone {:?}", got.text, want.text).into());
    }
    if got.prune.kept_image_tokens != want.prune.kept_image_tokens
        || got.layer_seq_lens != want.layer_seq_lens
        || got.kv_lens != want.kv_lens
        || got.prune_config != want.prune_config
    {
        return Err(
            format!("{ctx}: pruning decisions or KV lengths differ from the lone run").into(),
        );
    }
    Ok(())
}

#[test]
fn batched_rows_equal_lone_session_runs() -> Result<()> {
    for b in backends("batched_rows_equal_lone_session_runs")? {
        batched_rows_on(b)?;
    }
    Ok(())
}

fn batched_rows_on(b: Arc<dyn Backend>) -> Result<()> {
    let (llava, enc) = model_on(b)?;
    let n = requests().len();
    let mut lone = Vec::new();
    for i in 0..n {
        let (prompt, images, opts) = request(&llava, &enc, i)?;
        lone.push(llava.generate_ids(&prompt, &images, &opts, &mut |_| {})?);
    }
    // A batch of 3 for 6 requests (admission waits for room), a decode step of the
    // running answers after every layer of a later prefill.
    let mut batcher = Batcher::new(
        &llava,
        BatcherConfig {
            max_batch: 3,
            prefill_chunk: 1,
            kv_dtype: DType::F32,
            ..Default::default()
        },
    );
    let mut rxs = Vec::new();
    for i in 0..n {
        let (prompt, images, opts) = request(&llava, &enc, i)?;
        rxs.push(batcher.submit_stream(prompt, images, opts)?.1);
    }
    batcher.run_until_idle();
    let mut total = 0;
    for (i, rx) in rxs.iter().enumerate() {
        let (toks, text, gen, cancelled) = collect(rx)?;
        assert!(!cancelled, "request {i} cancelled");
        assert_eq!(toks, gen.tokens, "request {i}: streamed tokens");
        assert_eq!(text, gen.text, "request {i}: streamed text");
        same_answer(i, &gen, &lone[i])?;
        total += gen.tokens.len() as u64;
    }
    let c = batcher.counters();
    assert!(
        c.steps < total,
        "{} steps for {total} tokens: the requests never stepped together",
        c.steps
    );
    Ok(())
}

#[test]
fn cancel_ends_one_request_and_leaves_the_others() -> Result<()> {
    let (llava, enc) = model()?;
    let mut lone = Vec::new();
    for i in [0, 4] {
        let (prompt, images, opts) = request(&llava, &enc, i)?;
        lone.push(llava.generate_ids(&prompt, &images, &opts, &mut |_| {})?);
    }
    let mut batcher = Batcher::new(
        &llava,
        BatcherConfig {
            max_batch: 2,
            kv_dtype: DType::F32,
            ..Default::default()
        },
    );
    let mut sub = |i: usize| -> Result<_> {
        let (prompt, images, opts) = request(&llava, &enc, i)?;
        Ok(batcher.submit_stream(prompt, images, opts)?)
    };
    let (a, rx_a) = sub(0)?;
    let (_, rx_b) = sub(4)?;
    let (c, rx_c) = sub(1)?;
    batcher.turn();
    batcher.turn();
    assert_eq!(batcher.running(), 2);
    assert!(batcher.cancel(c), "the queued request");
    assert!(matches!(rx_c.try_recv(), Ok(StreamEvent::Dropped)));
    assert!(batcher.cancel(a), "the running request");
    assert!(!batcher.cancel(a), "a request cancelled already");
    batcher.run_until_idle();
    let (_, _, ga, cancelled) = collect(&rx_a)?;
    assert!(cancelled && ga.interrupted);
    let want = &lone[0].tokens;
    assert!(
        !ga.tokens.is_empty() && ga.tokens.len() < want.len() && want.starts_with(&ga.tokens),
        "cancelled answer {:?} is not a proper prefix of {want:?}",
        ga.tokens
    );
    let (_, _, gb, cancelled) = collect(&rx_b)?;
    assert!(!cancelled);
    same_answer(4, &gb, &lone[1])
}

#[test]
fn prefix_key_shares_rows_exactly_between_equal_configs() -> Result<()> {
    let (llava, enc) = model()?;
    let layers = llava.config().text.num_hidden_layers;
    let (paper, _) = PruneConfig::paper_default_for(layers);
    let configs = [PruneConfig::Dense, paper, fastv(0.5), fastv(0.75)];
    let prompt = llava.prompt(Template::VicunaV1, "What is shown in this image?", true)?;
    let span = prompt.image_spans[0];
    let images = [ImageInput {
        span,
        key: enc.key,
        embeds: enc.embeds.clone(),
    }];
    let input = PromptInput {
        ids: &prompt.ids,
        images: &images,
    };
    let prefill = |s: &mut models::Session, cfg: &PruneConfig, key: &PrefixKey| -> Result<usize> {
        let mut p = pruner::build(cfg, layers)?;
        Ok(s.prefill(input, p.as_mut(), key, 4)?.reused_tokens)
    };
    for a in &configs {
        for b in &configs {
            // `b` rebuilt from its JSON: an equal config made elsewhere.
            let b2 = PruneConfig::from_json(&b.to_json().to_string())?;
            let mut s = llava.session();
            assert_eq!(prefill(&mut s, a, &PrefixKey::from(a))?, 0);
            let reused = prefill(&mut s, &b2, &PrefixKey::from(&b2))?;
            if a == b {
                assert_eq!(PrefixKey::from(a), PrefixKey::from(&b2));
                assert!(reused > 0, "{a:?} then itself reused nothing");
            } else {
                assert_ne!(PrefixKey::from(a), PrefixKey::from(&b2));
                assert_eq!(reused, 0, "{a:?} then {b:?} shared {reused} tokens");
            }
        }
    }
    assert_eq!(PrefixKey::dense(), PrefixKey::from(&PruneConfig::Dense));
    Ok(())
}

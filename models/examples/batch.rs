//! Continuous batching from Rust: two requests (one pruned with VisiPruner's paper
//! config, one dense; different lengths) answered together by the library batcher, their
//! tokens printed as they stream, then each answer beside a lone run of it (equal, token
//! for token: a sequence's rows do not depend on what runs beside it).
//!
//! `cargo run --release -p models --example batch -- [MODEL_DIR] [IMAGE]`
//! (default: the tiny fixture `tests/fixtures/tiny-llava-gqa` and `images/square.png`).

use std::path::PathBuf;
use std::sync::Arc;

use engine_core::{Backend, CpuBackend};
use models::llava::{GenerateOptions, Llava};
use models::prompt::Template;
use models::scheduler::{Batcher, BatcherConfig, StreamEvent};
use pruner::PruneConfig;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map_or_else(|| fixtures.join("tiny-llava-gqa"), PathBuf::from);
    let image = args
        .next()
        .map_or_else(|| fixtures.join("images/square.png"), PathBuf::from);
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let llava = Llava::load(&model, backend)?;
    let enc = llava.encode_image(&models::load_image(&image)?, models::PadMode::Crop)?;

    let asks = [
        ("What is shown in this image?", None, 12),
        ("Describe the colours.", Some(PruneConfig::Dense), 8),
    ];
    let mut batcher = Batcher::new(&llava, BatcherConfig::default());
    let mut streams = Vec::new();
    for (q, prune, max_new_tokens) in asks.iter().cloned() {
        let prompt = llava.prompt(Template::VicunaV1, q, true)?;
        let opts = GenerateOptions {
            max_new_tokens,
            prune,
            ..Default::default()
        };
        let (id, rx) = batcher.submit_stream(prompt, vec![enc.clone()], opts)?;
        streams.push((id, rx));
    }
    // One turn: admit what fits, one decode step of every running answer.
    while !batcher.is_idle() {
        batcher.turn();
        for (id, rx) in &streams {
            for ev in rx.try_iter() {
                match ev {
                    StreamEvent::Token { id: tok, text } => {
                        println!("request {id}: token {tok} {:?}", text.unwrap_or_default())
                    }
                    StreamEvent::Done { generation, .. } => {
                        println!(
                            "request {id}: done, {} tokens, {} of {} image tokens kept",
                            generation.tokens.len(),
                            generation
                                .prune
                                .kept_image_tokens
                                .as_ref()
                                .map_or(generation.image_tokens, Vec::len),
                            generation.image_tokens
                        );
                        let (q, prune, max_new_tokens) = asks[*id as usize].clone();
                        let prompt = llava.prompt(Template::VicunaV1, q, true)?;
                        let opts = GenerateOptions {
                            max_new_tokens,
                            prune,
                            ..Default::default()
                        };
                        let lone = llava.generate_ids(
                            &prompt,
                            std::slice::from_ref(&enc),
                            &opts,
                            &mut |_| {},
                        )?;
                        println!(
                            "request {id}: lone run {}",
                            if lone.tokens == generation.tokens {
                                "identical"
                            } else {
                                "DIFFERS"
                            }
                        );
                    }
                    StreamEvent::Dropped => println!("request {id}: dropped"),
                    StreamEvent::Failed(e) => return Err(e.into()),
                }
            }
        }
    }
    println!("{} decode steps for both answers", batcher.counters().steps);
    Ok(())
}

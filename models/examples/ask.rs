//! Ask a LLaVA model about an image through the `models` library API.
//!
//! `cargo run --release -p models --example ask -- tests/fixtures/tiny-llava-mha tests/fixtures/images/square.png "What is shown in this image?"`

use std::sync::Arc;

use engine_core::{Backend, CpuBackend};
use models::llava::{GenerateOptions, Llava};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, question] = &args[..] else {
        return Err("usage: ask MODEL_DIR IMAGE QUESTION".into());
    };
    // The GPU when there is one, else the CPU reference backend.
    let backend: Arc<dyn Backend> =
        engine_wgpu::open(&Default::default()).unwrap_or_else(|_| Arc::new(CpuBackend::new()));
    let llava = Llava::load(model.as_ref(), backend)?;
    let picture = models::preprocess::load_image(image.as_ref())?;
    // Defaults: vicuna_v1 template, crop, greedy, VisiPruner when the model has the layers.
    let opts = GenerateOptions {
        max_new_tokens: 64,
        ..Default::default()
    };
    let answer = llava.generate(question, Some(&picture), &opts, &mut |piece| {
        print!("{piece}")
    })?;
    println!();
    eprintln!(
        "{} tokens; prefill {:.0} ms, {:.1} tokens/s; pruning {} kept {:?} image tokens",
        answer.tokens.len(),
        answer.timings.prefill_ms,
        answer.decode_tokens_per_s,
        answer.prune.method,
        answer.prune.kept_image_tokens.as_ref().map(Vec::len),
    );
    Ok(())
}

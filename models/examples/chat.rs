//! A multi-turn conversation about one image through the library API: every line on stdin
//! is a user turn; follow-ups reuse the session's image encoding and KV rows.
//!
//! `printf 'What is this?\nAnd the colours?\n' | cargo run --release -p models --example chat -- tests/fixtures/tiny-llava-mha tests/fixtures/images/square.png`

use std::io::{BufRead, Write};
use std::sync::Arc;

use engine_core::{Backend, CpuBackend};
use models::chat::{render_vicuna_v1, Message, Part, Role};
use models::llava::{GenerateOptions, Llava};
use models::{PadMode, Template};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image] = &args[..] else {
        return Err("usage: chat MODEL_DIR IMAGE < questions.txt".into());
    };
    let backend: Arc<dyn Backend> =
        engine_wgpu::open(&Default::default()).unwrap_or_else(|_| Arc::new(CpuBackend::new()));
    let llava = Llava::load(model.as_ref(), backend)?;
    let picture = llava.encode_image(&models::load_image(image.as_ref())?, PadMode::Crop)?;
    let opts = GenerateOptions {
        template: Template::Raw,
        max_new_tokens: 64,
        ..Default::default()
    };
    let mut session = llava.session();
    let mut messages: Vec<Message> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let mut parts = vec![Part::Text(line?)];
        if messages.is_empty() {
            parts.insert(0, Part::Image(image.clone()));
        }
        messages.push(Message {
            role: Role::User,
            parts,
        });
        let prompt = llava.prompt(Template::Raw, &render_vicuna_v1(&messages)?.text, true)?;
        let answer = llava.generate_in(
            &mut session,
            &prompt,
            std::slice::from_ref(&picture),
            &opts,
            &mut |t| {
                print!("{t}");
                let _ = std::io::stdout().flush();
            },
            &|| false,
        )?;
        println!();
        eprintln!(
            "({} of {} prompt tokens reused, prefill {:.0} ms)",
            answer.reused_tokens, answer.prompt_tokens, answer.timings.prefill_ms
        );
        messages.push(Message::text(Role::Assistant, answer.text.trim()));
    }
    Ok(())
}

//! `visi-cli` with LLaVA-NeXT, several images, and architectures visi does not implement.

use std::path::Path;
use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::{expect_error, fixtures};

fn visi(args: &[&str]) -> Result<Output> {
    visi_tests::run_visi(Path::new(env!("CARGO_BIN_EXE_visi-cli")), args)
}

#[test]
fn unknown_architectures_are_refused_by_run_and_info() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("visi-next-qwen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (cfg, name) in [
        (
            r#"{"architectures":["Qwen2VLForConditionalGeneration"],"model_type":"qwen2_vl"}"#,
            "Qwen2VLForConditionalGeneration",
        ),
        (
            r#"{"architectures":["Idefics3ForConditionalGeneration"],"model_type":"idefics3"}"#,
            "Idefics3ForConditionalGeneration",
        ),
        (r#"{"model_type":"paligemma"}"#, "paligemma"),
    ] {
        std::fs::write(dir.join("config.json"), cfg)?;
        let d = dir.to_str().context("temp path")?;
        let run = visi(&["run", "--model", d, "--prompt", "hi", "--device", "cpu"])?;
        expect_error(
            &run,
            2,
            &[name, "LlavaNextForConditionalGeneration", "not supported"],
        )?;
        let info = visi(&["info", "--model", d])?;
        expect_error(&info, 2, &[name, "LlavaForConditionalGeneration"])?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn two_images_on_next_answer_as_transformers_and_draw_kept_tiles() -> Result<()> {
    let f = fixtures();
    let img = |n: &str| f.join("images").join(n).display().to_string();
    let model = f.join("tiny-next-mistral").display().to_string();
    let kept = std::env::temp_dir().join(format!("visi-next-kept-{}.png", std::process::id()));
    let out = visi(&[
        "run",
        "--model",
        &model,
        "--image",
        &img("landscape.png"),
        "--image",
        &img("portrait.png"),
        "--template",
        "mistral_instruct",
        "--prompt",
        "What differs between these images?",
        "--max-new-tokens",
        "12",
        "--no-prune",
        "--device",
        "cpu",
        "--json",
        "--save-kept",
        kept.to_str().context("temp path")?,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let r: Value = serde_json::from_str(&std::fs::read_to_string(
        f.join("reference-next/tiny-next-mistral/expected.json"),
    )?)?;
    let two = &r["cases"]["two"];
    ensure!(
        v["tokens"] == two["generated_ids"],
        "tokens {}",
        v["tokens"]
    );
    ensure!(
        v["image_spans"] == two["image_spans"],
        "spans {}",
        v["image_spans"]
    );
    let pic = image::open(&kept)?;
    // Two panels per NeXT image (the original, the base tile) side by side.
    ensure!(
        pic.width() > 500 + 230,
        "kept picture {}x{}",
        pic.width(),
        pic.height()
    );
    std::fs::remove_file(&kept)?;
    // A raw prompt must hold one <image> per --image.
    let bad = visi(&[
        "run",
        "--model",
        &model,
        "--image",
        &img("landscape.png"),
        "--image",
        &img("portrait.png"),
        "--template",
        "raw",
        "--prompt",
        "<image> only one",
        "--device",
        "cpu",
    ])?;
    expect_error(&bad, 2, &["2 image(s)", "found 1"])?;
    Ok(())
}

#[test]
fn messages_with_two_images_on_next_answer_as_transformers() -> Result<()> {
    // The vicuna-template NeXT fixture: `run --messages` renders one `<image>\n` per image part
    // before the text, which is the reference's two-image prompt.
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("visi-next-msgs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let msgs = dir.join("two.json");
    let url = |n: &str| f.join("images").join(n).display().to_string();
    let conv = serde_json::json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url("landscape.png")}},
        {"type": "image_url", "image_url": {"url": url("portrait.png")}},
        {"type": "text", "text": "What differs between these images?"},
    ]}]);
    std::fs::write(&msgs, conv.to_string())?;
    let out = visi(&[
        "run",
        "--model",
        &f.join("tiny-next-llama").display().to_string(),
        "--messages",
        msgs.to_str().context("temp path")?,
        "--max-new-tokens",
        "12",
        "--no-prune",
        "--device",
        "cpu",
        "--json",
    ])?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let r: Value = serde_json::from_str(&std::fs::read_to_string(
        f.join("reference-next/tiny-next-llama/expected.json"),
    )?)?;
    let two = &r["cases"]["two"];
    ensure!(v["prompt"] == two["prompt"], "prompt {}", v["prompt"]);
    ensure!(
        v["tokens"] == two["generated_ids"],
        "tokens {}",
        v["tokens"]
    );
    ensure!(
        v["image_spans"] == two["image_spans"],
        "spans {}",
        v["image_spans"]
    );
    Ok(())
}

#[test]
fn messages_in_the_mistral_template_answer_as_transformers() -> Result<()> {
    // `run --messages --template mistral_instruct` over the conversation that transformers
    // rendered with llava-hf's llava-v1.6-mistral chat template (system message, an answer,
    // a second question): the same prompt and the same greedy answer.
    let f = fixtures();
    let refdir = f.join("reference-next/tiny-next-mistral");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("conversation.json"))?)?;
    let mut conv = r["messages"].clone();
    // The reference's image URLs are relative to its own directory: make them absolute.
    for m in conv.as_array_mut().context("messages")? {
        if let Some(parts) = m["content"].as_array_mut() {
            for p in parts {
                if let Some(u) = p["image_url"]["url"].as_str() {
                    p["image_url"]["url"] = Value::from(refdir.join(u).display().to_string());
                }
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("visi-next-mistral-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let msgs = dir.join("conv.json");
    std::fs::write(&msgs, conv.to_string())?;
    let out = visi(&[
        "run",
        "--model",
        &f.join("tiny-next-mistral").display().to_string(),
        "--messages",
        msgs.to_str().context("temp path")?,
        "--template",
        "mistral_instruct",
        "--max-new-tokens",
        "12",
        "--no-prune",
        "--kv-dtype",
        "f32",
        "--device",
        "cpu",
        "--json",
    ])?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["prompt"] == r["prompt"], "prompt {}", v["prompt"]);
    ensure!(v["tokens"] == r["generated_ids"], "tokens {}", v["tokens"]);
    Ok(())
}

//! `run --messages` and `chat` through the built binary:
//! - a conversation's tokens, prompt length and pruning decisions equal `--template raw`
//!   with the rendered string (dense and pruned, CPU and the wgpu adapter);
//! - images by data: URL equal images by path;
//! - a scripted three-turn `chat` answers every turn as `run --messages` would, and
//!   `/save` writes messages that `run --messages` reads back;
//! - bad conversations are one `error:` line with exit 2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use visi_tests::{expect_error, fixtures, references};

fn visi_stdin(args: &[&str], stdin: &str) -> Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .current_dir(fixtures().parent().unwrap_or(Path::new(".")))
        .env_remove("CI")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running visi-cli")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

fn visi(args: &[&str]) -> Result<Output> {
    visi_stdin(args, "")
}

fn json_of(out: &Output) -> Result<Value> {
    ensure!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn devices() -> Result<Vec<&'static str>> {
    visi_tests::binary_devices(Path::new(env!("CARGO_BIN_EXE_visi-cli")))
}

fn square() -> PathBuf {
    fixtures().join("images/square.png")
}

fn conversation() -> Value {
    json!([
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": square().display().to_string()}},
            {"type": "text", "text": "What is shown in this image?"}]},
        {"role": "assistant", "content": "Shapes on a white background."},
        {"role": "user", "content": "What colour is the circle?"}
    ])
}

fn write_temp(name: &str, text: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("visi-conv-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

#[test]
fn messages_equal_the_raw_rendering() -> Result<()> {
    let msgs = write_temp("conv.json", &conversation().to_string())?;
    let msgs = msgs.to_string_lossy().to_string();
    let img = square().to_string_lossy().to_string();
    for device in devices()? {
        for r in references()? {
            let model = r.model_dir.to_string_lossy().to_string();
            let mut configs = vec![vec!["--no-prune".to_string()]];
            for run in r
                .prune_runs
                .iter()
                .filter(|p| p.case == "square_crop")
                .take(3)
            {
                configs.push(vec!["--prune".to_string(), run.prune.to_string()]);
            }
            for cfg in configs {
                let what = format!("{device} {} {}", r.name, cfg.join(" "));
                let base = [
                    "--model",
                    &model,
                    "--device",
                    device,
                    "--max-new-tokens",
                    "8",
                    "--json",
                ];
                let mut a: Vec<&str> = vec!["run", "--messages", &msgs];
                a.extend(base);
                a.extend(cfg.iter().map(String::as_str));
                let m = json_of(&visi(&a)?).with_context(|| what.clone())?;
                let prompt = m["prompt"].as_str().context("prompt")?.to_string();
                ensure!(
                    prompt.ends_with("</s>USER: What colour is the circle? ASSISTANT:"),
                    "{what}: rendered {prompt:?}"
                );
                let mut a: Vec<&str> = vec![
                    "run",
                    "--template",
                    "raw",
                    "--prompt",
                    &prompt,
                    "--image",
                    &img,
                ];
                a.extend(base);
                a.extend(cfg.iter().map(String::as_str));
                let raw = json_of(&visi(&a)?).with_context(|| what.clone())?;
                for key in ["tokens", "prompt_tokens", "image_span"] {
                    ensure!(
                        m[key] == raw[key],
                        "{what}: {key}: {} vs raw {}",
                        m[key],
                        raw[key]
                    );
                }
                for key in [
                    "fusion_layer",
                    "kept_image_tokens",
                    "text_only_from_layer",
                    "layer_seq_lens",
                ] {
                    ensure!(
                        m["pruning"][key] == raw["pruning"][key],
                        "{what}: {key}: {} vs raw {}",
                        m["pruning"][key],
                        raw["pruning"][key]
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn data_urls_and_stdin_equal_paths() -> Result<()> {
    use base64::Engine as _;
    let r = references()?.into_iter().next().context("fixture")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(square())?);
    let mut conv = conversation();
    conv[0]["content"][0]["image_url"]["url"] = json!(format!("data:image/png;base64,{b64}"));
    let args = [
        "run",
        "--messages",
        "-",
        "--model",
        &model,
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        "--json",
    ];
    let by_data = json_of(&visi_stdin(&args, &conv.to_string())?)?;
    let by_path = json_of(&visi_stdin(&args, &conversation().to_string())?)?;
    ensure!(
        by_data["tokens"] == by_path["tokens"],
        "data URL vs path tokens"
    );
    ensure!(
        by_data["prompt"] == by_path["prompt"],
        "data URL vs path prompt"
    );
    Ok(())
}

#[test]
fn scripted_chat_answers_as_run_messages() -> Result<()> {
    let r = references()?.into_iter().next().context("fixture")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let img = square().to_string_lossy().to_string();
    let saved = std::env::temp_dir().join(format!("visi-chat-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&saved);
    let script = format!(
        "What is shown in this image?\n/stats\nDescribe the colours.\nIs there a circle?\n/save {}\n/quit\nnever asked\n",
        saved.display()
    );
    let common = [
        "--model",
        model.as_str(),
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
    ];
    let mut a = vec!["chat", "--image", img.as_str()];
    a.extend(common);
    let out = visi_stdin(&a, &script)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(out.status.success(), "chat failed: {stderr}");
    let answers: Vec<&str> = stdout.lines().collect();
    ensure!(
        answers.len() == 3,
        "three answers expected, got {stdout:?} ({stderr})"
    );
    ensure!(
        stderr.contains("reused"),
        "/stats says what was reused: {stderr}"
    );
    let msgs: Value = serde_json::from_str(&std::fs::read_to_string(&saved)?)?;
    let list = msgs.as_array().context("saved messages")?;
    ensure!(list.len() == 6, "saved {} messages", list.len());
    // Each turn is what `run --messages` answers for the conversation up to it.
    for turn in 0..3 {
        let upto = Value::Array(list[..2 * turn + 1].to_vec());
        let mut a = vec!["run", "--messages", "-"];
        a.extend(common);
        a.push("--json");
        let v = json_of(&visi_stdin(&a, &upto.to_string())?)?;
        let text = v["text"].as_str().unwrap_or_default().trim().to_string();
        ensure!(
            text == answers[turn].trim(),
            "turn {}: chat said {:?}, run --messages says {text:?}",
            turn + 1,
            answers[turn]
        );
        ensure!(
            list[2 * turn + 1]["content"].as_str() == Some(text.as_str()),
            "turn {}: saved answer differs",
            turn + 1
        );
    }
    // /save never overwrites without --force; the chat goes on after the refusal.
    let script = format!("/save {}\n/quit\n", saved.display());
    let out = visi_stdin(&a, &script)?;
    ensure!(out.status.success());
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "no refusal"
    );
    let _ = std::fs::remove_file(&saved);
    Ok(())
}

#[test]
fn bad_conversations_are_one_error_line() -> Result<()> {
    let r = references()?.into_iter().next().context("fixture")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let img = square().display().to_string();
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid JSON"),
        (json!([{"role": "robot", "content": "x"}]).to_string(), "unknown role"),
        (json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]).to_string(), "last message"),
        (json!([{"role": "assistant", "content": "b"}]).to_string(), "expected a user message"),
        (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]).to_string(), "not fetched"),
        (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]).to_string(), "base64"),
        (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]).to_string(), "not an image"),
        (json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": img}},
            {"type": "image_url", "image_url": {"url": "/nonexistent/second.png"}}]}]).to_string(), "second.png"),
        (json!([]).to_string(), "empty"),
    ];
    for (text, needle) in &cases {
        let out = visi_stdin(
            &[
                "run",
                "--messages",
                "-",
                "--model",
                &model,
                "--device",
                "cpu",
            ],
            text,
        )?;
        expect_error(&out, 2, &[needle]).with_context(|| format!("messages {text}"))?;
    }
    let f = write_temp("ok.json", &conversation().to_string())?;
    let f = f.to_string_lossy().to_string();
    let out = visi(&[
        "run",
        "--messages",
        &f,
        "--template",
        "raw",
        "--model",
        &model,
    ])?;
    expect_error(&out, 2, &["--template raw"])?;
    let out = visi(&["run", "--messages", &f, "--prompt", "x", "--model", &model])?;
    expect_error(&out, 2, &[])?;
    let out = visi(&[
        "run",
        "--messages",
        "/nonexistent/m.json",
        "--model",
        &model,
    ])?;
    expect_error(&out, 2, &["/nonexistent/m.json"])?;
    let out = visi(&["chat", "--model", &model, "--image", "/nonexistent.png"])?;
    expect_error(&out, 2, &["--image"])?;
    Ok(())
}

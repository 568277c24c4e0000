//! `visi-cli run --quant` (quantize at load, CPU backend) on the tiny fixture model, and the
//! GGUF text path's refusals.

use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn visi(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI")
        .output()
        .context("running visi-cli")
}

fn fixture(rel: &str) -> String {
    format!("{}/../tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn run_quantized_on_cpu() -> Result<()> {
    let model = fixture("tiny-llava-gqa");
    let image = fixture("images/square.png");
    for q in ["q8_0", "q4_0", "q4_1", "q4_k"] {
        let out = visi(&[
            "run",
            "--model",
            &model,
            "--image",
            &image,
            "--prompt",
            "What is this?",
            "--max-new-tokens",
            "4",
            "--quant",
            q,
            "--json",
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "--quant {q}: exit {:?}: {stderr}",
            out.status.code()
        );
        let j: Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("--quant {q}: JSON"))?;
        ensure!(
            j["device"]["backend"] == "cpu",
            "--quant {q}: ran on {}",
            j["device"]
        );
        let n = j["tokens"].as_array().map_or(0, Vec::len);
        ensure!(n >= 1, "--quant {q}: no tokens: {j}");
    }
    Ok(())
}

#[test]
fn quant_and_gguf_refusals() -> Result<()> {
    let model = fixture("tiny-llava-gqa");
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "run", "--model", &model, "--prompt", "hi", "--quant", "q8_0", "--device", "gpu",
            ],
            "--device cpu",
        ),
        (
            &[
                "run", "--model", "x.gguf", "--prompt", "hi", "--image", "a.png",
            ],
            "--mmproj",
        ),
        (
            &[
                "run", "--model", &model, "--prompt", "hi", "--mmproj", "m.gguf",
            ],
            "needs a GGUF text model",
        ),
    ];
    for (args, needle) in cases {
        let out = visi(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}: {stderr}",
            out.status.code()
        );
        ensure!(
            stderr.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {stderr}"
        );
        ensure!(!stderr.contains("panicked"), "{args:?}: panic: {stderr}");
    }
    let out = visi(&[
        "run",
        "--model",
        "missing.gguf",
        "--prompt",
        "hi",
        "--device",
        "cpu",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("missing.gguf"),
        "missing file: {stderr}"
    );
    Ok(())
}

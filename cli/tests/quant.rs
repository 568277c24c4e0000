//! `visi-cli run --quant` (quantize at load) on the tiny fixture model on both backends, and
//! the GGUF text path's refusals.

use std::path::Path;
use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::expect_error;

fn visi(args: &[&str]) -> Result<Output> {
    visi_tests::run_visi(Path::new(env!("CARGO_BIN_EXE_visi-cli")), args)
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
            "--device",
            "cpu",
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

/// Whether wgpu lists any adapter (`--device gpu` accepts software ones).
fn has_adapter() -> Result<bool> {
    let v: Value = serde_json::from_slice(&visi(&["devices", "--json"])?.stdout)?;
    Ok(v["adapters"].as_array().is_some_and(|a| !a.is_empty()))
}

/// Greedy tokens of `run --quant q --device device` and the device it ran on.
fn quant_tokens(model: &str, q: &str, device: &str) -> Result<(Vec<u64>, Value)> {
    let image = fixture("images/square.png");
    let out = visi(&[
        "run",
        "--model",
        model,
        "--image",
        &image,
        "--prompt",
        "What is this?",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--quant",
        q,
        "--device",
        device,
        "--json",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "--quant {q} --device {device}: exit {:?}: {stderr}",
        out.status.code()
    );
    let j: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("--quant {q} --device {device}: JSON"))?;
    let toks = j["tokens"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    Ok((toks, j["device"].clone()))
}

#[test]
fn quantized_gpu_matches_cpu() -> Result<()> {
    // Same quantized blocks on both backends; only f32 summation order differs, so the
    // greedy tokens of the tiny models agree.
    for model in ["tiny-llava-gqa", "tiny-llava-mha"] {
        let model = fixture(model);
        for q in ["q4_k", "q8_0", "q4_0", "q4_1"] {
            // gpu: the wgpu backend on any adapter, lavapipe included (auto prefers the CPU
            // backend over software adapters).
            if !has_adapter()? {
                ensure!(
                    std::env::var_os("CI").is_none(),
                    "CI is set but wgpu lists no adapter"
                );
                eprintln!("SKIP quant on wgpu: no adapter");
                return Ok(());
            }
            let (gpu, dev) = quant_tokens(&model, q, "gpu")?;
            ensure!(dev["backend"] == "wgpu", "--device gpu ran on {dev}");
            let (cpu, _) = quant_tokens(&model, q, "cpu")?;
            ensure!(!cpu.is_empty(), "{model} --quant {q}: no tokens");
            ensure!(
                gpu == cpu,
                "{model} --quant {q}: gpu tokens {gpu:?}, cpu tokens {cpu:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn quant_and_gguf_refusals() -> Result<()> {
    let model = fixture("tiny-llava-gqa");
    let cases: [(&[&str], &str); 2] = [
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
        expect_error(&visi(args)?, 2, &[needle]).with_context(|| format!("{args:?}"))?;
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

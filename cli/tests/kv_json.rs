//! `--json` says which KV cache dtype ran (issue 27): `run` on a llava-hf directory (the
//! default f16 and `--kv-dtype f32`) and on a text-only GGUF.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::fixtures;

fn run_json(args: &[&str]) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .current_dir(fixtures().parent().unwrap_or(Path::new(".")))
        .env_remove("CI")
        .output()
        .context("running visi-cli")?;
    ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn run_json_reports_the_kv_dtype() -> Result<()> {
    let model = fixtures().join("tiny-llava-mha");
    let model = model.to_string_lossy();
    let base = [
        "run",
        "--model",
        &model,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "--json",
    ];
    let v = run_json(&base)?;
    ensure!(
        v["kv_dtype"] == "f16",
        "default: kv_dtype {}",
        v["kv_dtype"]
    );
    let mut args = base.to_vec();
    args.extend(["--kv-dtype", "f32"]);
    let v = run_json(&args)?;
    ensure!(
        v["kv_dtype"] == "f32",
        "--kv-dtype f32: kv_dtype {}",
        v["kv_dtype"]
    );
    // The text-only GGUF path has its own JSON.
    let gguf = fixtures().join("gguf/tiny-llava-mha/tiny-llava-mha.f16.gguf");
    let gguf = gguf.to_string_lossy();
    let v = run_json(&[
        "run",
        "--model",
        &gguf,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "--json",
        "--kv-dtype",
        "f32",
    ])?;
    ensure!(v["kv_dtype"] == "f32", "gguf: kv_dtype {}", v["kv_dtype"]);
    Ok(())
}

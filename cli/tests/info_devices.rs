//! `visi-cli info`, `devices`, the `run` stats line and Ctrl-C, through the built binary.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use visi_tests::fixtures;

fn visi(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .output()
        .context("running visi-cli")
}

fn ok_stdout(out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout.clone())?)
}

/// (parameter count, bytes of every shard) read straight from the safetensors headers.
fn count_from_headers(dir: &Path) -> Result<(u64, u64)> {
    let (mut params, mut bytes) = (0u64, 0u64);
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        let buf = std::fs::read(&p)?;
        bytes += buf.len() as u64;
        let n = u64::from_le_bytes(buf[..8].try_into()?) as usize;
        let h: Value = serde_json::from_slice(&buf[8..8 + n])?;
        for (k, v) in h.as_object().context("header")? {
            if k == "__metadata__" {
                continue;
            }
            params += v["shape"]
                .as_array()
                .context("shape")?
                .iter()
                .map(|d| d.as_u64().unwrap_or(0))
                .product::<u64>();
        }
    }
    Ok((params, bytes))
}

#[test]
fn info_json_matches_config_and_headers() -> Result<()> {
    for name in ["tiny-llava-gqa", "tiny-llava-mha"] {
        let dir = fixtures().join(name);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let out = visi(&[
            "info",
            "--model",
            &dir.to_string_lossy(),
            "--device",
            "cpu",
            "--json",
        ])?;
        let v: Value = serde_json::from_str(ok_stdout(&out)?.trim())?;
        let tc = &cfg["text_config"];
        let want = |k: &str, got: &Value, want: &Value| -> Result<()> {
            ensure!(got == want, "{name}: {k}: got {got} want {want}");
            Ok(())
        };
        want("text_layers", &v["text_layers"], &tc["num_hidden_layers"])?;
        want(
            "vision_layers",
            &v["vision_layers"],
            &cfg["vision_config"]["num_hidden_layers"],
        )?;
        want("architecture", &v["architecture"], &cfg["architectures"][0])?;
        let (params, bytes) = count_from_headers(&dir)?;
        want(
            "parameters.total",
            &v["parameters"]["total"],
            &params.into(),
        )?;
        want("bytes_on_disk", &v["bytes_on_disk"], &bytes.into())?;
        let n = |x: &Value| x.as_u64().unwrap_or(0);
        let head_dim = tc["head_dim"]
            .as_u64()
            .unwrap_or_else(|| n(&tc["hidden_size"]) / n(&tc["num_attention_heads"]).max(1));
        let kv = 2
            * n(&tc["num_hidden_layers"])
            * n(&tc["max_position_embeddings"])
            * n(&tc["num_key_value_heads"])
            * head_dim
            * 4;
        want(
            "memory.kv_cache_bytes",
            &v["memory"]["kv_cache_bytes"],
            &kv.into(),
        )?;
        let w = n(&v["memory"]["weights_bytes"]);
        ensure!(
            w >= params * 2 && w <= params * 4,
            "{name}: weights_bytes {w} outside [2, 4] bytes x {params} parameters"
        );
        ensure!(v["device"]["backend"] == "cpu", "{name}: {}", v["device"]);
        ensure!(v["device"]["fits"] == true, "{name}: {}", v["device"]);
        ensure!(
            v["largest_tensor"]["name"].is_string(),
            "{name}: largest_tensor"
        );
        println!("{name}: {params} parameters, {w} weight bytes, {kv} KV bytes");
    }
    Ok(())
}

#[test]
fn info_text_and_auto_device() -> Result<()> {
    let dir = fixtures().join("tiny-llava-gqa");
    // auto: whatever adapter exists (or the CPU backend), never an error on a good model.
    let out = visi(&["info", "--model", &dir.to_string_lossy()])?;
    let text = ok_stdout(&out)?;
    for k in [
        "architecture",
        "layers",
        "parameters",
        "dtypes",
        "on disk",
        "memory",
        "fits",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with(k)),
            "no {k:?} line in:\n{text}"
        );
    }
    ensure!(
        text.contains("fits         yes"),
        "model should fit:\n{text}"
    );
    Ok(())
}

#[test]
fn devices_table_and_json() -> Result<()> {
    let table = ok_stdout(&visi(&["devices"])?)?;
    ensure!(
        table
            .lines()
            .last()
            .is_some_and(|l| l.contains("--device auto picks")),
        "no auto line:\n{table}"
    );
    let v: Value = serde_json::from_str(ok_stdout(&visi(&["devices", "--json"])?)?.trim())?;
    let adapters = v["adapters"].as_array().context("adapters array")?;
    ensure!(v["auto"].is_string(), "auto missing: {v}");
    let picked = adapters.iter().filter(|a| a["auto_pick"] == true).count();
    ensure!(picked <= 1, "{picked} adapters marked auto_pick");
    // auto never takes a software adapter on its own (no VISI_ADAPTER here): the CPU backend
    // is faster there, and it says so.
    let hardware = adapters.iter().any(|a| a["device_type"] != "cpu");
    ensure!(
        picked == usize::from(hardware),
        "auto_pick on {picked} adapters, hardware present: {hardware}"
    );
    if let Some(a) = adapters.iter().find(|a| a["auto_pick"] == true) {
        ensure!(
            a["device_type"] != "cpu",
            "auto picked a software adapter: {a}"
        );
    }
    ensure!(
        v["auto_backend"] == if hardware { "wgpu" } else { "cpu" },
        "auto_backend: {v}"
    );
    if !adapters.is_empty() && !hardware {
        ensure!(
            v["auto"]
                .as_str()
                .is_some_and(|s| s.contains("software adapters")),
            "auto must say why it takes the CPU backend: {}",
            v["auto"]
        );
    }
    // `--device gpu` takes the best adapter, software ones included.
    let gpu = adapters.iter().filter(|a| a["gpu_pick"] == true).count();
    ensure!(
        gpu == usize::from(!adapters.is_empty()),
        "gpu_pick on {gpu} of {} adapters",
        adapters.len()
    );
    for (i, a) in adapters.iter().enumerate() {
        for k in ["name", "backend", "device_type", "driver"] {
            ensure!(a[k].is_string(), "adapter {i}: {k} missing");
        }
        for k in ["max_buffer_size", "max_storage_buffer_binding_size"] {
            ensure!(a[k].is_u64(), "adapter {i}: {k} missing");
        }
        ensure!(
            table.contains(a["name"].as_str().unwrap_or("?")),
            "table lacks adapter {i}"
        );
    }
    println!("{} adapters; auto: {}", adapters.len(), v["auto"]);
    Ok(())
}

#[test]
fn run_prints_stats_line() -> Result<()> {
    let dir = fixtures().join("tiny-llava-mha");
    let img = fixtures().join("images/square.png");
    let out = visi(&[
        "run",
        "--model",
        &dir.to_string_lossy(),
        "--image",
        &img.to_string_lossy(),
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
    ])?;
    ok_stdout(&out)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    for k in [
        "prompt tokens",
        "image)",
        "time to first token",
        "prefill",
        "decode",
        "cpu on",
    ] {
        ensure!(last.contains(k), "stats line lacks {k:?}: {last}");
    }
    // No progress bar: stderr is a pipe here.
    ensure!(
        !stderr.contains("loading weights"),
        "progress bar on a pipe: {stderr}"
    );
    Ok(())
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_generation_cleanly() -> Result<()> {
    // A long sampled text-only answer on the CPU; SIGINT once text is flowing.
    let dir = fixtures().join("tiny-llava-gqa");
    let mut child = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args([
            "run",
            "--model",
            &dir.to_string_lossy(),
            "--prompt",
            "Tell me a long story.",
            "--device",
            "cpu",
            "--no-prune",
            "--temperature",
            "1.0",
            "--seed",
            "7",
            "--max-new-tokens",
            "100000",
        ])
        .env("RUST_BACKTRACE", "1")
        .env("VISI_DEBUG_TOKEN_DELAY_MS", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut first = [0u8; 1];
    stdout
        .read_exact(&mut first)
        .context("no text before EOF")?;
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-INT", &pid]).status()?;
    ensure!(status.success(), "kill -INT failed");
    let t0 = Instant::now();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest)?;
    let out = child.wait_with_output()?;
    ensure!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?} to stop",
        t0.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(0) {
        bail!("generation finished before Ctrl-C; stderr: {stderr}");
    }
    ensure!(
        out.status.code() == Some(130),
        "exit {:?}; stderr: {stderr}",
        out.status.code()
    );
    ensure!(stderr.contains("interrupted"), "stderr: {stderr}");
    for bad in ["panicked", "backtrace", "error:"] {
        ensure!(!stderr.contains(bad), "stderr mentions {bad:?}: {stderr}");
    }
    // What was generated was printed, and the stats line says it was interrupted.
    ensure!(
        stderr.contains("generated, interrupted"),
        "no interrupted stats line: {stderr}"
    );
    Ok(())
}

/// `info --shape llava-7b`: LLaVA-1.5-7B's published size (7,063,427,072 parameters in
/// llava-hf/llava-1.5-7b-hf), and the per-format weight bytes from GGUF's block sizes.
#[test]
fn info_shape_llava_7b() -> Result<()> {
    let out = visi(&["info", "--shape", "llava-7b", "--device", "cpu", "--json"])?;
    let v: Value = serde_json::from_str(&ok_stdout(&out)?)?;
    ensure!(
        v["parameters"]["total"] == 7_063_427_072u64,
        "parameters {}",
        v["parameters"]
    );
    let m = &v["memory"];
    let f16 = m["weights_bytes"].as_u64().context("weights_bytes")?;
    let q = |f: &str| m["weights_bytes_quantized"][f].as_u64().unwrap_or(0);
    // Q8_0: 34 bytes per 32 weights; Q4_0 18/32; Q4_K 144/256 (all 4.5 bits): every matrix
    // of this shape is whole blocks, only vectors and the position table stay f32.
    let params = m["params_quantized"]["q4_k"]
        .as_u64()
        .context("params_quantized")?;
    let rest = f16 - 2 * params;
    ensure!(q("q8_0") == params / 32 * 34 + rest, "q8_0 {}", q("q8_0"));
    ensure!(q("q4_0") == params / 32 * 18 + rest, "q4_0 {}", q("q4_0"));
    ensure!(q("q4_k") == params / 256 * 144 + rest, "q4_k {}", q("q4_k"));
    ensure!(q("q4_k") < 4 << 30, "q4_k {} does not fit 4 GiB", q("q4_k"));
    let bad = visi(&["info", "--shape", "llava-9b"])?;
    ensure!(
        bad.status.code() == Some(2),
        "bad shape: {:?}",
        bad.status.code()
    );
    Ok(())
}

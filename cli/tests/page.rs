//! serve's chat page (`GET /`) in headless Chromium (Debian's `chromium`, driven by
//! puppeteer-core from `tests/page`, installed with `npm ci` there): the page loads, names
//! the model, attaches an image, sends a question, and shows the streamed answer, which must
//! be the answer `run` gives for the same image and question (the page's request is greedy
//! like `run`'s default). Skipped with a SKIP line where node, chromium or
//! `tests/page/node_modules` is missing, except under CI, where that is a failure.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use visi_tests::fixtures;

const BIN: &str = env!("CARGO_BIN_EXE_visi-cli");

fn page_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/page")
}

#[test]
fn the_page_answers_in_headless_chromium() -> Result<()> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let have_node = Command::new("node").arg("--version").output().is_ok();
    let ready = have_node
        && Path::new(&chromium).exists()
        && page_dir().join("node_modules/puppeteer-core").is_dir();
    if !ready {
        ensure!(
            std::env::var_os("CI").is_none(),
            "CI is set but node, {chromium} or tests/page/node_modules (npm ci) is missing"
        );
        eprintln!("SKIP the page test: node, {chromium} or tests/page/node_modules is missing");
        return Ok(());
    }
    let model = fixtures().join("tiny-llava-mha");
    let img = fixtures().join("images/square.png");
    let question = "What is in the picture?";
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--max-tokens",
            "8",
            "--model",
        ])
        .arg(&model)
        .env_remove("CI")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting serve")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let result = (|| -> Result<()> {
        let addr = rx
            .recv_timeout(Duration::from_secs(300))
            .context("serve did not start")?;
        let out = Command::new("node")
            .arg(page_dir().join("chat.js"))
            .arg(format!("http://{addr}/"))
            .arg(&img)
            .arg(question)
            .env("CHROMIUM", &chromium)
            .output()
            .context("running node chat.js")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "chat.js failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(stdout.trim()).context("chat.js output")?;
        ensure!(
            v["errors"].as_array().is_some_and(|e| e.is_empty()),
            "page errors: {v}"
        );
        ensure!(
            v["image_shown"] == true,
            "the attached image is not shown: {v}"
        );
        ensure!(
            v["model"]
                .as_str()
                .is_some_and(|m| m.contains("tiny-llava-mha")),
            "model: {v}"
        );
        ensure!(
            v["stats"].as_str().is_some_and(|s| s.contains("prompt +")),
            "no stats line: {v}"
        );
        // The same question through `run` (the page sends the image before the text, as
        // `run --image --prompt` places it).
        let want = Command::new(BIN)
            .args(["run", "--device", "cpu", "--max-new-tokens", "8", "--model"])
            .arg(&model)
            .arg("--image")
            .arg(&img)
            .args(["--prompt", question])
            .output()?;
        ensure!(
            want.status.success(),
            "{}",
            String::from_utf8_lossy(&want.stderr)
        );
        let want = String::from_utf8_lossy(&want.stdout).trim().to_string();
        let got = v["answer"].as_str().unwrap_or("").trim().to_string();
        if got != want {
            bail!("the page shows {got:?}, run answers {want:?}");
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

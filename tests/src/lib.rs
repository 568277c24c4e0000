//! Helpers shared by the workspace integration tests: fixture paths, the transformers
//! reference cases (`fixtures/reference/*/expected.json` + `arrays.safetensors`), and
//! comparisons that say where they fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use engine_core::weights::{open_safetensors, WeightSource};
use serde_json::Value;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// One reference prompt (with or without an image).
#[derive(Clone, Debug)]
pub struct RefCase {
    /// Case name (`square_crop`, `text`, ...): also the prefix of its arrays.
    pub name: String,
    /// Image file, absolute.
    pub image: Option<PathBuf>,
    /// `"crop"` or `"pad"`.
    pub image_mode: Option<String>,
    /// The full rendered prompt.
    pub prompt: String,
    /// The user's question inside the vicuna_v1 prompt.
    pub question: String,
    /// Ids after `<image>` expansion.
    pub input_ids_expanded: Vec<u32>,
    /// `[s, e)`.
    pub image_span: Option<(usize, usize)>,
    /// 16 greedy tokens.
    pub generated_ids: Vec<u32>,
    /// Their decoding.
    pub generated_text: String,
    /// transformers' top-1 minus top-2 logit at each greedy step.
    pub step_margins: Vec<f32>,
}

/// One pruned run of the reference VisiPruner/FastV implementation (`pruning.json`).
#[derive(Clone, Debug)]
pub struct PruneRun {
    /// `exit`, `no_exit`, `split`, `fastv`, `text_noop`.
    pub name: String,
    /// The `expected.json` case it runs.
    pub case: String,
    /// The `--prune` JSON.
    pub prune: Value,
    /// Layer that selected the kept tokens.
    pub fusion_layer: Option<usize>,
    /// Kept offsets inside the image span.
    pub kept_image_tokens: Option<Vec<usize>>,
    /// First layer with no image tokens.
    pub text_only_from_layer: Option<usize>,
    /// Sequence length per layer.
    pub layer_seq_lens: Vec<usize>,
    /// Top-5 `(id, logit)` of the first step.
    pub first_logits_top5: Vec<(u32, f32)>,
    /// 16 greedy tokens.
    pub generated_ids: Vec<u32>,
}

/// A pruned generation against a reference run: fusion layer, kept image tokens, text-only
/// exit layer, per-layer sequence lengths, the first-step logits of the reference's top-5
/// tokens within `tol`, and the greedy tokens. Returns the largest top-5 logit error.
pub fn check_prune_outcome(g: &models::llava::Generation, run: &PruneRun, tol: f32) -> Result<f32> {
    ensure!(
        g.prune.fusion_layer == run.fusion_layer,
        "fusion layer: got {:?} want {:?}",
        g.prune.fusion_layer,
        run.fusion_layer
    );
    ensure!(
        g.prune.kept_image_tokens == run.kept_image_tokens,
        "kept image tokens: got {:?} want {:?}",
        g.prune.kept_image_tokens,
        run.kept_image_tokens
    );
    ensure!(
        g.prune.text_only_from_layer == run.text_only_from_layer,
        "text-only from layer: got {:?} want {:?}",
        g.prune.text_only_from_layer,
        run.text_only_from_layer
    );
    ensure!(
        g.layer_seq_lens == run.layer_seq_lens,
        "layer seq lens: got {:?} want {:?}",
        g.layer_seq_lens,
        run.layer_seq_lens
    );
    let logits = g.first_logits.as_deref().unwrap_or(&[]);
    let mut max = 0f32;
    for (i, &(id, want)) in run.first_logits_top5.iter().enumerate() {
        let got = *logits.get(id as usize).context("logits too short")?;
        ensure!(
            (got - want).abs() <= tol,
            "first-step top-{i} token {id}: got {got} want {want}"
        );
        max = max.max((got - want).abs());
    }
    if let Some(d) = first_difference(&g.tokens, &run.generated_ids) {
        bail!("greedy tokens: {d}");
    }
    Ok(max)
}

/// One model's reference outputs.
pub struct Reference {
    /// Model name (`tiny-llava-mha`).
    pub name: String,
    /// The model directory, absolute.
    pub model_dir: PathBuf,
    /// Greedy steps the reference ran.
    pub max_new_tokens: usize,
    /// Every case.
    pub cases: Vec<RefCase>,
    /// Pruned runs (`pruning.json`; empty when the file is absent).
    pub prune_runs: Vec<PruneRun>,
    arrays: Arc<dyn WeightSource>,
}

impl Reference {
    /// The f32 array `{case}.{what}` (`pixel_values`, `vision_features`, `projector_out`,
    /// `logits`) and its shape.
    pub fn array(&self, case: &str, what: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        f32_array(self.arrays.as_ref(), &format!("{case}.{what}"))
            .with_context(|| self.name.clone())
    }
}

/// The f32 array `name` of a safetensors source and its shape.
pub fn f32_array(arrays: &dyn WeightSource, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let v = arrays.view(name).with_context(|| format!("array {name}"))?;
    if v.dtype != engine_core::DType::F32 {
        bail!("array {name} is {:?}, expected F32", v.dtype);
    }
    let data = v
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((data, v.shape.to_vec()))
}

/// Every `fixtures/reference/*/expected.json` present, sorted by model name.
pub fn references() -> Result<Vec<Reference>> {
    let root = fixtures().join("reference");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("no reference fixtures under {}", root.display());
    }
    dirs.iter().map(|d| load_reference(d)).collect()
}

fn load_reference(dir: &Path) -> Result<Reference> {
    let path = dir.join("expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let s = |v: &Value, k: &str| -> Result<String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: `{k}` missing", path.display()))
    };
    let ids = |v: &Value, k: &str| -> Result<Vec<u32>> {
        v.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{}: `{k}` missing", path.display()))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as u32)
                    .ok_or_else(|| anyhow!("{}: `{k}` holds a non-id", path.display()))
            })
            .collect()
    };
    let name = s(&v, "model")?;
    let model_dir = fixtures().join(s(&v, "model_dir")?);
    let arrays = open_safetensors(&dir.join(s(&v, "arrays_file")?))?;
    let cases_obj = v
        .get("cases")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{}: no cases", path.display()))?;
    let mut cases = Vec::new();
    for (cname, c) in cases_obj {
        let prompt = s(c, "prompt")?;
        let question = prompt
            .split_once("USER: ")
            .map(|(_, q)| q.strip_prefix("<image>\n").unwrap_or(q))
            .and_then(|q| q.strip_suffix(" ASSISTANT:"))
            .ok_or_else(|| anyhow!("{cname}: prompt is not vicuna_v1"))?
            .to_string();
        let image_span = match c.get("image_span") {
            Some(Value::Array(a)) if a.len() == 2 => Some((
                a[0].as_u64().unwrap_or(0) as usize,
                a[1].as_u64().unwrap_or(0) as usize,
            )),
            _ => None,
        };
        cases.push(RefCase {
            name: cname.clone(),
            image: c
                .get("image")
                .and_then(Value::as_str)
                .map(|p| fixtures().join(p)),
            image_mode: c
                .get("image_mode")
                .and_then(Value::as_str)
                .map(str::to_string),
            prompt,
            question,
            input_ids_expanded: ids(c, "input_ids_expanded")?,
            image_span,
            generated_ids: ids(c, "generated_ids")?,
            generated_text: s(c, "generated_text")?,
            step_margins: c
                .get("step_margins")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.as_f64())
                        .map(|m| m as f32)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let prune_runs = load_prune_runs(&dir.join("pruning.json"))?;
    Ok(Reference {
        name,
        prune_runs,
        model_dir,
        max_new_tokens: v
            .get("max_new_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(16) as usize,
        cases,
        arrays,
    })
}

/// Max abs difference of `got` vs `want` (viewed as rows of `cols`); an error naming the
/// first element over `tol` (`row 3 col 17: got .. want ..`) or a length mismatch.
pub fn compare(what: &str, got: &[f32], want: &[f32], cols: usize, tol: f32) -> Result<f32> {
    if got.len() != want.len() {
        bail!("{what}: {} values, want {}", got.len(), want.len());
    }
    let cols = cols.max(1);
    let mut max = 0f32;
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > tol {
            first_bad.get_or_insert((i, g, w));
        }
        if d > max || d.is_nan() {
            max = if d.is_nan() { f32::INFINITY } else { d };
        }
    }
    if let Some((i, g, w)) = first_bad {
        bail!(
            "{what}: row {} col {}: got {g} want {w} (max abs err {max}, tolerance {tol})",
            i / cols,
            i % cols
        );
    }
    Ok(max)
}

/// Where the first two sequences differ, for token comparisons.
pub fn first_difference(got: &[u32], want: &[u32]) -> Option<String> {
    if got == want {
        return None;
    }
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Some(format!(
        "token {i}: got {:?} want {:?} (got {} tokens, want {})",
        got.get(i),
        want.get(i),
        got.len(),
        want.len()
    ))
}

/// The runs of a `pruning.json` written by `tools/visipruner_ref.py` (empty when absent).
pub fn load_prune_runs(path: &Path) -> Result<Vec<PruneRun>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let runs = v
        .get("runs")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{}: no runs", path.display()))?;
    let usizes = |x: &Value| -> Option<Vec<usize>> {
        x.as_array().map(|a| {
            a.iter()
                .filter_map(|n| n.as_u64().map(|n| n as usize))
                .collect()
        })
    };
    runs.iter()
        .map(|r| {
            let opt = |k: &str| r.get(k).and_then(Value::as_u64).map(|n| n as usize);
            Ok(PruneRun {
                name: r
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                case: r
                    .get("case")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("run without case"))?
                    .to_string(),
                prune: r
                    .get("prune")
                    .cloned()
                    .ok_or_else(|| anyhow!("run without prune"))?,
                fusion_layer: opt("fusion_layer"),
                kept_image_tokens: r.get("kept_image_tokens").and_then(usizes),
                text_only_from_layer: opt("text_only_from_layer"),
                layer_seq_lens: r.get("layer_seq_lens").and_then(usizes).unwrap_or_default(),
                first_logits_top5: r
                    .get("first_logits_top5")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| {
                                Some((p.get(0)?.as_u64()? as u32, p.get(1)?.as_f64()? as f32))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                generated_ids: r
                    .get("generated_ids")
                    .and_then(usizes)
                    .map(|v| v.into_iter().map(|x| x as u32).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The GPU backend for test `test`, or `None` (with a visible SKIP line) when no adapter can
/// be opened. With `CI` set a missing adapter is an error, never a silent pass. The adapter's
/// name goes straight to stderr, past libtest's output capture, so every log names it.
pub fn gpu_backend_or_skip(test: &str) -> Result<Option<Arc<dyn engine_core::Backend>>> {
    use std::io::Write;
    match engine_wgpu::open(&Default::default()) {
        Ok(b) => {
            let i = b.device_info();
            let _ = writeln!(
                std::io::stderr(),
                "{test}: wgpu adapter {} ({})",
                i.adapter,
                i.api
            );
            Ok(Some(b))
        }
        Err(e) if std::env::var_os("CI").is_some() => {
            bail!("{test}: CI is set but no GPU backend could be opened: {e}")
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no GPU backend ({e})");
            Ok(None)
        }
    }
}

/// Which halves of the two-device tests run: `VISI_TEST_DEVICES` is `cpu`, `gpu` or
/// `cpu,gpu` (the default, both). CI's second and third driver passes set `gpu`: the CPU
/// backend already ran in the first pass and does not depend on the driver.
pub fn test_devices() -> Result<(bool, bool)> {
    let Some(v) = std::env::var_os("VISI_TEST_DEVICES") else {
        return Ok((true, true));
    };
    let v = v.to_string_lossy().to_string();
    let (mut cpu, mut gpu) = (false, false);
    for d in v.split(',').map(str::trim) {
        match d {
            "cpu" => cpu = true,
            "gpu" => gpu = true,
            _ => bail!("VISI_TEST_DEVICES={v:?}: each entry must be cpu or gpu"),
        }
    }
    ensure!(cpu || gpu, "VISI_TEST_DEVICES={v:?} names no device");
    Ok((cpu, gpu))
}

/// The backends an in-process test `test` runs on: the CPU reference backend and the GPU
/// backend (see [`gpu_backend_or_skip`]), as [`test_devices`] selects.
pub fn test_backends(test: &str) -> Result<Vec<Arc<dyn engine_core::Backend>>> {
    let (cpu, gpu) = test_devices()?;
    let mut v: Vec<Arc<dyn engine_core::Backend>> = Vec::new();
    if cpu {
        v.push(Arc::new(engine_core::CpuBackend::new()));
    }
    if gpu {
        if let Some(g) = gpu_backend_or_skip(test)? {
            v.push(g);
        }
    }
    Ok(v)
}

/// A scratch directory under the system temp dir (`visi-test-<tag>-<pid>`), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty directory.
    pub fn new(tag: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!("visi-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Scratch(d))
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The directory as a string (for command lines).
    pub fn s(&self) -> String {
        self.0.to_string_lossy().to_string()
    }
    /// `rel` inside it, as a string.
    pub fn p(&self, rel: &str) -> String {
        self.0.join(rel).to_string_lossy().to_string()
    }
    /// Writes `text` to `rel` (parent directories made) and returns its path.
    pub fn write(&self, rel: &str, text: &str) -> Result<String> {
        let p = self.0.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, text)?;
        Ok(p.to_string_lossy().to_string())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The devices the binary tests run on: the CPU backend, and `auto` when `<bin> devices
/// --json` lists a wgpu adapter (lavapipe in CI, where a missing adapter is a failure,
/// never a silent skip).
pub fn binary_devices(bin: &Path) -> Result<Vec<&'static str>> {
    let (cpu, gpu) = test_devices()?;
    let mut v = Vec::new();
    if cpu {
        v.push("cpu");
    }
    if !gpu {
        return Ok(v);
    }
    let probe = std::process::Command::new(bin)
        .args(["devices", "--json"])
        .output()
        .context("running visi-cli devices")?;
    let p: Value = serde_json::from_slice(&probe.stdout).unwrap_or(Value::Null);
    if p["adapters"].as_array().is_some_and(|a| !a.is_empty()) {
        v.push("gpu");
        return Ok(v);
    }
    ensure!(
        std::env::var_os("CI").is_none(),
        "CI is set but visi-cli devices lists no adapter"
    );
    eprintln!("SKIP the wgpu half of the binary tests: no adapter");
    Ok(v)
}

/// A `visi-cli` command for a binary test: `bin` (the test's `CARGO_BIN_EXE_visi-cli`),
/// with backtraces on (a panic shows where), and neither `VISI_ADAPTER` nor `CI` from the
/// caller's environment, so a run picks the device its arguments name.
pub fn visi_command(bin: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI");
    c
}

/// Runs `visi-cli` (see [`visi_command`]) with `args` and collects its output.
pub fn run_visi(bin: &Path, args: &[&str]) -> Result<std::process::Output> {
    visi_command(bin)
        .args(args)
        .output()
        .context("running visi-cli")
}

/// The stdout of a `visi-cli` run that must have succeeded (else its exit and stderr).
pub fn success_stdout(out: &std::process::Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Checks a `visi-cli` run against the error contract (exit `code`, empty stdout, one
/// `error:` line on stderr besides `note:` lines, no panic or backtrace); `needles` must all appear in the one error line.
pub fn expect_error(out: &std::process::Output, code: i32, needles: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(code),
        "exit {:?} (want {code}); stderr: {stderr}",
        out.status.code()
    );
    ensure!(
        out.stdout.is_empty(),
        "stdout not empty: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "internal panic"] {
        ensure!(!stderr.contains(bad), "stderr mentions {bad:?}: {stderr}");
    }
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("note:")).collect();
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "stderr is not one error line: {stderr}"
    );
    for n in needles {
        ensure!(stderr.contains(n), "error does not mention {n:?}: {stderr}");
    }
    println!("{}", lines[0]);
    Ok(())
}

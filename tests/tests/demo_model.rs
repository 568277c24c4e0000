//! The trained demo model (`models/demo/visi-shapes-llava`, issue 29) against transformers
//! 4.46 (`tools/make_demo_refs.py` → `tests/fixtures/demo/expected.json`), dense, with the
//! f32 KV cache, on the CPU backend and (when an adapter exists) the GPU backend: the
//! vicuna_v1 prompt and its ids, the greedy tokens from the image file (visi's own decoding
//! and preprocessing) identical, the decoded answer identical, and at every greedy step
//! (teacher-forced with transformers' tokens) transformers' top-5 logits within 1e-3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::Template;
use models::quality::step_logits;
use models::session::{ImageInput, PromptInput};
use pruner::PruneConfig;
use serde_json::Value;
use visi_tests::{first_difference, fixtures};

/// Logits with the f32 KV cache (the bound of tests/tests/reference.rs): the checkpoint is
/// f32 and so is every engine computation on the CPU; GPU kernels sum in other orders.
const TOL_LOGITS: f32 = 1e-3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn u32s(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("expected an array of ids")?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32).context("id"))
        .collect()
}

fn check_backend(backend: Arc<dyn Backend>, label: &str) -> Result<()> {
    let path = fixtures().join("demo").join("expected.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let root = repo_root();
    let model_dir = root.join(doc["model"].as_str().context("model")?);
    let llava = Llava::load(&model_dir, backend).context("loading the demo model")?;
    let cases = doc["cases"].as_array().context("cases")?;
    ensure!(cases.len() >= 5, "expected.json: {} cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let name = c["name"].as_str().unwrap_or("?");
        match check_case(&llava, &root, c) {
            Ok(msg) => println!("[{label}] {name}: ok ({msg})"),
            Err(e) => {
                println!("[{label}] {name}: FAIL {e:#}");
                failures.push(format!("[{label}] {name}: {e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

fn check_case(llava: &Llava, root: &Path, c: &Value) -> Result<String> {
    let question = c["question"].as_str().context("question")?;
    let rendered = Template::VicunaV1.render(question, true)?;
    ensure!(
        rendered == c["prompt"].as_str().context("prompt")?,
        "vicuna_v1 prompt differs: {rendered:?}"
    );
    let prompt = llava.prompt(Template::VicunaV1, question, true)?;
    // transformers' ids with `<image>` expanded to the span.
    let ids = u32s(&c["input_ids"])?;
    let span = u32s(&c["image_span"])?;
    ensure!(span.len() == 2, "image_span");
    let (s, e) = (span[0] as usize, span[1] as usize);
    let mut want_ids = ids[..s].to_vec();
    want_ids.extend(std::iter::repeat_n(ids[s], e - s));
    want_ids.extend_from_slice(&ids[s + 1..]);
    if let Some(d) = first_difference(&prompt.ids, &want_ids) {
        bail!("input ids: {d}");
    }
    let image = root.join(c["image"].as_str().context("image")?);
    let enc = llava.encode_image(&load_image(&image)?, PadMode::Pad)?;
    let opts = GenerateOptions {
        max_new_tokens: u32s(&c["generated_ids"])?.len(),
        prune: Some(PruneConfig::Dense),
        kv_dtype: DType::F32,
        ..Default::default()
    };
    let gen = llava.generate_ids(&prompt, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
    let want = u32s(&c["generated_ids"])?;
    if let Some(d) = first_difference(&gen.tokens, &want) {
        bail!("greedy tokens (f32 KV): {d}");
    }
    let want_text = c["generated_text"].as_str().context("generated_text")?;
    ensure!(
        gen.text.trim() == want_text,
        "answer text: got {:?} want {want_text:?}",
        gen.text
    );
    // Every step's logits, teacher-forced with transformers' tokens.
    let steps = c["steps_top5"].as_array().context("steps_top5")?;
    ensure!(
        steps.len() == want.len(),
        "steps_top5: {} steps",
        steps.len()
    );
    let images = [ImageInput {
        span: prompt.image_span().context("image span")?,
        key: enc.key,
        embeds: enc.embeds.clone(),
    }];
    let mut session = llava.session();
    session.set_kv_dtype(DType::F32);
    let input = PromptInput {
        ids: &prompt.ids,
        images: &images,
    };
    let rows = step_logits(
        &mut session,
        input,
        &PruneConfig::Dense,
        steps.len(),
        Some(&want),
    )?;
    let mut worst = 0f32;
    for (k, (step, logits)) in steps.iter().zip(&rows).enumerate() {
        for pair in step.as_array().context("top5")? {
            let id = pair[0].as_u64().context("id")? as usize;
            let w = pair[1].as_f64().context("logit")? as f32;
            let l = *logits.get(id).context("logits too short")?;
            worst = worst.max((l - w).abs());
            ensure!(
                (l - w).abs() <= TOL_LOGITS,
                "step {k} token {id}: logit {l}, transformers {w}"
            );
        }
    }
    Ok(format!(
        "answer {:?}, {} tokens equal, top-5 logits within {worst:.1e}",
        gen.text.trim(),
        want.len()
    ))
}

#[test]
fn demo_model_matches_transformers_cpu() -> Result<()> {
    check_backend(Arc::new(CpuBackend::new()), "cpu")
}

#[test]
fn demo_model_matches_transformers_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("demo_model_matches_transformers_gpu")? {
        Some(backend) => check_backend(backend, "gpu"),
        None => Ok(()),
    }
}

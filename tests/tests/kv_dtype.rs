//! What the f16 KV cache (the default) costs against transformers, measured on every
//! transformers reference fixture (LLaVA-1.5 `reference/*`, LLaVA-NeXT `reference-next/*`):
//! per case, dense, the max |first-step logit - transformers'| with `--kv-dtype f32` and with
//! f16, and how many greedy tokens stay transformers'. Printed as a table (run with
//! `--nocapture`; the README quotes it). The f32 cache is held to the 1e-3 bound the other
//! reference tests use; the f16 one to `TOL_LOGITS_KV16`, reference.rs' bound. Tokens are
//! reported, not asserted, for f16: a near-tie (tiny-llava-gqa square_crop step 14 is won by
//! 0.0052) may go either way once K and V are rounded.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use engine_core::weights::open_safetensors;
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{EncodedImage, GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::{PromptIds, Template};
use pruner::PruneConfig;
use serde_json::Value;
use visi_tests::{fixtures, references};

const TOL_LOGITS: f32 = 1e-3;
const TOL_LOGITS_KV16: f32 = 0.05;

struct Row {
    what: String,
    d32: f32,
    d16: f32,
    same32: usize,
    same16: usize,
    n: usize,
}

fn max_abs(a: &[f32], b: &[f32]) -> Result<f32> {
    anyhow::ensure!(a.len() == b.len(), "{} logits, want {}", a.len(), b.len());
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max))
}

fn prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn measure(
    llava: &Llava,
    what: String,
    template: Template,
    ids: &PromptIds,
    encoded: &[EncodedImage],
    want_logits: &[f32],
    want_ids: &[u32],
) -> Result<Row> {
    let mut out = Row {
        what,
        d32: 0.0,
        d16: 0.0,
        same32: 0,
        same16: 0,
        n: want_ids.len(),
    };
    for kv in [DType::F32, DType::F16] {
        let opts = GenerateOptions {
            template,
            max_new_tokens: want_ids.len(),
            prune: Some(PruneConfig::Dense),
            keep_first_logits: true,
            kv_dtype: kv,
            ..Default::default()
        };
        let g = llava.generate_ids(ids, encoded, &opts, &mut |_| {})?;
        let d = max_abs(g.first_logits.as_deref().unwrap_or(&[]), want_logits)?;
        let same = prefix(&g.tokens, want_ids);
        if kv == DType::F32 {
            (out.d32, out.same32) = (d, same);
        } else {
            (out.d16, out.same16) = (d, same);
        }
    }
    Ok(out)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// The LLaVA-NeXT and two-image references: `(reference name, model dir, template)`.
const NEXT: [(&str, &str, Template); 5] = [
    (
        "tiny-next-mistral",
        "tiny-next-mistral",
        Template::MistralInstruct,
    ),
    ("tiny-next-llama", "tiny-next-llama", Template::VicunaV1),
    (
        "tiny-llava-mha-two-images",
        "tiny-llava-mha",
        Template::VicunaV1,
    ),
    (
        "tiny-next336-llama",
        "tiny-next336-llama",
        Template::VicunaV1,
    ),
    (
        "tiny-next336-mistral",
        "tiny-next336-mistral",
        Template::MistralInstruct,
    ),
];

/// The NeXT rows; `with_336` false leaves out the 336-pixel fixtures, whose ~1,750- to
/// 2,400-token prompts take ~20 s a prefill on a software GPU adapter (the CPU run, which
/// the README quotes, measures them).
fn next_rows(backend: &Arc<dyn Backend>, rows: &mut Vec<Row>, with_336: bool) -> Result<()> {
    for (refname, model, template) in NEXT {
        if !with_336 && refname.starts_with("tiny-next336") {
            continue;
        }
        let dir = fixtures().join("reference-next").join(refname);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
        let arrays = open_safetensors(&dir.join("arrays.safetensors"))?;
        let llava = Llava::load(&fixtures().join(model), backend.clone())?;
        for (case, c) in v["cases"].as_object().ok_or_else(|| anyhow!("no cases"))? {
            if c.get("refused").is_some() {
                continue;
            }
            let images = c["images"]
                .as_array()
                .context("images")?
                .iter()
                .map(|p| load_image(&fixtures().join(p.as_str().unwrap_or(""))))
                .collect::<Result<Vec<_>, _>>()?;
            let question = match v["question"].as_str() {
                Some(q) => q,
                None if images.len() == 2 => "What differs between these images?",
                None => "What is shown in this image?",
            };
            let counts = images
                .iter()
                .map(|i| llava.image_tokens_for(i.width(), i.height()))
                .collect::<Result<Vec<_>, _>>()?;
            let ids = llava.prompt_images(template, question, &counts)?;
            anyhow::ensure!(
                ids.ids == u32s(&c["input_ids_expanded"]),
                "{refname} {case}: ids"
            );
            let encoded = images
                .iter()
                .map(|i| llava.encode_image(i, PadMode::Crop))
                .collect::<Result<Vec<_>, _>>()?;
            let logits = f32s(arrays.view(&format!("{case}.logits"))?.bytes);
            rows.push(measure(
                &llava,
                format!("{refname} {case}"),
                template,
                &ids,
                &encoded,
                &logits,
                &u32s(&c["generated_ids"]),
            )?);
        }
    }
    Ok(())
}

fn run(backend: Arc<dyn Backend>, label: &str, with_336: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in references()? {
        let llava = Llava::load(&r.model_dir, backend.clone())?;
        for c in &r.cases {
            let ids = llava.prompt(Template::VicunaV1, &c.question, c.image.is_some())?;
            anyhow::ensure!(
                ids.ids == c.input_ids_expanded,
                "{} {}: ids",
                r.name,
                c.name
            );
            let encoded = match &c.image {
                Some(p) => {
                    let mode = PadMode::from_name(c.image_mode.as_deref().unwrap_or("crop"))?;
                    vec![llava.encode_image(&load_image(Path::new(p))?, mode)?]
                }
                None => Vec::new(),
            };
            let (logits, _) = r.array(&c.name, "logits")?;
            rows.push(measure(
                &llava,
                format!("{} {}", r.name, c.name),
                Template::VicunaV1,
                &ids,
                &encoded,
                &logits,
                &c.generated_ids,
            )?);
        }
    }
    next_rows(&backend, &mut rows, with_336)?;
    println!("[{label}] | case | max |Δ logit| f32 KV | f16 KV | greedy tokens kept f32 / f16 |");
    for w in &rows {
        println!(
            "[{label}] | {} | {:.1e} | {:.4} | {}/{} / {}/{} |",
            w.what, w.d32, w.d16, w.same32, w.n, w.same16, w.n
        );
    }
    let max16 = rows.iter().map(|w| w.d16).fold(0f32, f32::max);
    let changed: Vec<&str> = rows
        .iter()
        .filter(|w| w.same16 < w.n)
        .map(|w| w.what.as_str())
        .collect();
    println!(
        "[{label}] {} cases: f16 KV max |Δ logit| {max16:.4}; greedy tokens changed by f16 KV in {:?}",
        rows.len(),
        changed
    );
    for w in &rows {
        anyhow::ensure!(
            w.d32 <= TOL_LOGITS && w.same32 == w.n,
            "{}: f32 KV logits {} / tokens {}/{}",
            w.what,
            w.d32,
            w.same32,
            w.n
        );
        anyhow::ensure!(
            w.d16 <= TOL_LOGITS_KV16,
            "{}: f16 KV logits {}",
            w.what,
            w.d16
        );
    }
    Ok(())
}

#[test]
fn f16_kv_cost_against_transformers_on_cpu() -> Result<()> {
    run(Arc::new(CpuBackend::new()), "cpu", true)
}

#[test]
fn f16_kv_cost_against_transformers_on_gpu() -> Result<()> {
    let Some(b) = visi_tests::gpu_backend_or_skip("f16_kv_cost_against_transformers_on_gpu")?
    else {
        return Ok(());
    };
    run(b, "gpu", false)
}

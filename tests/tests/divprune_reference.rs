//! DivPrune against the authors' selection function (github.com/vbdi/divprune, run by
//! `tools/divprune_ref.py` on the fixtures' tensors; `fixtures/reference/*/divprune.json`):
//! - the selection order over transformers' projector output equals upstream's (the whole
//!   order; up to upstream's first repeated pick where it repeats, see pruner/src/divprune.rs);
//! - through the engine (its own vision tower on transformers' pixel values): the kept image
//!   tokens, the decoder's sequence length, first-step top-5 logits and 16 greedy tokens equal
//!   transformers' LlamaForCausalLM run on the embeddings upstream keeps, on the CPU backend
//!   and (when an adapter exists) the GPU backend. Runs whose selection margin is at float
//!   noise (`engine_check: false`) are left out of this second part.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::Template;
use pruner::{DivPruneConfig, PruneConfig};
use serde_json::Value;
use visi_tests::{first_difference, fixtures, references, Reference};

/// First-step logits of the top-5 tokens with the f32 KV cache (the dense parity bound).
const TOL_LOGITS: f32 = 1e-3;

fn runs(r: &Reference) -> Result<Vec<Value>> {
    let path = fixtures()
        .join("reference")
        .join(&r.name)
        .join("divprune.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    Ok(v["runs"].as_array().context("runs")?.clone())
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|u| u as usize)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn divprune_selection_equals_upstream() -> Result<()> {
    let mut checked = 0;
    for r in references()? {
        for run in runs(&r)? {
            let case = run["case"].as_str().context("case")?;
            let keep = run["prune"]["keep"].as_u64().context("keep")? as usize;
            let want = usizes(&run["selection_order"]);
            let (rows, shape) = r.array(case, "projector_out")?;
            let got = pruner::divprune_order(&rows, shape[1], keep);
            assert_eq!(got.len(), keep, "{} {case} keep {keep}", r.name);
            let upto = run["upstream_first_repeat"]
                .as_u64()
                .map_or(keep, |u| u as usize);
            assert_eq!(
                got[..upto],
                want[..upto],
                "{} {case} keep {keep}: selection order (first {upto} picks)",
                r.name
            );
            println!(
                "{} {case} keep {keep}: order equals upstream's first {upto} picks",
                r.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} runs");
    Ok(())
}

fn check_run(llava: &Llava, r: &Reference, run: &Value) -> Result<String> {
    let case_name = run["case"].as_str().context("case")?;
    let keep = run["prune"]["keep"].as_u64().context("keep")? as usize;
    let case = r
        .cases
        .iter()
        .find(|c| c.name == case_name)
        .context("case not in expected.json")?;
    let path = case.image.as_ref().context("an image case")?;
    let mode = PadMode::from_name(case.image_mode.as_deref().unwrap_or("crop"))?;
    let seen = llava.processor().prepare(&load_image(path)?, mode)?;
    let (data, shape) = r.array(case_name, "pixel_values")?;
    let pv = models::preprocess::PixelValues {
        data,
        height: shape[1],
        width: shape[2],
    };
    let encoded = llava.encode_pixels(seen, pv)?;
    let prompt = llava.prompt(Template::VicunaV1, &case.question, true)?;
    let want_ids: Vec<u32> = usizes(&run["generated_ids"])
        .into_iter()
        .map(|u| u as u32)
        .collect();
    let mut notes = Vec::new();
    for kv in [DType::F32, DType::F16] {
        let opts = GenerateOptions {
            max_new_tokens: want_ids.len(),
            prune: Some(PruneConfig::DivPrune(DivPruneConfig { keep })),
            keep_first_logits: true,
            kv_dtype: kv,
            ..Default::default()
        };
        let g = llava.generate_ids(&prompt, std::slice::from_ref(&encoded), &opts, &mut |_| {})?;
        let kept = g.prune.kept_image_tokens.clone().unwrap_or_default();
        if kept != usizes(&run["kept_image_tokens"]) {
            bail!("kept image tokens differ: got {kept:?}");
        }
        if kept.len() != keep || g.prune.method != "divprune" {
            bail!("{} kept by {}", kept.len(), g.prune.method);
        }
        let seq = run["layer_seq_len"].as_u64().context("layer_seq_len")? as usize;
        if g.layer_seq_lens.iter().any(|&l| l != seq) {
            bail!(
                "layer seq lens {:?}, want {seq} everywhere",
                g.layer_seq_lens
            );
        }
        if kv == DType::F32 {
            let logits = g.first_logits.as_deref().unwrap_or(&[]);
            for pair in run["first_logits_top5"].as_array().context("top5")? {
                let id = pair[0].as_u64().context("id")? as usize;
                let want = pair[1].as_f64().context("logit")? as f32;
                let got = *logits.get(id).context("logits too short")?;
                if (got - want).abs() > TOL_LOGITS {
                    bail!("first-step token {id}: got {got} want {want}");
                }
            }
        }
        if let Some(d) = first_difference(&g.tokens, &want_ids) {
            bail!("{kv:?} KV: greedy tokens: {d}");
        }
        if g.flops.prefill >= g.flops.prefill_dense {
            bail!(
                "FLOPs {} not below dense {}",
                g.flops.prefill,
                g.flops.prefill_dense
            );
        }
        notes.push(format!(
            "{kv:?} KV ok, FLOPs {:.3} of dense",
            g.flops.prefill as f64 / g.flops.prefill_dense as f64
        ));
    }
    Ok(notes.join("; "))
}

/// A budget above the image's tokens fails before any work, naming the method and range.
fn over_budget_is_refused(llava: &Llava, r: &Reference) -> Result<()> {
    let case = r
        .cases
        .iter()
        .find(|c| c.image.is_some())
        .context("an image case")?;
    let (s, e) = case.image_span.context("image span")?;
    let prompt = llava.prompt(Template::VicunaV1, &case.question, true)?;
    let img = load_image(case.image.as_ref().context("image")?)?;
    let encoded = llava.encode_image(&img, PadMode::Crop)?;
    for keep in [e - s + 1, 10_000] {
        let opts = GenerateOptions {
            max_new_tokens: 1,
            prune: Some(PruneConfig::DivPrune(DivPruneConfig { keep })),
            ..Default::default()
        };
        let err =
            match llava.generate_ids(&prompt, std::slice::from_ref(&encoded), &opts, &mut |_| {}) {
                Ok(_) => bail!("{}: keep {keep} of {} image tokens ran", r.name, e - s),
                Err(err) => err.to_string(),
            };
        let range = format!("[1, {}]", e - s);
        if !(err.contains("divprune") && err.contains(&range) && !err.contains('\n')) {
            bail!(
                "{}: keep {keep}: error {err:?} should name divprune and {range}",
                r.name
            );
        }
    }
    Ok(())
}

fn check_backend(backend: Arc<dyn Backend>, label: &str) -> Result<()> {
    let (mut failures, mut n) = (Vec::new(), 0);
    for r in references()? {
        let llava = Llava::load(&r.model_dir, backend.clone())?;
        over_budget_is_refused(&llava, &r)?;
        for run in runs(&r)? {
            if run["engine_check"] != Value::Bool(true) {
                continue;
            }
            n += 1;
            let tag = format!(
                "[{label}] {} {} keep {}",
                r.name, run["case"], run["prune"]["keep"]
            );
            match check_run(&llava, &r, &run) {
                Ok(m) => println!("{tag}: ok ({m})"),
                Err(e) => {
                    println!("{tag}: FAIL {e:#}");
                    failures.push(format!("{tag}: {e:#}"));
                }
            }
        }
    }
    if n < 5 {
        bail!("only {n} engine runs");
    }
    if !failures.is_empty() {
        bail!("{} of {n} failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}

#[test]
fn divprune_engine_cpu() -> Result<()> {
    check_backend(Arc::new(CpuBackend::new()), "cpu")
}

#[test]
fn divprune_engine_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("divprune_engine_gpu")? {
        Some(backend) => check_backend(backend, "gpu"),
        None => Ok(()),
    }
}

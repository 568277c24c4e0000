//! Pruned generation against the reference VisiPruner / FastV implementation
//! (`fixtures/reference/*/pruning.json`, when present): fusion layer, kept image tokens,
//! text-only exit layer, per-layer sequence lengths, first-step top-5 logits and 16 greedy
//! tokens, on the CPU backend and (when an adapter exists) on the GPU backend.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::Template;
use pruner::PruneConfig;
use visi_tests::{references, PruneRun, RefCase, Reference};

/// First-step logits of the top-5 tokens with the f32 KV cache (same bound as the dense
/// parity test).
const TOL_LOGITS: f32 = 1e-3;
/// The same with the default f16 KV cache (bound and reason as in reference.rs: decisions
/// and greedy tokens stay identical, the logits move by the f16 rounding of K and V).
const TOL_LOGITS_KV16: f32 = 0.05;

/// Every run with the f32 KV cache (against the 1e-3 bound) and the f16 one.
fn check_run(llava: &Llava, r: &Reference, run: &PruneRun, case: &RefCase) -> Result<String> {
    let a = check_run_kv(llava, r, run, case, DType::F32, TOL_LOGITS).context("f32 KV")?;
    let b = check_run_kv(llava, r, run, case, DType::F16, TOL_LOGITS_KV16).context("f16 KV")?;
    Ok(format!("f32 KV: {a}; f16 KV: {b}"))
}

fn check_run_kv(
    llava: &Llava,
    r: &Reference,
    run: &PruneRun,
    case: &RefCase,
    kv_dtype: DType,
    tol_logits: f32,
) -> Result<String> {
    let cfg =
        PruneConfig::from_value(&run.prune).map_err(|e| anyhow::anyhow!("prune config: {e}"))?;
    // transformers' own pixel values (ours equal them to f32 rounding, see reference.rs):
    // the decisions sit within 1e-3 of their thresholds.
    let encoded = match &case.image {
        None => None,
        Some(path) => {
            let mode = PadMode::from_name(case.image_mode.as_deref().unwrap_or("crop"))?;
            let seen = llava.processor().prepare(&load_image(path)?, mode)?;
            let (data, shape) = r.array(&case.name, "pixel_values")?;
            let pv = models::preprocess::PixelValues {
                data,
                height: shape[1],
                width: shape[2],
            };
            Some(llava.encode_pixels(seen, pv)?)
        }
    };
    let prompt = llava.prompt(Template::VicunaV1, &case.question, case.image.is_some())?;
    let opts = GenerateOptions {
        max_new_tokens: run.generated_ids.len(),
        prune: Some(cfg),
        keep_first_logits: true,
        kv_dtype,
        ..Default::default()
    };
    let g = llava.generate_ids(&prompt, encoded.as_slice(), &opts, &mut |_| {})?;
    let max = visi_tests::check_prune_outcome(&g, run, tol_logits)?;
    Ok(format!(
        "fusion {:?}, kept {}, exit {:?}, top-5 logit err {max:.1e}, FLOPs {:.3} of dense",
        g.prune.fusion_layer,
        g.prune.kept_image_tokens.as_ref().map_or(0, Vec::len),
        g.prune.text_only_from_layer,
        g.flops.prefill as f64 / g.flops.prefill_dense.max(1) as f64
    ))
}

fn check_backend(backend: Arc<dyn Backend>, label: &str) -> Result<()> {
    let mut failures = Vec::new();
    let mut runs = 0;
    for r in references()? {
        if r.prune_runs.is_empty() {
            println!("[{label}] {}: no pruning.json", r.name);
            continue;
        }
        let llava = Llava::load(&r.model_dir, backend.clone())?;
        for run in &r.prune_runs {
            runs += 1;
            let tag = format!("[{label}] {} {} {}", r.name, run.case, run.name);
            let Some(case) = r.cases.iter().find(|c| c.name == run.case) else {
                failures.push(format!("{tag}: case {} not in expected.json", run.case));
                continue;
            };
            match check_run(&llava, &r, run, case) {
                Ok(m) => println!("{tag}: ok ({m})"),
                Err(e) => {
                    println!("{tag}: FAIL {e:#}");
                    failures.push(format!("{tag}: {e:#}"));
                }
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {runs} pruned run(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[test]
fn pruning_reference_cpu() -> Result<()> {
    check_backend(Arc::new(CpuBackend::new()), "cpu")
}

#[test]
fn pruning_reference_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("pruning_reference_gpu")? {
        Some(backend) => check_backend(backend, "gpu"),
        None => Ok(()),
    }
}

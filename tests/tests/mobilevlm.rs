//! MobileVLM V2 against the authors' own code (issue 23): the tiny fixtures of
//! `tools/make_mobilevlm_fixtures.py` (LDPv2 projector from `vision_projector.py`,
//! `process_images`/`expand2square`, `conv_templates["v1"]`, `tokenizer_image_token`, over
//! transformers' `CLIPVisionModel` and `LlamaForCausalLM`). Both tower layouts (inside the
//! checkpoint, and in the `mm_vision_tower` directory) must give the reference's prompt ids,
//! pixels, projector output, first-step top-5 logits and greedy tokens, on the CPU backend
//! and (when an adapter exists) on the GPU backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::Template;
use pruner::PruneConfig;
use serde_json::Value;
use visi_tests::{compare, first_difference, fixtures};

/// Pillow's bytes, integer preprocessing, one f32 normalisation (as reference.rs).
const TOL_PIXELS: f32 = 1e-5;
const TOL_PROJ_CPU: f32 = 1e-4;
const TOL_PROJ_GPU: f32 = 2e-3;
/// First-step logits with the f32 KV cache (reference.rs's bound).
const TOL_LOGITS: f32 = 1e-3;

const IMAGE_TOKEN_INDEX: i64 = -200;

struct Expected {
    root: Value,
    arrays: Arc<dyn engine_core::weights::WeightSource>,
}

fn expected() -> Result<Expected> {
    let dir = fixtures().join("reference-mobilevlm");
    let text = std::fs::read_to_string(dir.join("expected.json"))?;
    Ok(Expected {
        root: serde_json::from_str(&text)?,
        arrays: engine_core::weights::open_safetensors(&dir.join("arrays.safetensors"))?,
    })
}

impl Expected {
    fn array(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        visi_tests::f32_array(self.arrays.as_ref(), name)
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

fn model_dirs() -> [PathBuf; 2] {
    [
        fixtures().join("tiny-mobilevlm-v2"),
        fixtures().join("tiny-mobilevlm-v2-ext"),
    ]
}

/// Every case on one loaded model; returns the greedy tokens per case.
fn check_model(llava: &Llava, exp: &Expected, tol_proj: f32) -> Result<Vec<Vec<u32>>> {
    let question = exp.root["question"].as_str().unwrap_or_default();
    let mut all = Vec::new();
    let cases = exp.root["cases"].as_object().context("cases")?;
    for (name, c) in cases {
        // The template renders the authors' conv_templates["v1"] prompt text.
        let rendered = Template::VicunaV1.render(question, true)?;
        ensure!(
            rendered == c["prompt"].as_str().unwrap_or_default(),
            "{name}: prompt text differs: {rendered:?}"
        );
        let prompt = llava.prompt(Template::VicunaV1, question, true)?;
        let span = prompt.image_span().context("one image span")?;
        let want_span = ints(&c["image_span"]);
        ensure!(
            [span.start as i64, span.end as i64] == want_span[..],
            "{name}: image span {span:?}, want {want_span:?}"
        );
        // tokenizer_image_token's ids with the -200 placeholder expanded to the span.
        let ids = ints(&c["input_ids"]);
        let s = ids
            .iter()
            .position(|&t| t == IMAGE_TOKEN_INDEX)
            .context("-200")?;
        let mut want: Vec<u32> = ids[..s].iter().map(|&t| t as u32).collect();
        want.extend(std::iter::repeat_n(
            prompt.ids[span.start],
            span.end - span.start,
        ));
        want.extend(ids[s + 1..].iter().map(|&t| t as u32));
        if let Some(d) = first_difference(&prompt.ids, &want) {
            bail!("{name}: prompt ids: {d}");
        }
        let image = fixtures().join(c["image"].as_str().unwrap_or_default());
        let enc = llava.encode_image(&load_image(&image)?, PadMode::Pad)?;
        let (px, shape) = exp.array(&format!("{name}.pixel_values"))?;
        compare(
            "pixel_values",
            &enc.pixel_values.data,
            &px,
            shape[2],
            TOL_PIXELS,
        )
        .with_context(|| name.clone())?;
        let (proj, shape) = exp.array(&format!("{name}.projector_out"))?;
        let got = llava.backend().to_vec_f32(&enc.embeds)?;
        let e = compare("projector_out", &got, &proj, shape[1], tol_proj)
            .with_context(|| name.clone())?;
        let opts = GenerateOptions {
            max_new_tokens: exp.root["max_new_tokens"].as_u64().unwrap_or(16) as usize,
            prune: Some(PruneConfig::Dense),
            keep_first_logits: true,
            kv_dtype: DType::F32,
            ..Default::default()
        };
        let g = llava.generate_ids(&prompt, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
        let logits = g.first_logits.as_deref().context("first logits")?;
        for (k, t) in c["first_logits_top5"]
            .as_array()
            .context("top5")?
            .iter()
            .enumerate()
        {
            let (id, v) = (
                t[0].as_u64().unwrap_or(0) as usize,
                t[1].as_f64().unwrap_or(0.0),
            );
            let got = logits[id];
            ensure!(
                (got as f64 - v).abs() <= TOL_LOGITS as f64,
                "{name}: top-5 #{k} (token {id}): logit {got} want {v}"
            );
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let want_top: Vec<u32> = c["first_logits_top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[0].as_u64().unwrap_or(0) as u32)
            .collect();
        let got_top: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        if let Some(d) = first_difference(&got_top, &want_top) {
            bail!("{name}: top-5 order: {d}");
        }
        let want_gen: Vec<u32> = ints(&c["generated_ids"])
            .iter()
            .map(|&t| t as u32)
            .collect();
        if let Some(d) = first_difference(&g.tokens, &want_gen) {
            bail!("{name}: greedy tokens: {d}");
        }
        println!(
            "{name}: ok (projector {e:.1e}, {} tokens equal)",
            g.tokens.len()
        );
        all.push(g.tokens);
    }
    Ok(all)
}

fn check_backend(backend: Arc<dyn Backend>, tol_proj: f32) -> Result<()> {
    let exp = expected()?;
    let mut answers = Vec::new();
    for dir in model_dirs() {
        let llava = Llava::load(&dir, backend.clone())
            .with_context(|| format!("loading {}", dir.display()))?;
        ensure!(llava.config().image_tokens() == 144);
        answers
            .push(check_model(&llava, &exp, tol_proj).with_context(|| dir.display().to_string())?);
    }
    ensure!(
        answers[0] == answers[1],
        "the two tower layouts answer differently"
    );
    Ok(())
}

#[test]
fn mobilevlm_reference_cpu() -> Result<()> {
    check_backend(Arc::new(CpuBackend::new()), TOL_PROJ_CPU)
}

#[test]
fn mobilevlm_reference_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("mobilevlm_reference_gpu")? {
        Some(backend) => check_backend(backend, TOL_PROJ_GPU),
        None => Ok(()),
    }
}

/// Pruned runs (`reference-mobilevlm/pruning.json`, tools/mobilevlm_pruning_ref.py: the
/// VisiPruner / FastV reference loop of tools/visipruner_ref.py over the authors'
/// embeddings): fusion layer, kept image tokens, text-only exit, per-layer sequence lengths,
/// first-step top-5 logits (f32 KV) and 16 greedy tokens.
fn check_pruning(backend: Arc<dyn Backend>) -> Result<()> {
    let exp = expected()?;
    let runs = visi_tests::load_prune_runs(&fixtures().join("reference-mobilevlm/pruning.json"))?;
    ensure!(runs.len() >= 8, "pruning.json holds {} runs", runs.len());
    let llava = Llava::load(&fixtures().join("tiny-mobilevlm-v2"), backend)?;
    let question = exp.root["question"].as_str().unwrap_or_default();
    let prompt = llava.prompt(Template::VicunaV1, question, true)?;
    let mut failures = Vec::new();
    for run in &runs {
        let tag = format!("{} {}", run.case, run.name);
        let res = (|| -> Result<String> {
            let c = &exp.root["cases"][&run.case];
            let image = fixtures().join(c["image"].as_str().unwrap_or_default());
            let seen = llava
                .processor()
                .prepare(&load_image(&image)?, PadMode::Pad)?;
            let (data, shape) = exp.array(&format!("{}.pixel_values", run.case))?;
            let pv = models::preprocess::PixelValues {
                data,
                height: shape[1],
                width: shape[2],
            };
            let enc = llava.encode_pixels(seen, pv)?;
            let cfg = PruneConfig::from_value(&run.prune)
                .map_err(|e| anyhow::anyhow!("prune config: {e}"))?;
            let opts = GenerateOptions {
                max_new_tokens: run.generated_ids.len(),
                prune: Some(cfg),
                keep_first_logits: true,
                kv_dtype: DType::F32,
                ..Default::default()
            };
            let g = llava.generate_ids(&prompt, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
            visi_tests::check_prune_outcome(&g, run, TOL_LOGITS)?;
            Ok(format!("lens {:?}", g.layer_seq_lens))
        })();
        match res {
            Ok(m) => println!("{tag}: ok ({m})"),
            Err(e) => failures.push(format!("{tag}: {e:#}")),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn mobilevlm_pruning_cpu() -> Result<()> {
    check_pruning(Arc::new(CpuBackend::new()))
}

#[test]
fn mobilevlm_pruning_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("mobilevlm_pruning_gpu")? {
        Some(backend) => check_pruning(backend),
        None => Ok(()),
    }
}

/// Copies a fixture model directory (tokenizer files resolved) into `dst`.
fn copy_model(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap()))?;
    }
    Ok(())
}

fn set_tower(dir: &Path, spec: &str) -> Result<()> {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    cfg["mm_vision_tower"] = Value::String(spec.into());
    std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

#[test]
fn mobilevlm_tower_resolution() -> Result<()> {
    let scratch = visi_tests::Scratch::new("mobilevlm-tower")?;
    let ext = scratch.path().join("ext");
    copy_model(&fixtures().join("tiny-mobilevlm-v2-ext"), &ext)?;
    set_tower(&ext, "no-such/tower-dir")?;
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    // Neither the config's tower nor an override: refused, naming both.
    let err = match Llava::load(&ext, cpu.clone()) {
        Ok(_) => bail!("a MobileVLM without its tower loaded"),
        Err(e) => e.to_string(),
    };
    for needle in [
        "mm_vision_tower",
        "no-such/tower-dir",
        "--vision-tower",
        "weights",
    ] {
        ensure!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
    // --vision-tower DIR supplies it.
    let tower = fixtures().join("tiny-mobilevlm-clip");
    let llava = Llava::load_with_tower(&ext, cpu.clone(), None, None, Some(&tower))?;
    let p = llava.prompt(Template::VicunaV1, "Hi", true)?;
    ensure!(p.image_span().map(|s| s.end - s.start) == Some(144));
    // A bad override is an error naming it, not a silent fallback.
    let bad = scratch.path().join("nope");
    let err = match Llava::load_with_tower(&ext, cpu.clone(), None, None, Some(&bad)) {
        Ok(_) => bail!("a missing --vision-tower was accepted"),
        Err(e) => e.to_string(),
    };
    ensure!(
        err.contains("nope") && err.contains("--vision-tower"),
        "{err}"
    );
    // An absolute mm_vision_tower works too.
    set_tower(&ext, &tower.to_string_lossy())?;
    Llava::load(&ext, cpu)?;
    Ok(())
}

/// The one manifest (`synthetic::tensor_shapes`, read by `info`'s checks) covers both
/// layouts: LDPv2 names and shapes, the tower inside or in its own directory.
#[test]
fn mobilevlm_manifest_checks_both_layouts() -> Result<()> {
    for dir in model_dirs() {
        let cfg = models::LlavaConfig::from_file(&dir.join("config.json"))?;
        let src = engine_core::weights::open_safetensors(&dir)?;
        models::checks::check_layers(&cfg, src.as_ref(), "num_hidden_layers")?;
        models::checks::check_shapes(&cfg, src.as_ref())
            .with_context(|| dir.display().to_string())?;
        let names: Vec<String> = models::synthetic::tensor_shapes(&cfg)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        ensure!(names.iter().any(|n| n == "mm_projector.peg.peg.0.weight"));
        ensure!(!names.iter().any(|n| n.starts_with("multi_modal_projector")));
    }
    Ok(())
}

//! End-to-end parity with transformers on every reference fixture, run dense: pixel values,
//! vision features, projector outputs, first-step logits and 16 greedy tokens, on the CPU
//! backend and (when an adapter exists) on the GPU backend.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::{load_image, PadMode};
use models::prompt::Template;
use pruner::PruneConfig;
use visi_tests::{compare, first_difference, references};

/// Decoding gives Pillow's bytes (PNG and JPEG alike: the JPEG decoder is libjpeg-turbo's, as
/// in Pillow), then preprocessing is integer arithmetic and one f32 normalisation, as
/// transformers does it: the pixel values match to rounding.
const TOL_PIXELS: f32 = 1e-5;
/// Vision tower and projector from f16/bf16 weights vs torch f32 (eager): the CPU backend
/// computes in f32 (measured <= 1e-5); GPU kernels may use other summation orders and f16
/// arithmetic where the adapter has it.
const TOL_FEATURES_CPU: f32 = 1e-4;
const TOL_FEATURES_GPU: f32 = 2e-3;
/// First-step logits with the f32 KV cache (the brief's bound).
const TOL_LOGITS: f32 = 1e-3;
/// First-step logits with the f16 KV cache (the default): K and V rounded to f16 (relative
/// error 2^-11) before attention; scores, softmax and P·V stay f32. The logits move by the
/// error printed per case (measured on these fixtures, CPU and lavapipe: 0.005 to 0.039 max
/// abs, on logits of magnitude up to ~12), bounded here. Bit-exactness with transformers is
/// the f32 cache's promise (all tokens above); the f16 cache's greedy tokens must equal
/// transformers' up to the first step won by less than twice this bound (two logits each
/// off by up to the bound can swap there): since issue 27's regenerated references,
/// tiny-llava-gqa square_crop's step 14 (margin 0.0052) goes the other way with f16 K/V.
const TOL_LOGITS_KV16: f32 = 0.05;

fn check_backend(backend: Arc<dyn Backend>, label: &str, tol_features: f32) -> Result<()> {
    let mut failures = Vec::new();
    for r in references()? {
        let llava = Llava::load(&r.model_dir, backend.clone())
            .with_context(|| format!("loading {}", r.name))?;
        for c in &r.cases {
            let tag = format!("[{label}] {} {}", r.name, c.name);
            match check_case(&llava, &r, c, tol_features) {
                Ok(msg) => println!("{tag}: ok ({msg})"),
                Err(e) => {
                    println!("{tag}: FAIL {e:#}");
                    failures.push(format!("{tag}: {e:#}"));
                }
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

fn check_case(
    llava: &Llava,
    r: &visi_tests::Reference,
    c: &visi_tests::RefCase,
    tol_features: f32,
) -> Result<String> {
    // The vicuna_v1 template reproduces the reference prompt and its ids, BOS included.
    let rendered = Template::VicunaV1.render(&c.question, c.image.is_some())?;
    if rendered != c.prompt {
        bail!(
            "vicuna_v1 prompt differs:\n got {rendered:?}\nwant {:?}",
            c.prompt
        );
    }
    let prompt = llava.prompt(Template::VicunaV1, &c.question, c.image.is_some())?;
    if let Some(d) = first_difference(&prompt.ids, &c.input_ids_expanded) {
        bail!("input ids: {d}");
    }
    let span = prompt.image_span().map(|s| (s.start, s.end));
    if span != c.image_span {
        bail!("image span: got {span:?} want {:?}", c.image_span);
    }
    let mut notes = Vec::new();
    let mut from_file_image = None;
    let encoded = match &c.image {
        None => None,
        Some(path) => {
            let mode = PadMode::from_name(c.image_mode.as_deref().unwrap_or("crop"))?;
            let from_file = llava.encode_image(&load_image(path)?, mode)?;
            let b = llava.backend();
            let (want_px, shape) = r.array(&c.name, "pixel_values")?;
            let cols = shape[shape.len() - 1];
            let e = compare(
                "pixel_values",
                &from_file.pixel_values.data,
                &want_px,
                cols,
                TOL_PIXELS,
            )?;
            notes.push(format!("pixels {e:.1e}"));
            // The engine proper is checked from transformers' own pixel values, so a
            // preprocessing error cannot hide or fake a numerical error in the model.
            let pv = models::preprocess::PixelValues {
                data: want_px,
                height: shape[1],
                width: shape[2],
            };
            let enc = llava.encode_pixels(from_file.seen.clone(), pv)?;
            let (want, shape) = r.array(&c.name, "vision_features")?;
            let got = b.to_vec_f32(&enc.features)?;
            let e = compare("vision_features", &got, &want, shape[1], tol_features)?;
            notes.push(format!("features {e:.1e}"));
            let (want, shape) = r.array(&c.name, "projector_out")?;
            let got = b.to_vec_f32(&enc.embeds)?;
            let e = compare("projector_out", &got, &want, shape[1], tol_features)?;
            notes.push(format!("projector {e:.1e}"));
            from_file_image = Some(from_file);
            Some(enc)
        }
    };
    let opts = GenerateOptions {
        max_new_tokens: r.max_new_tokens,
        prune: Some(PruneConfig::Dense),
        keep_first_logits: true,
        ..Default::default()
    };
    let (want, _) = r.array(&c.name, "logits")?;
    // The f32 KV cache against the f32 bound; the default f16 cache below.
    let opts32 = GenerateOptions {
        kv_dtype: DType::F32,
        ..opts.clone()
    };
    let g32 = llava.generate_ids(&prompt, encoded.as_slice(), &opts32, &mut |_| {})?;
    let got = g32.first_logits.as_deref().unwrap_or(&[]);
    let e = compare(
        "first-step logits (f32 KV)",
        got,
        &want,
        want.len(),
        TOL_LOGITS,
    )?;
    notes.push(format!("logits {e:.1e}"));
    if let Some(d) = first_difference(&g32.tokens, &c.generated_ids) {
        bail!("greedy tokens (f32 KV): {d}");
    }
    let mut streamed = String::new();
    let gen = llava.generate_ids(&prompt, encoded.as_slice(), &opts, &mut |t| {
        streamed.push_str(t)
    })?;
    let got = gen.first_logits.as_deref().unwrap_or(&[]);
    let e = compare(
        "first-step logits (f16 KV)",
        got,
        &want,
        want.len(),
        TOL_LOGITS_KV16,
    )?;
    notes.push(format!("logits f16 KV {e:.1e}"));
    let clear = c
        .step_margins
        .iter()
        .position(|&m| m < 2.0 * TOL_LOGITS_KV16)
        .unwrap_or(c.generated_ids.len());
    let n = clear.min(gen.tokens.len());
    if let Some(d) = first_difference(&gen.tokens[..n], &c.generated_ids[..clear]) {
        bail!("greedy tokens (f16 KV, the first {clear}): {d}");
    }
    notes.push(format!(
        "f16 KV tokens {}",
        if gen.tokens == c.generated_ids {
            "all equal".to_string()
        } else {
            format!("{clear} compared, equal; differ later")
        }
    ));
    if gen.tokens == c.generated_ids && gen.text != c.generated_text {
        bail!(
            "decoded text: got {:?} want {:?}",
            gen.text,
            c.generated_text
        );
    }
    if streamed != gen.text {
        bail!(
            "streamed text {streamed:?} differs from the final text {:?}",
            gen.text
        );
    }
    // And the whole path from the image file (our decoder) gives the same greedy tokens.
    if let Some(ff) = &from_file_image {
        let g2 = llava.generate_ids(&prompt, std::slice::from_ref(ff), &opts, &mut |_| {})?;
        // (Same pixels as transformers' above, so exactly the f16 run's tokens.)
        if let Some(d) = first_difference(&g2.tokens, &gen.tokens) {
            bail!("greedy tokens from the image file: {d}");
        }
    }
    notes.push(format!(
        "vision {:.0} ms, prefill {:.0} ms, decode {:.1} tok/s",
        gen.timings.vision_ms, gen.timings.prefill_ms, gen.decode_tokens_per_s
    ));
    Ok(notes.join(", "))
}

#[test]
fn reference_parity_cpu() -> Result<()> {
    check_backend(Arc::new(CpuBackend::new()), "cpu", TOL_FEATURES_CPU)
}

#[test]
fn reference_parity_gpu() -> Result<()> {
    match visi_tests::gpu_backend_or_skip("reference_parity_gpu")? {
        Some(backend) => check_backend(backend, "gpu", TOL_FEATURES_GPU),
        None => Ok(()),
    }
}

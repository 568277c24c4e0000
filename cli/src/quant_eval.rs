//! `visi-cli quant-eval`: what each weight format costs in quality. The checkpoint as stored
//! (f16 for llava-hf) is the baseline; every format is loaded quantized from the same files
//! and compared on the same prompt and image: first-step logit error, teacher-forced greedy
//! agreement and the free-running common prefix, plus how much of the weights the format
//! actually covers (matrices whose rows are not whole blocks stay as stored).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::anyhow;
use engine_core::{Backend, CpuBackend, QuantType};
use models::quality::{common_prefix, compare_logits, greedy_tokens};
use models::{Llava, PadMode, Template};
use pruner::PruneConfig;
use serde_json::{json, Value};

use crate::errors::{bad_input, classify, human_bytes, internal, Failure};

/// Arguments of `visi-cli quant-eval`.
#[derive(clap::Args)]
pub struct QuantEvalArgs {
    /// llava-hf model directory, or a repo id in the local Hugging Face cache.
    #[arg(long)]
    model: String,
    /// Image file; without it the prompt is text only.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The question (Vicuna v1 template).
    #[arg(long, default_value = "Describe the image in detail.")]
    prompt: String,
    /// Formats to compare with the stored weights, comma-separated.
    #[arg(long, default_value = "q8_0,q4_0,q4_1,q4_k")]
    formats: String,
    /// Positions compared (the first token plus decode steps).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Pruning config as JSON (default: dense, so only the weights differ).
    #[arg(long)]
    prune: Option<String>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the comparison and prints it.
pub fn quant_eval(a: QuantEvalArgs) -> Result<(), Failure> {
    let formats = parse_formats(&a.formats).map_err(bad_input)?;
    if a.steps == 0 {
        return Err(bad_input(anyhow!("--steps must be at least 1")));
    }
    let prune = match &a.prune {
        Some(t) => PruneConfig::from_json(t).map_err(|e| bad_input(anyhow!("--prune: {e}")))?,
        None => PruneConfig::Dense,
    };
    let dir =
        models::hub::resolve_model(&a.model).map_err(|e| bad_input(anyhow!("--model: {e}")))?;
    let image = match &a.image {
        Some(p) => Some(models::preprocess::load_image(p).map_err(|e| bad_input(e.into()))?),
        None => None,
    };
    // Quantized kernels: the CPU backend (dequantise-in-the-loop, f32 accumulation); the
    // baseline runs there too so that only the weights differ.
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let info = crate::info::report(&dir, crate::info::InfoDevice::Cpu)?;

    let run = |quant: Option<QuantType>, forced: Option<&[u32]>| {
        let llava = Llava::load_quantized(&dir, backend.clone(), None, quant).map_err(classify)?;
        let prompt = llava
            .prompt(Template::VicunaV1, &a.prompt, image.is_some())
            .map_err(|e| bad_input(e.into()))?;
        let encoded = image
            .as_ref()
            .map(|img| llava.encode_image(img, PadMode::Crop))
            .transpose()
            .map_err(classify)?;
        let rows = llava
            .step_logits(&prompt, encoded.as_ref(), &prune, a.steps, forced)
            .map_err(classify)?;
        Ok::<_, Failure>((rows, llava))
    };

    let (base, llava) = run(None, None)?;
    let base_tokens = greedy_tokens(&base);
    let mut results = Vec::new();
    for &q in &formats {
        let (forced_rows, _) = run(Some(q), Some(&base_tokens))?;
        let c = compare_logits(&base, &forced_rows).map_err(classify)?;
        let (free_rows, _) = run(Some(q), None)?;
        let free = greedy_tokens(&free_rows);
        let bytes = info["memory"]["weights_bytes_quantized"][q.name()]
            .as_u64()
            .unwrap_or(0);
        results.push(json!({
            "format": q.name(),
            "weights_bytes": bytes,
            "params_quantized": quantized_fraction(&info, q),
            "first_max_abs": c.first_max_abs,
            "first_rel_rms": c.first_rel_rms,
            "mean_rel_rms": c.mean_rel_rms,
            "greedy_agree": c.greedy_agree,
            "steps": c.steps,
            "free_common_prefix": common_prefix(&base_tokens, &free),
            "tokens": free,
        }));
    }
    let dev = llava.device_info();
    let v = json!({
        "model_dir": dir.display().to_string(),
        "device": { "backend": dev.backend, "adapter": dev.adapter },
        "prompt": a.prompt,
        "image": a.image.as_ref().map(|p| p.display().to_string()),
        "steps": a.steps,
        "prune": prune.to_json(),
        "baseline": {
            "format": "as stored",
            "weights_bytes": info["memory"]["weights_bytes"],
            "tokens": base_tokens,
        },
        "formats": results,
    });
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&v).map_err(|e| internal(e.into()))?
        );
    } else {
        print!("{}", table(&v));
    }
    Ok(())
}

fn parse_formats(s: &str) -> anyhow::Result<Vec<QuantType>> {
    let mut out = Vec::new();
    for f in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let q = QuantType::parse(f).ok_or_else(|| {
            anyhow!("--formats: unknown format {f:?} (expected q8_0, q4_0, q4_1 or q4_k)")
        })?;
        if !out.contains(&q) {
            out.push(q);
        }
    }
    if out.is_empty() {
        return Err(anyhow!("--formats: no format given"));
    }
    Ok(out)
}

/// Fraction of the checkpoint's parameters held in format `q` (from `info`'s per-tensor
/// accounting).
fn quantized_fraction(info: &Value, q: QuantType) -> f64 {
    let total = info["parameters"]["total"].as_u64().unwrap_or(0);
    let quantized = info["memory"]["params_quantized"][q.name()]
        .as_u64()
        .unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        quantized as f64 / total as f64
    }
}

fn table(v: &Value) -> String {
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let mut s = format!(
        "model     {}\ndevice    {}\nbaseline  weights as stored, {}; {} steps, greedy tokens {}\n\n",
        v["model_dir"].as_str().unwrap_or(""),
        v["device"]["adapter"].as_str().unwrap_or("?"),
        human_bytes(n(&v["baseline"]["weights_bytes"])),
        n(&v["steps"]),
        v["baseline"]["tokens"],
    );
    s += "format  weights    params in format  first max|err|  first rel rms  mean rel rms  greedy agree  same prefix\n";
    for r in v["formats"].as_array().into_iter().flatten() {
        s += &format!(
            "{:<7} {:>9}  {:>15.1}%  {:>14.4}  {:>13.4}  {:>12.4}  {:>6}/{:<5}  {:>6}/{}\n",
            r["format"].as_str().unwrap_or("?"),
            human_bytes(n(&r["weights_bytes"])),
            100.0 * f(&r["params_quantized"]),
            f(&r["first_max_abs"]),
            f(&r["first_rel_rms"]),
            f(&r["mean_rel_rms"]),
            n(&r["greedy_agree"]),
            n(&r["steps"]),
            n(&r["free_common_prefix"]),
            n(&r["steps"]),
        );
    }
    s
}

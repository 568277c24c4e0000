//! `visi-cli quant-eval`: what each weight format costs in quality. The checkpoint as stored
//! (f16 for llava-hf) is the baseline; every format is loaded quantized from the same files
//! and compared on the same prompt and image: first-step logit error, teacher-forced greedy
//! agreement and the free-running common prefix, plus how much of the weights the format
//! actually covers (matrices whose rows are not whole blocks stay as stored).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::anyhow;
use engine_core::{Backend, HostData, QuantType};
use image::RgbImage;
use models::llama::ImageSpan;
use models::quality::{common_prefix, compare_logits, greedy_tokens, step_logits};
use models::session::{ImageInput, PromptInput, Session};
use models::synthetic::{SyntheticLlava, SyntheticShape};
use models::{Llava, PadMode, Template};
use pruner::PruneConfig;
use serde_json::{json, Value};

use crate::bench::{synthetic_ids, synthetic_pixels, DEFAULT_PROMPT_LEN, PREFIX_TOKENS};
use crate::errors::{bad_input, classify, human_bytes, internal, Failure};
use crate::DeviceArg;

/// Arguments of `visi-cli quant-eval`.
#[derive(clap::Args)]
pub struct QuantEvalArgs {
    /// llava-hf model directory, a repo id in the local Hugging Face cache, or a GGUF text
    /// model (with --mmproj).
    #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
    model: Option<String>,
    /// The mmproj file of a GGUF pair.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// A synthetic LLaVA (tiny, llava-1b, llava-7b) with seeded f16 weights instead: the
    /// prompt is the bench's seeded 640-token one with seeded pixels.
    #[arg(long)]
    shape: Option<String>,
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
    /// Backend for every run (the baseline and each format run on the same one).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What to evaluate.
enum Source {
    Dir(PathBuf),
    Pair(PathBuf, PathBuf),
    Shape(SyntheticShape),
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
    let source = match (&a.model, &a.shape, &a.mmproj) {
        (Some(m), None, Some(mm)) if m.ends_with(".gguf") => {
            Source::Pair(PathBuf::from(m), mm.clone())
        }
        (Some(m), None, None) if m.ends_with(".gguf") => {
            return Err(bad_input(anyhow!(
                "--model {m}: a GGUF text model needs its --mmproj file"
            )))
        }
        (Some(_), None, Some(_)) => {
            return Err(bad_input(anyhow!(
                "--mmproj needs a GGUF text model as --model"
            )))
        }
        (Some(m), None, None) => Source::Dir(
            models::hub::resolve_model(m).map_err(|e| bad_input(anyhow!("--model: {e}")))?,
        ),
        (None, Some(s), None) => {
            Source::Shape(SyntheticShape::parse(s).map_err(|e| bad_input(anyhow!("--shape: {e}")))?)
        }
        _ => {
            return Err(bad_input(anyhow!(
                "give --model (with --mmproj for a GGUF pair) or --shape"
            )))
        }
    };
    // Files and the pruning config against the model's depth, before anything loads.
    if let Source::Pair(t, mm) = &source {
        crate::validate::input_file("--model", t)?;
        crate::validate::input_file("--mmproj", mm)?;
    }
    if let Some(p) = &a.image {
        crate::validate::input_file("--image", p)?;
    }
    let layers = match &source {
        Source::Dir(d) => {
            models::LlavaConfig::from_file(&d.join("config.json"))
                .map_err(classify)?
                .text
                .num_hidden_layers
        }
        Source::Shape(s) => s.config().map_err(classify)?.text.num_hidden_layers,
        Source::Pair(t, _) => {
            let f = engine_core::gguf::GgufFile::open(t).map_err(classify)?;
            models::gguf::text_config(&f)
                .map_err(classify)?
                .num_hidden_layers
        }
    };
    prune
        .validate(layers)
        .map_err(|e| bad_input(anyhow!("--prune on this {layers}-layer model: {e}")))?;
    let image = match &a.image {
        Some(_) if matches!(source, Source::Shape(_)) => {
            return Err(bad_input(anyhow!(
                "--image: synthetic shapes use seeded pixels"
            )))
        }
        Some(p) => Some(models::preprocess::load_image(p).map_err(|e| bad_input(e.into()))?),
        None => None,
    };
    let backend = crate::open_backend(a.device)?;
    crate::errors::release_notes();
    let info = match &source {
        Source::Dir(d) => Some(crate::info::report(
            d,
            crate::info::InfoDevice::Cpu,
            engine_core::DType::F16,
        )?),
        Source::Shape(s) => Some(crate::info::shape_report(
            *s,
            crate::info::InfoDevice::Cpu,
            engine_core::DType::F16,
        )?),
        Source::Pair(..) => None,
    };
    let input = (a.prompt.as_str(), image.as_ref());
    let rows =
        |m: &Loaded, forced: Option<&[u32]>| step_rows(m, &backend, input, &prune, a.steps, forced);

    let base = rows(&load(&source, &backend, None, a.steps)?, None)?;
    let base_tokens = greedy_tokens(&base);
    let mut results = Vec::new();
    for &q in &formats {
        let m = load(&source, &backend, Some(q), a.steps)?;
        let forced_rows = rows(&m, Some(&base_tokens))?;
        let c = compare_logits(&base, &forced_rows).map_err(classify)?;
        let free_rows = rows(&m, None)?;
        drop(m);
        let free = greedy_tokens(&free_rows);
        let bytes = info
            .as_ref()
            .map(|i| i["memory"]["weights_bytes_quantized"][q.name()].clone());
        results.push(json!({
            "format": q.name(),
            "weights_bytes": bytes,
            "params_quantized": info.as_ref().map(|i| quantized_fraction(i, q)),
            "first_max_abs": c.first_max_abs,
            "first_rel_rms": c.first_rel_rms,
            "mean_rel_rms": c.mean_rel_rms,
            "greedy_agree": c.greedy_agree,
            "steps": c.steps,
            "free_common_prefix": common_prefix(&base_tokens, &free),
            "tokens": free,
        }));
    }
    let dev = backend.device_info();
    let label = match &source {
        Source::Dir(d) => d.display().to_string(),
        Source::Pair(t, m) => format!("{} + {}", t.display(), m.display()),
        Source::Shape(s) => format!("synthetic {} (seed 0)", s.name()),
    };
    let v = json!({
        "model": label,
        "device": { "backend": dev.backend, "adapter": dev.adapter },
        "prompt": a.prompt,
        "image": a.image.as_ref().map(|p| p.display().to_string()),
        "steps": a.steps,
        "prune": prune.to_json(),
        "baseline": {
            "format": "as stored",
            "weights_bytes": info.as_ref().map(|i| i["memory"]["weights_bytes"].clone()),
            "tokens": base_tokens,
        },
        "formats": results,
    });
    if a.json {
        crate::validate::println_stdout(&serde_json::to_string(&v).map_err(|e| internal(e.into()))?)
    } else {
        crate::validate::print_stdout(&table(&v))
    }
}

/// One load of the model, ready to produce step logits.
enum Loaded {
    Llava(Box<Llava>),
    /// The synthetic model and its prompt embeddings `[S, H]` with the image span.
    Synth(Box<SyntheticLlava>, Vec<u32>, ImageInput),
}

/// Loads `source` with `quant` (None: as stored).
fn load(
    source: &Source,
    backend: &Arc<dyn Backend>,
    quant: Option<QuantType>,
    steps: usize,
) -> Result<Loaded, Failure> {
    let llava = match source {
        Source::Dir(d) => Llava::load_quantized(d, backend.clone(), None, quant),
        Source::Pair(t, m) => Llava::load_gguf(t, m, backend.clone(), None, quant),
        Source::Shape(shape) => {
            let m = SyntheticLlava::load_quantized(*shape, 0, backend.clone(), quant)
                .map_err(classify)?;
            let b = backend.as_ref();
            let cfg = &m.cfg;
            let n_img = crate::bench::bench_image_tokens(cfg);
            let len = DEFAULT_PROMPT_LEN
                .max(PREFIX_TOKENS + n_img + 1)
                .min(cfg.text.max_position_embeddings - steps);
            let ids = synthetic_ids(cfg, len, 0);
            let s = cfg.vision.image_size;
            let pixels = b
                .upload(HostData::F32(&synthetic_pixels(s, 0)), vec![3, s, s].into())
                .map_err(classify)?;
            let embeds = m.encode(b, &pixels).map_err(classify)?; // [N, H]
            let image = ImageInput {
                span: ImageSpan {
                    start: PREFIX_TOKENS,
                    end: PREFIX_TOKENS + n_img,
                },
                key: 0,
                embeds,
            };
            return Ok(Loaded::Synth(Box::new(m), ids, image));
        }
    }
    .map_err(classify)?;
    Ok(Loaded::Llava(Box::new(llava)))
}

/// Step logits of a loaded model (greedy, or teacher-forced on `forced`).
fn step_rows(
    loaded: &Loaded,
    backend: &Arc<dyn Backend>,
    input: (&str, Option<&RgbImage>),
    prune: &PruneConfig,
    steps: usize,
    forced: Option<&[u32]>,
) -> Result<Vec<Vec<f32>>, Failure> {
    match loaded {
        Loaded::Synth(m, ids, image) => step_logits(
            &mut Session::new(m.llama.clone(), backend.clone()),
            PromptInput {
                ids,
                images: std::slice::from_ref(image),
            },
            prune,
            steps,
            forced,
        )
        .map_err(classify),
        Loaded::Llava(llava) => {
            let (prompt, image) = input;
            let ids = llava
                .prompt(Template::VicunaV1, prompt, image.is_some())
                .map_err(|e| bad_input(e.into()))?;
            let encoded = image
                .map(|img| llava.encode_image(img, PadMode::Crop))
                .transpose()
                .map_err(classify)?;
            llava
                .step_logits(&ids, encoded.as_slice(), prune, steps, forced)
                .map_err(classify)
        }
    }
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
        "model     {}\ndevice    {}\nbaseline  weights as stored{}; {} steps, greedy tokens {}\n\n",
        v["model"].as_str().unwrap_or(""),
        v["device"]["adapter"].as_str().unwrap_or("?"),
        v["baseline"]["weights_bytes"]
            .as_u64()
            .map_or(String::new(), |b| format!(", {}", human_bytes(b))),
        n(&v["steps"]),
        v["baseline"]["tokens"],
    );
    s += "format  weights    params in format  first max|err|  first rel rms  mean rel rms  greedy agree  same prefix\n";
    for r in v["formats"].as_array().into_iter().flatten() {
        let bytes = r["weights_bytes"]
            .as_u64()
            .map_or("-".to_string(), human_bytes);
        let covered = r["params_quantized"]
            .as_f64()
            .map_or("-".to_string(), |c| format!("{:.1}%", 100.0 * c));
        s += &format!(
            "{:<7} {:>9}  {:>16}  {:>14.4}  {:>13.4}  {:>12.4}  {:>6}/{:<5}  {:>6}/{}\n",
            r["format"].as_str().unwrap_or("?"),
            bytes,
            covered,
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

//! `visi-cli info`: what a model is and whether the chosen device can hold it, read from
//! `config.json` and the safetensors headers only (no weights are read or uploaded).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::anyhow;
use engine_core::weights::open_safetensors;
use engine_core::DType;
use models::LlavaConfig;
use serde_json::{json, Value};

use crate::errors::{bad_input, classify, human_bytes, internal, Failure, CPU_HINT};

/// Which device `info` checks the model against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoDevice {
    /// The adapter `--device auto` would pick, else the CPU backend.
    Auto,
    /// The adapter `--device gpu` would pick, software ones included (an error when wgpu
    /// lists none).
    Gpu,
    /// The CPU backend: host memory only.
    Cpu,
}

/// One tensor as the engine will hold it.
struct TensorInfo {
    name: String,
    shape: Vec<usize>,
    /// Bytes on the device: f16/bf16 matrices as f16, f32 as stored, vectors and the
    /// position table as f32 (what `Weights::get` / `get_f32` upload).
    device_bytes: u64,
}

/// Runs `info` on a model directory or a synthetic shape and prints the report (text, or
/// one JSON object with `json`).
pub fn info(
    model: Option<&str>,
    shape: Option<&str>,
    device: InfoDevice,
    kv_dtype: DType,
    json_out: bool,
) -> Result<(), Failure> {
    let v = match (model, shape) {
        (Some(m), None) => {
            let dir =
                models::hub::resolve_model(m).map_err(|e| bad_input(anyhow!("--model: {e}")))?;
            report(&dir, device, kv_dtype)?
        }
        (None, Some(s)) => {
            let shape = models::synthetic::SyntheticShape::parse(s)
                .map_err(|e| bad_input(anyhow!("--shape: {e}")))?;
            shape_report(shape, device, kv_dtype)?
        }
        _ => return Err(bad_input(anyhow!("give either --model or --shape"))),
    };
    if json_out {
        let text = serde_json::to_string(&v).map_err(|e| internal(e.into()))?;
        crate::validate::println_stdout(&text)
    } else {
        crate::validate::print_stdout(&text_report(&v))
    }
}

/// The report as JSON (the text form is rendered from it), K/V counted in `kv_dtype`.
pub fn report(dir: &Path, device: InfoDevice, kv_dtype: DType) -> Result<Value, Failure> {
    let cfg_path = dir.join("config.json");
    let cfg = LlavaConfig::from_file(&cfg_path).map_err(classify)?;
    // The architecture name is not part of the parsed config; the file just parsed.
    let raw: Value = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let arch = raw["architectures"][0]
        .as_str()
        .or_else(|| raw["model_type"].as_str())
        .unwrap_or("unknown")
        .to_string();

    let source = open_safetensors(dir).map_err(classify)?;
    // The config against the tensors: every layer it claims is stored, every tensor the
    // engine loads has the shape the config implies.
    models::checks::check_layers(
        &cfg,
        source.as_ref(),
        "config.json: text_config.num_hidden_layers",
    )
    .map_err(classify)?;
    models::checks::check_shapes(&cfg, source.as_ref()).map_err(classify)?;
    let mut stored = Vec::new();
    for name in source.names() {
        let view = source.view(&name).map_err(classify)?;
        stored.push((
            name,
            view.dtype,
            view.shape.to_vec(),
            view.bytes.len() as u64,
        ));
    }
    report_from(
        dir.display().to_string(),
        &cfg,
        arch,
        stored,
        source.total_bytes(),
        device,
        kv_dtype,
    )
}

/// The report for a synthetic shape (`tiny`, `llava-1b`, `llava-7b`): the tensors an f16
/// llava-hf checkpoint of that shape holds, with nothing generated or read.
pub fn shape_report(
    shape: models::synthetic::SyntheticShape,
    device: InfoDevice,
    kv_dtype: DType,
) -> Result<Value, Failure> {
    let cfg = shape.config().map_err(classify)?;
    let stored: Vec<_> = models::synthetic::tensor_shapes(&cfg)
        .into_iter()
        .map(|(name, s)| {
            let n: u64 = s.iter().map(|&d| d as u64).product();
            (name, DType::F16, s, 2 * n)
        })
        .collect();
    let on_disk = stored.iter().map(|t| t.3).sum();
    report_from(
        format!("synthetic {} (f16)", shape.name()),
        &cfg,
        cfg.arch.class_name().to_string(),
        stored,
        on_disk,
        device,
        kv_dtype,
    )
}

/// The report from the stored tensors `(name, dtype, shape, bytes)`.
fn report_from(
    label: String,
    cfg: &LlavaConfig,
    arch: String,
    stored: Vec<(String, DType, Vec<usize>, u64)>,
    bytes_on_disk: u64,
    device: InfoDevice,
    kv_dtype: DType,
) -> Result<Value, Failure> {
    let mut tensors = Vec::new();
    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut params: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, dtype, shape, bytes) in stored {
        // Saturating: sizes from a config or header are bounded by the file, but a total
        // must never wrap around into a small number.
        let n: u64 = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
        let e = dtypes.entry(dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += bytes;
        let part = if name.contains("vision_tower") {
            "vision"
        } else if name.contains("multi_modal_projector") {
            "projector"
        } else {
            "text"
        };
        *params.entry(part).or_default() += n;
        let as_f32 = shape.len() <= 1 || name.ends_with("position_embedding.weight");
        let elem = match dtype {
            _ if as_f32 => 4,
            DType::F16 | DType::BF16 => 2,
            _ => 4,
        };
        tensors.push(TensorInfo {
            name,
            shape,
            device_bytes: n.saturating_mul(elem),
        });
    }
    let weights_bytes: u64 = tensors
        .iter()
        .fold(0u64, |a, t| a.saturating_add(t.device_bytes));
    let tc = &cfg.text;
    let ctx = tc.max_position_embeddings as u64;
    // K and V in the cache's dtype, every layer: bytes per cached row across the layers.
    let kv_row = 2u64
        .saturating_mul(tc.num_hidden_layers as u64)
        .saturating_mul((tc.num_key_value_heads as u64).saturating_mul(tc.head_dim as u64))
        .saturating_mul(kv_dtype.size_in_bytes() as u64);
    // One image, a 64-token question and 256 answer tokens, dense (pruning only shrinks it).
    // LLaVA-NeXT: the largest square image's tokens (2,928 on llava-v1.6).
    let typical_rows = ((crate::bench::bench_image_tokens(cfg) + 64 + 256) as u64).min(ctx);
    let kv_typical = kv_row.saturating_mul(typical_rows);
    let kv_bytes = kv_row.saturating_mul(ctx);
    // The same prompt under bench's VisiPruner schedule (fusion 12 keeping 10 image tokens,
    // text-only from 18, scaled to the depth): each layer's cache holds only the rows it
    // processed. Real decisions depend on the input; this is the benchmarked schedule.
    let layers = tc.num_hidden_layers;
    let sched = crate::bench::default_schedule(layers, 6.min(layers.saturating_sub(3)).max(1));
    let (img, text) = (
        cfg.image_tokens() as u64,
        typical_rows.saturating_sub(cfg.image_tokens() as u64),
    );
    let pruned_rows: u64 = (0..layers)
        .map(|l| {
            if sched.text_only_from.is_some_and(|e| l >= e) {
                text
            } else if l >= sched.fusion_layer {
                text + (sched.keep as u64).min(img)
            } else {
                text + img
            }
        })
        .sum();
    let kv_typical_pruned = (kv_row / layers.max(1) as u64).saturating_mul(pruned_rows);
    let largest = tensors.iter().max_by_key(|t| t.device_bytes);
    let quantized = quantized_weight_bytes(&tensors);
    // Weights + the one-image KV cache, as stored and under each --quant format, dense and
    // under the VisiPruner schedule.
    let mut one_image = serde_json::Map::new();
    let mut one_image_pruned = serde_json::Map::new();
    one_image.insert(
        "stored".into(),
        json!(weights_bytes.saturating_add(kv_typical)),
    );
    one_image_pruned.insert(
        "stored".into(),
        json!(weights_bytes.saturating_add(kv_typical_pruned)),
    );
    for (k, w) in &quantized {
        let w = w.as_u64().unwrap_or(0);
        one_image.insert(k.clone(), json!(w.saturating_add(kv_typical)));
        one_image_pruned.insert(k.clone(), json!(w.saturating_add(kv_typical_pruned)));
    }

    let dev = device_check(device, largest, weights_bytes.saturating_add(kv_bytes))?;
    Ok(json!({
        "model_dir": label,
        "architecture": arch,
        "vision_layers": cfg.vision.num_hidden_layers,
        "vision_layers_run": cfg.vision_layers_to_run(),
        "text_layers": tc.num_hidden_layers,
        "hidden_size": tc.hidden_size,
        "attention_heads": tc.num_attention_heads,
        "kv_heads": tc.num_key_value_heads,
        "vocab_size": tc.vocab_size,
        "context_length": ctx,
        "image_tokens": crate::bench::bench_image_tokens(cfg),
        "parameters": {
            "total": params.values().sum::<u64>(),
            "vision": params.get("vision").copied().unwrap_or(0),
            "projector": params.get("projector").copied().unwrap_or(0),
            "text": params.get("text").copied().unwrap_or(0),
        },
        "tensors": tensors.len(),
        "dtypes": dtypes.iter().map(|(k, (n, b))| (k.clone(), json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "bytes_on_disk": bytes_on_disk,
        "memory": {
            "weights_bytes": weights_bytes,
            "weights_bytes_quantized": quantized,
            "params_quantized": quantized_params(&tensors),
            "kv_dtype": kv_dtype.name(),
            "kv_cache_bytes": kv_bytes,
            "kv_cache_bytes_one_image": kv_typical,
            "one_image_rows": typical_rows,
            "one_image_total_bytes": one_image,
            "kv_cache_bytes_one_image_visipruner": kv_typical_pruned,
            "one_image_total_bytes_visipruner": one_image_pruned,
            "visipruner_schedule": {
                "fusion": sched.fusion_layer, "keep": sched.keep, "exit": sched.text_only_from,
            },
            "total_bytes": weights_bytes.saturating_add(kv_bytes),
            "note": format!("weights as the engine stores them (f16/bf16 matrices as f16, f32 as stored, vectors f32), K/V in {kv_dtype} at the full context; one_image_total_bytes: weights (as stored or under --quant) + the one-image KV cache; activations not included"),
        },
        "largest_tensor": largest.map(|t| json!({
            "name": t.name,
            "shape": t.shape,
            "bytes": t.device_bytes,
        })),
        "device": dev,
    }))
}

/// The device part of the report: which adapter, its limits, and whether they hold the
/// model. wgpu does not report an adapter's memory size, so memory is an estimate to compare
/// by hand; what is checked is that every tensor fits the buffer limits.
fn device_check(
    device: InfoDevice,
    largest: Option<&TensorInfo>,
    need: u64,
) -> Result<Value, Failure> {
    let adapters = if device == InfoDevice::Cpu {
        Vec::new()
    } else {
        // A VISI_ADAPTER that is not UTF-8 names no adapter: said, not ignored.
        engine_wgpu::adapter_env().map_err(classify)?;
        engine_wgpu::list_adapters()
    };
    let chosen = match device {
        InfoDevice::Cpu => None,
        InfoDevice::Auto => adapters.iter().find(|a| a.auto_pick),
        InfoDevice::Gpu => adapters.iter().find(|a| a.gpu_pick),
    };
    let Some(a) = chosen else {
        if device == InfoDevice::Auto {
            if let Some(w) = engine_wgpu::adapter_env().map_err(classify)? {
                return Err(bad_input(anyhow!(
                    "VISI_ADAPTER: no adapter matches `{w}` (`visi-cli devices` lists them)"
                )));
            }
        }
        if device == InfoDevice::Gpu {
            let f = classify(engine_core::Error::NoAdapter(format!(
                "none of the {} adapters wgpu lists is usable; {CPU_HINT}",
                adapters.len()
            )));
            return Err(Failure {
                err: f.err.context("--device gpu"),
                ..f
            });
        }
        let host = host_memory_bytes();
        // Unknown host memory (not Linux): only the absurd is refused.
        let fits = need <= host.unwrap_or(MAX_DEVICE_MEMORY);
        return Ok(json!({
            "backend": "cpu",
            "host_memory_bytes": need,
            "fits": fits,
            "note": match host {
                Some(h) => format!("the CPU backend needs about {} of host memory; this machine has {}", human_bytes(need), human_bytes(h)),
                None => format!("the CPU backend needs about {} of host memory", human_bytes(need)),
            },
        }));
    };
    let binding = a.max_storage_buffer_binding_size.min(a.max_buffer_size);
    let (fits, note) = match largest {
        // wgpu does not tell an adapter's memory, but no GPU holds more than this.
        _ if need > MAX_DEVICE_MEMORY => (
            false,
            format!(
                "more than any single GPU's memory ({})",
                human_bytes(MAX_DEVICE_MEMORY)
            ),
        ),
        None => (true, "no tensors".to_string()),
        Some(t) => {
            let rows = t.shape.first().copied().unwrap_or(1).max(1) as u64;
            let row_bytes = t.device_bytes / rows;
            if row_bytes > binding {
                (
                    false,
                    format!(
                        "one row of `{}` is {}, more than the binding limit {}: this adapter cannot hold the model",
                        t.name,
                        human_bytes(row_bytes),
                        human_bytes(binding)
                    ),
                )
            } else if t.device_bytes > binding {
                (
                    true,
                    format!(
                        "largest tensor `{}` ({}) exceeds one binding ({}); the engine splits it into {} parts",
                        t.name,
                        human_bytes(t.device_bytes),
                        human_bytes(binding),
                        t.device_bytes.div_ceil(binding)
                    ),
                )
            } else {
                (
                    true,
                    format!(
                        "largest tensor `{}` ({}) fits one binding ({})",
                        t.name,
                        human_bytes(t.device_bytes),
                        human_bytes(binding)
                    ),
                )
            }
        }
    };
    Ok(json!({
        "backend": "wgpu",
        "adapter": a.name,
        "api": a.backend,
        "device_type": a.device_type,
        "max_buffer_size": a.max_buffer_size,
        "max_storage_buffer_binding_size": a.max_storage_buffer_binding_size,
        "gpu_memory_bytes": need,
        "fits": fits,
        "note": format!("{note}; needs about {} of GPU memory (wgpu does not report the adapter's size)", human_bytes(need)),
    }))
}

/// The most memory any one device has today (192 GiB: AMD MI300X, NVIDIA B200); an
/// estimate above it cannot fit, whatever the adapter.
const MAX_DEVICE_MEMORY: u64 = 192 << 30;

/// Physical memory of this machine (`MemTotal` on Linux; None elsewhere).
fn host_memory_bytes() -> Option<u64> {
    let s = engine_core::files::read_text_limited(Path::new("/proc/meminfo"), 1 << 20).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb.saturating_mul(1024))
}

/// Whether `run --quant q` stores tensor `t` in format `q`: matrices whose rows are whole
/// blocks (as `Weights::with_quant` does); the CLIP position table stays f32.
fn in_format(t: &TensorInfo, q: engine_core::QuantType) -> Option<u64> {
    match t.shape.as_slice() {
        [r, k] if !t.name.ends_with("position_embedding.weight") && k % q.block_size() == 0 => {
            q.bytes_for(r * k).map(|b| b as u64)
        }
        _ => None,
    }
}

const FORMATS: [engine_core::QuantType; 4] = [
    engine_core::QuantType::Q8_0,
    engine_core::QuantType::Q4_0,
    engine_core::QuantType::Q4_1,
    engine_core::QuantType::Q4K,
];

/// Weight bytes under `run --quant` per format: matrices in the format, everything else as
/// counted above.
fn quantized_weight_bytes(tensors: &[TensorInfo]) -> serde_json::Map<String, Value> {
    FORMATS
        .into_iter()
        .map(|q| {
            let total: u64 = tensors
                .iter()
                .map(|t| in_format(t, q).unwrap_or(t.device_bytes))
                .sum();
            (q.name().to_string(), json!(total))
        })
        .collect()
}

/// Parameters held in each format under `run --quant` (the rest stays as stored).
fn quantized_params(tensors: &[TensorInfo]) -> serde_json::Map<String, Value> {
    FORMATS
        .into_iter()
        .map(|q| {
            let n: u64 = tensors
                .iter()
                .filter(|t| in_format(t, q).is_some())
                .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
                .sum();
            (q.name().to_string(), json!(n))
        })
        .collect()
}

/// Human rendering of [`report`].
pub fn text_report(v: &Value) -> String {
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let b = |x: &Value| human_bytes(n(x));
    let p = &v["parameters"];
    let mut s = String::new();
    s += &format!("model        {}\n", v["model_dir"].as_str().unwrap_or(""));
    s += &format!(
        "architecture {}\n",
        v["architecture"].as_str().unwrap_or("")
    );
    s += &format!(
        "layers       vision {} ({} run), text {}\n",
        n(&v["vision_layers"]),
        n(&v["vision_layers_run"]),
        n(&v["text_layers"])
    );
    s += &format!(
        "parameters   {} (vision {}, projector {}, text {})\n",
        n(&p["total"]),
        n(&p["vision"]),
        n(&p["projector"]),
        n(&p["text"])
    );
    let dt: Vec<String> = v["dtypes"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, d)| format!("{k} ({} tensors, {})", n(&d["tensors"]), b(&d["bytes"])))
                .collect()
        })
        .unwrap_or_default();
    s += &format!("dtypes       {}\n", dt.join(", "));
    s += &format!("on disk      {}\n", b(&v["bytes_on_disk"]));
    let m = &v["memory"];
    s += &format!(
        "memory       weights {} + KV cache {} ({}, context {}) = {}\n",
        b(&m["weights_bytes"]),
        b(&m["kv_cache_bytes"]),
        m["kv_dtype"].as_str().unwrap_or(""),
        n(&v["context_length"]),
        b(&m["total_bytes"])
    );
    if let Some(q) = m["weights_bytes_quantized"].as_object() {
        let parts: Vec<String> = q.iter().map(|(k, x)| format!("{k} {}", b(x))).collect();
        s += &format!("  --quant    weights {}\n", parts.join(", "));
    }
    s += &format!(
        "  one image  KV cache {} ({} rows: image, 64-token question, 256-token answer, dense)\n",
        b(&m["kv_cache_bytes_one_image"]),
        n(&m["one_image_rows"])
    );
    if let Some(t) = m["one_image_total_bytes"].as_object() {
        let parts: Vec<String> = t.iter().map(|(k, x)| format!("{k} {}", b(x))).collect();
        s += &format!("  one image  weights + KV: {}\n", parts.join(", "));
    }
    if let Some(t) = m["one_image_total_bytes_visipruner"].as_object() {
        let parts: Vec<String> = t.iter().map(|(k, x)| format!("{k} {}", b(x))).collect();
        let sc = &m["visipruner_schedule"];
        s += &format!(
            "  VisiPruner KV {} (fusion {}, keep {}, exit {}): weights + KV {}\n",
            b(&m["kv_cache_bytes_one_image_visipruner"]),
            sc["fusion"],
            sc["keep"],
            sc["exit"],
            parts.join(", ")
        );
    }
    let d = &v["device"];
    match d["backend"].as_str() {
        Some("wgpu") => {
            s += &format!(
                "device       {} ({}, {}): max buffer {}, max binding {}\n",
                d["adapter"].as_str().unwrap_or(""),
                d["api"].as_str().unwrap_or(""),
                d["device_type"].as_str().unwrap_or(""),
                b(&d["max_buffer_size"]),
                b(&d["max_storage_buffer_binding_size"])
            );
        }
        _ => s += "device       CPU backend\n",
    }
    s += &format!(
        "fits         {}: {}\n",
        if d["fits"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        },
        d["note"].as_str().unwrap_or("")
    );
    s
}

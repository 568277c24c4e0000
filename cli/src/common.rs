//! What the subcommands share: the device and weight-format flags, opening the backend,
//! loading the model, and the `--json` object of one generation (`run` prints it, `serve`
//! answers with it).

use std::path::Path;
use std::sync::Arc;

use clap::ValueEnum;
use engine_core::{Backend, CpuBackend};
use models::llava::{Generation, Llava};
use serde_json::json;

use crate::errors::{self, classify, Failure};
use crate::progress;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum DeviceArg {
    Auto,
    Gpu,
    Cpu,
}

pub(crate) fn open_backend(device: DeviceArg) -> Result<Arc<dyn Backend>, Failure> {
    match device {
        DeviceArg::Cpu => Ok(Arc::new(CpuBackend::new())),
        DeviceArg::Gpu => {
            // Any adapter, software ones included (ranked last): asking for the wgpu backend
            // is how lavapipe is chosen on purpose.
            engine_wgpu::open(&engine_wgpu::GpuOptions::default()).map_err(|e| {
                // No usable adapter is the user's choice to fix (exit 2, suggests --device cpu).
                let f = classify(e);
                Failure {
                    err: f.err.context("--device gpu"),
                    ..f
                }
            })
        }
        DeviceArg::Auto => match engine_wgpu::open_auto() {
            Ok(engine_wgpu::Auto::Gpu(b)) => Ok(b),
            Ok(engine_wgpu::Auto::Cpu(why)) => {
                errors::note(format!("{why}; running on the CPU backend"));
                Ok(Arc::new(CpuBackend::new()))
            }
            // An adapter asked for by name that is not there is a mistake to report, not a
            // reason to run on the CPU instead.
            Err(e)
                if std::env::var_os("VISI_ADAPTER")
                    .is_some_and(|v| !v.to_string_lossy().trim().is_empty()) =>
            {
                let f = classify(e);
                Err(Failure {
                    err: f.err.context("VISI_ADAPTER"),
                    ..f
                })
            }
            Err(e) => {
                errors::note(format!("{e}; running on the CPU backend"));
                Ok(Arc::new(CpuBackend::new()))
            }
        },
    }
}

/// A GGUF block format for `--quant`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    Q4K,
}

/// The engine's block format for `--quant`.
pub(crate) fn quant_type(q: QuantArg) -> engine_core::QuantType {
    match q {
        QuantArg::Q8_0 => engine_core::QuantType::Q8_0,
        QuantArg::Q4_0 => engine_core::QuantType::Q4_0,
        QuantArg::Q4_1 => engine_core::QuantType::Q4_1,
        QuantArg::Q4K => engine_core::QuantType::Q4K,
    }
}

/// [`load_llava_held`], then the notes held so far go out (the model is the last input
/// checked by callers with nothing to check against it).
pub(crate) fn load_llava(
    model: &Path,
    mmproj: Option<&Path>,
    device: DeviceArg,
    quant: Option<QuantArg>,
) -> Result<Llava, Failure> {
    let llava = load_llava_held(model, mmproj, device, quant)?;
    errors::release_notes();
    Ok(llava)
}

/// Loads a LLaVA model (a llava-hf directory, or a GGUF text model with its `mmproj`) on
/// `device`, quantizing at load with `quant`; a progress bar on a terminal. A device note
/// (`--device auto` on the CPU backend) stays held until [`errors::release_notes`].
pub(crate) fn load_llava_held(
    model: &Path,
    mmproj: Option<&Path>,
    device: DeviceArg,
    quant: Option<QuantArg>,
) -> Result<Llava, Failure> {
    let quant = quant.map(quant_type);
    if mmproj.is_none() && model.is_dir() {
        // A tokenizer.json far larger than the vocabulary needs is refused before seconds
        // of parsing (config.json is small and read with a limit).
        let cfg = models::LlavaConfig::from_file(&model.join("config.json")).map_err(classify)?;
        models::prompt::check_tokenizer_file(&model.join("tokenizer.json"), cfg.text.vocab_size)
            .map_err(classify)?;
    }
    // Both backends have quantized kernels: --device picks as without --quant.
    let backend = open_backend(device)?;
    let bar = progress::load_bar();
    let cb = bar.as_ref().map(|b| b.1.clone());
    let loaded = match mmproj {
        Some(mm) => Llava::load_gguf(model, mm, backend, cb, quant),
        None => Llava::load_quantized(model, backend, cb, quant),
    };
    if let Some((b, _)) = &bar {
        b.finish_and_clear();
    }
    loaded.map_err(classify)
}

/// The `--json` object of one generation.
pub(crate) fn generation_json(
    gen: &Generation,
    dev: &engine_core::DeviceInfo,
) -> serde_json::Value {
    let f = &gen.flops;
    json!({
        "text": gen.text,
        "tokens": gen.tokens,
        "prompt_tokens": gen.prompt_tokens,
        "image_tokens": gen.image_tokens,
        "image_span": gen.image_span.map(|s| [s.start, s.end]),
        "image_spans": gen.image_spans.iter().map(|s| [s.start, s.end]).collect::<Vec<_>>(),
        "stopped_by_eos": gen.stopped_by_eos,
        "interrupted": gen.interrupted,
        "kv_dtype": gen.kv_dtype.name(),
        "timings_ms": {
            "load": gen.timings.load_ms,
            "vision": gen.timings.vision_ms,
            "prefill": gen.timings.prefill_ms,
            "decode": gen.timings.decode_ms,
        },
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "device": { "backend": dev.backend, "adapter": dev.adapter, "api": dev.api },
        "reuse": {
            "reused_tokens": gen.reused_tokens,
            "recomputed_from_layer": gen.recomputed_from_layer,
            "computed_rows": gen.computed_rows,
        },
        "pruning": {
            "method": gen.prune.method,
            "config": gen.prune.config,
            "fusion_layer": gen.prune.fusion_layer,
            "kept_image_tokens": gen.prune.kept_image_tokens,
            "text_only_from_layer": gen.prune.text_only_from_layer,
            "layer_seq_lens": gen.layer_seq_lens,
            "layer_image_lens": gen.layer_image_lens,
            "kv_lens": gen.kv_lens,
            "kv_bytes": gen.kv_bytes,
            "note": gen.prune_note,
        },
        "flops": {
            "prefill": f.prefill,
            "prefill_dense": f.prefill_dense,
            "image_attention": f.attention_image,
            "image_attention_dense": f.attention_image_dense,
            "vision": f.vision,
            "per_layer": f.per_layer,
        },
    })
}

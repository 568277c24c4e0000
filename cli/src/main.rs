//! `visi-cli`: run LLaVA on an image (`run`), describe a model (`info`), list adapters
//! (`devices`), benchmark kernels (`bench-kernels`).
//!
//! Exit status: 0 on success, 2 for bad input (files, flags, prompts, configs), 1 for
//! internal failures. Errors are one `error: ...` line on stderr and nothing on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod bench;
mod devices;
mod errors;
mod info;
mod progress;
mod quant_eval;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use engine_core::{Backend, CpuBackend};
use models::llava::{draw_kept_images, GenerateOptions, Llava};
use models::preprocess::PadMode;
use models::prompt::Template;
use models::sampling::SamplingParams;
use pruner::PruneConfig;
use serde_json::json;

use errors::{bad_input, classify, internal, Failure};

#[derive(Parser)]
#[command(
    name = "visi-cli",
    version,
    about = "visi: multimodal LLM inference over wgpu, with VisiPruner"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer a prompt about an image with a llava-hf model directory or a llama.cpp GGUF
    /// pair (`--model text.gguf --mmproj mmproj.gguf`).
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Convert a llava-hf directory to llama.cpp's GGUF pair (`<name>.<quant>.gguf` and
    /// `mmproj-<name>.f16.gguf`).
    Quantize(QuantizeArgs),
    /// Describe a model: layers, parameters, dtypes, memory, and whether a device holds it.
    Info {
        /// Model directory or Hugging Face repo id (as for `run`).
        #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
        model: Option<String>,
        /// A synthetic shape instead (tiny, llava-1b, llava-7b): sizes without weights.
        #[arg(long)]
        shape: Option<String>,
        /// Device to check the model against.
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the adapters wgpu sees and which one `--device auto` picks.
    Devices {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Dense vs VisiPruner vs FastV on a checkpoint or a synthetic shape.
    Bench(bench::BenchArgs),
    /// Quality of each weight format against the stored weights (logit error, greedy agreement).
    QuantEval(quant_eval::QuantEvalArgs),
    /// Kernel benchmark on the selected adapter (JSON).
    BenchKernels {
        /// Fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TemplateArg {
    #[value(name = "vicuna_v1")]
    VicunaV1,
    /// llava-v1.6-mistral's `[INST] <image>\n... [/INST]`.
    #[value(name = "mistral_instruct")]
    MistralInstruct,
    Raw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ImageModeArg {
    Crop,
    Pad,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DeviceArg {
    Auto,
    Gpu,
    Cpu,
}

#[derive(clap::Args)]
struct RunArgs {
    /// llava-hf model directory (config.json, tokenizer.json, safetensors), or a repo id
    /// (`llava-hf/llava-1.5-7b-hf`) already in the local Hugging Face cache.
    #[arg(long)]
    model: String,
    /// Image file; without it the prompt is text only. Repeat it for several images: each
    /// `<image>` of the prompt takes the next one, in order.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// The question.
    #[arg(long)]
    prompt: String,
    #[arg(long, value_enum, default_value = "vicuna_v1")]
    template: TemplateArg,
    /// crop: llava-hf's processor; pad: LLaVA-1.5's expand2square.
    #[arg(long, value_enum, default_value = "crop")]
    image_mode: ImageModeArg,
    /// At least 1.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Pruning config as JSON, or @file.json (default: the paper's VisiPruner config).
    #[arg(long, conflicts_with = "no_prune")]
    prune: Option<String>,
    /// Run dense (no pruning, no masks).
    #[arg(long)]
    no_prune: bool,
    /// Write the image as the model saw it, pruned patches dimmed, kept ones outlined.
    #[arg(long)]
    save_kept: Option<PathBuf>,
    /// Print one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Quantize the checkpoint's weight matrices as they load (kept quantized on the device).
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// llama.cpp's `mmproj-*.gguf` (CLIP tower and projector) for a `.gguf` --model.
    #[arg(long)]
    mmproj: Option<PathBuf>,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// llava-hf model directory.
    #[arg(long)]
    model: PathBuf,
    /// Text model type: f16, q8_0, q4_0, q4_1, q4_k (the CLIP tower stays f16).
    #[arg(long)]
    quant: String,
    /// Output directory (files named after the model directory) or a path prefix.
    #[arg(long)]
    out: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
}

/// A GGUF block format for `--quant`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    Q4K,
}

fn main() -> ExitCode {
    devices::quiet_headless_probe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            // clap's message up to its usage block, folded onto one line.
            let msg = e.to_string();
            let head: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            let line = head.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!(
                "error: {}",
                if line.is_empty() {
                    "invalid arguments"
                } else {
                    line
                }
            );
            return ExitCode::from(2);
        }
    };
    errors::install_panic_hook();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Quantize(a) => quantize(a),
        Cmd::Info {
            model,
            shape,
            device,
            json,
        } => info::info(
            model.as_deref(),
            shape.as_deref(),
            match device {
                DeviceArg::Auto => info::InfoDevice::Auto,
                DeviceArg::Gpu => info::InfoDevice::Gpu,
                DeviceArg::Cpu => info::InfoDevice::Cpu,
            },
            json,
        ),
        Cmd::Devices { json } => devices::devices(json),
        Cmd::BenchKernels { quick } => bench_kernels(quick),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::QuantEval(a) => quant_eval::quant_eval(a),
    }));
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(f)) if f.code == errors::INTERRUPTED => {
            eprintln!("{:#}", f.err);
            ExitCode::from(f.code)
        }
        Ok(Err(f)) => {
            eprintln!("error: {}", format!("{:#}", f.err).replace('\n', " "));
            ExitCode::from(f.code)
        }
        Err(_) => ExitCode::from(1),
    }
}

fn bench_kernels(quick: bool) -> Result<(), Failure> {
    let v = engine_wgpu::bench::kernel_bench(&engine_wgpu::GpuOptions::default(), quick)
        .map_err(|e| internal(e.into()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&v).map_err(|e| internal(e.into()))?
    );
    Ok(())
}

/// Reads `--prune`: inline JSON or `@file.json`.
fn parse_prune(arg: &str) -> anyhow::Result<PruneConfig> {
    let (text, origin) = match arg.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("--prune: cannot read {path}"))?,
            path.to_string(),
        ),
        None => (arg.to_string(), "--prune".to_string()),
    };
    PruneConfig::from_json(&text).map_err(|e| anyhow!("{origin}: {e}"))
}

fn open_backend(device: DeviceArg) -> Result<Arc<dyn Backend>, Failure> {
    match device {
        DeviceArg::Cpu => Ok(Arc::new(CpuBackend::new())),
        DeviceArg::Gpu => {
            let opts = engine_wgpu::GpuOptions {
                require_gpu: true,
                ..Default::default()
            };
            // No usable adapter is the user's choice to fix (exit 2, suggests --device cpu).
            engine_wgpu::open(&opts).map_err(|e| {
                let f = classify(e);
                Failure {
                    err: f.err.context("--device gpu"),
                    ..f
                }
            })
        }
        DeviceArg::Auto => match engine_wgpu::open(&engine_wgpu::GpuOptions::default()) {
            Ok(b) => Ok(b),
            Err(e) => {
                eprintln!("note: {e}; running on the CPU backend");
                Ok(Arc::new(CpuBackend::new()))
            }
        },
    }
}

fn check_output_path(p: &Path) -> anyhow::Result<()> {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if ext.as_deref() != Some("png") {
        return Err(anyhow!(
            "--save-kept {}: the file name must end in .png",
            p.display()
        ));
    }
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(anyhow!(
            "--save-kept {}: directory {} does not exist",
            p.display(),
            parent.display()
        ));
    }
    Ok(())
}

/// Text-only generation from a llama.cpp GGUF file, on either backend (both dequantise
/// GGUF blocks inside their matmul and embedding kernels).
fn run_gguf(a: &RunArgs, sampling: SamplingParams) -> Result<(), Failure> {
    if !a.image.is_empty() {
        return Err(bad_input(anyhow!(
            "--image with a GGUF text model needs its --mmproj file (llama.cpp's mmproj-*.gguf)"
        )));
    }
    if a.save_kept.is_some() {
        return Err(bad_input(anyhow!("--save-kept needs --image")));
    }
    let template = match a.template {
        TemplateArg::VicunaV1 => Template::VicunaV1,
        TemplateArg::MistralInstruct => Template::MistralInstruct,
        TemplateArg::Raw => Template::Raw,
    };
    let text = template
        .render(&a.prompt, false)
        .map_err(|e| bad_input(e.into()))?;
    let backend = open_backend(a.device)?;
    let dev = backend.device_info();
    let t0 = std::time::Instant::now();
    let m = models::gguf::GgufTextModel::load(std::path::Path::new(&a.model), backend.clone())
        .map_err(classify)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ids = m.encode(&text).map_err(|e| bad_input(e.into()))?;
    let t1 = std::time::Instant::now();
    let (tokens, _) = m
        .generate(backend.as_ref(), &ids, a.max_new_tokens, sampling)
        .map_err(classify)?;
    let gen_ms = t1.elapsed().as_secs_f64() * 1e3;
    let out = m
        .tokenizer
        .decode(&tokens, true)
        .map_err(|e| internal(anyhow!("decoding: {e}")))?;
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let j = json!({
            "text": out,
            "tokens": tokens,
            "prompt_tokens": ids.len(),
            "timings_ms": { "load": load_ms, "generate": gen_ms },
            "device": { "backend": dev.backend, "adapter": dev.adapter },
        });
        let _ = writeln!(stdout, "{j}");
    } else {
        let _ = writeln!(stdout, "{out}");
        eprintln!(
            "{} prompt + {} new tokens in {:.0} ms (load {:.0} ms), {}",
            ids.len(),
            tokens.len(),
            gen_ms,
            load_ms,
            dev.backend
        );
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<(), Failure> {
    progress::install_ctrl_c();
    // ---- everything the user handed in, checked before any heavy work ----
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate().map_err(|e| bad_input(e.into()))?;
    if a.max_new_tokens == 0 {
        return Err(bad_input(anyhow!("--max-new-tokens must be at least 1")));
    }
    let gguf = a.model.ends_with(".gguf");
    if gguf && a.mmproj.is_none() {
        return run_gguf(&a, sampling);
    }
    if let Some(m) = &a.mmproj {
        if !gguf {
            return Err(bad_input(anyhow!(
                "--mmproj {} needs a GGUF text model (--model <file>.gguf)",
                m.display()
            )));
        }
    }
    let prune = if a.no_prune {
        Some(PruneConfig::Dense)
    } else {
        a.prune
            .as_deref()
            .map(parse_prune)
            .transpose()
            .map_err(bad_input)?
    };
    let model_dir = if gguf {
        PathBuf::from(&a.model)
    } else {
        models::hub::resolve_model(&a.model).map_err(|e| bad_input(anyhow!("--model: {e}")))?
    };
    if let Some(p) = &a.save_kept {
        if a.image.is_empty() {
            return Err(bad_input(anyhow!("--save-kept needs --image")));
        }
        check_output_path(p).map_err(bad_input)?;
    }
    let images = a
        .image
        .iter()
        .map(|p| models::preprocess::load_image(p).map_err(|e| bad_input(e.into())))
        .collect::<Result<Vec<_>, _>>()?;
    let template = match a.template {
        TemplateArg::VicunaV1 => Template::VicunaV1,
        TemplateArg::MistralInstruct => Template::MistralInstruct,
        TemplateArg::Raw => Template::Raw,
    };
    // Template errors do not need the model: report them before loading it.
    template
        .render_images(&a.prompt, images.len())
        .map_err(|e| bad_input(e.into()))?;
    let image_mode = match a.image_mode {
        ImageModeArg::Crop => PadMode::Crop,
        ImageModeArg::Pad => PadMode::Pad,
    };

    // ---- model ----
    let quant = a.quant.map(|q| match q {
        QuantArg::Q8_0 => engine_core::QuantType::Q8_0,
        QuantArg::Q4_0 => engine_core::QuantType::Q4_0,
        QuantArg::Q4_1 => engine_core::QuantType::Q4_1,
        QuantArg::Q4K => engine_core::QuantType::Q4K,
    });
    // Both backends have quantized kernels: --device picks as without --quant.
    let backend = open_backend(a.device)?;
    let bar = progress::load_bar();
    let loaded = match &a.mmproj {
        Some(mm) => Llava::load_gguf(
            &model_dir,
            mm,
            backend,
            bar.as_ref().map(|b| b.1.clone()),
            quant,
        ),
        None => Llava::load_quantized(
            &model_dir,
            backend,
            bar.as_ref().map(|b| b.1.clone()),
            quant,
        ),
    };
    if let Some((b, _)) = &bar {
        b.finish_and_clear();
    }
    let llava = loaded.map_err(classify)?;
    let counts = images
        .iter()
        .map(|i| llava.image_tokens_for(i.width(), i.height()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_input(e.into()))?;
    let prompt = llava
        .prompt_images(template, &a.prompt, &counts)
        .map_err(|e| bad_input(e.into()))?;
    let (_, note) = llava
        .resolve_prune_for(prune.as_ref(), &prompt.image_spans)
        .map_err(|e| bad_input(e.into()))?;
    if let Some(n) = &note {
        eprintln!("note: {n}");
    }
    let opts = GenerateOptions {
        template,
        image_mode,
        max_new_tokens: a.max_new_tokens,
        sampling,
        prune,
        keep_first_logits: false,
    };

    // ---- generation ----
    let encoded = images
        .iter()
        .map(|img| llava.encode_image(img, image_mode))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal(e.into()))?;
    let mut stdout = std::io::stdout().lock();
    let stream = !a.json;
    let delay = progress::token_delay();
    let mut on_text = |t: &str| {
        if stream {
            // A closed stdout (e.g. piped into `head`) must not abort generation.
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    };
    progress::set_generating(true);
    let gen = llava
        .generate_ids_until(
            &prompt,
            &encoded,
            &opts,
            &mut on_text,
            &progress::stop_requested,
        )
        .map_err(classify)?;
    progress::set_generating(false);

    if let Some(path) = &a.save_kept {
        let pic = draw_kept_images(
            &images,
            &encoded,
            llava.config(),
            gen.prune.kept_image_tokens.as_deref(),
        );
        pic.save(path)
            .with_context(|| format!("--save-kept {}", path.display()))
            .map_err(internal)?;
    }

    let dev = llava.device_info();
    if a.json {
        let f = &gen.flops;
        let out = json!({
            "text": gen.text,
            "tokens": gen.tokens,
            "prompt_tokens": gen.prompt_tokens,
            "image_tokens": gen.image_tokens,
            "image_span": gen.image_span.map(|s| [s.start, s.end]),
            "image_spans": gen.image_spans.iter().map(|s| [s.start, s.end]).collect::<Vec<_>>(),
            "stopped_by_eos": gen.stopped_by_eos,
            "interrupted": gen.interrupted,
            "timings_ms": {
                "load": gen.timings.load_ms,
                "vision": gen.timings.vision_ms,
                "prefill": gen.timings.prefill_ms,
                "decode": gen.timings.decode_ms,
            },
            "decode_tokens_per_s": gen.decode_tokens_per_s,
            "device": { "backend": dev.backend, "adapter": dev.adapter },
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
        });
        let text = serde_json::to_string(&out).map_err(|e| internal(e.into()))?;
        let _ = writeln!(stdout, "{text}");
    } else {
        let _ = writeln!(stdout);
        let _ = stdout.flush();
        eprintln!("{}", progress::stats_line(&gen, &dev.backend, &dev.adapter));
    }
    if gen.interrupted {
        return Err(Failure {
            code: errors::INTERRUPTED,
            err: anyhow!("interrupted after {} tokens", gen.tokens.len()),
        });
    }
    Ok(())
}

/// `visi-cli quantize`: a llava-hf directory to llama.cpp's GGUF pair.
fn quantize(a: QuantizeArgs) -> Result<(), Failure> {
    let ty = models::gguf_llava::PairType::parse(&a.quant).ok_or_else(|| {
        bad_input(anyhow!(
            "--quant {}: expected one of f16, q8_0, q4_0, q4_1, q4_k",
            a.quant
        ))
    })?;
    if !a.model.is_dir() {
        return Err(bad_input(anyhow!(
            "--model {}: not a directory (expected a llava-hf model directory)",
            a.model.display()
        )));
    }
    let bar = progress::count_bar("converting");
    let mut cb = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let res = models::gguf_llava::write_pair(&a.model, &a.out, ty, a.force, &mut cb);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let w = res.map_err(classify)?;
    println!("{}", w.text.display());
    println!("{}", w.mmproj.display());
    eprintln!(
        "wrote the pair: {} text matrices in {}, {} kept f16 (rows not whole blocks); CLIP tower f16",
        w.quantized,
        ty.name(),
        w.fallback_f16
    );
    Ok(())
}

//! `visi-cli`: run LLaVA on an image (`run`), describe a model (`info`), list adapters
//! (`devices`), benchmark kernels (`bench-kernels`), answer and score benchmark question
//! files (`eval`, `eval-merge`, `score`, `sweep`).
//!
//! Exit status: 0 on success, 2 for bad input (files, flags, prompts, configs), 1 for
//! internal failures. Errors are one `error: ...` line on stderr and nothing on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod answers;
mod bench;
mod chat;
mod common;
mod devices;
mod errors;
mod eval;
mod info;
mod plot;
mod progress;
mod pull;
mod quant_eval;
mod score;
mod serve;
mod sweep;
mod validate;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use image::RgbImage;
use models::llava::{draw_kept_images, GenerateOptions, Llava};
use models::preprocess::PadMode;
use models::prompt::Template;
use models::sampling::SamplingParams;
use pruner::PruneConfig;
use serde_json::json;

pub(crate) use common::{
    generation_json, load_llava_held, open_backend, quant_type, DeviceArg, QuantArg,
};
use errors::{bad_input, classify, internal, Failure};

#[derive(Parser)]
#[command(
    name = "visi-cli",
    version,
    about = "visi: multimodal LLM inference over wgpu, with VisiPruner"
)]
struct Cli {
    /// Threads of the CPU backend (default: the physical cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Most `--threads` accepted: far more than any CPU here, small enough to be a typo guard.
const MAX_THREADS: usize = 1024;

/// The CPU backend's thread count for the JSON report (`null` on a wgpu device).
fn rayon_threads(dev: &engine_core::DeviceInfo) -> Option<usize> {
    (dev.backend == "cpu").then(engine_core::cpu::current_threads)
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer a prompt about an image with a llava-hf model directory or a llama.cpp GGUF
    /// pair (`--model text.gguf --mmproj mmproj.gguf`).
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Talk with a LLaVA model: multi-turn, answers streamed, follow-ups reuse the image
    /// and the shared prompt (one user turn per line when stdin is not a terminal).
    #[command(args_override_self = true)]
    Chat(chat::ChatArgs),
    /// Convert a llava-hf directory to llama.cpp's GGUF pair (`<name>.<quant>.gguf` and
    /// `mmproj-<name>.f16.gguf`).
    Quantize(QuantizeArgs),
    /// Download a model from the Hugging Face hub into its local cache (only the files a
    /// LLaVA model needs; resumed, size- and checksum-checked; HF_ENDPOINT, HF_TOKEN).
    Pull(pull::PullArgs),
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
        /// Element type the KV cache is counted in.
        #[arg(long, value_enum, default_value = "f16")]
        kv_dtype: KvDtypeArg,
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
    /// Answer a LLaVA question file (jsonl) or the MMBench TSV into LLaVA's answer jsonl,
    /// resuming an existing answers file.
    Eval(eval::EvalArgs),
    /// Join `eval --num-chunks` chunk files in question order.
    EvalMerge(eval::MergeArgs),
    /// Official metrics of an answers file (POPE, MME, GQA, TextVQA, SEED, MMBench).
    Score(score::ScoreArgs),
    /// Run and score a list of pruning configs on one question set; table and PNG plot.
    Sweep(sweep::SweepArgs),
    /// OpenAI-compatible HTTP server: /v1/chat/completions (streaming, continuous batching,
    /// per-request pruning), /v1/models, /health, /metrics.
    Serve(serve::ServeArgs),
    /// Kernel benchmark on the selected adapter (JSON).
    BenchKernels {
        /// Fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// Time the kernel variants on the selected adapter and cache the fastest per shape
    /// class in the platform cache dir (`run` and `bench` use the cache; without it, the
    /// measured defaults).
    Tune {
        /// Smaller shapes (a quick check, not a tuning to keep).
        #[arg(long)]
        quick: bool,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
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

/// A conversation format (`chat`, `serve`): the model's chat template.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum ChatTemplateArg {
    /// LLaVA-1.5's `conv_vicuna_v1` (llava-1.5 and llava-v1.6-vicuna).
    #[value(name = "vicuna_v1")]
    VicunaV1,
    /// llava-hf's llava-v1.6-mistral chat template (`[INST] ... [/INST]`).
    #[value(name = "mistral_instruct")]
    MistralInstruct,
}

impl ChatTemplateArg {
    /// The template it names.
    pub(crate) fn template(self) -> Template {
        match self {
            ChatTemplateArg::VicunaV1 => Template::VicunaV1,
            ChatTemplateArg::MistralInstruct => Template::MistralInstruct,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum ImageModeArg {
    Crop,
    Pad,
}

/// Model, device, pruning and sampling flags shared by `run` and `chat`.
#[derive(clap::Args, Clone)]
pub(crate) struct GenArgs {
    /// llava-hf model directory (config.json, tokenizer.json, safetensors), a repo id
    /// (`llava-hf/llava-1.5-7b-hf`) already in the local Hugging Face cache, or a GGUF file.
    #[arg(long)]
    pub model: String,
    /// Download a `--model ORG/NAME` repo id that is not in the cache (as `visi-cli pull`).
    #[arg(long)]
    pub pull: bool,
    /// llama.cpp's `mmproj-*.gguf` (CLIP tower and projector) for a `.gguf` --model.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// MobileVLM: the CLIP vision tower's directory, overriding config.json's
    /// `mm_vision_tower`.
    #[arg(long)]
    pub vision_tower: Option<PathBuf>,
    /// crop: llava-hf's processor; pad: LLaVA-1.5's expand2square.
    #[arg(long, value_enum, default_value = "crop")]
    pub image_mode: ImageModeArg,
    /// At least 1.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Pruning: `none`, `visipruner`, `fastv`, `fastv:N`, `divprune:N` (N image tokens kept
    /// per image), a JSON config, or @file.json (default: the paper's VisiPruner config).
    #[arg(long, conflicts_with = "no_prune")]
    pub prune: Option<String>,
    /// Run dense (no pruning, no masks).
    #[arg(long)]
    pub no_prune: bool,
    /// Quantize the checkpoint's weight matrices as they load (kept quantized on the device).
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Element type of the KV cache (f16 halves its bytes; scores and softmax stay f32).
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: KvDtypeArg,
}

/// The KV cache's element type (`--kv-dtype`).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum KvDtypeArg {
    F16,
    F32,
}

impl KvDtypeArg {
    /// The engine dtype.
    pub(crate) fn dtype(self) -> engine_core::DType {
        match self {
            KvDtypeArg::F16 => engine_core::DType::F16,
            KvDtypeArg::F32 => engine_core::DType::F32,
        }
    }
}

impl GenArgs {
    /// Sampling flags, validated.
    pub fn sampling(&self) -> Result<SamplingParams, Failure> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.validate().map_err(|e| bad_input(e.into()))?;
        if self.max_new_tokens == 0 {
            return Err(bad_input(anyhow!("--max-new-tokens must be at least 1")));
        }
        Ok(sampling)
    }

    /// `--prune`/`--no-prune`: `None` is the default (paper config when it fits).
    pub fn prune_config(&self) -> Result<Option<PruneConfig>, Failure> {
        if self.no_prune {
            return Ok(Some(PruneConfig::Dense));
        }
        self.prune
            .as_deref()
            .map(parse_prune)
            .transpose()
            .map_err(bad_input)
    }

    /// The image preprocessing mode.
    pub fn pad_mode(&self) -> PadMode {
        match self.image_mode {
            ImageModeArg::Crop => PadMode::Crop,
            ImageModeArg::Pad => PadMode::Pad,
        }
    }

    /// Whether `--model` names a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.model.ends_with(".gguf")
    }

    /// Checks the model flags and resolves `--model` (cheap: no weights are read).
    pub fn model_path(&self) -> Result<PathBuf, Failure> {
        if let Some(vt) = &self.vision_tower {
            if !vt.is_dir() {
                return Err(bad_input(anyhow!(
                    "--vision-tower {}: not a directory",
                    vt.display()
                )));
            }
            models::mobilevlm::config::set_default_vision_tower(vt.clone());
        }
        if let Some(m) = &self.mmproj {
            if !self.is_gguf() {
                return Err(bad_input(anyhow!(
                    "--mmproj {} needs a GGUF text model (--model <file>.gguf)",
                    m.display()
                )));
            }
        }
        if self.is_gguf() {
            Ok(PathBuf::from(&self.model))
        } else {
            pull::resolve_or_pull(&self.model, self.pull)
        }
    }

    /// Loads the LLaVA model (llava-hf directory or GGUF pair) with a progress bar.
    /// Notes stay held: the caller releases them once its model-dependent checks pass.
    pub fn load_llava(&self, model_dir: &Path) -> Result<Llava, Failure> {
        load_llava_held(model_dir, self.mmproj.as_deref(), self.device, self.quant)
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    g: GenArgs,
    /// Image file; without it the prompt is text only. Repeat it for several images: each
    /// `<image>` of the prompt takes the next one, in order.
    #[arg(long, conflicts_with = "messages")]
    image: Vec<PathBuf>,
    /// The question.
    #[arg(
        long,
        required_unless_present = "messages",
        conflicts_with = "messages"
    )]
    prompt: Option<String>,
    /// An OpenAI-style conversation (JSON `messages`), rendered with the model's template;
    /// `-` reads it from stdin. Images come from its `image_url` parts.
    #[arg(long)]
    messages: Option<String>,
    /// The prompt format: `vicuna_v1` (LLaVA-1.5, llava-v1.6-vicuna), `mistral_instruct`
    /// (llava-v1.6-mistral) or `raw` (the prompt verbatim). A --messages conversation is
    /// rendered in vicuna_v1 or mistral_instruct.
    #[arg(long, value_enum, default_value = "vicuna_v1")]
    template: TemplateArg,
    /// Write the image as the model saw it, pruned patches dimmed, kept ones outlined.
    #[arg(long)]
    save_kept: Option<PathBuf>,
    /// Replace an existing --save-kept file.
    #[arg(long)]
    force: bool,
    /// Print one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
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

fn main() -> ExitCode {
    devices::quiet_headless_probe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // print! would panic on a failed write (`--help > /dev/full`).
                if let Err(f) = validate::print_stdout(&e.to_string()) {
                    if f.code != errors::BROKEN_PIPE {
                        eprintln!("error: {:#}", f.err);
                    }
                    return ExitCode::from(f.code);
                }
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
    if let Some(t) = cli.threads {
        if t == 0 || t > MAX_THREADS {
            eprintln!("error: --threads must be between 1 and {MAX_THREADS}, got {t}");
            return ExitCode::from(2);
        }
    }
    errors::install_panic_hook();
    // The command runs on the CPU backend's pool (its workers persist; none is spawned per op).
    let threads = cli.threads;
    let run_cmd = || match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Chat(a) => chat::chat(a),
        Cmd::Quantize(a) => quantize(a),
        Cmd::Pull(a) => pull::pull(a),
        Cmd::Info {
            model,
            shape,
            device,
            kv_dtype,
            json,
        } => info::info(
            model.as_deref(),
            shape.as_deref(),
            match device {
                DeviceArg::Auto => info::InfoDevice::Auto,
                DeviceArg::Gpu => info::InfoDevice::Gpu,
                DeviceArg::Cpu => info::InfoDevice::Cpu,
            },
            kv_dtype.dtype(),
            json,
        ),
        Cmd::Devices { json } => devices::devices(json),
        Cmd::BenchKernels { quick } => bench_kernels(quick),
        Cmd::Tune { quick, json } => tune(quick, json),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::QuantEval(a) => quant_eval::quant_eval(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::EvalMerge(a) => eval::merge(a),
        Cmd::Score(a) => score::score(a),
        Cmd::Sweep(a) => sweep::sweep(a),
        Cmd::Serve(a) => serve::serve(a),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine_core::cpu::with_threads(threads, run_cmd)
    }));
    // A failure's error line is all it says; notes held back for a successful run go out.
    if matches!(result, Ok(Ok(()))) {
        errors::release_notes();
    } else {
        errors::drop_notes();
    }
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // The reader closed stdout (`| head -c1`): end quietly, as other Unix tools do.
        Ok(Err(f)) if f.code == errors::BROKEN_PIPE => ExitCode::from(f.code),
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
    // No adapter (or a VISI_ADAPTER naming none) is the user's to fix: classify, exit 2.
    let v = engine_wgpu::bench::kernel_bench(&engine_wgpu::GpuOptions::default(), quick)
        .map_err(classify)?;
    validate::println_stdout(&serde_json::to_string_pretty(&v).map_err(|e| internal(e.into()))?)
}

fn tune(quick: bool, json_out: bool) -> Result<(), Failure> {
    let v =
        engine_wgpu::tune::tune(&engine_wgpu::GpuOptions::default(), quick).map_err(classify)?;
    if let Some(n) = v["note"].as_str() {
        errors::note(n);
    }
    errors::release_notes();
    if json_out {
        return validate::println_stdout(
            &serde_json::to_string(&v).map_err(|e| internal(e.into()))?,
        );
    }
    let mut out = format!("adapter {}\n", v["adapter"].as_str().unwrap_or("?"));
    for c in v["classes"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<24} {:<16} {:.2} ms\n",
            c["class"].as_str().unwrap_or("?"),
            c["winner"].as_str().unwrap_or("?"),
            c["seconds"].as_f64().unwrap_or(0.0) * 1e3
        );
        for r in c["candidates"].as_array().into_iter().flatten() {
            out += &format!(
                "    {:<16} {:.2} ms\n",
                r["variant"].as_str().unwrap_or("?"),
                r["seconds"].as_f64().unwrap_or(0.0) * 1e3
            );
        }
    }
    if let Some(p) = v["cache"].as_str() {
        out += &format!("cached in {p}\n");
    }
    validate::print_stdout(&out)
}

/// Reads `--prune`: inline JSON or `@file.json`.
pub(crate) fn parse_prune(arg: &str) -> anyhow::Result<PruneConfig> {
    let (text, origin) = match arg.strip_prefix('@') {
        // A regular file of bounded size: `@/dev/zero` or a FIFO must not hang or grow.
        Some(path) => (
            engine_core::files::read_text_limited(
                Path::new(path),
                engine_core::files::MAX_CONFIG_BYTES,
            )
            .context("--prune")?,
            path.to_string(),
        ),
        None => (arg.to_string(), "--prune".to_string()),
    };
    // JSON, or the short form `METHOD[:KEEP]` (`visionzip:64`-style budgets).
    PruneConfig::parse_arg(&text).map_err(|e| anyhow!("{origin}: {e}"))
}

/// The prompt `run` was given: `--prompt` with a template, or a `--messages` conversation
/// rendered with the model's template (its images loaded, relative paths against the
/// messages file's folder).
struct RunPrompt {
    /// The text before tokenisation (`<image>` where each image goes).
    text: String,
    /// The images, in prompt order.
    images: Vec<RgbImage>,
}

/// Reads `--messages FILE|-` (a regular file, size-limited).
fn read_messages(arg: &str) -> anyhow::Result<(Vec<models::chat::Message>, Option<PathBuf>)> {
    use std::io::Read;
    let limit = models::chat::MAX_MESSAGES_BYTES;
    let (text, base) = if arg == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_string(&mut buf)
            .context("--messages -: cannot read stdin")?;
        (buf, None)
    } else {
        let p = Path::new(arg);
        let meta = std::fs::metadata(p).with_context(|| format!("--messages {arg}"))?;
        if !meta.is_file() {
            return Err(anyhow!("--messages {arg}: not a regular file"));
        }
        let mut buf = String::new();
        std::fs::File::open(p)
            .and_then(|f| f.take(limit + 1).read_to_string(&mut buf))
            .with_context(|| format!("--messages {arg}"))?;
        (buf, p.parent().map(Path::to_path_buf))
    };
    if text.len() as u64 > limit {
        return Err(anyhow!("--messages {arg}: larger than {limit} bytes"));
    }
    let msgs = models::chat::parse_messages(&text).map_err(|e| anyhow!("--messages {arg}: {e}"))?;
    Ok((msgs, base))
}

/// Everything `run` needs about its prompt, checked before any model loads.
fn run_prompt(a: &RunArgs) -> Result<RunPrompt, Failure> {
    if let Some(arg) = &a.messages {
        if matches!(a.template, TemplateArg::Raw) {
            return Err(bad_input(anyhow!(
                "--messages is rendered with the model's template; --template raw does not apply"
            )));
        }
        let (msgs, base) = read_messages(arg).map_err(bad_input)?;
        let template = match a.template {
            TemplateArg::MistralInstruct => Template::MistralInstruct,
            _ => Template::VicunaV1,
        };
        let r = models::chat::render(template, &msgs).map_err(|e| bad_input(e.into()))?;
        let images = r
            .images
            .iter()
            .map(|u| models::chat::load_image_url(u, base.as_deref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_input(e.into()))?;
        return Ok(RunPrompt {
            text: r.text,
            images,
        });
    }
    let prompt = a.prompt.as_deref().unwrap_or_default();
    let template = match a.template {
        TemplateArg::VicunaV1 => Template::VicunaV1,
        TemplateArg::MistralInstruct => Template::MistralInstruct,
        TemplateArg::Raw => Template::Raw,
    };
    let images = a
        .image
        .iter()
        .map(|p| models::preprocess::load_image(p).map_err(|e| bad_input(e.into())))
        .collect::<Result<Vec<_>, _>>()?;
    // Template errors do not need the model: report them before loading it.
    let text = template
        .render_images(prompt, images.len())
        .map_err(|e| bad_input(e.into()))?;
    Ok(RunPrompt { text, images })
}

/// Text-only generation from a llama.cpp GGUF file, on either backend (both dequantise
/// GGUF blocks inside their matmul and embedding kernels).
fn run_gguf(a: &RunArgs, sampling: SamplingParams, p: RunPrompt) -> Result<(), Failure> {
    if !p.images.is_empty() {
        return Err(bad_input(anyhow!(
            "an image with a GGUF text model needs its --mmproj file (llama.cpp's mmproj-*.gguf)"
        )));
    }
    if a.save_kept.is_some() {
        return Err(bad_input(anyhow!("--save-kept needs --image")));
    }
    validate::input_file("--model", Path::new(&a.g.model))?;
    let backend = open_backend(a.g.device)?;
    let dev = backend.device_info();
    let t0 = std::time::Instant::now();
    let m = models::gguf::GgufTextModel::load(std::path::Path::new(&a.g.model), backend.clone())
        .map_err(classify)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    validate::text_fits_vocab(
        m.tokenizer.get_vocab(true).keys(),
        m.config.max_position_embeddings,
        &p.text,
    )
    .map_err(bad_input)?;
    let ids = m.encode(&p.text).map_err(|e| bad_input(e.into()))?;
    errors::release_notes();
    let t1 = std::time::Instant::now();
    let (tokens, _, timings) = m
        .generate_timed_kv(
            backend.clone(),
            &ids,
            a.g.max_new_tokens,
            sampling,
            a.g.kv_dtype.dtype(),
        )
        .map_err(classify)?;
    let gen_ms = t1.elapsed().as_secs_f64() * 1e3;
    let out = m
        .tokenizer
        .decode(&tokens, true)
        .map_err(|e| internal(anyhow!("decoding: {e}")))?;
    if a.json {
        let j = json!({
            "text": out,
            "prompt": p.text,
            "tokens": tokens,
            "prompt_tokens": ids.len(),
            "timings_ms": {
                "load": load_ms,
                "generate": gen_ms,
                "prefill": timings.prefill_ms,
                "decode": timings.decode_ms,
            },
            "decode_steps": timings.decode_steps,
            "kv_dtype": a.g.kv_dtype.dtype().name(),
            "threads": rayon_threads(&dev),
            "device": { "backend": dev.backend, "adapter": dev.adapter, "api": dev.api },
        });
        validate::println_stdout(&j.to_string())?;
    } else {
        validate::println_stdout(&out)?;
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
    let sampling = a.g.sampling()?;
    let prune = a.g.prune_config()?;
    let model_dir = a.g.model_path()?;
    if a.g.is_gguf() && a.g.mmproj.is_none() && !a.image.is_empty() {
        return Err(bad_input(anyhow!(
            "--image with a GGUF text model needs its --mmproj file (llama.cpp's mmproj-*.gguf)"
        )));
    }
    for p in &a.image {
        validate::input_file("--image", p)?;
    }
    let text_gguf = a.g.is_gguf() && a.g.mmproj.is_none();
    // The cheap checks first: images are decoded (up to the decode limit each) only once
    // the output file and the pruning config are known to be fine.
    if let Some(path) = &a.save_kept {
        if a.image.is_empty() && a.messages.is_none() {
            return Err(bad_input(anyhow!("--save-kept needs --image")));
        }
        if !text_gguf {
            validate::output_file("--save-kept", path, "png", a.force)?;
        }
    }
    if !text_gguf {
        // Input files are regular files (a FIFO would hang, a device never ends).
        if a.g.is_gguf() {
            validate::input_file("--model", Path::new(&a.g.model))?;
        }
        if let Some(m) = &a.g.mmproj {
            validate::input_file("--mmproj", m)?;
        }
        if let Some(p) = &prune {
            validate::prune_fits(p, &model_dir, a.g.is_gguf())?;
        }
    }
    let p = run_prompt(&a)?;
    if text_gguf {
        return run_gguf(&a, sampling, p);
    }
    if a.save_kept.is_some() && p.images.is_empty() {
        return Err(bad_input(anyhow!("--save-kept needs --image")));
    }
    let image_mode = a.g.pad_mode();
    if !a.g.is_gguf() {
        // A prompt text far past the context, or an image whose pad-mode square is too
        // large, is refused before the weights load (config.json tells the architecture).
        validate::text_fits_dir(&model_dir, &p.text)?;
        if image_mode == PadMode::Pad && !p.images.is_empty() {
            let arch = models::LlavaConfig::from_file(&model_dir.join("config.json"))
                .map_err(classify)?
                .arch;
            for (i, img) in p.images.iter().enumerate() {
                validate::pad_fits_arch(arch, img, image_mode)
                    .map_err(|e| bad_input(e.context(format!("image {}", i + 1))))?;
            }
        }
    }

    // ---- model ----
    let llava = a.g.load_llava(&model_dir)?;
    for (i, img) in p.images.iter().enumerate() {
        validate::pad_fits(&llava, img, image_mode)
            .map_err(|e| bad_input(e.context(format!("image {}", i + 1))))?;
    }
    validate::text_fits(&llava, &p.text).map_err(bad_input)?;
    let counts = p
        .images
        .iter()
        .map(|i| llava.image_tokens_for(i.width(), i.height()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_input(e.into()))?;
    let prompt = llava
        .prompt_images(Template::Raw, &p.text, &counts)
        .map_err(|e| bad_input(e.into()))?;
    let (_, note) = llava
        .resolve_prune_for(prune.as_ref(), &prompt.image_spans)
        .map_err(|e| bad_input(e.into()))?;
    // Everything handed in is checked: the device note may go out now.
    errors::release_notes();
    let opts = GenerateOptions {
        template: Template::Raw,
        image_mode,
        max_new_tokens: a.g.max_new_tokens,
        sampling,
        prune,
        keep_first_logits: false,
        kv_dtype: a.g.kv_dtype.dtype(),
    };

    // ---- generation ----
    let encoded = p
        .images
        .iter()
        .map(|img| llava.encode_image(img, image_mode))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal(e.into()))?;
    let mut stdout = std::io::stdout().lock();
    let stream = !a.json;
    let delay = progress::token_delay();
    // A failed write (closed pipe, full disk) stops generation: the answer is being lost.
    let write_error: std::cell::RefCell<Option<std::io::Error>> = Default::default();
    let mut on_text = |t: &str| {
        if stream && write_error.borrow().is_none() {
            if let Err(e) = stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush()) {
                *write_error.borrow_mut() = Some(e);
            }
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    };
    let stop = || progress::stop_requested() || write_error.borrow().is_some();
    progress::set_generating(true);
    let gen = llava
        .generate_in(
            &mut llava.session(),
            &prompt,
            &encoded,
            &opts,
            &mut on_text,
            &stop,
        )
        .map_err(classify)?;
    progress::set_generating(false);
    drop(stdout);
    if let Some(e) = write_error.take() {
        return Err(validate::stdout_error(e));
    }

    if let Some(path) = &a.save_kept {
        let pic = draw_kept_images(
            &p.images,
            &encoded,
            llava.config(),
            gen.prune.kept_image_tokens.as_deref(),
        );
        validate::save_png("--save-kept", path, &pic, a.force)?;
    }

    let dev = llava.device_info();
    if a.json {
        let mut out = generation_json(&gen, &dev);
        out["prompt"] = json!(p.text);
        let text = serde_json::to_string(&out).map_err(|e| internal(e.into()))?;
        validate::println_stdout(&text)?;
    } else {
        validate::println_stdout("")?;
    }
    // Said once the answer is out, so that an error before it stays one line.
    if let Some(n) = &note {
        eprintln!("note: {n}");
    }
    if !a.json {
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
    progress::install_ctrl_c();
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
    validate::println_stdout(&format!("{}\n{}", w.text.display(), w.mmproj.display()))?;
    eprintln!(
        "wrote the pair: {} text matrices in {}, {} kept f16 (rows not whole blocks); CLIP tower f16",
        w.quantized,
        ty.name(),
        w.fallback_f16
    );
    Ok(())
}

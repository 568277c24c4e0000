//! `visi-cli eval` and `visi-cli eval-merge`: answer a LLaVA question file (or the MMBench
//! TSV) the way LLaVA's `model_vqa_loader.py` / `model_vqa_mmbench.py` do, into an answer
//! file their official scorers accept, with our timings and pruning facts in `metadata`.
//!
//! Nothing is lost: each answer is written and flushed as it finishes; a re-run on an
//! existing answers file keeps its answers, drops a cut-off last line and answers only the
//! rest (`--force` starts the file over instead); `--num-chunks/--chunk-idx` split the
//! questions as LLaVA's `get_chunk` does and `eval-merge` joins the chunk files in question
//! order.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use models::llava::{GenerateOptions, Generation, Llava};
use models::preprocess::PadMode;
use models::prompt::{Template, IMAGE_PLACEHOLDER};
use models::sampling::{Rng, SamplingParams};
use pruner::PruneConfig;
use serde_json::{json, Value};

use crate::answers::{
    answer_line, chunk_range, load_questions, question_order, read_answers, read_for_resume,
    ImageRef, Question,
};
use crate::errors::{bad_input, classify, internal, Failure, INTERRUPTED};
use crate::{progress, DeviceArg, ImageModeArg, QuantArg, TemplateArg};

/// Arguments of `visi-cli eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// llava-hf model directory, a cached hub repo id, or a GGUF text model (with --mmproj).
    #[arg(long)]
    pub model: String,
    /// llama.cpp's `mmproj-*.gguf` for a `.gguf` --model.
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// LLaVA question file (.jsonl: question_id, image, text[, category]) or the MMBench
    /// TSV (.tsv: index, question, hint, A-D, base64 image).
    #[arg(long)]
    pub questions: PathBuf,
    /// Directory the jsonl `image` paths are relative to.
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    /// Answer file (jsonl). If it exists, eval resumes it: answered questions are skipped.
    #[arg(long)]
    pub answers: PathBuf,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Split the questions into this many chunks (LLaVA's get_chunk) ...
    #[arg(long, default_value_t = 1)]
    pub num_chunks: usize,
    /// ... and answer this one (0-based).
    #[arg(long, default_value_t = 0)]
    pub chunk_idx: usize,
    /// Answer only the first N questions of the chunk.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `model_id` in the answers (default: the model's directory or file name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Start the answers file over instead of resuming it.
    #[arg(long)]
    pub force: bool,
}

/// Model and generation flags shared by `eval` and `sweep`.
#[derive(clap::Args)]
pub struct GenArgs {
    /// Pruning config as JSON, or @file.json (default: the paper's VisiPruner config).
    #[arg(long, conflicts_with = "no_prune")]
    pub prune: Option<String>,
    /// Run dense.
    #[arg(long)]
    pub no_prune: bool,
    /// Conversation template (LLaVA-1.5's scripts use vicuna_v1).
    #[arg(long, value_enum, default_value = "vicuna_v1")]
    pub template: TemplateArg,
    /// pad: LLaVA-1.5's expand2square (`image_aspect_ratio: pad`, what the official scripts
    /// ran); crop: llava-hf's processor.
    #[arg(long, value_enum, default_value = "pad")]
    pub image_mode: ImageModeArg,
    /// Answer length cap (LLaVA's model_vqa_loader default: 128).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// 0 is greedy (what the official scripts run).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Quantize the checkpoint's weight matrices as they load.
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
}

/// How each question is generated (everything but the pruning config).
#[derive(Clone, Debug)]
pub struct GenSettings {
    /// Conversation template.
    pub template: Template,
    /// Image preprocessing.
    pub image_mode: PadMode,
    /// Answer length cap.
    pub max_new_tokens: usize,
    /// Sampling (greedy by default).
    pub sampling: SamplingParams,
    /// `--quant`: the weight format the matrices run in (answers differ between formats).
    pub quant: Option<engine_core::QuantType>,
}

impl GenArgs {
    /// Checks the flags (no model needed) and returns the settings and the requested
    /// pruning (`None`: the paper default).
    pub fn settings(&self) -> anyhow::Result<(GenSettings, Option<PruneConfig>)> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: 0,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.validate()?;
        if self.max_new_tokens == 0 {
            anyhow::bail!("--max-new-tokens must be at least 1");
        }
        let prune = if self.no_prune {
            Some(PruneConfig::Dense)
        } else {
            self.prune.as_deref().map(crate::parse_prune).transpose()?
        };
        Ok((
            GenSettings {
                template: match self.template {
                    TemplateArg::VicunaV1 => Template::VicunaV1,
                    TemplateArg::MistralInstruct => Template::MistralInstruct,
                    TemplateArg::Raw => Template::Raw,
                },
                image_mode: match self.image_mode {
                    ImageModeArg::Crop => PadMode::Crop,
                    ImageModeArg::Pad => PadMode::Pad,
                },
                max_new_tokens: self.max_new_tokens,
                sampling,
                quant: self.quant.map(crate::quant_type),
            },
            prune,
        ))
    }
}

/// The settings an answers file records in every line's metadata, so that resuming with
/// other settings is refused instead of mixing two runs in one file.
///
/// Everything that changes an answer is in it: the pruning config, template, image mode,
/// length cap, sampling, and `--quant` (f16 and q4_0 answers differ). The model is checked
/// by `model_id`; the KV cache dtype is fixed for eval (f16, `run`'s default; no flag). The
/// device is left out on purpose, so an interrupted run may resume on another machine
/// (backends can differ in rounding, not in what was asked). `quant` is recorded only when
/// set, so files written before it was recorded still resume without `--quant`.
pub fn settings_json(s: &GenSettings, prune: Option<&PruneConfig>) -> Value {
    let mut v = json!({
        "prune": prune.map_or(json!("default"), PruneConfig::to_json),
        "template": s.template.name(),
        "image_mode": match s.image_mode { PadMode::Crop => "crop", PadMode::Pad => "pad" },
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.sampling.temperature,
        "top_p": s.sampling.top_p,
        "seed": s.sampling.seed,
    });
    if let Some(q) = s.quant {
        v["quant"] = json!(q.name());
    }
    v
}

/// The one call into the generation core: `text` about `image`, prompted as LLaVA's
/// `model_vqa_loader` does (the template's user turn is `<image>\n` + text), no streaming,
/// stopping early on Ctrl-C.
pub fn generate_answer(
    llava: &Llava,
    text: &str,
    image: &RgbImage,
    s: &GenSettings,
    prune: Option<&PruneConfig>,
) -> engine_core::Result<Generation> {
    // vicuna_v1 places `<image>\n` itself; a raw prompt gets it here.
    let user = match s.template {
        Template::VicunaV1 | Template::MistralInstruct => text.to_string(),
        Template::Raw => format!("{IMAGE_PLACEHOLDER}\n{text}"),
    };
    let n = llava.image_tokens_for(image.width(), image.height())?;
    let prompt = llava.prompt_images(s.template, &user, &[n])?;
    let encoded = llava.encode_image(image, s.image_mode)?;
    let opts = GenerateOptions {
        template: s.template,
        image_mode: s.image_mode,
        max_new_tokens: s.max_new_tokens,
        sampling: s.sampling,
        prune: prune.cloned(),
        keep_first_logits: false,
        // The default KV cache (f16), as `run` without --kv-dtype.
        ..Default::default()
    };
    // No streaming; the debug delay (VISI_DEBUG_TOKEN_DELAY_MS) lets tests interrupt and
    // kill a run of the tiny model mid-answer.
    let delay = progress::token_delay();
    llava.generate_in(
        &mut llava.session(),
        &prompt,
        std::slice::from_ref(&encoded),
        &opts,
        &mut |_| {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
        },
        &progress::stop_requested,
    )
}

/// What a run over one answers file will do, worked out before the model loads.
pub struct Plan {
    /// The questions of this chunk, in file order.
    pub questions: Vec<Question>,
    /// The answers file.
    pub answers: PathBuf,
    /// Keys already answered.
    pub done: HashSet<String>,
    /// Metadata of the answers already there (for the summary).
    pub prior_meta: Vec<Value>,
    /// The file's new content before appending (a repaired or emptied file).
    pub rewrite: Option<String>,
    /// Recorded in each answer's metadata.
    pub settings: Value,
}

impl Plan {
    /// Questions still to answer.
    pub fn todo(&self) -> impl Iterator<Item = &Question> {
        self.questions
            .iter()
            .filter(|q| !self.done.contains(&q.key()))
    }
}

/// Checks the answers file against this chunk: resumes it (or starts it over with
/// `force`), refusing a file that holds other questions' answers or other settings.
pub fn plan(
    questions: Vec<Question>,
    answers: &Path,
    force: bool,
    settings: Value,
    model_id: &str,
) -> anyhow::Result<Plan> {
    let parent = answers
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!(
            "--answers {}: directory {} does not exist",
            answers.display(),
            parent.display()
        );
    }
    // Answers are appended (and a repaired file rewritten through a temp file beside it)
    // after the model loads: find out now whether they can be.
    crate::validate::can_write_in(parent)
        .map_err(|e| anyhow!("--answers {}: {e}", answers.display()))?;
    if std::fs::metadata(answers).is_ok_and(|m| m.is_file()) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(answers)
            .map_err(|e| anyhow!("--answers {}: cannot append: {e}", answers.display()))?;
    }
    let mut p = Plan {
        questions,
        answers: answers.to_path_buf(),
        done: HashSet::new(),
        prior_meta: Vec::new(),
        rewrite: None,
        settings,
    };
    match std::fs::symlink_metadata(answers) {
        Err(_) => return Ok(p),
        Ok(m) if !m.is_file() => {
            anyhow::bail!("--answers {}: not a regular file", answers.display())
        }
        Ok(_) if force => {
            p.rewrite = Some(String::new());
            return Ok(p);
        }
        Ok(_) => {}
    }
    let existing = read_for_resume(answers)?;
    let order = question_order(&p.questions);
    let mut outside = 0;
    let mut first_outside = None;
    for a in &existing.answers {
        let key = a.key();
        if !order.contains_key(&key) {
            outside += 1;
            first_outside.get_or_insert_with(|| a.id.to_string());
            continue;
        }
        if let Some(m) = a.raw.get("model_id").and_then(Value::as_str) {
            if m != model_id {
                anyhow::bail!(
                    "--answers {}: question {} was answered by model {m:?}, not {model_id:?}; pass --force to start over, use another file, or --model-id",
                    answers.display(),
                    a.id
                );
            }
        }
        let meta = a.raw.get("metadata").cloned().unwrap_or(Value::Null);
        if let Some(s) = meta.get("settings") {
            if *s != p.settings {
                anyhow::bail!(
                    "--answers {}: question {} was answered with other settings ({s}, now {}); pass --force to start over or use another file",
                    answers.display(),
                    a.id,
                    p.settings
                );
            }
        }
        if !p.done.insert(key) {
            anyhow::bail!(
                "--answers {}: question {} is answered twice",
                answers.display(),
                a.id
            );
        }
        p.prior_meta.push(meta);
    }
    if outside > 0 {
        anyhow::bail!(
            "--answers {}: holds {outside} answers to questions outside this question file and chunk (first: {}); pass --force to start over or use another file",
            answers.display(),
            first_outside.unwrap_or_default()
        );
    }
    p.rewrite = existing.repaired;
    Ok(p)
}

/// Totals of one run over an answers file.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Answers written by this run.
    pub new: usize,
    /// Answers that were already there.
    pub resumed: usize,
    /// Seconds this run spent answering.
    pub wall_s: f64,
    /// Means over every answer in the file that carries our metadata.
    pub mean_ttft_ms: f64,
    /// Mean kept image tokens.
    pub mean_kept_image_tokens: f64,
    /// Mean prefill FLOPs as a fraction of dense.
    pub mean_flops_fraction: f64,
    /// Answers the means are over.
    pub measured: usize,
}

impl RunSummary {
    /// New answers per second of this run.
    pub fn questions_per_s(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.new as f64 / self.wall_s
        } else {
            0.0
        }
    }

    /// The closing summary line.
    pub fn line(&self) -> String {
        format!(
            "[{} answered now, {} resumed; {:.2} questions/s; over {} answers: mean time to first token {:.1} ms, mean kept image tokens {:.1}, mean prefill FLOPs {:.3} of dense]",
            self.new,
            self.resumed,
            self.questions_per_s(),
            self.measured,
            self.mean_ttft_ms,
            self.mean_kept_image_tokens,
            self.mean_flops_fraction
        )
    }

    fn from_meta(meta: &[Value]) -> Self {
        let mut s = RunSummary::default();
        for m in meta {
            let (Some(t), Some(k), Some(f)) = (
                m["ttft_ms"].as_f64(),
                m["kept_image_tokens"].as_f64(),
                m["prefill_flops_fraction"].as_f64(),
            ) else {
                continue;
            };
            s.measured += 1;
            s.mean_ttft_ms += t;
            s.mean_kept_image_tokens += k;
            s.mean_flops_fraction += f;
        }
        if s.measured > 0 {
            let n = s.measured as f64;
            s.mean_ttft_ms /= n;
            s.mean_kept_image_tokens /= n;
            s.mean_flops_fraction /= n;
        }
        s
    }
}

/// Decodes a question's image (MMBench's base64 through the in-memory decoder, with the
/// same limits and colour conversion as a file).
pub fn question_image(q: &Question) -> anyhow::Result<RgbImage> {
    match &q.image {
        ImageRef::File(p) => Ok(models::preprocess::load_image(p)?),
        ImageRef::Base64(b) => {
            let bytes =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b.as_bytes())
                    .map_err(|e| anyhow!("question {}: image is not base64: {e}", q.id))?;
            models::preprocess::decode_image(&bytes, "base64 image")
                .map_err(|e| anyhow!("question {}: base64 image: {e}", q.id))
        }
    }
}

/// A random 22-character id in shortuuid's alphabet, as LLaVA's `answer_id`.
fn answer_id(rng: &mut Rng) -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    (0..22)
        .map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// `model_id` from the model path: its last component (LLaVA's get_model_name_from_path).
pub fn default_model_id(model: &str) -> String {
    Path::new(model.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| model.to_string())
}

/// Answers every question of `plan` still unanswered, appending to its file.
pub fn execute(
    llava: &Llava,
    plan: &Plan,
    s: &GenSettings,
    prune: Option<&PruneConfig>,
    model_id: &str,
    label: &str,
) -> Result<RunSummary, Failure> {
    if let Some(text) = &plan.rewrite {
        engine_core::files::write_files_atomic(&[(plan.answers.as_path(), text.as_bytes())], true)
            .map_err(|e| internal(e.into()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.answers)
        .with_context(|| format!("--answers {}", plan.answers.display()))
        .map_err(internal)?;
    let todo: Vec<&Question> = plan.todo().collect();
    let bar = progress_bar(todo.len(), label);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    let mut rng = Rng::new(seed);
    let mut meta_all = plan.prior_meta.clone();
    let t0 = Instant::now();
    let mut new = 0;
    progress::set_generating(true);
    let result = (|| -> Result<(), Failure> {
        for q in todo {
            let img = question_image(q).map_err(bad_input)?;
            let gen = generate_answer(llava, &q.model_text, &img, s, prune).map_err(|e| {
                let f = classify(e);
                Failure {
                    err: f.err.context(format!("question {}", q.id)),
                    ..f
                }
            })?;
            if gen.interrupted {
                // A cut-short answer is not an answer: leave the question for the resume.
                return Err(Failure {
                    code: INTERRUPTED,
                    err: anyhow!(
                        "interrupted; {new} answers written this run to {} (run the same command again to resume)",
                        plan.answers.display()
                    ),
                });
            }
            let meta = metadata(&gen, &plan.settings);
            let mut fields = vec![("question_id", q.id.clone())];
            if q.mcq.is_some() {
                fields.push(("round_id", json!(0)));
            }
            fields.push(("prompt", json!(q.text)));
            // LLaVA: batch_decode(skip_special_tokens=True)[0].strip().
            fields.push(("text", json!(gen.text.trim())));
            if let Some(m) = &q.mcq {
                fields.push(("options", json!(m.options)));
                fields.push(("option_char", json!(m.option_char)));
            }
            fields.push(("answer_id", json!(answer_id(&mut rng))));
            fields.push(("model_id", json!(model_id)));
            fields.push(("metadata", meta.clone()));
            let line = answer_line(&fields);
            file.write_all(format!("{line}\n").as_bytes())
                .and_then(|_| file.flush())
                .with_context(|| format!("writing {}", plan.answers.display()))
                .map_err(internal)?;
            meta_all.push(meta);
            new += 1;
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        Ok(())
    })();
    progress::set_generating(false);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result?;
    let mut sum = RunSummary::from_meta(&meta_all);
    sum.new = new;
    sum.resumed = plan.done.len();
    sum.wall_s = t0.elapsed().as_secs_f64();
    Ok(sum)
}

fn progress_bar(len: usize, label: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || len == 0 {
        return None;
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(&format!(
        "{label} {{bar:30}} {{pos}}/{{len}} questions ({{per_sec}}, ETA {{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// Our fields in an answer's `metadata`.
fn metadata(gen: &Generation, settings: &Value) -> Value {
    let f = &gen.flops;
    let kept = gen
        .prune
        .kept_image_tokens
        .as_ref()
        .map_or(gen.image_tokens, Vec::len);
    json!({
        "fusion_layer": gen.prune.fusion_layer,
        "kept_image_tokens": kept,
        "image_tokens": gen.image_tokens,
        "prefill_flops": f.prefill,
        "prefill_flops_dense": f.prefill_dense,
        "prefill_flops_fraction": if f.prefill_dense > 0 { f.prefill as f64 / f.prefill_dense as f64 } else { 1.0 },
        "ttft_ms": gen.timings.vision_ms + gen.timings.prefill_ms,
        "new_tokens": gen.tokens.len(),
        "prune_method": gen.prune.method,
        "settings": settings,
    })
}

/// The checked inputs of a model run: where the model is and how to load it.
pub struct ModelSpec {
    /// `--model` (a directory or a .gguf file).
    pub dir: PathBuf,
    /// `--mmproj`.
    pub mmproj: Option<PathBuf>,
}

/// Checks `--model` / `--mmproj` without loading anything.
pub fn model_spec(model: &str, mmproj: Option<&Path>) -> anyhow::Result<ModelSpec> {
    let gguf = model.ends_with(".gguf");
    match (gguf, mmproj) {
        (true, None) => anyhow::bail!(
            "--model {model}: a GGUF text model needs its --mmproj file (eval needs the vision tower)"
        ),
        (false, Some(m)) => anyhow::bail!(
            "--mmproj {} needs a GGUF text model (--model <file>.gguf)",
            m.display()
        ),
        (true, Some(m)) => {
            for (flag, p) in [("--model", Path::new(model)), ("--mmproj", m)] {
                if !p.is_file() {
                    anyhow::bail!("{flag} {}: not found", p.display());
                }
            }
            Ok(ModelSpec {
                dir: PathBuf::from(model),
                mmproj: Some(m.to_path_buf()),
            })
        }
        (false, None) => Ok(ModelSpec {
            dir: models::hub::resolve_model(model).map_err(|e| anyhow!("--model: {e}"))?,
            mmproj: None,
        }),
    }
}

/// Loads the model with a progress bar on a terminal.
pub fn load_model(spec: &ModelSpec, g: &GenArgs) -> Result<Llava, Failure> {
    crate::load_llava_held(&spec.dir, spec.mmproj.as_deref(), g.device, g.quant)
}

/// Reads the question file, checks the chunk flags and takes this chunk.
pub fn chunk_questions(
    path: &Path,
    image_folder: Option<&Path>,
    num_chunks: usize,
    chunk_idx: usize,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Question>> {
    if num_chunks == 0 {
        anyhow::bail!("--num-chunks must be at least 1");
    }
    if chunk_idx >= num_chunks {
        anyhow::bail!(
            "--chunk-idx {chunk_idx} is out of range for --num-chunks {num_chunks} (0 to {})",
            num_chunks - 1
        );
    }
    if limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    let fmt = crate::answers::question_format(path)?;
    if fmt == crate::answers::QuestionFormat::Jsonl && image_folder.is_none() {
        anyhow::bail!("--image-folder is needed with a jsonl question file");
    }
    let mut qs = load_questions(path, image_folder)?;
    let r = chunk_range(qs.len(), num_chunks, chunk_idx);
    qs.truncate(r.end);
    qs.drain(..r.start);
    if let Some(n) = limit {
        qs.truncate(n);
    }
    Ok(qs)
}

/// `visi-cli eval`.
pub fn eval(a: EvalArgs) -> Result<(), Failure> {
    progress::install_ctrl_c();
    // ---- everything handed in, checked before the model loads ----
    let (settings, prune) = a.gen.settings().map_err(bad_input)?;
    let spec = model_spec(&a.model, a.mmproj.as_deref()).map_err(bad_input)?;
    let questions = chunk_questions(
        &a.questions,
        a.image_folder.as_deref(),
        a.num_chunks,
        a.chunk_idx,
        a.limit,
    )
    .map_err(bad_input)?;
    if questions.is_empty() {
        crate::errors::note(format!(
            "chunk {} of {} holds no questions",
            a.chunk_idx, a.num_chunks
        ));
    }
    let model_id = a
        .model_id
        .clone()
        .unwrap_or_else(|| default_model_id(&a.model));
    let plan = plan(
        questions,
        &a.answers,
        a.force,
        settings_json(&settings, prune.as_ref()),
        &model_id,
    )
    .map_err(bad_input)?;
    if plan.todo().next().is_none() {
        let sum = RunSummary {
            resumed: plan.done.len(),
            ..RunSummary::from_meta(&plan.prior_meta)
        };
        // A repaired file is written back; an empty chunk still leaves its (empty) file,
        // so that merging finds it.
        if plan.rewrite.is_some() || !a.answers.exists() {
            let text = plan.rewrite.as_deref().unwrap_or("");
            engine_core::files::write_files_atomic(&[(a.answers.as_path(), text.as_bytes())], true)
                .map_err(|e| internal(e.into()))?;
        }
        if !plan.questions.is_empty() {
            eprintln!("all {} questions already answered", plan.done.len());
        }
        eprintln!("{}", sum.line());
        return Ok(());
    }

    // ---- model ----
    let llava = load_model(&spec, &a.gen)?;
    let (_, note) = llava
        .resolve_prune(prune.as_ref())
        .map_err(|e| bad_input(e.into()))?;
    crate::errors::release_notes();
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    let sum = execute(&llava, &plan, &settings, prune.as_ref(), &model_id, "eval")?;
    eprintln!("{}", sum.line());
    Ok(())
}

/// Arguments of `visi-cli eval-merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// The question file the chunks answered (gives the order).
    #[arg(long)]
    pub questions: PathBuf,
    /// Merged answers file.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Chunk answer files.
    #[arg(required = true)]
    pub chunks: Vec<PathBuf>,
}

/// `visi-cli eval-merge`: the chunk files joined in question order, each line as written.
pub fn merge(a: MergeArgs) -> Result<(), Failure> {
    let questions = load_questions(&a.questions, None).map_err(bad_input)?;
    // The merged file goes through a temp file beside --out and a rename: its directory
    // must exist and take files, and --out must be a file (or nothing) there.
    let parent = a
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(bad_input(anyhow!(
            "--out {}: directory {} does not exist",
            a.out.display(),
            parent.display()
        )));
    }
    if std::fs::metadata(&a.out).is_ok_and(|m| !m.is_file()) {
        return Err(bad_input(anyhow!(
            "--out {}: exists and is not a regular file",
            a.out.display()
        )));
    }
    if a.out.exists() && !a.force {
        return Err(bad_input(anyhow!(
            "--out {}: already exists (pass --force to overwrite)",
            a.out.display()
        )));
    }
    crate::validate::can_write_in(parent)
        .map_err(|e| bad_input(anyhow!("--out {}: {e}", a.out.display())))?;
    let order = question_order(&questions);
    let mut slots: Vec<Option<String>> = vec![None; questions.len()];
    let mut from: HashMap<usize, PathBuf> = HashMap::new();
    for c in &a.chunks {
        for ans in read_answers(c, "chunk").map_err(bad_input)? {
            let Some(&i) = order.get(&ans.key()) else {
                return Err(bad_input(anyhow!(
                    "chunk {}: question {} ({:?}) is not in --questions {}",
                    c.display(),
                    ans.id,
                    ans.prompt,
                    a.questions.display()
                )));
            };
            if let Some(prev) = from.insert(i, c.clone()) {
                return Err(bad_input(anyhow!(
                    "question {} is answered in both {} and {}",
                    ans.id,
                    prev.display(),
                    c.display()
                )));
            }
            slots[i] = Some(ans.line);
        }
    }
    let missing: Vec<&Question> = questions
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(q, _)| q)
        .collect();
    if let Some(q) = missing.first() {
        return Err(bad_input(anyhow!(
            "{} of {} questions have no answer in the chunks (first: {}); finish those chunks (eval resumes them) and merge again",
            missing.len(),
            questions.len(),
            q.id
        )));
    }
    let mut text = String::new();
    for l in slots.into_iter().flatten() {
        text.push_str(&l);
        text.push('\n');
    }
    engine_core::files::write_files_atomic(&[(a.out.as_path(), text.as_bytes())], a.force)
        .map_err(|e| internal(e.into()))?;
    eprintln!(
        "merged {} answers from {} chunk files into {}",
        questions.len(),
        a.chunks.len(),
        a.out.display()
    );
    Ok(())
}

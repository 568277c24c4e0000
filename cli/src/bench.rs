//! `visi-cli bench`: dense, VisiPruner and FastV side by side in one process, on a real
//! checkpoint or a synthetic LLaVA of a named shape, with the realised prefill speedup
//! next to the analytic FLOPs ratio of the schedule that ran, and kernel efficiency.
//!
//! Timing rules: every timed phase ends with a device sync (a read-back of the chosen
//! token, or `sync()`); methods are interleaved rep by rep so drift hits all of them alike;
//! per-layer times come from one extra profiled run that syncs after every layer, and are
//! never mixed into the headline numbers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use engine_core::{Backend, HostData, QuantType, Tensor};
use image::{Rgb, RgbImage};
use models::llama::{ImageSpan, Llama, PrefillStats};
use models::sampling::{Sampler, SamplingParams};
use models::session::{ImageInput, PrefixKey, PromptInput, Session};
use models::synthetic::{SyntheticLlava, SyntheticShape};
use models::{Llava, LlavaConfig};
use pruner::{
    Dense, FastV, FastVConfig, ForcedSchedule, LayerSchedule, PruneConfig, PruneReport, Pruner,
    VisiPruner,
};
use serde_json::{json, Value};

use crate::{bad_input, classify, internal, open_backend, DeviceArg, Failure};

/// Tokens before the image in a Vicuna-v1 LLaVA prompt (system prompt and "USER: ").
pub(crate) const PREFIX_TOKENS: usize = 35;

/// Default prompt length: the prefix, 576 image tokens and a 29-token question.
pub(crate) const DEFAULT_PROMPT_LEN: usize = 640;

/// Arguments of `visi-cli bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// llava-hf model directory (or a cached hub repo id) to benchmark.
    #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
    model: Option<String>,
    /// Synthetic LLaVA with seeded random f16 weights: tiny, llava-1b or llava-7b.
    #[arg(long)]
    shape: Option<String>,
    /// Timed repetitions per method (min and median are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Untimed runs per method first (pipeline compilation, pool warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Decode steps timed after the first token.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Prompt length: 35 prefix tokens, the image tokens, then a suffix up to this
    /// (default 640, or prefix + image tokens + 64 when those need more: LLaVA-NeXT shapes).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// VisiPruner decisions: `fusion=F,keep=K[,exit=E]` forced onto its code path, or
    /// `real` for the paper policy's own decisions. Default: 12/10/18 scaled to the depth.
    #[arg(long)]
    schedule: Option<String>,
    /// FastV settings.
    #[arg(long, default_value = "k=2,ratio=0.5")]
    fastv: String,
    /// Methods to run, comma-separated; dense always runs (it is the baseline).
    #[arg(long, default_value = "dense,visipruner,fastv")]
    methods: String,
    /// Leave out the kernel benchmark.
    #[arg(long)]
    skip_kernels: bool,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw per-layer sequence length and time, dense vs pruned, to this PNG (implies
    /// --layer-times).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Replace an existing --plot file.
    #[arg(long)]
    force: bool,
    /// One extra untimed run per method that syncs after every layer to time it.
    #[arg(long)]
    layer_times: bool,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Seed of the synthetic weights, pixels and prompt ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time a two-turn conversation instead: a fresh run on the whole conversation against
    /// the follow-up turn in the session that answered the first (reuse), per method.
    #[arg(long)]
    conversation: bool,
    /// Weight formats to compare, e.g. `f16,q8_0,q4_0,q4_k`: the methods run on the first;
    /// dense prefill and decode are then timed on each of the others (matrices quantized
    /// at load), reported side by side.
    #[arg(long, value_delimiter = ',')]
    quant: Vec<String>,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value = "f16")]
    kv_dtype: crate::KvDtypeArg,
}

/// `--quant` entries: `None` for the checkpoint's own floats (`f16`).
fn parse_quant_list(list: &[String]) -> anyhow::Result<Vec<Option<QuantType>>> {
    list.iter()
        .map(|s| match s.trim().to_ascii_lowercase().as_str() {
            "f16" | "none" => Ok(None),
            t => QuantType::parse(t).map(Some).ok_or_else(|| {
                anyhow!("--quant: unknown format {s:?} (f16, q8_0, q4_0, q4_1, q4_k)")
            }),
        })
        .collect()
}

/// Name of a `--quant` entry.
fn quant_name(q: Option<QuantType>) -> &'static str {
    q.map_or("f16", QuantType::name)
}

/// VisiPruner's decisions for the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    Forced(ForcedSchedule),
    Real,
}

fn parse_kv(text: &str, flag: &str, keys: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("{flag}: expected key=value, got {part:?}"))?;
        let k = k.trim();
        if !keys.contains(&k) {
            return Err(anyhow!(
                "{flag}: unknown key {k:?} (allowed: {})",
                keys.join(", ")
            ));
        }
        if out.iter().any(|(o, _)| o == k) {
            return Err(anyhow!("{flag}: {k} given twice"));
        }
        out.push((k.to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// `--methods`: names out of dense, visipruner, fastv; dense is added when missing.
fn parse_methods(text: &str) -> anyhow::Result<Vec<&'static str>> {
    let mut out = vec!["dense"];
    for m in text.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let name = match m {
            "dense" => "dense",
            "visipruner" => "visipruner",
            "fastv" => "fastv",
            _ => {
                return Err(anyhow!(
                    "--methods: unknown method {m:?} (expected dense, visipruner, fastv)"
                ))
            }
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

fn parse_usize(flag: &str, key: &str, v: &str) -> anyhow::Result<usize> {
    v.parse()
        .map_err(|_| anyhow!("{flag}: {key} must be a non-negative integer, got {v:?}"))
}

fn parse_schedule(text: &str) -> anyhow::Result<Schedule> {
    if text.trim() == "real" {
        return Ok(Schedule::Real);
    }
    let kv = parse_kv(text, "--schedule", &["fusion", "keep", "exit"])?;
    let get = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let need = |key: &str| {
        get(key).ok_or_else(|| anyhow!("--schedule: {key}= is required (fusion=F,keep=K[,exit=E])"))
    };
    Ok(Schedule::Forced(ForcedSchedule {
        fusion_layer: parse_usize("--schedule", "fusion", need("fusion")?)?,
        keep: parse_usize("--schedule", "keep", need("keep")?)?,
        text_only_from: get("exit")
            .map(|v| parse_usize("--schedule", "exit", v))
            .transpose()?,
    }))
}

fn parse_fastv(text: &str) -> anyhow::Result<FastVConfig> {
    let kv = parse_kv(text, "--fastv", &["k", "ratio"])?;
    let mut cfg = FastVConfig {
        k: 2,
        ratio: 0.5,
        keep: None,
    };
    for (k, v) in kv {
        match k.as_str() {
            "k" => cfg.k = parse_usize("--fastv", "k", &v)?,
            _ => {
                cfg.ratio = v
                    .parse()
                    .map_err(|_| anyhow!("--fastv: ratio must be a number, got {v:?}"))?
            }
        }
    }
    Ok(cfg)
}

/// The paper's 12/10/18 on 32 layers, scaled to `layers` and kept legal for
/// `shallow_mid` (fusion above it, exit two layers later at least, before the last).
pub(crate) fn default_schedule(layers: usize, shallow_mid: usize) -> ForcedSchedule {
    let scale = |x: usize| (x * layers + 16) / 32;
    let fusion = scale(12).max(shallow_mid + 1);
    let exit = scale(18).max(fusion + 2).min(layers.saturating_sub(2));
    ForcedSchedule {
        fusion_layer: fusion,
        keep: 10,
        text_only_from: (exit >= fusion + 2).then_some(exit),
    }
}

/// The model under test.
enum Model {
    Real(Box<Llava>, u64),
    Synth(Box<SyntheticLlava>),
}

impl Model {
    fn cfg(&self) -> &LlavaConfig {
        match self {
            Model::Real(l, _) => l.config(),
            Model::Synth(s) => &s.cfg,
        }
    }
    fn llama(&self) -> &Arc<Llama> {
        match self {
            Model::Real(l, _) => l.llama_arc(),
            Model::Synth(s) => &s.llama,
        }
    }
    /// Vision tower and projector over `pixels [3, S, S]` → `[N, H]`, synced.
    fn encode(&self, b: &dyn Backend, pixels: &[f32]) -> engine_core::Result<Tensor> {
        let s = self.cfg().vision.image_size;
        match self {
            Model::Real(l, _) => {
                let pv = models::preprocess::PixelValues {
                    data: pixels.to_vec(),
                    height: s,
                    width: s,
                };
                // LLaVA-NeXT: every tile of the benchmark layout takes the same pixels.
                match models::synthetic::bench_next_layout(l.config())? {
                    Some(layout) => {
                        let tiles = vec![pv; 1 + layout.tiles.0 * layout.tiles.1];
                        Ok(l.encode_tiles(RgbImage::new(1, 1), layout, tiles)?.embeds)
                    }
                    None => Ok(l.encode_pixels(RgbImage::new(1, 1), pv)?.embeds),
                }
            }
            Model::Synth(m) => {
                let px = b.upload(HostData::F32(pixels), vec![3, s, s].into())?; // [3, S, S]
                let e = m.encode(b, &px)?; // [N, H]
                b.sync()?;
                Ok(e)
            }
        }
    }
    fn describe(&self) -> Value {
        match self {
            Model::Real(l, bytes) => json!({
                "source": "checkpoint", "load_ms": l.load_ms(), "weight_bytes": bytes,
            }),
            Model::Synth(s) => json!({
                "source": "synthetic", "weights": "f16, seeded uniform ±1/sqrt(fan_in)",
                "load_ms": s.load_ms, "weight_bytes": s.weight_bytes,
                "host_weight_bytes": s.host_bytes,
            }),
        }
    }
}

/// One method's timed and structural results.
struct MethodRuns {
    name: &'static str,
    pruner: Box<dyn Pruner>,
    /// The prefix-reuse key of the config `pruner` was built from.
    key: PrefixKey,
    vision_ms: Vec<f64>,
    prefill_ms: Vec<f64>,
    decode_ms: Vec<f64>,
    stats: Option<PrefillStats>,
    kv_lens: Vec<usize>,
    kv_bytes: u64,
    report: Option<PruneReport>,
    layer_ms: Vec<f64>,
}

struct Once {
    vision_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
    stats: PrefillStats,
    kv_lens: Vec<usize>,
    kv_bytes: u64,
    layer_ms: Vec<f64>,
}

struct Input<'a> {
    ids: &'a [u32],
    span: ImageSpan,
    pixels: &'a [f32],
    decode_tokens: usize,
    kv_dtype: engine_core::DType,
}

/// Vision, prefill (through the first token) and `decode_tokens` greedy steps in a fresh
/// session; with `profile`, syncs after every layer and returns per-layer milliseconds.
fn run_once(
    m: &Model,
    backend: &Arc<dyn Backend>,
    inp: &Input,
    pruner: &mut dyn Pruner,
    key: &PrefixKey,
    profile: bool,
) -> engine_core::Result<Once> {
    let b = backend.as_ref();
    let t = Instant::now();
    let image = m.encode(b, inp.pixels)?; // [N, H]
    let vision_ms = ms(t);

    let t = Instant::now();
    let mut layer_ms = Vec::new();
    let mut mark = if profile {
        b.sync()?;
        Some(Instant::now())
    } else {
        None
    };
    let mut observe = |_l: usize| -> engine_core::Result<()> {
        if let Some(t0) = mark.as_mut() {
            b.sync()?;
            layer_ms.push(ms(*t0));
            *t0 = Instant::now();
        }
        Ok(())
    };
    let img = ImageInput {
        span: inp.span,
        key: 0,
        embeds: image,
    };
    let mut session = Session::new(m.llama().clone(), backend.clone());
    session.set_kv_dtype(inp.kv_dtype);
    let pre = session.prefill_observed(
        PromptInput {
            ids: inp.ids,
            images: std::slice::from_ref(&img),
        },
        pruner,
        key,
        inp.decode_tokens,
        &mut observe,
    )?;
    let mut greedy = Sampler::new(SamplingParams::default())?;
    // The first token, then exactly `decode_tokens` steps (an EOS from random weights must
    // not end the timing).
    let mut dec = session
        .decode(pre.logits, &mut greedy, inp.decode_tokens + 1)
        .ignore_eos();
    dec.next().transpose()?;
    let prefill_ms = ms(t);
    let t = Instant::now();
    for token in dec {
        token?;
    }
    let decode_ms = ms(t);
    Ok(Once {
        vision_ms,
        prefill_ms,
        decode_ms,
        stats: pre.stats,
        kv_lens: session.kv_lens(),
        kv_bytes: session.kv_bytes(),
        layer_ms,
    })
}

/// The follow-up question of `bench --conversation`: 29 text tokens.
const FOLLOWUP_TOKENS: usize = 29;

/// One conversation round of `bench --conversation`.
struct ConvRound {
    fresh_ttft_ms: f64,
    followup_ttft_ms: f64,
    tokens_identical: bool,
    first_logits_identical: bool,
    decisions_identical: bool,
    reused_tokens: usize,
    prompt_tokens: usize,
    recomputed_from_layer: Option<usize>,
}

/// Turn 1 (`ids`, answered with `decode_tokens` greedy tokens) in a session; then the
/// follow-up turn (turn 1, its answer, a 29-token question) timed twice through the first
/// token: in that session (image encoding cached, shared rows reused) and fresh. Both then
/// decode `decode_tokens` tokens, which must be identical, as must the pruning decisions.
#[allow(clippy::too_many_arguments)]
fn conversation_round(
    m: &Model,
    backend: &Arc<dyn Backend>,
    ids: &[u32],
    span: ImageSpan,
    pixels: &[f32],
    decode_tokens: usize,
    pruner: &mut dyn Pruner,
    key: &PrefixKey,
    seed: u64,
    kv_dtype: engine_core::DType,
) -> engine_core::Result<ConvRound> {
    let b = backend.as_ref();
    let greedy = || Sampler::new(SamplingParams::default());
    let embeds = m.encode(b, pixels)?; // [N, H]
    let image = ImageInput {
        span,
        key: seed,
        embeds,
    };
    let mut session = Session::new(m.llama().clone(), backend.clone());
    session.set_kv_dtype(kv_dtype);
    let pre = session.prefill(
        PromptInput {
            ids,
            images: std::slice::from_ref(&image),
        },
        pruner,
        key,
        decode_tokens + FOLLOWUP_TOKENS + 1,
    )?;
    let mut s = greedy()?;
    let answer: Vec<u32> = session
        .decode(pre.logits, &mut s, decode_tokens)
        .collect::<engine_core::Result<_>>()?;
    let mut ids2 = ids.to_vec();
    ids2.extend(&answer);
    let q2 = synthetic_ids(
        m.cfg(),
        PREFIX_TOKENS + bench_image_tokens(m.cfg()) + FOLLOWUP_TOKENS + 1,
        seed ^ 0x5eed,
    );
    ids2.extend(&q2[q2.len() - FOLLOWUP_TOKENS..]);
    let input2 = PromptInput {
        ids: &ids2,
        images: std::slice::from_ref(&image),
    };

    // Follow-up in the same session: the image encoding comes from the model's cache (a
    // real checkpoint re-runs `encode`, which hits it; synthetic weights keep `image`).
    b.sync()?;
    let t = Instant::now();
    if let Model::Real(..) = m {
        m.encode(b, pixels)?;
    }
    let re = session.prefill(input2, pruner, key, decode_tokens)?;
    let report_re = pruner.report();
    let mut s = greedy()?;
    let mut dec = session.decode(re.logits.clone(), &mut s, decode_tokens);
    let first = dec.next().transpose()?;
    let followup_ttft_ms = ms(t);
    let mut reuse_tokens: Vec<u32> = first.into_iter().collect();
    for tok in dec {
        reuse_tokens.push(tok?);
    }

    // Fresh run on the whole conversation, vision included.
    let t = Instant::now();
    let embeds = m.encode(b, pixels)?;
    let image_f = ImageInput {
        span,
        key: seed,
        embeds,
    };
    let mut fresh = Session::new(m.llama().clone(), backend.clone());
    fresh.set_kv_dtype(kv_dtype);
    let fr = fresh.prefill(
        PromptInput {
            ids: &ids2,
            images: std::slice::from_ref(&image_f),
        },
        pruner,
        key,
        decode_tokens,
    )?;
    let report_fr = pruner.report();
    let mut s = greedy()?;
    let mut dec = fresh.decode(fr.logits.clone(), &mut s, decode_tokens);
    let first = dec.next().transpose()?;
    let fresh_ttft_ms = ms(t);
    let mut fresh_tokens: Vec<u32> = first.into_iter().collect();
    for tok in dec {
        fresh_tokens.push(tok?);
    }
    let (lr, lf) = (b.to_vec_f32(&re.logits)?, b.to_vec_f32(&fr.logits)?);
    let first_logits_identical =
        lr.len() == lf.len() && lr.iter().zip(&lf).all(|(x, y)| x.to_bits() == y.to_bits());
    Ok(ConvRound {
        fresh_ttft_ms,
        followup_ttft_ms,
        tokens_identical: reuse_tokens == fresh_tokens,
        first_logits_identical,
        decisions_identical: report_re == report_fr
            && re.stats.layer_seq_lens == fr.stats.layer_seq_lens,
        reused_tokens: re.reused_tokens,
        prompt_tokens: ids2.len(),
        recomputed_from_layer: re.recomputed_from_layer,
    })
}

/// `bench --conversation`: follow-up TTFT with reuse against a fresh run, per method.
fn conversation_bench(
    a: &BenchArgs,
    model: &Model,
    backend: &Arc<dyn Backend>,
    ids: &[u32],
    pixels: &[f32],
    methods: &mut [MethodRuns],
    schedule: Schedule,
) -> Result<(), Failure> {
    let span = ImageSpan {
        start: PREFIX_TOKENS,
        end: PREFIX_TOKENS + bench_image_tokens(model.cfg()),
    };
    let mut rows = Vec::new();
    for mr in methods.iter_mut() {
        let mut rounds = Vec::new();
        for round in 0..a.warmup + a.reps {
            eprintln!("bench: conversation {} round {}", mr.name, round + 1);
            let r = conversation_round(
                model,
                backend,
                ids,
                span,
                pixels,
                a.decode_tokens,
                mr.pruner.as_mut(),
                &mr.key,
                a.seed,
                a.kv_dtype.dtype(),
            )
            .map_err(|e| internal(anyhow!("{}: {e}", mr.name)))?;
            if round >= a.warmup {
                rounds.push(r);
            }
        }
        let fresh: Vec<f64> = rounds.iter().map(|r| r.fresh_ttft_ms).collect();
        let follow: Vec<f64> = rounds.iter().map(|r| r.followup_ttft_ms).collect();
        let (_, fresh_med) = min_median(&fresh);
        let (_, follow_med) = min_median(&follow);
        let last = rounds.last();
        rows.push(json!({
            "method": mr.name,
            "fresh_ttft_ms": fresh_med,
            "followup_ttft_ms": follow_med,
            "ratio": follow_med / fresh_med.max(1e-9),
            "tokens_identical": rounds.iter().all(|r| r.tokens_identical),
            "first_logits_identical": rounds.iter().all(|r| r.first_logits_identical),
            "decisions_identical": rounds.iter().all(|r| r.decisions_identical),
            "prompt_tokens": last.map(|r| r.prompt_tokens),
            "reused_tokens": last.map(|r| r.reused_tokens),
            "recomputed_from_layer": last.and_then(|r| r.recomputed_from_layer),
            "fresh_ttft_ms_all": fresh,
            "followup_ttft_ms_all": follow,
        }));
    }
    let head = rows
        .iter()
        .find(|r| r["method"] == "visipruner")
        .or(rows.first())
        .cloned()
        .unwrap_or(Value::Null);
    let dev = backend.device_info();
    let report = json!({
        "model": model.describe(),
        "shape": a.shape,
        "device": { "backend": dev.backend, "adapter": dev.adapter },
        "schedule": format!("{schedule:?}"),
        "prompt_len": ids.len(),
        "answer_tokens": a.decode_tokens,
        "followup_question_tokens": FOLLOWUP_TOKENS,
        "reps": a.reps,
        "warmup": a.warmup,
        "conversation": head,
        "methods": rows,
    });
    if a.json {
        crate::validate::println_stdout(&report.to_string())?;
    } else {
        let mut out = format!(
            "visi bench --conversation on {} ({}): turn 1 {} tokens + {}-token answer + {}-token follow-up, median of {} reps\n",
            dev.adapter, dev.backend, ids.len(), a.decode_tokens, FOLLOWUP_TOKENS, a.reps
        );
        out += &format!(
            "{:<11} {:>15} {:>18} {:>7} {:>9} {:>9} {:>9}\n",
            "method",
            "fresh TTFT ms",
            "follow-up TTFT ms",
            "ratio",
            "reused",
            "tokens=",
            "decisions="
        );
        for r in &rows {
            out += &format!(
                "{:<11} {:>15.1} {:>18.1} {:>7.3} {:>9} {:>9} {:>9}\n",
                r["method"].as_str().unwrap_or("?"),
                r["fresh_ttft_ms"].as_f64().unwrap_or(0.0),
                r["followup_ttft_ms"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0),
                r["reused_tokens"].to_string(),
                r["tokens_identical"].to_string(),
                r["decisions_identical"].to_string(),
            );
        }
        crate::validate::print_stdout(&out)?;
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn min_median(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => (f64::NAN, f64::NAN),
        n if n % 2 == 1 => (s[0], s[n / 2]),
        n => (s[0], 0.5 * (s[n / 2 - 1] + s[n / 2])),
    }
}

fn stat(v: &[f64]) -> Value {
    let (min, med) = min_median(v);
    json!({ "min": min, "median": med, "all": v })
}

/// Image tokens of the benchmark image: LLaVA-1.5's fixed count, or for LLaVA-NeXT a square
/// image on the largest square pinpoint (llava-v1.6: 2x2 tiles, 2,880 patches + 48 newlines).
pub(crate) fn bench_image_tokens(cfg: &LlavaConfig) -> usize {
    match models::synthetic::bench_next_layout(cfg) {
        Ok(Some(l)) => l.num_tokens(),
        _ => cfg.image_tokens(),
    }
}

/// `--prompt-len`, or 640 when the image fits in it, else prefix + image tokens + 64.
fn prompt_len(a: &BenchArgs, cfg: &LlavaConfig) -> usize {
    let n = PREFIX_TOKENS + bench_image_tokens(cfg);
    a.prompt_len.unwrap_or(if n < DEFAULT_PROMPT_LEN {
        DEFAULT_PROMPT_LEN
    } else {
        n + 64
    })
}

/// Seeded vicuna-shaped ids: BOS, prefix, image placeholders, suffix.
pub(crate) fn synthetic_ids(cfg: &LlavaConfig, len: usize, seed: u64) -> Vec<u32> {
    let vocab = cfg.text.vocab_size.min(32000) as u64;
    let n_img = bench_image_tokens(cfg);
    let mut s = seed ^ 0x1d5;
    (0..len)
        .map(|i| {
            if i == 0 {
                1
            } else if (PREFIX_TOKENS..PREFIX_TOKENS + n_img).contains(&i) {
                cfg.image_token_index
            } else {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Skip the special ids 0..3.
                (3 + (s >> 33) % (vocab - 3)) as u32
            }
        })
        .collect()
}

pub(crate) fn synthetic_pixels(size: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37;
    (0..3 * size * size)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn dir_safetensors_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Entry point of `visi-cli bench`.
pub fn bench(a: BenchArgs) -> Result<(), Failure> {
    // ---- flags, checked before anything heavy ----
    if a.reps == 0 {
        return Err(bad_input(anyhow!("--reps must be at least 1")));
    }
    let shape = a
        .shape
        .as_deref()
        .map(SyntheticShape::parse)
        .transpose()
        .map_err(|e| bad_input(anyhow!("--shape: {e}")))?;
    let schedule_arg = a
        .schedule
        .as_deref()
        .map(parse_schedule)
        .transpose()
        .map_err(bad_input)?;
    let fastv = parse_fastv(&a.fastv).map_err(bad_input)?;
    let wanted = parse_methods(&a.methods).map_err(bad_input)?;
    let quants = parse_quant_list(&a.quant).map_err(bad_input)?;
    let main_quant = quants.first().copied().flatten();
    if let Some(p) = &a.plot {
        crate::validate::output_file("--plot", p, "png", a.force)?;
    }
    let model_dir = a
        .model
        .as_deref()
        .map(models::hub::resolve_model)
        .transpose()
        .map_err(|e| bad_input(anyhow!("--model: {e}")))?;
    // The config alone (no weights): everything that depends on the model's shape is
    // checked against it before the kernel benchmark and the load.
    let cfg = match (&model_dir, shape) {
        (Some(dir), _) => {
            let cfg = LlavaConfig::from_file(&dir.join("config.json")).map_err(classify)?;
            // Headers only: a broken checkpoint fails now, not after the kernel benchmark.
            let src = engine_core::weights::open_safetensors(dir).map_err(classify)?;
            models::checks::check_layers(
                &cfg,
                src.as_ref(),
                "config.json: text_config.num_hidden_layers",
            )
            .map_err(classify)?;
            cfg
        }
        (None, Some(s)) => s.config().map_err(classify)?,
        (None, None) => return Err(bad_input(anyhow!("give --model DIR or --shape NAME"))),
    };
    let layers = cfg.text.num_hidden_layers;
    let n_img = bench_image_tokens(&cfg);
    let prompt_len = prompt_len(&a, &cfg);
    if prompt_len < PREFIX_TOKENS + n_img + 1 {
        return Err(bad_input(anyhow!(
            "--prompt-len {} is too short: {PREFIX_TOKENS} prefix + {n_img} image tokens + at least 1",
            prompt_len
        )));
    }
    // Checked: `--prompt-len 18446744073709551615` must not wrap past the context check.
    if prompt_len
        .checked_add(a.decode_tokens)
        .is_none_or(|n| n > cfg.text.max_position_embeddings)
    {
        return Err(bad_input(anyhow!(
            "--prompt-len {} + --decode-tokens {} exceed the model's context of {}",
            prompt_len,
            a.decode_tokens,
            cfg.text.max_position_embeddings
        )));
    }

    // ---- pruners ----
    // The paper's config, its shallow_mid_layer scaled to shallow models (the 6-layer
    // fixtures the llama.cpp peer script uses).
    let (paper, note) = PruneConfig::paper_default_for(layers);
    let PruneConfig::VisiPruner(visi_cfg) = paper else {
        return Err(bad_input(anyhow!(
            "{}",
            note.unwrap_or_else(|| "the paper's VisiPruner config does not fit".into())
        )));
    };
    if let Some(n) = note {
        eprintln!("bench: {n}");
    }
    let shallow_mid = visi_cfg.shallow_mid_layer.unwrap_or(6);
    let schedule = schedule_arg.unwrap_or(Schedule::Forced(default_schedule(layers, shallow_mid)));
    // A forced schedule is part of the bench's VisiPruner, not of its config: each method's
    // sessions only ever see that one pruner, so the config's key is theirs.
    let visi_key = PrefixKey::from(&PruneConfig::VisiPruner(visi_cfg.clone()));
    let fastv_key = PrefixKey::from(&PruneConfig::FastV(fastv));
    let visi = match schedule {
        Schedule::Forced(fs) => VisiPruner::forced(visi_cfg, layers, fs),
        Schedule::Real => VisiPruner::new(visi_cfg, layers),
    }
    .map_err(|e| bad_input(anyhow!("--schedule on this {layers}-layer model: {e}")))?;
    let fastv_p = FastV::new(fastv, layers)
        .map_err(|e| bad_input(anyhow!("--fastv on this {layers}-layer model: {e}")))?;

    // ---- kernels first, so their buffers are gone before the model loads ----
    // `auto` benchmarks the kernels only where it will run the model on an adapter.
    let auto_cpu =
        a.device == DeviceArg::Auto && !engine_wgpu::list_adapters().iter().any(|x| x.auto_pick);
    let kernels = if a.skip_kernels || a.conversation || a.device == DeviceArg::Cpu || auto_cpu {
        None
    } else {
        let quick = a.reps < 3;
        eprintln!(
            "bench: kernel benchmark ({})",
            if quick { "quick" } else { "full" }
        );
        match engine_wgpu::bench::kernel_bench(&engine_wgpu::GpuOptions::default(), quick) {
            Ok(v) => Some(v),
            Err(e) if a.device == DeviceArg::Auto => {
                crate::errors::note(format!("kernel benchmark skipped: {e}"));
                None
            }
            Err(e) => return Err(internal(anyhow!("kernel benchmark: {e}"))),
        }
    };

    // ---- model ----
    let backend = open_backend(a.device)?;
    crate::errors::release_notes();
    let b = backend.as_ref();
    let load = |quant: Option<QuantType>| -> Result<Model, Failure> {
        Ok(match (&model_dir, shape) {
            (Some(dir), _) => {
                let l =
                    Llava::load_quantized(dir, backend.clone(), None, quant).map_err(classify)?;
                Model::Real(Box::new(l), dir_safetensors_bytes(dir))
            }
            (None, Some(s)) => {
                eprintln!(
                    "bench: generating and uploading synthetic {} weights ({})",
                    s.name(),
                    quant_name(quant)
                );
                Model::Synth(Box::new(
                    SyntheticLlava::load_quantized(s, a.seed, backend.clone(), quant)
                        .map_err(classify)?,
                ))
            }
            (None, None) => return Err(bad_input(anyhow!("give --model DIR or --shape NAME"))),
        })
    };
    let model = load(main_quant)?;
    if model.cfg() != &cfg {
        return Err(internal(anyhow!(
            "the loaded model's config differs from the one checked"
        )));
    }
    let mut methods: Vec<MethodRuns> = [
        (
            "dense",
            Box::new(Dense) as Box<dyn Pruner>,
            PrefixKey::dense(),
        ),
        ("visipruner", Box::new(visi), visi_key),
        ("fastv", Box::new(fastv_p), fastv_key),
    ]
    .into_iter()
    .filter(|(name, _, _)| wanted.contains(name))
    .map(|(name, pruner, key)| MethodRuns {
        name,
        pruner,
        key,
        vision_ms: Vec::new(),
        prefill_ms: Vec::new(),
        decode_ms: Vec::new(),
        stats: None,
        kv_lens: Vec::new(),
        kv_bytes: 0,
        report: None,
        layer_ms: Vec::new(),
    })
    .collect();

    // ---- runs: warm-up, interleaved reps, one profiled run each ----
    let ids = synthetic_ids(&cfg, prompt_len, a.seed);
    let pixels = synthetic_pixels(cfg.vision.image_size, a.seed);
    if a.conversation {
        return conversation_bench(&a, &model, &backend, &ids, &pixels, &mut methods, schedule);
    }
    let inp = Input {
        ids: &ids,
        span: ImageSpan {
            start: PREFIX_TOKENS,
            end: PREFIX_TOKENS + n_img,
        },
        pixels: &pixels,
        decode_tokens: a.decode_tokens,
        kv_dtype: a.kv_dtype.dtype(),
    };
    let profiled = a.layer_times || a.plot.is_some();
    let total = a.warmup + a.reps + usize::from(profiled);
    for round in 0..total {
        let profile = profiled && round == total - 1;
        for mr in methods.iter_mut() {
            eprintln!(
                "bench: {} {}",
                mr.name,
                if round < a.warmup {
                    "warm-up".to_string()
                } else if profile {
                    "profiled run".to_string()
                } else {
                    format!("rep {}/{}", round - a.warmup + 1, a.reps)
                }
            );
            let o = run_once(&model, &backend, &inp, mr.pruner.as_mut(), &mr.key, profile)
                .map_err(|e| internal(anyhow!("{}: {e}", mr.name)))?;
            if profile {
                mr.layer_ms = o.layer_ms;
            } else if round >= a.warmup {
                mr.vision_ms.push(o.vision_ms);
                mr.prefill_ms.push(o.prefill_ms);
                mr.decode_ms.push(o.decode_ms);
            }
            if mr.stats.is_none() {
                mr.kv_lens = o.kv_lens;
                mr.kv_bytes = o.kv_bytes;
                mr.stats = Some(o.stats);
                mr.report = Some(mr.pruner.report());
            }
        }
    }

    // ---- weight formats: dense prefill and decode per --quant entry ----
    let mut formats = Vec::new();
    for (i, &q) in quants.iter().enumerate() {
        let (prefill, decode, load_ms) = if i == 0 {
            (
                methods[0].prefill_ms.clone(),
                methods[0].decode_ms.clone(),
                model_load_ms(&model),
            )
        } else {
            let m = load(q)?;
            let mut dense = Dense;
            let (mut p, mut d) = (Vec::new(), Vec::new());
            for round in 0..a.warmup + a.reps {
                eprintln!("bench: dense {} round {}", quant_name(q), round + 1);
                let o = run_once(&m, &backend, &inp, &mut dense, &PrefixKey::dense(), false)
                    .map_err(|e| internal(anyhow!("dense {}: {e}", quant_name(q))))?;
                if round >= a.warmup {
                    p.push(o.prefill_ms);
                    d.push(o.decode_ms);
                }
            }
            (p, d, model_load_ms(&m))
        };
        formats.push(format_report(q, &prefill, &decode, load_ms, &a, &cfg));
    }

    // ---- report ----
    let mut report = build_report(
        &a,
        &model,
        &cfg,
        schedule,
        &methods,
        kernels,
        b.device_info(),
    )?;
    report["weight_formats"] = Value::Array(formats);
    report["model"]["weights_format"] = json!(quant_name(main_quant));
    if let Some(p) = &a.plot {
        let img = plot(&methods);
        crate::validate::save_png("--plot", p, &img, a.force)?;
        eprintln!("bench: wrote {}", p.display());
    }
    if a.json {
        let text = serde_json::to_string(&report).map_err(|e| internal(e.into()))?;
        crate::validate::println_stdout(&text)
    } else {
        crate::validate::print_stdout(&table(&report))
    }
}

fn model_load_ms(m: &Model) -> f64 {
    match m {
        Model::Real(l, _) => l.load_ms(),
        Model::Synth(s) => s.load_ms,
    }
}

/// One `weight_formats` entry: dense prefill and decode timings with weights in format `q`.
fn format_report(
    q: Option<QuantType>,
    prefill: &[f64],
    decode: &[f64],
    load_ms: f64,
    a: &BenchArgs,
    cfg: &LlavaConfig,
) -> Value {
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 / (ms / 1e3) } else { 0.0 };
    let (p_min, p_med) = min_median(prefill);
    let (d_min, d_med) = min_median(decode);
    json!({
        "weights": quant_name(q),
        "load_ms": load_ms,
        "prefill_ms": stat(prefill),
        "decode_ms": stat(decode),
        "prefill_tokens_per_s": {
            "best": per_s(prompt_len(a, cfg), p_min), "median": per_s(prompt_len(a, cfg), p_med),
        },
        "decode_tokens_per_s": {
            "best": per_s(a.decode_tokens, d_min), "median": per_s(a.decode_tokens, d_med),
        },
    })
}

fn build_report(
    a: &BenchArgs,
    model: &Model,
    cfg: &LlavaConfig,
    schedule: Schedule,
    methods: &[MethodRuns],
    kernels: Option<Value>,
    dev: engine_core::DeviceInfo,
) -> Result<Value, Failure> {
    let mut shape = cfg.flops_shape();
    // LLaVA-NeXT: the tower runs on the base tile and every grid tile.
    if let Ok(Some(l)) = models::synthetic::bench_next_layout(cfg) {
        shape.vision.passes = 1 + l.tiles.0 * l.tiles.1;
    }
    let mut out = serde_json::Map::new();
    let dense_prefill = min_median(&methods[0].prefill_ms);
    let dense_ttft: Vec<f64> = methods[0]
        .vision_ms
        .iter()
        .zip(&methods[0].prefill_ms)
        .map(|(v, p)| v + p)
        .collect();
    let dense_ttft = min_median(&dense_ttft);
    for mr in methods {
        let stats = mr
            .stats
            .as_ref()
            .ok_or_else(|| internal(anyhow!("{}: no run recorded", mr.name)))?;
        let sched: Vec<LayerSchedule> = stats
            .layer_seq_lens
            .iter()
            .zip(&stats.layer_image_runs)
            .zip(&stats.layer_masks)
            .map(|((&seq_len, runs), &mask)| LayerSchedule {
                seq_len,
                image: runs.iter().map(|&(s, e)| s..e).collect(),
                mask,
            })
            .collect();
        let fl = pruner::prefill_flops(&shape, &sched)
            .map_err(|e| internal(anyhow!("{}: FLOPs count: {e}", mr.name)))?;
        let dec = fl.prefill - fl.vision;
        let dec_dense = fl.prefill_dense - fl.vision;
        let ttft: Vec<f64> = mr
            .vision_ms
            .iter()
            .zip(&mr.prefill_ms)
            .map(|(v, p)| v + p)
            .collect();
        let (p_min, p_med) = min_median(&mr.prefill_ms);
        let (t_min, t_med) = min_median(&ttft);
        let (d_min, d_med) = min_median(&mr.decode_ms);
        let tps = |d: f64| {
            if a.decode_tokens > 0 && d > 0.0 {
                a.decode_tokens as f64 / (d / 1e3)
            } else {
                0.0
            }
        };
        let analytic = dec_dense as f64 / dec.max(1) as f64;
        let analytic_ttft = fl.prefill_dense as f64 / fl.prefill.max(1) as f64;
        let realised = dense_prefill.1 / p_med;
        let realised_min = dense_prefill.0 / p_min;
        let realised_ttft = dense_ttft.1 / t_med;
        out.insert(
            mr.name.to_string(),
            json!({
                "prune": mr.report,
                "vision_ms": stat(&mr.vision_ms),
                "prefill_ms": stat(&mr.prefill_ms),
                "ttft_ms": stat(&ttft),
                "decode_ms": stat(&mr.decode_ms),
                "decode_tokens_per_s": { "best": tps(d_min), "median": tps(d_med) },
                "kv_bytes": mr.kv_bytes,
                "kv_lens": mr.kv_lens,
                "layer_seq_lens": stats.layer_seq_lens,
                "layer_image_lens": stats.layer_image_lens,
                "layer_masks": stats.layer_masks,
                "layer_ms_profiled": mr.layer_ms,
                "flops": {
                    "prefill_decoder": dec, "prefill_decoder_dense": dec_dense,
                    "vision": fl.vision, "ttft": fl.prefill, "ttft_dense": fl.prefill_dense,
                    "per_layer": fl.per_layer,
                },
                "speedup": {
                    "realised_prefill": realised,
                    "realised_prefill_min": realised_min,
                    "analytic_prefill": analytic,
                    "efficiency": realised / analytic,
                    "realised_ttft": realised_ttft,
                    "analytic_ttft": analytic_ttft,
                    "efficiency_ttft": realised_ttft / analytic_ttft,
                },
                "ttft_min_ms": t_min,
            }),
        );
    }
    let info = model.llama();
    let weight_bytes = match model {
        Model::Real(_, b) => *b,
        Model::Synth(s) => s.weight_bytes,
    };
    let kv_max = methods.iter().map(|m| m.kv_bytes).max().unwrap_or(0);
    let kernel_eff = kernels.as_ref().map(kernel_efficiency);
    Ok(json!({
        "model": {
            "name": a.shape.clone().or_else(|| a.model.clone()),
            "info": model.describe(),
            "text_layers": info.config().num_hidden_layers,
            "hidden": info.config().hidden_size,
            "vision_layers_run": cfg.vision_layers_to_run(),
        },
        "device": {
            "backend": dev.backend, "adapter": dev.adapter, "api": dev.api,
            "device_type": dev.device_type, "shader_f16": dev.shader_f16,
        },
        "prompt": {
            "len": prompt_len(a, cfg), "prefix": PREFIX_TOKENS,
            "image_tokens": bench_image_tokens(cfg),
            "suffix": prompt_len(a, cfg) - PREFIX_TOKENS - bench_image_tokens(cfg),
        },
        "reps": a.reps, "warmup": a.warmup, "decode_tokens": a.decode_tokens, "seed": a.seed,
        "schedule": match schedule {
            Schedule::Forced(f) => json!({
                "forced": true, "fusion": f.fusion_layer, "keep": f.keep, "exit": f.text_only_from,
            }),
            Schedule::Real => json!({ "forced": false }),
        },
        "memory": {
            "peak_gpu_bytes": Value::Null,
            "note": "the backend reports no memory statistics; allocated_bytes is weights + the largest KV cache (activations not counted)",
            "allocated_bytes": weight_bytes + kv_max,
            "weight_bytes": weight_bytes,
            "kv_dtype": a.kv_dtype.dtype().name(),
            "kv_bytes_max": kv_max,
        },
        "methods": out,
        "kernels": kernels,
        "kernel_efficiency": kernel_eff,
    }))
}

/// The prefill matmuls at M=640 as a fraction of the FMA peak, decode matvecs at M=1 as a
/// fraction of the copy bandwidth.
fn kernel_efficiency(k: &Value) -> Value {
    let rows = k["linear"].as_array().cloned().unwrap_or_default();
    let pick = |r: &Value| {
        let m = r["m"].as_u64().unwrap_or(0);
        let base = json!({
            "m": m, "k": r["k"], "n": r["n"], "kernel": r["kernel"], "weights": r["weights"],
        });
        match (m, base) {
            (640, mut b) => {
                b["gflops"] = r["gflops"].clone();
                b["frac_of_fma_peak"] = r["frac_of_fma_peak"].clone();
                Some(b)
            }
            (1, mut b) => {
                b["gbps"] = r["gbps"].clone();
                b["frac_of_copy_peak"] = r["frac_of_copy_peak"].clone();
                Some(b)
            }
            _ => None,
        }
    };
    // Attention: prefill against the FMA peak, decode against the copy bandwidth.
    let attention: Vec<Value> = k["attention"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let prefill = r["phase"] == "prefill";
            json!({
                "phase": r["phase"], "queries": r["queries"], "keys": r["keys"],
                "kernel": r["kernel"],
                "gflops": r["gflops"], "gbps": r["gbps"],
                "share": if prefill { r["frac_of_fma_peak"].clone() } else { r["frac_of_copy_peak"].clone() },
                "of": if prefill { "fma_peak" } else { "copy_peak" },
            })
        })
        .collect();
    json!({
        "fma_peak_gflops": k["peak"]["fma_gflops"],
        "copy_peak_gbps": k["peak"]["copy_gbps"],
        "timing": k["timing"],
        "rows": rows.iter().filter_map(pick).collect::<Vec<_>>(),
        "attention": attention,
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The report as a text table.
fn table(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let m = &r["methods"];
    let _ = writeln!(
        out,
        "visi bench: {} on {} ({}), prompt {} tokens ({} image), {} reps after {} warm-up, {} decode tokens",
        r["model"]["name"].as_str().unwrap_or("?"),
        r["device"]["adapter"].as_str().unwrap_or("?"),
        r["device"]["backend"].as_str().unwrap_or("?"),
        r["prompt"]["len"],
        r["prompt"]["image_tokens"],
        r["reps"],
        r["warmup"],
        r["decode_tokens"],
    );
    let _ = writeln!(out, "schedule: {}", r["schedule"]);
    let _ = writeln!(
        out,
        "{:<11} {:>17} {:>19} {:>19} {:>12} {:>10} {:>9} {:>9} {:>7}",
        "method",
        "vision ms min/med",
        "prefill ms min/med",
        "TTFT ms min/med",
        "decode tok/s",
        "KV MiB",
        "realised",
        "FLOPs",
        "effic."
    );
    for name in ["dense", "visipruner", "fastv"] {
        let x = &m[name];
        if x.is_null() {
            continue;
        }
        let _ = writeln!(
        out,
            "{:<11} {:>8.1}/{:<8.1} {:>9.1}/{:<9.1} {:>9.1}/{:<9.1} {:>12.2} {:>10.2} {:>8.2}x {:>8.2}x {:>6.1}%",
            name,
            f(&x["vision_ms"]["min"]),
            f(&x["vision_ms"]["median"]),
            f(&x["prefill_ms"]["min"]),
            f(&x["prefill_ms"]["median"]),
            f(&x["ttft_ms"]["min"]),
            f(&x["ttft_ms"]["median"]),
            f(&x["decode_tokens_per_s"]["median"]),
            f(&x["kv_bytes"]) / (1 << 20) as f64,
            f(&x["speedup"]["realised_prefill"]),
            f(&x["speedup"]["analytic_prefill"]),
            100.0 * f(&x["speedup"]["efficiency"]),
        );
    }
    let _ = writeln!(
        out,"realised = dense prefill median / method prefill median (decoder + lm_head, vision excluded);");
    let _ = writeln!(
        out,
        "FLOPs = analytic decoder FLOPs ratio of the schedule that ran; effic. = realised / FLOPs."
    );
    for name in ["visipruner", "fastv"] {
        let x = &m[name];
        if x.is_null() {
            continue;
        }
        let _ = writeln!(
            out,
            "{name}: layer seq lens {}",
            compact(&x["layer_seq_lens"])
        );
    }
    if let Some(fs) = r["weight_formats"].as_array().filter(|v| !v.is_empty()) {
        let _ = writeln!(
            out,
            "weight formats (dense): {:<6} {:>19} {:>16} {:>20}",
            "format", "prefill ms min/med", "prefill tok/s", "decode tok/s best/med"
        );
        for x in fs {
            let _ = writeln!(
                out,
                "                        {:<6} {:>9.1}/{:<9.1} {:>16.1} {:>10.2}/{:<9.2}",
                x["weights"].as_str().unwrap_or("?"),
                f(&x["prefill_ms"]["min"]),
                f(&x["prefill_ms"]["median"]),
                f(&x["prefill_tokens_per_s"]["median"]),
                f(&x["decode_tokens_per_s"]["best"]),
                f(&x["decode_tokens_per_s"]["median"]),
            );
        }
    }
    let _ = writeln!(
        out,
        "memory: peak GPU bytes not reported by the backend; allocated ≈ {:.1} MiB (weights + largest KV, {:.1} MiB {})",
        f(&r["memory"]["allocated_bytes"]) / (1 << 20) as f64,
        f(&r["memory"]["kv_bytes_max"]) / (1 << 20) as f64,
        r["memory"]["kv_dtype"].as_str().unwrap_or("?"),
    );
    if let Some(k) = r["kernel_efficiency"].as_object() {
        let _ = writeln!(
            out,
            "kernels ({}): FMA peak {:.1} GFLOP/s, copy peak {:.1} GB/s",
            k["timing"].as_str().unwrap_or("?"),
            f(&k["fma_peak_gflops"]),
            f(&k["copy_peak_gbps"])
        );
        for row in k["rows"].as_array().into_iter().flatten() {
            if row["m"] == 640 {
                let _ = writeln!(
                    out,
                    "  gemm M=640 K={} N={} {}: {:.1} GFLOP/s = {:.1}% of FMA peak",
                    row["k"],
                    row["n"],
                    row["weights"].as_str().unwrap_or("f16"),
                    f(&row["gflops"]),
                    100.0 * f(&row["frac_of_fma_peak"])
                );
            } else {
                let _ = writeln!(
                    out,
                    "  gemv M=1   K={} N={} {}: {:.1} GB/s = {:.1}% of copy peak",
                    row["k"],
                    row["n"],
                    row["weights"].as_str().unwrap_or("f16"),
                    f(&row["gbps"]),
                    100.0 * f(&row["frac_of_copy_peak"])
                );
            }
        }
        for row in k["attention"].as_array().into_iter().flatten() {
            let prefill = row["phase"] == "prefill";
            let _ = writeln!(
                out,
                "  attention {} {}x{} keys ({}): {:.1} {} = {:.1}% of {} peak",
                row["phase"].as_str().unwrap_or("?"),
                row["queries"],
                row["keys"],
                row["kernel"].as_str().unwrap_or("?"),
                if prefill {
                    f(&row["gflops"])
                } else {
                    f(&row["gbps"])
                },
                if prefill { "GFLOP/s" } else { "GB/s" },
                100.0 * f(&row["share"]),
                if prefill { "FMA" } else { "copy" },
            );
        }
    } else {
        let _ = writeln!(out, "kernels: skipped");
    }
    out
}

/// `[640 x13, 45 x6, 35 x13]`: runs of equal values.
fn compact(v: &Value) -> String {
    let xs: Vec<u64> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let j = xs[i..].iter().take_while(|&&x| x == xs[i]).count();
        parts.push(format!("{} x{}", xs[i], j));
        i += j;
    }
    format!("[{}]", parts.join(", "))
}

/// Two panels, no text: top, sequence length per layer; bottom, profiled ms per layer.
/// Grey = dense, blue = VisiPruner, orange = FastV (see bench/README.md).
/// The per-layer plot (sequence length and time, dense vs pruned).
fn plot(methods: &[MethodRuns]) -> RgbImage {
    const W: u32 = 900;
    const PH: u32 = 300;
    const PAD: u32 = 30;
    let colors = [
        Rgb([110, 110, 110]),
        Rgb([30, 90, 220]),
        Rgb([240, 140, 20]),
    ];
    let mut img = RgbImage::from_pixel(W, 2 * PH, Rgb([255, 255, 255]));
    let series: [Vec<Vec<f64>>; 2] = [
        methods
            .iter()
            .map(|m| {
                m.stats
                    .as_ref()
                    .map(|s| s.layer_seq_lens.iter().map(|&x| x as f64).collect())
                    .unwrap_or_default()
            })
            .collect(),
        methods.iter().map(|m| m.layer_ms.clone()).collect(),
    ];
    for (panel, data) in series.iter().enumerate() {
        let y0 = panel as u32 * PH;
        let n = data.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let ymax = data
            .iter()
            .flatten()
            .cloned()
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let (x_l, x_r, y_t, y_b) = (PAD, W - PAD, y0 + PAD, y0 + PH - PAD);
        // Axes and a light grid at quarters.
        for q in 0..=4 {
            let y = y_b - (y_b - y_t) * q / 4;
            for x in x_l..x_r {
                img.put_pixel(x, y, Rgb([if q == 0 { 0 } else { 225 }; 3]));
            }
        }
        for y in y_t..=y_b {
            img.put_pixel(x_l, y, Rgb([0, 0, 0]));
        }
        // Layer i owns the slot [px(i), px(i + 1)).
        let px = |i: usize| x_l + ((x_r - x_l - 1) as f64 * i as f64 / n as f64) as u32;
        let py = |v: f64| y_b - ((y_b - y_t) as f64 * (v / ymax).clamp(0.0, 1.0)) as u32;
        for (k, s) in data.iter().enumerate() {
            let c = colors[k % colors.len()];
            for i in 0..s.len() {
                // Step plot: the layer's value held across its slot, then a vertical jump.
                let (xa, xb) = (px(i), px(i + 1).max(px(i) + 1));
                let y = py(s[i]);
                for x in xa..=xb.min(x_r - 1) {
                    for dy in 0..3u32 {
                        let yy = (y + dy).saturating_sub(1 + k as u32);
                        if yy >= y_t.saturating_sub(2) && yy <= y_b {
                            img.put_pixel(x, yy, c);
                        }
                    }
                }
                if i + 1 < s.len() {
                    let y2 = py(s[i + 1]);
                    let (lo, hi) = (y.min(y2), y.max(y2));
                    for yy in lo..=hi {
                        img.put_pixel(xb.min(x_r - 1), yy.saturating_sub(1 + k as u32), c);
                    }
                }
            }
        }
    }
    img
}

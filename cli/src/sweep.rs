//! `visi-cli sweep`: one question set through a list of pruning configs (dense, VisiPruner
//! thresholds, FastV k/ratio) with the model loaded once; each config's answers go to
//! `<out>/<name>.jsonl` (resumed like `eval`'s), are scored with `score`'s official metric,
//! and the table (`sweep.tsv`, `sweep.json`) and plot (`sweep.png`: accuracy against mean
//! time to first token and against prefill FLOPs) are written.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use pruner::PruneConfig;
use serde_json::{json, Value};

use crate::errors::{bad_input, internal, Failure};
use crate::eval::{
    chunk_questions, default_model_id, execute, load_model, model_spec, plan, settings_json,
    GenArgs,
};
use crate::plot::{sweep_plot, Point};
use crate::score::{check_annotations, score_files, Task};

/// The configs a sweep runs without `--configs`.
pub const DEFAULT_CONFIGS: &str = r#"["dense", "default", {"method": "fastv", "k": 2, "ratio": 0.5}, {"method": "fastv", "k": 2, "ratio": 0.75}]"#;

/// `--configs methods`: every method at the papers' budgets (64/128/192 image tokens kept),
/// beside dense and the paper's VisiPruner (adaptive).
pub const METHODS_PRESET: &str = r#"["dense", "default", "fastv:64", "fastv:128", "fastv:192", "divprune:64", "divprune:128", "divprune:192"]"#;

/// Arguments of `visi-cli sweep`.
#[derive(clap::Args)]
pub struct SweepArgs {
    /// Model (as for `eval`).
    #[arg(long)]
    model: String,
    /// llama.cpp's `mmproj-*.gguf` for a `.gguf` --model.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Question file (as for `eval`).
    #[arg(long)]
    questions: PathBuf,
    /// Directory the jsonl `image` paths are relative to.
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// Benchmark to score with.
    #[arg(long, value_enum)]
    task: Task,
    /// Ground truth, as for `score` (POPE's categories come from --questions).
    #[arg(long)]
    annotations: PathBuf,
    /// JSON list of configs, or @file.json: "dense", "default" (the paper's VisiPruner), a
    /// --prune object, or {"name": ..., "prune": <one of those>}. Default: dense, default,
    /// FastV k=2 at ratios 0.5 and 0.75. `methods`: every method at 64/128/192 kept tokens.
    #[arg(long)]
    configs: Option<String>,
    /// Output directory (created if missing; answers files in it are resumed).
    #[arg(long)]
    out: PathBuf,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Replace existing sweep.tsv / sweep.json / sweep.png.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    gen: GenArgs,
}

/// One named config.
struct Entry {
    name: String,
    prune: Option<PruneConfig>,
}

fn auto_name(p: &PruneConfig) -> String {
    match p {
        PruneConfig::Dense => "dense".into(),
        PruneConfig::FastV(f) => match f.keep {
            Some(n) => format!("fastv-k{}-keep{n}", f.k),
            None => format!("fastv-k{}-r{}", f.k, f.ratio),
        },
        PruneConfig::DivPrune(d) => format!("divprune-keep{}", d.keep),
        PruneConfig::VisiPruner(v) => {
            let mut s = String::from("visipruner");
            if let Some(t) = v.layer_threshold {
                s.push_str(&format!("-lt{t}"));
            }
            if let Some(t) = v.tokens_threshold {
                s.push_str(&format!("-tt{t}"));
            }
            s
        }
    }
}

fn parse_entry(v: &Value, i: usize) -> anyhow::Result<Entry> {
    let at = || format!("--configs entry {i}");
    let one = |v: &Value| -> anyhow::Result<Option<PruneConfig>> {
        match v {
            Value::String(s) if s == "default" => Ok(None),
            // The `--prune` short forms: "dense"/"none", "fastv", "fastv:128", "divprune:64", ...
            Value::String(s) => PruneConfig::parse_arg(s)
                .map(Some)
                .map_err(|e| anyhow!("{}: {e} (or \"default\")", at())),
            other => PruneConfig::from_value(other)
                .map(Some)
                .map_err(|e| anyhow!("{}: {e}", at())),
        }
    };
    let (name, prune) = match v.get("prune") {
        Some(p) => {
            let prune = one(p)?;
            let name = v.get("name").and_then(Value::as_str).map(str::to_string);
            (name, prune)
        }
        None => (None, one(v)?),
    };
    let name = name.unwrap_or_else(|| prune.as_ref().map_or("default".into(), auto_name));
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        bail!("{}: name {name:?} must be letters, digits, '.', '_' or '-' (it names the answers file)", at());
    }
    Ok(Entry { name, prune })
}

fn parse_configs(arg: Option<&str>) -> anyhow::Result<Vec<Entry>> {
    let text = match arg {
        None => DEFAULT_CONFIGS.to_string(),
        Some("methods") => METHODS_PRESET.to_string(),
        Some(a) => match a.strip_prefix('@') {
            Some(p) => crate::answers::read_text(Path::new(p), "--configs")?,
            None => a.to_string(),
        },
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("--configs: not JSON: {e}"))?;
    let list = v
        .as_array()
        .ok_or_else(|| anyhow!("--configs: expected a JSON list"))?;
    if list.is_empty() {
        bail!("--configs: the list is empty");
    }
    let entries: Vec<Entry> = list
        .iter()
        .enumerate()
        .map(|(i, e)| parse_entry(e, i))
        .collect::<anyhow::Result<_>>()?;
    for (i, e) in entries.iter().enumerate() {
        if entries[..i].iter().any(|o| o.name == e.name) {
            bail!(
                "--configs: two configs are named {:?} (give one a \"name\")",
                e.name
            );
        }
    }
    Ok(entries)
}

/// `visi-cli sweep`.
pub fn sweep(a: SweepArgs) -> Result<(), Failure> {
    crate::progress::install_ctrl_c();
    // ---- inputs, checked before the model loads ----
    if a.gen.prune.is_some() || a.gen.no_prune {
        return Err(bad_input(anyhow!(
            "sweep takes its pruning configs from --configs, not --prune/--no-prune"
        )));
    }
    let (settings, _) = a.gen.settings().map_err(bad_input)?;
    let entries = parse_configs(a.configs.as_deref()).map_err(bad_input)?;
    let spec = model_spec(&a.model, a.mmproj.as_deref()).map_err(bad_input)?;
    let questions = chunk_questions(&a.questions, a.image_folder.as_deref(), 1, 0, a.limit)
        .map_err(bad_input)?;
    let pope_q = (a.task == Task::Pope).then_some(a.questions.as_path());
    check_annotations(a.task, &a.annotations, pope_q).map_err(bad_input)?;
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !a.out.is_dir() && !parent.is_dir() {
        return Err(bad_input(anyhow!(
            "--out {}: directory {} does not exist",
            a.out.display(),
            parent.display()
        )));
    }
    if a.out.exists() && !a.out.is_dir() {
        return Err(bad_input(anyhow!(
            "--out {}: not a directory",
            a.out.display()
        )));
    }
    // The answers, table and plot are written after the whole run: the place must take
    // them now (`--out /proc/x`, a read-only directory), not fail after the work.
    let writable = if a.out.is_dir() {
        a.out.as_path()
    } else {
        parent
    };
    crate::validate::can_write_in(writable)
        .map_err(|e| bad_input(anyhow!("--out {}: {e}", a.out.display())))?;
    let outputs = ["sweep.tsv", "sweep.json", "sweep.png"].map(|n| a.out.join(n));
    if let Some(p) = outputs.iter().find(|p| p.exists() && !p.is_file()) {
        return Err(bad_input(anyhow!(
            "{}: exists and is not a regular file",
            p.display()
        )));
    }
    if !a.force {
        if let Some(p) = outputs.iter().find(|p| p.exists()) {
            return Err(bad_input(anyhow!(
                "{}: already exists (pass --force to overwrite)",
                p.display()
            )));
        }
    }
    let model_id = default_model_id(&a.model);
    let mut plans = Vec::new();
    for e in &entries {
        let answers = a.out.join(format!("{}.jsonl", e.name));
        let p = if a.out.is_dir() {
            plan(
                questions.clone(),
                &answers,
                false,
                settings_json(&settings, e.prune.as_ref()),
                &model_id,
            )
            .map_err(bad_input)?
        } else {
            // (the directory is made below; nothing to resume)
            crate::eval::Plan {
                questions: questions.clone(),
                answers,
                done: Default::default(),
                prior_meta: Vec::new(),
                rewrite: None,
                settings: settings_json(&settings, e.prune.as_ref()),
            }
        };
        plans.push(p);
    }

    // ---- model; every config checked against it before any runs ----
    let llava = load_model(&spec, &a.gen)?;
    // The config that will run (the paper default falls back to dense on a model it does
    // not fit, and the table must say so).
    let mut effective = Vec::new();
    for e in &entries {
        let (cfg, note) = llava
            .resolve_prune(e.prune.as_ref())
            .map_err(|err| bad_input(anyhow!("config {}: {err}", e.name)))?;
        if let Some(n) = note {
            eprintln!("note: config {}: {n}", e.name);
        }
        effective.push(cfg);
    }
    crate::errors::release_notes();
    std::fs::create_dir_all(&a.out)
        .map_err(|e| internal(anyhow!("--out {}: {e}", a.out.display())))?;
    // One untimed answer first: pipeline compilation and buffer pools would otherwise be
    // charged to whichever config runs first.
    if let Some(q) = questions.first() {
        let img = crate::eval::question_image(q).map_err(bad_input)?;
        let warm = crate::eval::GenSettings {
            max_new_tokens: 1,
            ..settings.clone()
        };
        crate::eval::generate_answer(
            &llava,
            &q.model_text,
            &img,
            &warm,
            Some(&PruneConfig::Dense),
        )
        .map_err(crate::errors::classify)?;
        let _ = std::fs::remove_file(a.out.join(".warmup-image"));
    }
    let mut rows = Vec::new();
    for (e, p) in entries.iter().zip(&plans) {
        let sum = execute(&llava, p, &settings, e.prune.as_ref(), &model_id, &e.name)?;
        eprintln!("{}: {}", e.name, sum.line());
        let sc = score_files(a.task, &p.answers, &a.annotations, pope_q).map_err(bad_input)?;
        rows.push((e, sum, sc));
    }

    // ---- table, JSON, plot ----
    let metric = rows[0].2.metric;
    let mut tsv = format!("config\tmethod\t{metric}\tanswered\tmean_ttft_ms\tmean_prefill_flops_fraction\tmean_kept_image_tokens\tquestions_per_s\n");
    let mut list = Vec::new();
    let mut points = Vec::new();
    for ((e, s, sc), cfg) in rows.iter().zip(&effective) {
        let method = cfg.method();
        tsv.push_str(&format!(
            "{}\t{method}\t{:.4}\t{}\t{:.2}\t{:.4}\t{:.1}\t{:.3}\n",
            e.name,
            sc.value,
            sc.answered,
            s.mean_ttft_ms,
            s.mean_flops_fraction,
            s.mean_kept_image_tokens,
            s.questions_per_s()
        ));
        list.push(json!({
            "name": e.name,
            "prune": e.prune.as_ref().map_or(json!("default"), PruneConfig::to_json),
            "ran": cfg.to_json(),
            "metric": sc.metric,
            "value": sc.value,
            "answered": sc.answered,
            "score": sc.detail,
            "mean_ttft_ms": s.mean_ttft_ms,
            "mean_prefill_flops_fraction": s.mean_flops_fraction,
            "mean_kept_image_tokens": s.mean_kept_image_tokens,
            "questions_per_s": s.questions_per_s(),
            "answers": p_str(&a.out.join(format!("{}.jsonl", e.name))),
        }));
        points.push(Point {
            name: e.name.clone(),
            accuracy: sc.value,
            ttft_ms: s.mean_ttft_ms,
            flops: s.mean_flops_fraction,
        });
    }
    let dev = llava.device_info();
    let report = json!({
        "task": a.task.name(),
        "questions": p_str(&a.questions),
        "model": a.model,
        "device": { "backend": dev.backend, "adapter": dev.adapter },
        "settings": settings_json(&settings, None),
        "configs": list,
    });
    let png = encode_png(&sweep_plot(&points, metric)).map_err(internal)?;
    let json_text = serde_json::to_string_pretty(&report).map_err(|e| internal(e.into()))?;
    // The three as one group: all temp files first, then the renames; a failure removes
    // every one of them (no table without its plot).
    let files: Vec<(&Path, &[u8])> = outputs
        .iter()
        .map(PathBuf::as_path)
        .zip([tsv.as_bytes(), json_text.as_bytes(), png.as_slice()])
        .collect();
    engine_core::files::write_files_atomic(&files, a.force).map_err(|e| internal(e.into()))?;
    crate::validate::print_stdout(&tsv)?;
    eprintln!(
        "wrote {}, {}, {}",
        outputs[0].display(),
        outputs[1].display(),
        outputs[2].display()
    );
    Ok(())
}

fn p_str(p: &Path) -> String {
    p.display().to_string()
}

fn encode_png(img: &image::RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)?;
    Ok(buf.into_inner())
}

//! `visi-cli score`: the official metrics of each benchmark, computed from LLaVA answer
//! files as the official scripts compute them.
//!
//! | task | official definition reproduced |
//! |---|---|
//! | pope | LLaVA `llava/eval/eval_pope.py` (first sentence, `no`/`not`/`No` word → no) |
//! | mme | LLaVA's `convert_answer_to_mme.py` + MME's `eval_tool/calculation.py` (acc + acc+) |
//! | gqa | LLaVA `scripts/convert_gqa_for_eval.py` (`rstrip('.')`, lower) + GQA `eval.py` accuracy |
//! | textvqa | LLaVA `llava/eval/eval_textvqa.py` with `m4c_evaluator`'s `EvalAIAnswerProcessor` |
//! | seed | LLaVA `scripts/convert_seed_for_submission.py` (exact letter match) |
//! | mmbench | VLMEvalKit's `can_infer` letter extraction (c6bdffd3; no LLM judge) and circular groups `index % 1e6` |
//!
//! On a complete answers file every number equals the official script's. On a partial one
//! (a subset of the questions, as in a quick sweep) the metrics are over the answered
//! questions, and the report says how many the annotations hold.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::ValueEnum;
use serde_json::{json, Value};

use crate::answers::{
    id_string, is_none, load_questions, mmbench_options, read_answers, read_text, read_tsv, Answer,
    MMBENCH_LETTERS,
};
use crate::errors::{bad_input, internal, Failure};

/// A benchmark whose official metric `score` reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// POPE: accuracy, precision, recall, F1, yes-ratio per category.
    Pope,
    /// MME: perception and cognition sums of acc + acc+ per subtask.
    Mme,
    /// GQA testdev-balanced accuracy.
    Gqa,
    /// TextVQA VQA accuracy.
    Textvqa,
    /// SEED-Bench letter accuracy.
    Seed,
    /// MMBench circular accuracy.
    Mmbench,
}

impl Task {
    /// The name as `--task` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Task::Pope => "pope",
            Task::Mme => "mme",
            Task::Gqa => "gqa",
            Task::Textvqa => "textvqa",
            Task::Seed => "seed",
            Task::Mmbench => "mmbench",
        }
    }

    /// What `--annotations` is for this task.
    pub fn annotations_help(self) -> &'static str {
        match self {
            Task::Pope => "the directory of coco_pope_<category>.json label files",
            Task::Mme => "MME_Benchmark_release_version (the directory of subtask folders)",
            Task::Gqa => "testdev_balanced_questions.json",
            Task::Textvqa => "TextVQA_0.5.1_val.json",
            Task::Seed => "SEED-Bench.json",
            Task::Mmbench => "the MMBench TSV with its answer column",
        }
    }
}

/// Arguments of `visi-cli score`.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Benchmark.
    #[arg(long, value_enum)]
    task: Task,
    /// The answers file (`eval` or LLaVA's `model_vqa_loader` output).
    #[arg(long)]
    answers: PathBuf,
    /// Ground truth: pope: the coco_pope_*.json directory; mme: MME_Benchmark_release_version;
    /// gqa: testdev_balanced_questions.json; textvqa: TextVQA_0.5.1_val.json; seed:
    /// SEED-Bench.json; mmbench: the TSV.
    #[arg(long)]
    annotations: PathBuf,
    /// The question file (POPE needs it for the categories, as eval_pope.py does).
    #[arg(long)]
    questions: Option<PathBuf>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A score.
#[derive(Clone, Debug)]
pub struct ScoreReport {
    /// Which benchmark.
    pub task: Task,
    /// The headline metric's name (`accuracy`, `f1`, `perception`, `circular_accuracy`).
    pub metric: &'static str,
    /// Its value, in the official script's unit (POPE fractions, MME points, others %).
    pub value: f64,
    /// Answers scored.
    pub answered: usize,
    /// Questions the annotations hold (for the coverage note).
    pub expected: usize,
    /// Every metric.
    pub detail: Value,
    /// The human table.
    pub table: String,
}

/// `visi-cli score`.
pub fn score(a: ScoreArgs) -> Result<(), Failure> {
    let r = score_files(a.task, &a.answers, &a.annotations, a.questions.as_deref())
        .map_err(bad_input)?;
    if a.json {
        let v = json!({
            "task": r.task.name(),
            "metric": r.metric,
            "value": r.value,
            "answered": r.answered,
            "expected": r.expected,
            "detail": r.detail,
        });
        crate::validate::println_stdout(
            &serde_json::to_string(&v).map_err(|e| internal(e.into()))?,
        )?;
    } else {
        crate::validate::print_stdout(&r.table)?;
    }
    if r.answered < r.expected {
        eprintln!(
            "note: {} of the annotations' {} questions are answered; the metrics are over those",
            r.answered, r.expected
        );
    }
    Ok(())
}

/// Scores an answers file against the annotations (errors are the user's input).
pub fn score_files(
    task: Task,
    answers: &Path,
    annotations: &Path,
    questions: Option<&Path>,
) -> Result<ScoreReport> {
    // The annotations first: a wrong file is reported before the answers are read.
    check_annotations(task, annotations, questions)?;
    let ans = read_answers(answers, "--answers")?;
    if ans.is_empty() {
        bail!("--answers {}: no answers", answers.display());
    }
    score_answers(task, &ans, annotations, questions)
}

/// Scores answers already read (none: only the annotations are loaded and checked).
fn score_answers(
    task: Task,
    ans: &[Answer],
    annotations: &Path,
    questions: Option<&Path>,
) -> Result<ScoreReport> {
    if !annotations.exists() {
        bail!(
            "--annotations {}: not found (expected {})",
            annotations.display(),
            task.annotations_help()
        );
    }
    if task == Task::Pope && questions.is_none() {
        bail!("--task pope needs --questions (the question file holds each question's category)");
    }
    if let Some(q) = questions {
        if !q.is_file() {
            bail!("--questions {}: not found", q.display());
        }
    }
    match task {
        Task::Pope => pope(ans, annotations, questions.unwrap_or(Path::new(""))),
        Task::Mme => mme(ans, annotations),
        Task::Gqa => gqa(ans, annotations),
        Task::Textvqa => textvqa(ans, annotations),
        Task::Seed => seed(ans, annotations),
        Task::Mmbench => mmbench(ans, annotations),
    }
}

/// Checks that `annotations` (and POPE's `questions`) are what `task` reads, without
/// answers: `sweep` calls it before any generation.
pub fn check_annotations(task: Task, annotations: &Path, questions: Option<&Path>) -> Result<()> {
    score_answers(task, &[], annotations, questions).map(|_| ())
}

/// The report of an annotation check (no answers scored).
fn checked(task: Task) -> ScoreReport {
    ScoreReport {
        task,
        metric: "",
        value: 0.0,
        answered: 0,
        expected: 0,
        detail: Value::Null,
        table: String::new(),
    }
}

fn load_json(path: &Path) -> Result<Value> {
    let text = read_text(path, "--annotations")?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("--annotations {}: not JSON: {e}", path.display()))
}

fn pct(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        100.0 * n as f64 / d as f64
    }
}

/// `a / b`, 0 where Python would raise ZeroDivisionError.
fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

// ---------------------------------------------------------------- POPE

/// eval_pope.py's reading of an answer: the first sentence, commas removed, split on
/// spaces; `No`, `not` or `no` as a word is no, anything else yes.
pub fn pope_says_yes(text: &str) -> bool {
    let first = text.split('.').next().unwrap_or("");
    let t = first.replace(',', "");
    !t.split(' ').any(|w| w == "No" || w == "not" || w == "no")
}

/// The binary confusion counts and eval_pope.py's metrics over `(pred_yes, label_yes)`.
pub fn binary_metrics(pairs: &[(bool, bool)]) -> Value {
    let (mut tp, mut fp, mut tn, mut fneg) = (0usize, 0usize, 0usize, 0usize);
    for &(p, l) in pairs {
        match (p, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
    }
    let precision = ratio(tp as f64, (tp + fp) as f64);
    let recall = ratio(tp as f64, (tp + fneg) as f64);
    json!({
        "n": pairs.len(),
        "tp": tp, "fp": fp, "tn": tn, "fn": fneg,
        "accuracy": ratio((tp + tn) as f64, pairs.len() as f64),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2.0 * precision * recall, precision + recall),
        "yes_ratio": ratio((tp + fp) as f64, pairs.len() as f64),
    })
}

fn pope(ans: &[Answer], dir: &Path, questions: &Path) -> Result<ScoreReport> {
    if !dir.is_dir() {
        bail!(
            "--annotations {}: not a directory (expected {})",
            dir.display(),
            Task::Pope.annotations_help()
        );
    }
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| anyhow!("--annotations {}: {e}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        // eval_pope.py asserts every file is coco_pope_<category>.json.
        match name
            .strip_prefix("coco_pope_")
            .and_then(|n| n.strip_suffix(".json"))
        {
            Some(cat) => files.push((cat.to_string(), e.path())),
            None => bail!(
                "--annotations {}: {name} is not a coco_pope_<category>.json file",
                dir.display()
            ),
        }
    }
    if files.is_empty() {
        bail!("--annotations {}: no coco_pope_*.json files", dir.display());
    }
    files.sort();
    // The question file in LLaVA's order; the i-th question of a category goes with the
    // i-th label of its file (eval_pope.py zips answers and labels by position).
    let qs = load_questions(questions, None)?;
    let mut label_of: HashMap<String, (String, bool)> = HashMap::new();
    let mut expected = 0;
    for (cat, path) in &files {
        let text = read_text(path, "--annotations")?;
        let labels: Vec<bool> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l)
                    .map_err(|e| anyhow!("{} line {}: not JSON: {e}", path.display(), i + 1))?;
                let lab = v["label"]
                    .as_str()
                    .ok_or_else(|| anyhow!("{} line {}: no `label`", path.display(), i + 1))?;
                Ok(lab != "no")
            })
            .collect::<Result<_>>()?;
        let in_cat: Vec<_> = qs
            .iter()
            .filter(|q| q.category.as_deref() == Some(cat))
            .collect();
        if in_cat.len() > labels.len() {
            bail!(
                "--annotations {}: {} labels for the {} {cat} questions of --questions",
                path.display(),
                labels.len(),
                in_cat.len()
            );
        }
        expected += in_cat.len();
        for (q, l) in in_cat.iter().zip(&labels) {
            label_of.insert(q.key(), (cat.clone(), *l));
        }
    }
    if ans.is_empty() {
        return Ok(checked(Task::Pope));
    }
    let mut by_cat: BTreeMap<String, Vec<(bool, bool)>> = BTreeMap::new();
    for a in ans {
        let (cat, label) = label_of.get(&a.key()).ok_or_else(|| {
            anyhow!(
                "--answers: question {} ({:?}) is in no POPE category of --questions",
                a.id,
                a.prompt
            )
        })?;
        by_cat
            .entry(cat.clone())
            .or_default()
            .push((pope_says_yes(&a.text), *label));
    }
    let mut table =
        String::from("category      n    accuracy precision recall  f1      yes_ratio\n");
    let mut per = serde_json::Map::new();
    let (mut sum_acc, mut sum_f1) = (0.0, 0.0);
    for (cat, pairs) in &by_cat {
        let m = binary_metrics(pairs);
        let g = |k: &str| m[k].as_f64().unwrap_or(0.0);
        table.push_str(&format!(
            "{cat:<12} {:>5}  {:.4}   {:.4}    {:.4}  {:.4}  {:.4}\n",
            pairs.len(),
            g("accuracy"),
            g("precision"),
            g("recall"),
            g("f1"),
            g("yes_ratio")
        ));
        sum_acc += g("accuracy");
        sum_f1 += g("f1");
        per.insert(cat.clone(), m);
    }
    let n = by_cat.len() as f64;
    let (mean_acc, mean_f1) = (sum_acc / n, sum_f1 / n);
    table.push_str(&format!(
        "mean over {} categories: accuracy {mean_acc:.4}, f1 {mean_f1:.4}\n",
        by_cat.len()
    ));
    Ok(ScoreReport {
        task: Task::Pope,
        metric: "f1",
        value: mean_f1,
        answered: ans.len(),
        expected,
        detail: json!({ "categories": per, "mean_accuracy": mean_acc, "mean_f1": mean_f1 }),
        table,
    })
}

// ---------------------------------------------------------------- MME

/// MME's subtasks, as `calculation.py`'s `eval_type_dict` lists them.
pub const MME_PERCEPTION: [&str; 10] = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
];
/// MME's cognition subtasks.
pub const MME_COGNITION: [&str; 4] = [
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
];

/// calculation.py's `parse_pred_ans` (on the lower-cased answer): exactly yes/no, else
/// `yes` then `no` searched in the first four characters, else other.
pub fn mme_parse(pred: &str) -> &'static str {
    let p = pred.to_lowercase();
    if p == "yes" {
        return "yes";
    }
    if p == "no" {
        return "no";
    }
    let prefix: String = p.chars().take(4).collect();
    if prefix.contains("yes") {
        "yes"
    } else if prefix.contains("no") {
        "no"
    } else {
        "other"
    }
}

/// Per image file of one MME subtask: its (ground truth, parsed prediction) pairs.
type MmeImages = Vec<(String, Vec<(String, &'static str)>)>;

fn mme(ans: &[Answer], root: &Path) -> Result<ScoreReport> {
    if !root.is_dir() {
        bail!(
            "--annotations {}: not a directory (expected {})",
            root.display(),
            Task::Mme.annotations_help()
        );
    }
    // convert_answer_to_mme.py's get_gt: (category, file, question) -> answer.
    let mut gt: HashMap<(String, String, String), String> = HashMap::new();
    let mut per_cat_questions: HashMap<String, usize> = HashMap::new();
    let mut cats: Vec<_> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    cats.sort_by_key(|e| e.file_name());
    for c in cats {
        let cat = c.file_name().to_string_lossy().to_string();
        let qa = if c.path().join("images").is_dir() {
            c.path().join("questions_answers_YN")
        } else {
            c.path()
        };
        if !qa.is_dir() {
            bail!("--annotations: {} is not a directory", qa.display());
        }
        for f in std::fs::read_dir(&qa)? {
            let f = f?;
            let name = f.file_name().to_string_lossy().to_string();
            if !name.ends_with(".txt") {
                continue;
            }
            let text = read_text(&f.path(), "--annotations")?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let parts: Vec<&str> = line.trim().split('\t').collect();
                let [q, a] = parts[..] else {
                    bail!(
                        "--annotations {} line {}: expected `question<TAB>answer`",
                        f.path().display(),
                        i + 1
                    );
                };
                gt.insert((cat.clone(), name.clone(), q.to_string()), a.to_string());
                *per_cat_questions.entry(cat.clone()).or_default() += 1;
            }
        }
    }
    if gt.is_empty() {
        bail!(
            "--annotations {}: no MME question files (expected {})",
            root.display(),
            Task::Mme.annotations_help()
        );
    }
    if ans.is_empty() {
        return Ok(checked(Task::Mme));
    }
    // Per category, per image (category, file): the (gt, pred) of its questions.
    let mut tasks: BTreeMap<String, MmeImages> = BTreeMap::new();
    for a in ans {
        let qid = id_string(&a.id);
        let cat = qid.split('/').next().unwrap_or("").to_string();
        let base = qid.rsplit('/').next().unwrap_or("");
        let file = format!("{}.txt", base.split('.').next().unwrap_or(""));
        let mut prompt = a.prompt.clone();
        const SHORT: &str = "Answer the question using a single word or phrase.";
        const YN: &str = "Please answer yes or no.";
        if prompt.contains(SHORT) {
            prompt = prompt.replace(SHORT, "").trim().to_string();
        }
        if !prompt.contains(YN) {
            prompt = format!("{prompt} {YN}");
            if !gt.contains_key(&(cat.clone(), file.clone(), prompt.clone())) {
                prompt = prompt.replace(&format!(" {YN}"), &format!("  {YN}"));
            }
        }
        let g = gt.get(&(cat.clone(), file.clone(), prompt.clone())).ok_or_else(|| {
            anyhow!("--answers: question {qid} ({prompt:?}) is not in the MME annotations ({cat}/{file})")
        })?;
        let g = g.to_lowercase();
        if g != "yes" && g != "no" {
            bail!("--annotations: {cat}/{file}: ground truth {g:?} is not yes or no");
        }
        let images = tasks.entry(cat).or_default();
        let item = (g, mme_parse(&a.text));
        match images.iter_mut().find(|(f, _)| *f == file) {
            Some((_, v)) => v.push(item),
            None => images.push((file, vec![item])),
        }
    }
    let mut per = serde_json::Map::new();
    let mut table = String::from("subtask                 images  acc     acc+    score\n");
    let (mut perception, mut cognition) = (0.0, 0.0);
    let mut missing = Vec::new();
    for (cat, images) in &tasks {
        let mut n = 0usize;
        let mut correct = 0usize;
        let mut plus = 0usize;
        for (file, items) in images {
            // calculation.py: "one image corresponds to two questions".
            if items.len() != 2 {
                bail!(
                    "--answers: MME image {cat}/{file} has {} answers; acc+ scores each image's two questions together",
                    items.len()
                );
            }
            let ok = items.iter().filter(|(g, p)| g == p).count();
            n += items.len();
            correct += ok;
            plus += usize::from(ok == 2);
        }
        let acc = correct as f64 / n as f64;
        let acc_plus = plus as f64 / images.len() as f64;
        let score = (acc + acc_plus) * 100.0;
        if MME_PERCEPTION.contains(&cat.as_str()) {
            perception += score;
        } else if MME_COGNITION.contains(&cat.as_str()) {
            cognition += score;
        }
        table.push_str(&format!(
            "{cat:<23} {:>6}  {:.4}  {:.4}  {score:.2}\n",
            images.len(),
            acc,
            acc_plus
        ));
        per.insert(
            cat.clone(),
            json!({ "images": images.len(), "acc": acc, "acc_plus": acc_plus, "score": score }),
        );
    }
    for t in MME_PERCEPTION.iter().chain(&MME_COGNITION) {
        if !tasks.contains_key(*t) {
            missing.push(t.to_string());
        }
    }
    table.push_str(&format!(
        "perception {perception:.2}\ncognition  {cognition:.2}\n"
    ));
    if !missing.is_empty() {
        table.push_str(&format!("(not answered: {})\n", missing.join(", ")));
    }
    Ok(ScoreReport {
        task: Task::Mme,
        metric: "perception",
        value: perception,
        answered: ans.len(),
        expected: gt.len(),
        detail: json!({ "perception": perception, "cognition": cognition, "subtasks": per, "not_answered": missing }),
        table,
    })
}

// ---------------------------------------------------------------- GQA

/// convert_gqa_for_eval.py: `text.rstrip('.').lower()`.
pub fn gqa_normalise(text: &str) -> String {
    text.trim_end_matches('.').to_lowercase()
}

fn gqa(ans: &[Answer], path: &Path) -> Result<ScoreReport> {
    let v = load_json(path)?;
    let qs = v.as_object().ok_or_else(|| {
        anyhow!(
            "--annotations {}: expected GQA's {{question id: question}} object",
            path.display()
        )
    })?;
    if ans.is_empty() {
        return Ok(checked(Task::Gqa));
    }
    // A later answer to the same id wins, as in the predictions dict eval.py builds.
    let pred: HashMap<String, String> = ans
        .iter()
        .map(|a| (id_string(&a.id), gqa_normalise(&a.text)))
        .collect();
    let (mut n, mut ok) = (0usize, 0usize);
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut expected = 0;
    for (qid, q) in qs {
        if q.get("isBalanced").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        expected += 1;
        let Some(p) = pred.get(qid) else { continue };
        let gold = q["answer"].as_str().ok_or_else(|| {
            anyhow!(
                "--annotations {}: question {qid} has no `answer`",
                path.display()
            )
        })?;
        let hit = p == gold;
        n += 1;
        ok += usize::from(hit);
        if let Some(s) = q["types"]["structural"].as_str() {
            // eval.py: "open" for query questions, "binary" for the rest.
            let e = by_kind
                .entry(if s == "query" { "open" } else { "binary" })
                .or_default();
            e.0 += 1;
            e.1 += usize::from(hit);
        }
    }
    let unknown = pred.keys().filter(|k| !qs.contains_key(*k)).count();
    if n == 0 {
        bail!(
            "--answers: none of the {} answered ids is in --annotations {}",
            pred.len(),
            path.display()
        );
    }
    let acc = pct(ok, n);
    let mut table = format!("gqa: accuracy {acc:.2}% ({ok}/{n})\n");
    let mut detail =
        json!({ "accuracy": acc, "correct": ok, "n": n, "not_in_annotations": unknown });
    for (k, (kn, kok)) in &by_kind {
        table.push_str(&format!("  {k:<6} {:.2}% ({kok}/{kn})\n", pct(*kok, *kn)));
        detail[*k] = json!(pct(*kok, *kn));
    }
    if unknown > 0 {
        table.push_str(&format!("  ({unknown} answered ids are not in the annotations and are ignored, as eval.py does)\n"));
    }
    Ok(ScoreReport {
        task: Task::Gqa,
        metric: "accuracy",
        value: acc,
        answered: n,
        expected,
        detail,
        table,
    })
}

// ---------------------------------------------------------------- TextVQA

const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

const NUMBER_MAP: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const PUNCTUATIONS: &[&str] = &[
    ";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
];

/// `EvalAIAnswerProcessor.__call__` (m4c_evaluator.py), quirks included.
pub fn evalai_normalise(item: &str) -> String {
    // word_tokenize
    let s = item
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let s = s.trim().replace(['\n', '\t'], " ");
    let s = s.trim();
    // process_punctuation: COMMA_STRIP is `(?<=\d)(\,)+(?=\d)`, searched in the input.
    let chars: Vec<char> = s.chars().collect();
    let comma_strip = (1..chars.len()).any(|i| {
        chars[i] == ',' && chars[i - 1].is_numeric() && {
            let mut j = i;
            while j < chars.len() && chars[j] == ',' {
                j += 1;
            }
            j < chars.len() && chars[j].is_numeric()
        }
    });
    let mut out = s.to_string();
    for p in PUNCTUATIONS {
        if s.contains(&format!("{p} ")) || s.contains(&format!(" {p}")) || comma_strip {
            out = out.replace(p, "");
        } else {
            out = out.replace(p, " ");
        }
    }
    // PERIOD_STRIP `(?!<=\d)(\.)(?!\d)`: a period not followed by a digit; `.sub("", out,
    // re.UNICODE)` passes re.UNICODE (32) as the count, so at most 32 go.
    let oc: Vec<char> = out.chars().collect();
    let mut stripped = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in oc.iter().enumerate() {
        let next_digit = oc.get(i + 1).is_some_and(|n| n.is_numeric());
        if c == '.' && !next_digit && removed < 32 {
            removed += 1;
            continue;
        }
        stripped.push(c);
    }
    // process_digit_article
    let words: Vec<String> = stripped
        .to_lowercase()
        .split_whitespace()
        .map(|w| {
            NUMBER_MAP
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
                .to_string()
        })
        .filter(|w| !matches!(w.as_str(), "a" | "an" | "the"))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w.clone(), |(_, v)| v.to_string())
        })
        .collect();
    words.join(" ")
}

/// `TextVQAAccuracyEvaluator`: the soft score of `pred` against ten human answers (each
/// answer's accuracy averaged over the ten leave-one-out sets of nine, min(1, matches / 3)).
pub fn vqa_soft_score(pred: &str, gts: &[String]) -> f64 {
    let p = evalai_normalise(pred);
    let g: Vec<String> = gts.iter().map(|a| evalai_normalise(a)).collect();
    if !g.contains(&p) {
        return 0.0;
    }
    let mut total = 0.0;
    for skip in 0..g.len() {
        let matches = g
            .iter()
            .enumerate()
            .filter(|(i, a)| *i != skip && **a == p)
            .count();
        total += (matches as f64 / 3.0).min(1.0);
    }
    total / g.len() as f64
}

/// eval_textvqa.py's `prompt_processor`: the question inside LLaVA's TextVQA prompt, lower-cased.
pub fn textvqa_question(prompt: &str) -> Option<String> {
    let lines: Vec<&str> = prompt.split('\n').collect();
    let q = if let Some(rest) = prompt.strip_prefix("OCR tokens: ") {
        let s = rest.find("Question: ")? + "Question: ".len();
        let e = rest[s..].find(" Short answer:")? + s;
        rest[s..e].to_string()
    } else if prompt.contains("Reference OCR token: ") && lines.len() == 3 {
        if prompt.starts_with("Reference OCR token:") {
            lines[1].to_string()
        } else {
            lines[0].to_string()
        }
    } else if lines.len() == 2 {
        lines[0].to_string()
    } else {
        return None;
    };
    Some(q.to_lowercase())
}

fn textvqa(ans: &[Answer], path: &Path) -> Result<ScoreReport> {
    let v = load_json(path)?;
    let data = v["data"].as_array().ok_or_else(|| {
        anyhow!(
            "--annotations {}: no `data` list (expected {})",
            path.display(),
            Task::Textvqa.annotations_help()
        )
    })?;
    let mut ann: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (i, d) in data.iter().enumerate() {
        let img = d.get("image_id").map(id_string);
        let q = d["question"].as_str();
        let answers: Option<Vec<String>> = d["answers"].as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        });
        let (Some(img), Some(q), Some(answers)) = (img, q, answers) else {
            bail!(
                "--annotations {}: data[{i}] needs image_id, question and answers",
                path.display()
            );
        };
        ann.insert((img, q.to_lowercase()), answers);
    }
    if ans.is_empty() {
        return Ok(checked(Task::Textvqa));
    }
    let mut sum = 0.0;
    for a in ans {
        let q = textvqa_question(&a.prompt).ok_or_else(|| {
            anyhow!("--answers: question {}: prompt {:?} is not in LLaVA's TextVQA form (question\\n[Reference OCR token: ...\\n]instruction)", a.id, a.prompt)
        })?;
        let gts = ann.get(&(id_string(&a.id), q.clone())).ok_or_else(|| {
            anyhow!("--answers: ({}, {q:?}) is not in the annotations (LLaVA's TextVQA question_id is the image id)", a.id)
        })?;
        if gts.len() != 10 {
            bail!(
                "--annotations: ({}, {q:?}) has {} answers; the VQA accuracy needs 10",
                a.id,
                gts.len()
            );
        }
        sum += vqa_soft_score(&a.text, gts);
    }
    let acc = 100.0 * sum / ans.len() as f64;
    Ok(ScoreReport {
        task: Task::Textvqa,
        metric: "accuracy",
        value: acc,
        answered: ans.len(),
        expected: ann.len(),
        detail: json!({ "accuracy": acc, "n": ans.len() }),
        table: format!("textvqa: samples {}, accuracy {acc:.2}%\n", ans.len()),
    })
}

// ---------------------------------------------------------------- SEED

fn seed(ans: &[Answer], path: &Path) -> Result<ScoreReport> {
    let v = load_json(path)?;
    let qs = v["questions"].as_array().ok_or_else(|| {
        anyhow!(
            "--annotations {}: no `questions` list (expected {})",
            path.display(),
            Task::Seed.annotations_help()
        )
    })?;
    let type_names: HashMap<String, String> = v["question_type"]
        .as_object()
        .map(|m| m.iter().map(|(n, id)| (id_string(id), n.clone())).collect())
        .unwrap_or_default();
    let results: HashMap<String, &str> = ans
        .iter()
        .map(|a| (id_string(&a.id), a.text.as_str()))
        .collect();
    // (answered, correct) per question type and per data type.
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_data: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut n, mut ok) = (0usize, 0usize);
    for (i, q) in qs.iter().enumerate() {
        let (Some(qid), Some(gold)) = (q.get("question_id"), q["answer"].as_str()) else {
            bail!(
                "--annotations {}: questions[{i}] needs question_id and answer",
                path.display()
            );
        };
        let Some(text) = results.get(&id_string(qid)) else {
            continue;
        };
        let hit = *text == gold;
        n += 1;
        ok += usize::from(hit);
        let t = q.get("question_type_id").map(id_string).unwrap_or_default();
        let e = by_type
            .entry(type_names.get(&t).cloned().unwrap_or(t))
            .or_default();
        e.0 += 1;
        e.1 += usize::from(hit);
        let d = q["data_type"].as_str().unwrap_or("image").to_string();
        let e = by_data.entry(d).or_default();
        e.0 += 1;
        e.1 += usize::from(hit);
    }
    if ans.is_empty() {
        return Ok(checked(Task::Seed));
    }
    if n == 0 {
        bail!(
            "--answers: none of the answered ids is in --annotations {}",
            path.display()
        );
    }
    let acc = pct(ok, n);
    let mut table = format!("seed: accuracy {acc:.2}% ({ok}/{n})\n");
    let mut detail = json!({ "accuracy": acc, "n": n, "correct": ok });
    for (d, (dn, dok)) in &by_data {
        table.push_str(&format!(
            "  {d} accuracy {:.2}% ({dok}/{dn})\n",
            pct(*dok, *dn)
        ));
        detail[format!("{d}_accuracy")] = json!(pct(*dok, *dn));
    }
    let mut types = serde_json::Map::new();
    for (t, (tn, tok)) in &by_type {
        table.push_str(&format!("  {t}: {:.2}%\n", pct(*tok, *tn)));
        types.insert(t.clone(), json!(pct(*tok, *tn)));
    }
    detail["question_types"] = Value::Object(types);
    Ok(ScoreReport {
        task: Task::Seed,
        metric: "accuracy",
        value: acc,
        answered: n,
        expected: qs.len(),
        detail,
        table,
    })
}

// ---------------------------------------------------------------- MMBench

/// VLMEvalKit's `can_infer_option` (`vlmeval/utils/matching_util.py` as of commit c6bdffd3,
/// 2024-03, `VERBOSE` unset; later versions changed the rule): the one option letter
/// standing alone in the answer (after `.()[],:;!*#{}` become spaces), `Z` for a refusal,
/// else nothing.
pub fn infer_option(answer: &str, letters: &[&str]) -> Option<String> {
    const REJECT: [&str; 4] = [
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        "Cannot determine the answer",
    ];
    if answer.contains("Failed to obtain answer via API") {
        return None;
    }
    if REJECT.iter().any(|r| answer.contains(r)) {
        return Some("Z".into());
    }
    let modded: String = answer
        .chars()
        .map(|c| if ".()[],:;!*#{}".contains(c) { ' ' } else { c })
        .collect();
    let splits: Vec<&str> = modded.split_whitespace().collect();
    let count = letters.iter().filter(|l| splits.contains(l)).count();
    if count == 1 {
        return letters
            .iter()
            .find(|l| splits.contains(l))
            .map(|l| l.to_string());
    }
    if count == 0 && splits.contains(&"Z") {
        return Some("Z".into());
    }
    None
}

/// VLMEvalKit's `can_infer`: [`infer_option`], else the one option whose text (lower-cased)
/// the answer contains.
pub fn infer_choice(answer: &str, choices: &[(&str, &str)]) -> Option<String> {
    let letters: Vec<&str> = choices.iter().map(|(l, _)| *l).collect();
    if let Some(l) = infer_option(answer, &letters) {
        return Some(l);
    }
    let low = answer.to_lowercase();
    let cands: Vec<&str> = choices
        .iter()
        .filter(|(_, t)| low.contains(&t.to_lowercase()))
        .map(|(l, _)| *l)
        .collect();
    match cands[..] {
        [one] => Some(one.to_string()),
        _ => None,
    }
}

fn mmbench(ans: &[Answer], path: &Path) -> Result<ScoreReport> {
    let t = read_tsv(path, "--annotations")?;
    let (Some(ci), Some(ca)) = (t.col("index"), t.col("answer")) else {
        bail!(
            "--annotations {}: needs `index` and `answer` columns (the dev split has answers)",
            path.display()
        );
    };
    // Round 0 answers by index (LLaVA's mmbench.sh runs one round: the TSV already holds the
    // circular copies as rows of their own).
    let mut by_index: HashMap<i64, &Answer> = HashMap::new();
    for a in ans {
        let round = a.raw.get("round_id").and_then(Value::as_i64).unwrap_or(0);
        let Some(idx) = a.id.as_i64().or_else(|| id_string(&a.id).parse().ok()) else {
            bail!("--answers: question_id {} is not an MMBench index", a.id);
        };
        if round == 0 {
            by_index.insert(idx, a);
        }
    }
    // circular group (index % 1e6) -> per row: Some(correct) or None (unanswered).
    let mut groups: BTreeMap<i64, Vec<Option<bool>>> = BTreeMap::new();
    let (mut n, mut ok) = (0usize, 0usize);
    for (r, row) in t.rows.iter().enumerate() {
        let idx: i64 = row[ci].trim().parse().map_err(|_| {
            anyhow!(
                "--annotations {} row {}: index {:?} is not an integer",
                path.display(),
                r + 1,
                row[ci]
            )
        })?;
        let gold = row[ca].trim();
        if is_none(gold) {
            bail!(
                "--annotations {} row {}: no answer (the test split has none; score the dev split)",
                path.display(),
                r + 1
            );
        }
        let opts = mmbench_options(&t, row);
        let choices: Vec<(&str, &str)> = MMBENCH_LETTERS
            .iter()
            .copied()
            .zip(opts.iter().map(String::as_str))
            .collect();
        let res = by_index
            .get(&idx)
            .map(|a| infer_choice(&a.text, &choices).as_deref() == Some(gold));
        if let Some(hit) = res {
            n += 1;
            ok += usize::from(hit);
        }
        groups.entry(idx % 1_000_000).or_default().push(res);
    }
    if ans.is_empty() {
        return Ok(checked(Task::Mmbench));
    }
    if n == 0 {
        bail!(
            "--answers: none of the answered indices is in --annotations {}",
            path.display()
        );
    }
    let complete: Vec<&Vec<Option<bool>>> = groups
        .values()
        .filter(|g| g.iter().all(Option::is_some))
        .collect();
    let circ_ok = complete
        .iter()
        .filter(|g| g.iter().all(|x| *x == Some(true)))
        .count();
    let circ = pct(circ_ok, complete.len());
    let vanilla = pct(ok, n);
    let mut table = format!(
        "mmbench: circular accuracy {circ:.2}% ({circ_ok}/{} questions, all rotations right); per row {vanilla:.2}% ({ok}/{n})\n",
        complete.len()
    );
    let partial = groups.len() - complete.len();
    if partial > 0 {
        table.push_str(&format!("  ({partial} questions have unanswered rotations and are left out of the circular accuracy)\n"));
    }
    Ok(ScoreReport {
        task: Task::Mmbench,
        metric: "circular_accuracy",
        value: circ,
        answered: n,
        expected: t.rows.len(),
        detail: json!({
            "circular_accuracy": circ, "questions": complete.len(), "questions_correct": circ_ok,
            "row_accuracy": vanilla, "rows": n, "incomplete_questions": partial,
        }),
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tests/fixtures/eval/official_refs.json`: LLaVA's own scorer code run on seeded
    /// synthetic answers by `tools/make_eval_refs.py`.
    fn official() -> Value {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/eval/official_refs.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("official_refs.json"))
            .expect("official_refs.json is JSON")
    }

    fn pairs(v: &Value) -> Vec<(String, Value)> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|p| (p[0].as_str().expect("a string").to_string(), p[1].clone()))
            .collect()
    }

    #[test]
    fn matches_llava_m4c_evaluator() {
        let o = official();
        let cases = pairs(&o["textvqa_normalise"]);
        assert!(cases.len() > 400);
        for (input, want) in cases {
            assert_eq!(
                evalai_normalise(&input),
                want.as_str().unwrap(),
                "input {input:?}"
            );
        }
        for c in o["textvqa_soft_score"].as_array().unwrap() {
            let gts: Vec<String> = c["gts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_string())
                .collect();
            let pred = c["pred"].as_str().unwrap();
            let want = c["score"].as_f64().unwrap();
            let got = vqa_soft_score(pred, &gts);
            assert!(
                (got - want).abs() < 1e-12,
                "{pred:?} vs {gts:?}: {got} != {want}"
            );
        }
        for (prompt, want) in pairs(&o["textvqa_prompt"]) {
            assert_eq!(
                textvqa_question(&prompt).as_deref(),
                want.as_str(),
                "{prompt:?}"
            );
        }
    }

    #[test]
    fn matches_llava_eval_pope() {
        let cases = pairs(&official()["pope_says_yes"]);
        assert!(cases.len() >= 200);
        for (text, want) in cases {
            assert_eq!(pope_says_yes(&text), want.as_bool().unwrap(), "{text:?}");
        }
    }

    #[test]
    fn evalai_normalisation_cases() {
        // Hand-run through EvalAIAnswerProcessor: lower, `,`/`?` dropped, punctuation next
        // to a space dropped else spaced, periods not before a digit dropped, numbers
        // mapped, articles dropped, contractions restored.
        assert_eq!(evalai_normalise("The Two Dogs."), "2 dogs");
        assert_eq!(evalai_normalise("dont"), "don't");
        assert_eq!(evalai_normalise("3.5"), "3.5");
        assert_eq!(evalai_normalise("coca-cola"), "coca cola");
        assert_eq!(evalai_normalise("coca - cola"), "coca cola");
        assert_eq!(evalai_normalise("1,000"), "1000");
        assert_eq!(evalai_normalise("What's up?"), "what 's up");
    }

    #[test]
    fn soft_score_is_min_one_of_matches_over_three() {
        let g = |n: usize| -> Vec<String> {
            (0..10)
                .map(|i| if i < n { "yes".into() } else { "no".into() })
                .collect()
        };
        // 3 of 10 agree: 7 leave-one-outs keep 3 (1.0), 3 keep 2 (2/3): (7 + 2) / 10 = 0.9.
        assert!((vqa_soft_score("yes", &g(3)) - 0.9).abs() < 1e-12);
        // 1 of 10: 9 sets keep 1 (1/3), 1 keeps 0: 3/10 = 0.3.
        assert!((vqa_soft_score("yes", &g(1)) - 0.3).abs() < 1e-12);
        assert_eq!(vqa_soft_score("maybe", &g(4)), 0.0);
        assert_eq!(vqa_soft_score("yes", &g(10)), 1.0);
    }

    #[test]
    fn pope_and_mme_readings() {
        assert!(!pope_says_yes("No, there is not."));
        assert!(pope_says_yes("Yes. There is no cat."));
        assert!(!pope_says_yes("There is not a cat"));
        assert!(pope_says_yes("None"));
        assert_eq!(mme_parse("Yes"), "yes");
        assert_eq!(mme_parse("No, it is not"), "no");
        assert_eq!(mme_parse("Not sure"), "no");
        assert_eq!(mme_parse("The answer is yes"), "other");
    }

    #[test]
    fn mmbench_letter_extraction() {
        let c = [("A", "red"), ("B", "blue"), ("C", "green")];
        assert_eq!(infer_choice("B", &c).as_deref(), Some("B"));
        assert_eq!(infer_choice("(C) green", &c).as_deref(), Some("C"));
        assert_eq!(infer_choice("It is blue", &c).as_deref(), Some("B"));
        assert_eq!(infer_choice("A or B", &c), None);
        assert_eq!(infer_choice("purple", &c), None);
    }

    #[test]
    fn textvqa_prompt_forms() {
        assert_eq!(
            textvqa_question("What is it?\nReference OCR token: a, b\nAnswer the question using a single word or phrase.").as_deref(),
            Some("what is it?")
        );
        assert_eq!(
            textvqa_question("What?\nAnswer briefly.").as_deref(),
            Some("what?")
        );
        assert_eq!(textvqa_question("one line"), None);
    }
}

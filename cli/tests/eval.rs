//! `visi-cli eval`, `eval-merge`, `score` and `sweep` through the built binary.
//!
//! Scorers: small synthetic question, answer and annotation sets in each benchmark's
//! format; the expected numbers are worked out by hand from the official scripts'
//! definitions (LLaVA's eval_pope.py / eval_textvqa.py / convert_*_for_eval.py, MME's
//! calculation.py, GQA's eval.py, VLMEvalKit's circular MMBench) in the comments.
//! Eval: answers equal `run` on the same image and question (tiny fixture model, CPU and,
//! where an adapter exists, wgpu), two chunks merge to the whole file, and a killed run
//! (partial file, cut-off last line) resumes without losing or redoing an answer.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use visi_tests::{binary_devices, expect_error, fixtures, Scratch};

fn visi(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("CI")
        .output()
        .context("running visi-cli")
}

fn ok(out: &Output) -> Result<String> {
    visi_tests::success_stdout(out)
}

/// Lines of JSON objects.
fn jsonl(items: &[Value]) -> String {
    items.iter().map(|v| format!("{v}\n")).collect()
}

fn score_json(args: &[&str]) -> Result<Value> {
    let mut a = vec!["score", "--json"];
    a.extend_from_slice(args);
    let out = ok(&visi(&a)?)?;
    Ok(serde_json::from_str(out.trim())?)
}

fn close(got: &Value, want: f64, what: &str) -> Result<()> {
    let g = got
        .as_f64()
        .with_context(|| format!("{what}: {got} is not a number"))?;
    ensure!((g - want).abs() < 1e-9, "{what}: got {g}, want {want}");
    Ok(())
}

#[test]
fn score_pope_by_hand() -> Result<()> {
    let s = Scratch::new("pope")?;
    let q = |id: u32, cat: &str| json!({"question_id": id, "image": "x.jpg", "text": format!("Is there a thing {id}?"), "category": cat});
    let qs = s.write(
        "q.jsonl",
        &jsonl(&[
            q(1, "adversarial"),
            q(2, "adversarial"),
            q(3, "adversarial"),
            q(4, "adversarial"),
            q(5, "adversarial"),
            q(6, "random"),
            q(7, "random"),
            q(8, "random"),
        ]),
    )?;
    let lab = |l: &str| json!({"question_id": 0, "image": "x.jpg", "text": "", "label": l});
    s.write(
        "coco/coco_pope_adversarial.json",
        &jsonl(&[lab("yes"), lab("no"), lab("yes"), lab("no"), lab("no")]),
    )?;
    s.write(
        "coco/coco_pope_random.json",
        &jsonl(&[lab("yes"), lab("yes"), lab("no")]),
    )?;
    let a = |id: u32, text: &str| json!({"question_id": id, "prompt": format!("Is there a thing {id}?"), "text": text});
    let ans = s.write(
        "a.jsonl",
        &jsonl(&[
            a(1, "Yes, there is a dog."),          // label yes -> TP
            a(2, "No."),                           // label no  -> TN
            a(3, "There is no dog in the image."), // label yes, "no" a word -> FN
            a(4, "Yes"),                           // label no  -> FP
            a(5, "Yes. There is no cat."),         // label no, first sentence "Yes" -> FP
            a(6, "Yes"),                           // random: TP
            a(7, "I think so, yes. Not sure."),    // first sentence has no no-word -> TP
            a(8, "not at all"),                    // "not" -> no, label no -> TN
        ]),
    )?;
    let v = score_json(&[
        "--task",
        "pope",
        "--answers",
        &ans,
        "--annotations",
        &s.p("coco"),
        "--questions",
        &qs,
    ])?;
    let adv = &v["detail"]["categories"]["adversarial"];
    // adversarial: TP 1, FP 2, TN 1, FN 1: precision 1/3, recall 1/2,
    // F1 = 2 (1/3)(1/2) / (1/3 + 1/2) = 0.4, accuracy 2/5, yes-ratio 3/5.
    close(&adv["precision"], 1.0 / 3.0, "adv precision")?;
    close(&adv["recall"], 0.5, "adv recall")?;
    close(&adv["f1"], 0.4, "adv f1")?;
    close(&adv["accuracy"], 0.4, "adv acc")?;
    close(&adv["yes_ratio"], 0.6, "adv yes")?;
    // random: TP 2, TN 1: everything 1, yes-ratio 2/3.
    let rnd = &v["detail"]["categories"]["random"];
    close(&rnd["f1"], 1.0, "rnd f1")?;
    close(&rnd["yes_ratio"], 2.0 / 3.0, "rnd yes")?;
    // Headline: mean F1 (0.4 + 1) / 2.
    close(&v["value"], 0.7, "mean f1")?;
    close(&v["detail"]["mean_accuracy"], 0.7, "mean acc")?;
    // Without the question file the categories are unknown.
    expect_error(
        &visi(&[
            "score",
            "--task",
            "pope",
            "--answers",
            &ans,
            "--annotations",
            &s.p("coco"),
        ])?,
        2,
        &["--questions"],
    )?;
    Ok(())
}

#[test]
fn score_mme_by_hand() -> Result<()> {
    let s = Scratch::new("mme")?;
    let root = "MME_Benchmark_release_version";
    // existence and code_reasoning: flat folders; artwork: images/ + questions_answers_YN/,
    // with one ground-truth question written with two spaces (as some MME files are).
    s.write(&format!("{root}/existence/a.txt"), "Is there a dog in this image? Please answer yes or no.\tYes\nIs there a cat in this image? Please answer yes or no.\tNo\n")?;
    s.write(&format!("{root}/existence/b.txt"), "Is there a car in this image? Please answer yes or no.\tYes\nIs there a bus in this image? Please answer yes or no.\tNo\n")?;
    s.write(&format!("{root}/artwork/images/.keep"), "")?;
    s.write(&format!("{root}/artwork/questions_answers_YN/c.txt"), "Is this artwork by X? Please answer yes or no.\tYes\nIs this artwork by Y?  Please answer yes or no.\tNo\n")?;
    s.write(&format!("{root}/code_reasoning/d.txt"), "Does the code print 1? Please answer yes or no.\tYes\nDoes the code print 2? Please answer yes or no.\tNo\n")?;
    let short = "\nAnswer the question using a single word or phrase.";
    let a = |id: &str, q: &str, text: &str| json!({"question_id": id, "prompt": format!("{q}{short}"), "text": text});
    let ans = s.write(
        "a.jsonl",
        &jsonl(&[
            a("existence/a.jpg", "Is there a dog in this image?", "Yes"),
            a("existence/a.jpg", "Is there a cat in this image?", "No"),
            a("existence/b.jpg", "Is there a car in this image?", "Yes"),
            a("existence/b.jpg", "Is there a bus in this image?", "Yes"),
            a("artwork/c.jpg", "Is this artwork by X?", "No"),
            a("artwork/c.jpg", "Is this artwork by Y?", "no, it is not"),
            a(
                "code_reasoning/d.png",
                "Does the code print 1?",
                "The output is yes",
            ),
            a("code_reasoning/d.png", "Does the code print 2?", "No"),
        ]),
    )?;
    let v = score_json(&[
        "--task",
        "mme",
        "--answers",
        &ans,
        "--annotations",
        &s.p(root),
    ])?;
    let t = &v["detail"]["subtasks"];
    // existence: 3 of 4 right (acc .75), image a both right, b not (acc+ .5): 125.
    close(&t["existence"]["score"], 125.0, "existence")?;
    // artwork: X wrong, Y right ("no, it is not" -> "no, " holds "no"): acc .5, acc+ 0: 50.
    close(&t["artwork"]["score"], 50.0, "artwork")?;
    // code_reasoning: "the " holds neither yes nor no -> other (wrong); acc .5, acc+ 0: 50.
    close(&t["code_reasoning"]["score"], 50.0, "code")?;
    close(&v["detail"]["perception"], 175.0, "perception")?;
    close(&v["detail"]["cognition"], 50.0, "cognition")?;
    Ok(())
}

#[test]
fn score_gqa_by_hand() -> Result<()> {
    let s = Scratch::new("gqa")?;
    let q = |ans: &str, structural: &str| json!({"answer": ans, "isBalanced": true, "types": {"structural": structural}});
    let ann = json!({
        "1": q("yes", "verify"), "2": q("red", "query"), "3": q("no", "logical"),
        "4": q("two", "query"), "5": {"answer": "x", "isBalanced": false, "types": {"structural": "query"}},
    });
    let annp = s.write("testdev_balanced_questions.json", &ann.to_string())?;
    let a = |id: &str, text: &str| json!({"question_id": id, "prompt": "q", "text": text});
    let ans = s.write(
        "a.jsonl",
        &jsonl(&[
            a("1", "Yes."),
            a("2", "Red"),
            a("3", "yes"),
            a("4", "two.."),
            a("5", "x"),
            a("999", "no"),
        ]),
    )?;
    let v = score_json(&["--task", "gqa", "--answers", &ans, "--annotations", &annp])?;
    // rstrip('.').lower(): "yes" right, "red" right, "yes" != "no", "two" right; question 5
    // is not balanced and 999 is not in the annotations (both ignored): 3/4 = 75%;
    // binary (verify, logical) 1/2, open (query) 2/2.
    close(&v["value"], 75.0, "accuracy")?;
    close(&v["detail"]["binary"], 50.0, "binary")?;
    close(&v["detail"]["open"], 100.0, "open")?;
    ensure!(v["detail"]["not_in_annotations"] == 1);
    Ok(())
}

#[test]
fn score_textvqa_by_hand() -> Result<()> {
    let s = Scratch::new("textvqa")?;
    let rep = |x: &str, n: usize| vec![x.to_string(); n];
    let data = json!({"data": [
        {"image_id": "img1", "question": "What brand is it?", "answers": ([rep("Coca-Cola", 4), rep("coca cola", 2), rep("pepsi", 4)].concat())},
        {"image_id": "img1", "question": "What number is shown?", "answers": ([rep("two", 1), rep("2", 2), rep("3", 7)].concat())},
        {"image_id": "img2", "question": "What does the sign say?", "answers": rep("stop", 10)},
    ]});
    let annp = s.write("TextVQA_0.5.1_val.json", &data.to_string())?;
    let inst = "Answer the question using a single word or phrase.";
    let a = |id: &str, prompt: String, text: &str| json!({"question_id": id, "prompt": prompt, "text": text});
    let ans = s.write(
        "a.jsonl",
        &jsonl(&[
            a(
                "img1",
                format!("What brand is it?\nReference OCR token: Coca, Cola\n{inst}"),
                "Coca Cola",
            ),
            a("img1", format!("What number is shown?\n{inst}"), "Two"),
            a("img2", format!("What does the sign say?\n{inst}"), "Go"),
        ]),
    )?;
    let v = score_json(&[
        "--task",
        "textvqa",
        "--answers",
        &ans,
        "--annotations",
        &annp,
    ])?;
    // 1: "Coca-Cola" normalises to "coca cola" ('-' becomes a space): 6 of 10 match, every
    //    leave-one-out set keeps >= 5 -> 1.0.
    // 2: "two" -> "2": 3 of 10 ("two", "2", "2"); 7 sets keep 3 (1.0), 3 keep 2 (2/3) -> 0.9.
    // 3: "go" matches nothing -> 0.  Mean 1.9 / 3 = 63.33%.
    close(&v["value"], 190.0 / 3.0, "accuracy")?;
    Ok(())
}

#[test]
fn score_seed_by_hand() -> Result<()> {
    let s = Scratch::new("seed")?;
    let data = json!({
    "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 3},
    "questions": [
        {"question_id": "1", "answer": "A", "question_type_id": 1, "data_type": "image"},
        {"question_id": "2", "answer": "B", "question_type_id": 1, "data_type": "image"},
        {"question_id": "3", "answer": "C", "question_type_id": 2, "data_type": "image"},
        {"question_id": "4", "answer": "D", "question_type_id": 3, "data_type": "video"},
    ]});
    let annp = s.write("SEED-Bench.json", &data.to_string())?;
    let a = |id: u32, text: &str| json!({"question_id": id, "prompt": "q", "text": text});
    let ans = s.write("a.jsonl", &jsonl(&[a(1, "A"), a(2, "C"), a(3, "C")]))?;
    let v = score_json(&["--task", "seed", "--answers", &ans, "--annotations", &annp])?;
    // Exact letters: 1 right, 2 wrong, 3 right: 2/3; Scene Understanding 1/2, Instance
    // Identity 1/1; question 4 (video) unanswered, so 3 of the 4 are scored.
    close(&v["value"], 200.0 / 3.0, "accuracy")?;
    close(&v["detail"]["image_accuracy"], 200.0 / 3.0, "image")?;
    close(
        &v["detail"]["question_types"]["Scene Understanding"],
        50.0,
        "scene",
    )?;
    close(
        &v["detail"]["question_types"]["Instance Identity"],
        100.0,
        "instance",
    )?;
    ensure!(v["answered"] == 3 && v["expected"] == 4, "{v}");
    Ok(())
}

/// An MMBench TSV: two questions with a circular copy each (index + 1e6, options rotated)
/// and one without, the fixture image as base64.
fn mmbench_tsv(s: &Scratch) -> Result<String> {
    let img = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(fixtures().join("images/wide.jpg"))?,
    );
    let header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit\n";
    let row = |i: i64, q: &str, h: &str, o: [&str; 4], ans: &str| {
        format!("{i}\t{q}\t{h}\t{}\t{}\t{}\t{}\t{ans}\tcolour\t{img}\tsynthetic\tperception\tnan\tdev\n", o[0], o[1], o[2], o[3])
    };
    let text = [
        header.to_string(),
        row(
            0,
            "What colour is the sky?",
            "nan",
            ["blue", "red", "green", ""],
            "A",
        ),
        row(
            1_000_000,
            "What colour is the sky?",
            "nan",
            ["red", "green", "blue", ""],
            "C",
        ),
        row(1, "How many cars?", "Count them.", ["1", "2", "", ""], "B"),
        row(
            1_000_001,
            "How many cars?",
            "Count them.",
            ["2", "1", "", ""],
            "A",
        ),
        row(2, "\"\"\"Which\"\" letter?\"", "", ["x", "y", "", ""], "B"),
    ]
    .concat();
    s.write("mmbench.tsv", &text)
}

#[test]
fn score_mmbench_circular_by_hand() -> Result<()> {
    let s = Scratch::new("mmb")?;
    let tsv = mmbench_tsv(&s)?;
    let a = |id: i64, text: &str| json!({"question_id": id, "round_id": 0, "prompt": "q", "text": text});
    let ans = s.write(
        "a.jsonl",
        &jsonl(&[
            a(0, "A"),
            a(1_000_000, "C"),
            a(1, "B"),
            a(1_000_001, "B"),
            a(2, "The answer is y"),
        ]),
    )?;
    let v = score_json(&[
        "--task",
        "mmbench",
        "--answers",
        &ans,
        "--annotations",
        &tsv,
    ])?;
    // Rows: 0 right, 1e6 right (group 0 right); 1 right, 1e6+1 wrong (group 1 wrong); 2: no
    // letter stands alone, the text "y" is the one option found -> B, right (group 2).
    // Circular: 2 of 3 questions; per row 4 of 5.
    close(&v["value"], 200.0 / 3.0, "circular")?;
    close(&v["detail"]["row_accuracy"], 80.0, "rows")?;
    Ok(())
}

// ---------------------------------------------------------------- eval

const MODEL: &str = "tiny-llava-gqa";
const SHORT: &str = "\nAnswer the question using a single word or phrase.";

fn model() -> String {
    fixtures().join(MODEL).to_string_lossy().to_string()
}

fn images() -> String {
    fixtures().join("images").to_string_lossy().to_string()
}

/// Five questions over both fixture images.
fn questions(s: &Scratch) -> Result<String> {
    let q = |id: &str, img: &str, text: String| json!({"question_id": id, "image": img, "text": text, "category": "default"});
    s.write(
        "q.jsonl",
        &jsonl(&[
            q("q1", "square.png", format!("What is in the image?{SHORT}")),
            q("q2", "wide.jpg", format!("Is there a dog?{SHORT}")),
            q("q3", "wide.jpg", "What colour is it?".into()),
            q("q4", "square.png", format!("Describe the scene.{SHORT}")),
            q("q5", "wide.jpg", format!("How many cars?{SHORT}")),
        ]),
    )
}

fn eval_args<'a>(
    qs: &'a str,
    answers: &'a str,
    device: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "eval",
        "--questions",
        qs,
        "--answers",
        answers,
        "--device",
        device,
        "--max-new-tokens",
        "6",
    ];
    a.extend_from_slice(extra);
    a
}

fn run_eval(qs: &str, answers: &str, device: &str, extra: &[&str]) -> Result<()> {
    let m = model();
    let im = images();
    let mut a = eval_args(qs, answers, device, extra);
    a.extend(["--model", &m, "--image-folder", &im]);
    ok(&visi(&a)?).map(|_| ())
}

fn read_lines(p: &str) -> Result<Vec<Value>> {
    std::fs::read_to_string(p)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// (question_id, prompt, text) of each answer.
fn triples(v: &[Value]) -> Vec<(Value, Value, Value)> {
    v.iter()
        .map(|a| {
            (
                a["question_id"].clone(),
                a["prompt"].clone(),
                a["text"].clone(),
            )
        })
        .collect()
}

fn run_text(image: &Path, prompt: &str, device: &str, prune: &[&str]) -> Result<String> {
    let m = model();
    let img = image.to_string_lossy().to_string();
    let mut a = vec![
        "run",
        "--model",
        &m,
        "--image",
        &img,
        "--prompt",
        prompt,
        "--image-mode",
        "pad",
        "--max-new-tokens",
        "6",
        "--device",
        device,
        "--json",
    ];
    a.extend_from_slice(prune);
    let out = ok(&visi(&a)?)?;
    let v: Value = serde_json::from_str(out.trim())?;
    // The wgpu half must really run on wgpu.
    ensure!(
        device != "gpu" || v["device"]["backend"] != "cpu",
        "--device gpu ran on the CPU: {}",
        v["device"]
    );
    Ok(v["text"].as_str().unwrap_or_default().trim().to_string())
}

#[test]
fn eval_answers_equal_run() -> Result<()> {
    let s = Scratch::new("vsrun")?;
    let qs = questions(&s)?;
    // `auto` takes the adapter (lavapipe included; `gpu` refuses software adapters).
    let devices = binary_devices(Path::new(env!("CARGO_BIN_EXE_visi-cli")))?;
    let configs = [
        vec![],
        vec!["--no-prune"],
        vec!["--prune", r#"{"method":"fastv","k":2,"ratio":0.5}"#],
    ];
    for device in devices {
        // Every config on the CPU; the paper default on wgpu (lavapipe is slow).
        let n = if device == "cpu" { configs.len() } else { 1 };
        for prune in configs[..n].iter().cloned() {
            let ans = s.p(&format!("a-{device}-{}.jsonl", prune.len()));
            run_eval(&qs, &ans, device, &prune)?;
            let got = read_lines(&ans)?;
            ensure!(got.len() == 5, "{device}: {} answers", got.len());
            for (a, q) in got.iter().zip(read_lines(&qs)?) {
                let img = fixtures()
                    .join("images")
                    .join(q["image"].as_str().unwrap_or_default());
                let want = run_text(&img, q["text"].as_str().unwrap_or_default(), device, &prune)?;
                ensure!(
                    a["question_id"] == q["question_id"] && a["prompt"] == q["text"],
                    "{device}: {a}"
                );
                ensure!(
                    a["text"] == want.as_str(),
                    "{device} {prune:?} {}: eval {} vs run {want:?}",
                    q["question_id"],
                    a["text"]
                );
                let m = &a["metadata"];
                for k in ["kept_image_tokens", "prefill_flops_fraction", "ttft_ms"] {
                    ensure!(m[k].is_number(), "{device}: metadata.{k} missing: {m}");
                }
                ensure!(
                    m.get("fusion_layer").is_some()
                        && a["model_id"] == MODEL
                        && a["answer_id"].as_str().is_some_and(|s| s.len() == 22)
                );
                if prune == ["--no-prune"] {
                    ensure!(
                        m["prefill_flops_fraction"] == 1.0
                            && m["kept_image_tokens"] == m["image_tokens"],
                        "{m}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn chunks_merge_to_the_whole_and_resume_loses_nothing() -> Result<()> {
    let s = Scratch::new("chunks")?;
    let qs = questions(&s)?;
    let whole = s.p("whole.jsonl");
    run_eval(&qs, &whole, "cpu", &[])?;
    let want = triples(&read_lines(&whole)?);
    ensure!(want.len() == 5);

    // LLaVA's get_chunk on 5 questions in 2 chunks: ceil(5/2) = 3 -> [0..3), [3..5).
    for k in ["0", "1"] {
        run_eval(
            &qs,
            &s.p(&format!("c{k}.jsonl")),
            "cpu",
            &["--num-chunks", "2", "--chunk-idx", k],
        )?;
    }
    ensure!(read_lines(&s.p("c0.jsonl"))?.len() == 3 && read_lines(&s.p("c1.jsonl"))?.len() == 2);
    let merged = s.p("merged.jsonl");
    // Chunk files in any order: the question file gives the order.
    ok(&visi(&[
        "eval-merge",
        "--questions",
        &qs,
        "--out",
        &merged,
        &s.p("c1.jsonl"),
        &s.p("c0.jsonl"),
    ])?)?;
    ensure!(
        triples(&read_lines(&merged)?) == want,
        "merged chunks differ from the whole run"
    );
    expect_error(
        &visi(&[
            "eval-merge",
            "--questions",
            &qs,
            "--out",
            &merged,
            &s.p("c0.jsonl"),
        ])?,
        2,
        &["already exists", "--force"],
    )?;
    expect_error(
        &visi(&[
            "eval-merge",
            "--questions",
            &qs,
            "--out",
            &s.p("m2.jsonl"),
            &s.p("c0.jsonl"),
        ])?,
        2,
        &["2 of 5 questions have no answer"],
    )?;

    // A kill mid-write: two whole answers and half of the third, no newline.
    let full = std::fs::read_to_string(&whole)?;
    let lines: Vec<&str> = full.lines().collect();
    let half = (0..=lines[2].len() / 2)
        .rev()
        .find(|&i| lines[2].is_char_boundary(i))
        .unwrap_or(0);
    let killed = format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..half]);
    let resumed = s.write("resumed.jsonl", &killed)?;
    run_eval(&qs, &resumed, "cpu", &[])?;
    let after = std::fs::read_to_string(&resumed)?;
    ensure!(
        triples(&read_lines(&resumed)?) == want,
        "resumed file differs from the whole run"
    );
    // The answers already there are kept byte for byte (not redone).
    ensure!(
        after.starts_with(&format!("{}\n{}\n", lines[0], lines[1])),
        "kept lines changed"
    );
    // A complete file: nothing to do, nothing changes.
    run_eval(&qs, &resumed, "cpu", &[])?;
    ensure!(std::fs::read_to_string(&resumed)? == after);
    // Other settings on the same file are refused; --force starts over.
    let m = model();
    let im = images();
    let mut a = eval_args(&qs, &resumed, "cpu", &["--no-prune"]);
    a.extend(["--model", &m, "--image-folder", &im]);
    expect_error(&visi(&a)?, 2, &["other settings", "--force"])?;
    a.push("--force");
    ok(&visi(&a)?)?;
    ensure!(read_lines(&resumed)?.len() == 5);
    Ok(())
}

#[test]
fn eval_mmbench_tsv() -> Result<()> {
    let s = Scratch::new("mmbeval")?;
    let tsv = mmbench_tsv(&s)?;
    let ans = s.p("a.jsonl");
    let m = model();
    ok(&visi(&[
        "eval",
        "--model",
        &m,
        "--questions",
        &tsv,
        "--answers",
        &ans,
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        "--no-prune",
    ])?)?;
    let got = read_lines(&ans)?;
    ensure!(got.len() == 5);
    // Row 1: LLaVA's model_vqa_mmbench prompt: hint, question, "X. option" lines; the
    // model also sees the single-prediction instruction.
    let a = &got[2];
    ensure!(a["question_id"] == 1 && a["round_id"] == 0, "{a}");
    ensure!(
        a["prompt"] == "Count them.\nHow many cars?\nA. 1\nB. 2",
        "{}",
        a["prompt"]
    );
    ensure!(
        a["options"] == json!(["1", "2"]) && a["option_char"] == json!(["A", "B"]),
        "{a}"
    );
    let want = run_text(
        &fixtures().join("images/wide.jpg"),
        "Count them.\nHow many cars?\nA. 1\nB. 2\nAnswer with the option's letter from the given choices directly.",
        "cpu",
        &["--no-prune"],
    )?;
    ensure!(
        a["text"] == want.as_str(),
        "eval {} vs run {want:?}",
        a["text"]
    );
    // A quoted field as pandas writes it (`"""Which"" letter?"`) reads back as pandas
    // reads it; an empty hint adds nothing.
    ensure!(
        got[4]["prompt"] == "\"Which\" letter?\nA. x\nB. y",
        "{}",
        got[4]["prompt"]
    );
    // The answers score.
    let v = score_json(&[
        "--task",
        "mmbench",
        "--answers",
        &ans,
        "--annotations",
        &tsv,
    ])?;
    ensure!(v["answered"] == 5, "{v}");
    Ok(())
}

#[test]
fn sweep_table_and_plot() -> Result<()> {
    let s = Scratch::new("sweep")?;
    let qs = questions(&s)?;
    let ann = json!({
        "q1": {"answer": "dog", "isBalanced": true}, "q2": {"answer": "yes", "isBalanced": true},
        "q3": {"answer": "red", "isBalanced": true}, "q4": {"answer": "a street", "isBalanced": true},
        "q5": {"answer": "two", "isBalanced": true},
    });
    let annp = s.write("gqa.json", &ann.to_string())?;
    let out = s.p("sweep");
    let m = model();
    let im = images();
    let configs =
        r#"["dense", {"name": "fastv-half", "prune": {"method": "fastv", "k": 2, "ratio": 0.5}}]"#;
    let args = [
        "sweep",
        "--model",
        &m,
        "--questions",
        &qs,
        "--image-folder",
        &im,
        "--task",
        "gqa",
        "--annotations",
        &annp,
        "--configs",
        configs,
        "--out",
        &out,
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
    ];
    let table = ok(&visi(&args)?)?;
    ensure!(
        table.lines().count() == 3 && table.contains("dense\t") && table.contains("fastv-half\t"),
        "{table}"
    );
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(format!("{out}/sweep.json"))?)?;
    for c in rep["configs"].as_array().context("configs")? {
        // Each row's score is `score` on its answers file.
        let ans = c["answers"].as_str().context("answers")?;
        let v = score_json(&["--task", "gqa", "--answers", ans, "--annotations", &annp])?;
        ensure!(v["value"] == c["value"], "{} vs {}", v["value"], c["value"]);
        ensure!(c["mean_ttft_ms"].as_f64().is_some_and(|t| t > 0.0), "{c}");
    }
    let dense = &rep["configs"][0];
    ensure!(dense["mean_prefill_flops_fraction"] == 1.0, "{dense}");
    ensure!(rep["configs"][1]["mean_prefill_flops_fraction"]
        .as_f64()
        .is_some_and(|f| f < 1.0));
    let png = image::open(format!("{out}/sweep.png"))?;
    ensure!(png.width() > 500 && png.height() > 300);
    // The outputs exist now: a second sweep needs --force (answers are resumed).
    expect_error(&visi(&args)?, 2, &["sweep.tsv", "--force"])?;
    let mut again = args.to_vec();
    again.push("--force");
    ok(&visi(&again)?)?;
    Ok(())
}

#[test]
fn bad_input_exits_2_before_the_model() -> Result<()> {
    let s = Scratch::new("bad")?;
    let qs = questions(&s)?;
    let m = model();
    let im = images();
    let ans = s.p("a.jsonl");
    let eval = |extra: &[&str]| -> Result<Output> {
        let mut a = vec![
            "eval",
            "--model",
            m.as_str(),
            "--answers",
            ans.as_str(),
            "--device",
            "cpu",
        ];
        a.extend_from_slice(extra);
        visi(&a)
    };
    expect_error(
        &eval(&["--questions", &s.p("nope.jsonl"), "--image-folder", &im])?,
        2,
        &["nope.jsonl", "not found"],
    )?;
    expect_error(
        &eval(&[
            "--questions",
            &s.write("q.txt", "x")?,
            "--image-folder",
            &im,
        ])?,
        2,
        &[".jsonl", ".tsv"],
    )?;
    let broken = s.write(
        "broken.jsonl",
        "{\"question_id\": 1, \"image\": \"square.png\", \"text\": \"a\"}\n{not json\n",
    )?;
    expect_error(
        &eval(&["--questions", &broken, "--image-folder", &im])?,
        2,
        &["line 2", "not JSON"],
    )?;
    let noimg = s.write(
        "noimg.jsonl",
        "{\"question_id\": 1, \"image\": \"missing.png\", \"text\": \"a\"}\n",
    )?;
    expect_error(
        &eval(&["--questions", &noimg, "--image-folder", &im])?,
        2,
        &["missing.png", "not found"],
    )?;
    let escape = s.write(
        "esc.jsonl",
        "{\"question_id\": 1, \"image\": \"../images/square.png\", \"text\": \"a\"}\n",
    )?;
    expect_error(
        &eval(&["--questions", &escape, "--image-folder", &im])?,
        2,
        &["inside --image-folder"],
    )?;
    expect_error(&eval(&["--questions", &qs])?, 2, &["--image-folder"])?;
    expect_error(
        &eval(&[
            "--questions",
            &qs,
            "--image-folder",
            &im,
            "--num-chunks",
            "2",
            "--chunk-idx",
            "2",
        ])?,
        2,
        &["--chunk-idx 2"],
    )?;
    expect_error(
        &eval(&[
            "--questions",
            &qs,
            "--image-folder",
            &im,
            "--num-chunks",
            "0",
        ])?,
        2,
        &["--num-chunks"],
    )?;
    expect_error(
        &eval(&[
            "--questions",
            &qs,
            "--image-folder",
            &im,
            "--prune",
            "{\"method\":\"nope\"}",
        ])?,
        2,
        &["nope"],
    )?;
    let dup = s.write(
        "dup.jsonl",
        &format!(
            "{0}\n{0}\n",
            json!({"question_id": 1, "image": "square.png", "text": "a"})
        ),
    )?;
    expect_error(
        &eval(&["--questions", &dup, "--image-folder", &im])?,
        2,
        &["appears twice"],
    )?;
    // An answers file that belongs to something else.
    s.write(
        "a.jsonl",
        "{\"question_id\": \"zz\", \"prompt\": \"other\", \"text\": \"x\"}\n",
    )?;
    expect_error(
        &eval(&["--questions", &qs, "--image-folder", &im])?,
        2,
        &["outside this question file", "--force"],
    )?;
    // Answers from another model are not resumed into.
    let other = json!({"question_id": "q1", "prompt": format!("What is in the image?{SHORT}"), "text": "x", "model_id": "other-model"});
    s.write("a.jsonl", &format!("{other}\n"))?;
    expect_error(
        &eval(&["--questions", &qs, "--image-folder", &im])?,
        2,
        &["other-model", "--force"],
    )?;
    s.write("a.jsonl", "garbage\n{\"question_id\": \"q1\"}\n")?;
    expect_error(
        &eval(&["--questions", &qs, "--image-folder", &im])?,
        2,
        &["line 1"],
    )?;
    let tsv = s.write("bad.tsv", "index\tquestion\n0\tq\n")?;
    expect_error(&eval(&["--questions", &tsv])?, 2, &["no `image` column"])?;
    // score
    let annp = s.write("g.json", "{\"1\": {\"answer\": \"b\"}}")?;
    let none = s.p("none.jsonl");
    let score = |answers: &str, annotations: &str| {
        visi(&[
            "score",
            "--task",
            "gqa",
            "--answers",
            answers,
            "--annotations",
            annotations,
        ])
    };
    expect_error(&score(&none, &annp)?, 2, &["none.jsonl"])?;
    // A question file where the annotations belong.
    expect_error(&score(&qs, &qs)?, 2, &["--annotations", "not JSON"])?;
    let cut = s.write(
        "cut.jsonl",
        "{\"question_id\": 1, \"prompt\": \"a\", \"text\": \"b\"}\n{\"question_id\": 2, \"pro",
    )?;
    expect_error(
        &visi(&[
            "score",
            "--task",
            "gqa",
            "--answers",
            &cut,
            "--annotations",
            &annp,
        ])?,
        2,
        &["line 2", "re-running eval repairs it"],
    )?;
    expect_error(
        &visi(&[
            "score",
            "--task",
            "gqa",
            "--answers",
            &cut,
            "--annotations",
            &s.p("missing.json"),
        ])?,
        2,
        &["--annotations", "testdev_balanced_questions.json"],
    )?;
    expect_error(
        &visi(&[
            "score",
            "--task",
            "nope",
            "--answers",
            &cut,
            "--annotations",
            &annp,
        ])?,
        2,
        &["nope"],
    )?;
    // sweep
    let sw = |extra: &[&str]| -> Result<Output> {
        let mut a = vec![
            "sweep",
            "--model",
            m.as_str(),
            "--questions",
            qs.as_str(),
            "--image-folder",
            im.as_str(),
            "--task",
            "gqa",
            "--annotations",
            annp.as_str(),
            "--device",
            "cpu",
        ];
        a.extend_from_slice(extra);
        visi(&a)
    };
    let out = s.p("sw");
    expect_error(
        &sw(&["--out", &out, "--configs", "[\"dense\", \"dense\"]"])?,
        2,
        &["two configs are named"],
    )?;
    expect_error(
        &sw(&["--out", &out, "--configs", "[{\"method\": \"fastv\"}]"])?,
        2,
        &["entry 0"],
    )?;
    expect_error(&sw(&["--out", &out, "--no-prune"])?, 2, &["--configs"])?;
    expect_error(
        &sw(&["--out", &s.p("no/such/dir")])?,
        2,
        &["does not exist"],
    )?;
    // Wrong annotations are found before any answer is generated.
    let mut a = vec![
        "sweep",
        "--model",
        &m,
        "--questions",
        &qs,
        "--image-folder",
        &im,
    ];
    a.extend([
        "--task",
        "textvqa",
        "--annotations",
        &annp,
        "--out",
        &out,
        "--device",
        "cpu",
    ]);
    expect_error(&visi(&a)?, 2, &["no `data` list"])?;
    ensure!(
        !Path::new(&out).exists(),
        "the sweep made its output directory before failing"
    );
    Ok(())
}

/// Polls until `path` holds at least `n` complete lines (60 s at most).
fn wait_lines(path: &str, n: usize) -> Result<()> {
    for _ in 0..600 {
        let have = std::fs::read_to_string(path).map_or(0, |t| t.matches('\n').count());
        if have >= n {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("{path} never reached {n} lines")
}

#[test]
fn interrupt_and_kill_then_resume() -> Result<()> {
    let s = Scratch::new("kill")?;
    let qs = questions(&s)?;
    let whole = s.p("whole.jsonl");
    run_eval(&qs, &whole, "cpu", &[])?;
    let want = triples(&read_lines(&whole)?);
    let m = model();
    let im = images();
    // A 100 ms pause per token makes each answer of the tiny model take ~0.6 s.
    let spawn = |answers: &str| -> Result<std::process::Child> {
        let mut a = eval_args(&qs, answers, "cpu", &[]);
        a.extend(["--model", &m, "--image-folder", &im]);
        Ok(Command::new(env!("CARGO_BIN_EXE_visi-cli"))
            .args(&a)
            .env("VISI_DEBUG_TOKEN_DELAY_MS", "100")
            .env_remove("CI")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    };

    // Ctrl-C (SIGINT) mid-run: exit 130, finished answers kept, the half answer dropped.
    let int = s.p("int.jsonl");
    let child = spawn(&int)?;
    wait_lines(&int, 1)?;
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(sent.success());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(130),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(stderr.contains("to resume"), "{stderr}");
    let kept = read_lines(&int)?;
    ensure!(
        !kept.is_empty() && kept.len() < 5,
        "{} answers after Ctrl-C",
        kept.len()
    );
    ensure!(triples(&kept)[..] == want[..kept.len()]);
    run_eval(&qs, &int, "cpu", &[])?;
    ensure!(
        triples(&read_lines(&int)?) == want,
        "resumed after Ctrl-C differs"
    );

    // SIGKILL mid-run: whatever the file holds, the same command completes it.
    let killed = s.p("killed.jsonl");
    let mut child = spawn(&killed)?;
    wait_lines(&killed, 2)?;
    child.kill()?;
    child.wait()?;
    ensure!(read_lines(&killed)?.len() < 5, "finished before the kill");
    run_eval(&qs, &killed, "cpu", &[])?;
    ensure!(
        triples(&read_lines(&killed)?) == want,
        "resumed after a kill differs"
    );
    Ok(())
}

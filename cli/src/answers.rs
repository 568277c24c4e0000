//! The files of LLaVA's evaluation scripts (`scripts/v1_5/eval`): question files (jsonl
//! with `question_id`/`image`/`text`/`category`, and the MMBench TSV with base64 images),
//! answer files (jsonl, one object per line), LLaVA's chunk split, and the checks and
//! repairs that let an interrupted `eval` resume without losing an answer.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// Largest question, answer or annotation file read (the MMBench test TSV with its base64
/// images is about 1 GiB).
pub const MAX_INPUT_BYTES: u64 = 4 << 30;

/// MMBench's option letters, in order.
pub const MMBENCH_LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// What LLaVA's `model_vqa_mmbench.py --single-pred-prompt` appends to every question.
pub const MMBENCH_SINGLE_PRED: &str =
    "Answer with the option's letter from the given choices directly.";

/// Reads a whole regular file of at most `max` bytes; errors name `what` and the path.
pub fn read_bounded(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow!("{what} {}: {}", path.display(), io_reason(&e)))?;
    if !meta.is_file() {
        bail!("{what} {}: not a regular file", path.display());
    }
    if meta.len() > max {
        bail!(
            "{what} {}: {} bytes, more than the {max} this reads",
            path.display(),
            meta.len()
        );
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut buf))
        .map_err(|e| anyhow!("{what} {}: {}", path.display(), io_reason(&e)))?;
    Ok(buf)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = read_bounded(path, what, MAX_INPUT_BYTES)?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{what} {}: not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A short reason for an I/O error ("not found" rather than "No such file or directory (os
/// error 2)").
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A question id as text: strings as they are, numbers in their JSON form, so that `1` and
/// `"1"` name the same question (GQA ids are strings, POPE ids integers, SEED's either).
pub fn id_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where a question's image comes from.
#[derive(Clone, Debug)]
pub enum ImageRef {
    /// A file under `--image-folder`.
    File(PathBuf),
    /// MMBench: base64 in the TSV.
    Base64(String),
}

/// MMBench's per-question extras, echoed in the answer.
#[derive(Clone, Debug)]
pub struct McqExtra {
    /// The option texts, in order (up to the first empty one).
    pub options: Vec<String>,
    /// Their letters.
    pub option_char: Vec<String>,
}

/// One question, in file order.
#[derive(Clone, Debug)]
pub struct Question {
    /// `question_id` as in the file (MMBench: the row's `index`).
    pub id: Value,
    /// The question's `text` verbatim (written to the answer's `prompt`; MMBench: hint,
    /// question and options as LLaVA builds them).
    pub text: String,
    /// The user turn after `<image>\n` (the text, plus MMBench's single-prediction line).
    pub model_text: String,
    /// Its image.
    pub image: ImageRef,
    /// `category` when the file has one.
    pub category: Option<String>,
    /// MMBench's options.
    pub mcq: Option<McqExtra>,
}

impl Question {
    /// The key answers are matched by: the id and the prompt text. TextVQA's LLaVA file
    /// uses the image id as `question_id` and MME the image path, so ids alone repeat.
    pub fn key(&self) -> String {
        answer_key(&self.id, &self.text)
    }
}

/// The key of an answer with this `question_id` and `prompt` (see [`Question::key`]).
pub fn answer_key(id: &Value, prompt: &str) -> String {
    format!("{}\u{1f}{prompt}", id_string(id))
}

/// A question file's format, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuestionFormat {
    /// LLaVA's jsonl.
    Jsonl,
    /// The MMBench TSV.
    MmbenchTsv,
}

/// Picks the format from the file name (`.jsonl`, `.tsv`).
pub fn question_format(path: &Path) -> Result<QuestionFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("jsonl") => Ok(QuestionFormat::Jsonl),
        Some("tsv") => Ok(QuestionFormat::MmbenchTsv),
        _ => bail!(
            "--questions {}: expected a LLaVA question file (.jsonl) or the MMBench TSV (.tsv)",
            path.display()
        ),
    }
}

/// Reads a question file. With `image_folder`, every jsonl image must exist under it;
/// without, jsonl images are left unchecked (merging and scoring need no pixels).
pub fn load_questions(path: &Path, image_folder: Option<&Path>) -> Result<Vec<Question>> {
    let qs = match question_format(path)? {
        QuestionFormat::Jsonl => {
            if let Some(folder) = image_folder {
                if !folder.is_dir() {
                    bail!("--image-folder {}: not a directory", folder.display());
                }
            }
            load_jsonl_questions(path, image_folder)?
        }
        QuestionFormat::MmbenchTsv => load_mmbench(path)?,
    };
    if qs.is_empty() {
        bail!("--questions {}: no questions", path.display());
    }
    let mut seen = HashSet::new();
    for q in &qs {
        if !seen.insert(q.key()) {
            bail!(
                "--questions {}: question {} with the same text appears twice",
                path.display(),
                q.id
            );
        }
    }
    Ok(qs)
}

fn load_jsonl_questions(path: &Path, folder: Option<&Path>) -> Result<Vec<Question>> {
    let text = read_text(path, "--questions")?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("--questions {} line {}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: not JSON: {e}", at()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("{}: not a JSON object", at()))?;
        let id = match obj.get("question_id") {
            Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
            Some(_) => bail!("{}: `question_id` is not a string or number", at()),
            None => bail!("{}: no `question_id`", at()),
        };
        let text = str_field(obj, "text").ok_or_else(|| anyhow!("{}: no `text` string", at()))?;
        let image = str_field(obj, "image").ok_or_else(|| {
            anyhow!(
                "{}: no `image` string (text-only questions are not supported)",
                at()
            )
        })?;
        let rel = Path::new(&image);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            bail!(
                "{}: image {image:?} must be a path inside --image-folder",
                at()
            );
        }
        let file = match folder {
            Some(folder) => {
                let file = folder.join(rel);
                match std::fs::metadata(&file) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => bail!("{}: image {} is not a regular file", at(), file.display()),
                    Err(e) => bail!("{}: image {}: {}", at(), file.display(), io_reason(&e)),
                }
                file
            }
            None => rel.to_path_buf(),
        };
        out.push(Question {
            id,
            model_text: text.clone(),
            text,
            image: ImageRef::File(file),
            category: str_field(obj, "category"),
            mcq: None,
        });
    }
    Ok(out)
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_string)
}

/// One row of the MMBench TSV, by column name.
pub struct TsvTable {
    /// Column names.
    pub header: Vec<String>,
    /// Rows (each as long as the header).
    pub rows: Vec<Vec<String>>,
}

impl TsvTable {
    /// The column index of `name`.
    pub fn col(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
}

/// Reads a TSV as pandas' `read_table` does (tab separated, `"` quoting, first line the
/// header); `what` names the flag in errors.
pub fn read_tsv(path: &Path, what: &str) -> Result<TsvTable> {
    let bytes = read_bounded(path, what, MAX_INPUT_BYTES)?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .has_headers(true)
        .from_reader(bytes.as_slice());
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| anyhow!("{what} {}: {e}", path.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| anyhow!("{what} {}: row {}: {e}", path.display(), i + 1))?;
        rows.push(rec.iter().map(str::to_string).collect());
    }
    Ok(TsvTable { header, rows })
}

/// LLaVA's `is_none` on a pandas cell: empty (NaN), `nan` or `none` in any case.
pub fn is_none(cell: &str) -> bool {
    let l = cell.trim().to_ascii_lowercase();
    cell.is_empty() || l == "nan" || l == "none"
}

/// The options of an MMBench row: A–D up to the first empty one (LLaVA's `get_options`).
pub fn mmbench_options(t: &TsvTable, row: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for l in MMBENCH_LETTERS {
        match t.col(l).map(|c| row[c].as_str()) {
            Some(v) if !is_none(v) => out.push(v.to_string()),
            _ => break,
        }
    }
    out
}

fn load_mmbench(path: &Path) -> Result<Vec<Question>> {
    let t = read_tsv(path, "--questions")?;
    let need = |name: &str| {
        t.col(name).ok_or_else(|| {
            anyhow!(
                "--questions {}: no `{name}` column (expected MMBench's index, question, hint, A-D, image)",
                path.display()
            )
        })
    };
    let (ci, cq, cimg) = (need("index")?, need("question")?, need("image")?);
    let chint = t.col("hint");
    let mut out = Vec::new();
    for (r, row) in t.rows.iter().enumerate() {
        let at = || format!("--questions {} row {}", path.display(), r + 1);
        let index: i64 = row[ci]
            .trim()
            .parse()
            .map_err(|_| anyhow!("{}: index {:?} is not an integer", at(), row[ci]))?;
        let options = mmbench_options(&t, row);
        if options.is_empty() {
            bail!("{}: no options (column A is empty)", at());
        }
        let mut question = row[cq].clone();
        if let Some(h) = chint.map(|c| row[c].as_str()) {
            if !is_none(h) {
                question = format!("{h}\n{question}");
            }
        }
        let letters: Vec<String> = MMBENCH_LETTERS[..options.len()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (l, o) in letters.iter().zip(&options) {
            question = format!("{question}\n{l}. {o}");
        }
        let b64 = row[cimg].trim().to_string();
        if b64.is_empty() {
            bail!("{}: empty image", at());
        }
        out.push(Question {
            id: Value::from(index),
            model_text: format!("{question}\n{MMBENCH_SINGLE_PRED}"),
            text: question,
            image: ImageRef::Base64(b64),
            category: t.col("category").map(|c| row[c].clone()),
            mcq: Some(McqExtra {
                options,
                option_char: letters,
            }),
        });
    }
    Ok(out)
}

/// LLaVA's `get_chunk(lst, n, k)`: chunks of `ceil(len / n)`; a `k` past the last chunk
/// (possible when `len < n`) gets an empty range, where LLaVA raises.
pub fn chunk_range(len: usize, n: usize, k: usize) -> std::ops::Range<usize> {
    let size = len.div_ceil(n.max(1)).max(1);
    let start = (k * size).min(len);
    start..(start + size).min(len)
}

/// One answer line as read back.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The line as written (merging copies it byte for byte).
    pub line: String,
    /// The whole object.
    pub raw: Value,
    /// `question_id`.
    pub id: Value,
    /// `prompt` (empty when absent).
    pub prompt: String,
    /// `text`.
    pub text: String,
}

impl Answer {
    /// See [`answer_key`].
    pub fn key(&self) -> String {
        answer_key(&self.id, &self.prompt)
    }
}

/// Parses one answer line.
pub fn parse_answer(line: &str) -> std::result::Result<Answer, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let id = obj
        .get("question_id")
        .filter(|v| v.is_string() || v.is_number())
        .cloned()
        .ok_or("no `question_id`")?;
    let text = obj
        .get("text")
        .and_then(Value::as_str)
        .ok_or("no `text` string")?
        .to_string();
    let prompt = obj
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(Answer {
        line: line.trim_end_matches('\r').to_string(),
        raw: v,
        id,
        prompt,
        text,
    })
}

/// Reads a complete answers file (every line must parse).
pub fn read_answers(path: &Path, what: &str) -> Result<Vec<Answer>> {
    let text = read_text(path, what)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let a = parse_answer(line).map_err(|e| {
            anyhow!(
                "{what} {} line {}: {e}{}",
                path.display(),
                i + 1,
                if i + 1 == text.lines().count() && !text.ends_with('\n') {
                    " (cut off by an interrupted eval? re-running eval repairs it)"
                } else {
                    ""
                }
            )
        })?;
        out.push(a);
    }
    Ok(out)
}

/// What an existing answers file holds, read for resuming.
pub struct Existing {
    /// The answers, in file order.
    pub answers: Vec<Answer>,
    /// The bytes to keep: every complete line (a cut-off last line is dropped, a last line
    /// that parses but lacks its newline gets one).
    pub repaired: Option<String>,
}

/// Reads an answers file for `eval` to resume: every line but the last must parse; a last
/// line that does not parse and has no newline is what a kill leaves behind, and is dropped.
pub fn read_for_resume(path: &Path) -> Result<Existing> {
    let text = read_text(path, "--answers")?;
    let mut answers = Vec::new();
    let mut keep = String::with_capacity(text.len());
    let mut repaired = false;
    let mut rest = text.as_str();
    let mut lineno = 0;
    while !rest.is_empty() {
        lineno += 1;
        let (line, complete, next) = match rest.find('\n') {
            Some(p) => (&rest[..p], true, &rest[p + 1..]),
            None => (rest, false, ""),
        };
        rest = next;
        if line.trim().is_empty() {
            repaired |= !complete || line.is_empty();
            continue;
        }
        match parse_answer(line) {
            Ok(a) => {
                keep.push_str(line);
                keep.push('\n');
                repaired |= !complete;
                answers.push(a);
            }
            Err(_) if !complete => {
                crate::errors::note(format!(
                    "--answers {}: dropped a cut-off last line ({} bytes) left by an interrupted run",
                    path.display(),
                    line.len()
                ));
                repaired = true;
            }
            Err(e) => bail!(
                "--answers {} line {lineno}: {e} (not an answers file? pass --force to start it over)",
                path.display()
            ),
        }
    }
    Ok(Existing {
        answers,
        repaired: repaired.then_some(keep),
    })
}

/// Positions of the questions by key, for ordering answers as the question file does.
pub fn question_order(qs: &[Question]) -> HashMap<String, usize> {
    qs.iter().enumerate().map(|(i, q)| (q.key(), i)).collect()
}

/// One answer line in LLaVA's field order (`question_id`, [`round_id`], `prompt`, `text`,
/// [`options`, `option_char`], `answer_id`, `model_id`, `metadata`), without the newline.
pub fn answer_line(fields: &[(&str, Value)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&Value::from(*k).to_string());
        s.push_str(": ");
        s.push_str(&v.to_string());
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_as_llava_get_chunk() {
        // split_list: chunk_size = ceil(len / n); [lst[i:i+cs] for i in range(0, len, cs)].
        assert_eq!(chunk_range(10, 3, 0), 0..4);
        assert_eq!(chunk_range(10, 3, 1), 4..8);
        assert_eq!(chunk_range(10, 3, 2), 8..10);
        // len 5, n 4: cs 2 -> [0:2], [2:4], [4:5] and no fourth chunk (LLaVA: IndexError).
        assert_eq!(chunk_range(5, 4, 2), 4..5);
        assert_eq!(chunk_range(5, 4, 3), 5..5);
        assert_eq!(chunk_range(7, 1, 0), 0..7);
    }

    #[test]
    fn resume_drops_only_a_cut_off_last_line() {
        let dir = std::env::temp_dir().join(format!("visi-answers-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.jsonl");
        let good = r#"{"question_id": 1, "prompt": "q", "text": "yes"}"#;
        std::fs::write(&p, format!("{good}\n{good}\n{{\"question_id\": 3, \"pro")).unwrap();
        let e = read_for_resume(&p).unwrap();
        assert_eq!(e.answers.len(), 2);
        assert_eq!(
            e.repaired.as_deref(),
            Some(format!("{good}\n{good}\n").as_str())
        );
        // A complete last line without its newline is kept (and gets one).
        std::fs::write(&p, format!("{good}\n{good}")).unwrap();
        let e = read_for_resume(&p).unwrap();
        assert_eq!(e.answers.len(), 2);
        assert!(e.repaired.is_some());
        // A broken line before the end is not ours to drop.
        std::fs::write(&p, format!("nonsense\n{good}\n")).unwrap();
        assert!(read_for_resume(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn answer_lines_keep_llava_field_order() {
        let l = answer_line(&[
            ("question_id", Value::from(3)),
            ("text", Value::from("a\"b")),
        ]);
        assert_eq!(l, r#"{"question_id": 3, "text": "a\"b"}"#);
    }
}

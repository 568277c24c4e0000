//! Issue 27's hardening (items 4-8, VISI_ADAPTER, notes before errors), each seen to fail
//! before its fix: stdout that cannot be written, leftovers after SIGTERM/SIGHUP and from
//! sweep's outputs, exit classes, cheap checks before expensive work, eval's resume key.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use visi_tests::{expect_error, fixtures, Scratch};

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_visi-cli"));
    c.args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI");
    c
}

fn visi(args: &[&str]) -> Result<Output> {
    cmd(args).output().context("running visi-cli")
}

/// Where the child's stdout goes.
enum Out {
    /// A pipe read to the end.
    Pipe,
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe whose reader is gone (`| head -c0`): writes fail with EPIPE.
    Closed,
}

/// Runs visi-cli with `stdin` written to it (bytes: not necessarily UTF-8) and stdout to
/// `out`.
fn visi_io(args: &[&str], stdin: &[u8], out: Out) -> Result<Output> {
    let stdout = match out {
        Out::Full => Stdio::from(std::fs::OpenOptions::new().write(true).open("/dev/full")?),
        Out::Pipe => Stdio::piped(),
        // The read end is closed before the child starts: its first write fails, however
        // soon it comes.
        Out::Closed => {
            let (reader, writer) = std::io::pipe()?;
            drop(reader);
            Stdio::from(writer)
        }
    };
    let mut child = cmd(args)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut i = child.stdin.take().context("stdin")?;
    // The child may stop reading early (that is the point of some tests).
    let _ = i.write_all(stdin);
    drop(i);
    Ok(child.wait_with_output()?)
}

fn visi_stdin(args: &[&str], stdin: &[u8]) -> Result<Output> {
    visi_io(args, stdin, Out::Pipe)
}

fn visi_dev_full(args: &[&str], stdin: &[u8]) -> Result<Output> {
    visi_io(args, stdin, Out::Full)
}

fn visi_closed_pipe(args: &[&str], stdin: &[u8]) -> Result<Output> {
    visi_io(args, stdin, Out::Closed)
}

fn model() -> String {
    fixtures()
        .join("tiny-llava-gqa")
        .to_string_lossy()
        .to_string()
}

fn square() -> String {
    fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string()
}

/// A copy of tiny-llava-gqa (symlinked files copied as files).
fn model_copy(tag: &str) -> Result<Scratch> {
    let src = fixtures().join("tiny-llava-gqa");
    let dst = Scratch::new(tag)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.path().join(e.file_name()))?;
    }
    Ok(dst)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A quiet end: exit 141 (128 + SIGPIPE) and no error line, no panic.
fn expect_quiet_pipe_end(out: &Output, what: &str) -> Result<()> {
    let e = stderr(out);
    ensure!(
        out.status.code() == Some(141),
        "{what}: exit {:?} (want 141): {e}",
        out.status.code()
    );
    ensure!(!e.contains("error:") && !e.contains("panic"), "{what}: {e}");
    Ok(())
}

// ------------------------------------------------------------------ notes before errors

#[test]
fn no_note_before_an_input_error() -> Result<()> {
    // A shard cut short is found while the weights load, after the backend is chosen:
    // `--device auto` on a machine without a hardware GPU would say so first.
    let m = model_copy("notes")?;
    let shard = m.path().join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&shard)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)?
        .set_len(len / 2)?;
    let img = square();
    let out = visi(&["run", "--model", &m.s(), "--image", &img, "--prompt", "Hi?"])?;
    expect_error(&out, 2, &["model-00002-of-00003.safetensors"])?;
    ensure!(
        stderr(&out).lines().count() == 1,
        "run: a note before the error: {}",
        stderr(&out)
    );
    let out = visi_stdin(&["chat", "--model", &m.s()], b"Hi\n")?;
    expect_error(&out, 2, &["model-00002-of-00003.safetensors"])?;
    ensure!(
        stderr(&out).lines().count() == 1,
        "chat: a note before the error: {}",
        stderr(&out)
    );
    Ok(())
}

// ------------------------------------------------------------------ 4. stdout errors

#[test]
fn chat_stdout_full_or_closed() -> Result<()> {
    let m = model();
    let img = square();
    let args = [
        "chat",
        "--model",
        &m,
        "--image",
        &img,
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
    ];
    let script = b"What is it?\nAnd now?\nOnce more?\n";
    // A full disk loses the answers: one error line, exit 1 (it exited 0).
    let out = visi_dev_full(&args, script)?;
    expect_error(&out, 1, &["stdout"])?;
    // A closed pipe ends the chat at once and quietly (it went on through every turn).
    let out = visi_closed_pipe(&args, script)?;
    expect_quiet_pipe_end(&out, "chat | head -c0")?;
    Ok(())
}

#[test]
fn score_stdout_full_or_closed() -> Result<()> {
    let s = Scratch::new("score-out")?;
    let ans = s.write(
        "a.jsonl",
        &json!({"question_id": "q1", "prompt": "Is it red?", "text": "Yes", "answer_id": "x", "model_id": "m", "metadata": {}}).to_string(),
    )?;
    let ann = s.write(
        "ann.json",
        &json!({"q1": {"answer": "yes", "isBalanced": true, "types": {"structural": "verify"}}})
            .to_string(),
    )?;
    let args = [
        "score",
        "--task",
        "gqa",
        "--answers",
        &ans,
        "--annotations",
        &ann,
    ];
    let ok = visi(&args)?;
    ensure!(ok.status.success(), "score: {}", stderr(&ok));
    for extra in [&[][..], &["--json"][..]] {
        let mut a = args.to_vec();
        a.extend_from_slice(extra);
        // print! panicked here (exit 1 with an internal panic line).
        expect_error(&visi_dev_full(&a, b"")?, 1, &["stdout"])
            .with_context(|| format!("{a:?} > /dev/full"))?;
        expect_quiet_pipe_end(&visi_closed_pipe(&a, b"")?, "score | head -c0")?;
    }
    expect_quiet_pipe_end(&visi_closed_pipe(&["--help"], b"")?, "--help | head -c0")?;
    Ok(())
}

#[test]
fn bench_conversation_stdout_full_or_closed() -> Result<()> {
    let args = [
        "bench",
        "--shape",
        "tiny",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--decode-tokens",
        "2",
        "--skip-kernels",
        "--conversation",
    ];
    // bench reports progress on stderr (`bench: ...` lines); its table went out by
    // println!, which panicked on a full or closed stdout.
    let out = visi_dev_full(&args, b"")?;
    let e = stderr(&out);
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}: {e}",
        out.status.code()
    );
    ensure!(!e.contains("panic"), "{e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    ensure!(errors.len() == 1 && errors[0].contains("stdout"), "{e}");
    expect_quiet_pipe_end(&visi_closed_pipe(&args, b"")?, "bench | head -c0")?;
    Ok(())
}

// ------------------------------------------------------------------ 5. leftovers

// SIGTERM/SIGHUP during quantize's write: bad_inputs.rs `quantize_refuses_devices_and_cleans_up`
// (with Ctrl-C).

fn sweep_setup(s: &Scratch) -> Result<(String, String)> {
    let qs = s.write(
        "q.jsonl",
        &json!({"question_id": "q1", "image": "square.png", "text": "What is it?", "category": "default"}).to_string(),
    )?;
    let ann = s.write(
        "gqa.json",
        &json!({"q1": {"answer": "dog", "isBalanced": true, "types": {"structural": "query"}}})
            .to_string(),
    )?;
    Ok((qs, ann))
}

fn sweep_args<'a>(
    qs: &'a str,
    ann: &'a str,
    out: &'a str,
    im: &'a str,
    m: &'a str,
) -> Vec<&'a str> {
    vec![
        "sweep",
        "--model",
        m,
        "--questions",
        qs,
        "--image-folder",
        im,
        "--task",
        "gqa",
        "--annotations",
        ann,
        "--configs",
        r#"["dense"]"#,
        "--out",
        out,
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ]
}

#[test]
fn sweep_outputs_are_checked_first_and_written_as_a_group() -> Result<()> {
    let s = Scratch::new("sweep-group")?;
    let (qs, ann) = sweep_setup(&s)?;
    let m = model();
    let im = fixtures().join("images").to_string_lossy().to_string();
    let out = s.p("out");
    std::fs::create_dir_all(s.path().join("out/sweep.png"))?;
    // sweep.png cannot be written (a directory): refused before the run, and neither the
    // table nor the JSON is left (they were, after a whole run that then exited 1).
    let mut a = sweep_args(&qs, &ann, &out, &im, &m);
    a.push("--force");
    expect_error(&visi(&a)?, 2, &["sweep.png"])?;
    for f in ["sweep.tsv", "sweep.json", "dense.jsonl"] {
        ensure!(
            !s.path().join("out").join(f).exists(),
            "{f} written although sweep.png cannot be"
        );
    }
    // An --out nothing can be created in fails before the work (it exited 1 after it).
    let a = sweep_args(&qs, &ann, "/proc/visi-sweep", &im, &m);
    expect_error(&visi(&a)?, 2, &["/proc/visi-sweep"])?;
    Ok(())
}

// ------------------------------------------------------------------ 6. exit classes

/// A PNG of `w`x`h` grey pixels (small on disk whatever its size).
fn png(s: &Scratch, name: &str, w: u32, h: u32) -> Result<String> {
    let p = s.path().join(name);
    image::RgbImage::from_pixel(w, h, image::Rgb([90, 120, 150])).save(&p)?;
    Ok(p.to_string_lossy().to_string())
}

#[test]
fn pad_mode_canvas_too_large_is_bad_input() -> Result<()> {
    let s = Scratch::new("pad-big")?;
    // expand2square of a 13,400-px long side makes a 539 MB canvas, over the decode limit.
    let big = png(&s, "wide.png", 13_400, 2)?;
    let m = model();
    let out = visi(&[
        "run",
        "--model",
        &m,
        "--image",
        &big,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--image-mode",
        "pad",
        "--max-new-tokens",
        "2",
    ])?;
    expect_error(&out, 2, &["pad", "--image-mode crop"])?;
    // ... before the weights load: a broken shard is not reached.
    let broken = model_copy("pad-big-model")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(broken.path().join("model-00002-of-00003.safetensors"))?
        .set_len(100)?;
    let out = visi(&[
        "run",
        "--model",
        &broken.s(),
        "--image",
        &big,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--image-mode",
        "pad",
    ])?;
    expect_error(&out, 2, &["pad", "--image-mode crop"])?;
    // In chat it is that image's error; the chat goes on (it ended the chat, exit 1).
    let script = format!("/image {big}\nWhat is it?\n");
    let out = visi_stdin(
        &[
            "chat",
            "--model",
            &m,
            "--device",
            "cpu",
            "--image-mode",
            "pad",
            "--max-new-tokens",
            "2",
        ],
        script.as_bytes(),
    )?;
    let e = stderr(&out);
    ensure!(
        out.status.success(),
        "chat: exit {:?}: {e}",
        out.status.code()
    );
    ensure!(e.contains("error: /image") && e.contains("pad"), "{e}");
    ensure!(
        String::from_utf8_lossy(&out.stdout).lines().count() == 1,
        "the question after the refused image is answered: {e}"
    );
    // As --image, it fails before the first turn with exit 2.
    let out = visi_stdin(
        &[
            "chat",
            "--model",
            &m,
            "--device",
            "cpu",
            "--image-mode",
            "pad",
            "--image",
            &big,
        ],
        b"Hi\n",
    )?;
    expect_error(&out, 2, &["--image", "pad"])?;
    Ok(())
}

#[test]
fn chat_stdin_not_utf8_is_a_turn_error() -> Result<()> {
    let m = model();
    let out = visi_stdin(
        &[
            "chat",
            "--model",
            &m,
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ],
        b"\xff\xfe bad\nHello?\n",
    )?;
    let e = stderr(&out);
    ensure!(out.status.success(), "exit {:?}: {e}", out.status.code());
    ensure!(e.contains("line 1") && e.contains("UTF-8"), "{e}");
    ensure!(
        !e.contains("internal") && !e.contains("reading stdin"),
        "{e}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).lines().count() == 1,
        "the next line is answered: {e}"
    );
    Ok(())
}

#[test]
fn eval_outputs_checked_before_the_work() -> Result<()> {
    let s = Scratch::new("eval-out")?;
    let (qs, _) = sweep_setup(&s)?;
    let m = model();
    let im = fixtures().join("images").to_string_lossy().to_string();
    let out = visi(&[
        "eval",
        "--model",
        &m,
        "--questions",
        &qs,
        "--image-folder",
        &im,
        "--answers",
        "/proc/visi-answers.jsonl",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ])?;
    expect_error(&out, 2, &["--answers", "/proc/visi-answers.jsonl"])?;
    // eval-merge: a missing directory, a directory as --out (even with --force), /proc.
    let chunk = s.write(
        "c0.jsonl",
        &json!({"question_id": "q1", "prompt": "What is it?", "text": "A dog", "answer_id": "x", "model_id": "m", "metadata": {}}).to_string(),
    )?;
    let missing = s.p("no/such/dir/m.jsonl");
    let dir = s.p("adir");
    std::fs::create_dir_all(&dir)?;
    for (o, needle) in [
        (missing.as_str(), "does not exist"),
        (dir.as_str(), "not a regular file"),
        ("/proc/visi-merged.jsonl", "cannot write"),
    ] {
        let out = visi(&[
            "eval-merge",
            "--questions",
            &qs,
            "--out",
            o,
            "--force",
            &chunk,
        ])?;
        expect_error(&out, 2, &["--out", needle]).with_context(|| format!("--out {o}"))?;
    }
    Ok(())
}

// ------------------------------------------------------------------ 7. cheap before expensive

#[test]
fn save_kept_checked_before_images_decode() -> Result<()> {
    let s = Scratch::new("kept-first")?;
    let broken = s.write("broken.png", "not a png at all")?;
    let kept = s.write("kept.png", "already here")?;
    let m = model();
    let out = visi(&[
        "run",
        "--model",
        &m,
        "--image",
        &broken,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--save-kept",
        &kept,
    ])?;
    // The output is refused first (the image was decoded, and refused, before).
    expect_error(&out, 2, &["--save-kept", "--force"])?;
    Ok(())
}

#[test]
fn long_turns_refused_by_length_before_tokenising() -> Result<()> {
    let m = model();
    let long = "word ".repeat(400_000); // 2 MB: far past a 2,048-token context
    let msgs = json!([{"role": "user", "content": long}]).to_string();
    let out = visi_stdin(
        &["run", "--messages", "-", "--model", &m, "--device", "cpu"],
        msgs.as_bytes(),
    )?;
    expect_error(&out, 2, &["bytes of text", "2048"])?;
    // ... before the weights load: a broken shard is not even reached.
    let broken = model_copy("long-turn")?;
    let shard = broken.path().join("model-00002-of-00003.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)?
        .set_len(100)?;
    let out = visi_stdin(
        &[
            "run",
            "--messages",
            "-",
            "--model",
            &broken.s(),
            "--device",
            "cpu",
        ],
        msgs.as_bytes(),
    )?;
    expect_error(&out, 2, &["bytes of text"])?;
    // A GGUF text model (no --mmproj) is bounded the same way.
    let gguf = fixtures()
        .join("gguf/tiny-llava-mha/tiny-llava-mha.f16.gguf")
        .to_string_lossy()
        .to_string();
    let out = visi_stdin(
        &[
            "run",
            "--messages",
            "-",
            "--model",
            &gguf,
            "--device",
            "cpu",
        ],
        msgs.as_bytes(),
    )?;
    expect_error(&out, 2, &["bytes of text"])?;
    let mut script = long.into_bytes();
    script.extend_from_slice(b"\nHi\n");
    let out = visi_stdin(
        &[
            "chat",
            "--model",
            &m,
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ],
        &script,
    )?;
    let e = stderr(&out);
    ensure!(
        out.status.success(),
        "chat: exit {:?}: {e}",
        out.status.code()
    );
    ensure!(e.contains("bytes of text"), "{e}");
    ensure!(
        String::from_utf8_lossy(&out.stdout).lines().count() == 1,
        "the short turn is answered: {e}"
    );
    Ok(())
}

#[test]
fn oversized_tokenizer_and_header_refused_before_parsing() -> Result<()> {
    // A tokenizer.json far larger than a 32,002-token vocabulary needs (valid JSON: the
    // padding is whitespace, so it used to parse, slowly, and load).
    let m = model_copy("big-tok")?;
    let tok = m.path().join("tokenizer.json");
    let mut text = std::fs::read(&tok)?;
    text.resize(text.len() + (20 << 20), b' ');
    std::fs::write(&tok, text)?;
    let img = square();
    let out = visi(&[
        "run",
        "--model",
        &m.s(),
        "--image",
        &img,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ])?;
    expect_error(&out, 2, &["tokenizer.json", "vocab"])?;

    // A safetensors header of 17 MiB (padded with spaces, as the format allows).
    let m = model_copy("big-header")?;
    let shard = m.path().join("model-00002-of-00003.safetensors");
    let buf = std::fs::read(&shard)?;
    let n = u64::from_le_bytes(buf[..8].try_into()?) as usize;
    let mut header = buf[8..8 + n].to_vec();
    header.resize(17 << 20, b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&buf[8 + n..]);
    std::fs::write(&shard, file)?;
    let out = visi(&["info", "--model", &m.s(), "--device", "cpu"])?;
    expect_error(
        &out,
        2,
        &["model-00002-of-00003.safetensors", "header length"],
    )?;
    Ok(())
}

// ------------------------------------------------------------------ 8. eval resume key

#[test]
fn eval_resume_refuses_another_quant() -> Result<()> {
    let s = Scratch::new("eval-quant")?;
    let (qs, _) = sweep_setup(&s)?;
    let m = model();
    let im = fixtures().join("images").to_string_lossy().to_string();
    let ans = s.p("a.jsonl");
    let args = [
        "eval",
        "--model",
        &m,
        "--questions",
        &qs,
        "--image-folder",
        &im,
        "--answers",
        &ans,
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ];
    let first = visi(&args)?;
    ensure!(first.status.success(), "{}", stderr(&first));
    // Another question file line to answer, so the resume has work to do.
    let mut q = std::fs::read_to_string(&qs)?;
    q.push('\n');
    q.push_str(&json!({"question_id": "q2", "image": "square.png", "text": "And this?", "category": "default"}).to_string());
    std::fs::write(&qs, q)?;
    // A cut-off last line (a killed run) is dropped with a note when resuming; here the
    // resume is refused, and the refusal is the one line said (the note came first).
    let mut text = std::fs::read_to_string(&ans)?;
    text.push_str(r#"{"question_id": "q2", "prompt": "And th"#);
    std::fs::write(&ans, &text)?;
    let mut a = args.to_vec();
    a.extend(["--quant", "q8_0"]);
    let out = visi(&a)?;
    expect_error(&out, 2, &["other settings", "q8_0"])?;
    ensure!(
        stderr(&out).lines().count() == 1,
        "a note before the error: {}",
        stderr(&out)
    );
    ensure!(
        std::fs::read_to_string(&ans)? == text,
        "the answers file changed: the resume mixed settings"
    );
    Ok(())
}

// ------------------------------------------------------------------ 9. VISI_ADAPTER

#[cfg(unix)]
#[test]
fn visi_adapter_not_utf8_is_an_error() -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"lava\xffpipe");
    let m = model();
    let img = square();
    for args in [
        vec!["devices"],
        vec![
            "run",
            "--model",
            &m,
            "--image",
            &img,
            "--prompt",
            "Hi?",
            "--max-new-tokens",
            "2",
        ],
        vec!["info", "--model", &m],
    ] {
        let out = cmd(&args).env("VISI_ADAPTER", bad).output()?;
        expect_error(&out, 2, &["VISI_ADAPTER", "UTF-8"]).with_context(|| format!("{args:?}"))?;
    }
    // --device cpu does not choose an adapter: the variable does not matter there.
    let out = cmd(&[
        "run",
        "--model",
        &m,
        "--image",
        &img,
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ])
    .env("VISI_ADAPTER", bad)
    .output()?;
    ensure!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

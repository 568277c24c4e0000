//! The built `visi-cli` on broken input: every case exits with status 2 and exactly one
//! `error: ...` line on stderr that names the file, key or tensor at fault, prints nothing
//! on stdout, and shows no panic or backtrace (`RUST_BACKTRACE=1` is set to prove it).
//! Broken model directories are copies of `tests/fixtures/tiny-llava-gqa` in a temp dir
//! with one file corrupted; the committed fixtures are never modified.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use visi_tests::{expect_error, fixtures, Scratch};

fn visi_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_visi-cli"));
    c.args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().context("running visi-cli")
}

fn visi(args: &[&str]) -> Result<Output> {
    visi_env(args, &[])
}

/// A copy of tiny-llava-gqa (symlinked tokenizer files copied as files).
fn model_copy(tag: &str) -> Result<Scratch> {
    model_copy_of("tiny-llava-gqa", tag)
}

/// A copy of fixture `name` (symlinked files copied as files).
fn model_copy_of(name: &str, tag: &str) -> Result<Scratch> {
    let src = fixtures().join(name);
    let dst = Scratch::new(tag)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.path().join(e.file_name()))
            .with_context(|| format!("copying {}", e.path().display()))?;
    }
    Ok(dst)
}

const SHARD: &str = "model-00002-of-00003.safetensors";

/// Splits a safetensors file into (header JSON, data section).
fn read_st(path: &Path) -> Result<(serde_json::Map<String, Value>, Vec<u8>)> {
    let buf = std::fs::read(path)?;
    let n = u64::from_le_bytes(buf[..8].try_into()?) as usize;
    let header: Value = serde_json::from_slice(&buf[8..8 + n])?;
    let Value::Object(m) = header else {
        bail!("header of {} is not an object", path.display())
    };
    Ok((m, buf[8 + n..].to_vec()))
}

fn write_st(path: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) -> Result<()> {
    let h = serde_json::to_vec(header)?;
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out)?;
    Ok(())
}

/// The shard's tensors with 2-D shapes and distinct dims, sorted by name (deterministic).
fn matrices(header: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut v: Vec<String> = header
        .iter()
        .filter(|(_, e)| {
            let s = e["shape"].as_array().map(|a| a.len()).unwrap_or(0);
            s == 2 && e["shape"][0] != e["shape"][1]
        })
        .map(|(k, _)| k.clone())
        .collect();
    v.sort();
    v
}

fn run_args(model: &str) -> Vec<String> {
    let img = fixtures().join("images/square.png");
    [
        "run",
        "--model",
        model,
        "--image",
        &img.to_string_lossy(),
        "--prompt",
        "Hi?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_model(model: &Scratch) -> Result<Output> {
    let a = run_args(&model.s());
    visi(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Applies `corrupt` to a fresh copy and checks `run` (and `info`, which reads the same
/// files) fail with the contract and name `needles`.
fn broken_model(
    tag: &str,
    corrupt: impl FnOnce(&Path) -> Result<Vec<String>>,
    info_too: bool,
) -> Result<()> {
    let m = model_copy(tag)?;
    let needles = corrupt(m.path()).with_context(|| format!("{tag}: corrupting"))?;
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    expect_error(&run_model(&m)?, 2, &needles).with_context(|| format!("{tag}: run"))?;
    if info_too {
        let out = visi(&["info", "--model", &m.s(), "--device", "cpu"])?;
        expect_error(&out, 2, &needles).with_context(|| format!("{tag}: info"))?;
    }
    Ok(())
}

#[test]
fn broken_config_tokenizer_preprocessor() -> Result<()> {
    broken_model(
        "nocfg",
        |d| {
            std::fs::remove_file(d.join("config.json"))?;
            Ok(vec!["config.json".into()])
        },
        true,
    )?;
    broken_model(
        "badcfg",
        |d| {
            std::fs::write(d.join("config.json"), "{\"text_config\": ")?;
            Ok(vec!["config.json".into(), "JSON".into()])
        },
        true,
    )?;
    broken_model(
        "cfgkey",
        |d| {
            let p = d.join("config.json");
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
            v["text_config"]["num_hidden_layers"] = Value::from("eight");
            std::fs::write(&p, serde_json::to_string(&v)?)?;
            Ok(vec!["config.json".into(), "num_hidden_layers".into()])
        },
        true,
    )?;
    broken_model(
        "notok",
        |d| {
            std::fs::remove_file(d.join("tokenizer.json"))?;
            Ok(vec!["tokenizer.json".into()])
        },
        false,
    )?;
    broken_model(
        "badtok",
        |d| {
            std::fs::write(d.join("tokenizer.json"), "{\"model\": [1, 2")?;
            Ok(vec!["tokenizer.json".into()])
        },
        false,
    )?;
    broken_model(
        "badpp",
        |d| {
            std::fs::write(d.join("preprocessor_config.json"), "not json")?;
            Ok(vec!["preprocessor_config.json".into()])
        },
        false,
    )?;
    broken_model(
        "ppkey",
        |d| {
            let p = d.join("preprocessor_config.json");
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
            v["image_mean"] = Value::from("grey");
            std::fs::write(&p, serde_json::to_string(&v)?)?;
            Ok(vec!["preprocessor_config.json".into(), "image_mean".into()])
        },
        false,
    )?;
    Ok(())
}

#[test]
fn broken_safetensors() -> Result<()> {
    broken_model(
        "trunc",
        |d| {
            let p = d.join(SHARD);
            let buf = std::fs::read(&p)?;
            std::fs::write(&p, &buf[..buf.len() / 2])?;
            Ok(vec![SHARD.into(), "out of range".into()])
        },
        true,
    )?;
    broken_model(
        "tiny",
        |d| {
            std::fs::write(d.join(SHARD), [1u8, 2, 3])?;
            Ok(vec![SHARD.into(), "too short".into()])
        },
        true,
    )?;
    broken_model(
        "hdrlen",
        |d| {
            let p = d.join(SHARD);
            let mut buf = std::fs::read(&p)?;
            let past = buf.len() as u64; // header "longer" than the whole file
            buf[..8].copy_from_slice(&past.to_le_bytes());
            std::fs::write(&p, buf)?;
            Ok(vec![SHARD.into(), "past the end".into()])
        },
        true,
    )?;
    broken_model(
        "hdrjson",
        |d| {
            let p = d.join(SHARD);
            let mut buf = std::fs::read(&p)?;
            buf[8] = b'['; // same length, no longer JSON
            buf[9] = b'{';
            std::fs::write(&p, buf)?;
            Ok(vec![SHARD.into(), "invalid header JSON".into()])
        },
        true,
    )?;
    broken_model(
        "overlap",
        |d| {
            let p = d.join(SHARD);
            let (mut h, data) = read_st(&p)?;
            // Two tensors of the same byte size: point the second at the first's bytes.
            let mut by_size: Vec<(u64, String)> = h
                .iter()
                .filter(|(k, _)| *k != "__metadata__")
                .map(|(k, e)| {
                    let o = &e["data_offsets"];
                    (
                        o[1].as_u64().unwrap_or(0) - o[0].as_u64().unwrap_or(0),
                        k.clone(),
                    )
                })
                .collect();
            by_size.sort();
            let pair = by_size
                .windows(2)
                .find(|w| w[0].0 == w[1].0 && w[0].0 > 0)
                .context("no two tensors of equal size")?;
            let (a, b) = (pair[0].1.clone(), pair[1].1.clone());
            let offs = h[&a]["data_offsets"].clone();
            h[&b]["data_offsets"] = offs;
            write_st(&p, &h, &data)?;
            Ok(vec![SHARD.into(), "overlap".into()])
        },
        true,
    )?;
    broken_model(
        "range",
        |d| {
            let p = d.join(SHARD);
            let (mut h, data) = read_st(&p)?;
            let name = matrices(&h).first().cloned().context("no matrix")?;
            let o = &h[&name]["data_offsets"];
            let size = o[1].as_u64().unwrap_or(0) - o[0].as_u64().unwrap_or(0);
            let n = data.len() as u64;
            h[&name]["data_offsets"] = serde_json::json!([n, n + size]);
            write_st(&p, &h, &data)?;
            Ok(vec![SHARD.into(), name, "out of range".into()])
        },
        true,
    )?;
    broken_model(
        "dtype",
        |d| {
            let p = d.join(SHARD);
            let (mut h, data) = read_st(&p)?;
            let name = matrices(&h).first().cloned().context("no matrix")?;
            // Same element width, so the header stays consistent: only the dtype is wrong.
            let new = match h[&name]["dtype"].as_str() {
                Some("F32") => "I32",
                Some("F16") | Some("BF16") => "I16",
                other => bail!("unexpected dtype {other:?}"),
            };
            h[&name]["dtype"] = Value::from(new);
            write_st(&p, &h, &data)?;
            Ok(vec![name, new.into()])
        },
        true,
    )?;
    Ok(())
}

#[test]
fn missing_or_misshaped_tensor() -> Result<()> {
    broken_model(
        "missing",
        |d| {
            let p = d.join(SHARD);
            let (mut h, data) = read_st(&p)?;
            let name = matrices(&h).first().cloned().context("no matrix")?;
            h.remove(&name);
            write_st(&p, &h, &data)?;
            let ip = d.join("model.safetensors.index.json");
            let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&ip)?)?;
            if let Some(m) = idx["weight_map"].as_object_mut() {
                m.remove(&name);
            }
            std::fs::write(&ip, serde_json::to_string(&idx)?)?;
            Ok(vec![name, "missing".into()])
        },
        false,
    )?;
    broken_model(
        "shape",
        |d| {
            let p = d.join(SHARD);
            let (mut h, data) = read_st(&p)?;
            let name = matrices(&h).first().cloned().context("no matrix")?;
            let s = h[&name]["shape"].clone();
            h[&name]["shape"] = serde_json::json!([s[1], s[0]]); // same bytes, transposed
            write_st(&p, &h, &data)?;
            Ok(vec![name, "expected shape".into()])
        },
        false,
    )?;
    Ok(())
}

#[test]
fn missing_model() -> Result<()> {
    let cache = Scratch::new("hfcache")?;
    let img = fixtures().join("images/square.png");
    let img = img.to_string_lossy();
    let args = |m: &'static str| -> Vec<&str> {
        vec!["run", "--model", m, "--image", &img, "--prompt", "x"]
    };
    let env = [(
        "HF_HUB_CACHE",
        cache.path().to_str().unwrap_or("/nonexistent"),
    )];
    let out = visi_env(&args("no-such-org/no-such-model"), &env)?;
    expect_error(
        &out,
        2,
        &["no-such-org/no-such-model", "huggingface-cli download"],
    )?;
    let out = visi_env(&["info", "--model", "no-such-org/no-such-model"], &env)?;
    expect_error(&out, 2, &["huggingface-cli download"])?;
    let out = visi(&args("/nonexistent/model-dir"))?;
    expect_error(&out, 2, &["/nonexistent/model-dir"])?;
    Ok(())
}

/// CRC-32 (PNG's) so the test can write valid chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A PNG whose header claims `w`x`h` RGB pixels, with one empty IDAT.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

#[test]
fn bad_images() -> Result<()> {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082, "crc32 self-check");
    let dir = Scratch::new("img")?;
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let good = std::fs::read(fixtures().join("images/square.png"))?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "text.png",
            b"just some text, not a picture".to_vec(),
            "not an image",
        ),
        ("trunc.png", good[..good.len() / 2].to_vec(), "trunc.png"),
        ("bomb.png", png_claiming(100_000, 100_000), "too large"),
        ("wide.png", png_claiming(20_000, 2), "too large"),
        ("empty.png", Vec::new(), "empty.png"),
    ];
    let mut paths = Vec::new();
    for (name, bytes, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes)?;
        paths.push((p.to_string_lossy().to_string(), needle.to_string(), name));
    }
    paths.push((dir.s(), "directory".into(), "visi-test-img"));
    paths.push(("/nonexistent/cat.png".into(), "not found".into(), "cat.png"));
    for (p, needle, name) in &paths {
        let out = visi(&[
            "run", "--model", &model, "--image", p, "--prompt", "x", "--device", "cpu",
        ])?;
        expect_error(&out, 2, &[needle, name]).with_context(|| format!("image {p}"))?;
    }
    Ok(())
}

/// JPEGs go through libjpeg-turbo (Pillow's decoder): damage, bombs and special files are
/// refused with one line naming the file, before any pixel is allocated.
#[test]
fn bad_jpegs() -> Result<()> {
    let dir = Scratch::new("jpeg")?;
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let good = std::fs::read(fixtures().join("images/wide.jpg"))?;
    // The frame header (SOF0) of wide.jpg claims 30000x30000 pixels, then 65535x65535
    // (over libjpeg's own limit).
    let sof = good
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .context("wide.jpg has a SOF0")?;
    let mut bomb = good.clone();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]);
    let mut huge = good.clone();
    huge[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let mut garbage = good[..200].to_vec();
    garbage.extend(std::iter::repeat_n(0x5A, 300));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("half.jpg", good[..good.len() / 2].to_vec(), "truncated"),
        ("bomb.jpg", bomb, "too large"),
        ("huge.jpg", huge, "too large"),
        ("garbage.jpg", garbage, "garbage.jpg"),
        ("soi.jpg", good[..3].to_vec(), "soi.jpg"),
    ];
    for (name, bytes, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes)?;
        let p = p.to_string_lossy().to_string();
        let out = visi(&[
            "run", "--model", &model, "--image", &p, "--prompt", "x", "--device", "cpu",
        ])?;
        expect_error(&out, 2, &[needle, name]).with_context(|| format!("image {p}"))?;
    }
    #[cfg(unix)]
    {
        let out = visi(&[
            "run",
            "--model",
            &model,
            "--image",
            "/dev/zero",
            "--prompt",
            "x",
            "--device",
            "cpu",
        ])?;
        expect_error(&out, 2, &["not a regular file", "/dev/zero"])?;
    }
    Ok(())
}

#[test]
fn bad_flags() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let base = run_args(&model);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--temperature", "-0.5"], vec!["temperature"]),
        (vec!["--temperature", "nan"], vec!["temperature"]),
        (vec!["--temperature", "hot"], vec!["--temperature"]),
        (vec!["--top-k", "-1"], vec!["--top-k"]),
        (vec!["--top-k", "many"], vec!["--top-k"]),
        (vec!["--top-p", "0"], vec!["top_p"]),
        (vec!["--top-p", "1.5"], vec!["top_p"]),
        (vec!["--max-new-tokens", "0"], vec!["--max-new-tokens"]),
        (vec!["--max-new-tokens", "-3"], vec!["--max-new-tokens"]),
        (vec!["--device", "tpu"], vec!["tpu"]),
        (vec!["--threads", "0"], vec!["--threads"]),
        (vec!["--threads", "100000"], vec!["--threads"]),
        (vec!["--threads", "two"], vec!["--threads"]),
        (vec!["--template", "raw"], vec!["<image>"]),
        (
            vec!["--template", "raw", "--prompt", "<image> and <image>"],
            vec!["<image>"],
        ),
    ];
    for (extra, needles) in cases {
        let mut a: Vec<&str> = base.iter().map(String::as_str).collect();
        a.extend(&extra);
        expect_error(&visi(&a)?, 2, &needles).with_context(|| format!("{extra:?}"))?;
    }
    // Prompt plus image tokens past the context (4096 for tiny-llava-mha).
    let long = "word ".repeat(5000);
    let mut a: Vec<&str> = base.iter().map(String::as_str).collect();
    a.extend(["--prompt", &long]);
    expect_error(&visi(&a)?, 2, &["context"])?;
    Ok(())
}

#[test]
fn no_usable_adapter_suggests_cpu() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let mut a = run_args(&model);
    let dev = a.iter().position(|s| s == "cpu").context("cpu arg")?;
    a[dev] = "gpu".into();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = visi_env(&a, &[("VISI_ADAPTER", "no-such-adapter")])?;
    expect_error(&out, 2, &["--device gpu", "--device cpu"])?;
    let out = visi_env(
        &["info", "--model", &model, "--device", "gpu"],
        &[("VISI_ADAPTER", "no-such-adapter")],
    );
    // `info --device gpu` may find a hardware adapter (it lists them all); if not, the
    // same contract holds.
    let out = out?;
    if !out.status.success() {
        expect_error(&out, 2, &["--device cpu"])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The review's list (issue 16): special files, traversal, output failures, garbage values,
// exit codes, info checks, quieter surprises. Each ends with exit 2 and one error line.
// ---------------------------------------------------------------------------------------

/// Runs visi-cli with a watchdog: a hang (a FIFO opened for reading) fails the test after
/// `secs` instead of blocking it forever.
fn visi_timed(args: &[&str], env: &[(&str, &str)], secs: u64) -> Result<Output> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_visi-cli"));
    c.args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().context("spawning visi-cli")?;
    let t0 = std::time::Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output().context("collecting output");
        }
        if t0.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("visi-cli {args:?} still running after {secs} s (hang)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs visi-cli with stdout going to `/dev/full` (every write fails with ENOSPC).
fn visi_to_dev_full(args: &[&str]) -> Result<Output> {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
    Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI")
        .stdout(full)
        .output()
        .context("running visi-cli")
}

fn mkfifo(p: &Path) -> Result<bool> {
    let _ = std::fs::remove_file(p);
    Ok(Command::new("mkfifo")
        .arg(p)
        .status()
        .map(|s| s.success())
        .unwrap_or(false))
}

/// Edits one key of `config.json` (a JSON pointer path) in a model copy.
fn set_config(d: &Path, path: &[&str], v: Value) -> Result<()> {
    let p = d.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    let mut at = &mut cfg;
    for k in &path[..path.len() - 1] {
        at = &mut at[*k];
    }
    at[path[path.len() - 1]] = v;
    std::fs::write(&p, serde_json::to_string(&cfg)?)?;
    Ok(())
}

#[test]
fn config_values_that_make_garbage() -> Result<()> {
    type Edit = (
        &'static str,
        Vec<&'static str>,
        Value,
        Vec<&'static str>,
        bool,
    );
    let cases: Vec<Edit> = vec![
        // 10^9 layers: named before a 784 GB allocation (run) or a runaway estimate (info).
        (
            "layers1e9",
            vec!["text_config", "num_hidden_layers"],
            Value::from(1_000_000_000u64),
            vec!["num_hidden_layers", "1000000000"],
            true,
        ),
        (
            "layers9",
            vec!["text_config", "num_hidden_layers"],
            Value::from(9),
            vec!["num_hidden_layers", "layer 8"],
            true,
        ),
        (
            "negeps",
            vec!["text_config", "rms_norm_eps"],
            Value::from(-1e-6),
            vec!["config.json", "rms_norm_eps"],
            true,
        ),
        (
            "vnegeps",
            vec!["vision_config", "layer_norm_eps"],
            Value::from(-1.0),
            vec!["config.json", "layer_norm_eps"],
            true,
        ),
        (
            "rope0",
            vec!["text_config", "rope_theta"],
            Value::from(0.0),
            vec!["config.json", "rope_theta"],
            true,
        ),
        (
            "ropelin",
            vec!["text_config", "rope_scaling"],
            serde_json::json!({"rope_type": "linear"}),
            vec!["config.json", "rope_scaling.factor"],
            true,
        ),
        (
            "ropefac",
            vec!["text_config", "rope_scaling"],
            serde_json::json!({"type": "linear", "factor": -2.0}),
            vec!["config.json", "rope_scaling.factor"],
            true,
        ),
        (
            "imgbos",
            vec!["image_token_index"],
            Value::from(1),
            vec!["config.json", "image_token_index", "bos_token_id"],
            true,
        ),
        (
            "imgvocab",
            vec!["image_token_index"],
            Value::from(10_000_000u64),
            vec!["config.json", "image_token_index"],
            true,
        ),
        (
            "bosvocab",
            vec!["text_config", "bos_token_id"],
            Value::from(99_999_999u64),
            vec!["config.json", "bos_token_id", "vocabulary"],
            true,
        ),
        (
            "headdim0",
            vec!["text_config", "head_dim"],
            Value::from(0),
            vec!["config.json", "head_dim"],
            true,
        ),
        // info checks tensors against the config: an MLP width the tensors do not have.
        (
            "inter",
            vec!["text_config", "intermediate_size"],
            Value::from(100),
            vec!["intermediate_size", "mlp"],
            false,
        ),
    ];
    for (tag, path, v, needles, run_too) in cases {
        let m = model_copy(tag)?;
        set_config(m.path(), &path, v)?;
        if run_too {
            expect_error(&run_model(&m)?, 2, &needles).with_context(|| format!("{tag}: run"))?;
        }
        let out = visi(&["info", "--model", &m.s(), "--device", "cpu"])?;
        let info_needles: Vec<&str> = if tag == "inter" {
            vec!["mlp", "config implies"]
        } else {
            needles.clone()
        };
        expect_error(&out, 2, &info_needles).with_context(|| format!("{tag}: info"))?;
    }
    // The tokenizer may be smaller than the embedding table (llava-hf pads it), never larger.
    let m = model_copy("tokbig")?;
    set_config(m.path(), &["text_config", "vocab_size"], Value::from(1000))?;
    set_config(m.path(), &["image_token_index"], Value::from(999))?;
    set_config(m.path(), &["text_config", "eos_token_id"], Value::from(2))?;
    expect_error(&run_model(&m)?, 2, &["tokenizer.json", "vocab_size 1000"])?;
    Ok(())
}

#[test]
fn info_does_not_overflow_or_claim_an_absurd_fit() -> Result<()> {
    let m = model_copy("ctxmax")?;
    set_config(
        m.path(),
        &["text_config", "max_position_embeddings"],
        Value::from(u64::MAX),
    )?;
    let out = visi(&["info", "--model", &m.s(), "--device", "cpu", "--json"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "info failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["device"]["fits"] == false, "fits: {}", v["device"]);
    ensure!(
        v["memory"]["kv_cache_bytes"].as_u64() == Some(u64::MAX),
        "kv bytes must saturate, not wrap: {}",
        v["memory"]
    );
    let out = visi(&["info", "--model", &m.s(), "--device", "cpu"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(!text.contains("fits         yes"), "{text}");
    Ok(())
}

#[test]
fn duplicate_safetensors_names_and_crop_size() -> Result<()> {
    broken_model(
        "dupname",
        |d| {
            let p = d.join(SHARD);
            let (h, data) = read_st(&p)?;
            let name = matrices(&h).first().cloned().context("no matrix")?;
            // serde_json keeps one key: write the duplicate into the header text by hand.
            let mut text = serde_json::to_string(&h)?;
            let entry = serde_json::to_string(&h[&name])?;
            let dup = format!(",{}:{entry}}}", serde_json::to_string(&name)?);
            text.pop();
            text.push_str(&dup);
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(&data);
            std::fs::write(&p, out)?;
            Ok(vec![SHARD.into(), name, "twice".into()])
        },
        true,
    )?;
    // crop_size 224 against tiny-llava-mha's 336 tower: refused before loading, exit 2.
    let src = fixtures().join("tiny-llava-mha");
    let m = Scratch::new("crop")?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), m.path().join(e.file_name()))?;
    }
    let p = m.path().join("preprocessor_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    v["crop_size"] = serde_json::json!({"height": 224, "width": 224});
    std::fs::write(&p, serde_json::to_string(&v)?)?;
    expect_error(
        &run_model(&m)?,
        2,
        &["preprocessor_config.json", "crop_size", "336"],
    )?;
    Ok(())
}

/// A GGUF copy of `src` with its metadata edited (tensors as they are).
fn edit_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, engine_core::gguf::GgufValue)>),
) -> Result<()> {
    use engine_core::weights::WeightSource;
    let f = engine_core::gguf::GgufFile::open(src)?;
    let mut md: Vec<(String, engine_core::gguf::GgufValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("GGUF."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    edit(&mut md);
    let mut ts = Vec::new();
    for info in f.tensor_infos() {
        let v = f.view(&info.name)?;
        ts.push(engine_core::gguf::GgufTensorOut {
            name: info.name.clone(),
            dtype: v.dtype,
            shape: v.shape.to_vec(),
            bytes: v.bytes.to_vec(),
        });
    }
    std::fs::write(dst, engine_core::gguf::to_gguf_bytes(&md, &ts)?)?;
    Ok(())
}

fn set_md(
    md: &mut Vec<(String, engine_core::gguf::GgufValue)>,
    k: &str,
    v: engine_core::gguf::GgufValue,
) {
    md.retain(|(n, _)| n != k);
    md.push((k.to_string(), v));
}

#[test]
fn gguf_values_that_make_garbage() -> Result<()> {
    use engine_core::gguf::GgufValue as G;
    let d = fixtures().join("gguf/tiny-llava-mha");
    let (text, mmproj) = (
        d.join("tiny-llava-mha.f16.gguf"),
        d.join("mmproj-tiny-llava-mha.f16.gguf"),
    );
    let dir = Scratch::new("gguf")?;
    let img = fixtures().join("images/square.png");
    let img = img.to_string_lossy().to_string();
    type Case = (&'static str, bool, &'static str, G, Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "blocks1e9",
            true,
            "llama.block_count",
            G::U32(1_000_000_000),
            vec!["llama.block_count", "1000000000"],
        ),
        (
            "blocks0",
            true,
            "llama.block_count",
            G::U32(0),
            vec!["llama.block_count", "positive"],
        ),
        (
            "epsnan",
            true,
            "llama.attention.layer_norm_rms_epsilon",
            G::F32(f32::NAN),
            vec!["layer_norm_rms_epsilon", "NaN"],
        ),
        (
            "epsneg",
            false,
            "clip.vision.attention.layer_norm_epsilon",
            G::F32(-1e-5),
            vec!["clip.vision.attention.layer_norm_epsilon"],
        ),
        (
            "bos",
            true,
            "tokenizer.ggml.bos_token_id",
            G::U32(9_999_999),
            vec!["tokenizer.ggml.bos_token_id", "vocabulary"],
        ),
        (
            "eos",
            true,
            "tokenizer.ggml.eos_token_id",
            G::U32(9_999_999),
            vec!["tokenizer.ggml.eos_token_id", "vocabulary"],
        ),
        (
            "ropedim",
            true,
            "llama.rope.dimension_count",
            G::U32(4),
            vec!["llama.rope.dimension_count", "head width"],
        ),
        (
            "std0",
            false,
            "clip.vision.image_std",
            G::Array(vec![G::F32(0.0), G::F32(0.5), G::F32(0.5)]),
            vec!["image_std"],
        ),
    ];
    for (tag, in_text, key, v, needles) in cases {
        let (t, m) = (
            dir.path().join(format!("{tag}.gguf")),
            dir.path().join(format!("mmproj-{tag}.gguf")),
        );
        if in_text {
            edit_gguf(&text, &t, |md| set_md(md, key, v))?;
            std::fs::copy(&mmproj, &m)?;
        } else {
            std::fs::copy(&text, &t)?;
            edit_gguf(&mmproj, &m, |md| set_md(md, key, v))?;
        }
        let (ts, ms) = (
            t.to_string_lossy().to_string(),
            m.to_string_lossy().to_string(),
        );
        let out = visi(&[
            "run",
            "--model",
            &ts,
            "--mmproj",
            &ms,
            "--image",
            &img,
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ])?;
        expect_error(&out, 2, &needles).with_context(|| format!("{tag}: pair"))?;
        if in_text {
            // The text model alone reads the same keys.
            let out = visi(&[
                "run",
                "--model",
                &ts,
                "--prompt",
                "hi",
                "--device",
                "cpu",
                "--max-new-tokens",
                "2",
            ])?;
            expect_error(&out, 2, &needles).with_context(|| format!("{tag}: text only"))?;
        }
    }
    // Overlapping tensor ranges: the second tensor's offset pointed at the first's bytes.
    let f = engine_core::gguf::GgufFile::open(&text)?;
    let names: Vec<String> = f.tensor_infos().map(|i| i.name.clone()).collect();
    let mut bytes = std::fs::read(&text)?;
    let offset_of = |bytes: &[u8], name: &str| -> Result<usize> {
        // name (u64 length + bytes), rank u32, dims u64 x rank, type u32, then the offset.
        let mut key = (name.len() as u64).to_le_bytes().to_vec();
        key.extend_from_slice(name.as_bytes());
        let at = bytes
            .windows(key.len())
            .position(|w| w == key.as_slice())
            .context("name")?;
        let r = at + key.len();
        let rank = u32::from_le_bytes(bytes[r..r + 4].try_into()?) as usize;
        Ok(r + 4 + 8 * rank + 4)
    };
    // The two tensors stored first (smallest data offsets).
    let mut by_offset = Vec::new();
    for n in &names {
        let at = offset_of(&bytes, n)?;
        by_offset.push((
            u64::from_le_bytes(bytes[at..at + 8].try_into()?),
            at,
            n.clone(),
        ));
    }
    by_offset.sort();
    let (a, b) = (&by_offset[0], &by_offset[1]);
    let (oa, ob) = (a.1, b.1);
    let first: [u8; 8] = bytes[oa..oa + 8].try_into()?;
    bytes[ob..ob + 8].copy_from_slice(&first);
    let overlap = dir.path().join("overlap.gguf");
    std::fs::write(&overlap, bytes)?;
    let out = visi(&[
        "run",
        "--model",
        &overlap.to_string_lossy(),
        "--prompt",
        "hi",
        "--device",
        "cpu",
    ])?;
    expect_error(&out, 2, &["overlap.gguf", "overlap", &a.2, &b.2])?;
    Ok(())
}

#[test]
fn special_files_are_refused_without_hanging() -> Result<()> {
    let dir = Scratch::new("special")?;
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let d = fixtures().join("gguf/tiny-llava-mha");
    let text = d
        .join("tiny-llava-mha.f16.gguf")
        .to_string_lossy()
        .to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // /dev/zero never ends: as a pruning config and behind a config.json symlink.
    let mut cases: Vec<(Vec<String>, Vec<String>)> = vec![(
        base(&["--model", &model, "--image", &img, "--prune", "@/dev/zero"]),
        vec!["--prune".into(), "/dev/zero".into()],
    )];
    let m = model_copy("zerocfg")?;
    std::fs::remove_file(m.path().join("config.json"))?;
    #[cfg(unix)]
    std::os::unix::fs::symlink("/dev/zero", m.path().join("config.json"))?;
    cases.push((
        base(&["--model", &m.s(), "--image", &img]),
        vec!["config.json".into(), "device".into()],
    ));
    let mut keep = None;
    let fifo = dir.path().join("fifo.png");
    if mkfifo(&fifo)? {
        let f = fifo.to_string_lossy().to_string();
        let fg = dir.path().join("fifo.gguf");
        mkfifo(&fg)?;
        let fg = fg.to_string_lossy().to_string();
        cases.push((
            base(&["--model", &model, "--image", &f]),
            vec!["--image".into(), "FIFO".into()],
        ));
        cases.push((
            base(&["--model", &fg]),
            vec!["--model".into(), "FIFO".into()],
        ));
        cases.push((
            base(&["--model", &text, "--mmproj", &fg, "--image", &img]),
            vec!["--mmproj".into(), "FIFO".into()],
        ));
        cases.push((
            base(&[
                "--model",
                &model,
                "--image",
                &img,
                "--prune",
                &format!("@{f}"),
            ]),
            vec!["--prune".into(), "FIFO".into()],
        ));
        let mf = model_copy("fifocfg")?;
        std::fs::remove_file(mf.path().join("config.json"))?;
        mkfifo(&mf.path().join("config.json"))?;
        cases.push((
            base(&["--model", &mf.s(), "--image", &img]),
            vec!["config.json".into(), "FIFO".into()],
        ));
        let out = visi_timed(&["info", "--model", &mf.s(), "--device", "cpu"], &[], 20)?;
        expect_error(&out, 2, &["config.json", "FIFO"]).context("info on a FIFO config")?;
        // Kept alive until the cases ran (its drop removes the directory).
        keep = Some(mf);
    } else {
        eprintln!("no mkfifo here: FIFO cases skipped");
    }
    for (args, needles) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let n: Vec<&str> = needles.iter().map(String::as_str).collect();
        let out = visi_timed(&a, &[], 20)?;
        expect_error(&out, 2, &n).with_context(|| format!("{args:?}"))?;
    }
    drop(keep);
    Ok(())
}

#[test]
fn hf_cache_refs_main_is_confined_to_snapshots() -> Result<()> {
    let cache = Scratch::new("refs")?;
    let repo = cache.path().join("models--org--name");
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::create_dir_all(repo.join("snapshots"))?;
    // A real model the traversal would reach: the fixture, via ../../..
    let fixture = fixtures().join("tiny-llava-mha");
    let snap = repo.join("snapshots/abc");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&fixture, &snap)?;
    let env = [(
        "HF_HUB_CACHE",
        cache.path().to_str().unwrap_or("/nonexistent"),
    )];
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let args = [
        "run",
        "--model",
        "org/name",
        "--image",
        &img,
        "--prompt",
        "x",
        "--device",
        "cpu",
        "--max-new-tokens",
        "1",
    ];
    let abs = fixture.to_string_lossy().to_string();
    for bad in ["../../..", "../snapshots/abc/..", abs.as_str(), "missing"] {
        std::fs::write(repo.join("refs/main"), bad)?;
        let out = visi_env(&args, &env)?;
        expect_error(&out, 2, &["refs/main"]).with_context(|| format!("refs/main = {bad:?}"))?;
    }
    // The right revision works.
    std::fs::write(repo.join("refs/main"), "abc\n")?;
    let out = visi_env(&args, &env)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn output_failures_are_errors() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let run = [
        "run",
        "--model",
        &model,
        "--image",
        &img,
        "--prompt",
        "hi",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
    ];
    let mut json_run = run.to_vec();
    json_run.push("--json");
    let dir = Scratch::new("devfull")?;
    let out_prefix = dir.path().join("q").to_string_lossy().to_string();
    let cases: Vec<Vec<&str>> = vec![
        run.to_vec(),
        json_run,
        vec!["devices"],
        vec!["devices", "--json"],
        vec!["info", "--model", &model, "--device", "cpu"],
        vec!["info", "--shape", "tiny", "--device", "cpu", "--json"],
        vec![
            "quantize",
            "--model",
            &model,
            "--quant",
            "q8_0",
            "--out",
            &out_prefix,
        ],
        vec!["--help"],
        vec!["--version"],
    ];
    // A full stdout loses the output: an internal failure (exit 1, issue 27), one line.
    for a in &cases {
        let out = visi_to_dev_full(a)?;
        expect_error(&out, 1, &["stdout"]).with_context(|| format!("{a:?} > /dev/full"))?;
    }
    // A stdout pipe closed by the reader (`| head -c0`) stops the run, quietly as other
    // Unix tools end (issue 27): exit 141 (128 + SIGPIPE), no error line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(run)
        .args(["--max-new-tokens", "200"])
        .env("VISI_DEBUG_TOKEN_DELAY_MS", "50")
        .env_remove("CI")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(141),
        "closed pipe: exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(!stderr.contains("panic"), "{stderr}");
    ensure!(
        stderr.lines().filter(|l| l.starts_with("error:")).count() == 0,
        "{stderr}"
    );
    Ok(())
}

#[test]
fn quantize_refuses_devices_and_cleans_up() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    // /dev/full is not a directory; taken as a prefix it would write into /dev.
    let out = visi(&[
        "quantize",
        "--model",
        &model,
        "--quant",
        "q8_0",
        "--out",
        "/dev/full",
    ])?;
    expect_error(&out, 2, &["/dev/full", "not a directory"])?;
    ensure!(
        !Path::new("/dev/full.q8_0.gguf").exists(),
        "wrote into /dev"
    );
    // 10^9 layers: refused, no file written.
    let m = model_copy_of("tiny-llava-mha", "qlayers")?;
    set_config(
        m.path(),
        &["text_config", "num_hidden_layers"],
        Value::from(1_000_000_000u64),
    )?;
    let dir = Scratch::new("qout")?;
    let out = visi(&[
        "quantize",
        "--model",
        &m.s(),
        "--quant",
        "q8_0",
        "--out",
        &format!("{}/", dir.s()),
    ])?;
    expect_error(&out, 2, &["num_hidden_layers"])?;
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "files left behind"
    );
    // Ctrl-C, SIGTERM or SIGHUP while the pair is being written: exit 128 + the signal,
    // nothing left (no .tmp files; SIGTERM/SIGHUP left both temp files before issue 27).
    #[cfg(unix)]
    for (sig, code) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
            .args([
                "quantize",
                "--model",
                &model,
                "--quant",
                "q8_0",
                "--out",
                &format!("{}/", dir.s()),
            ])
            .env("VISI_DEBUG_WRITE_DELAY_MS", "5000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let t0 = std::time::Instant::now();
        let tmp_seen = loop {
            let tmps = std::fs::read_dir(dir.path())?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .count();
            if tmps == 2 {
                break true;
            }
            if t0.elapsed() > std::time::Duration::from_secs(60) || child.try_wait()?.is_some() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        ensure!(tmp_seen, "SIG{sig}: the temp files never appeared");
        Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()?;
        let st = child.wait()?;
        let left: Vec<_> = std::fs::read_dir(dir.path())?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        ensure!(left.is_empty(), "left behind after SIG{sig}: {left:?}");
        ensure!(st.code() == Some(code), "SIG{sig}: exit {:?}", st.code());
    }
    Ok(())
}

#[test]
fn save_kept_and_plot_are_checked_before_the_run() -> Result<()> {
    let dir = Scratch::new("kept")?;
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let existing = dir.path().join("kept.png");
    std::fs::write(&existing, b"keep me")?;
    let e = existing.to_string_lossy().to_string();
    let run = |extra: &[&str]| -> Result<Output> {
        let mut a = vec![
            "run",
            "--model",
            &model,
            "--image",
            &img,
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ];
        a.extend(extra);
        visi(&a)
    };
    expect_error(&run(&["--save-kept", &e])?, 2, &["--save-kept", "--force"])?;
    ensure!(
        std::fs::read(&existing)? == b"keep me",
        "overwritten without --force"
    );
    let out = run(&["--save-kept", &e, "--force"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::read(&existing)?.starts_with(b"\x89PNG"),
        "not replaced by a PNG"
    );
    expect_error(
        &run(&["--save-kept", "/nonexistent/dir/k.png"])?,
        2,
        &["--save-kept", "/nonexistent/dir"],
    )?;
    expect_error(
        &run(&["--save-kept", "/dev/null.png"])?,
        2,
        &["--save-kept"],
    )
    .or_else(|_| -> Result<()> { Ok(()) })?; // root may write in /dev: not asserted
    expect_error(
        &visi(&["bench", "--shape", "tiny", "--device", "cpu", "--plot", &e])?,
        2,
        &["--plot", "--force"],
    )?;
    Ok(())
}

#[test]
fn visi_adapter_naming_no_adapter_is_an_error() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let out = visi_env(
        &[
            "run",
            "--model",
            &model,
            "--image",
            &img,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
        ],
        &[("VISI_ADAPTER", "no-such-adapter")],
    )?;
    expect_error(&out, 2, &["VISI_ADAPTER", "no-such-adapter"])?;
    let env = [("VISI_ADAPTER", "no-such-adapter")];
    let out = visi_env(&["info", "--model", &model], &env)?;
    expect_error(&out, 2, &["VISI_ADAPTER", "no-such-adapter"])?;
    let out = visi_env(&["bench-kernels", "--quick"], &env)?;
    expect_error(&out, 2, &["no-such-adapter"])?;
    Ok(())
}

#[test]
fn an_error_after_the_pruning_note_is_one_line() -> Result<()> {
    // tiny-llava-mha (6 layers) gets a note about the scaled pruning config; a prompt past
    // the context fails after the model loaded: stderr must be the error line alone.
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let long = "word ".repeat(5000);
    let out = visi(&[
        "run", "--model", &model, "--image", &img, "--prompt", &long, "--device", "cpu",
    ])?;
    expect_error(&out, 2, &["context"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.lines().count() == 1,
        "more than the error line: {stderr}"
    );
    Ok(())
}

#[test]
fn failing_arguments_fail_fast_on_every_subcommand() -> Result<()> {
    // Each is refused before any weights load, benchmark starts or generation runs. The
    // bound is loose (2 s on a loaded machine); the point is that none of them does the
    // minutes of work the run would.
    let dir = Scratch::new("fast")?;
    let model = fixtures()
        .join("tiny-llava-gqa")
        .to_string_lossy()
        .to_string();
    let mha = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let img = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let existing = dir.path().join("x.png");
    std::fs::write(&existing, b"x")?;
    let e = existing.to_string_lossy().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "bench",
                "--shape",
                "tiny",
                "--schedule",
                "fusion=2,keep=10,exit=99",
            ],
            "--schedule",
        ),
        (
            vec![
                "bench",
                "--shape",
                "llava-7b",
                "--schedule",
                "fusion=40,keep=10",
            ],
            "--schedule",
        ),
        (
            vec!["bench", "--shape", "tiny", "--plot", "/nonexistent/p.png"],
            "--plot",
        ),
        (vec!["bench", "--shape", "tiny", "--plot", &e], "--plot"),
        (
            vec!["bench", "--model", &model, "--prompt-len", "5"],
            "--prompt-len",
        ),
        (
            vec![
                "run",
                "--model",
                &model,
                "--image",
                &img,
                "--prompt",
                "x",
                "--save-kept",
                "/nonexistent/k.png",
            ],
            "--save-kept",
        ),
        (
            vec![
                "run",
                "--model",
                &model,
                "--image",
                &img,
                "--prompt",
                "x",
                "--prune",
                "{\"method\":\"fastv\",\"k\":99,\"ratio\":0.5}",
            ],
            "99",
        ),
        (
            vec![
                "run",
                "--model",
                &model,
                "--image",
                "/nonexistent.png",
                "--prompt",
                "x",
            ],
            "nonexistent.png",
        ),
        (
            vec![
                "quantize",
                "--model",
                &mha,
                "--quant",
                "q8_0",
                "--out",
                "/dev/full",
            ],
            "/dev/full",
        ),
        (
            vec![
                "quant-eval",
                "--model",
                &model,
                "--prune",
                "{\"method\":\"fastv\",\"k\":99,\"ratio\":0.5}",
            ],
            "--prune",
        ),
        (
            vec![
                "quant-eval",
                "--model",
                &model,
                "--image",
                "/nonexistent.png",
            ],
            "--image",
        ),
        (vec!["info", "--shape", "huge"], "--shape"),
        (vec!["bench-kernels", "--reps", "0"], "--reps"),
    ];
    for (args, needle) in cases {
        let t0 = std::time::Instant::now();
        let out = visi_timed(&args, &[], 60)?;
        let secs = t0.elapsed().as_secs_f64();
        expect_error(&out, 2, &[needle]).with_context(|| format!("{args:?}"))?;
        ensure!(secs < 2.0, "{args:?} took {secs:.1} s to fail");
    }
    Ok(())
}

// =======================================================================================
// Hardening (issue 27, item 1 and the bench part of 9): lying GGUF counts, bench sizes.
// Peak memory is the child's own `ru_maxrss` from wait4 (not wall time: no timed asserts).
// =======================================================================================

/// What one run of visi-cli left: its output and its peak resident memory in bytes.
#[cfg(target_os = "linux")]
fn visi_peak_rss(args: &[&str]) -> Result<(Output, u64)> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;

    /// Linux's `struct rusage` (x86_64 and aarch64: two timevals, then 14 longs).
    #[repr(C)]
    struct Rusage {
        utime: [i64; 2],
        stime: [i64; 2],
        maxrss: i64,
        rest: [i64; 13],
    }
    extern "C" {
        fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_visi-cli"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("VISI_ADAPTER")
        .env_remove("CI")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawning visi-cli")?;
    let pid = child.id() as i32;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().context("stdout")?));
    let err = drain(Box::new(child.stderr.take().context("stderr")?));
    // A watchdog against a hang (the child is ours; wait4 below reaps it).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..3000 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            true
        })
    };
    let mut status = 0i32;
    let mut ru = Rusage {
        utime: [0; 2],
        stime: [0; 2],
        maxrss: 0,
        rest: [0; 13],
    };
    // SAFETY: `pid` is our unreaped child; both pointers are valid for the call.
    let r = unsafe { wait4(pid, &mut status, 0, &mut ru) };
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    ensure!(
        r == pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        !dog.join().unwrap_or(false),
        "visi-cli {args:?} still running after 60 s (hang)"
    );
    let output = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    Ok((output, ru.maxrss as u64 * 1024))
}

/// A GGUF header (v3) and `meta` written into `path`, then the file grown to `len` bytes
/// (sparse: the rest reads as zeros without taking disk).
fn sparse_gguf(path: &Path, n_tensors: u64, n_kv: u64, meta: &[u8], len: u64) -> Result<()> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b.extend_from_slice(meta);
    std::fs::write(path, &b)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(len)?;
    Ok(())
}

/// One metadata pair `k`: an array of `n` elements of GGUF type `ety`.
fn array_kv(ety: u32, n: u64) -> Vec<u8> {
    let mut b = 1u64.to_le_bytes().to_vec();
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&ety.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    b
}

#[cfg(target_os = "linux")]
#[test]
fn lying_gguf_counts_are_refused_in_bounded_memory() -> Result<()> {
    let dir = Scratch::new("gguf-counts")?;
    let d = fixtures().join("gguf/tiny-llava-mha");
    let text = d
        .join("tiny-llava-mha.f16.gguf")
        .to_string_lossy()
        .to_string();
    let mmproj = d
        .join("mmproj-tiny-llava-mha.f16.gguf")
        .to_string_lossy()
        .to_string();
    let gb = 1u64 << 30;
    // (file, tensor count, pair count, metadata, length, words the error must hold)
    type Case<'a> = (&'a str, u64, u64, Vec<u8>, u64, Vec<&'a str>);
    let files: Vec<Case> = vec![
        (
            "tensors-1e9.gguf",
            1_000_000_000,
            0,
            vec![],
            gb,
            vec!["tensors", "1000000000"],
        ),
        (
            "pairs-1e9.gguf",
            0,
            1_000_000_000,
            vec![],
            gb,
            vec!["metadata", "1000000000"],
        ),
        (
            "u8-array-1e9.gguf",
            0,
            1,
            array_kv(0, 1_000_000_000),
            gb,
            vec!["metadata values"],
        ),
        (
            "u32-array-1e9.gguf",
            0,
            1,
            array_kv(4, 1_000_000_000),
            gb,
            vec!["array", "1000000000"],
        ),
        // 80 MB of u8 elements that the file does hold: 2.5 GiB and 5 s before the fix.
        (
            "u8-array-80mb.gguf",
            0,
            1,
            array_kv(0, 80_000_000),
            80_000_100,
            vec!["metadata values"],
        ),
    ];
    for (name, nt, nkv, meta, len, words) in &files {
        let p = dir.path().join(name);
        sparse_gguf(&p, *nt, *nkv, meta, *len)?;
        let p = p.to_string_lossy().to_string();
        for (flag, args) in [
            ("--model", vec!["run", "--model", &p, "--mmproj", &mmproj]),
            ("--mmproj", vec!["run", "--model", &text, "--mmproj", &p]),
        ] {
            let mut args = args.clone();
            args.extend(["--prompt", "hi", "--device", "cpu", "--max-new-tokens", "1"]);
            let (out, rss) = visi_peak_rss(&args)?;
            let mut needles = vec![*name];
            needles.extend(words.iter().copied());
            expect_error(&out, 2, &needles).with_context(|| format!("{name} as {flag}"))?;
            ensure!(
                rss < 256 << 20,
                "{name} as {flag}: peak RSS {} MiB",
                rss >> 20
            );
        }
    }
    Ok(())
}

#[test]
fn bench_sizes_that_overflow_exit_2() -> Result<()> {
    let max = u64::MAX.to_string();
    for (args, needle) in [
        (
            vec![
                "bench",
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--prompt-len",
                &max,
            ],
            "--prompt-len",
        ),
        (
            vec![
                "bench",
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--decode-tokens",
                &max,
            ],
            "--decode-tokens",
        ),
        (
            vec![
                "bench",
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--prompt-len",
                "9223372036854775808",
                "--decode-tokens",
                "9223372036854775808",
            ],
            "--prompt-len",
        ),
    ] {
        let out = visi_timed(&args, &[], 120)?;
        expect_error(&out, 2, &[needle]).with_context(|| format!("{args:?}"))?;
    }
    Ok(())
}

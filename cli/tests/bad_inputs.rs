//! The built `visi-cli` on broken input: every case exits with status 2 and exactly one
//! `error: ...` line on stderr that names the file, key or tensor at fault, prints nothing
//! on stdout, and shows no panic or backtrace (`RUST_BACKTRACE=1` is set to prove it).
//! Broken model directories are copies of `tests/fixtures/tiny-llava-gqa` in a temp dir
//! with one file corrupted; the committed fixtures are never modified.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use visi_tests::{expect_error, fixtures};

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

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!("visi-bad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Scratch(d))
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn s(&self) -> String {
        self.0.to_string_lossy().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of tiny-llava-gqa (symlinked tokenizer files copied as files).
fn model_copy(tag: &str) -> Result<Scratch> {
    let src = fixtures().join("tiny-llava-gqa");
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
    let env = [("HF_HUB_CACHE", cache.0.to_str().unwrap_or("/nonexistent"))];
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
    paths.push((dir.s(), "directory".into(), "visi-bad-img"));
    paths.push(("/nonexistent/cat.png".into(), "not found".into(), "cat.png"));
    for (p, needle, name) in &paths {
        let out = visi(&[
            "run", "--model", &model, "--image", p, "--prompt", "x", "--device", "cpu",
        ])?;
        expect_error(&out, 2, &[needle, name]).with_context(|| format!("image {p}"))?;
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

//! `visi-cli serve` over real HTTP on loopback (a small HTTP/1.1 client on a TcpStream):
//! - completions equal `run --messages` (tokens, text, usage, pruning decisions) on the
//!   tiny fixtures, dense and pruned, on the CPU backend and the wgpu adapter;
//! - streamed chunks join to the same text and end with `data: [DONE]`;
//! - concurrent requests (mixed pruning configs, greedy and seeded sampling) equal their
//!   lone answers token for token, and did run batched;
//! - every malformed request gets its 4xx with an OpenAI error object while the server
//!   keeps serving; API key, body limit, read timeout, queue-full 429, a panicking request
//!   (500, server stays up), client disconnects freeing KV, KV-budget admission;
//! - SIGTERM lets the in-flight answer finish and exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use visi_tests::{binary_devices, fixtures, references, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_visi-cli");

/// A running `visi-cli serve`; killed on drop unless it already exited.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Server> {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env_remove("CI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting visi-cli serve")?;
        let stderr = child.stderr.take().context("stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if let Ok(mut g) = l.lock() {
                    g.push_str(&line);
                    g.push('\n');
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the server did not start: {}",
                    log.lock().map(|g| g.clone()).unwrap_or_default()
                );
            }
        };
        Ok(Server { child, addr, log })
    }

    fn log(&self) -> String {
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn chat(&self, body: &Value) -> Result<Resp> {
        http(
            &self.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string().as_bytes(),
        )
    }

    /// A 200 chat completion.
    fn ok(&self, body: &Value) -> Result<Value> {
        let r = self.chat(body)?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.text());
        r.json()
    }

    fn metric(&self, name: &str) -> Result<f64> {
        let r = http(&self.addr, "GET", "/metrics", &[], b"")?;
        ensure!(r.status == 200, "/metrics: {}", r.status);
        let t = r.text();
        t.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .with_context(|| format!("{name} not in /metrics:\n{t}"))
    }

    fn wait_metric(&self, name: &str, want: impl Fn(f64) -> bool) -> Result<f64> {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name)?;
            if want(v) {
                return Ok(v);
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "{name} stuck at {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (at most 60 s).
    fn term(&mut self) -> Result<ExitStatus> {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(st.success(), "kill -TERM failed");
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP response.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent event stream.
    fn sse(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|ev| {
                ev.lines()
                    .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                    .map(str::to_string)
            })
            .collect()
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// One request on a fresh connection (`Connection: close`), the whole response read.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.write_all(&request_bytes(method, path, headers, body))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Resp> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("chunk size line")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .context("chunk size")?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            ensure!(rest.len() >= size + 2, "truncated chunk");
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn data_url(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

fn image_message(url: &str, text: &str) -> Value {
    json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": text}]})
}

/// A two-turn conversation about the fixture image.
fn conversation(url: &str) -> Value {
    json!([
        image_message(url, "What is shown in this image?"),
        {"role": "assistant", "content": "Shapes on a white background."},
        {"role": "user", "content": "What colour is the circle?"}
    ])
}

fn run_messages(
    model: &str,
    device: &str,
    msgs: &Value,
    extra: &[String],
    dir: &Scratch,
) -> Result<Value> {
    let f = dir.write("messages.json", &msgs.to_string())?;
    let mut args: Vec<String> = [
        "run",
        "--messages",
        &f,
        "--model",
        model,
        "--device",
        device,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let out = Command::new(BIN).args(&args).env_remove("CI").output()?;
    ensure!(
        out.status.success(),
        "run {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn content(v: &Value) -> Result<String> {
    v["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no content in {v}"))
}

/// Joins a stream's deltas; checks the chunk format and the closing `[DONE]`.
fn joined(r: &Resp) -> Result<(String, Value)> {
    ensure!(r.status == 200, "stream status {}: {}", r.status, r.text());
    ensure!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "content-type {:?}",
        r.header("content-type")
    );
    let events = r.sse();
    ensure!(
        events.last().map(String::as_str) == Some("[DONE]"),
        "no [DONE]: {events:?}"
    );
    let mut text = String::new();
    let mut last = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).with_context(|| format!("chunk {e}"))?;
        ensure!(v["object"] == "chat.completion.chunk", "chunk {v}");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            last = v;
        }
    }
    ensure!(!last.is_null(), "no chunk with a finish_reason");
    Ok((text, last))
}

#[test]
fn completions_equal_run_messages_and_streams_join() -> Result<()> {
    let dir = Scratch::new("serve-eq")?;
    let url = data_url(&fixtures().join("images/square.png"))?;
    for device in binary_devices(Path::new(BIN))? {
        for r in references()? {
            let model = r.model_dir.to_string_lossy().to_string();
            let server = Server::start(&["--model", &model, "--device", device], &[])?;
            let mut configs: Vec<(Value, Vec<String>)> = vec![
                (Value::Null, vec![]),
                (json!("none"), vec!["--no-prune".into()]),
            ];
            if let Some(p) = r.prune_runs.iter().find(|p| p.case == "square_crop") {
                configs.push((p.prune.clone(), vec!["--prune".into(), p.prune.to_string()]));
            }
            let convs = [
                conversation(&url),
                json!([image_message(&url, "Describe the image.")]),
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]),
            ];
            for (ci, msgs) in convs.iter().enumerate() {
                for (prune, flags) in &configs {
                    let what = format!("{device} {} conversation {ci} prune {prune}", r.name);
                    let mut flags = flags.clone();
                    flags.extend(["--max-new-tokens".into(), "12".into()]);
                    let want =
                        run_messages(&model, device, msgs, &flags, &dir).context(what.clone())?;
                    let mut body = json!({"model": "x", "messages": msgs, "max_tokens": 12});
                    if !prune.is_null() {
                        body["visi"] = json!({"prune": prune});
                    }
                    let got = server.ok(&body).context(what.clone())?;
                    let v = &got["visi"];
                    ensure!(
                        v["tokens"] == want["tokens"],
                        "{what}: tokens {} vs run {}",
                        v["tokens"],
                        want["tokens"]
                    );
                    ensure!(
                        content(&got)? == want["text"].as_str().unwrap_or(""),
                        "{what}: text {got} vs run {want}"
                    );
                    ensure!(
                        got["usage"]["prompt_tokens"] == want["prompt_tokens"],
                        "{what}: usage {}",
                        got["usage"]
                    );
                    ensure!(
                        got["usage"]["completion_tokens"].as_u64()
                            == want["tokens"].as_array().map(|a| a.len() as u64),
                        "{what}: usage {}",
                        got["usage"]
                    );
                    for k in [
                        "kept_image_tokens",
                        "layer_seq_lens",
                        "fusion_layer",
                        "kv_lens",
                    ] {
                        ensure!(
                            v["pruning"][k] == want["pruning"][k],
                            "{what}: {k}: {} vs run {}",
                            v["pruning"][k],
                            want["pruning"][k]
                        );
                    }
                    let reason = if want["stopped_by_eos"] == true {
                        "stop"
                    } else {
                        "length"
                    };
                    ensure!(
                        got["choices"][0]["finish_reason"] == reason,
                        "{what}: {got}"
                    );
                    // The same request streamed.
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                    let s = server.chat(&body)?;
                    let (text, last) = joined(&s).context(what.clone())?;
                    ensure!(
                        text == content(&got)?,
                        "{what}: stream joined {text:?} vs {:?}",
                        content(&got)?
                    );
                    ensure!(
                        last["choices"][0]["finish_reason"] == reason,
                        "{what}: {last}"
                    );
                    ensure!(
                        last["visi"]["tokens"] == want["tokens"],
                        "{what}: streamed tokens {}",
                        last["visi"]["tokens"]
                    );
                    let usage = s.sse().iter().rev().nth(1).cloned().unwrap_or_default();
                    let usage: Value = serde_json::from_str(&usage)?;
                    ensure!(
                        usage["usage"] == got["usage"],
                        "{what}: stream usage {usage}"
                    );
                }
            }
            // A stop string cuts the answer before it, in both forms.
            let body = json!({"messages": convs[1], "max_tokens": 12});
            let full = content(&server.ok(&body)?)?;
            let cut_at = full
                .char_indices()
                .nth(full.chars().count() / 2)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let stop: String = full[cut_at..].chars().take(3).collect();
            if !stop.trim().is_empty() {
                let want = &full[..full.find(&stop).unwrap_or(full.len())];
                let mut b = json!({"messages": convs[1], "max_tokens": 12, "stop": [stop.clone(), "\u{1}never"]});
                let got = server.ok(&b)?;
                ensure!(
                    content(&got)? == want,
                    "stop {stop:?}: {:?} vs {want:?}",
                    content(&got)?
                );
                ensure!(got["choices"][0]["finish_reason"] == "stop", "{got}");
                b["stream"] = json!(true);
                let (text, last) = joined(&server.chat(&b)?)?;
                ensure!(text == want, "stop {stop:?} streamed: {text:?} vs {want:?}");
                ensure!(last["choices"][0]["finish_reason"] == "stop", "{last}");
            }
            let m = http(&server.addr, "GET", "/v1/models", &[], b"")?.json()?;
            ensure!(m["data"][0]["id"] == r.name.as_str(), "{m}");
        }
    }
    Ok(())
}

/// Several images in one request (each `<image>` takes the next, as in `run --messages`):
/// the answer equals `run --messages` with the same images, dense and with the default
/// pruning, on every device.
#[test]
fn two_images_equal_run_messages() -> Result<()> {
    let dir = Scratch::new("serve-two")?;
    let a = data_url(&fixtures().join("images/square.png"))?;
    let b = data_url(&fixtures().join("images/portrait.png"))?;
    let msgs = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": a}},
        {"type": "text", "text": "The first image."},
        {"type": "image_url", "image_url": {"url": b}},
        {"type": "text", "text": "What differs between the two images?"}]}]);
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    for device in binary_devices(Path::new(BIN))? {
        let server = Server::start(&["--model", &model, "--device", device], &[])?;
        for (prune, flags) in [(Value::Null, vec![]), (json!("none"), vec!["--no-prune"])] {
            let what = format!("{device} {} two images prune {prune}", r.name);
            let mut flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            flags.extend(["--max-new-tokens".into(), "10".into()]);
            let want = run_messages(&model, device, &msgs, &flags, &dir).context(what.clone())?;
            let mut body = json!({"messages": msgs, "max_tokens": 10});
            if !prune.is_null() {
                body["visi"] = json!({"prune": prune});
            }
            let got = server.ok(&body).context(what.clone())?;
            ensure!(
                got["visi"]["tokens"] == want["tokens"],
                "{what}: tokens {} vs run {}",
                got["visi"]["tokens"],
                want["tokens"]
            );
            ensure!(
                content(&got)? == want["text"].as_str().unwrap_or(""),
                "{what}: text {got} vs run {want}"
            );
            ensure!(
                got["usage"]["prompt_tokens"] == want["prompt_tokens"],
                "{what}: usage {} vs run {}",
                got["usage"],
                want["prompt_tokens"]
            );
            for k in ["kept_image_tokens", "layer_seq_lens"] {
                ensure!(
                    got["visi"]["pruning"][k] == want["pruning"][k],
                    "{what}: {k}: {} vs run {}",
                    got["visi"]["pruning"][k],
                    want["pruning"][k]
                );
            }
        }
        // Both images are in the prompt: at least twice one image's tokens.
        let tokens = |body: Value| -> Result<u64> {
            let v = server.ok(&body)?;
            v["usage"]["prompt_tokens"]
                .as_u64()
                .with_context(|| format!("no usage in {v}"))
        };
        let text =
            tokens(json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}))?;
        let one = tokens(json!({"messages": [image_message(&a, "Hi")], "max_tokens": 1}))?;
        let two = tokens(json!({"messages": msgs, "max_tokens": 1}))?;
        let per_image = one.saturating_sub(text);
        ensure!(
            per_image > 0 && two >= 2 * per_image,
            "{device}: prompt tokens {text} for text, {one} with one image, {two} with two"
        );
    }
    Ok(())
}

#[test]
fn concurrent_requests_equal_their_lone_answers() -> Result<()> {
    let url = data_url(&fixtures().join("images/square.png"))?;
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let prune_run = r
        .prune_runs
        .iter()
        .find(|p| p.case == "square_crop")
        .map(|p| p.prune.clone());
    let questions = [
        "What is shown in this image?",
        "Describe the colours in detail.",
        "Is there a circle?",
        "Count the shapes.",
        "What colour is the background?",
        "Name every shape you see.",
    ];
    let bodies: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut b = json!({"messages": [image_message(&url, q)], "max_tokens": 10 + 3 * i});
            match i % 3 {
                0 => {}
                1 => b["visi"] = json!({"prune": "none"}),
                _ => {
                    if let Some(p) = &prune_run {
                        b["visi"] = json!({"prune": p});
                    }
                }
            }
            if i % 2 == 1 {
                b["temperature"] = json!(0.9);
                b["top_p"] = json!(0.95);
                b["seed"] = json!(1000 + i);
            }
            if i == 4 {
                b["stream"] = json!(true);
            }
            b
        })
        .collect();
    for device in binary_devices(Path::new(BIN))? {
        // A short pause per step so that the requests overlap on a tiny model.
        let server = Server::start(
            &["--model", &model, "--device", device, "--max-batch", "8"],
            &[("VISI_DEBUG_TOKEN_DELAY_MS", "15")],
        )?;
        let tokens_of = |r: &Resp, b: &Value| -> Result<Value> {
            if b["stream"] == true {
                Ok(joined(r)?.1["visi"]["tokens"].clone())
            } else {
                ensure!(r.status == 200, "{}", r.text());
                Ok(r.json()?["visi"]["tokens"].clone())
            }
        };
        let mut lone = Vec::new();
        for b in &bodies {
            lone.push(tokens_of(&server.chat(b)?, b)?);
        }
        ensure!(
            server.metric("visi_active_sequences_max")? == 1.0,
            "lone requests overlapped"
        );
        for round in 0..2 {
            let addr = server.addr.clone();
            let barrier = Arc::new(std::sync::Barrier::new(bodies.len()));
            let handles: Vec<_> = bodies
                .iter()
                .cloned()
                .map(|b| {
                    let addr = addr.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        http(
                            &addr,
                            "POST",
                            "/v1/chat/completions",
                            &[],
                            b.to_string().as_bytes(),
                        )
                    })
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                let resp = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
                let got = tokens_of(&resp, &bodies[i])?;
                ensure!(
                    got == lone[i],
                    "{device} round {round} request {i}: {got} together vs {} alone",
                    lone[i]
                );
            }
        }
        let max = server.metric("visi_active_sequences_max")?;
        ensure!(
            max >= 3.0,
            "{device}: at most {max} sequences ran together: no batching happened"
        );
        // The engine updates its gauges after the step that sent the last answer, so a
        // client can ask a moment before they move: wait (up to 60 s) for the KV to be freed.
        server
            .wait_metric("visi_kv_bytes_in_use", |v| v == 0.0)
            .context("KV left after all answers")?;
    }
    Ok(())
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A PNG whose header claims 100000 x 100000 pixels (a decompression bomb's header).
fn bomb_png() -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

fn check_error(r: &Resp, status: u16, what: &str) -> Result<()> {
    ensure!(
        r.status == status,
        "{what}: status {} (want {status}): {}",
        r.status,
        r.text()
    );
    let v = r.json().context(what.to_string())?;
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        ensure!(e.get(k).is_some(), "{what}: error without `{k}`: {v}");
    }
    ensure!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    Ok(())
}

#[test]
fn bad_requests_get_4xx_and_the_server_stays_up() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let allowed = Scratch::new("serve-allow")?;
    std::fs::copy(
        fixtures().join("images/square.png"),
        allowed.path().join("ok.png"),
    )?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        fixtures().join("images/square.png"),
        allowed.path().join("link.png"),
    )?;
    let outside = fixtures()
        .join("images/square.png")
        .to_string_lossy()
        .to_string();
    let server = Server::start(
        &[
            "--model",
            &model,
            "--device",
            "cpu",
            "--api-key",
            "sekret",
            "--max-body",
            "1MiB",
            "--read-timeout",
            "2",
            "--allow-files",
            &allowed.s(),
            "--debug-panic-on",
            "PANIC NOW",
            "--max-images",
            "1",
        ],
        &[],
    )?;
    let auth = [("Authorization", "Bearer sekret")];
    let post = |body: &[u8]| http(&server.addr, "POST", "/v1/chat/completions", &auth, body);
    let user = |c: Value| json!({"messages": [{"role": "user", "content": c}]});
    let with = |k: &str, v: Value| {
        let mut b = user(json!("Hi"));
        b[k] = v;
        b
    };
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let img = |url: String| json!({"messages": [image_message(&url, "What is it?")]});
    let long_text = "hello ".repeat(6000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid JSON", b"{\"messages\": [".to_vec(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        ("no messages", b"{}".to_vec(), 400),
        ("messages not a list", json!({"messages": "hi"}).to_string().into_bytes(), 400),
        ("empty messages", json!({"messages": []}).to_string().into_bytes(), 400),
        ("unknown role", json!({"messages": [{"role": "robot", "content": "x"}]}).to_string().into_bytes(), 400),
        ("content of the wrong type", user(json!(5)).to_string().into_bytes(), 400),
        ("no user message", json!({"messages": [{"role": "system", "content": "x"}]}).to_string().into_bytes(), 400),
        ("assistant last", json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).to_string().into_bytes(), 400),
        ("bad base64", img("data:image/png;base64,@@@@".into()).to_string().into_bytes(), 400),
        ("not an image", img(format!("data:image/png;base64,{}", b64(b"hello, world"))).to_string().into_bytes(), 400),
        ("decompression bomb", img(format!("data:image/png;base64,{}", b64(&bomb_png()))).to_string().into_bytes(), 400),
        ("remote URL", img("https://example.com/cat.png".into()).to_string().into_bytes(), 400),
        ("file outside --allow-files", img(outside.clone()).to_string().into_bytes(), 400),
        ("escape by ..", img(format!("{}/../{}", allowed.s(), "x.png")).to_string().into_bytes(), 400),
        ("escape by a link", img("link.png".into()).to_string().into_bytes(), 400),
        ("too many images", json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ok.png"}},
            {"type": "image_url", "image_url": {"url": "ok.png"}},
            {"type": "text", "text": "Compare."}]}]}).to_string().into_bytes(), 400),
        ("prompt over the context", user(json!(long_text)).to_string().into_bytes(), 400),
        ("prompt far over the context", user(json!("hello ".repeat(60_000))).to_string().into_bytes(), 400),
        ("temperature < 0", with("temperature", json!(-1)).to_string().into_bytes(), 400),
        ("temperature a string", with("temperature", json!("hot")).to_string().into_bytes(), 400),
        ("top_p 0", with("top_p", json!(0)).to_string().into_bytes(), 400),
        ("top_p 2", with("top_p", json!(2)).to_string().into_bytes(), 400),
        ("max_tokens 0", with("max_tokens", json!(0)).to_string().into_bytes(), 400),
        ("max_tokens -5", with("max_tokens", json!(-5)).to_string().into_bytes(), 400),
        ("max_tokens 1.5", with("max_tokens", json!(1.5)).to_string().into_bytes(), 400),
        ("n 2", with("n", json!(2)).to_string().into_bytes(), 400),
        ("stop a number", with("stop", json!(5)).to_string().into_bytes(), 400),
        ("stop empty", with("stop", json!([""])).to_string().into_bytes(), 400),
        ("seed a string", with("seed", json!("x")).to_string().into_bytes(), 400),
        ("stream a string", with("stream", json!("yes")).to_string().into_bytes(), 400),
        ("model a number", with("model", json!(5)).to_string().into_bytes(), 400),
        ("unknown pruning method", with("visi", json!({"prune": {"method": "bogus"}})).to_string().into_bytes(), 400),
        ("pruning word", with("visi", json!({"prune": "maybe"})).to_string().into_bytes(), 400),
        ("visi not an object", with("visi", json!(3)).to_string().into_bytes(), 400),
        ("pruning budget over the image tokens", with("visi", json!({"prune": "divprune:100000"})).to_string().into_bytes(), 400),
        ("pruning budget 0", with("visi", json!({"prune": {"method": "divprune", "keep": 0}})).to_string().into_bytes(), 400),
        ("adaptive method with a budget", with("visi", json!({"prune": "visipruner:64"})).to_string().into_bytes(), 400),
    ];
    for (what, body, status) in &cases {
        let resp = post(body).with_context(|| what.to_string())?;
        check_error(&resp, *status, what)?;
        // Still serving.
        let h = http(&server.addr, "GET", "/health", &[], b"")?;
        ensure!(
            h.status == 200,
            "{what}: /health {} afterwards; log:\n{}",
            h.status,
            server.log()
        );
    }
    // A bad pruning budget is refused while the request is read, naming the field.
    for prune in [
        json!("divprune:100000"),
        json!({"method": "divprune", "keep": 0}),
    ] {
        let resp = post(
            &with("visi", json!({ "prune": prune }))
                .to_string()
                .into_bytes(),
        )?;
        let v = resp.json()?;
        ensure!(
            resp.status == 400 && v["error"]["param"] == "visi.prune",
            "budget {prune}: {} {v}",
            resp.status
        );
        let m = v["error"]["message"].as_str().unwrap_or("");
        ensure!(
            m.contains("divprune") && m.contains("[1, "),
            "budget {prune}: {m}"
        );
    }
    // A body over --max-body: refused from its Content-Length, before it is read.
    let mut s = TcpStream::connect(&server.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Length: 2097152\r\n\r\n{")?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    check_error(&parse_response(&buf)?, 413, "body over --max-body")?;
    // The API key.
    let ok = serde_json::to_vec(
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    )?;
    check_error(
        &http(&server.addr, "POST", "/v1/chat/completions", &[], &ok)?,
        401,
        "no key",
    )?;
    check_error(
        &http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer nope")],
            &ok,
        )?,
        401,
        "wrong key",
    )?;
    check_error(
        &http(&server.addr, "GET", "/v1/models", &[], b"")?,
        401,
        "models without key",
    )?;
    check_error(
        &http(&server.addr, "GET", "/nowhere", &auth, b"")?,
        404,
        "unknown path",
    )?;
    check_error(
        &http(&server.addr, "GET", "/v1/chat/completions", &auth, b"")?,
        405,
        "GET on chat",
    )?;
    // A file inside --allow-files is fine, by relative or absolute path.
    for url in ["ok.png".to_string(), allowed.p("ok.png")] {
        let mut b = img(url.clone());
        b["max_tokens"] = json!(3);
        let resp = post(&serde_json::to_vec(&b)?)?;
        ensure!(resp.status == 200, "{url}: {}", resp.text());
    }
    // A request that panics inside the engine is its own 500; the next one is served.
    let resp = post(&serde_json::to_vec(&user(json!("PANIC NOW")))?)?;
    check_error(&resp, 500, "panicking request")?;
    let resp = post(&ok)?;
    ensure!(resp.status == 200, "after the panic: {}", resp.text());
    // A slow client: headers never finished, then a body that never comes.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(&server.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    ensure!(
        t0.elapsed() < Duration::from_secs(20),
        "header read timeout not applied"
    );
    let mut s = TcpStream::connect(&server.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Length: 100\r\n\r\n{\"messages\"")?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    check_error(&parse_response(&buf)?, 408, "slow body")?;
    let resp = post(&ok)?;
    ensure!(resp.status == 200, "at the end: {}", resp.text());
    let m = http(&server.addr, "GET", "/metrics", &auth, b"")?.text();
    ensure!(
        m.contains("visi_requests_total{outcome=\"bad_request\"}"),
        "{m}"
    );
    Ok(())
}

#[test]
fn queue_full_disconnects_and_kv_budget() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let slow = [("VISI_DEBUG_TOKEN_DELAY_MS", "40")];
    let long = json!({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 60, "stream": true});
    {
        let server = Server::start(
            &[
                "--model",
                &model,
                "--device",
                "cpu",
                "--max-batch",
                "1",
                "--queue",
                "1",
            ],
            &slow,
        )?;
        // A: running; B: queued; C: refused.
        let addr = server.addr.clone();
        let a = std::thread::spawn({
            let addr = addr.clone();
            let b = long.to_string();
            move || http(&addr, "POST", "/v1/chat/completions", &[], b.as_bytes())
        });
        server.wait_metric("visi_active_sequences", |v| v == 1.0)?;
        let b = std::thread::spawn({
            let addr = addr.clone();
            let b = long.to_string();
            move || http(&addr, "POST", "/v1/chat/completions", &[], b.as_bytes())
        });
        server.wait_metric("visi_queue_depth", |v| v == 1.0)?;
        let c = server.chat(&long)?;
        check_error(&c, 429, "queue full")?;
        ensure!(c.header("retry-after").is_some(), "429 without Retry-After");
        for h in [a, b] {
            let resp = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
            joined(&resp)?;
        }
        // A client that goes away mid-answer frees its sequence and KV.
        let mut s = TcpStream::connect(&server.addr)?;
        s.write_all(&request_bytes(
            "POST",
            "/v1/chat/completions",
            &[],
            long.to_string().as_bytes(),
        ))?;
        let mut first = [0u8; 64];
        s.read_exact(&mut first)?;
        server.wait_metric("visi_kv_bytes_in_use", |v| v > 0.0)?;
        drop(s);
        server.wait_metric("visi_kv_bytes_in_use", |v| v == 0.0)?;
        server.wait_metric("visi_active_sequences", |v| v == 0.0)?;
        let d = server.metric("visi_requests_total{outcome=\"disconnected\"}")?;
        ensure!(d == 1.0, "disconnected {d}");
        // The same for a client waiting on a whole (non-streamed) answer.
        let mut whole = long.clone();
        whole["stream"] = json!(false);
        let mut s = TcpStream::connect(&server.addr)?;
        s.write_all(&request_bytes(
            "POST",
            "/v1/chat/completions",
            &[],
            whole.to_string().as_bytes(),
        ))?;
        server.wait_metric("visi_kv_bytes_in_use", |v| v > 0.0)?;
        drop(s);
        server.wait_metric("visi_kv_bytes_in_use", |v| v == 0.0)?;
        let d = server.metric("visi_requests_total{outcome=\"disconnected\"}")?;
        ensure!(d == 2.0, "disconnected {d}");
    }
    {
        // A KV budget that holds one answer: three requests run one after the other.
        let server = Server::start(
            &["--model", &model, "--device", "cpu", "--kv-budget", "1000"],
            &[("VISI_DEBUG_TOKEN_DELAY_MS", "5")],
        )?;
        let body =
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}).to_string();
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let addr = server.addr.clone();
                let b = body.clone();
                std::thread::spawn(move || {
                    http(&addr, "POST", "/v1/chat/completions", &[], b.as_bytes())
                })
            })
            .collect();
        for h in hs {
            let r = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
            ensure!(r.status == 200, "{}", r.text());
        }
        ensure!(
            server.metric("visi_active_sequences_max")? == 1.0,
            "the budget admitted two at once"
        );
    }
    Ok(())
}

#[test]
fn sigterm_finishes_in_flight_answers_and_exits_0() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let mut server = Server::start(
        &["--model", &model, "--device", "cpu"],
        &[("VISI_DEBUG_TOKEN_DELAY_MS", "30")],
    )?;
    let body = json!({"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 30, "stream": true});
    let addr = server.addr.clone();
    let h = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string().as_bytes(),
        )
    });
    server.wait_metric("visi_active_sequences", |v| v == 1.0)?;
    let status = server.term()?;
    ensure!(
        status.code() == Some(0),
        "exit {status:?}; log:\n{}",
        server.log()
    );
    let resp = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    let (_, last) = joined(&resp)?;
    ensure!(
        last["choices"][0]["finish_reason"] == "length",
        "in-flight answer cut: {last}"
    );
    ensure!(
        TcpStream::connect(&server.addr).is_err(),
        "still accepting after exit"
    );
    // With nothing in flight, too.
    let mut idle = Server::start(&["--model", &model, "--device", "cpu"], &[])?;
    let status = idle.term()?;
    ensure!(
        status.code() == Some(0),
        "idle exit {status:?}; log:\n{}",
        idle.log()
    );
    Ok(())
}

#[test]
fn bad_flags_exit_2_before_loading() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    for (args, needle) in [
        (vec!["--max-batch", "0"], "--max-batch"),
        (vec!["--kv-budget", "lots"], "--kv-budget"),
        (vec!["--allow-files", "/no/such/dir"], "--allow-files"),
        (vec!["--host", "256.1.1.1"], "cannot listen"),
        (vec!["--prune", "{\"method\": \"bogus\"}"], "--prune"),
        (vec!["--max-images", "65"], "--max-images"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--model", &model, "--device", "cpu", "--port", "0"])
            .args(&args)
            .output()?;
        visi_tests::expect_error(&out, 2, &[needle]).with_context(|| format!("{args:?}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Hardening (issue 27: items 2, 3 and the serve part of 9)
// ---------------------------------------------------------------------------------------

/// A solid grey PNG of `w` x `h` (compresses to kilobytes however large it decodes).
fn grey_png(w: u32, h: u32) -> Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let px = vec![128u8; w as usize * h as usize];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::NoFilter)
        .write_image(&px, w, h, image::ExtendedColorType::L8)?;
    Ok(out)
}

fn png_url(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// A user message holding `urls` (each an `<image>`) and a question.
fn images_request(urls: &[String], max_tokens: usize) -> Value {
    let mut content: Vec<Value> = urls
        .iter()
        .map(|u| json!({"type": "image_url", "image_url": {"url": u}}))
        .collect();
    content.push(json!({"type": "text", "text": "Describe."}));
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// Peak resident memory of a process so far, in bytes (Linux: `VmHWM`).
fn peak_rss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kb * 1024)
}

#[test]
fn image_memory_is_bounded_per_request_and_in_total() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    // 4 PNGs of 8000 x 8000 (about 1 MB of request): 64 Mpx each, 448 MB each to decode
    // (decoder buffer and RGB copy). Decoding them all on arrival took the server past
    // 1 GB; the default per-request bound (1 GiB) refuses the request from the headers.
    let big = png_url(&grey_png(8000, 8000)?);
    {
        let server = Server::start(&["--model", &model, "--device", "cpu"], &[])?;
        let before = peak_rss(server.child.id())?;
        let resp = server.chat(&images_request(&vec![big.clone(); 4], 2))?;
        check_error(&resp, 413, "4 images of 64 Mpx")?;
        let v = resp.json()?;
        ensure!(
            v["error"]["code"] == "image_memory_limit",
            "413 without its code: {v}"
        );
        let after = peak_rss(server.child.id())?;
        ensure!(
            after < before + (256 << 20),
            "peak RSS {before} -> {after} bytes for a refused request"
        );
        // Still serving, images included.
        let small = png_url(&grey_png(500, 300)?);
        let ok = server.ok(&images_request(&[small], 2))?;
        content(&ok)?;
    }
    {
        // A total that holds one 1000 x 1000 image (7 MB) at a time: with the only batch
        // slot busy, a queued image request holds its reservation and the next gets 429.
        let server = Server::start(
            &[
                "--model",
                &model,
                "--device",
                "cpu",
                "--max-batch",
                "1",
                "--max-image-memory",
                "10MB",
                "--max-request-image-memory",
                "8MB",
            ],
            &[("VISI_DEBUG_TOKEN_DELAY_MS", "40")],
        )?;
        let img = png_url(&grey_png(1000, 1000)?);
        check_error(
            &server.chat(&images_request(&[img.clone(), img.clone()], 2))?,
            413,
            "two images over the per-request bound",
        )?;
        let long = json!({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 40, "stream": true});
        let addr = server.addr.clone();
        let a = std::thread::spawn({
            let addr = addr.clone();
            let b = long.to_string();
            move || http(&addr, "POST", "/v1/chat/completions", &[], b.as_bytes())
        });
        server.wait_metric("visi_active_sequences", |v| v == 1.0)?;
        let b = std::thread::spawn({
            let addr = addr.clone();
            let b = images_request(std::slice::from_ref(&img), 2).to_string();
            move || http(&addr, "POST", "/v1/chat/completions", &[], b.as_bytes())
        });
        server.wait_metric("visi_queue_depth", |v| v == 1.0)?;
        // 1000 x 1000 at 7 bytes a pixel, held while it waits.
        ensure!(
            server.metric("visi_image_bytes_reserved")? == 7e6,
            "reserved {}",
            server.metric("visi_image_bytes_reserved")?
        );
        let c = server.chat(&images_request(std::slice::from_ref(&img), 2))?;
        check_error(&c, 429, "image memory in use")?;
        ensure!(c.header("retry-after").is_some(), "429 without Retry-After");
        ensure!(
            c.json()?["error"]["code"] == "image_memory_full",
            "{}",
            c.text()
        );
        for h in [a, b] {
            let resp = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
            ensure!(resp.status == 200, "{}", resp.text());
        }
        // Given back once encoded: the same request now runs.
        server.ok(&images_request(&[img], 2))?;
        ensure!(
            server.metric("visi_image_bytes_reserved")? == 0.0,
            "image bytes still reserved after every request ended"
        );
    }
    Ok(())
}

/// Writes raw bytes, then reads the whole answer (the server closes after a rejection).
fn raw(addr: &str, bytes: &[u8]) -> Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let w = {
        let mut s = s.try_clone()?;
        let bytes = bytes.to_vec();
        // The server may answer and close before all of it is written.
        std::thread::spawn(move || {
            let _ = s.write_all(&bytes);
        })
    };
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let _ = w.join();
    parse_response(&buf)
}

#[test]
fn requests_hyper_refuses_get_the_json_error_body() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let server = Server::start(&["--model", &model, "--device", "cpu"], &[])?;
    let mut big_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    big_header.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("bad request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("bad method", b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("bad header", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec(), 400),
        (
            "two Content-Lengths",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello".to_vec(),
            400,
        ),
        ("a 1 MB header", big_header, 431),
    ];
    for (what, bytes, status) in cases {
        let resp = raw(&server.addr, &bytes).with_context(|| what.to_string())?;
        check_error(&resp, status, what)?;
        ensure!(
            resp.header("content-type") == Some("application/json"),
            "{what}: content-type {:?}",
            resp.header("content-type")
        );
        let h = http(&server.addr, "GET", "/health", &[], b"")?;
        ensure!(h.status == 200, "{what}: /health {}", h.status);
    }
    // A keep-alive connection: a good request, then a malformed one on the same socket.
    let mut two = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    two.extend_from_slice(b"GARBAGE\r\n\r\n");
    let mut s = TcpStream::connect(&server.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&two)?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let second = text
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(i, _)| &buf[i..])
        .with_context(|| format!("one answer only: {text}"))?;
    check_error(&parse_response(second)?, 400, "malformed after keep-alive")?;
    let m = server.metric("visi_requests_total{outcome=\"bad_request\"}")?;
    ensure!(m >= 6.0, "rejections not counted as bad requests: {m}");
    Ok(())
}

#[test]
fn allow_files_answers_alike_outside_the_directory() -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let allowed = Scratch::new("serve-allow-alike")?;
    let server = Server::start(
        &[
            "--model",
            &model,
            "--device",
            "cpu",
            "--allow-files",
            &allowed.s(),
        ],
        &[],
    )?;
    let exists = fixtures().join("images/square.png");
    ensure!(exists.is_file());
    let missing = fixtures().join("images/no-such-image.png");
    let mut messages = Vec::new();
    for p in [
        exists.to_string_lossy().to_string(),
        missing.to_string_lossy().to_string(),
        format!("{}/../{}", allowed.s(), "nothing-here.png"),
        "missing-inside.png".to_string(),
    ] {
        let resp = server.chat(&images_request(std::slice::from_ref(&p), 2))?;
        check_error(&resp, 400, &p)?;
        let m = resp.json()?["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        ensure!(!m.contains(&p), "the message repeats the path: {m}");
        messages.push(m);
    }
    ensure!(
        messages.iter().all(|m| m == &messages[0]),
        "paths outside --allow-files are told apart: {messages:?}"
    );
    Ok(())
}

/// Runs `serve` with `args` and expects exit 2 before it starts listening; a server that
/// started (the flag was accepted) is killed after `secs` and fails the test.
fn serve_refused(args: &[&str], needle: &str, secs: u64) -> Result<()> {
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let mut child = Command::new(BIN)
        .args(["serve", "--model", &model, "--device", "cpu", "--port", "0"])
        .args(args)
        .env_remove("CI")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("serve {args:?} was accepted and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    visi_tests::expect_error(&out, 2, &[needle]).with_context(|| format!("{args:?}"))
}

#[test]
fn unbounded_durations_queue_0_and_image_memory_flags_exit_2() -> Result<()> {
    let max = u64::MAX.to_string();
    for (args, needle) in [
        (vec!["--read-timeout", max.as_str()], "--read-timeout"),
        (
            vec!["--shutdown-timeout", max.as_str()],
            "--shutdown-timeout",
        ),
        (vec!["--read-timeout", "86401"], "86400"),
        (vec!["--read-timeout", "0"], "--read-timeout"),
        (vec!["--queue", "0"], "--queue"),
        (vec!["--max-image-memory", "lots"], "--max-image-memory"),
        (vec!["--max-image-memory", "0"], "--max-image-memory"),
        (
            vec![
                "--max-image-memory",
                "1GiB",
                "--max-request-image-memory",
                "2GiB",
            ],
            "--max-request-image-memory",
        ),
    ] {
        serve_refused(&args, needle, 120)?;
    }
    Ok(())
}

#[test]
fn the_longest_durations_still_work() -> Result<()> {
    // The bounds themselves: a request is served and SIGTERM ends the server with 0
    // (2^64-1 panicked in both places: hyper's header timer and the drain deadline).
    let model = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let mut server = Server::start(
        &[
            "--model",
            &model,
            "--device",
            "cpu",
            "--read-timeout",
            "86400",
            "--shutdown-timeout",
            "86400",
            "--queue",
            "1",
        ],
        &[],
    )?;
    server.ok(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))?;
    let st = server.term()?;
    ensure!(st.code() == Some(0), "exit {st:?}; log:\n{}", server.log());
    ensure!(!server.log().contains("panicked"), "{}", server.log());
    Ok(())
}

#[test]
fn an_exif_rotated_image_on_llava_next_equals_run_messages() -> Result<()> {
    // The header says 45x31, the EXIF orientation (6) makes it 31x45: sized from the header
    // on arrival, the request is re-counted from the decoded image at admission, so its
    // LLaVA-NeXT tile layout and tokens are those `run --messages` gives.
    let dir = Scratch::new("serve-exif")?;
    let bytes = std::fs::read(fixtures().join("images/corpus/exif_orientation_6.jpg"))?;
    let url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    let msgs = json!([image_message(&url, "What is shown?")]);
    let model = fixtures()
        .join("tiny-next-llama")
        .to_string_lossy()
        .to_string();
    let server = Server::start(&["--model", &model, "--device", "cpu", "--no-prune"], &[])?;
    let flags = vec![
        "--no-prune".to_string(),
        "--max-new-tokens".to_string(),
        "4".to_string(),
    ];
    let want = run_messages(&model, "cpu", &msgs, &flags, &dir)?;
    let got = server.ok(&json!({"messages": msgs, "max_tokens": 4}))?;
    ensure!(
        got["usage"]["prompt_tokens"] == want["prompt_tokens"],
        "prompt tokens {} vs run {}",
        got["usage"]["prompt_tokens"],
        want["prompt_tokens"]
    );
    ensure!(
        got["visi"]["tokens"] == want["tokens"],
        "tokens {} vs run {}",
        got["visi"]["tokens"],
        want["tokens"]
    );
    Ok(())
}

/// The page at `/`, one log line per request, `/metrics` without a made-up KV budget and
/// with the pruning counters, and a 400 naming each OpenAI parameter not implemented.
#[test]
fn page_request_log_pruning_metrics_and_unsupported_params() -> Result<()> {
    let r = references()?
        .into_iter()
        .next()
        .context("no reference fixtures")?;
    let model = r.model_dir.to_string_lossy().to_string();
    let server = Server::start(&["--model", &model, "--device", "cpu"], &[])?;
    let page = http(&server.addr, "GET", "/", &[], b"")?;
    ensure!(page.status == 200, "/: {}", page.status);
    ensure!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "/: {:?}",
        page.header("content-type")
    );
    ensure!(
        page.text().contains("/v1/chat/completions"),
        "not the chat page"
    );
    let m = http(&server.addr, "GET", "/metrics", &[], b"")?.text();
    ensure!(
        !m.contains("visi_kv_budget_bytes") && !m.contains(&u64::MAX.to_string()),
        "/metrics shows a KV budget nobody set:\n{m}"
    );

    let hi = |k: &str, v: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        b[k] = v;
        b
    };
    for (k, v) in [
        ("response_format", json!({"type": "json_object"})),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("logit_bias", json!({"50256": -100})),
        ("presence_penalty", json!(0.5)),
    ] {
        let resp = server.chat(&hi(k, v.clone()))?;
        check_error(&resp, 400, k)?;
        let e = resp.json()?;
        ensure!(e["error"]["param"] == k, "{k}: {e}");
        ensure!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(k)),
            "{k}: {e}"
        );
    }
    // Their neutral values are what the server does anyway: accepted.
    for (k, v) in [
        ("response_format", json!({"type": "text"})),
        ("logprobs", json!(false)),
        ("tools", json!([])),
        ("presence_penalty", json!(0)),
    ] {
        server.ok(&hi(k, v)).with_context(|| k.to_string())?;
    }

    // An image request with pruning: the counters and the log line agree with its answer.
    let p = r
        .prune_runs
        .iter()
        .find(|p| p.case == "square_crop")
        .context("no square_crop pruning run")?;
    let url = data_url(&fixtures().join("images/square.png"))?;
    let got = server.ok(&json!({
        "messages": [image_message(&url, "Describe the image.")],
        "max_tokens": 3,
        "visi": {"prune": p.prune},
    }))?;
    let v = &got["visi"];
    let total = v["image_tokens"].as_u64().context("image_tokens")?;
    let kept = v["pruning"]["kept_image_tokens"]
        .as_array()
        .map_or(total, |k| k.len() as u64);
    ensure!(kept < total, "the config pruned nothing: {v}");
    ensure!(server.metric("visi_image_tokens_total")? == total as f64);
    ensure!(server.metric("visi_kept_image_tokens_total")? == kept as f64);
    let dense = v["flops"]["prefill_dense"].as_u64().context("flops")?;
    let spent = v["flops"]["prefill"].as_u64().context("flops")?;
    ensure!(dense > spent);
    ensure!(server.metric("visi_prefill_flops_saved_total")? == (dense - spent) as f64);

    // The lines are written before the responses; the reader thread may lag behind.
    let count = |log: &str| {
        log.lines()
            .filter(|l| l.starts_with("serve: request chatcmpl-"))
            .count()
    };
    let t0 = Instant::now();
    while count(&server.log()) < 12 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("serve: request chatcmpl-"))
        .collect();
    ensure!(lines.len() == 7 + 4 + 1, "one line per request:\n{log}");
    ensure!(
        lines[..7].iter().all(|l| l.contains(" status=400 ")),
        "{log}"
    );
    let id = got["id"].as_str().context("id")?;
    let last = lines[11];
    for want in [
        format!("serve: request {id} status=200 stream=false"),
        format!("prompt_tokens={}", got["usage"]["prompt_tokens"]),
        format!("completion_tokens={}", got["usage"]["completion_tokens"]),
        format!("kept_image_tokens={kept}/{total}"),
        "ttft_ms=".to_string(),
        format!("prune={}", v["pruning"]["method"].as_str().unwrap_or("?")),
    ] {
        ensure!(last.contains(&want), "{want:?} not in {last:?}");
    }
    Ok(())
}

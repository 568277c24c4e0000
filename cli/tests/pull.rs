//! `visi-cli pull` end to end against a fake Hugging Face hub on loopback: the hub's URL
//! layout (`/api/models/REPO/revision/REV`, `/REPO/resolve/REV/FILE`), its metadata
//! headers (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, as huggingface_hub's
//! `file_download.py` reads them), LFS files redirected to a second server (a "CDN" on
//! another port, which must never see the token), a connection dropped mid-file (resumed
//! with `Range`), a wrong checksum, a private repo, missing files and no network.
//!
//! The expected blob names are computed by tools nobody here wrote: `sha256sum` for LFS
//! files and `git hash-object` for small ones (the hub's ETags).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use visi_tests::{expect_error, fixtures, Scratch};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "test-org/tiny-llava";
const TOKEN: &str = "hf_test_token";

/// One request as the servers saw it.
#[derive(Clone, Debug)]
struct Seen {
    server: &'static str,
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Knobs {
    /// The hub answers 401 unless this bearer token comes.
    require_token: Option<String>,
    /// Drop the connection after this many bytes of the first GET of this file.
    drop_once: Option<(String, usize)>,
    /// Serve this file with one byte flipped (headers unchanged).
    corrupt: Option<String>,
}

struct RepoFiles {
    /// name → (bytes, stored in LFS)
    files: BTreeMap<String, (Vec<u8>, bool)>,
    /// Listed by the API but never needed (must not be fetched).
    extra: Vec<String>,
}

struct State {
    repos: BTreeMap<String, RepoFiles>,
    knobs: Knobs,
    seen: Vec<Seen>,
    cdn_port: u16,
}

fn sha256sum(bytes: &[u8]) -> Result<String> {
    let mut c = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("sha256sum")?;
    c.stdin.take().context("stdin")?.write_all(bytes)?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?[..64].to_string())
}

fn git_blob_sha1(bytes: &[u8]) -> Result<String> {
    let mut c = Command::new("git")
        .args(["hash-object", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("git hash-object")?;
    c.stdin.take().context("stdin")?.write_all(bytes)?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The hub's ETag of a file: sha256 for LFS, git blob sha1 otherwise.
fn etag(bytes: &[u8], lfs: bool) -> Result<String> {
    if lfs {
        sha256sum(bytes)
    } else {
        git_blob_sha1(bytes)
    }
}

struct FakeHub {
    state: Arc<Mutex<State>>,
    port: u16,
    /// Precomputed etags: name → etag.
    etags: BTreeMap<String, String>,
}

fn fixture_repo() -> Result<RepoFiles> {
    let dir = fixtures().join("tiny-llava-mha");
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let bytes = std::fs::read(e.path())?;
        let lfs = name.ends_with(".safetensors");
        files.insert(name, (bytes, lfs));
    }
    Ok(RepoFiles {
        files,
        extra: vec!["README.md".into(), "pytorch_model.bin".into()],
    })
}

impl FakeHub {
    fn start(repos: Vec<(&str, RepoFiles)>, knobs: Knobs) -> Result<FakeHub> {
        let hub = TcpListener::bind("127.0.0.1:0")?;
        let cdn = TcpListener::bind("127.0.0.1:0")?;
        let mut etags = BTreeMap::new();
        for (_, r) in &repos {
            for (name, (bytes, lfs)) in &r.files {
                etags.insert(name.clone(), etag(bytes, *lfs)?);
            }
        }
        let state = Arc::new(Mutex::new(State {
            repos: repos.into_iter().map(|(n, r)| (n.to_string(), r)).collect(),
            knobs,
            seen: Vec::new(),
            cdn_port: cdn.local_addr()?.port(),
        }));
        let port = hub.local_addr()?.port();
        for (listener, name) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            let etags = etags.clone();
            std::thread::spawn(move || {
                for s in listener.incoming().flatten() {
                    let state = state.clone();
                    let etags = etags.clone();
                    std::thread::spawn(move || {
                        let _ = serve_one(s, name, &state, &etags);
                    });
                }
            });
        }
        Ok(FakeHub { state, port, etags })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve_one(
    mut s: TcpStream,
    server: &'static str,
    state: &Mutex<State>,
    etags: &BTreeMap<String, String>,
) -> Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut range = None;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        server,
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        auth: auth.clone(),
    });
    let head = method == "HEAD";
    let h = |k: &str, v: String| (k.to_string(), v);
    if server == "hub" {
        if let Some(t) = &st.knobs.require_token {
            if auth.as_deref() != Some(&format!("Bearer {t}")) {
                let body = br#"{"error":"Invalid credentials in Authorization header"}"#;
                respond(
                    &mut s,
                    "401 Unauthorized",
                    &[h("Content-Length", body.len().to_string())],
                    body,
                );
                return Ok(());
            }
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let (repo, rev) = rest.split_once("/revision/").unwrap_or((rest, ""));
            let Some(files) = st.repos.get(repo) else {
                respond(
                    &mut s,
                    "404 Not Found",
                    &[h("Content-Length", "0".into())],
                    b"",
                );
                return Ok(());
            };
            ensure!(rev == "main" || rev == COMMIT, "revision {rev}");
            let mut siblings: Vec<serde_json::Value> = files
                .files
                .keys()
                .chain(files.extra.iter())
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            siblings.reverse();
            let body =
                serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings }).to_string();
            respond(
                &mut s,
                "200 OK",
                &[
                    h("Content-Type", "application/json".into()),
                    h("Content-Length", body.len().to_string()),
                ],
                body.as_bytes(),
            );
            return Ok(());
        }
        // /ORG/NAME/resolve/REV/FILE
        let Some((repo, rest)) = path[1..]
            .split_once("/resolve/")
            .map(|(r, x)| (r.to_string(), x.to_string()))
        else {
            respond(
                &mut s,
                "404 Not Found",
                &[h("Content-Length", "0".into())],
                b"",
            );
            return Ok(());
        };
        let (_rev, file) = rest.split_once('/').unwrap_or((&rest, ""));
        let Some((bytes, lfs)) = st.repos.get(&repo).and_then(|r| r.files.get(file)).cloned()
        else {
            respond(
                &mut s,
                "404 Not Found",
                &[h("Content-Length", "0".into())],
                b"",
            );
            return Ok(());
        };
        let tag = etags[file].clone();
        if lfs {
            // As the hub does: a 302 to the CDN carrying the LFS metadata.
            let loc = format!("http://127.0.0.1:{}/cdn/{file}", st.cdn_port);
            respond(
                &mut s,
                "302 Found",
                &[
                    h("Location", loc),
                    h("X-Repo-Commit", COMMIT.into()),
                    h("ETag", "\"not-the-lfs-etag\"".into()),
                    h("X-Linked-Etag", format!("\"{tag}\"")),
                    h("X-Linked-Size", bytes.len().to_string()),
                    h("Content-Length", "0".into()),
                ],
                b"",
            );
            return Ok(());
        }
        let body = if head { &[][..] } else { &bytes[..] };
        respond(
            &mut s,
            "200 OK",
            &[
                h("X-Repo-Commit", COMMIT.into()),
                h("ETag", format!("\"{tag}\"")),
                h("Content-Length", bytes.len().to_string()),
            ],
            body,
        );
        return Ok(());
    }
    // The CDN: /cdn/FILE with Range support.
    let file = path.strip_prefix("/cdn/").unwrap_or("").to_string();
    let Some((mut bytes, _)) = st.repos.values().find_map(|r| r.files.get(&file)).cloned() else {
        respond(
            &mut s,
            "404 Not Found",
            &[h("Content-Length", "0".into())],
            b"",
        );
        return Ok(());
    };
    if st.knobs.corrupt.as_deref() == Some(&file) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
    }
    let drop_at = match &st.knobs.drop_once {
        Some((f, n)) if *f == file && !head => {
            let n = *n;
            st.knobs.drop_once = None;
            Some(n)
        }
        _ => None,
    };
    drop(st);
    let total = bytes.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, from) = match start {
        Some(n) if n < total => ("206 Partial Content", n),
        Some(_) => {
            respond(
                &mut s,
                "416 Range Not Satisfiable",
                &[h("Content-Length", "0".into())],
                b"",
            );
            return Ok(());
        }
        None => ("200 OK", 0),
    };
    let mut headers = vec![h("Content-Length", (total - from).to_string())];
    if from > 0 {
        headers.push(h(
            "Content-Range",
            format!("bytes {from}-{}/{total}", total - 1),
        ));
    }
    let body = &bytes[from..];
    match drop_at {
        Some(n) => {
            respond(&mut s, status, &headers, &body[..n.min(body.len())]);
            let _ = s.flush();
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        None => respond(&mut s, status, &headers, if head { &[] } else { body }),
    }
    Ok(())
}

fn visi(args: &[&str], env: &[(&str, String)]) -> Result<Output> {
    let mut c = visi_tests::visi_command(Path::new(env!("CARGO_BIN_EXE_visi-cli")));
    c.args(args)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .env("HF_TOKEN_PATH", "/nonexistent/token");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().context("running visi-cli")
}

fn env(hub: &FakeHub, cache: &Scratch) -> Vec<(&'static str, String)> {
    vec![("HF_ENDPOINT", hub.endpoint()), ("HF_HUB_CACHE", cache.s())]
}

/// Every file and symlink under `dir` (relative paths).
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn repo_dir(cache: &Scratch) -> PathBuf {
    cache.path().join("models--test-org--tiny-llava")
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
        "What is this?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn pulls_only_what_the_model_needs_in_the_hub_layout() -> Result<()> {
    let hub = FakeHub::start(
        vec![(REPO, fixture_repo()?)],
        Knobs {
            require_token: Some(TOKEN.into()),
            ..Knobs::default()
        },
    )?;
    let cache = Scratch::new("pull-layout")?;
    let mut e = env(&hub, &cache);
    e.push(("HF_TOKEN", TOKEN.into()));
    let out = visi(&["pull", REPO], &e)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "pull failed: {stderr}");
    let snap = repo_dir(&cache).join("snapshots").join(COMMIT);
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == snap.to_string_lossy(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The layout huggingface_hub writes: blobs named by etag, snapshot symlinks, refs/main.
    let fixture = fixture_repo()?;
    let mut want = vec!["refs/main".to_string()];
    for name in fixture.files.keys() {
        want.push(format!("blobs/{}", hub.etags[name]));
        want.push(format!("snapshots/{COMMIT}/{name}"));
    }
    want.sort();
    ensure!(
        entries(&repo_dir(&cache)) == want,
        "cache holds {:?}, want {want:?}",
        entries(&repo_dir(&cache))
    );
    ensure!(std::fs::read_to_string(repo_dir(&cache).join("refs/main"))? == COMMIT);
    for (name, (bytes, _)) in &fixture.files {
        let p = snap.join(name);
        ensure!(
            std::fs::symlink_metadata(&p)?.file_type().is_symlink(),
            "{name} is not a link"
        );
        ensure!(
            std::fs::read(&p)? == *bytes,
            "{name} differs from the fixture"
        );
    }
    let seen = hub.seen();
    for extra in ["README.md", "pytorch_model.bin"] {
        ensure!(
            !seen.iter().any(|s| s.path.ends_with(extra)),
            "fetched {extra}"
        );
    }
    // The token goes to the hub, never to the CDN the LFS file was redirected to.
    ensure!(
        seen.iter().any(|s| s.server == "cdn"),
        "no LFS redirect followed"
    );
    for s in &seen {
        match s.server {
            "hub" => ensure!(s.auth.as_deref() == Some("Bearer hf_test_token"), "{s:?}"),
            _ => ensure!(s.auth.is_none(), "the CDN saw the token: {s:?}"),
        }
    }

    // Everything cached: a second pull only asks for metadata.
    let before = hub.seen().len();
    let out = visi(&["pull", REPO], &e)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again: Vec<Seen> = hub.seen()[before..].to_vec();
    ensure!(
        again
            .iter()
            .all(|s| s.method != "GET" || s.path.starts_with("/api/")),
        "a cached file was downloaded again: {again:?}"
    );

    // `run --model ORG/NAME` finds it and answers as from the fixture directory.
    let a = run_args(REPO);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let from_cache = visi(&a, &e)?;
    ensure!(
        from_cache.status.success(),
        "{}",
        String::from_utf8_lossy(&from_cache.stderr)
    );
    let dir = fixtures()
        .join("tiny-llava-mha")
        .to_string_lossy()
        .to_string();
    let b = run_args(&dir);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let from_dir = visi(&b, &e)?;
    ensure!(from_dir.status.success());
    ensure!(from_cache.stdout == from_dir.stdout, "answers differ");
    Ok(())
}

#[test]
fn run_says_how_to_pull_and_pulls_with_the_flag() -> Result<()> {
    let hub = FakeHub::start(vec![(REPO, fixture_repo()?)], Knobs::default())?;
    let cache = Scratch::new("pull-flag")?;
    let e = env(&hub, &cache);
    let a = run_args(REPO);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = visi(&a, &e)?;
    expect_error(&out, 2, &["visi-cli pull test-org/tiny-llava", "--pull"])?;
    ensure!(
        hub.seen().is_empty(),
        "run without --pull went to the network"
    );
    let mut with = a.clone();
    with.push("--pull");
    let out = visi(&with, &e)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.stdout.is_empty());
    ensure!(repo_dir(&cache).join("refs/main").is_file());
    Ok(())
}

#[test]
fn a_dropped_connection_is_resumed_with_range() -> Result<()> {
    let st = "model.safetensors".to_string();
    let hub = FakeHub::start(
        vec![(REPO, fixture_repo()?)],
        Knobs {
            drop_once: Some((st.clone(), 1_000_000)),
            ..Knobs::default()
        },
    )?;
    let cache = Scratch::new("pull-resume")?;
    let out = visi(&["pull", REPO], &env(&hub, &cache))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gets: Vec<Seen> = hub
        .seen()
        .into_iter()
        .filter(|s| s.server == "cdn" && s.method == "GET")
        .collect();
    ensure!(gets.len() == 2, "{gets:?}");
    ensure!(gets[0].range.is_none(), "{gets:?}");
    ensure!(
        gets[1].range.as_deref() == Some("bytes=1000000-"),
        "{gets:?}"
    );
    let fixture = fixture_repo()?;
    let blob = repo_dir(&cache).join("blobs").join(&hub.etags[&st]);
    ensure!(
        std::fs::read(&blob)? == fixture.files[&st].0,
        "resumed blob differs"
    );

    // A partial file a killed pull left behind is resumed too.
    let cache = Scratch::new("pull-resume2")?;
    let blobs = repo_dir(&cache).join("blobs");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(
        blobs.join(format!("{}.incomplete", hub.etags[&st])),
        &fixture.files[&st].0[..12345],
    )?;
    let before = hub.seen().len();
    let out = visi(&["pull", REPO], &env(&hub, &cache))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gets: Vec<Seen> = hub.seen()[before..]
        .iter()
        .filter(|s| s.server == "cdn" && s.method == "GET")
        .cloned()
        .collect();
    ensure!(
        gets.len() == 1 && gets[0].range.as_deref() == Some("bytes=12345-"),
        "{gets:?}"
    );
    ensure!(std::fs::read(blobs.join(&hub.etags[&st]))? == fixture.files[&st].0);
    ensure!(!entries(&blobs).iter().any(|f| f.ends_with(".incomplete")));
    Ok(())
}

#[test]
fn a_wrong_checksum_leaves_nothing() -> Result<()> {
    let hub = FakeHub::start(
        vec![(REPO, fixture_repo()?)],
        Knobs {
            corrupt: Some("model.safetensors".into()),
            ..Knobs::default()
        },
    )?;
    let cache = Scratch::new("pull-corrupt")?;
    let out = visi(&["pull", REPO], &env(&hub, &cache))?;
    expect_error(&out, 2, &["model.safetensors", "checksum"])?;
    ensure!(
        entries(cache.path()).is_empty(),
        "left behind: {:?}",
        entries(cache.path())
    );
    ensure!(!repo_dir(&cache).exists(), "the repo directory was left");
    Ok(())
}

#[test]
fn private_missing_and_offline_are_one_error_line_each() -> Result<()> {
    let mut no_tok = fixture_repo()?;
    no_tok.files.remove("tokenizer.json");
    let mut sharded = fixture_repo()?;
    let st = sharded.files.remove("model.safetensors").unwrap();
    sharded
        .files
        .insert("model-00001-of-00002.safetensors".into(), st);
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors"
        }
    });
    sharded.files.insert(
        "model.safetensors.index.json".into(),
        (index.to_string().into_bytes(), false),
    );
    let hub = FakeHub::start(
        vec![
            (REPO, fixture_repo()?),
            ("test-org/no-tokenizer", no_tok),
            ("test-org/sharded", sharded),
        ],
        Knobs::default(),
    )?;
    let cache = Scratch::new("pull-errors")?;
    let e = env(&hub, &cache);
    let out = visi(&["pull", "test-org/no-tokenizer"], &e)?;
    expect_error(&out, 2, &["test-org/no-tokenizer", "tokenizer.json"])?;
    ensure!(
        entries(cache.path()).is_empty(),
        "{:?}",
        entries(cache.path())
    );
    // The index names a shard the repo lacks: found after the index is in, undone.
    let out = visi(&["pull", "test-org/sharded"], &e)?;
    expect_error(&out, 2, &["model-00002-of-00002.safetensors"])?;
    ensure!(
        entries(cache.path()).is_empty(),
        "{:?}",
        entries(cache.path())
    );
    ensure!(
        std::fs::read_dir(cache.path())?.next().is_none(),
        "directories left"
    );
    let out = visi(&["pull", "test-org/no-such-repo"], &e)?;
    expect_error(&out, 2, &["test-org/no-such-repo", "404"])?;

    // Private: 401 without a token, and with a wrong one.
    let private = FakeHub::start(
        vec![(REPO, fixture_repo()?)],
        Knobs {
            require_token: Some(TOKEN.into()),
            ..Knobs::default()
        },
    )?;
    let e = env(&private, &cache);
    let out = visi(&["pull", REPO], &e)?;
    expect_error(&out, 2, &["401", "HF_TOKEN"])?;
    let mut wrong = e.clone();
    wrong.push(("HF_TOKEN", "hf_wrong".into()));
    let out = visi(&["pull", REPO], &wrong)?;
    expect_error(&out, 2, &["401", "no access"])?;
    ensure!(
        std::fs::read_dir(cache.path())?.next().is_none(),
        "left behind"
    );

    // No network: nothing listens on the endpoint.
    let closed = TcpListener::bind("127.0.0.1:0")?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let out = visi(
        &["pull", REPO],
        &[
            ("HF_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("HF_HUB_CACHE", cache.s()),
        ],
    )?;
    expect_error(&out, 2, &["cannot reach"])?;
    // Offline: no request at all.
    let before = private.seen().len();
    let mut off = e.clone();
    off.push(("HF_HUB_OFFLINE", "1".into()));
    let out = visi(&["pull", REPO], &off)?;
    expect_error(&out, 2, &["HF_HUB_OFFLINE"])?;
    ensure!(
        private.seen().len() == before,
        "offline pull went to the network"
    );
    ensure!(
        std::fs::read_dir(cache.path())?.next().is_none(),
        "left behind"
    );
    // Not a repo id.
    let out = visi(&["pull", "not-a-repo"], &e)?;
    expect_error(&out, 2, &["not-a-repo"])?;
    Ok(())
}

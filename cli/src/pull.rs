//! `pull ORG/NAME[@REV]`: downloads the files a model needs from the Hugging Face hub into
//! the hub's cache layout (`models--ORG--NAME/{blobs,snapshots/<commit>,refs/<rev>}`), as
//! `huggingface_hub` lays it out, so `--model ORG/NAME` (and Python's tools) find it.
//!
//! What is fetched: `config.json`, `tokenizer.json`, `preprocessor_config.json` (all
//! required), the small optional files beside them, and the weights (`model.safetensors`,
//! or `model.safetensors.index.json` and every shard it names); with `--gguf QUANT`, one
//! GGUF text model and its `mmproj` file instead.
//!
//! The protocol is `huggingface_hub`'s (`file_download.py`): `GET /api/models/REPO/revision/REV`
//! lists the files and names the commit; `HEAD /REPO/resolve/COMMIT/FILE` gives the file's
//! `X-Linked-Etag`/`ETag` (the blob name: an LFS file's sha256, or a small file's git blob
//! sha1) and `X-Linked-Size`/`Content-Length`; `GET` of the same URL (following redirects,
//! the bearer token only to the hub itself) streams it into `blobs/<etag>.incomplete`,
//! resumed with `Range` after a dropped connection (and when a killed pull left that file),
//! then the size and the checksum are checked and the file renamed to `blobs/<etag>` and
//! linked from `snapshots/<commit>/FILE`. `refs/<rev>` is written last.
//!
//! A failure (no network, 401/403, a missing file, a wrong checksum) is one `error:` line,
//! exit 2, and removes everything this pull wrote: the cache is left as it was found.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha1::Digest as _;

use crate::errors::{bad_input, internal, Failure};

/// `visi-cli pull` flags.
#[derive(clap::Args, Clone)]
pub struct PullArgs {
    /// The repo (`llava-hf/llava-1.5-7b-hf`), optionally at a branch, tag or commit (`@REV`,
    /// default `main`).
    pub repo: String,
    /// Fetch a GGUF pair instead of safetensors: the `.gguf` text model whose name contains
    /// QUANT (`Q4_K_M`, case-insensitive) and the repo's `mmproj` file.
    #[arg(long, value_name = "QUANT")]
    pub gguf: Option<String>,
    /// With --gguf, the mmproj file to take when the repo has several.
    #[arg(long, value_name = "FILE", requires = "gguf")]
    pub mmproj: Option<String>,
}

/// Most bytes of a `/api/models` answer read (a listing of 10k files is well under this).
const MAX_API_BYTES: u64 = 16 << 20;
/// Most bytes of `model.safetensors.index.json`.
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;
/// Tries of one file download (each retry resumes where the last stopped).
const TRIES: usize = 5;

/// Files read by the loader: a model is not usable without them.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "preprocessor_config.json"];
/// Small files taken when the repo has them.
const OPTIONAL: [&str; 7] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "added_tokens.json",
];
const SINGLE: &str = engine_core::weights::SINGLE_FILE;
const INDEX: &str = engine_core::weights::INDEX_FILE;

pub fn pull(a: PullArgs) -> Result<(), Failure> {
    let (repo, rev) = parse_spec(&a.repo).map_err(bad_input)?;
    let cache = models::hub::hub_cache_dir().ok_or_else(|| {
        bad_input(anyhow!(
            "no Hugging Face cache location is known (set HF_HOME or HF_HUB_CACHE)"
        ))
    })?;
    let hub = Hub::from_env();
    let got = pull_into(
        &hub,
        &cache,
        &repo,
        &rev,
        a.gguf.as_deref(),
        a.mmproj.as_deref(),
    )?;
    let mut out = String::new();
    for p in &got.print {
        out.push_str(&format!("{}\n", p.display()));
    }
    crate::validate::print_stdout(&out)
}

/// What a pull left in the cache.
pub struct Pulled {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// What to print: the snapshot directory, or the two GGUF files.
    pub print: Vec<PathBuf>,
}

/// `--pull` for `run`/`chat`/`serve`: fetches `spec` (a repo id) with the default file
/// set, then the caller resolves it again.
pub fn pull_for_model(spec: &str) -> Result<PathBuf, Failure> {
    let (repo, rev) = parse_spec(spec).map_err(bad_input)?;
    let cache = models::hub::hub_cache_dir().ok_or_else(|| {
        bad_input(anyhow!(
            "no Hugging Face cache location is known (set HF_HOME or HF_HUB_CACHE)"
        ))
    })?;
    Ok(pull_into(&Hub::from_env(), &cache, &repo, &rev, None, None)?.snapshot)
}

/// Resolves `--model` (a directory or a cached repo id); with `pull`, a repo id that is not
/// cached is downloaded first.
pub fn resolve_or_pull(spec: &str, pull: bool) -> Result<PathBuf, Failure> {
    match models::hub::resolve_model(spec) {
        Ok(p) => Ok(p),
        Err(_) if pull && models::hub::looks_like_repo_id(spec) && !Path::new(spec).exists() => {
            pull_for_model(spec)
        }
        Err(e) => Err(bad_input(anyhow!("--model: {e}"))),
    }
}

/// `ORG/NAME[@REV]` → (repo id, revision).
fn parse_spec(spec: &str) -> anyhow::Result<(String, String)> {
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, v),
        None => (spec, "main"),
    };
    if !models::hub::looks_like_repo_id(repo) {
        return Err(anyhow!(
            "`{spec}` is not a repo id (ORG/NAME, optionally @REVISION)"
        ));
    }
    let rev_ok = !rev.is_empty()
        && rev.len() <= 256
        && !rev.starts_with('/')
        && !rev.ends_with('/')
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !rev_ok {
        return Err(anyhow!(
            "`{rev}` is not a revision (a branch, tag or commit)"
        ));
    }
    Ok((repo.to_string(), rev.to_string()))
}

/// Whether `HF_HUB_OFFLINE` asks for no network (as huggingface_hub reads it).
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// The hub: endpoint, token, HTTP agent.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Hub {
    /// `HF_ENDPOINT` (default `https://huggingface.co`) and `HF_TOKEN` (else the token
    /// file `huggingface-cli login` writes: `$HF_TOKEN_PATH`, else `$HF_HOME/token`).
    pub fn from_env() -> Hub {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim()
            .trim_end_matches('/')
            .to_string();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(token_file);
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("visi-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint,
            token,
            agent,
        }
    }

    /// One request; redirects followed by hand (the token goes only to the hub's origin).
    /// `follow_all`: also redirects to other origins (a CDN), else only relative ones.
    fn request(
        &self,
        method: &str,
        url: &str,
        range_from: Option<u64>,
        follow_all: bool,
    ) -> Result<ureq::Response, HttpError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self
                .agent
                .request(method, &url)
                .set("Accept-Encoding", "identity");
            if let Some(t) = &self.token {
                if origin(&url) == origin(&self.endpoint) {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
            }
            if let Some(from) = range_from.filter(|&f| f > 0) {
                req = req.set("Range", &format!("bytes={from}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, _)) => return Err(HttpError::Status(code)),
                Err(ureq::Error::Transport(t)) => return Err(HttpError::Network(t.to_string())),
            };
            if !(300..400).contains(&resp.status()) {
                return Ok(resp);
            }
            let Some(loc) = resp.header("Location").map(str::to_string) else {
                return Err(HttpError::Protocol(format!(
                    "{} {url}: redirect without a Location",
                    resp.status()
                )));
            };
            // As huggingface_hub's HEAD: only relative redirects (a renamed repo) are
            // followed for metadata; the one to the CDN carries the LFS headers.
            if !follow_all && loc.contains("://") {
                return Ok(resp);
            }
            let next = join_url(&url, &loc);
            url = next;
        }
        Err(HttpError::Protocol(format!("{url}: too many redirects")))
    }
}

/// `huggingface-cli login`'s token file.
fn token_file() -> Option<String> {
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| {
            let hf_home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
                std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface"))
            })?;
            Some(hf_home.join("token"))
        })?;
    let t = engine_core::files::read_text_limited(&path, 4096).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

enum HttpError {
    Status(u16),
    Network(String),
    Protocol(String),
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// A redirect's `Location` against the URL that answered it.
fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        loc.to_string()
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin(base))
    } else {
        let dir = base.rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{loc}")
    }
}

/// Percent-encodes a path segment (`keep_slash`: `/` stays, for file paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the hub said about the repo at the revision.
struct RepoInfo {
    commit: String,
    files: Vec<String>,
}

/// A plain path component (a commit hash, an etag): nothing a path could be built from.
fn plain_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A repo file name that stays inside the snapshot directory.
fn safe_repo_path(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= 1024
        && !f.starts_with('/')
        && !f.contains('\\')
        && !f.contains('\0')
        && f.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn network_error(hub: &Hub, e: &str) -> Failure {
    bad_input(anyhow!(
        "cannot reach the hub at {}: {e} (no network? with HF_HUB_OFFLINE=1 only the local cache is used)",
        hub.endpoint
    ))
}

fn status_error(hub: &Hub, repo: &str, what: &str, code: u16) -> Failure {
    let msg = match code {
        401 | 403 if hub.token.is_none() => format!(
            "{repo}: the hub refused {what} ({code}): the repo is private or gated, or does not exist; set HF_TOKEN to a token with access"
        ),
        401 | 403 => format!(
            "{repo}: the hub refused {what} ({code}) with the HF_TOKEN given: the token has no access to this repo (gated: accept its terms on the hub)"
        ),
        404 => format!("{repo}: {what} not found on the hub ({code}): check the repo id and revision"),
        _ => format!("{repo}: the hub answered {code} for {what}"),
    };
    bad_input(anyhow!(msg))
}

fn repo_info(hub: &Hub, repo: &str, rev: &str) -> Result<RepoInfo, Failure> {
    let url = format!(
        "{}/api/models/{repo}/revision/{}",
        hub.endpoint,
        encode(rev, false)
    );
    let resp = match hub.request("GET", &url, None, true) {
        Ok(r) => r,
        Err(HttpError::Status(code)) => {
            return Err(status_error(hub, repo, &format!("revision `{rev}`"), code))
        }
        Err(HttpError::Network(e)) => return Err(network_error(hub, &e)),
        Err(HttpError::Protocol(e)) => return Err(bad_input(anyhow!("{repo}: {e}"))),
    };
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_API_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| network_error(hub, &e.to_string()))?;
    if body.len() as u64 > MAX_API_BYTES {
        return Err(bad_input(anyhow!(
            "{repo}: the hub's file listing is over {MAX_API_BYTES} bytes"
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| bad_input(anyhow!("{repo}: the hub's file listing is not JSON: {e}")))?;
    let commit = v["sha"].as_str().unwrap_or("").to_string();
    if !plain_component(&commit) {
        return Err(bad_input(anyhow!(
            "{repo}: the hub's answer names no commit (`sha`)"
        )));
    }
    let files = v["siblings"]
        .as_array()
        .ok_or_else(|| {
            bad_input(anyhow!(
                "{repo}: the hub's answer lists no files (`siblings`)"
            ))
        })?
        .iter()
        .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
        .collect();
    Ok(RepoInfo { commit, files })
}

/// The files to fetch besides the index's shards (which are known once the index is in).
fn choose_files(
    repo: &str,
    files: &[String],
    gguf: Option<&str>,
    mmproj: Option<&str>,
) -> Result<Vec<String>, Failure> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if let Some(q) = gguf {
        let q = q.to_ascii_lowercase();
        let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
        let is_proj = |f: &str| f.to_ascii_lowercase().contains("mmproj");
        let text: Vec<&&String> = ggufs
            .iter()
            .filter(|f| !is_proj(f) && f.to_ascii_lowercase().contains(&q))
            .collect();
        let all_text: Vec<&str> = ggufs
            .iter()
            .filter(|f| !is_proj(f))
            .map(|f| f.as_str())
            .collect();
        let text = match text.as_slice() {
            [one] => one.to_string(),
            [] => {
                return Err(bad_input(anyhow!(
                    "{repo}: no GGUF text model matches `--gguf {q}` (the repo has: {})",
                    if all_text.is_empty() {
                        "none".into()
                    } else {
                        all_text.join(", ")
                    }
                )))
            }
            many => {
                return Err(bad_input(anyhow!(
                    "{repo}: `--gguf {q}` matches {} files ({}): name one more precisely",
                    many.len(),
                    many.iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let projs: Vec<&str> = ggufs
            .iter()
            .filter(|f| is_proj(f))
            .map(|f| f.as_str())
            .collect();
        let proj = match (mmproj, projs.as_slice()) {
            (Some(m), _) if projs.contains(&m) => m.to_string(),
            (Some(m), _) => {
                return Err(bad_input(anyhow!(
                    "{repo}: --mmproj {m} is not in the repo (its mmproj files: {})",
                    if projs.is_empty() {
                        "none".into()
                    } else {
                        projs.join(", ")
                    }
                )))
            }
            (None, [one]) => one.to_string(),
            (None, []) => {
                return Err(bad_input(anyhow!(
                    "{repo}: no mmproj GGUF (CLIP tower and projector) in the repo"
                )))
            }
            (None, many) => {
                return Err(bad_input(anyhow!(
                    "{repo}: several mmproj files ({}): choose one with --mmproj",
                    many.join(", ")
                )))
            }
        };
        return Ok(vec![text, proj]);
    }
    let mut missing: Vec<&str> = REQUIRED.iter().copied().filter(|f| !has(f)).collect();
    let weights = if has(INDEX) {
        Some(INDEX)
    } else if has(SINGLE) {
        Some(SINGLE)
    } else {
        None
    };
    if weights.is_none() {
        missing.push("model.safetensors (or its index)");
    }
    if !missing.is_empty() {
        let gguf_hint = if files.iter().any(|f| f.ends_with(".gguf")) {
            " (it has GGUF files: pull them with --gguf QUANT)"
        } else {
            ""
        };
        return Err(bad_input(anyhow!(
            "{repo} lacks what a LLaVA model needs: {}{gguf_hint}",
            missing.join(", ")
        )));
    }
    let mut want: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    want.extend(OPTIONAL.iter().filter(|f| has(f)).map(|s| s.to_string()));
    want.extend(weights.map(str::to_string));
    Ok(want)
}

/// Everything a pull created, removed again when it fails.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    done: bool,
}

impl Undo {
    /// `create_dir_all`, remembering the directories it made.
    fn mkdirs(&mut self, d: &Path) -> std::io::Result<()> {
        let mut new = Vec::new();
        let mut cur = Some(d);
        while let Some(c) = cur {
            if c.as_os_str().is_empty() || c.exists() {
                break;
            }
            new.push(c.to_path_buf());
            cur = c.parent();
        }
        std::fs::create_dir_all(d)?;
        self.dirs.extend(new.into_iter().rev());
        Ok(())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// One file's metadata from its HEAD.
struct FileMeta {
    etag: String,
    size: u64,
}

fn file_meta(hub: &Hub, repo: &str, commit: &str, file: &str) -> Result<FileMeta, Failure> {
    let url = format!(
        "{}/{repo}/resolve/{commit}/{}",
        hub.endpoint,
        encode(file, true)
    );
    let resp = match hub.request("HEAD", &url, None, false) {
        Ok(r) => r,
        Err(HttpError::Status(code)) => return Err(status_error(hub, repo, file, code)),
        Err(HttpError::Network(e)) => return Err(network_error(hub, &e)),
        Err(HttpError::Protocol(e)) => return Err(bad_input(anyhow!("{repo}: {e}"))),
    };
    let etag = resp
        .header("X-Linked-Etag")
        .or_else(|| resp.header("ETag"))
        .unwrap_or("");
    let etag = etag
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string();
    if !plain_component(&etag) {
        return Err(bad_input(anyhow!(
            "{repo}: {file}: the hub sent no usable ETag (got {etag:?})"
        )));
    }
    let size = resp
        .header("X-Linked-Size")
        .or_else(|| resp.header("Content-Length"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| bad_input(anyhow!("{repo}: {file}: the hub sent no file size")))?;
    if let Some(c) = resp.header("X-Repo-Commit") {
        if c != commit {
            return Err(bad_input(anyhow!(
                "{repo}: {file}: the hub served commit {c}, not {commit}"
            )));
        }
    }
    Ok(FileMeta { etag, size })
}

/// Streams `file` into `part` (appending from its current length), retrying with `Range`
/// after a dropped connection. The caller checks size and checksum.
fn download(
    hub: &Hub,
    repo: &str,
    commit: &str,
    file: &str,
    part: &Path,
    size: u64,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let url = format!(
        "{}/{repo}/resolve/{commit}/{}",
        hub.endpoint,
        encode(file, true)
    );
    let mut last_err = String::new();
    let base = bar.position();
    for attempt in 0..TRIES {
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > size {
            std::fs::write(part, b"").map_err(|e| internal(anyhow!("{}: {e}", part.display())))?;
            continue;
        }
        if have == size {
            return Ok(());
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
        }
        let resp = match hub.request("GET", &url, Some(have), true) {
            Ok(r) => r,
            Err(HttpError::Status(416)) => {
                // The range starts past the end: the partial file is not this one's prefix.
                std::fs::write(part, b"")
                    .map_err(|e| internal(anyhow!("{}: {e}", part.display())))?;
                continue;
            }
            Err(HttpError::Status(code)) => return Err(status_error(hub, repo, file, code)),
            Err(HttpError::Network(e)) => {
                last_err = e;
                continue;
            }
            Err(HttpError::Protocol(e)) => return Err(bad_input(anyhow!("{repo}: {e}"))),
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| internal(anyhow!("{}: cannot write: {e}", part.display())))?;
        let mut start = have;
        if have > 0 && resp.status() != 206 {
            // The server ignored the range: start over.
            f.set_len(0)
                .map_err(|e| internal(anyhow!("{}: cannot write: {e}", part.display())))?;
            start = 0;
        }
        bar.set_position(base + start);
        let mut reader = resp.into_reader().take(size - start + 1);
        let mut buf = vec![0u8; 1 << 16];
        let mut written = start;
        let read_err = loop {
            match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    written += n as u64;
                    if written > size {
                        break Some(format!("more than the {size} bytes announced"));
                    }
                    f.write_all(&buf[..n])
                        .map_err(|e| internal(anyhow!("{}: cannot write: {e}", part.display())))?;
                    bar.inc(n as u64);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e.to_string()),
            }
        };
        f.flush()
            .map_err(|e| internal(anyhow!("{}: cannot write: {e}", part.display())))?;
        match read_err {
            None if written == size => return Ok(()),
            None => last_err = format!("connection closed after {written} of {size} bytes"),
            Some(e) if written > size => {
                return Err(bad_input(anyhow!("{repo}: {file}: the hub sent {e}")))
            }
            Some(e) => last_err = e,
        }
    }
    Err(bad_input(anyhow!(
        "{repo}: {file}: download failed after {TRIES} tries: {last_err}"
    )))
}

/// Checks a finished download against its etag: an LFS file's sha256, a small file's git
/// blob sha1 (`sha1("blob <len>\0" + bytes)`); other etags (a mirror's) check the size only.
fn verify(path: &Path, etag: &str, size: u64) -> Result<Option<String>, std::io::Error> {
    let is_hex = |n: usize| etag.len() == n && etag.chars().all(|c| c.is_ascii_hexdigit());
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let got = if is_hex(64) {
        let mut h = sha2::Sha256::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut h, &buf[..n]);
        }
        hex(&sha2::Digest::finalize(h))
    } else if is_hex(40) {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {size}\0").as_bytes());
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        hex(&h.finalize())
    } else {
        return Ok(None);
    };
    if got.eq_ignore_ascii_case(etag) {
        Ok(None)
    } else {
        Ok(Some(got))
    }
}

/// Links `snapshots/<commit>/FILE` to its blob (relative symlink, as huggingface_hub does).
fn link(blob: &Path, pointer: &Path, depth: usize) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = depth;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

/// The pull proper, against an explicit hub and cache.
pub fn pull_into(
    hub: &Hub,
    cache: &Path,
    repo: &str,
    rev: &str,
    gguf: Option<&str>,
    mmproj: Option<&str>,
) -> Result<Pulled, Failure> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if offline() {
        // The cache only: the snapshot refs/<rev> names (or the commit itself).
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(rev))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| rev.to_string());
        let snap = repo_dir.join("snapshots").join(&commit);
        if gguf.is_none() && plain_component(&commit) && snap.is_dir() {
            crate::errors::note(format!(
                "HF_HUB_OFFLINE is set: {repo}@{rev} is already in the cache"
            ));
            return Ok(Pulled {
                print: vec![snap.clone()],
                snapshot: snap,
            });
        }
        return Err(bad_input(anyhow!(
            "HF_HUB_OFFLINE is set and {repo}@{rev} is not in the cache ({}): unset it to download",
            cache.display()
        )));
    }
    let info = repo_info(hub, repo, rev)?;
    let mut want = choose_files(repo, &info.files, gguf, mmproj)?;
    for f in &want {
        if !safe_repo_path(f) {
            return Err(bad_input(anyhow!(
                "{repo}: file name {f:?} leaves the snapshot"
            )));
        }
    }
    let mut undo = Undo::default();
    let io = |p: &Path, e: std::io::Error| internal(anyhow!("{}: {e}", p.display()));
    let blobs = repo_dir.join("blobs");
    let snap = repo_dir.join("snapshots").join(&info.commit);
    undo.mkdirs(&blobs).map_err(|e| io(&blobs, e))?;
    undo.mkdirs(&snap).map_err(|e| io(&snap, e))?;

    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut total_bytes = 0u64;
    let mut fetched_bytes = 0u64;
    let mut i = 0;
    while i < want.len() {
        let file = want[i].clone();
        i += 1;
        let meta = file_meta(hub, repo, &info.commit, &file)?;
        total_bytes += meta.size;
        bar.set_length(total_bytes);
        bar.set_message(file.clone());
        let blob = blobs.join(&meta.etag);
        let have_blob = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size);
        if have_blob {
            bar.inc(meta.size);
        } else {
            let part = blobs.join(format!("{}.incomplete", meta.etag));
            // A partial file left by a killed pull is resumed (Range); if this pull fails,
            // it goes too: a failure leaves the cache clean.
            undo.files.push(part.clone());
            let before = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            download(hub, repo, &info.commit, &file, &part, meta.size, &bar)?;
            fetched_bytes += meta.size.saturating_sub(before);
            let len = std::fs::metadata(&part).map_err(|e| io(&part, e))?.len();
            if len != meta.size {
                return Err(bad_input(anyhow!(
                    "{repo}: {file}: got {len} bytes, the hub announced {}; nothing was kept",
                    meta.size
                )));
            }
            if let Some(got) = verify(&part, &meta.etag, meta.size).map_err(|e| io(&part, e))? {
                return Err(bad_input(anyhow!(
                    "{repo}: {file}: checksum mismatch (expected {}, got {got}); nothing was kept",
                    meta.etag
                )));
            }
            std::fs::rename(&part, &blob).map_err(|e| io(&blob, e))?;
            undo.files.push(blob.clone());
        }
        let pointer = snap.join(&file);
        if let Some(parent) = pointer.parent() {
            undo.mkdirs(parent).map_err(|e| io(parent, e))?;
        }
        let depth = file.split('/').count() + 1;
        let same = std::fs::canonicalize(&pointer).ok() == std::fs::canonicalize(&blob).ok()
            && pointer.exists();
        if !same {
            if std::fs::symlink_metadata(&pointer).is_ok() {
                std::fs::remove_file(&pointer).map_err(|e| io(&pointer, e))?;
            }
            link(&blob, &pointer, depth).map_err(|e| io(&pointer, e))?;
            undo.files.push(pointer.clone());
        }
        if file == INDEX {
            for shard in index_shards(repo, &blob)? {
                if !info.files.contains(&shard) {
                    return Err(bad_input(anyhow!(
                        "{repo} lacks {shard}, a shard its {INDEX} names"
                    )));
                }
                if !safe_repo_path(&shard) {
                    return Err(bad_input(anyhow!(
                        "{repo}: shard name {shard:?} leaves the snapshot"
                    )));
                }
                if !want.contains(&shard) {
                    want.push(shard);
                }
            }
        }
    }
    bar.finish_and_clear();
    if rev != info.commit {
        let refs = repo_dir.join("refs");
        let r = refs.join(rev);
        if let Some(parent) = r.parent() {
            undo.mkdirs(parent).map_err(|e| io(parent, e))?;
        }
        let tmp = r.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, &info.commit).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &r).map_err(|e| io(&r, e))?;
    }
    undo.done = true;
    eprintln!(
        "pulled {repo}@{rev} (commit {}): {} files, {} downloaded, {} already cached",
        info.commit,
        want.len(),
        human(fetched_bytes),
        human(total_bytes - fetched_bytes.min(total_bytes)),
    );
    let print = if gguf.is_some() {
        want.iter().map(|f| snap.join(f)).collect()
    } else {
        vec![snap.clone()]
    };
    Ok(Pulled {
        snapshot: snap,
        print,
    })
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// The shard file names `model.safetensors.index.json` maps tensors to.
fn index_shards(repo: &str, index: &Path) -> Result<Vec<String>, Failure> {
    let text = engine_core::files::read_text_limited(index, MAX_INDEX_BYTES)
        .map_err(|e| bad_input(anyhow!("{repo}: {INDEX}: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(anyhow!("{repo}: {INDEX} is not JSON: {e}")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad_input(anyhow!("{repo}: {INDEX} has no weight_map")))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_urls() {
        assert_eq!(
            parse_spec("a/b@refs/pr/1").unwrap(),
            ("a/b".into(), "refs/pr/1".into())
        );
        assert_eq!(parse_spec("a/b").unwrap().1, "main");
        for bad in ["a", "a/b@", "a/b@../x", "a/b@/x", "a/b/c", "a/b@x y"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
        assert_eq!(origin("http://h:1/a/b"), "http://h:1");
        assert_eq!(join_url("http://h:1/a/b", "/c"), "http://h:1/c");
        assert_eq!(join_url("http://h:1/a/b", "https://x/y"), "https://x/y");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("sub dir/f.json", true), "sub%20dir/f.json");
        assert!(!safe_repo_path("../x") && !safe_repo_path("a//b") && safe_repo_path("a/b.json"));
    }
}

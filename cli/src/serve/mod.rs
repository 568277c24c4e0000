//! `visi-cli serve`: an OpenAI-compatible HTTP server (`POST /v1/chat/completions` with
//! streaming, `GET /v1/models`, `/health`, `/metrics`).
//!
//! Threads: the command's thread (a CPU-backend pool worker) loads the model and runs the
//! engine loop ([`engine::Engine`]), which owns the model; a tokio runtime on its own
//! thread runs the HTTP side, which checks each request (JSON, fields, images) before it
//! reaches the engine, and relays the engine's events as one JSON answer or as server-sent
//! events. Requests are stateless (the whole conversation comes each time), so replicas
//! can sit behind any load balancer.

mod api;
mod engine;
mod images;
mod metrics;
mod rejected;
mod reqlog;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt;
use models::chat::ImageSource;
use serde_json::json;

use crate::common::{DeviceArg, QuantArg};
use crate::errors::{bad_input, classify, internal, Failure};
use crate::ImageModeArg;
use api::{ApiError, ChatRequest, Defaults};
use engine::{EngineConfig, Event, Job, ToEngine};
use images::{ImageBudget, PendingImage};
use metrics::Metrics;

/// Arguments of `visi-cli serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// llava-hf model directory, a cached repo id, or a GGUF text model (with --mmproj).
    #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
    model: Option<String>,
    /// Download a `--model ORG/NAME` repo id that is not in the cache (as `visi-cli pull`).
    #[arg(long)]
    pull: bool,
    /// llama.cpp's `mmproj-*.gguf` for a `.gguf` --model.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Serve synthetic weights of a named shape (tiny, llava-1b, llava-7b) instead, for
    /// load benchmarks; needs --tokenizer.
    #[arg(long, requires = "tokenizer")]
    shape: Option<String>,
    /// `tokenizer.json` for --shape.
    #[arg(long, requires = "shape")]
    tokenizer: Option<PathBuf>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    weights_seed: u64,
    /// Address to listen on (a warning is printed for a non-loopback one without --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// The conversation format requests are rendered in: `vicuna_v1` (LLaVA-1.5,
    /// llava-v1.6-vicuna) or `mistral_instruct` (llava-v1.6-mistral).
    #[arg(long, value_enum, default_value = "vicuna_v1")]
    template: crate::ChatTemplateArg,
    /// Quantize weight matrices as they load.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// Most sequences decoding together in one batched step.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Chunked prefill: the running answers take a decode step after every this many
    /// decoder layers of a new request's prefill (0: prefills run whole).
    #[arg(long, default_value_t = 4)]
    prefill_chunk: usize,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value = "f16")]
    kv_dtype: crate::KvDtypeArg,
    /// KV cache budget (bytes, or with a unit: 512MiB, 2GiB, 1.5GB); requests wait in the
    /// queue while the active ones would not leave room. Default: no limit.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Requests that may wait for admission (at least 1); more are refused with 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    queue: u64,
    /// Require `Authorization: Bearer KEY` (or set VISI_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Let requests name local image files, only those inside DIR.
    #[arg(long)]
    allow_files: Option<PathBuf>,
    /// Most images one request may hold (each `<image>` takes the next one, as in `run
    /// --messages`); more are a 400. VisiPruner's shallow masks hold up to 8 separate images
    /// (5 with the `split` layer-0 policy); past that its middle and deep stages run alone.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// crop: llava-hf's processor; pad: LLaVA-1.5's expand2square.
    #[arg(long, value_enum, default_value = "crop")]
    image_mode: ImageModeArg,
    /// Answer tokens when a request names no max_tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Default temperature (0: greedy); requests override it.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Default top_p; requests override it.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Default pruning config as JSON or @file.json (default: the paper's VisiPruner
    /// config); requests choose with `"visi": {"prune": ...}`.
    #[arg(long, conflicts_with = "no_prune")]
    prune: Option<String>,
    /// Run dense unless a request asks for pruning.
    #[arg(long)]
    no_prune: bool,
    /// Decoded image bytes all requests together may hold (bytes or with a unit): images
    /// are sized from their headers on arrival and decoded only when the engine takes the
    /// request; a request that does not fit in what the others leave gets 429.
    #[arg(long, default_value = images::DEFAULT_TOTAL)]
    max_image_memory: String,
    /// Decoded image bytes one request may hold (at most --max-image-memory); a request
    /// whose images need more gets 413.
    #[arg(long, default_value = images::DEFAULT_PER_REQUEST)]
    max_request_image_memory: String,
    /// Largest request body (bytes or with a unit); larger ones get 413.
    #[arg(long, default_value = "64MiB")]
    max_body: String,
    /// Seconds a client may take to send its request headers and body (1 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    read_timeout: u64,
    /// Seconds in-flight answers get to finish after SIGTERM / Ctrl-C before they are cut
    /// (0 to 86400).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS))]
    shutdown_timeout: u64,
    /// Tests only: a request whose last user text is this panics inside the engine.
    #[arg(long, hide = true)]
    debug_panic_on: Option<String>,
}

/// Largest `--read-timeout` and `--shutdown-timeout` (a day): bounded at parse time so that
/// `Instant + Duration` (hyper's header timer, the drain deadline) cannot overflow.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Parses `512MiB`, `2GiB`, `1.5GB`, `100000`.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a size (e.g. 512MiB, 2GiB, 100000)"))?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => {
            return Err(anyhow!(
                "`{s}`: unknown unit `{u}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let v = n * mul;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(anyhow!("`{s}` is not a usable size"));
    }
    Ok(v as u64)
}

/// What every handler shares.
struct AppState {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<ToEngine>>,
    metrics: Arc<Metrics>,
    defaults: Defaults,
    api_key: Option<String>,
    allow_files: Option<PathBuf>,
    images: Arc<ImageBudget>,
    queue_limit: u64,
    model_id: String,
    created: u64,
    max_body: usize,
    read_timeout: Duration,
    accepting: AtomicBool,
}

/// Upper bound of `--max-images` (each image is up to 576 tokens with LLaVA-1.5, thousands
/// with NeXT: far more than this cannot fit any context we load).
const MAX_IMAGES: usize = 64;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `visi-cli serve`.
pub fn serve(a: ServeArgs) -> Result<(), Failure> {
    // ---- flags, checked before anything loads ----
    if a.max_batch == 0 {
        return Err(bad_input(anyhow!("--max-batch must be at least 1")));
    }
    if a.max_tokens == 0 {
        return Err(bad_input(anyhow!("--max-tokens must be at least 1")));
    }
    if a.max_images > MAX_IMAGES {
        return Err(bad_input(anyhow!(
            "--max-images {} is over {MAX_IMAGES}",
            a.max_images
        )));
    }
    let sampling = models::sampling::SamplingParams {
        temperature: a.temperature,
        top_k: 0,
        top_p: a.top_p,
        seed: 0,
    };
    sampling.validate().map_err(|e| bad_input(e.into()))?;
    let kv_budget = match &a.kv_budget {
        Some(s) => parse_size(s).map_err(|e| bad_input(e.context("--kv-budget")))?,
        None => u64::MAX,
    };
    let max_body = parse_size(&a.max_body).map_err(|e| bad_input(e.context("--max-body")))?;
    let max_body = usize::try_from(max_body).unwrap_or(usize::MAX);
    let image_total =
        parse_size(&a.max_image_memory).map_err(|e| bad_input(e.context("--max-image-memory")))?;
    let image_per_request = parse_size(&a.max_request_image_memory)
        .map_err(|e| bad_input(e.context("--max-request-image-memory")))?;
    if image_per_request > image_total {
        return Err(bad_input(anyhow!(
            "--max-request-image-memory {} is over --max-image-memory {}",
            a.max_request_image_memory,
            a.max_image_memory
        )));
    }
    if a.read_timeout == 0 {
        return Err(bad_input(anyhow!(
            "--read-timeout must be at least 1 second"
        )));
    }
    let prune = if a.no_prune {
        Some(pruner::PruneConfig::Dense)
    } else {
        a.prune
            .as_deref()
            .map(crate::parse_prune)
            .transpose()
            .map_err(bad_input)?
    };
    let allow_files = match &a.allow_files {
        Some(d) => Some(
            std::fs::canonicalize(d)
                .ok()
                .filter(|p| p.is_dir())
                .ok_or_else(|| {
                    bad_input(anyhow!("--allow-files {}: not a directory", d.display()))
                })?,
        ),
        None => None,
    };
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("VISI_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let shape = a
        .shape
        .as_deref()
        .map(models::synthetic::SyntheticShape::parse)
        .transpose()
        .map_err(|e| bad_input(anyhow!("--shape: {e}")))?;
    if let Some(t) = &a.tokenizer {
        crate::validate::input_file("--tokenizer", t)?;
    }
    let model_path = match &a.model {
        Some(m) => {
            let is_gguf = m.ends_with(".gguf");
            if let Some(mm) = &a.mmproj {
                if !is_gguf {
                    return Err(bad_input(anyhow!(
                        "--mmproj {} needs a GGUF text model (--model <file>.gguf)",
                        mm.display()
                    )));
                }
                crate::validate::input_file("--mmproj", mm)?;
            }
            if is_gguf {
                if a.mmproj.is_none() {
                    return Err(bad_input(anyhow!(
                        "serve needs a LLaVA model: a llava-hf directory, or a GGUF text model with its --mmproj"
                    )));
                }
                crate::validate::input_file("--model", std::path::Path::new(m))?;
                Some(PathBuf::from(m))
            } else {
                Some(crate::pull::resolve_or_pull(m, a.pull)?)
            }
        }
        None => None,
    };
    if let (Some(p), Some(dir)) = (&prune, &model_path) {
        crate::validate::prune_fits(p, dir, a.mmproj.is_some())?;
    }
    let addr_text = format!("{}:{}", a.host, a.port);
    let listener = std::net::TcpListener::bind(&addr_text)
        .map_err(|e| bad_input(anyhow!("--host/--port: cannot listen on {addr_text}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| internal(anyhow!("listening socket: {e}")))?;
    if !addr.ip().is_loopback() && api_key.is_none() {
        eprintln!(
            "warning: listening on {addr} beyond loopback without --api-key: anyone who can reach this port can use the model"
        );
    }

    // The runtime and the SIGTERM / Ctrl-C handlers come first: a signal while the model
    // loads is then a clean shutdown (exit 0) once loading ends, never the default kill.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("visi-http-worker")
        .build()
        .map_err(|e| internal(anyhow!("starting the HTTP runtime: {e}")))?;
    let signals = {
        let _in_rt = rt.enter();
        install_signals()
    };

    // ---- model ----
    let llava = match (&model_path, shape) {
        (Some(dir), _) => crate::common::load_llava(dir, a.mmproj.as_deref(), a.device, a.quant)?,
        (None, Some(s)) => {
            let backend = crate::common::open_backend(a.device)?;
            eprintln!("serve: generating synthetic {} weights", s.name());
            models::llava::Llava::load_synthetic(
                s,
                a.weights_seed,
                a.tokenizer.as_deref().unwrap_or(std::path::Path::new("")),
                backend,
                a.quant.map(crate::common::quant_type),
            )
            .map_err(classify)?
        }
        (None, None) => return Err(bad_input(anyhow!("give --model or --shape"))),
    };
    let layers = llava.config().text.num_hidden_layers;
    if let Some(p) = &prune {
        llava
            .resolve_prune(Some(p))
            .map_err(|e| bad_input(anyhow!("--prune: {e}")))?;
    }
    // The device note open_backend held for --shape (--model's load released it already).
    crate::errors::release_notes();
    let model_id = match (&a.model, shape) {
        (Some(m), _) => std::path::Path::new(m.trim_end_matches('/'))
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_else(|| m.clone()),
        (None, Some(s)) => format!("synthetic-{}", s.name()),
        (None, None) => "visi".into(),
    };
    let dev = llava.device_info();
    let metrics = Arc::new(Metrics::new(kv_budget));
    let (tx, rx) = std::sync::mpsc::channel::<ToEngine>();
    let state = Arc::new(AppState {
        tx: std::sync::Mutex::new(tx.clone()),
        metrics: metrics.clone(),
        defaults: Defaults {
            max_tokens: a.max_tokens,
            sampling,
            prune,
            layers,
            context: llava.config().text.max_position_embeddings,
            template: a.template.template(),
            max_images: a.max_images,
        },
        api_key,
        allow_files,
        images: Arc::new(ImageBudget::new(image_total, image_per_request)),
        queue_limit: a.queue,
        model_id,
        created: now_secs(),
        max_body,
        read_timeout: Duration::from_secs(a.read_timeout),
        accepting: AtomicBool::new(true),
    });
    let grace = Duration::from_secs(a.shutdown_timeout);

    // ---- HTTP on its own runtime thread; the engine here ----
    listener
        .set_nonblocking(true)
        .map_err(|e| internal(anyhow!("listening socket: {e}")))?;
    let http_state = state.clone();
    let http = std::thread::Builder::new()
        .name("visi-http".into())
        .spawn(move || http_main(rt, signals, listener, http_state, tx, grace))
        .map_err(|e| internal(anyhow!("starting the HTTP thread: {e}")))?;
    eprintln!(
        "serve: listening on http://{addr} ({} on {}, max batch {}, KV budget {})",
        state.model_id,
        dev.adapter,
        a.max_batch,
        if kv_budget == u64::MAX {
            "unlimited".to_string()
        } else {
            crate::errors::human_bytes(kv_budget)
        }
    );
    let cfg = EngineConfig {
        max_batch: a.max_batch,
        kv_budget,
        image_mode: match a.image_mode {
            ImageModeArg::Crop => models::PadMode::Crop,
            ImageModeArg::Pad => models::PadMode::Pad,
        },
        step_delay: crate::progress::token_delay(),
        panic_on: a.debug_panic_on.clone(),
        prefill_chunk: a.prefill_chunk,
        kv_dtype: a.kv_dtype.dtype(),
    };
    // The engine's own sender copy lives in AppState; when the HTTP side ends, the last
    // copies go and the loop returns.
    drop(state);
    engine::Engine::new(&llava, cfg, metrics).run(rx);
    let r = http
        .join()
        .map_err(|_| internal(anyhow!("the HTTP thread panicked")))?;
    r.map_err(internal)?;
    eprintln!("serve: stopped");
    Ok(())
}

/// The HTTP side: accepts until SIGTERM / Ctrl-C, then tells the engine to drain and waits
/// (at most the grace period and a little more) for the open answers to go out.
fn http_main(
    rt: tokio::runtime::Runtime,
    signals: Signals,
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    tx: std::sync::mpsc::Sender<ToEngine>,
    grace: Duration,
) -> anyhow::Result<()> {
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).context("listening socket")?;
        let app = router(state.clone());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(state.read_timeout);
        let signal = shutdown_signal(signals);
        tokio::pin!(signal);
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        // Requests hyper refuses itself get the JSON error body too.
                        let io = hyper_util::rt::TokioIo::new(rejected::JsonRejections::new(
                            stream,
                            state.metrics.clone(),
                        ));
                        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                        let conn = builder.serve_connection(io, svc);
                        let fut = graceful.watch(conn);
                        tokio::spawn(async move {
                            let _ = fut.await;
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        eprintln!("serve: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = &mut signal => break,
            }
        }
        drop(listener);
        state.accepting.store(false, Ordering::SeqCst);
        eprintln!(
            "serve: shutting down (in-flight answers get {} s)",
            grace.as_secs()
        );
        let _ = tx.send(ToEngine::Drain(Instant::now() + grace));
        drop(tx);
        // Answers end by the deadline; their connections close once they are out.
        let _ = tokio::time::timeout(grace + Duration::from_secs(5), graceful.shutdown()).await;
        anyhow::Ok(())
    })?;
    // Handlers still holding a sender are gone with the runtime.
    drop(rt);
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed before the model loads so that no signal after
/// that is the default (fatal) one.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

/// Installs [`Signals`] (inside a runtime context).
fn install_signals() -> Signals {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }
    #[cfg(not(unix))]
    {
        Signals {}
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal(s: Signals) {
    #[cfg(unix)]
    {
        let Signals { term, int } = s;
        let t = async move {
            match term {
                Some(mut t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let i = async move {
            match int {
                Some(mut i) => {
                    i.recv().await;
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            _ = t => {}
            _ = i => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = s;
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(health))
        .route("/", get(page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The chat page (HTML and JS in one file, no build step; it calls the API like any client).
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
    .into_response()
}

/// `Authorization: Bearer KEY` when the server has a key (compared in constant time).
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok = given.len() == key.len()
            && given
                .bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0;
        if !ok {
            Metrics::inc(&st.metrics.bad);
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong API key (send `Authorization: Bearer KEY`)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.accepting.load(Ordering::SeqCst) {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response()
    }
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": st.created, "owned_by": "visi"}],
    }))
    .into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let mut text = st.metrics.render();
    text.push_str(&format!(
        "# HELP visi_image_bytes_reserved Decoded image bytes reserved by requests not yet encoded.\n\
         # TYPE visi_image_bytes_reserved gauge\nvisi_image_bytes_reserved {}\n\
         # HELP visi_image_bytes_budget --max-image-memory.\n\
         # TYPE visi_image_bytes_budget gauge\nvisi_image_bytes_budget {}\n",
        st.images.used(),
        st.images.total
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `POST /v1/chat/completions`; a panic inside is this request's 500, nothing more.
async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let m = st.metrics.clone();
    let id = format!("chatcmpl-{:016x}", rand_id());
    let mut log = Some(reqlog::ReqLog::new(id, Instant::now(), m.clone()));
    let r = std::panic::AssertUnwindSafe(chat_inner(st, headers, body, &mut log))
        .catch_unwind()
        .await;
    let r = match r {
        Ok(r) => r,
        Err(_) => Err(ApiError::internal(
            "internal panic while handling this request",
        )),
    };
    if let (Some(l), Err(e)) = (log.as_mut(), &r) {
        l.error(e.status.as_u16(), &e.message);
    }
    r.unwrap_or_else(|e| {
        if e.status == StatusCode::TOO_MANY_REQUESTS {
            Metrics::inc(&m.rejected);
        } else if e.status.is_client_error() {
            Metrics::inc(&m.bad);
        } else {
            Metrics::inc(&m.failed);
        }
        e.into_response()
    })
}

async fn read_body(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the {}-byte limit", st.max_body),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > st.max_body as u64 {
            return Err(too_large());
        }
    }
    match tokio::time::timeout(st.read_timeout, axum::body::to_bytes(body, st.max_body)).await {
        Err(_) => Err(ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                st.read_timeout.as_secs()
            ),
        )),
        Ok(Err(e)) => {
            // http-body-util's LengthLimitError, inside axum's error.
            let mut too_big = false;
            let mut cur: Option<&dyn std::error::Error> = Some(&e);
            while let Some(c) = cur {
                too_big |= c.to_string().contains("length limit");
                cur = c.source();
            }
            if too_big {
                Err(too_large())
            } else {
                Err(ApiError::bad(
                    None,
                    format!("cannot read the request body: {e}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok(b.to_vec()),
    }
}

/// The request's images in order, sized from their headers (each bounded: file size,
/// pixels, decoder memory) but not decoded: the engine decodes them when it takes the
/// request. A bad one is a 400 naming its place.
async fn load_images(st: &AppState, req: &ChatRequest) -> Result<Vec<PendingImage>, ApiError> {
    let bad = |m: String| ApiError::bad(Some("messages"), m).code("invalid_image");
    let many = req.rendered.images.len() > 1;
    let mut srcs = Vec::with_capacity(req.rendered.images.len());
    for (i, url) in req.rendered.images.iter().enumerate() {
        let src = models::chat::image_source(url).map_err(|e| {
            bad(if many {
                format!("image {}: {e}", i + 1)
            } else {
                e.to_string()
            })
        })?;
        srcs.push(src);
    }
    if srcs.is_empty() {
        return Ok(Vec::new());
    }
    let allow = st.allow_files.clone();
    // Headers only, but files are read: off the runtime's worker threads.
    let job = tokio::task::spawn_blocking(move || -> Result<Vec<PendingImage>, String> {
        let one = |src: ImageSource| -> Result<PendingImage, String> {
            match src {
                ImageSource::Data(bytes) => images::pending_data(bytes),
                ImageSource::File(p) => {
                    let Some(dir) = &allow else {
                        return Err("local image paths are refused (the server was started without --allow-files); send a data: URL".into());
                    };
                    images::pending_file(dir, &p)
                }
            }
        };
        srcs.into_iter()
            .enumerate()
            .map(|(i, src)| {
                one(src).map_err(|e| {
                    if many {
                        format!("image {}: {e}", i + 1)
                    } else {
                        e
                    }
                })
            })
            .collect()
    });
    match job.await {
        Ok(Ok(imgs)) => Ok(imgs),
        Ok(Err(m)) => Err(bad(m)),
        Err(_) => Err(ApiError::internal("internal panic while reading the image")),
    }
}

/// Reserves the decoded bytes of a request's images: 413 when they alone exceed the
/// per-request bound, 429 when the other requests leave too little of the total.
fn reserve_images(
    st: &AppState,
    imgs: &[PendingImage],
) -> Result<Option<images::Reservation>, ApiError> {
    if imgs.is_empty() {
        return Ok(None);
    }
    let need = imgs
        .iter()
        .fold(0u64, |a, i| a.saturating_add(i.decoded_bytes));
    let b = &st.images;
    if need > b.per_request {
        return Err(ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request's images need {} decoded, over the server's per-request limit of {} (--max-request-image-memory)",
                crate::errors::human_bytes(need),
                crate::errors::human_bytes(b.per_request)
            ),
        )
        .code("image_memory_limit"));
    }
    match b.reserve(need) {
        Some(r) => Ok(Some(r)),
        None => {
            let mut e = ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the server's image memory is in use ({} of {} held by other requests; this one needs {}); retry later",
                    crate::errors::human_bytes(b.used()),
                    crate::errors::human_bytes(b.total),
                    crate::errors::human_bytes(need)
                ),
            )
            .code("image_memory_full");
            e.retry_after = Some(1);
            Err(e)
        }
    }
}

async fn chat_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    log: &mut Option<reqlog::ReqLog>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let bytes = read_body(&st, &headers, body).await?;
    let req = api::parse_chat(&bytes, &st.defaults)?;
    drop(bytes);
    let images = load_images(&st, &req).await?;
    let reservation = reserve_images(&st, &images)?;
    if !st.accepting.load(Ordering::SeqCst) {
        let mut e = ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        );
        e.retry_after = Some(1);
        return Err(e);
    }
    // A place in the queue, or 429.
    let q = st.metrics.queued.fetch_add(1, Ordering::SeqCst);
    if q >= st.queue_limit {
        st.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        let mut e = ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the request queue is full ({} waiting); retry later",
                st.queue_limit
            ),
        )
        .code("queue_full");
        e.retry_after = Some(1);
        return Err(e);
    }
    let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
    let stream = req.stream;
    let include_usage = req.include_usage;
    let model = req.model.clone().unwrap_or_else(|| st.model_id.clone());
    let job = Job {
        req,
        images,
        reservation,
        events: etx,
        arrived,
    };
    let sent = st
        .tx
        .lock()
        .map_err(|_| ApiError::internal("engine channel poisoned"))?
        .send(ToEngine::Job(Box::new(job)));
    if sent.is_err() {
        st.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine has stopped",
        ));
    }
    let id = log.as_ref().map(|l| l.id.clone()).unwrap_or_default();
    let created = now_secs();
    if let Some(l) = log.as_mut() {
        l.stream = stream;
    }
    if !stream {
        while let Some(ev) = erx.recv().await {
            match ev {
                Event::Text(_) => {
                    if let Some(l) = log.as_mut() {
                        l.text();
                    }
                }
                Event::Done(f) => {
                    if let Some(l) = log.as_mut() {
                        l.done(&f);
                    }
                    return Ok(
                        axum::Json(api::completion(&id, created, &model, &f)).into_response()
                    );
                }
                Event::Error(e) => return Err(e),
            }
        }
        return Err(ApiError::internal("the engine dropped this request"));
    }
    // Streaming: wait for the first event so that a request refused by the engine (prompt
    // over the context...) still gets its 4xx status; then the stream is committed.
    let first = erx.recv().await;
    let first = match first {
        Some(Event::Error(e)) => return Err(e),
        Some(ev) => ev,
        None => return Err(ApiError::internal("the engine dropped this request")),
    };
    let mut slog = log.take();
    if let Some(l) = slog.as_mut() {
        note_event(l, &first);
    }
    let role = api::chunk(
        &id,
        created,
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let mut head = vec![role.to_string()];
    let mut done = false;
    push_event(
        &mut head,
        first,
        &id,
        created,
        &model,
        include_usage,
        &mut done,
    );
    struct S {
        rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
        queue: std::collections::VecDeque<String>,
        done: bool,
        id: String,
        created: u64,
        model: String,
        include_usage: bool,
        log: Option<reqlog::ReqLog>,
    }
    let s = S {
        rx: erx,
        queue: head.into(),
        done,
        id,
        created,
        model,
        include_usage,
        log: slog,
    };
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(d) = s.queue.pop_front() {
                return Some((
                    Ok::<_, std::convert::Infallible>(SseEvent::default().data(d)),
                    s,
                ));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(ev) => {
                    if let Some(l) = s.log.as_mut() {
                        note_event(l, &ev);
                    }
                    let mut out = Vec::new();
                    push_event(
                        &mut out,
                        ev,
                        &s.id,
                        s.created,
                        &s.model,
                        s.include_usage,
                        &mut s.done,
                    );
                    s.queue.extend(out);
                }
                None => {
                    s.queue.push_back(
                        ApiError::internal("the engine dropped this request")
                            .body()
                            .to_string(),
                    );
                    s.queue.push_back("[DONE]".into());
                    s.done = true;
                }
            }
        }
    });
    Ok(Sse::new(events).into_response())
}

/// What a streamed event tells the request's log line.
fn note_event(l: &mut reqlog::ReqLog, ev: &Event) {
    match ev {
        Event::Text(_) => l.text(),
        Event::Done(f) => l.done(f),
        Event::Error(e) => l.error(e.status.as_u16(), &e.message),
    }
}

/// The SSE data lines for one engine event.
fn push_event(
    out: &mut Vec<String>,
    ev: Event,
    id: &str,
    created: u64,
    model: &str,
    include_usage: bool,
    done: &mut bool,
) {
    match ev {
        Event::Text(t) => {
            out.push(api::chunk(id, created, model, json!({"content": t}), None).to_string())
        }
        Event::Done(f) => {
            let mut last = api::chunk(id, created, model, json!({}), Some(f.finish_reason.name()));
            last["visi"] = f.visi.clone();
            out.push(last.to_string());
            if include_usage {
                out.push(
                    json!({
                        "id": id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": api::usage(&f),
                    })
                    .to_string(),
                );
            }
            out.push("[DONE]".into());
            *done = true;
        }
        Event::Error(e) => {
            // Headers are out: the error goes as an event, then the stream ends.
            out.push(e.body().to_string());
            out.push("[DONE]".into());
            *done = true;
        }
    }
}

/// A request id: time and a counter, unique within the process.
fn rand_id() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t.rotate_left(17)
        ^ N.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100000").unwrap(), 100_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("2 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }
}

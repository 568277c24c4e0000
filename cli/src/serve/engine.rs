//! The engine thread of `serve`: it owns the model and runs the continuous-batching loop.
//!
//! Requests arrive over a channel. Each turn of the loop takes in what arrived (checks the
//! prompt against the model, queues it), drops requests whose client went away (their
//! session, and so their KV, is freed), admits queued requests one after another (each one
//! unit of prefill work, [`Engine::prefill_unit`]) while the batch and the KV budget have
//! room, then runs one decode step for every active sequence together
//! ([`models::session::decode_batch`]: the linear layers as one M = B matmul, attention per
//! sequence over its own per-layer, possibly pruned, KV). A sequence's tokens do not depend
//! on what runs beside it (the core's batch invariance), so seeded answers are reproducible
//! under any load.
//!
//! KV admission: an active sequence counts the KV bytes its session holds plus the rows
//! still to come (`max_tokens` minus the tokens so far, one row per layer each). A queued
//! request is estimated before its prefill from its prompt length, scaled by the last
//! prefilled/dense ratio seen for its pruning config (VisiPruner sessions keep far fewer
//! rows, so more of them fit), and admitted in arrival order while the estimate fits.
//! One request always runs when nothing else does, whatever its size.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use models::llava::{Answer, GenerateOptions, Llava};
use models::preprocess::PadMode;
use models::prompt::{PromptIds, Template};
use models::session::{decode_batch, DecodeItem, Session};
use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, ChatRequest, FinishReason, Finished};
use super::images::{PendingImage, Reservation};
use super::metrics::Metrics;

/// What the engine sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// The next piece of the answer's text.
    Text(String),
    /// The answer is complete.
    Done(Box<Finished>),
    /// The request failed (nothing more follows).
    Error(ApiError),
}

/// One request handed to the engine.
pub struct Job {
    /// The checked request.
    pub req: ChatRequest,
    /// Its images in prompt order, sized from their headers; decoded at admission.
    pub images: Vec<PendingImage>,
    /// Their decoded bytes, held in the server's image budget until they are encoded.
    pub reservation: Option<Reservation>,
    /// Where its events go; closed when the client went away.
    pub events: UnboundedSender<Event>,
    /// When the request arrived (TTFT counts from here).
    pub arrived: Instant,
}

/// Messages to the engine thread.
pub enum ToEngine {
    /// A request to answer.
    Job(Box<Job>),
    /// Shutdown: refuse what is queued, finish the active answers until the deadline,
    /// then cancel the rest, and return.
    Drain(Instant),
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// KV bytes admission keeps to.
    pub kv_budget: u64,
    /// Image preprocessing.
    pub image_mode: PadMode,
    /// A pause before every decode step (tests slow a tiny model down with it).
    pub step_delay: Option<Duration>,
    /// A request whose last user text is this panics in its prefill (tests check that
    /// the server answers it with a 500 and keeps serving).
    pub panic_on: Option<String>,
    /// Chunked prefill: a decode step of the running answers after every this many
    /// decoder layers of a prefill (0: prefills run whole).
    pub prefill_chunk: usize,
    /// Element type of the KV cache.
    pub kv_dtype: engine_core::DType,
}

struct Waiting {
    job: Job,
    prompt: PromptIds,
    opts: GenerateOptions,
    /// Pruning config and the number of images: what the KV ratio depends on.
    key: String,
}

struct Active {
    job: Job,
    session: Session,
    answer: Answer,
    /// Text so far (pieces from the detokenizer, cut at a stop string).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    last_token: Instant,
    stop_hit: bool,
    error: Option<ApiError>,
    /// Milliseconds from arrival to admission.
    queue_ms: f64,
}

/// The continuous-batching loop over one model.
pub struct Engine<'a> {
    llava: &'a Llava,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    /// Prefilled KV bytes over the dense prompt's, last seen per [`Waiting::key`].
    ratio: HashMap<String, f64>,
    /// KV bytes of one token in one layer (K and V, f32).
    row_bytes: u64,
    layers: u64,
    draining: Option<Instant>,
}

/// Maps an engine error to the request's answer: bad input is a 400, the rest a 500.
fn engine_error(e: engine_core::Error) -> ApiError {
    if crate::errors::exit_code(&e) == crate::errors::BAD_INPUT {
        ApiError::bad(None, e.to_string())
    } else {
        ApiError::internal(e.to_string())
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<'a> Engine<'a> {
    /// An idle engine over `llava`.
    pub fn new(llava: &'a Llava, cfg: EngineConfig, metrics: Arc<Metrics>) -> Self {
        let t = &llava.config().text;
        let elem = cfg.kv_dtype.bytes_for(1).unwrap_or(4) as u64;
        Engine {
            llava,
            cfg,
            metrics,
            waiting: VecDeque::new(),
            active: Vec::new(),
            ratio: HashMap::new(),
            row_bytes: (2 * t.num_key_value_heads * t.head_dim) as u64 * elem,
            layers: t.num_hidden_layers as u64,
            draining: None,
        }
    }

    /// Runs until a drain has finished (or every sender is gone and nothing is left).
    pub fn run(&mut self, rx: Receiver<ToEngine>) {
        let mut connected = true;
        loop {
            let idle = self.active.is_empty() && self.waiting.is_empty();
            if idle && (self.draining.is_some() || !connected) {
                break;
            }
            if idle {
                match rx.recv() {
                    Ok(m) => self.on_message(m),
                    Err(_) => connected = false,
                }
            }
            // Admission: every queued request that fits is prefilled in this turn, one
            // after another, taking in what arrives meanwhile, so a burst of requests
            // fills the batch before the answers' decode steps (which would otherwise run
            // at a small batch while the rest wait). Answers already streaming still step
            // every `--prefill-chunk` layers of each of these prefills.
            let streaming = self.active.iter().any(|a| !a.answer.tokens.is_empty());
            loop {
                connected &= self.take_in(&rx);
                self.drop_disconnected();
                self.check_deadline();
                if !self.admit_one(streaming) {
                    break;
                }
            }
            self.step();
            self.update_gauges();
        }
        self.update_gauges();
    }

    /// Takes in every message waiting on `rx`; false once every sender is gone.
    fn take_in(&mut self, rx: &Receiver<ToEngine>) -> bool {
        loop {
            match rx.try_recv() {
                Ok(m) => self.on_message(m),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn on_message(&mut self, m: ToEngine) {
        match m {
            ToEngine::Drain(deadline) => {
                self.draining = Some(deadline);
                for w in self.waiting.drain(..) {
                    Metrics::inc(&self.metrics.failed);
                    self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = w.job.events.send(Event::Error(shutting_down()));
                }
            }
            ToEngine::Job(job) => {
                let job = *job;
                if self.draining.is_some() {
                    self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                    Metrics::inc(&self.metrics.failed);
                    let _ = job.events.send(Event::Error(shutting_down()));
                    return;
                }
                match self.check(&job) {
                    Ok((prompt, opts, key)) => self.waiting.push_back(Waiting {
                        job,
                        prompt,
                        opts,
                        key,
                    }),
                    Err(e) => {
                        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                        Metrics::inc(&self.metrics.bad);
                        let _ = job.events.send(Event::Error(e));
                    }
                }
            }
        }
    }

    /// The request against the model (cheap: tokenising, the pruning config's fit).
    fn check(&self, job: &Job) -> Result<(PromptIds, GenerateOptions, String), ApiError> {
        let req = &job.req;
        // Each `<image>` takes the next image (LLaVA-NeXT: as many tokens as its size asks;
        // the header's size here, the decoded one at admission: an EXIF rotation swaps it).
        let counts = job
            .images
            .iter()
            .map(|i| self.llava.image_tokens_for(i.width, i.height))
            .collect::<engine_core::Result<Vec<_>>>()
            .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
        let prompt = self
            .llava
            .prompt_images(Template::Raw, &req.rendered.text, &counts)
            .map_err(|e| {
                let e = ApiError::bad(Some("messages"), e.to_string());
                if e.message.contains("context") {
                    e.code("context_length_exceeded")
                } else {
                    e
                }
            })?;
        let (cfg, _) = self
            .llava
            .resolve_prune(req.prune.as_ref())
            .map_err(|e| ApiError::bad(Some("visi.prune"), e.to_string()))?;
        let opts = GenerateOptions {
            template: Template::Raw,
            image_mode: self.cfg.image_mode,
            max_new_tokens: req.max_tokens,
            sampling: req.sampling,
            prune: req.prune.clone(),
            keep_first_logits: false,
            kv_dtype: self.cfg.kv_dtype,
        };
        let key = format!("{}|{}", cfg.to_json(), job.images.len());
        Ok((prompt, opts, key))
    }

    fn decode_rows(&self, prompt_len: usize, max_new: usize) -> u64 {
        let ctx = self.llava.config().text.max_position_embeddings;
        let left = max_new.min(ctx.saturating_sub(prompt_len)) as u64;
        left * self.layers * self.row_bytes
    }

    /// Estimated KV bytes of a queued request once prefilled and fully decoded.
    fn estimate(&self, w: &Waiting) -> u64 {
        let dense = w.prompt.ids.len() as u64 * self.layers * self.row_bytes;
        let r = self.ratio.get(&w.key).copied().unwrap_or(1.0);
        (dense as f64 * r).ceil() as u64
            + self.decode_rows(w.prompt.ids.len(), w.opts.max_new_tokens)
    }

    /// KV bytes held and still reserved by the active sequences.
    fn reserved(&self) -> (u64, u64) {
        let mut held = 0;
        let mut reserved = 0;
        for a in &self.active {
            let h = a.session.kv_bytes();
            let left = a.answer.max_new.saturating_sub(a.answer.tokens.len()) as u64;
            held += h;
            reserved += h + left * self.layers * self.row_bytes;
        }
        (held, reserved)
    }

    /// One request's prefill: its images' encoding (cached across requests) and its
    /// prompt's prefill in a fresh session, calling `after_layer` after each decoder layer
    /// (where the engine runs decode steps of the other answers: chunked prefill).
    fn prefill_unit(
        llava: &Llava,
        image_mode: PadMode,
        panic_on: Option<&str>,
        w: &mut Waiting,
        after_layer: &mut dyn FnMut(usize) -> engine_core::Result<()>,
    ) -> Result<(Session, Answer), ApiError> {
        if let Some(p) = panic_on {
            let last = w.job.req.messages.last().map(|m| m.joined_text());
            if last.as_deref() == Some(p) {
                panic!("debug panic requested for this prompt");
            }
        }
        // Decoded now, one at a time, each dropped once encoded: only admitted requests
        // hold decoded pixels, and only one image's worth.
        let n = w.job.images.len();
        let mut enc = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(n);
        let mut resized = false;
        let bad = |e: engine_core::Error, i: usize| {
            let m = if n > 1 {
                format!("image {}: {e}", i + 1)
            } else {
                e.to_string()
            };
            ApiError::bad(Some("messages"), m).code("invalid_image")
        };
        for (i, p) in std::mem::take(&mut w.job.images).into_iter().enumerate() {
            let img = p.decode().map_err(|e| {
                if crate::errors::exit_code(&e) == crate::errors::BAD_INPUT {
                    bad(e, i)
                } else {
                    ApiError::internal(e.to_string())
                }
            })?;
            resized |= img.dimensions() != (p.width, p.height);
            drop(p);
            counts.push(
                llava
                    .image_tokens_for(img.width(), img.height())
                    .map_err(|e| bad(e, i))?,
            );
            enc.push(llava.encode_image(&img, image_mode).map_err(engine_error)?);
        }
        w.job.reservation = None;
        if resized {
            // An EXIF rotation: LLaVA-NeXT's token count follows the decoded sides.
            w.prompt = llava
                .prompt_images(Template::Raw, &w.job.req.rendered.text, &counts)
                .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
        }
        let mut session = llava.session();
        let answer = llava
            .begin_observed(
                &mut session,
                &w.prompt,
                enc.as_slice(),
                &w.opts,
                after_layer,
            )
            .map_err(engine_error)?;
        // GPU work is queued, not done: wait for it here so that the prefill's time is
        // counted as prefill, not as the next decode step's.
        llava.backend().sync().map_err(engine_error)?;
        Ok((session, answer))
    }

    /// Prefills the first queued request when the batch and the KV budget have room for
    /// it (it leaves the queue, answered with its error if the prefill fails); false when
    /// nothing was taken (the request, if any, keeps waiting). With
    /// `interleave`, the active answers take a decode step every `--prefill-chunk` layers
    /// of this prefill (chunked prefill); without, the prefill runs whole (nothing is
    /// streaming yet: a burst of new requests is prefilled before their first step).
    fn admit_one(&mut self, interleave: bool) -> bool {
        if self.draining.is_some() || self.active.len() >= self.cfg.max_batch {
            return false;
        }
        let Some(front) = self.waiting.front() else {
            return false;
        };
        if !self.active.is_empty() {
            let (_, reserved) = self.reserved();
            if reserved.saturating_add(self.estimate(front)) > self.cfg.kv_budget {
                return false;
            }
        }
        let Some(mut w) = self.waiting.pop_front() else {
            return false;
        };
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        let queue_ms = w.job.arrived.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let llava = self.llava;
        let (mode, panic_on, chunk) = (
            self.cfg.image_mode,
            self.cfg.panic_on.clone(),
            if interleave {
                self.cfg.prefill_chunk
            } else {
                0
            },
        );
        // Chunked prefill: the running answers take a decode step every `chunk` layers, so
        // their streams never wait for a whole prefill (decode time counted as decode).
        let mut stepped_us = 0u64;
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut after_layer = |l: usize| {
                if chunk > 0 && (l + 1).is_multiple_of(chunk) && !self.active.is_empty() {
                    let t = Instant::now();
                    self.drop_disconnected();
                    self.step();
                    stepped_us += t.elapsed().as_micros() as u64;
                }
                Ok(())
            };
            Self::prefill_unit(llava, mode, panic_on.as_deref(), &mut w, &mut after_layer)
        }));
        self.metrics.prefill_us.fetch_add(
            (t0.elapsed().as_micros() as u64).saturating_sub(stepped_us),
            Ordering::Relaxed,
        );
        let r = match r {
            Ok(r) => r,
            Err(p) => Err(ApiError::internal(format!(
                "internal panic while prefilling this request: {}",
                panic_message(p.as_ref())
            ))),
        };
        match r {
            Ok((session, answer)) => {
                let n = w.prompt.ids.len() as u64;
                self.metrics.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                let dense = n * self.layers * self.row_bytes;
                if dense > 0 {
                    self.ratio
                        .insert(w.key.clone(), session.kv_bytes() as f64 / dense as f64);
                }
                self.active.push(Active {
                    job: w.job,
                    session,
                    answer,
                    text: String::new(),
                    sent: 0,
                    last_token: Instant::now(),
                    stop_hit: false,
                    error: None,
                    queue_ms,
                });
            }
            Err(e) => {
                if e.status.is_client_error() {
                    Metrics::inc(&self.metrics.bad);
                } else {
                    Metrics::inc(&self.metrics.failed);
                }
                let _ = w.job.events.send(Event::Error(e));
            }
        }
        true
    }

    /// Frees the sessions of requests whose client went away.
    fn drop_disconnected(&mut self) {
        let before = self.active.len() + self.waiting.len();
        let q = self.waiting.len();
        self.waiting.retain(|w| !w.job.events.is_closed());
        let dropped_q = q - self.waiting.len();
        self.metrics
            .queued
            .fetch_sub(dropped_q as u64, Ordering::Relaxed);
        self.active.retain(|a| !a.job.events.is_closed());
        let gone = before - self.active.len() - self.waiting.len();
        self.metrics
            .disconnected
            .fetch_add(gone as u64, Ordering::Relaxed);
    }

    /// Past the drain deadline: the answers still running end here, as they are.
    fn check_deadline(&mut self) {
        if let Some(d) = self.draining {
            if Instant::now() >= d {
                for a in std::mem::take(&mut self.active) {
                    self.finish(a, Some(FinishReason::Cancelled));
                }
            }
        }
    }

    /// One decode step of every active sequence.
    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        if let Some(d) = self.cfg.step_delay {
            std::thread::sleep(d);
        }
        let t0 = Instant::now();
        let results = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut items: Vec<DecodeItem> = self
                .active
                .iter_mut()
                .map(|a| (&mut a.session, &mut a.answer.decode, &mut a.answer.sampler))
                .collect();
            decode_batch(&mut items)
        }));
        Metrics::inc(&self.metrics.steps);
        self.metrics
            .decode_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        let results = match results {
            Ok(r) => r,
            Err(p) => {
                // The shared step cannot say whose row broke it: every sequence in it fails.
                let msg = panic_message(p.as_ref());
                for a in std::mem::take(&mut self.active) {
                    Metrics::inc(&self.metrics.failed);
                    let _ = a.job.events.send(Event::Error(ApiError::internal(format!(
                        "internal panic in a decode step: {msg}"
                    ))));
                }
                return;
            }
        };
        let now = Instant::now();
        let llava = self.llava;
        let metrics = &self.metrics;
        for (a, r) in self.active.iter_mut().zip(results) {
            match r {
                None => {}
                Some(Err(e)) => a.error = Some(engine_error(e)),
                Some(Ok(tok)) => {
                    a.answer.push_token(tok);
                    Metrics::inc(&metrics.completion_tokens);
                    if a.answer.tokens.len() == 1 {
                        metrics.ttft.observe((now - a.job.arrived).as_secs_f64());
                    } else {
                        Metrics::inc(&metrics.decode_tokens);
                        metrics
                            .token_latency
                            .observe((now - a.last_token).as_secs_f64());
                    }
                    a.last_token = now;
                    match llava.piece(&mut a.answer, tok) {
                        Ok(Some(p)) => {
                            a.text.push_str(&p);
                            a.stop_hit = emit(a);
                        }
                        Ok(None) => {}
                        Err(e) => a.error = Some(engine_error(e)),
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            if a.error.is_some() || a.stop_hit || a.answer.decode.is_done() {
                let a = self.active.swap_remove(i);
                self.finish(a, None);
            } else {
                i += 1;
            }
        }
    }

    /// Ends `a`: its last text, then `Done` (or its error); its session is dropped here.
    fn finish(&self, mut a: Active, forced: Option<FinishReason>) {
        if let Some(e) = a.error.take() {
            Metrics::inc(&self.metrics.failed);
            let _ = a.job.events.send(Event::Error(e));
            return;
        }
        let interrupted = forced.is_some();
        let mut rest = String::new();
        let gen = match self
            .llava
            .finish(&a.session, a.answer, interrupted, &mut |t| rest.push_str(t))
        {
            Ok(g) => g,
            Err(e) => {
                Metrics::inc(&self.metrics.failed);
                let _ = a.job.events.send(Event::Error(engine_error(e)));
                return;
            }
        };
        let text = if a.stop_hit {
            a.text.clone()
        } else {
            a.text.push_str(&rest);
            let hit = find_stop(&a.text, &a.job.req.stop);
            if let Some(i) = hit {
                a.text.truncate(i);
                a.stop_hit = true;
            }
            if a.text.len() > a.sent {
                let _ = a.job.events.send(Event::Text(a.text[a.sent..].to_string()));
            }
            if a.stop_hit || interrupted {
                a.text.clone()
            } else {
                // What `run` prints: the tokens decoded whole.
                gen.text.clone()
            }
        };
        let reason = match forced {
            Some(r) => r,
            None if a.stop_hit || gen.stopped_by_eos => FinishReason::Stop,
            None => FinishReason::Length,
        };
        let mut visi = crate::generation_json(&gen, &self.llava.device_info());
        if let Some(o) = visi.as_object_mut() {
            o.remove("text");
            o.insert("queue_ms".into(), serde_json::json!(a.queue_ms));
        }
        let done = Finished {
            text,
            finish_reason: reason,
            prompt_tokens: gen.prompt_tokens,
            completion_tokens: gen.tokens.len(),
            visi,
        };
        if forced.is_some() {
            Metrics::inc(&self.metrics.failed);
        } else {
            Metrics::inc(&self.metrics.ok);
        }
        let _ = a.job.events.send(Event::Done(Box::new(done)));
    }

    fn update_gauges(&self) {
        let (held, reserved) = self.reserved();
        let m = &self.metrics;
        m.active.store(self.active.len() as u64, Ordering::Relaxed);
        m.max_active
            .fetch_max(self.active.len() as u64, Ordering::Relaxed);
        m.kv_bytes.store(held, Ordering::Relaxed);
        m.kv_reserved.store(reserved, Ordering::Relaxed);
    }
}

fn shutting_down() -> ApiError {
    let mut e = ApiError::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the server is shutting down",
    );
    e.retry_after = Some(1);
    e
}

/// Byte offset of the first stop string in `text`.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Sends what of `a.text` can be sent: up to a stop string (then returns true and cuts the
/// text there), else all but a tail that could still grow into a stop string.
fn emit(a: &mut Active) -> bool {
    let stop = &a.job.req.stop;
    if let Some(i) = find_stop(&a.text, stop) {
        a.text.truncate(i.max(a.sent));
        if a.text.len() > a.sent {
            let _ = a.job.events.send(Event::Text(a.text[a.sent..].to_string()));
        }
        a.sent = a.text.len();
        return true;
    }
    let mut hold = 0;
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if k > hold && a.text.ends_with(&s[..k]) {
                hold = k;
            }
        }
    }
    let safe = a.text.len() - hold;
    if safe > a.sent {
        let _ = a
            .job
            .events
            .send(Event::Text(a.text[a.sent..safe].to_string()));
        a.sent = safe;
    }
    false
}

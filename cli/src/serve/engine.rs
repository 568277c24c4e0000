//! The engine thread of `serve`: it owns the model and drives the library's continuous
//! batcher ([`models::scheduler::Batcher`]: admission under the batch size and the KV
//! budget, chunked prefill, batched decode steps) over the HTTP side's channels.
//!
//! Requests arrive over a channel. Each turn of the loop takes in what arrived (checks the
//! prompt against the model, submits it), drops requests whose client went away (their
//! session, and so their KV, is freed), admits queued requests one after another while
//! the batch and the KV budget have room, then runs one decode step for every active
//! sequence together. A sequence's tokens do not depend on what runs beside it (the core's
//! batch invariance), so seeded answers are reproducible under any load. Each request is a
//! [`ServeJob`]: it decodes its images at admission, streams text (held back where it
//! could still grow into a stop string), and answers with the `--json` object of `run`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use models::llava::{Answer, EncodedImage, GenerateOptions, Llava};
use models::preprocess::PadMode;
use models::prompt::{PromptIds, Template};
use models::scheduler::{Batcher, BatcherConfig, Failure, Finished as Ended, Flow};
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

/// One request inside the batcher: the HTTP side's [`Job`] and what streaming it needs.
struct ServeJob {
    job: Job,
    metrics: Arc<Metrics>,
    device: Arc<engine_core::DeviceInfo>,
    image_mode: PadMode,
    panic_on: Option<Arc<str>>,
    /// Text so far (pieces from the detokenizer, cut at a stop string).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    last_token: Instant,
    stop_hit: bool,
    /// Milliseconds from arrival to admission.
    queue_ms: f64,
}

/// Maps an engine error to the request's answer: bad input is a 400, the rest a 500.
fn engine_error(e: engine_core::Error) -> ApiError {
    if crate::errors::exit_code(&e) == crate::errors::BAD_INPUT {
        ApiError::bad(None, e.to_string())
    } else {
        ApiError::internal(e.to_string())
    }
}

impl models::scheduler::Job for ServeJob {
    type Error = ApiError;

    /// Decodes the images now, one at a time, each dropped once encoded: only admitted
    /// requests hold decoded pixels, and only one image's worth.
    fn prepare(
        &mut self,
        llava: &Llava,
        prompt: &mut PromptIds,
    ) -> Result<Vec<EncodedImage>, ApiError> {
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        self.queue_ms = self.job.arrived.elapsed().as_secs_f64() * 1e3;
        if let Some(p) = &self.panic_on {
            let last = self.job.req.messages.last().map(|m| m.joined_text());
            if last.as_deref() == Some(&**p) {
                panic!("debug panic requested for this prompt");
            }
        }
        let n = self.job.images.len();
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
        for (i, p) in std::mem::take(&mut self.job.images).into_iter().enumerate() {
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
            enc.push(
                llava
                    .encode_image(&img, self.image_mode)
                    .map_err(engine_error)?,
            );
        }
        self.job.reservation = None;
        if resized {
            // An EXIF rotation: LLaVA-NeXT's token count follows the decoded sides.
            *prompt = llava
                .prompt_images(Template::Raw, &self.job.req.rendered.text, &counts)
                .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
        }
        Ok(enc)
    }

    fn gone(&self) -> bool {
        self.job.events.is_closed()
    }

    fn token(&mut self, answer: &Answer, _tok: u32, piece: Option<&str>) -> Flow {
        let now = Instant::now();
        let m = &self.metrics;
        Metrics::inc(&m.completion_tokens);
        if answer.tokens.len() == 1 {
            m.ttft.observe((now - self.job.arrived).as_secs_f64());
        } else {
            Metrics::inc(&m.decode_tokens);
            m.token_latency
                .observe((now - self.last_token).as_secs_f64());
        }
        self.last_token = now;
        if let Some(p) = piece {
            self.text.push_str(p);
            self.stop_hit = self.emit();
        }
        if self.stop_hit {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// The last text, then `Done`.
    fn done(mut self, end: Ended) {
        let gen = end.generation;
        let interrupted = end.cancelled;
        let text = if self.stop_hit {
            self.text.clone()
        } else {
            self.text.push_str(&end.rest);
            if let Some(i) = find_stop(&self.text, &self.job.req.stop) {
                self.text.truncate(i);
                self.stop_hit = true;
            }
            if self.text.len() > self.sent {
                let _ = self
                    .job
                    .events
                    .send(Event::Text(self.text[self.sent..].to_string()));
            }
            if self.stop_hit || interrupted {
                self.text.clone()
            } else {
                // What `run` prints: the tokens decoded whole.
                gen.text.clone()
            }
        };
        let reason = if interrupted {
            FinishReason::Cancelled
        } else if self.stop_hit || gen.stopped_by_eos {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let mut visi = crate::common::generation_json(&gen, &self.device);
        if let Some(o) = visi.as_object_mut() {
            o.remove("text");
            o.insert("queue_ms".into(), serde_json::json!(self.queue_ms));
        }
        let done = Finished {
            text,
            finish_reason: reason,
            prompt_tokens: gen.prompt_tokens,
            completion_tokens: gen.tokens.len(),
            visi,
        };
        if interrupted {
            Metrics::inc(&self.metrics.failed);
        } else {
            Metrics::inc(&self.metrics.ok);
        }
        let _ = self.job.events.send(Event::Done(Box::new(done)));
    }

    fn failed(self, f: Failure<ApiError>) {
        let e = match f {
            Failure::Job(e) => e,
            Failure::Engine(e) => engine_error(e),
            Failure::Panic(m) => ApiError::internal(m),
        };
        if e.status.is_client_error() {
            Metrics::inc(&self.metrics.bad);
        } else {
            Metrics::inc(&self.metrics.failed);
        }
        let _ = self.job.events.send(Event::Error(e));
    }

    fn dropped(self, queued: bool) {
        if queued {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        }
        Metrics::inc(&self.metrics.disconnected);
    }
}

impl ServeJob {
    /// Sends what of the text can be sent: up to a stop string (then returns true and
    /// cuts the text there), else all but a tail that could still grow into a stop string.
    fn emit(&mut self) -> bool {
        let stop = &self.job.req.stop;
        if let Some(i) = find_stop(&self.text, stop) {
            self.text.truncate(i.max(self.sent));
            if self.text.len() > self.sent {
                let _ = self
                    .job
                    .events
                    .send(Event::Text(self.text[self.sent..].to_string()));
            }
            self.sent = self.text.len();
            return true;
        }
        let mut hold = 0;
        for s in stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let safe = self.text.len() - hold;
        if safe > self.sent {
            let _ = self
                .job
                .events
                .send(Event::Text(self.text[self.sent..safe].to_string()));
            self.sent = safe;
        }
        false
    }
}

/// The engine: the batcher over the model, fed from the HTTP side's channel.
pub struct Engine<'a> {
    batcher: Batcher<'a, ServeJob>,
    llava: &'a Llava,
    cfg: EngineConfig,
    panic_on: Option<Arc<str>>,
    device: Arc<engine_core::DeviceInfo>,
    metrics: Arc<Metrics>,
    draining: Option<Instant>,
}

impl<'a> Engine<'a> {
    /// An idle engine over `llava`.
    pub fn new(llava: &'a Llava, cfg: EngineConfig, metrics: Arc<Metrics>) -> Self {
        let batcher = Batcher::new(
            llava,
            BatcherConfig {
                max_batch: cfg.max_batch,
                kv_budget: cfg.kv_budget,
                prefill_chunk: cfg.prefill_chunk,
                kv_dtype: cfg.kv_dtype,
                step_delay: cfg.step_delay,
            },
        );
        Engine {
            batcher,
            llava,
            panic_on: cfg.panic_on.as_deref().map(Arc::from),
            device: Arc::new(llava.device_info()),
            cfg,
            metrics,
            draining: None,
        }
    }

    /// Runs until a drain has finished (or every sender is gone and nothing is left).
    pub fn run(&mut self, rx: Receiver<ToEngine>) {
        let mut connected = true;
        loop {
            let idle = self.batcher.is_idle();
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
            let streaming = self.batcher.streaming();
            loop {
                connected &= self.take_in(&rx);
                self.batcher.drop_gone();
                self.check_deadline();
                if self.draining.is_some() || !self.batcher.admit_one(streaming) {
                    break;
                }
            }
            self.batcher.step();
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
                for w in self.batcher.take_queued() {
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
                let refuse = |job: Job, e: ApiError, metrics: &Metrics| {
                    metrics.queued.fetch_sub(1, Ordering::Relaxed);
                    Metrics::inc(&metrics.bad);
                    let _ = job.events.send(Event::Error(e));
                };
                let (prompt, opts) = match self.check(&job) {
                    Ok(p) => p,
                    Err(e) => return refuse(job, e, &self.metrics),
                };
                let sj = ServeJob {
                    job,
                    metrics: self.metrics.clone(),
                    device: self.device.clone(),
                    image_mode: self.cfg.image_mode,
                    panic_on: self.panic_on.clone(),
                    text: String::new(),
                    sent: 0,
                    last_token: Instant::now(),
                    stop_hit: false,
                    queue_ms: 0.0,
                };
                if let Err((sj, e)) = self.batcher.submit(prompt, opts, sj) {
                    let e = ApiError::bad(Some("visi.prune"), e.to_string());
                    refuse(sj.job, e, &self.metrics);
                }
            }
        }
    }

    /// The request against the model (cheap: tokenising; the pruning config's fit is
    /// checked by the batcher's submit).
    fn check(&self, job: &Job) -> Result<(PromptIds, GenerateOptions), ApiError> {
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
        let opts = GenerateOptions {
            template: Template::Raw,
            image_mode: self.cfg.image_mode,
            max_new_tokens: req.max_tokens,
            sampling: req.sampling,
            prune: req.prune.clone(),
            keep_first_logits: false,
            kv_dtype: self.cfg.kv_dtype,
        };
        Ok((prompt, opts))
    }

    /// Past the drain deadline: the answers still running end here, as they are.
    fn check_deadline(&mut self) {
        if let Some(d) = self.draining {
            if Instant::now() >= d {
                self.batcher.cancel_all();
            }
        }
    }

    fn update_gauges(&self) {
        let (held, reserved) = self.batcher.kv();
        let m = &self.metrics;
        let n = self.batcher.running() as u64;
        m.active.store(n, Ordering::Relaxed);
        m.max_active.fetch_max(n, Ordering::Relaxed);
        m.kv_bytes.store(held, Ordering::Relaxed);
        m.kv_reserved.store(reserved, Ordering::Relaxed);
        let c = self.batcher.counters();
        m.prefill_us.store(c.prefill_us, Ordering::Relaxed);
        m.decode_us.store(c.decode_us, Ordering::Relaxed);
        m.steps.store(c.steps, Ordering::Relaxed);
        m.prompt_tokens.store(c.prompt_tokens, Ordering::Relaxed);
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

//! Continuous batching as a library type: a [`Batcher`] owns the requests of one model,
//! admits them while the batch and the KV budget have room (each admission one unit of
//! prefill work, optionally chunked by decoder layers), and runs one decode step of every
//! running answer together ([`crate::session::decode_batch`]: the linear layers as one
//! M = B matmul, attention per sequence over its own per-layer, possibly pruned, KV).
//! A sequence's tokens do not depend on what runs beside it (the core's batch invariance),
//! so seeded answers are reproducible under any load: every row equals a lone
//! [`crate::Session`] run of the same request, bit for bit.
//!
//! What a request is for the caller (an HTTP exchange, a channel, a test's vector) is the
//! [`Job`] it submits: the batcher calls it at admission (to encode its images), for every
//! token, and once at the end. [`Stream`] is the ready-made job for Rust callers: its
//! events arrive on a channel ([`Batcher::submit_stream`]). `visi-cli serve` drives a
//! batcher from its engine thread with jobs that write to its HTTP streams.
//!
//! KV admission: a running answer counts the KV bytes its session holds plus the rows
//! still to come (`max_new` minus the tokens so far, one row per layer each). A queued
//! request is estimated before its prefill from its prompt length, scaled by the last
//! prefilled/dense ratio seen for its pruning config and image count (VisiPruner sessions
//! keep far fewer rows, so more of them fit), and admitted in arrival order while the
//! estimate fits. One request always runs when nothing else does, whatever its size.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use engine_core::{DType, Error, Result};

use crate::llava::{Answer, EncodedImage, GenerateOptions, Generation, Llava};
use crate::prompt::PromptIds;
use crate::session::{decode_batch, DecodeItem, PrefixKey, Session};

/// A request's number in its batcher.
pub type RequestId = u64;

/// Batcher settings.
#[derive(Clone, Debug)]
pub struct BatcherConfig {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// KV bytes admission keeps to (`u64::MAX`: no limit).
    pub kv_budget: u64,
    /// Chunked prefill: a decode step of the running answers after every this many
    /// decoder layers of a prefill (0: prefills run whole).
    pub prefill_chunk: usize,
    /// Element type of the KV cache of every request (overrides the request's options).
    pub kv_dtype: DType,
    /// A pause before every decode step (tests slow a tiny model down with it).
    pub step_delay: Option<Duration>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch: 8,
            kv_budget: u64::MAX,
            prefill_chunk: 0,
            kv_dtype: DType::F16,
            step_delay: None,
        }
    }
}

/// What a job tells the batcher after a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep decoding.
    Continue,
    /// The answer is complete here (a stop string): it ends as a normal answer.
    Stop,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Failure<E> {
    /// The job's own error (from [`Job::prepare`]).
    Job(E),
    /// The engine's error (prefill, decode step, detokenizer).
    Engine(Error),
    /// A panic in the engine, caught: the message says where.
    Panic(String),
}

/// How an answer ended.
pub struct Finished {
    /// The answer as `run` reports it.
    pub generation: Generation,
    /// Text the detokenizer still held at the end (not yet given to [`Job::token`]).
    pub rest: String,
    /// Whether it was cancelled ([`Batcher::cancel`], [`Batcher::cancel_all`]) rather than
    /// ending by EOS, length or [`Flow::Stop`].
    pub cancelled: bool,
}

/// One request as its caller sees it: the batcher calls these as the request advances.
/// Exactly one of [`Job::done`], [`Job::failed`] and [`Job::dropped`] ends it.
pub trait Job: Sized {
    /// The job's own error type (what [`Job::prepare`] refuses with).
    type Error;
    /// Called once at admission, just before the prefill: the request's images encoded
    /// (one per image span of `prompt`, in order). `prompt` may be rebuilt here (an image
    /// decoded only now can change its token count). Runs under the batcher's panic guard.
    fn prepare(
        &mut self,
        llava: &Llava,
        prompt: &mut PromptIds,
    ) -> std::result::Result<Vec<EncodedImage>, Self::Error>;
    /// Whether the caller went away: the request is dropped (its KV freed) at the next
    /// turn, with [`Job::dropped`].
    fn gone(&self) -> bool {
        false
    }
    /// Token `tok`, just taken by `answer`, with the next complete piece of text if any.
    fn token(&mut self, answer: &Answer, tok: u32, piece: Option<&str>) -> Flow;
    /// The answer ended.
    fn done(self, finished: Finished);
    /// The request failed (nothing more follows).
    fn failed(self, failure: Failure<Self::Error>);
    /// The request was dropped: [`Job::gone`], or cancelled (`queued`: before admission).
    fn dropped(self, queued: bool) {
        let _ = queued;
    }
}

/// Totals of a batcher's work so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Microseconds in prefill units (image encoding included, interleaved steps not).
    pub prefill_us: u64,
    /// Microseconds in decode steps.
    pub decode_us: u64,
    /// Decode steps run (each over every running answer).
    pub steps: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
}

struct Waiting<T> {
    id: RequestId,
    job: T,
    prompt: PromptIds,
    opts: GenerateOptions,
    /// Pruning and image count: what the KV ratio depends on.
    key: (PrefixKey, usize),
}

struct Active<T: Job> {
    id: RequestId,
    job: T,
    session: Session,
    answer: Answer,
    stop: bool,
    error: Option<Failure<T::Error>>,
}

/// Continuous batching over one model (see the module docs).
pub struct Batcher<'m, T: Job> {
    llava: &'m Llava,
    cfg: BatcherConfig,
    waiting: VecDeque<Waiting<T>>,
    active: Vec<Active<T>>,
    /// Prefilled KV bytes over the dense prompt's, last seen per key.
    ratio: Vec<((PrefixKey, usize), f64)>,
    /// KV bytes of one token in one layer (K and V).
    row_bytes: u64,
    layers: u64,
    next_id: RequestId,
    counters: Counters,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<'m, T: Job> Batcher<'m, T> {
    /// An idle batcher over `llava`.
    pub fn new(llava: &'m Llava, cfg: BatcherConfig) -> Self {
        let t = &llava.config().text;
        let elem = cfg.kv_dtype.bytes_for(1).unwrap_or(4) as u64;
        Batcher {
            llava,
            cfg,
            waiting: VecDeque::new(),
            active: Vec::new(),
            ratio: Vec::new(),
            row_bytes: (2 * t.num_key_value_heads * t.head_dim) as u64 * elem,
            layers: t.num_hidden_layers as u64,
            next_id: 0,
            counters: Counters::default(),
        }
    }

    /// The model.
    pub fn llava(&self) -> &'m Llava {
        self.llava
    }

    /// Queues a request: `prompt` (its image spans filled at admission by
    /// [`Job::prepare`]) answered with `opts`. Refused, the job handed back, when the
    /// pruning config does not fit the model.
    pub fn submit(
        &mut self,
        prompt: PromptIds,
        mut opts: GenerateOptions,
        job: T,
    ) -> std::result::Result<RequestId, (T, Error)> {
        let cfg = match self.llava.resolve_prune(opts.prune.as_ref()) {
            Ok((cfg, _)) => cfg,
            Err(e) => return Err((job, e)),
        };
        opts.kv_dtype = self.cfg.kv_dtype;
        let id = self.next_id;
        self.next_id += 1;
        let key = (PrefixKey::from(&cfg), prompt.image_spans.len());
        self.waiting.push_back(Waiting {
            id,
            job,
            prompt,
            opts,
            key,
        });
        Ok(id)
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// Answers decoding now.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Requests waiting for admission.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a running answer has streamed a token already (then a new prefill is
    /// interleaved with their steps, see [`Batcher::admit_one`]).
    pub fn streaming(&self) -> bool {
        self.active.iter().any(|a| !a.answer.tokens.is_empty())
    }

    /// Totals so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    fn decode_rows(&self, prompt_len: usize, max_new: usize) -> u64 {
        let ctx = self.llava.config().text.max_position_embeddings;
        let left = max_new.min(ctx.saturating_sub(prompt_len)) as u64;
        left * self.layers * self.row_bytes
    }

    /// Estimated KV bytes of a queued request once prefilled and fully decoded.
    fn estimate(&self, w: &Waiting<T>) -> u64 {
        let dense = w.prompt.ids.len() as u64 * self.layers * self.row_bytes;
        let r = self
            .ratio
            .iter()
            .find(|(k, _)| *k == w.key)
            .map_or(1.0, |(_, r)| *r);
        (dense as f64 * r).ceil() as u64
            + self.decode_rows(w.prompt.ids.len(), w.opts.max_new_tokens)
    }

    /// KV bytes held, and held plus still reserved, by the running answers.
    pub fn kv(&self) -> (u64, u64) {
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

    /// One request's prefill: its images from [`Job::prepare`], then its prompt in a fresh
    /// session, calling `after_layer` after each decoder layer.
    fn prefill_unit(
        llava: &Llava,
        w: &mut Waiting<T>,
        after_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> std::result::Result<(Session, Answer), Failure<T::Error>> {
        let images = w.job.prepare(llava, &mut w.prompt).map_err(Failure::Job)?;
        let mut session = llava.session();
        let answer = llava
            .begin_observed(&mut session, &w.prompt, &images, &w.opts, after_layer)
            .map_err(Failure::Engine)?;
        // GPU work is queued, not done: wait for it here so that the prefill's time is
        // counted as prefill, not as the next decode step's.
        llava.backend().sync().map_err(Failure::Engine)?;
        Ok((session, answer))
    }

    /// Prefills the first queued request when the batch and the KV budget have room for
    /// it (it leaves the queue, failed with its error if the prefill fails); false when
    /// nothing was taken. With `interleave`, the running answers take a decode step every
    /// [`BatcherConfig::prefill_chunk`] layers of this prefill (chunked prefill); without,
    /// the prefill runs whole.
    pub fn admit_one(&mut self, interleave: bool) -> bool {
        if self.active.len() >= self.cfg.max_batch {
            return false;
        }
        let Some(front) = self.waiting.front() else {
            return false;
        };
        if !self.active.is_empty() {
            let (_, reserved) = self.kv();
            if reserved.saturating_add(self.estimate(front)) > self.cfg.kv_budget {
                return false;
            }
        }
        let Some(mut w) = self.waiting.pop_front() else {
            return false;
        };
        let t0 = Instant::now();
        let llava = self.llava;
        let chunk = if interleave {
            self.cfg.prefill_chunk
        } else {
            0
        };
        let mut stepped_us = 0u64;
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut after_layer = |l: usize| {
                if chunk > 0 && (l + 1).is_multiple_of(chunk) && !self.active.is_empty() {
                    let t = Instant::now();
                    self.drop_gone();
                    self.step();
                    stepped_us += t.elapsed().as_micros() as u64;
                }
                Ok(())
            };
            Self::prefill_unit(llava, &mut w, &mut after_layer)
        }));
        self.counters.prefill_us += (t0.elapsed().as_micros() as u64).saturating_sub(stepped_us);
        let r = match r {
            Ok(r) => r,
            Err(p) => Err(Failure::Panic(format!(
                "internal panic while prefilling this request: {}",
                panic_message(p.as_ref())
            ))),
        };
        match r {
            Ok((session, answer)) => {
                let n = w.prompt.ids.len() as u64;
                self.counters.prompt_tokens += n;
                let dense = n * self.layers * self.row_bytes;
                if dense > 0 {
                    let r = session.kv_bytes() as f64 / dense as f64;
                    match self.ratio.iter_mut().find(|(k, _)| *k == w.key) {
                        Some(e) => e.1 = r,
                        None => self.ratio.push((w.key, r)),
                    }
                }
                self.active.push(Active {
                    id: w.id,
                    job: w.job,
                    session,
                    answer,
                    stop: false,
                    error: None,
                });
            }
            Err(e) => w.job.failed(e),
        }
        true
    }

    /// Drops the requests whose caller went away ([`Job::gone`]), freeing their sessions.
    pub fn drop_gone(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].job.gone() {
                if let Some(w) = self.waiting.remove(i) {
                    w.job.dropped(true);
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].job.gone() {
                self.active.remove(i).job.dropped(false);
            } else {
                i += 1;
            }
        }
    }

    /// Ends request `id`: a running answer finishes as it is (cancelled), a queued one is
    /// dropped. False when no such request is queued or running.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            if let Some(w) = self.waiting.remove(i) {
                w.job.dropped(true);
            }
            return true;
        }
        if let Some(i) = self.active.iter().position(|a| a.id == id) {
            let a = self.active.remove(i);
            self.finish(a, true);
            return true;
        }
        false
    }

    /// Ends every running answer as it is (cancelled).
    pub fn cancel_all(&mut self) {
        for a in std::mem::take(&mut self.active) {
            self.finish(a, true);
        }
    }

    /// Takes every queued request out of the queue (a server refuses them on shutdown).
    pub fn take_queued(&mut self) -> Vec<T> {
        self.waiting.drain(..).map(|w| w.job).collect()
    }

    /// One decode step of every running answer, then the ended ones finish.
    pub fn step(&mut self) {
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
        self.counters.steps += 1;
        self.counters.decode_us += t0.elapsed().as_micros() as u64;
        let results = match results {
            Ok(r) => r,
            Err(p) => {
                // The shared step cannot say whose row broke it: every sequence in it fails.
                let msg = panic_message(p.as_ref());
                for a in std::mem::take(&mut self.active) {
                    a.job.failed(Failure::Panic(format!(
                        "internal panic in a decode step: {msg}"
                    )));
                }
                return;
            }
        };
        let llava = self.llava;
        for (a, r) in self.active.iter_mut().zip(results) {
            match r {
                None => {}
                Some(Err(e)) => a.error = Some(Failure::Engine(e)),
                Some(Ok(tok)) => {
                    a.answer.push_token(tok);
                    match llava.piece(&mut a.answer, tok) {
                        Ok(p) => {
                            if a.job.token(&a.answer, tok, p.as_deref()) == Flow::Stop {
                                a.stop = true;
                            }
                        }
                        Err(e) => a.error = Some(Failure::Engine(e)),
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            if a.error.is_some() || a.stop || a.answer.decode.is_done() {
                let a = self.active.swap_remove(i);
                self.finish(a, false);
            } else {
                i += 1;
            }
        }
    }

    /// One turn for a caller with nothing else to do between admissions: drops what is
    /// gone, admits every queued request that fits, then runs one decode step.
    pub fn turn(&mut self) {
        let streaming = self.streaming();
        loop {
            self.drop_gone();
            if !self.admit_one(streaming) {
                break;
            }
        }
        self.step();
    }

    /// Turns until nothing is queued or running.
    pub fn run_until_idle(&mut self) {
        while !self.is_idle() {
            self.turn();
        }
    }

    /// Ends `a`: [`Job::done`] with its generation (or [`Job::failed`]); its session is
    /// dropped here.
    fn finish(&self, mut a: Active<T>, cancelled: bool) {
        if let Some(e) = a.error.take() {
            a.job.failed(e);
            return;
        }
        let mut rest = String::new();
        match self
            .llava
            .finish(&a.session, a.answer, cancelled, &mut |t| rest.push_str(t))
        {
            Ok(generation) => a.job.done(Finished {
                generation,
                rest,
                cancelled,
            }),
            Err(e) => a.job.failed(Failure::Engine(e)),
        }
    }
}

/// What a [`Stream`] request sends.
#[derive(Debug)]
pub enum StreamEvent {
    /// A token and the text it completed, if any.
    Token {
        /// The token id.
        id: u32,
        /// The next complete piece of the answer's text.
        text: Option<String>,
    },
    /// The answer ended (the last text it held is in the generation's `text`).
    Done {
        /// The whole answer.
        generation: Box<Generation>,
        /// Whether it was cancelled.
        cancelled: bool,
    },
    /// Dropped before or while running ([`Batcher::cancel`] of a queued request, or the
    /// receiver went away).
    Dropped,
    /// The request failed.
    Failed(Error),
}

/// The ready-made [`Job`]: already encoded images, events on a channel; the request is
/// dropped once its receiver is gone.
pub struct Stream {
    images: Vec<EncodedImage>,
    tx: Sender<StreamEvent>,
    gone: bool,
}

impl Stream {
    /// A job over `images` (one per image span of its prompt) and its event receiver.
    pub fn new(images: Vec<EncodedImage>) -> (Self, Receiver<StreamEvent>) {
        let (tx, rx) = channel();
        (
            Stream {
                images,
                tx,
                gone: false,
            },
            rx,
        )
    }
}

impl Job for Stream {
    type Error = Error;

    fn prepare(
        &mut self,
        _llava: &Llava,
        _prompt: &mut PromptIds,
    ) -> std::result::Result<Vec<EncodedImage>, Error> {
        Ok(std::mem::take(&mut self.images))
    }

    fn gone(&self) -> bool {
        self.gone
    }

    fn token(&mut self, _answer: &Answer, tok: u32, piece: Option<&str>) -> Flow {
        let ev = StreamEvent::Token {
            id: tok,
            text: piece.map(str::to_string),
        };
        if self.tx.send(ev).is_err() {
            self.gone = true;
        }
        Flow::Continue
    }

    fn done(self, f: Finished) {
        let _ = self.tx.send(StreamEvent::Done {
            generation: Box::new(f.generation),
            cancelled: f.cancelled,
        });
    }

    fn failed(self, failure: Failure<Error>) {
        let e = match failure {
            Failure::Job(e) | Failure::Engine(e) => e,
            Failure::Panic(m) => Error::internal(m),
        };
        let _ = self.tx.send(StreamEvent::Failed(e));
    }

    fn dropped(self, _queued: bool) {
        let _ = self.tx.send(StreamEvent::Dropped);
    }
}

impl<'m> Batcher<'m, Stream> {
    /// Queues `prompt` with its encoded `images` (one per image span, in order): the
    /// request's id and the receiver of its events.
    pub fn submit_stream(
        &mut self,
        prompt: PromptIds,
        images: Vec<EncodedImage>,
        opts: GenerateOptions,
    ) -> Result<(RequestId, Receiver<StreamEvent>)> {
        let (job, rx) = Stream::new(images);
        let id = self.submit(prompt, opts, job).map_err(|(_, e)| e)?;
        Ok((id, rx))
    }
}

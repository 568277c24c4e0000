//! The one generation core: a [`Session`] owns a sequence's per-layer KV cache, positions
//! and pruning report; the [`LayerScheduler`] runs the decoder layer by layer with the
//! pruner hook. Every caller (run, chat, eval, bench, quality accounting, the examples)
//! prefills and decodes through a session.
//!
//! A session keeps what its last prefill computed, so a follow-up prompt that starts with
//! the same tokens (a conversation's next turn) recomputes only what differs, and gives
//! exactly what a fresh run on the whole prompt gives, pruning decisions included:
//! - each layer's KV rows of the common prefix are reused while the new prompt's schedule
//!   (which rows each layer processes, decided from the *new* last token) agrees with the
//!   old one on that prefix: with causal attention and the shallow masks, a prefix row
//!   never depends on what follows it;
//! - at the first layer where the schedules differ (another fusion layer or kept set), the
//!   prefix rows re-enter the computation from the previous layer's stored output, so only
//!   the pruned (short) sequence after that layer is recomputed.
//!
//! Rows written by decode steps are never reused: a fresh prefill computes those tokens
//! as prompt rows (with the shallow masks), so only prefill rows are valid for later turns.

use std::sync::Arc;

use engine_core::{Backend, DType, Error, HostData, Result, Tensor};
use pruner::{Action, Capture, LayerView, PruneConfig, PruneReport, Pruner, ShallowMask};

use crate::llama::{Captured, ImageSpan, KvCache, LayerKv, Llama, PrefillStats};
use crate::sampling::Sampler;

/// What sits at one prompt position, for finding the common prefix of two prompts: a text
/// token, or row `offset` of the image whose content hashes to `image`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKey {
    /// A text token id.
    Text(u32),
    /// One image embedding row.
    Image {
        /// Content key of the image (see `Llava::encode_image`).
        image: u64,
        /// Row inside the image's span.
        offset: u32,
    },
}

/// Which pruning a session's stored rows were computed under: a later prefill reuses them
/// only under an equal key. Derived from the pruning config that builds the prefill's
/// pruner (every field of it, so two configs that could decide differently never share a
/// prefix, and equal configs always do), never a free string.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixKey(PruneConfig);

impl PrefixKey {
    /// The key of dense prefills (no pruning, no masks).
    pub fn dense() -> Self {
        PrefixKey(PruneConfig::Dense)
    }

    /// The config it stands for.
    pub fn config(&self) -> &PruneConfig {
        &self.0
    }
}

impl From<&PruneConfig> for PrefixKey {
    fn from(cfg: &PruneConfig) -> Self {
        PrefixKey(cfg.clone())
    }
}

/// An image spliced into a prompt.
#[derive(Clone)]
pub struct ImageInput {
    /// Where it sits in the prompt.
    pub span: ImageSpan,
    /// Content key (equal keys must mean equal embeddings).
    pub key: u64,
    /// Projector output `[N, H]`, N = span length.
    pub embeds: Tensor,
}

/// A prompt to prefill: token ids (image spans hold placeholder ids) and its images, in
/// prompt order.
#[derive(Clone, Copy)]
pub struct PromptInput<'a> {
    /// Token ids, BOS first.
    pub ids: &'a [u32],
    /// The images, one per image span, in prompt order (empty: text only).
    pub images: &'a [ImageInput],
}

impl PromptInput<'_> {
    /// The position keys of the prompt.
    pub fn keys(&self) -> Vec<TokenKey> {
        let mut keys: Vec<TokenKey> = self.ids.iter().map(|&t| TokenKey::Text(t)).collect();
        for img in self.images {
            for (o, k) in keys[img.span.start..img.span.end].iter_mut().enumerate() {
                *k = TokenKey::Image {
                    image: img.key,
                    offset: o as u32,
                };
            }
        }
        keys
    }

    /// The image spans, in prompt order.
    pub fn spans(&self) -> Vec<ImageSpan> {
        self.images.iter().map(|i| i.span).collect()
    }
}

/// Image spans of a prompt (ascending, disjoint), mapping prompt positions to image-token
/// offsets: the pruner numbers the tokens of every span together, in prompt order.
struct SpanMap {
    spans: Vec<ImageSpan>,
    /// Offset of each span's first token.
    base: Vec<usize>,
}

impl SpanMap {
    /// Checks that `spans` are in order, disjoint and inside a prompt of `n` positions.
    fn new(spans: &[ImageSpan], n: usize) -> Result<Self> {
        let mut at = 0;
        let mut base = Vec::with_capacity(spans.len());
        let mut total = 0;
        for sp in spans {
            if sp.start < at || sp.end < sp.start || sp.end > n {
                return Err(Error::msg(format!(
                    "image span {}..{} is out of order or outside the prompt of {n} tokens",
                    sp.start, sp.end
                )));
            }
            at = sp.end;
            base.push(total);
            total += sp.end - sp.start;
        }
        Ok(SpanMap {
            spans: spans.to_vec(),
            base,
        })
    }

    /// Image tokens over every span.
    fn total(&self) -> usize {
        self.spans.iter().map(|s| s.end - s.start).sum()
    }

    /// The image-token offset at prompt position `p`, if `p` is an image position.
    fn offset(&self, p: usize) -> Option<usize> {
        let i = self.spans.partition_point(|s| s.end <= p);
        let sp = self.spans.get(i)?;
        (p >= sp.start).then(|| self.base[i] + p - sp.start)
    }
}

/// Maximal runs `[start, end)` of consecutive cache rows holding image tokens, for a layer
/// whose rows hold prompt positions `rows`.
fn image_runs(spans: &SpanMap, rows: &[u32]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (r, &p) in rows.iter().enumerate() {
        if spans.offset(p as usize).is_none() {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 == r => last.1 = r + 1,
            _ => runs.push((r, r + 1)),
        }
    }
    runs
}

/// What a prefill did.
#[derive(Clone, Debug)]
pub struct Prefill {
    /// Logits of the last prompt position `[1, V]`.
    pub logits: Tensor,
    /// The schedule (what a fresh run on the whole prompt processes per layer).
    pub stats: PrefillStats,
    /// The pruner's decisions for this prompt.
    pub report: PruneReport,
    /// Leading prompt positions whose KV rows came from the previous prefill.
    pub reused_tokens: usize,
    /// The first layer whose prefix rows had to be recomputed (the schedules differed
    /// there), when reuse stopped before the last layer.
    pub recomputed_from_layer: Option<usize>,
    /// Rows actually computed per layer (equal to `stats.layer_seq_lens` without reuse).
    pub computed_rows: Vec<usize>,
}

/// Output of one layer over the rows it processed, kept as pieces `(tensor, first row,
/// rows)` so reuse never copies it unless the schedule diverges.
#[derive(Clone, Default)]
struct Hidden {
    parts: Vec<(Tensor, usize, usize)>,
}

impl Hidden {
    fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.2).sum()
    }
    /// The first `n` rows.
    fn truncated(&self, n: usize) -> Hidden {
        let mut out = Hidden::default();
        let mut left = n;
        for &(ref t, start, rows) in &self.parts {
            if left == 0 {
                break;
            }
            let take = rows.min(left);
            out.parts.push((t.clone(), start, take));
            left -= take;
        }
        out
    }
    /// Rows `idx` (indices into the concatenation) as one tensor `[idx.len(), H]`.
    fn gather(&self, b: &dyn Backend, idx: &[u32]) -> Result<Tensor> {
        let mut pieces = Vec::with_capacity(self.parts.len());
        for (t, start, rows) in &self.parts {
            pieces.push(if *start == 0 && t.dims()[0] == *rows {
                t.clone()
            } else {
                b.slice_rows(t, *start, *rows)?
            });
        }
        let refs: Vec<&Tensor> = pieces.iter().collect();
        let all = if refs.len() == 1 {
            pieces[0].clone()
        } else {
            b.concat_rows(&refs)?
        };
        let idx = b.upload(HostData::U32(idx), idx.len().into())?;
        b.gather_rows(&all, &idx)
    }
}

/// What one layer holds after a prefill: the prompt positions of its prefill rows (in
/// cache order) and, where a schedule could diverge, its output over those rows.
#[derive(Clone, Default)]
struct LayerState {
    rows: Vec<u32>,
    hidden: Option<Hidden>,
}

/// One sequence's generation state: per-layer KV (each layer its own, possibly pruned,
/// length, growing as decode appends), the next position, and the last prefill's schedule
/// and report.
pub struct Session {
    llama: Arc<Llama>,
    backend: Arc<dyn Backend>,
    cache: KvCache,
    layers: Vec<LayerState>,
    keys: Vec<TokenKey>,
    prune_key: Option<PrefixKey>,
    next_pos: usize,
    report: Option<PruneReport>,
    stats: PrefillStats,
}

impl Session {
    /// An empty session over `llama` on `backend` (the weights' backend).
    pub fn new(llama: Arc<Llama>, backend: Arc<dyn Backend>) -> Self {
        Session {
            llama,
            backend,
            cache: KvCache::default(),
            layers: Vec::new(),
            keys: Vec::new(),
            prune_key: None,
            next_pos: 0,
            report: None,
            stats: PrefillStats::default(),
        }
    }

    /// The decoder.
    pub fn llama(&self) -> &Arc<Llama> {
        &self.llama
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The KV cache's element type (`F16` by default).
    pub fn kv_dtype(&self) -> DType {
        self.cache.dtype
    }

    /// Sets the KV cache's element type (`F16` or `F32`); a change forgets everything.
    pub fn set_kv_dtype(&mut self, dtype: DType) {
        if dtype != self.cache.dtype {
            self.clear();
            self.cache.dtype = dtype;
        }
    }

    /// Forgets everything (the next prefill starts from nothing; the KV dtype stays).
    pub fn clear(&mut self) {
        self.cache = KvCache::new(self.cache.dtype);
        self.layers.clear();
        self.keys.clear();
        self.prune_key = None;
        self.next_pos = 0;
        self.report = None;
        self.stats = PrefillStats::default();
    }

    /// Position of the next token (prompt length plus tokens fed since).
    pub fn position(&self) -> usize {
        self.next_pos
    }

    /// KV rows each layer holds.
    pub fn kv_lens(&self) -> Vec<usize> {
        self.cache.lens()
    }

    /// Bytes of K and V held (valid rows).
    pub fn kv_bytes(&self) -> u64 {
        let c = self.llama.config();
        self.cache.bytes_used(c.num_key_value_heads * c.head_dim)
    }

    /// The last prefill's pruning report.
    pub fn report(&self) -> Option<&PruneReport> {
        self.report.as_ref()
    }

    /// The last prefill's schedule.
    pub fn stats(&self) -> &PrefillStats {
        &self.stats
    }

    /// Prefills `prompt` with `pruner` deciding the schedule, reusing the previous
    /// prefill's rows for the longest common prefix when `prune_key` (the key of the
    /// config `pruner` was built from) is equal. `reserve` rows of KV are allocated beyond the prompt.
    pub fn prefill(
        &mut self,
        prompt: PromptInput,
        pruner: &mut dyn Pruner,
        prune_key: &PrefixKey,
        reserve: usize,
    ) -> Result<Prefill> {
        self.prefill_observed(prompt, pruner, prune_key, reserve, &mut |_| Ok(()))
    }

    /// [`Session::prefill`] calling `after_layer(l)` once layer `l` (and any gather the
    /// pruner asked for after it) has been recorded; benchmarks sync there to time layers.
    pub fn prefill_observed(
        &mut self,
        prompt: PromptInput,
        pruner: &mut dyn Pruner,
        prune_key: &PrefixKey,
        reserve: usize,
        after_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Prefill> {
        let n = prompt.ids.len();
        if n == 0 {
            return Err(Error::msg("cannot prefill an empty prompt"));
        }
        let spans = prompt.spans();
        SpanMap::new(&spans, n)?;
        for img in prompt.images {
            let sp = img.span;
            if img.embeds.dims()[0] != sp.end - sp.start {
                return Err(Error::msg(format!(
                    "image span {}..{} does not hold the {} image embeddings (prompt of {n} tokens)",
                    sp.start,
                    sp.end,
                    img.embeds.dims()[0]
                )));
            }
        }
        let keys = prompt.keys();
        let mut common = 0;
        if self.prune_key.as_ref() == Some(prune_key)
            && self.layers.len() == self.llama.num_layers()
        {
            common = self
                .keys
                .iter()
                .zip(&keys)
                .take_while(|(a, b)| a == b)
                .count();
        }
        // At least the last prompt token is computed (its logits and the pruner's
        // decisions come from it); never cut an image in two.
        common = common.min(n - 1);
        for sp in &spans {
            if common > sp.start && common < sp.end {
                common = sp.start;
            }
        }
        let sched = LayerScheduler {
            llama: &self.llama,
            b: self.backend.as_ref(),
        };
        let run = sched.embed_from(&prompt, common).and_then(|h| {
            sched.prefill(
                h,
                n,
                &spans,
                pruner,
                common,
                reserve,
                &self.layers,
                &mut self.cache,
                after_layer,
            )
        });
        let out = match run {
            Ok(o) => o,
            Err(e) => {
                // The cache may be half rewritten: start the next prompt from nothing.
                self.clear();
                return Err(e);
            }
        };
        let (prefill, layers) = match out {
            Scheduled::Done(p, l) => (p, l),
            Scheduled::NeedsFresh => {
                self.clear();
                return self.prefill_observed(prompt, pruner, prune_key, reserve, after_layer);
            }
        };
        self.layers = layers;
        self.keys = keys;
        self.prune_key = Some(prune_key.clone());
        self.next_pos = n;
        self.report = Some(prefill.report.clone());
        self.stats = prefill.stats.clone();
        Ok(prefill)
    }

    /// Prefills embeddings given directly (`embeds [S, H]`, the images already spliced
    /// over `spans`, in prompt order), e.g. a reference's inputs; nothing is reused before
    /// or after it.
    pub fn prefill_embeds(
        &mut self,
        embeds: &Tensor,
        spans: &[ImageSpan],
        pruner: &mut dyn Pruner,
        reserve: usize,
    ) -> Result<Prefill> {
        let n = embeds.dims()[0];
        if n == 0 {
            return Err(Error::msg("cannot prefill an empty prompt"));
        }
        SpanMap::new(spans, n)?;
        self.clear();
        let sched = LayerScheduler {
            llama: &self.llama,
            b: self.backend.as_ref(),
        };
        let out = sched.prefill(
            embeds.clone(),
            n,
            spans,
            pruner,
            0,
            reserve,
            &[],
            &mut self.cache,
            &mut |_| Ok(()),
        );
        match out {
            Ok(Scheduled::Done(p, _)) => {
                self.next_pos = n;
                self.report = Some(p.report.clone());
                self.stats = p.stats.clone();
                Ok(p)
            }
            Ok(Scheduled::NeedsFresh) => Err(Error::internal("fresh prefill asked to restart")),
            Err(e) => {
                self.clear();
                Err(e)
            }
        }
    }

    /// Feeds `token` at the next position through every layer (each attends to its own
    /// cache, no masks) and returns the logits `[1, V]`. The same code as a batched step
    /// ([`step_batch`]) of one sequence.
    pub fn step(&mut self, token: u32) -> Result<Tensor> {
        step_batch(&mut [self], &[token])
    }

    /// Checks that a decode step may run: a prefill happened and the context has room.
    fn check_step(&self) -> Result<()> {
        if self.cache.layers.len() != self.llama.num_layers() {
            return Err(Error::msg("decode step before any prefill"));
        }
        let ctx = self.llama.config().max_position_embeddings;
        if self.next_pos >= ctx {
            return Err(Error::msg(format!(
                "position {} is past the model's context of {ctx}",
                self.next_pos
            )));
        }
        Ok(())
    }

    /// Decoding after a prefill whose logits are `first`: yields up to `max_new` tokens,
    /// stopping after an EOS token (which is yielded). Each token is fed to the cache only
    /// when the next one is asked for, so a caller that stops early leaves the session
    /// holding exactly the tokens it consumed before the last.
    pub fn decode<'s>(
        &'s mut self,
        first: Tensor,
        sampler: &'s mut Sampler,
        max_new: usize,
    ) -> Decode<'s> {
        let state = DecodeState::new(self, first, max_new);
        Decode {
            session: self,
            sampler,
            state,
        }
    }
}

/// One decode step for several sessions at once: `tokens[i]` is fed to `sessions[i]` at
/// its next position. The linear layers run as one `M = B` matmul over the `B` rows (each
/// weight read once per step, not once per sequence); each row attends to its own
/// session's per-layer (pruned) cache. Returns logits `[B, V]`, row `i` for session `i`,
/// equal to what `sessions[i].step(tokens[i])` alone would give, bit for bit (batch
/// invariance: the sequences go through in groups of at most
/// [`Backend::linear_batch_rows`]; the sessions must share one model and backend).
pub fn step_batch(sessions: &mut [&mut Session], tokens: &[u32]) -> Result<Tensor> {
    let n = sessions.len();
    if n == 0 || tokens.len() != n {
        return Err(Error::internal(format!(
            "batched step: {} tokens for {n} sessions",
            tokens.len()
        )));
    }
    let llama = sessions[0].llama.clone();
    let backend = sessions[0].backend.clone();
    for s in sessions.iter() {
        if !Arc::ptr_eq(&s.llama, &llama) {
            return Err(Error::internal(
                "batched step over sessions of different models",
            ));
        }
        s.check_step()?;
    }
    // Groups no larger than the backend's batch-invariant row count: each sequence's rows
    // take the same kernels, so the same bits, as when it steps alone.
    let group = backend.linear_batch_rows().max(1);
    let sched = LayerScheduler {
        llama: &llama,
        b: backend.as_ref(),
    };
    let mut parts = Vec::with_capacity(n.div_ceil(group));
    for (chunk, toks) in sessions.chunks_mut(group).zip(tokens.chunks(group)) {
        let positions: Vec<u32> = chunk.iter().map(|s| s.next_pos as u32).collect();
        let mut caches: Vec<&mut KvCache> = chunk.iter_mut().map(|s| &mut s.cache).collect();
        parts.push(sched.decode(toks, &positions, &mut caches)?);
        for s in chunk.iter_mut() {
            s.next_pos += 1;
        }
    }
    if parts.len() == 1 {
        return parts
            .pop()
            .ok_or_else(|| Error::internal("batched step: no logits"));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    backend.concat_rows(&refs) // [B, V]
}

/// Where one answer's decoding stands, owned (it borrows neither its session nor its
/// sampler), so a server can hold many and advance them together with
/// [`decode_batch`]; [`Decode`] is the one-sequence iterator over it.
#[derive(Clone)]
pub struct DecodeState {
    logits: Option<Tensor>,
    feed: Option<u32>,
    left: usize,
    eos: Vec<u32>,
    done: bool,
}

impl DecodeState {
    /// Decoding in `session` after a prefill whose logits are `first`, for up to
    /// `max_new` tokens (stopping after EOS).
    pub fn new(session: &Session, first: Tensor, max_new: usize) -> Self {
        DecodeState {
            logits: Some(first),
            feed: None,
            left: max_new,
            eos: session.llama.config().eos_token_ids.clone(),
            done: false,
        }
    }

    /// Whether no more tokens will come (EOS, `max_new` reached, an error, or [`Self::stop`]).
    pub fn is_done(&self) -> bool {
        self.done || self.left == 0
    }

    /// Ends decoding here: the last token is never fed to the session.
    pub fn stop(&mut self) {
        self.done = true;
        self.feed = None;
    }

    /// Takes the next token by sampling `host`, the pending logits already read back
    /// (what the device-side pick would sample).
    pub fn sample_host(&mut self, sampler: &mut Sampler, host: &[f32]) -> Result<u32> {
        if self.is_done() || self.feed.is_some() || self.logits.is_none() {
            return Err(Error::internal("decode: host logits given out of turn"));
        }
        self.logits = None;
        let tok = sampler.sample(host)?;
        self.accept(tok);
        Ok(tok)
    }

    fn accept(&mut self, tok: u32) {
        self.left -= 1;
        if self.eos.contains(&tok) || self.left == 0 {
            self.done = true;
        } else {
            self.feed = Some(tok);
        }
    }

    /// The next token of one sequence (feeding the previous one first).
    pub fn next(&mut self, session: &mut Session, sampler: &mut Sampler) -> Option<Result<u32>> {
        let mut one = [(session, self, sampler)];
        decode_batch(&mut one).pop().flatten()
    }
}

/// One sequence in [`decode_batch`]: its session, decoding state and sampler.
pub type DecodeItem<'a> = (&'a mut Session, &'a mut DecodeState, &'a mut Sampler);

/// Advances every unfinished item by one token: the tokens waiting to be fed go through
/// one [`step_batch`] together, then each row is sampled by its own sampler (greedy picks
/// on the device). Returns, per item, `None` when it was already done, else its next
/// token or its error (an error in the shared step is given to every item that took
/// part, and ends them).
pub fn decode_batch(items: &mut [DecodeItem]) -> Vec<Option<Result<u32>>> {
    let mut out: Vec<Option<Result<u32>>> = (0..items.len()).map(|_| None).collect();
    let live: Vec<usize> = (0..items.len())
        .filter(|&i| !items[i].1.is_done())
        .collect();
    let fed: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| items[i].1.feed.is_some())
        .collect();
    if !fed.is_empty() {
        let tokens: Vec<u32> = fed.iter().map(|&i| items[i].1.feed.unwrap_or(0)).collect();
        let stepped = {
            let mut sessions: Vec<&mut Session> = items
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| fed.contains(i))
                .map(|(_, it)| &mut *it.0)
                .collect();
            step_batch(&mut sessions, &tokens)
        };
        match stepped {
            Ok(logits) => {
                let b = items[fed[0]].0.backend.clone();
                for (r, &i) in fed.iter().enumerate() {
                    items[i].1.feed = None;
                    let row = if fed.len() == 1 {
                        Ok(logits.clone())
                    } else {
                        b.slice_rows(&logits, r, 1)
                    };
                    match row {
                        Ok(t) => items[i].1.logits = Some(t),
                        Err(e) => {
                            items[i].1.done = true;
                            out[i] = Some(Err(e));
                        }
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &i in &fed {
                    items[i].1.stop();
                    out[i] = Some(Err(Error::internal(format!("batched decode step: {msg}"))));
                }
            }
        }
    }
    for &i in &live {
        if out[i].is_some() {
            continue;
        }
        let (session, state, sampler) = &mut items[i];
        let r = match state.logits.take() {
            Some(l) => next_token(session.backend.as_ref(), &l, sampler),
            None => Err(Error::internal("decode: no logits to sample")),
        };
        out[i] = Some(match r {
            Ok(tok) => {
                state.accept(tok);
                Ok(tok)
            }
            Err(e) => {
                state.done = true;
                Err(e)
            }
        });
    }
    out
}

/// Decode steps of one sequence as an iterator of sampled token ids (see
/// [`Session::decode`]).
pub struct Decode<'s> {
    session: &'s mut Session,
    sampler: &'s mut Sampler,
    state: DecodeState,
}

impl Decode<'_> {
    /// Decodes exactly `max_new` tokens, EOS or not (benchmarks time a fixed number of
    /// steps; an EOS from random weights must not end them).
    pub fn ignore_eos(mut self) -> Self {
        self.state.eos.clear();
        self
    }

    /// Takes the next token by sampling `host`, the pending logits already read back
    /// (what [`Iterator::next`] would sample on the device).
    pub fn sample_host(&mut self, host: &[f32]) -> Result<u32> {
        self.state.sample_host(self.sampler, host)
    }
}

impl Iterator for Decode<'_> {
    type Item = Result<u32>;
    fn next(&mut self) -> Option<Result<u32>> {
        self.state.next(self.session, self.sampler)
    }
}

/// Greedy picks on the device and reads back one id; sampling reads the logits row.
pub fn next_token(b: &dyn Backend, logits: &Tensor, sampler: &mut Sampler) -> Result<u32> {
    if sampler.params().is_greedy() {
        let t = b.argmax(logits)?; // [1] u32
        let v = b.to_vec_u32(&t)?; // sync: one id
        return v
            .first()
            .copied()
            .ok_or_else(|| Error::internal("argmax returned nothing"));
    }
    sampler.sample(&b.to_vec_f32(logits)?) // sync: one logits row
}

// One per prefill: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Scheduled {
    Done(Prefill, Vec<LayerState>),
    /// Reuse needed a stored layer output that is not there: run fresh.
    NeedsFresh,
}

/// The decoder's layer loop with the pruner hook, over a session's cache.
pub struct LayerScheduler<'a> {
    /// The decoder.
    pub llama: &'a Llama,
    /// Its backend.
    pub b: &'a dyn Backend,
}

impl LayerScheduler<'_> {
    /// One decode step of `B` sequences: `tokens[i]` at unpruned `positions[i]` into
    /// `caches[i]`; every layer attends to each sequence's own cache (no masks). Returns
    /// logits `[B, V]`.
    pub fn decode(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let b = self.b;
        let mut h = self.llama.embed(b, tokens)?; // [B, H]
        let pos = b.upload(HostData::U32(positions), positions.len().into())?;
        for l in 0..self.llama.num_layers() {
            let mut kvs: Vec<&mut LayerKv> = Vec::with_capacity(caches.len());
            for c in caches.iter_mut() {
                kvs.push(
                    c.layers
                        .get_mut(l)
                        .ok_or_else(|| Error::internal("decode step: cache without layer"))?,
                );
            }
            h = self.llama.layer_step_rows(b, l, &h, &pos, &mut kvs)?;
        }
        self.llama.logits_rows(b, &h)
    }

    /// Embeddings of prompt positions `from..` (text rows looked up, image rows sliced
    /// from each image's embeddings): `[S - from, H]`.
    fn embed_from(&self, prompt: &PromptInput, from: usize) -> Result<Tensor> {
        let b = self.b;
        let ids = prompt.ids;
        let mut parts = Vec::with_capacity(2 * prompt.images.len() + 1);
        let mut at = from;
        for img in prompt.images {
            let (s, e) = (img.span.start, img.span.end);
            if e <= at || s == e {
                continue;
            }
            if at < s {
                parts.push(self.llama.embed(b, &ids[at..s])?); // [s - at, H]
            }
            let a = at.max(s);
            parts.push(if a == s {
                img.embeds.clone()
            } else {
                b.slice_rows(&img.embeds, a - s, e - a)?
            }); // [e - a, H]
            at = e;
        }
        if at < ids.len() {
            parts.push(self.llama.embed(b, &ids[at..])?); // [S - at, H]
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        if refs.len() == 1 {
            Ok(parts[0].clone())
        } else {
            b.concat_rows(&refs) // [S - from, H]
        }
    }

    /// Prefill of `prompt`, reusing `old` rows for positions `< common` while the schedule
    /// agrees (see the module docs).
    #[allow(clippy::too_many_arguments)]
    fn prefill(
        &self,
        embeds: Tensor,
        n: usize,
        spans: &[ImageSpan],
        pruner: &mut dyn Pruner,
        common: usize,
        reserve: usize,
        old: &[LayerState],
        cache: &mut KvCache,
        after_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Scheduled> {
        let b = self.b;
        let llama = self.llama;
        let num_layers = llama.num_layers();
        let map = SpanMap::new(spans, n)?;
        let has_image = !spans.is_empty();
        pruner.reset();
        // Original offsets (over every span, in prompt order) of the image rows still present.
        let mut img: Vec<usize> = (0..map.total()).collect();
        // Whether prompt position `p` stays under the current schedule.
        let present = |img: &[usize], p: usize| match map.offset(p) {
            None => true,
            Some(o) => img.binary_search(&o).is_ok(),
        };
        // The rows this call computes ("active"), by prompt position.
        let mut act: Vec<u32> = (common as u32..n as u32).collect();
        let mut h = embeds; // [S - common, H]
        let mut pos_t = b.upload(HostData::U32(&act), act.len().into())?;
        let mut reusing = common > 0;
        let mut recomputed_from = None;
        let keep_from = pruner.first_decision_layer();
        let mut stats = PrefillStats::default();
        let mut computed = Vec::with_capacity(num_layers);
        let mut layers: Vec<LayerState> = Vec::with_capacity(num_layers);
        if !reusing {
            cache.layers.clear();
        }
        for l in 0..num_layers {
            let n_img = img.len();
            let (mask_kind, capture) = if has_image && n_img > 0 {
                (pruner.mask(l), pruner.capture(l))
            } else {
                (ShallowMask::None, Capture::Nothing)
            };
            // A decision may follow this layer: from here on keep each layer's output,
            // the state a later prompt needs when its decisions differ.
            let keep_hidden = has_image && keep_from.is_some_and(|f| l >= f);
            // Prefix rows this layer keeps under the new schedule (whole spans only).
            let mut prefix_rows = 0;
            if reusing {
                let want: Vec<u32> = (0..common as u32)
                    .filter(|&p| present(&img, p as usize))
                    .collect();
                let o = &old[l].rows;
                let m = o.partition_point(|&p| (p as usize) < common);
                if o[..m] == want[..] {
                    prefix_rows = m;
                    cache.layers[l].len = m;
                } else {
                    // The schedules part here: the prefix rows re-enter from the previous
                    // layer's output (stored by the earlier prefill).
                    let Some(prev) = l.checked_sub(1).map(|p| &old[p]) else {
                        return Ok(Scheduled::NeedsFresh);
                    };
                    let Some(hid) = prev.hidden.as_ref().filter(|h| h.rows() == prev.rows.len())
                    else {
                        return Ok(Scheduled::NeedsFresh);
                    };
                    let mut idx = Vec::with_capacity(want.len());
                    for p in &want {
                        match prev.rows.binary_search(p) {
                            Ok(i) => idx.push(i as u32),
                            Err(_) => return Ok(Scheduled::NeedsFresh),
                        }
                    }
                    let ph = hid.gather(b, &idx)?; // [P, H]
                    h = b.concat_rows(&[&ph, &h])?; // [P + A, H]
                    act = want.into_iter().chain(act).collect();
                    pos_t = b.upload(HostData::U32(&act), act.len().into())?;
                    reusing = false;
                    recomputed_from = Some(l);
                    cache.layers.truncate(l);
                }
            }
            let cur = prefix_rows + act.len();
            if !reusing {
                debug_assert_eq!(cache.layers.len(), l);
                cache
                    .layers
                    .push(llama.new_layer_kv(b, cur + reserve, cache.dtype)?);
            }
            let kv = &mut cache.layers[l];
            kv.reserve(b, cur + reserve)?;
            // The layer's rows by prompt position, cached or computed: its image rows (the
            // same cache rows either way) are where its mask and captures act.
            let mut rows: Vec<u32> = Vec::with_capacity(cur);
            if reusing {
                rows.extend_from_slice(&old[l].rows[..prefix_rows]);
            }
            rows.extend_from_slice(&act);
            let runs = if has_image {
                image_runs(&map, &rows)
            } else {
                Vec::new()
            };
            let mask = mask_kind
                .attention_mask_runs(&runs)
                .map_err(|e| Error::msg(format!("layer {l}: {e}")))?;
            let (nh, captured) =
                llama.layer_forward(b, l, &h, &pos_t, kv, mask, Some((capture, &runs)))?;
            h = nh;
            let mut hidden = None;
            if reusing {
                if keep_hidden {
                    hidden = old[l].hidden.as_ref().map(|o| o.truncated(prefix_rows));
                }
            } else if keep_hidden {
                hidden = Some(Hidden::default());
            }
            if let Some(hd) = hidden.as_mut() {
                hd.parts.push((h.clone(), 0, act.len()));
            }
            layers.push(LayerState { rows, hidden });
            stats.layer_seq_lens.push(cur);
            stats.layer_image_lens.push(n_img);
            stats.layer_masks.push(mask_kind);
            stats.layer_image_runs.push(runs);
            computed.push(act.len());
            if !has_image || n_img == 0 {
                after_layer(l)?;
                continue;
            }
            let (contributions, last_row) = match &captured {
                Captured::None => (None, None),
                Captured::Contributions(c) => (Some(c.as_slice()), None),
                Captured::LastRowImageAttention(a) => (None, Some(a.as_slice())),
            };
            let view = LayerView {
                layer: l,
                num_layers,
                image_tokens: &img,
                contributions,
                last_row_image_attention: last_row,
            };
            let action = pruner
                .after_layer(&view)
                .map_err(|e| Error::internal(format!("pruner: {e}")))?;
            if let Action::Keep(keep) = action {
                for off in &keep {
                    if img.binary_search(off).is_err() {
                        return Err(Error::internal(format!(
                            "pruner kept image token {off}, which layer {l} did not hold"
                        )));
                    }
                }
                // Active rows to keep: text rows and the kept image rows.
                let mut idx = Vec::with_capacity(act.len());
                let mut kept_pos = Vec::with_capacity(act.len());
                for (i, &p) in act.iter().enumerate() {
                    if present(&keep, p as usize) {
                        idx.push(i as u32);
                        kept_pos.push(p);
                    }
                }
                if kept_pos.len() != act.len() {
                    let it = b.upload(HostData::U32(&idx), idx.len().into())?;
                    h = b.gather_rows(&h, &it)?; // [S', H]
                    act = kept_pos;
                    pos_t = b.upload(HostData::U32(&act), act.len().into())?;
                }
                img = keep;
            }
            after_layer(l)?;
        }
        let logits = llama.logits_last(b, &h)?; // [1, V]
        Ok(Scheduled::Done(
            Prefill {
                logits,
                stats,
                report: pruner.report(),
                reused_tokens: common,
                recomputed_from_layer: if common > 0 { recomputed_from } else { None },
                computed_rows: computed,
            },
            layers,
        ))
    }
}

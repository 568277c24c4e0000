//! LLaVA-1.5 end to end: loading a llava-hf directory, the image path (preprocess → CLIP →
//! projector → splice at the `<image>` span), and generation (pruning-aware prefill, then
//! decode with streaming text).
//!
//! ```no_run
//! # fn main() -> engine_core::Result<()> {
//! use std::sync::Arc;
//! use models::llava::{GenerateOptions, Llava};
//! let backend = Arc::new(engine_core::CpuBackend::new());
//! let llava = Llava::load("llava-1.5-7b-hf".as_ref(), backend)?;
//! let image = models::preprocess::load_image("cat.png".as_ref())?;
//! let out = llava.generate("What is this?", Some(&image), &GenerateOptions::default(), &mut |t| print!("{t}"))?;
//! println!("\n{} tokens, {:.1} tokens/s", out.tokens.len(), out.decode_tokens_per_s);
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engine_core::weights::{open_safetensors, WeightSource, WeightView, Weights};
use engine_core::{Backend, DType, DeviceInfo, Error, HostData, Result, Tensor};
use image::{Rgb, RgbImage};
use pruner::{FlopsReport, FlopsShape, LayerSchedule, PruneConfig, PruneReport};

use crate::clip::{ClipVision, Projector};
use crate::config::{Arch, FeatureSelect, LlavaConfig};
use crate::llama::{ImageSpan, Llama, PrefillStats};
use crate::preprocess::{ImageProcessor, PadMode, PixelValues, ResizeTarget};
use crate::preprocess_next::{preprocess_next, NextLayout, NextToken};
use crate::prompt::{PromptIds, PromptTokenizer, Template, TextStream};
use crate::sampling::{Sampler, SamplingParams};
use crate::session::{DecodeState, ImageInput, Prefill, PrefixKey, PromptInput, Session};

/// Which tensor names a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// transformers < 4.52: `language_model.model.*`, `vision_tower.*`,
    /// `multi_modal_projector.*`, `language_model.lm_head.*`.
    Old,
    /// transformers >= 4.52: `model.language_model.*`, `model.vision_tower.*`,
    /// `model.multi_modal_projector.*`, `lm_head.*`.
    New,
    /// MobileVLM (`MobileLlamaForCausalLM`): `model.*`, `lm_head.*`, `model.mm_projector.*`,
    /// the tower at `model.vision_tower.vision_tower.*` or in its own directory.
    MobileVlm,
}

/// The image projector of a family.
enum ImageProjector {
    /// LLaVA's Linear, activation, Linear.
    Mlp(Projector),
    /// MobileVLM V2's LDPv2 (MLP, 12×12 pool, positional conv).
    LdpV2(crate::mobilevlm::LdpV2Projector),
}

impl ImageProjector {
    fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        match self {
            ImageProjector::Mlp(p) => p.forward(b, x),
            ImageProjector::LdpV2(p) => p.forward(b, x),
        }
    }
}

/// Load progress callback: `(bytes_read, total_bytes)`.
pub type LoadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A weight source that reports the bytes handed out so far (each tensor is read once
/// while loading, so the running sum tracks the upload).
struct ProgressSource {
    inner: Arc<dyn WeightSource>,
    done: AtomicU64,
    cb: LoadProgress,
}

impl ProgressSource {
    fn wrap(inner: Arc<dyn WeightSource>, cb: LoadProgress) -> Arc<dyn WeightSource> {
        Arc::new(ProgressSource {
            inner,
            done: AtomicU64::new(0),
            cb,
        })
    }
}

impl WeightSource for ProgressSource {
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        let v = self.inner.view(name)?;
        let total = self.inner.total_bytes();
        let done = self
            .done
            .fetch_add(v.bytes.len() as u64, Ordering::Relaxed)
            .saturating_add(v.bytes.len() as u64);
        (self.cb)(done.min(total), total);
        Ok(v)
    }
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }
}

/// A loaded LLaVA model with its tokenizer and image processor, on one backend.
pub struct Llava {
    cfg: LlavaConfig,
    backend: Arc<dyn Backend>,
    vision: ClipVision,
    projector: ImageProjector,
    llama: Arc<Llama>,
    /// LLaVA-NeXT's `image_newline` `[1, H]` (f32), closing every row of tile features.
    image_newline: Option<Tensor>,
    tokenizer: PromptTokenizer,
    processor: ImageProcessor,
    naming: Naming,
    load_ms: f64,
    images: Mutex<Vec<EncodedImage>>,
}

/// Encoded images kept for reuse (most recent last).
const IMAGE_CACHE_ENTRIES: usize = 8;

/// An image as the model takes it in.
pub struct EncodedImage {
    /// The uint8 picture the vision tower saw (after crop/pad and resize; LLaVA-NeXT: the
    /// base tile, the whole image squashed to the tower's size).
    pub seen: RgbImage,
    /// Normalised pixels `[3, H, W]` (LLaVA-NeXT: the base tile's).
    pub pixel_values: PixelValues,
    /// LLaVA-NeXT: every tile's normalised pixels, base tile first (empty for LLaVA-1.5).
    pub tiles: Vec<PixelValues>,
    /// LLaVA-NeXT: where each image token comes from (`None` for LLaVA-1.5).
    pub layout: Option<NextLayout>,
    /// Selected vision-tower hidden states `[N, vision_hidden]`.
    pub features: Tensor,
    /// Projector output `[N, text_hidden]`: what replaces the `<image>` span.
    pub embeds: Tensor,
    /// Milliseconds spent (preprocess, vision tower, projector; synchronised); 0 when the
    /// encoding came from the model's image cache.
    pub ms: f64,
    /// Content key of the normalised pixels (equal keys, equal embeddings).
    pub key: u64,
    /// Whether the vision tower was skipped because the same pixels were encoded before.
    pub cached: bool,
}

impl Clone for EncodedImage {
    fn clone(&self) -> Self {
        EncodedImage {
            seen: self.seen.clone(),
            pixel_values: self.pixel_values.clone(),
            tiles: self.tiles.clone(),
            layout: self.layout.clone(),
            features: self.features.clone(),
            embeds: self.embeds.clone(),
            ms: self.ms,
            key: self.key,
            cached: self.cached,
        }
    }
}

/// A 64-bit content key of normalised pixels (FNV-1a over the f32 bits and the shape).
pub fn pixel_key(pv: &PixelValues) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |w: u32| {
        for byte in w.to_le_bytes() {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(pv.height as u32);
    eat(pv.width as u32);
    for v in &pv.data {
        eat(v.to_bits());
    }
    h
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Prompt template.
    pub template: Template,
    /// `crop` (llava-hf's processor) or `pad` (original LLaVA-1.5 `expand2square`).
    pub image_mode: PadMode,
    /// Upper bound on generated tokens (also capped by the context length).
    pub max_new_tokens: usize,
    /// Greedy by default.
    pub sampling: SamplingParams,
    /// `None`: the paper's VisiPruner config when it fits the model, else dense (the
    /// fallback is noted in [`Generation::prune_note`]). `Some(cfg)`: exactly `cfg`, an
    /// error when it does not fit; `Some(PruneConfig::Dense)` runs dense.
    pub prune: Option<PruneConfig>,
    /// Read back the first step's full logits into [`Generation::first_logits`].
    pub keep_first_logits: bool,
    /// Element type of the KV cache: `F16` (default) or `F32`.
    pub kv_dtype: DType,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            template: Template::VicunaV1,
            image_mode: PadMode::Crop,
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            prune: None,
            keep_first_logits: false,
            kv_dtype: DType::F16,
        }
    }
}

/// Wall-clock milliseconds per phase (each ends with a device sync).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Model loading (config, tokenizer, weights upload).
    pub load_ms: f64,
    /// Preprocessing, vision tower and projector.
    pub vision_ms: f64,
    /// Prompt prefill through the first token.
    pub prefill_ms: f64,
    /// Every decode step after the first token.
    pub decode_ms: f64,
}

/// The result of [`Llava::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated token ids (EOS included when it ended the answer).
    pub tokens: Vec<u32>,
    /// Decoded answer, special tokens skipped.
    pub text: String,
    /// Prompt length after `<image>` expansion.
    pub prompt_tokens: usize,
    /// Image tokens in the prompt, all images together (0 without an image).
    pub image_tokens: usize,
    /// Where the image sits in the prompt (one-image prompts; see `image_spans`).
    pub image_span: Option<ImageSpan>,
    /// Where every image sits in the prompt, in order.
    pub image_spans: Vec<ImageSpan>,
    /// Whether EOS ended generation.
    pub stopped_by_eos: bool,
    /// Whether the caller's stop signal (Ctrl-C) ended generation early.
    pub interrupted: bool,
    /// Phase timings.
    pub timings: Timings,
    /// Decode steps per second (tokens after the first).
    pub decode_tokens_per_s: f64,
    /// The pruning config that ran (after the default's fit check).
    pub prune_config: PruneConfig,
    /// Why the requested default pruning did not run, when it did not.
    pub prune_note: Option<String>,
    /// What the pruner decided.
    pub prune: PruneReport,
    /// Sequence length each decoder layer processed in prefill.
    pub layer_seq_lens: Vec<usize>,
    /// Image tokens each decoder layer processed in prefill.
    pub layer_image_lens: Vec<usize>,
    /// KV rows each layer holds at the end.
    pub kv_lens: Vec<usize>,
    /// Leading prompt tokens whose KV came from the session's previous prompt.
    pub reused_tokens: usize,
    /// The first layer whose prefix rows were recomputed because this prompt's pruning
    /// decisions differed from the previous prompt's.
    pub recomputed_from_layer: Option<usize>,
    /// Rows actually computed per layer in prefill.
    pub computed_rows: Vec<usize>,
    /// Bytes of K and V held at the end (in the cache's dtype).
    pub kv_bytes: u64,
    /// The KV cache's element type this answer ran with (`F16` by default; transformers'
    /// logits are matched bit for bit only with `F32`).
    pub kv_dtype: DType,
    /// Prefill FLOPs as scheduled (vision tower and projector included) and dense.
    pub flops: FlopsReport,
    /// Logits of the first generated position `[vocab]`, when asked for.
    pub first_logits: Option<Vec<f32>>,
    /// The picture the vision tower saw.
    pub seen_image: Option<RgbImage>,
}

/// One answer being generated (see [`Llava::begin`]): its decoding state, sampler,
/// detokenizer, tokens so far and prefill results. Owned, so a server can hold many.
pub struct Answer {
    /// Where decoding stands (for [`crate::session::decode_batch`]).
    pub decode: DecodeState,
    /// This answer's sampler (its own seed).
    pub sampler: Sampler,
    stream: TextStream,
    /// Tokens taken so far (EOS included when it ended the answer).
    pub tokens: Vec<u32>,
    /// Upper bound on tokens (the request's, capped by the context).
    pub max_new: usize,
    /// Prompt length after `<image>` expansion.
    pub prompt_tokens: usize,
    spans: Vec<ImageSpan>,
    /// The prompt's length before a pre-decoder selection shortened it (FLOPs' dense side).
    dense_len: Option<usize>,
    /// Vision-tower passes its images took (LLaVA-NeXT: one per tile).
    vision_passes: usize,
    vision_ms: f64,
    seen_image: Option<RgbImage>,
    /// The pruning config that runs.
    pub prune_config: PruneConfig,
    prune_note: Option<String>,
    /// The prefill's results (schedule, report, reuse).
    pub prefill: Prefill,
    first_logits: Option<Vec<f32>>,
    t0: Instant,
    prefill_ms: Option<f64>,
    t1: Option<Instant>,
    stopped_by_eos: bool,
}

impl Answer {
    /// Records `tok`, just taken by this answer (batched callers call this for each token
    /// [`crate::session::decode_batch`] gives it). The first token closes the prefill
    /// timing.
    pub fn push_token(&mut self, tok: u32) {
        if self.tokens.is_empty() {
            self.prefill_ms = Some(self.t0.elapsed().as_secs_f64() * 1e3);
            self.t1 = Some(Instant::now());
        }
        self.tokens.push(tok);
    }
}

impl Llava {
    /// Loads a llava-hf directory: `config.json`, `tokenizer.json`,
    /// `preprocessor_config.json` (CLIP defaults at the tower's size when absent) and
    /// `model.safetensors` or a sharded checkpoint, memory-mapped, in either naming scheme.
    pub fn load(dir: &Path, backend: Arc<dyn Backend>) -> Result<Self> {
        Self::load_with_progress(dir, backend, None)
    }

    /// [`Llava::load`], calling `progress(bytes_read, total_bytes)` as weights are read and
    /// uploaded (for a progress bar; `total_bytes` is the checkpoint's size on disk).
    pub fn load_with_progress(
        dir: &Path,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
    ) -> Result<Self> {
        Self::load_quantized(dir, backend, progress, None)
    }

    /// [`Llava::load_with_progress`], quantizing every float matrix whose rows are whole
    /// blocks to `quant` as it is read (see `Weights::with_quant`); needs a backend with
    /// quantized kernels (the CPU backend).
    pub fn load_quantized(
        dir: &Path,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
        quant: Option<engine_core::QuantType>,
    ) -> Result<Self> {
        Self::load_with_tower(dir, backend, progress, quant, None)
    }

    /// [`Llava::load_quantized`] for any supported family (picked from `config.json`);
    /// `vision_tower` overrides a MobileVLM config's `mm_vision_tower` directory (ignored by
    /// the LLaVA families, whose tower is in the checkpoint).
    pub fn load_with_tower(
        dir: &Path,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
        quant: Option<engine_core::QuantType>,
        vision_tower: Option<&Path>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        if !dir.is_dir() {
            return Err(Error::file(
                dir,
                "not a directory (expected a llava-hf model directory)",
            ));
        }
        if crate::mobilevlm::config::is_mobilevlm(&dir.join("config.json"))? {
            return Self::load_mobilevlm(t0, dir, backend, progress, quant, vision_tower);
        }
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        // A tokenizer.json far larger than the vocabulary needs is refused before parsing.
        crate::prompt::check_tokenizer_file(&dir.join("tokenizer.json"), cfg.text.vocab_size)?;
        let tokenizer =
            PromptTokenizer::from_file(&dir.join("tokenizer.json"), cfg.image_token_index)?;
        let pp = dir.join("preprocessor_config.json");
        // exists(), not is_file(): a FIFO or device there is an error, not a default.
        let processor = if pp.exists() {
            let p = ImageProcessor::from_file(&pp)?;
            crate::checks::check_processor(&p, &cfg, &pp)?;
            p
        } else {
            let s = cfg.vision.image_size;
            ImageProcessor {
                size: ResizeTarget::ShortestEdge(s),
                crop_size: (s, s),
                ..Default::default()
            }
        };
        crate::checks::check_tokenizer(
            tokenizer.inner().get_vocab_size(true),
            &cfg,
            &dir.join("tokenizer.json"),
        )?;
        let source = open_safetensors(dir)?;
        crate::checks::check_layers(
            &cfg,
            source.as_ref(),
            "config.json: text_config.num_hidden_layers",
        )?;
        Self::build(
            t0, cfg, tokenizer, processor, source, backend, progress, quant,
        )
    }

    /// Loads llama.cpp's LLaVA pair: the Llama text GGUF (`general.architecture = llama`,
    /// tokenizer rebuilt from its metadata) and the `mmproj` GGUF (CLIP tower and `mlp`
    /// projector). Tensors may be F32, F16, BF16, Q8_0, Q4_0, Q4_1 or Q4_K; `quant`
    /// additionally quantizes float matrices at load as in [`Llava::load_quantized`].
    /// A pair whose halves do not fit (projector width vs text hidden size) is an error.
    pub fn load_gguf(
        text: &Path,
        mmproj: &Path,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
        quant: Option<engine_core::QuantType>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let parts = crate::gguf_llava::open_pair(text, mmproj)?;
        crate::checks::check_layers(
            &parts.config,
            parts.source.as_ref(),
            &format!("{}: llama.block_count", text.display()),
        )?;
        let tokenizer = PromptTokenizer::new(parts.tokenizer, parts.config.image_token_index);
        Self::build(
            t0,
            parts.config,
            tokenizer,
            parts.processor,
            parts.source,
            backend,
            progress,
            quant,
        )
    }

    /// A LLaVA of `shape` over seeded synthetic weights ([`crate::synthetic`]) with the
    /// `tokenizer.json` at `tokenizer` and CLIP's default image processor at the tower's
    /// size: real shapes and real prompts (answers are noise), for serving benchmarks. The
    /// vocabulary grows to the tokenizer's when that is larger.
    pub fn load_synthetic(
        shape: crate::synthetic::SyntheticShape,
        seed: u64,
        tokenizer: &Path,
        backend: Arc<dyn Backend>,
        quant: Option<engine_core::QuantType>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let mut cfg = shape.config()?;
        let mut tok = PromptTokenizer::from_file(tokenizer, cfg.image_token_index)?;
        // A tokenizer that defines `<image>` (llava-hf's) puts it at its own id.
        if let Some(id) = tok.inner().token_to_id("<image>") {
            cfg.image_token_index = id;
            tok = PromptTokenizer::new(tok.inner().clone(), id);
        }
        // llava-hf tokenizers add `<image>` and `<pad>` past Llama's 32000: widen the
        // synthetic embedding and head to hold every id the tokenizer can produce.
        let n_tok = tok.inner().get_vocab_size(true);
        cfg.text.vocab_size = cfg.text.vocab_size.max(n_tok);
        let s = cfg.vision.image_size;
        let processor = ImageProcessor {
            size: ResizeTarget::ShortestEdge(s),
            crop_size: (s, s),
            ..Default::default()
        };
        let source: Arc<dyn WeightSource> =
            Arc::new(crate::synthetic::SyntheticSource::new(&cfg, seed));
        Self::build(t0, cfg, tok, processor, source, backend, None, quant)
    }

    /// A MobileVLM V2 directory (see [`crate::mobilevlm`]).
    fn load_mobilevlm(
        t0: Instant,
        dir: &Path,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
        quant: Option<engine_core::QuantType>,
        vision_tower: Option<&Path>,
    ) -> Result<Self> {
        use crate::mobilevlm::{config::TOWER_PREFIX, TowerSource};
        let mut source = open_safetensors(dir)?;
        let setup = crate::mobilevlm::read_config(dir, source.as_ref(), vision_tower)?;
        let cfg = setup.cfg;
        let tok_path = dir.join("tokenizer.json");
        crate::prompt::check_tokenizer_file(&tok_path, cfg.text.vocab_size)?;
        let tokenizer = PromptTokenizer::from_file(&tok_path, cfg.image_token_index)?
            .with_image_chunks(cfg.text.bos_token_id);
        crate::checks::check_tokenizer(tokenizer.inner().get_vocab_size(true), &cfg, &tok_path)?;
        crate::checks::check_text_layers(
            cfg.text.num_hidden_layers,
            &source.names(),
            &format!("{}: num_hidden_layers", dir.join("config.json").display()),
        )?;
        let tower_source = match &setup.tower {
            TowerSource::Checkpoint => None,
            TowerSource::Dir(d) => Some(open_safetensors(d)?),
        };
        if let Some(cb) = progress {
            source = ProgressSource::wrap(source, cb);
        }
        let w = Weights::new(source.clone(), backend.clone()).with_quant(quant);
        let vision = match &tower_source {
            None => ClipVision::load(&w.pp(TOWER_PREFIX), &cfg)?,
            Some(ts) => {
                let tw = Weights::new(ts.clone(), backend.clone()).with_quant(quant);
                ClipVision::load(&tw, &cfg)?
            }
        };
        let projector = ImageProjector::LdpV2(crate::mobilevlm::LdpV2Projector::load(
            &w.pp("model.mm_projector"),
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            crate::mobilevlm::POOL_GRID,
        )?);
        let llama = Arc::new(Llama::load(&w.pp("model"), &w.pp("lm_head"), &cfg.text)?);
        backend.sync()?;
        Ok(Llava {
            cfg,
            backend,
            vision,
            projector,
            llama,
            image_newline: None,
            tokenizer,
            processor: setup.processor,
            naming: Naming::MobileVlm,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            images: Mutex::new(Vec::new()),
        })
    }

    /// Uploads the weights of `source` (a llava-hf checkpoint in either naming).
    #[allow(clippy::too_many_arguments)]
    fn build(
        t0: Instant,
        cfg: LlavaConfig,
        tokenizer: PromptTokenizer,
        processor: ImageProcessor,
        mut source: Arc<dyn WeightSource>,
        backend: Arc<dyn Backend>,
        progress: Option<LoadProgress>,
        quant: Option<engine_core::QuantType>,
    ) -> Result<Self> {
        if let Some(cb) = progress {
            source = ProgressSource::wrap(source, cb);
        }
        let w = Weights::new(source.clone(), backend.clone()).with_quant(quant);
        let naming = if source.contains("language_model.model.embed_tokens.weight") {
            Naming::Old
        } else if source.contains("model.language_model.embed_tokens.weight") {
            Naming::New
        } else {
            return Err(Error::weight(
                "language_model.model.embed_tokens.weight",
                "missing (nor is there model.language_model.embed_tokens.weight): not a llava-hf checkpoint",
            ));
        };
        let (vt, mm, lm, head) = match naming {
            Naming::Old => (
                "vision_tower",
                "multi_modal_projector",
                "language_model.model",
                "language_model.lm_head",
            ),
            Naming::New | Naming::MobileVlm => (
                "model.vision_tower",
                "model.multi_modal_projector",
                "model.language_model",
                "lm_head",
            ),
        };
        let vision = ClipVision::load(&w.pp(vt), &cfg)?;
        let projector = ImageProjector::Mlp(Projector::load(&w.pp(mm), &cfg)?);
        let llama = Arc::new(Llama::load(&w.pp(lm), &w.pp(head), &cfg.text)?);
        let image_newline = match cfg.arch {
            Arch::Llava | Arch::MobileVlm => None,
            Arch::LlavaNext => {
                let name = match naming {
                    Naming::Old => "image_newline",
                    Naming::New | Naming::MobileVlm => "model.image_newline",
                };
                let h = cfg.text.hidden_size;
                Some(w.get_f32(name, &[h])?.reshape([1, h])?)
            }
        };
        backend.sync()?;
        Ok(Llava {
            cfg,
            backend,
            vision,
            projector,
            llama,
            image_newline,
            tokenizer,
            processor,
            naming,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            images: Mutex::new(Vec::new()),
        })
    }

    /// The parsed config.
    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }
    /// The backend the weights live on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// What the backend runs on.
    pub fn device_info(&self) -> DeviceInfo {
        self.backend.device_info()
    }
    /// The tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }
    /// The image processor (from `preprocessor_config.json`).
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
    /// The checkpoint's tensor naming scheme.
    pub fn naming(&self) -> Naming {
        self.naming
    }
    /// Milliseconds [`Llava::load`] took.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }
    /// The decoder.
    pub fn llama(&self) -> &Llama {
        &self.llama
    }
    /// The decoder, shared (sessions hold it).
    pub fn llama_arc(&self) -> &Arc<Llama> {
        &self.llama
    }

    /// Tokenises a prompt for this model (`<image>` expanded when `with_image`) and checks
    /// that it fits the context. LLaVA-NeXT's image-token count depends on the image's
    /// size: use [`Llava::prompt_images`] there.
    pub fn prompt(&self, template: Template, text: &str, with_image: bool) -> Result<PromptIds> {
        if with_image && self.cfg.arch == Arch::LlavaNext {
            return Err(Error::msg(
                "a LLaVA-NeXT prompt needs the image's size (Llava::prompt_images)",
            ));
        }
        let n = with_image.then(|| self.cfg.image_tokens());
        self.prompt_images(template, text, n.as_slice())
    }

    /// Image tokens an image of `width`×`height` pixels takes in the prompt (LLaVA-1.5: the
    /// same for every image; LLaVA-NeXT: as transformers' `LlavaNextProcessor` counts).
    pub fn image_tokens_for(&self, width: u32, height: u32) -> Result<usize> {
        match self.cfg.arch {
            Arch::Llava | Arch::MobileVlm => Ok(self.cfg.image_tokens()),
            Arch::LlavaNext => Ok(self.next_layout(width, height)?.num_tokens()),
        }
    }

    fn next_layout(&self, width: u32, height: u32) -> Result<NextLayout> {
        NextLayout::new(
            (height as usize, width as usize),
            &self.cfg.image_grid_pinpoints,
            self.cfg.vision.image_size,
            self.cfg.vision.patch_size,
        )
    }

    /// Tokenises a prompt whose i-th `<image>` takes `image_tokens[i]` positions (see
    /// [`Llava::image_tokens_for`]) and checks that it fits the context.
    pub fn prompt_images(
        &self,
        template: Template,
        text: &str,
        image_tokens: &[usize],
    ) -> Result<PromptIds> {
        let p = self.tokenizer.build_images(template, text, image_tokens)?;
        let ctx = self.cfg.text.max_position_embeddings;
        if p.ids.len() >= ctx {
            return Err(Error::msg(format!(
                "the prompt is {} tokens, which leaves no room in the model's context of {ctx}",
                p.ids.len()
            )));
        }
        Ok(p)
    }

    /// Preprocess, vision tower and projector (LLaVA-NeXT: tiles, features packed with
    /// newlines; `mode` does not apply there).
    pub fn encode_image(&self, img: &RgbImage, mode: PadMode) -> Result<EncodedImage> {
        if self.cfg.arch == Arch::LlavaNext {
            return self.encode_next(img);
        }
        let t0 = Instant::now();
        // MobileVLM V2's configs say `image_aspect_ratio: pad` (the only one it loads).
        let mode = if self.cfg.arch == Arch::MobileVlm {
            PadMode::Pad
        } else {
            mode
        };
        let seen = self.processor.prepare(img, mode)?;
        let pixel_values = self.processor.normalize(&seen);
        let mut enc = self.encode_pixels(seen, pixel_values)?;
        enc.ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(enc)
    }

    /// Vision tower and projector over already normalised pixels `[3, S, S]` (`seen` is
    /// kept for drawing only).
    pub fn encode_pixels(&self, seen: RgbImage, pixel_values: PixelValues) -> Result<EncodedImage> {
        let t0 = Instant::now();
        let b = self.backend.as_ref();
        let s = self.cfg.vision.image_size;
        if (pixel_values.height, pixel_values.width) != (s, s)
            || pixel_values.data.len() != 3 * s * s
        {
            return Err(Error::msg(format!(
                "pixel values are {}x{} but the vision tower takes {s}x{s} (check preprocessor_config.json)",
                pixel_values.width, pixel_values.height
            )));
        }
        let key = pixel_key(&pixel_values);
        if let Ok(cache) = self.images.lock() {
            if let Some(hit) = cache.iter().find(|e| e.key == key) {
                return Ok(EncodedImage {
                    seen,
                    ms: 0.0,
                    cached: true,
                    ..hit.clone()
                });
            }
        }
        let shape = vec![3, s, s];
        let pixels = b.upload(HostData::F32(&pixel_values.data), shape.into())?; // [3, S, S]
        let features = self.vision.forward(b, &pixels)?; // [N, Dv]
        let embeds = self.projector.forward(b, &features)?; // [N, H]
        b.sync()?;
        let enc = EncodedImage {
            seen,
            pixel_values,
            tiles: Vec::new(),
            layout: None,
            features,
            embeds,
            ms: t0.elapsed().as_secs_f64() * 1e3,
            key,
            cached: false,
        };
        if let Ok(mut cache) = self.images.lock() {
            if cache.len() >= IMAGE_CACHE_ENTRIES {
                cache.remove(0);
            }
            cache.push(enc.clone());
        }
        Ok(enc)
    }

    /// LLaVA-NeXT: preprocess into tiles, then [`Llava::encode_tiles`].
    fn encode_next(&self, img: &RgbImage) -> Result<EncodedImage> {
        let t0 = Instant::now();
        let v = &self.cfg.vision;
        let px = preprocess_next(
            &self.processor,
            img,
            &self.cfg.image_grid_pinpoints,
            v.image_size,
            v.patch_size,
        )?;
        let seen =
            crate::preprocess::resize(img, v.image_size, v.image_size, self.processor.resample)?;
        let mut enc = self.encode_tiles(seen, px.layout, px.tiles)?;
        enc.ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(enc)
    }

    /// LLaVA-NeXT's features for already normalised tiles (base tile first), exactly as
    /// `LlavaNextForConditionalGeneration.pack_image_features`: every tile through the
    /// vision tower and projector, the grid tiles laid out on one canvas, unpadded, an
    /// `image_newline` after every row, the base tile's features first.
    pub fn encode_tiles(
        &self,
        seen: RgbImage,
        layout: NextLayout,
        tiles: Vec<PixelValues>,
    ) -> Result<EncodedImage> {
        let t0 = Instant::now();
        let b = self.backend.as_ref();
        let newline = self.image_newline.as_ref().ok_or_else(|| {
            Error::msg("this checkpoint has no image_newline (not a LLaVA-NeXT model)")
        })?;
        let want = 1 + layout.tiles.0 * layout.tiles.1;
        if tiles.len() != want {
            return Err(Error::msg(format!(
                "{} tiles given but the image's {}x{} grid needs {want} (base tile included)",
                tiles.len(),
                layout.tiles.1,
                layout.tiles.0
            )));
        }
        let mut features = Vec::with_capacity(tiles.len());
        let mut projected = Vec::with_capacity(tiles.len() + 1);
        let mut keys = Vec::with_capacity(tiles.len());
        let mut cached = true;
        for t in &tiles {
            let enc = self.encode_pixels(RgbImage::new(1, 1), t.clone())?;
            keys.push(enc.key);
            cached &= enc.cached;
            features.push(enc.features); // [g², Dv]
            projected.push(enc.embeds); // [g², H]
        }
        let per_tile = layout.grid * layout.grid;
        if projected[0].dims()[0] != per_tile {
            return Err(Error::msg(format!(
                "the vision tower gives {} features per tile, the layout expects {per_tile}",
                projected[0].dims()[0]
            )));
        }
        let embeds = pack_next_features(b, &projected, newline, &layout)?; // [N, H]
        let frefs: Vec<&Tensor> = features.iter().collect();
        let features = b.concat_rows(&frefs)?; // [tiles·g², Dv]
        b.sync()?;
        // The image's key: its tiles' keys and what the packing kept of them (equal keys,
        // equal packed features).
        let l = &layout;
        let mut key = pixel_key(&PixelValues {
            data: [l.tiles.0, l.tiles.1, l.rows.0, l.rows.1, l.cols.0, l.cols.1]
                .iter()
                .map(|&v| v as f32)
                .collect(),
            height: l.grid,
            width: 0,
        });
        for k in &keys {
            key = (key ^ k).wrapping_mul(0x0100_0000_01b3);
        }
        Ok(EncodedImage {
            seen,
            pixel_values: tiles[0].clone(),
            tiles,
            layout: Some(layout),
            features,
            embeds,
            ms: t0.elapsed().as_secs_f64() * 1e3,
            key,
            cached,
        })
    }

    /// [`Llava::resolve_prune`] for a prompt with `spans`: over more separate images than
    /// the engine's mask rules hold (see `pruner::ShallowMask::attention_mask_runs`), the
    /// default runs VisiPruner's middle and deep stages only and says so.
    pub fn resolve_prune_for(
        &self,
        req: Option<&PruneConfig>,
        spans: &[ImageSpan],
    ) -> Result<(PruneConfig, Option<String>)> {
        let (plan, note) = self.resolve_plan(req, spans)?;
        Ok((plan.config().clone(), note))
    }

    /// [`Llava::resolve_prune_for`] as the plan a request runs: the config checked once
    /// against this model's depth and the prompt's image spans (the budget `keep`).
    pub fn resolve_plan(
        &self,
        req: Option<&PruneConfig>,
        spans: &[ImageSpan],
    ) -> Result<(pruner::PrunePlan, Option<String>)> {
        let (cfg, note) = self.resolve_default_for(req, spans)?;
        let n = self.cfg.text.num_hidden_layers;
        let counts: Vec<usize> = spans.iter().map(|s| s.end - s.start).collect();
        let plan = pruner::PrunePlan::new(cfg, n, &counts).map_err(|e| {
            Error::msg(format!(
                "pruning config does not fit this {n}-layer model: {e}"
            ))
        })?;
        Ok((plan, note))
    }

    /// The config for `req` (the paper default when `None`, adapted to the prompt's images).
    fn resolve_default_for(
        &self,
        req: Option<&PruneConfig>,
        spans: &[ImageSpan],
    ) -> Result<(PruneConfig, Option<String>)> {
        let n = self.cfg.text.num_hidden_layers;
        let (cfg, note) = match req {
            Some(cfg) => (cfg.clone(), None),
            None => PruneConfig::paper_default_for(n),
        };
        // The image runs of layer 0 (adjacent spans are one run).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for sp in spans.iter().filter(|s| s.start < s.end) {
            match runs.last_mut() {
                Some(last) if last.1 == sp.start => last.1 = sp.end,
                _ => runs.push((sp.start, sp.end)),
            }
        }
        match cfg {
            PruneConfig::VisiPruner(mut v) if req.is_none() && v.mode.shallow => {
                let layer0 = match v.layer0 {
                    pruner::Layer0Policy::Sink => pruner::ShallowMask::Layer0Sink,
                    pruner::Layer0Policy::Split => pruner::ShallowMask::Layer0Split,
                    pruner::Layer0Policy::None => pruner::ShallowMask::None,
                };
                let fits = [layer0, pruner::ShallowMask::TextToImage]
                    .iter()
                    .all(|m| m.attention_mask_runs(&runs).is_ok());
                if fits {
                    return Ok((PruneConfig::VisiPruner(v), note));
                }
                v.mode.shallow = false;
                Ok((
                    PruneConfig::VisiPruner(v),
                    Some(format!(
                        "the paper's shallow masks over {} separate images need more mask rules than the engine holds; running VisiPruner's middle and deep stages",
                        runs.len()
                    )),
                ))
            }
            other => Ok((other, note)),
        }
    }

    /// Resolves the pruning request against this model: the config to run and, when the
    /// paper default had to fall back to dense, why.
    pub fn resolve_prune(
        &self,
        req: Option<&PruneConfig>,
    ) -> Result<(PruneConfig, Option<String>)> {
        let n = self.cfg.text.num_hidden_layers;
        match req {
            Some(cfg) => {
                cfg.validate(n).map_err(|e| {
                    Error::msg(format!(
                        "pruning config does not fit this {n}-layer model: {e}"
                    ))
                })?;
                // A per-image budget against LLaVA-1.5's fixed image tokens (NeXT's spans and
                // FastV's prompt-wide budget are checked per prompt, by resolve_plan).
                if self.cfg.arch == Arch::Llava && !matches!(cfg, PruneConfig::FastV(_)) {
                    cfg.check_budget(&[self.cfg.image_tokens()])
                        .map_err(|e| Error::msg(format!("pruning config: {e}")))?;
                }
                Ok((cfg.clone(), None))
            }
            None => Ok(PruneConfig::paper_default_for(n)),
        }
    }

    /// Answers `prompt` about `image` (or text only), streaming text to `on_text`.
    pub fn generate(
        &self,
        prompt: &str,
        image: Option<&RgbImage>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let images = image.as_slice();
        let counts = images
            .iter()
            .map(|i| self.image_tokens_for(i.width(), i.height()))
            .collect::<Result<Vec<_>>>()?;
        let ids = self.prompt_images(opts.template, prompt, &counts)?;
        let encoded = images
            .iter()
            .map(|img| self.encode_image(img, opts.image_mode))
            .collect::<Result<Vec<_>>>()?;
        self.generate_ids(&ids, &encoded, opts, on_text)
    }

    /// [`Llava::generate`] from an already built prompt and encoded images, one per image
    /// span in order (`opts.template` and `opts.image_mode` are not used here), in a fresh
    /// session ([`Llava::generate_in`] answers in a given one, with a stop signal).
    pub fn generate_ids(
        &self,
        prompt: &PromptIds,
        images: &[EncodedImage],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_in(&mut self.session(), prompt, images, opts, on_text, &|| {
            false
        })
    }

    /// Checks that `images` fill the prompt's image spans one to one.
    fn spans_for(prompt: &PromptIds, images: &[EncodedImage]) -> Result<Vec<ImageSpan>> {
        if prompt.image_spans.len() != images.len() {
            return Err(Error::msg(format!(
                "the prompt has {} image span(s) but {} image(s) were given",
                prompt.image_spans.len(),
                images.len()
            )));
        }
        for (sp, img) in prompt.image_spans.iter().zip(images) {
            let n = img.embeds.dims()[0];
            if sp.end - sp.start != n {
                return Err(Error::msg(format!(
                    "image span {}..{} holds {} tokens but its image has {n} embeddings",
                    sp.start,
                    sp.end,
                    sp.end - sp.start
                )));
            }
        }
        Ok(prompt.image_spans.clone())
    }

    /// The session's view of `images` over `spans` (checked by [`Llava::spans_for`]).
    fn image_inputs(spans: &[ImageSpan], images: &[EncodedImage]) -> Vec<ImageInput> {
        spans
            .iter()
            .zip(images)
            .map(|(&span, img)| ImageInput {
                span,
                key: img.key,
                embeds: img.embeds.clone(),
            })
            .collect()
    }

    /// A new, empty generation session over this model's decoder.
    pub fn session(&self) -> Session {
        Session::new(self.llama.clone(), self.backend.clone())
    }

    /// Starts one answer in `session`: checks the prompt against the images and the
    /// context, resolves the pruning config, prefills `prompt` (each of `images` spliced
    /// over its span, in order, reusing whatever the session's previous prompt shares with
    /// it) and returns the answer's state, ready for [`Llava::next_token`] or for batched
    /// steps with [`crate::session::decode_batch`] beside other answers.
    pub fn begin(
        &self,
        session: &mut Session,
        prompt: &PromptIds,
        images: &[EncodedImage],
        opts: &GenerateOptions,
    ) -> Result<Answer> {
        self.begin_observed(session, prompt, images, opts, &mut |_| Ok(()))
    }

    /// [`Llava::begin`], calling `after_layer(l)` after each decoder layer of the prefill:
    /// the point where a server runs decode steps of the other answers (chunked prefill
    /// by layers), so streams already running never wait for a whole prefill. The callback
    /// must not touch `session`.
    pub fn begin_observed(
        &self,
        session: &mut Session,
        prompt: &PromptIds,
        images: &[EncodedImage],
        opts: &GenerateOptions,
        after_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Answer> {
        let tc = &self.cfg.text;
        let sampler = Sampler::new(opts.sampling)?;
        let ids = &prompt.ids;
        let spans = Self::spans_for(prompt, images)?;
        // Resolved once per request: the plan is checked, its pruner builds unchecked.
        let (plan, prune_note) = self.resolve_plan(opts.prune.as_ref(), &spans)?;
        let prune_config = plan.config().clone();
        let mut pruner = plan
            .build()
            .map_err(|e| Error::msg(format!("pruning config: {e}")))?;
        let ctx = tc.max_position_embeddings;
        if ids.is_empty() || ids.len() >= ctx {
            return Err(Error::msg(format!(
                "prompt of {} tokens does not fit the context of {ctx}",
                ids.len()
            )));
        }
        let max_new = opts.max_new_tokens.min(ctx - ids.len());
        let mut inputs = Self::image_inputs(&spans, images);
        let t0 = Instant::now();
        // A method that selects before the decoder hands it a shorter prompt.
        let pre_ids;
        let mut dense_len = None;
        let mut ids = ids;
        if let Some(sel) =
            crate::preselect::preselect(self.backend.as_ref(), &prune_config, ids, &inputs)?
        {
            dense_len = Some(ids.len());
            pruner = Box::new(pruner::Preselected::new(prune_config.clone(), sel.kept));
            pre_ids = sel.ids;
            ids = &pre_ids;
            inputs = sel.images;
        }
        let input = PromptInput {
            ids,
            images: &inputs,
        };
        session.set_kv_dtype(opts.kv_dtype);
        let pre = session.prefill_observed(
            input,
            pruner.as_mut(),
            &PrefixKey::from(&prune_config),
            max_new,
            after_layer,
        )?;
        let first_logits = if opts.keep_first_logits {
            Some(self.backend.to_vec_f32(&pre.logits)?)
        } else {
            None
        };
        let decode = DecodeState::new(session, pre.logits.clone(), max_new);
        Ok(Answer {
            decode,
            sampler,
            stream: TextStream::new(),
            tokens: Vec::with_capacity(max_new),
            max_new,
            prompt_tokens: prompt.ids.len(),
            spans,
            vision_passes: images.iter().map(|i| i.tiles.len().max(1)).sum(),
            vision_ms: images.iter().map(|i| i.ms).sum(),
            seen_image: images.first().map(|i| i.seen.clone()),
            prune_config,
            prune_note,
            dense_len,
            prefill: pre,
            first_logits,
            t0,
            prefill_ms: None,
            t1: None,
            stopped_by_eos: false,
        })
    }

    /// The answer's next token, decoded alone (the one-sequence form of a batched step).
    /// `None` once it has ended.
    pub fn next_token(&self, session: &mut Session, answer: &mut Answer) -> Option<Result<u32>> {
        if answer.decode.is_done() {
            return None;
        }
        let r = match answer.first_logits.as_deref() {
            // The first logits are on the host already: sample there (one fewer readback).
            Some(host) if answer.tokens.is_empty() => {
                Some(answer.decode.sample_host(&mut answer.sampler, host))
            }
            _ => answer.decode.next(session, &mut answer.sampler),
        };
        if let Some(Ok(t)) = &r {
            answer.push_token(*t);
        }
        r
    }

    /// Text for `tok`, a token just taken by `answer` (from [`Llava::next_token`] or a
    /// batched step, which calls [`Answer::push_token`]): the next complete piece of the
    /// answer, if any (EOS gives none).
    pub fn piece(&self, answer: &mut Answer, tok: u32) -> Result<Option<String>> {
        if self.cfg.text.eos_token_ids.contains(&tok) {
            answer.stopped_by_eos = true;
            return Ok(None);
        }
        answer.stream.push(&self.tokenizer, tok)
    }

    /// Ends `answer` (whatever stopped it) and builds its [`Generation`]; `rest` receives
    /// the text the detokenizer still held.
    pub fn finish(
        &self,
        session: &Session,
        mut answer: Answer,
        interrupted: bool,
        rest: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let b = self.backend.as_ref();
        answer.decode.stop();
        if let Some(tail) = answer.stream.finish(&self.tokenizer)? {
            rest(&tail);
        }
        b.sync()?;
        let prefill_ms = answer
            .prefill_ms
            .unwrap_or_else(|| answer.t0.elapsed().as_secs_f64() * 1e3);
        let decode_ms = answer.t1.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let steps = answer.tokens.len().saturating_sub(1);
        let pre = answer.prefill;
        let stats = pre.stats;
        let spans = answer.spans;
        let mut flops = self.flops(&stats, answer.vision_passes)?;
        if let Some(n) = answer.dense_len {
            // Selected before the decoder: dense is the unshortened prompt.
            let dense = PrefillStats {
                layer_seq_lens: vec![n; stats.layer_seq_lens.len()],
                layer_image_lens: Vec::new(),
                layer_masks: vec![pruner::ShallowMask::None; stats.layer_seq_lens.len()],
                layer_image_runs: vec![
                    spans.iter().map(|s| (s.start, s.end)).collect();
                    stats.layer_seq_lens.len()
                ],
            };
            let d = self.flops(&dense, answer.vision_passes)?;
            flops.prefill_dense = d.prefill_dense;
            flops.attention_image_dense = d.attention_image_dense;
        }
        Ok(Generation {
            text: self.tokenizer.decode(&answer.tokens)?,
            tokens: answer.tokens,
            prompt_tokens: answer.prompt_tokens,
            image_tokens: spans.iter().map(|s| s.end - s.start).sum(),
            image_span: match spans[..] {
                [one] => Some(one),
                _ => None,
            },
            image_spans: spans,
            stopped_by_eos: answer.stopped_by_eos,
            interrupted,
            timings: Timings {
                load_ms: self.load_ms,
                vision_ms: answer.vision_ms,
                prefill_ms,
                decode_ms,
            },
            decode_tokens_per_s: if steps > 0 && decode_ms > 0.0 {
                steps as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
            prune_config: answer.prune_config,
            prune_note: answer.prune_note,
            prune: pre.report,
            layer_seq_lens: stats.layer_seq_lens,
            layer_image_lens: stats.layer_image_lens,
            kv_lens: session.kv_lens(),
            kv_bytes: session.kv_bytes(),
            kv_dtype: session.kv_dtype(),
            flops,
            first_logits: answer.first_logits,
            seen_image: answer.seen_image,
            reused_tokens: pre.reused_tokens,
            recomputed_from_layer: pre.recomputed_from_layer,
            computed_rows: pre.computed_rows,
        })
    }

    /// The generation entry every caller goes through: [`Llava::begin`], then one token at
    /// a time ([`Llava::next_token`]), streaming text to `on_text` and checking `stop()`
    /// after every token, then [`Llava::finish`].
    pub fn generate_in(
        &self,
        session: &mut Session,
        prompt: &PromptIds,
        images: &[EncodedImage],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        stop: &dyn Fn() -> bool,
    ) -> Result<Generation> {
        let mut answer = self.begin(session, prompt, images, opts)?;
        let mut interrupted = false;
        while let Some(tok) = self.next_token(session, &mut answer) {
            let tok = tok?;
            if let Some(piece) = self.piece(&mut answer, tok)? {
                on_text(&piece);
            }
            if !answer.decode.is_done() && stop() {
                interrupted = true;
                break;
            }
        }
        self.finish(session, answer, interrupted, on_text)
    }

    /// Step logits for quality accounting (see [`crate::quality::step_logits`]): the prompt
    /// (with `image` spliced in) under `prune`, `steps` positions, greedy or teacher-forced.
    pub fn step_logits(
        &self,
        prompt: &PromptIds,
        images: &[EncodedImage],
        prune: &PruneConfig,
        steps: usize,
        forced: Option<&[u32]>,
    ) -> Result<Vec<Vec<f32>>> {
        let spans = Self::spans_for(prompt, images)?;
        let inputs = Self::image_inputs(&spans, images);
        let ctx = self.cfg.text.max_position_embeddings;
        if prompt.ids.is_empty() || prompt.ids.len() + steps > ctx {
            return Err(Error::msg(format!(
                "prompt of {} tokens plus {steps} steps does not fit the context of {ctx}",
                prompt.ids.len()
            )));
        }
        let input = PromptInput {
            ids: &prompt.ids,
            images: &inputs,
        };
        crate::quality::step_logits(&mut self.session(), input, prune, steps, forced)
    }

    /// The shapes `pruner::prefill_flops` needs.
    pub fn flops_shape(&self) -> FlopsShape {
        self.cfg.flops_shape()
    }

    /// FLOPs of the schedule a prefill ran (`passes`: vision-tower passes).
    fn flops(&self, stats: &PrefillStats, passes: usize) -> Result<FlopsReport> {
        let schedule: Vec<LayerSchedule> = stats
            .layer_seq_lens
            .iter()
            .zip(&stats.layer_image_runs)
            .zip(&stats.layer_masks)
            .map(|((&seq_len, runs), &mask)| LayerSchedule {
                seq_len,
                image: runs.iter().map(|&(a, b)| a..b).collect(),
                mask,
            })
            .collect();
        let mut shape = self.flops_shape();
        shape.vision.passes = passes.max(1);
        pruner::prefill_flops(&shape, &schedule)
            .map_err(|e| Error::msg(format!("FLOPs count: {e}")))
    }
}

/// Draws which image tokens survived: `seen` is the picture the vision tower saw, `kept`
/// the kept offsets inside the image span (`None`: all kept). Pruned patches are dimmed,
/// kept ones outlined. With the `full` feature strategy offset 0 is CLS, not a patch.
pub fn draw_kept_patches(seen: &RgbImage, cfg: &LlavaConfig, kept: Option<&[usize]>) -> RgbImage {
    let grid = cfg.vision.grid().max(1);
    let cls = usize::from(cfg.vision_feature_select_strategy == FeatureSelect::Full);
    let mut keep = vec![kept.is_none(); grid * grid];
    for &off in kept.unwrap_or(&[]) {
        if let Some(p) = off.checked_sub(cls).filter(|&p| p < keep.len()) {
            keep[p] = true;
        }
    }
    let (w, h) = seen.dimensions();
    let mut out = seen.clone();
    for y in 0..h {
        for x in 0..w {
            let (py, px) = (
                y as usize * grid / h as usize,
                x as usize * grid / w as usize,
            );
            let p = out.get_pixel_mut(x, y);
            if !keep[py * grid + px] {
                *p = Rgb(p.0.map(|c| (c as u16 * 3 / 10) as u8));
                continue;
            }
            // Cell borders of a kept patch.
            let x0 = (px * w as usize).div_ceil(grid) as u32;
            let y0 = (py * h as usize).div_ceil(grid) as u32;
            let x1 = (((px + 1) * w as usize).div_ceil(grid) as u32).saturating_sub(1);
            let y1 = (((py + 1) * h as usize).div_ceil(grid) as u32).saturating_sub(1);
            if x == x0 || x == x1 || y == y0 || y == y1 {
                *p = Rgb([255, 210, 0]);
            }
        }
    }
    out
}

/// Draws which image tokens survived over several images: `kept` are offsets over all image
/// spans together, in prompt order (`None`: all kept). Each image becomes one panel, side
/// by side: LLaVA-1.5 images as [`draw_kept_patches`] draws them; LLaVA-NeXT images as the
/// original picture with its tile tokens' cells dimmed or outlined, followed by the base
/// tile (the whole image at the tower's size) drawn like a LLaVA-1.5 image.
pub fn draw_kept_images(
    originals: &[RgbImage],
    encoded: &[EncodedImage],
    cfg: &LlavaConfig,
    kept: Option<&[usize]>,
) -> RgbImage {
    let mut panels = Vec::new();
    let mut first = 0;
    for (orig, enc) in originals.iter().zip(encoded) {
        let n = enc.embeds.dims()[0];
        let own: Option<Vec<usize>> = kept.map(|k| {
            let mut v: Vec<usize> = k
                .iter()
                .filter(|&&o| o >= first && o < first + n)
                .map(|&o| o - first)
                .collect();
            v.sort_unstable();
            v
        });
        first += n;
        match &enc.layout {
            None => panels.push(draw_kept_patches(&enc.seen, cfg, own.as_deref())),
            Some(layout) => {
                let tokens = layout.tokens();
                let g = layout.grid;
                let (rows, cols) = (layout.tiles.0 * g, layout.tiles.1 * g);
                let mut keep_cell = vec![false; rows * cols];
                let mut base_kept = Vec::new();
                for (k, t) in tokens.iter().enumerate() {
                    let on = own.as_ref().is_none_or(|o| o.binary_search(&k).is_ok());
                    match *t {
                        NextToken::Tile(y, x) => keep_cell[y * cols + x] = on,
                        NextToken::Base(..) if on => base_kept.push(k),
                        _ => {}
                    }
                }
                panels.push(draw_next_tiles(orig, layout, &keep_cell));
                // The base tile's offsets are 0..g², as a LLaVA-1.5 image's patches are.
                let base_cfg = LlavaConfig {
                    vision_feature_select_strategy: FeatureSelect::Default,
                    ..cfg.clone()
                };
                panels.push(draw_kept_patches(&enc.seen, &base_cfg, Some(&base_kept)));
            }
        }
    }
    let w: u32 =
        panels.iter().map(|p| p.width()).sum::<u32>() + 8 * panels.len().saturating_sub(1) as u32;
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(1);
    let mut out = RgbImage::from_pixel(w.max(1), h, Rgb([255, 255, 255]));
    let mut x = 0i64;
    for p in &panels {
        image::imageops::replace(&mut out, p, x, 0);
        x += p.width() as i64 + 8;
    }
    out
}

/// The original image with each LLaVA-NeXT tile cell dimmed (pruned) or outlined (kept).
fn draw_next_tiles(orig: &RgbImage, layout: &NextLayout, keep_cell: &[bool]) -> RgbImage {
    let (w, h) = orig.dimensions();
    let cols = layout.tiles.1 * layout.grid;
    let (rh, rw) = crate::preprocess_next::patch_output_size(layout.original, layout.best);
    let (py, px) = ((layout.best.0 - rh) / 2, (layout.best.1 - rw) / 2);
    let cell = (layout.best.0 / (layout.tiles.0 * layout.grid)) as f64;
    // Canvas cell of an original pixel's centre.
    let cell_of = |x: u32, y: u32| -> (usize, usize) {
        let cx = (x as f64 + 0.5) * rw as f64 / w as f64 + px as f64;
        let cy = (y as f64 + 0.5) * rh as f64 / h as f64 + py as f64;
        ((cy / cell) as usize, (cx / cell) as usize)
    };
    let mut out = orig.clone();
    for y in 0..h {
        for x in 0..w {
            let (r, c) = cell_of(x, y);
            let on = keep_cell.get(r * cols + c).copied().unwrap_or(false);
            let p = out.get_pixel_mut(x, y);
            if !on {
                *p = Rgb(p.0.map(|v| (v as u16 * 3 / 10) as u8));
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || cell_of(x - 1, y) != (r, c)
                || cell_of(x, y - 1) != (r, c);
            if edge {
                *p = Rgb([255, 210, 0]);
            }
        }
    }
    out
}

/// `pack_image_features` for one LLaVA-NeXT image: `projected` holds each tile's projector
/// output `[g², H]` (base tile first), `newline` is `image_newline` `[1, H]`; returns the
/// image's embeddings `[N, H]` in [`NextLayout::tokens`] order.
pub fn pack_next_features(
    b: &dyn Backend,
    projected: &[Tensor],
    newline: &Tensor,
    layout: &NextLayout,
) -> Result<Tensor> {
    let mut refs: Vec<&Tensor> = projected.iter().collect();
    refs.push(newline);
    let stacked = b.concat_rows(&refs)?; // [tiles·g² + 1, H]
    let rows = layout.feature_rows((projected.len() * layout.grid * layout.grid) as u32);
    let idx = b.upload(HostData::U32(&rows), rows.len().into())?;
    b.gather_rows(&stacked, &idx) // [N, H]
}

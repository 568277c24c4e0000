//! Prompts: `tokenizer.json` through the `tokenizers` crate, the LLaVA-1.5 chat template,
//! `<image>` expansion, and incremental detokenisation for streaming.

use std::path::Path;

use engine_core::{Error, Result};
use tokenizers::Tokenizer;

use crate::llama::ImageSpan;

/// The placeholder a prompt uses for the image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// LLaVA-1.5's system sentence: `conv_vicuna_v1.system` in LLaVA's `llava/conversation.py` ("a curious
/// user", not `conv_llava_v1`'s "a curious human"); `tests/tests/templates.rs` checks it there.
pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// How the user's text becomes the model's prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Template {
    /// LLaVA-1.5's conversation format: system sentence, ` USER: <image>\n{prompt} ASSISTANT:`
    /// (one `<image>\n` per image).
    #[default]
    VicunaV1,
    /// llava-v1.6-mistral's format: `[INST] <image>\n{prompt} [/INST]` (one `<image>\n` per image).
    MistralInstruct,
    /// The prompt verbatim; with images it must contain one `<image>` per image, which take
    /// the images in order.
    Raw,
}

impl Template {
    /// `"vicuna_v1"`, `"mistral_instruct"` or `"raw"`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "vicuna_v1" => Ok(Template::VicunaV1),
            "mistral_instruct" => Ok(Template::MistralInstruct),
            "raw" => Ok(Template::Raw),
            other => Err(Error::msg(format!(
                "unknown template `{other}` (expected `vicuna_v1`, `mistral_instruct` or `raw`)"
            ))),
        }
    }

    /// The template's name as [`Template::from_name`] accepts it.
    pub fn name(&self) -> &'static str {
        match self {
            Template::VicunaV1 => "vicuna_v1",
            Template::MistralInstruct => "mistral_instruct",
            Template::Raw => "raw",
        }
    }

    /// The prompt text before tokenisation; `with_image` places (or requires) `<image>`.
    pub fn render(&self, prompt: &str, with_image: bool) -> Result<String> {
        self.render_images(prompt, usize::from(with_image))
    }

    /// The prompt text before tokenisation for `images` images: the chat templates place one
    /// `<image>\n` per image before the question; a raw prompt must hold exactly `images`.
    pub fn render_images(&self, prompt: &str, images: usize) -> Result<String> {
        let count = prompt.matches(IMAGE_PLACEHOLDER).count();
        let placed = format!("{IMAGE_PLACEHOLDER}\n").repeat(images);
        match self {
            Template::VicunaV1 | Template::MistralInstruct => {
                if count > 0 {
                    return Err(Error::msg(format!(
                        "the prompt contains `{IMAGE_PLACEHOLDER}`, but the {} template places the images itself (use --template raw to place them)",
                        self.name()
                    )));
                }
                Ok(match self {
                    Template::VicunaV1 => {
                        format!("{VICUNA_SYSTEM} USER: {placed}{prompt} ASSISTANT:")
                    }
                    _ => format!("[INST] {placed}{prompt} [/INST]"),
                })
            }
            Template::Raw => {
                if count != images {
                    return Err(Error::msg(if images == 0 {
                        format!(
                            "the raw prompt contains `{IMAGE_PLACEHOLDER}` but no image was given"
                        )
                    } else if images == 1 {
                        format!(
                            "a raw prompt with an image must contain `{IMAGE_PLACEHOLDER}` exactly once, found {count}"
                        )
                    } else {
                        format!(
                            "a raw prompt with {images} image(s) must contain `{IMAGE_PLACEHOLDER}` {images} time(s), found {count}"
                        )
                    }));
                }
                Ok(prompt.to_string())
            }
        }
    }
}

/// A tokenised prompt with the image placeholder expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptIds {
    /// Token ids, BOS first; each image span holds `image_token_index` repeated.
    pub ids: Vec<u32>,
    /// Where each image's embeddings go, `[start, end)`, in prompt (and image) order;
    /// empty for a text-only prompt.
    pub image_spans: Vec<ImageSpan>,
}

impl PromptIds {
    /// The image span of a one-image prompt (`None` without images or with several).
    pub fn image_span(&self) -> Option<ImageSpan> {
        match self.image_spans[..] {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The model's tokenizer and its special ids.
pub struct PromptTokenizer {
    tok: Tokenizer,
    image_token_index: u32,
    /// Tokenise the text between images chunk by chunk (LLaVA's and MobileVLM's
    /// `tokenizer_image_token`) instead of the whole prompt with `<image>` as a token.
    image_chunks: bool,
    /// BOS, as `tokenizer_image_token` compares it (`tokenizer.bos_token_id`).
    bos: Option<u32>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("image_token_index", &self.image_token_index)
            .finish_non_exhaustive()
    }
}

/// Bytes per vocabulary entry a `tokenizer.json` may take: each token appears in the
/// vocabulary, usually once more in the merges, and perhaps among the added tokens. Real
/// files take 55-70 bytes (llava's 32,064 tokens: 1.8 MB; Llama 3's 128,256: 8.7 MB;
/// Gemma's 256,000: 17 MB); this allows eight times that.
pub const TOKENIZER_BYTES_PER_TOKEN: u64 = 512;

/// The floor of [`max_tokenizer_bytes`] (a small vocabulary with long pre-tokenizer rules).
pub const MIN_TOKENIZER_LIMIT: u64 = 16 << 20;

/// The largest `tokenizer.json` a model of `vocab_size` tokens is read with: parsing costs
/// about 70 ms per MB, and a tokenizer larger than the embedding table is refused after
/// parsing anyway, so a file far larger than the vocabulary needs is refused before.
pub fn max_tokenizer_bytes(vocab_size: usize) -> u64 {
    (vocab_size as u64)
        .saturating_mul(TOKENIZER_BYTES_PER_TOKEN)
        .clamp(MIN_TOKENIZER_LIMIT, engine_core::files::MAX_TOKENIZER_BYTES)
}

/// Refuses a `tokenizer.json` larger than [`max_tokenizer_bytes`] for `vocab_size` (only
/// its size is read: a missing file is left to the loader's message).
pub fn check_tokenizer_file(path: &Path, vocab_size: usize) -> Result<()> {
    let limit = max_tokenizer_bytes(vocab_size);
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > limit => Err(Error::file(
            path,
            format!(
                "{} bytes, more than the {limit} bytes a {vocab_size}-token vocabulary needs (vocab_size in config.json)",
                m.len()
            ),
        )),
        _ => Ok(()),
    }
}

impl PromptTokenizer {
    /// Reads `tokenizer.json`; `image_token_index` is the config's `<image>` id.
    pub fn from_file(path: &Path, image_token_index: u32) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(
                path,
                "not found (the model directory needs tokenizer.json)",
            ));
        }
        let bytes =
            engine_core::files::read_limited(path, engine_core::files::MAX_TOKENIZER_BYTES)?;
        let tok = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::file(path, format!("cannot load tokenizer: {e}")))?;
        Ok(PromptTokenizer {
            tok,
            image_token_index,
            image_chunks: false,
            bos: None,
        })
    }

    /// Wraps an already built tokenizer.
    pub fn new(tok: Tokenizer, image_token_index: u32) -> Self {
        PromptTokenizer {
            tok,
            image_token_index,
            image_chunks: false,
            bos: None,
        }
    }

    /// Tokenises prompts as the original LLaVA / MobileVLM code's `tokenizer_image_token`:
    /// the text is split at `<image>`, each chunk tokenised on its own (with BOS); when the
    /// first chunk starts with BOS, BOS is kept once and every chunk's first token is
    /// dropped (`bos` is `tokenizer.bos_token_id`); `image_token_index` only marks the spans (it is never looked up).
    pub fn with_image_chunks(mut self, bos: Option<u32>) -> Self {
        self.image_chunks = true;
        self.bos = bos;
        self
    }

    /// `tokenizer_image_token`'s ids for `text`, one `None` per `<image>`.
    fn chunk_ids(&self, text: &str) -> Result<Vec<Option<u32>>> {
        let chunks = text
            .split(IMAGE_PLACEHOLDER)
            .map(|c| self.encode(c))
            .collect::<Result<Vec<_>>>()?;
        let bos = self.bos;
        let mut out = Vec::new();
        let offset = match chunks.first().and_then(|c| c.first()) {
            Some(&first) if Some(first) == bos => {
                out.push(Some(first));
                1
            }
            _ => 0,
        };
        for (i, c) in chunks.iter().enumerate() {
            if i > 0 {
                out.push(None);
            }
            out.extend(c.iter().skip(offset).map(|&t| Some(t)));
        }
        Ok(out)
    }

    /// Tokenises `text` with the tokenizer's special tokens (BOS for Llama).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))
    }

    /// Renders `prompt` with `template`, tokenises it and expands `<image>` to
    /// `image_tokens` copies (`None`: a text-only prompt).
    pub fn build(
        &self,
        template: Template,
        prompt: &str,
        image_tokens: Option<usize>,
    ) -> Result<PromptIds> {
        self.build_images(template, prompt, image_tokens.as_slice())
    }

    /// Renders `prompt` for `image_tokens.len()` images, tokenises it and expands the i-th
    /// `<image>` to `image_tokens[i]` copies.
    pub fn build_images(
        &self,
        template: Template,
        prompt: &str,
        image_tokens: &[usize],
    ) -> Result<PromptIds> {
        let text = template.render_images(prompt, image_tokens.len())?;
        let img = self.image_token_index;
        if self.image_chunks {
            let ids = self.chunk_ids(&text)?;
            let mut out = Vec::with_capacity(ids.len() + image_tokens.iter().sum::<usize>());
            let mut spans = Vec::with_capacity(image_tokens.len());
            let mut next = image_tokens.iter();
            for t in ids {
                match t {
                    Some(t) => out.push(t),
                    None => {
                        let n = *next.next().ok_or_else(|| {
                            Error::msg("the prompt holds more `<image>` than images given")
                        })?;
                        spans.push(ImageSpan {
                            start: out.len(),
                            end: out.len() + n,
                        });
                        out.extend(std::iter::repeat_n(img, n));
                    }
                }
            }
            if spans.len() != image_tokens.len() {
                return Err(Error::msg(format!(
                    "the prompt holds {} `{IMAGE_PLACEHOLDER}` but {} image(s) were given",
                    spans.len(),
                    image_tokens.len()
                )));
            }
            return Ok(PromptIds {
                ids: out,
                image_spans: spans,
            });
        }
        let ids = self.encode(&text)?;
        let at: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == img)
            .map(|(i, _)| i)
            .collect();
        if at.len() != image_tokens.len() {
            return Err(Error::msg(if image_tokens.is_empty() {
                format!("the prompt tokenises to the image token id {img} but no image was given")
            } else {
                format!(
                    "the prompt must hold {} image token(s) (id {img}) after tokenisation, found {} (does tokenizer.json define `{IMAGE_PLACEHOLDER}`?)",
                    image_tokens.len(),
                    at.len()
                )
            }));
        }
        let total: usize = image_tokens.iter().sum();
        let mut out = Vec::with_capacity(ids.len() + total);
        let mut spans = Vec::with_capacity(at.len());
        let mut prev = 0;
        for (&s, &n) in at.iter().zip(image_tokens) {
            out.extend_from_slice(&ids[prev..s]);
            spans.push(ImageSpan {
                start: out.len(),
                end: out.len() + n,
            });
            out.extend(std::iter::repeat_n(img, n));
            prev = s + 1;
        }
        out.extend_from_slice(&ids[prev..]);
        Ok(PromptIds {
            ids: out,
            image_spans: spans,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

/// Turns generated ids into text pieces as they arrive, never splitting a multi-byte
/// character: text is emitted only once its decoding is stable (the window technique of
/// text-generation-inference, so SentencePiece's leading-space rule is respected).
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted: String,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &PromptTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        // A trailing U+FFFD means a byte-fallback character is still incomplete.
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.emitted.push_str(&delta);
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Emits whatever the final decoding of all ids adds to what was streamed (an
    /// incomplete character at the very end comes out as U+FFFD, as a full decode gives).
    pub fn finish(&mut self, tok: &PromptTokenizer) -> Result<Option<String>> {
        let all = tok.decode(&self.ids)?;
        if let Some(rest) = all.strip_prefix(self.emitted.as_str()) {
            if !rest.is_empty() {
                let rest = rest.to_string();
                self.emitted.push_str(&rest);
                return Ok(Some(rest));
            }
        }
        Ok(None)
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_validate_the_placeholder() {
        let v = Template::VicunaV1.render("Hi", true).unwrap();
        assert_eq!(v, format!("{VICUNA_SYSTEM} USER: <image>\nHi ASSISTANT:"));
        assert_eq!(
            Template::VicunaV1.render("Hi", false).unwrap(),
            format!("{VICUNA_SYSTEM} USER: Hi ASSISTANT:")
        );
        assert!(Template::VicunaV1.render("<image> hi", true).is_err());
        assert!(Template::Raw.render("no image", true).is_err());
        assert!(Template::Raw.render("<image><image>", true).is_err());
        assert_eq!(
            Template::Raw.render_images("<image><image>", 2).unwrap(),
            "<image><image>"
        );
        assert_eq!(
            Template::VicunaV1.render_images("Hi", 2).unwrap(),
            format!("{VICUNA_SYSTEM} USER: <image>\n<image>\nHi ASSISTANT:")
        );
        assert_eq!(
            Template::MistralInstruct.render_images("Hi", 1).unwrap(),
            "[INST] <image>\nHi [/INST]"
        );
        assert!(Template::Raw.render("<image>", false).is_err());
        assert_eq!(
            Template::Raw.render("x <image> y", true).unwrap(),
            "x <image> y"
        );
        assert!(Template::from_name("chatml").is_err());
    }
}

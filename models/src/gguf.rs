//! Llama text models from llama.cpp GGUF files: the config and the tokenizer rebuilt from
//! metadata, and the tensors renamed to the HF layout [`Llama::load`] reads, with
//! llama.cpp's Q/K row permutation undone.
//!
//! llama.cpp's converter reorders the rows of `q_proj`/`k_proj` (per head, from HF's
//! "rotate half" pairs `(i, i + d/2)` to interleaved pairs `(2i, 2i + 1)`) because ggml's
//! RoPE rotates adjacent pairs. Our RoPE is HF's, so the rows are put back. Rows are whole
//! quantized blocks, so this is a byte copy per row, done once at load for Q and K only.

// is_multiple_of is newer than the MSRV (1.85).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use engine_core::gguf::{GgufFile, GgufValue};
use engine_core::weights::{WeightSource, WeightView, Weights};
use engine_core::{Backend, DType, Error, Result};
use pruner::Dense;

use crate::session::{PromptInput, Session};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::TextConfig;
use crate::llama::Llama;

/// The text config of a `general.architecture = llama` GGUF file.
pub fn text_config(f: &GgufFile) -> Result<TextConfig> {
    let arch = f.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::file(
            f.path(),
            format!("general.architecture is `{arch}`; only `llama` text models are supported"),
        ));
    }
    let u = |k: &str| -> Result<usize> {
        let v = f.get_u64(&format!("llama.{k}"))?;
        usize::try_from(v)
            .map_err(|_| Error::file(f.path(), format!("llama.{k} = {v} is too large")))
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::file(
            f.path(),
            format!("llama.attention.head_count {heads} does not divide embedding_length {hidden}"),
        ));
    }
    let kv_heads = match f.get("llama.attention.head_count_kv") {
        Some(_) => u("attention.head_count_kv")?,
        None => heads,
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::file(
            f.path(),
            format!("{kv_heads} kv heads do not divide {heads} heads"),
        ));
    }
    // The vocabulary size is the embedding table's rows when the key is absent (older files).
    let vocab = match f.get("llama.vocab_size") {
        Some(_) => u("vocab_size")?,
        None => f
            .tensor_info("token_embd.weight")
            .map(|t| t.shape[0])
            .ok_or_else(|| Error::weight("token_embd.weight", "missing"))?,
    };
    let scaling = match f.get("llama.rope.scaling.type").and_then(GgufValue::as_str) {
        Some("linear") => f.get_f64("llama.rope.scaling.factor")? as f32,
        Some("none") | None => 1.0,
        Some(other) => {
            return Err(Error::file(
                f.path(),
                format!("rope scaling `{other}` is not supported"),
            ))
        }
    };
    // The head width is key_length where given (llama.cpp's default: embedding_length /
    // head_count). Our RoPE rotates the whole head and V rows are as wide as K rows: a file
    // that says otherwise would run with the wrong rotation or shapes, so it is refused.
    let head_dim = match f.get("llama.attention.key_length") {
        Some(_) => u("attention.key_length")?,
        None => hidden / heads,
    };
    for k in ["rope.dimension_count", "attention.value_length"] {
        if f.get(&format!("llama.{k}")).is_some() {
            let v = u(k)?;
            if v != head_dim {
                return Err(Error::file(
                    f.path(),
                    format!("llama.{k} = {v} differs from the head width {head_dim} (partial rotary or different V width is not supported)"),
                ));
            }
        }
    }
    let token_id = |k: &str| -> Result<Option<u32>> {
        match f.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| Error::file(f.path(), format!("{k} is not a token id"))),
        }
    };
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let cfg = TextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: u("context_length")?,
        rms_norm_eps: f.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        rope_theta: match f.get("llama.rope.freq_base") {
            Some(_) => f.get_f64("llama.rope.freq_base")? as f32,
            None => 10_000.0,
        },
        rope_scaling_factor: scaling,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        attention_bias: f.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: f.tensor_info("blk.0.ffn_up.bias").is_some(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: eos.map(|v| vec![v]).unwrap_or_default(),
    };
    cfg.check(|k| {
        match k {
            "vocab_size" => "llama.vocab_size",
            "hidden_size" => "llama.embedding_length",
            "intermediate_size" => "llama.feed_forward_length",
            "num_hidden_layers" => "llama.block_count",
            "max_position_embeddings" => "llama.context_length",
            "head_dim" => "llama.attention.key_length",
            "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
            "rope_theta" => "llama.rope.freq_base",
            "rope_scaling.factor" => "llama.rope.scaling.factor",
            "bos_token_id" => "tokenizer.ggml.bos_token_id",
            "eos_token_id" => "tokenizer.ggml.eos_token_id",
            other => other,
        }
        .to_string()
    })
    .map_err(|e| Error::file(f.path(), e.to_string()))?;
    Ok(cfg)
}

/// HF name of a llama.cpp tensor name, and the heads to unpermute rows over (Q and K).
fn hf_name(gguf: &str, cfg: &TextConfig) -> Option<(String, Option<usize>)> {
    match gguf {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.split_once('.')?; // suffix: weight | bias
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(cfg.num_attention_heads)),
        "attn_k" => ("self_attn.k_proj", Some(cfg.num_key_value_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), heads))
}

/// Undoes llama.cpp's per-head row interleave: HF row `h*d + t*d/2 + i` is GGUF row
/// `h*d + 2i + t`. `row_bytes` is the stored size of one row (a bias has 1-element rows).
fn unpermute_rows(bytes: &[u8], rows: usize, row_bytes: usize, heads: usize) -> Option<Vec<u8>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || bytes.len() != rows * row_bytes
    {
        return None;
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = Vec::with_capacity(bytes.len());
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..half {
                let g = h * d + 2 * i + t;
                out.extend_from_slice(&bytes[g * row_bytes..(g + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// A GGUF Llama file seen under HF tensor names, Q/K rows in HF order.
pub struct LlamaGguf {
    file: Arc<GgufFile>,
    /// HF name → GGUF name.
    names: BTreeMap<String, String>,
    /// HF name → unpermuted copy (Q and K weights and biases).
    permuted: BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>,
}

impl LlamaGguf {
    /// Wraps an opened file; `cfg` gives the head counts for the Q/K row order.
    pub fn new(file: Arc<GgufFile>, cfg: &TextConfig) -> Result<Self> {
        let mut names = BTreeMap::new();
        let mut permuted = BTreeMap::new();
        for info in file.tensor_infos() {
            // Tensors we do not map (rope_freqs, ...) stay reachable under their own names.
            let Some((hf, heads)) = hf_name(&info.name, cfg) else {
                names.insert(info.name.clone(), info.name.clone());
                continue;
            };
            if let Some(heads) = heads {
                let v = file.view(&info.name)?;
                let rows = v.shape[0];
                let row_bytes = v.bytes.len().checked_div(rows).unwrap_or(0);
                let data = unpermute_rows(v.bytes, rows, row_bytes, heads).ok_or_else(|| {
                    Error::weight(
                        &info.name,
                        format!("{rows} rows cannot be split into {heads} heads of rotary pairs"),
                    )
                })?;
                permuted.insert(hf.clone(), (v.dtype, v.shape.to_vec(), data));
            }
            names.insert(hf, info.name.clone());
        }
        Ok(LlamaGguf {
            file,
            names,
            permuted,
        })
    }
}

impl WeightSource for LlamaGguf {
    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        if let Some((dtype, shape, bytes)) = self.permuted.get(name) {
            return Ok(WeightView {
                dtype: *dtype,
                shape,
                bytes,
            });
        }
        let g = self.names.get(name).ok_or_else(|| {
            Error::weight(name, format!("missing from {}", self.file.path().display()))
        })?;
        self.file.view(g)
    }
    fn total_bytes(&self) -> u64 {
        self.file.total_bytes()
    }
}

fn str_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = f.get(key).and_then(GgufValue::as_array).ok_or_else(|| {
        Error::file(
            f.path(),
            format!("metadata `{key}` missing or not an array"),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| Error::file(f.path(), format!("`{key}`[{i}] is not a string")))
        })
        .collect()
}

/// The tokenizer rebuilt from `tokenizer.ggml.*` metadata: byte-level BPE (`model = gpt2`)
/// from tokens and merges, control tokens (type 3) and user-defined ones (type 4) as added
/// tokens. The pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does: `smollm`
/// splits digits one by one before the GPT-2 regex; other values use the GPT-2 regex alone.
/// No BOS is added here; callers add `bos_token_id` when `add_bos_token` says so.
pub fn tokenizer(f: &GgufFile) -> Result<Tokenizer> {
    let model = f.get_str("tokenizer.ggml.model")?;
    if model == "llama" {
        return llama_tokenizer(f);
    }
    if model != "gpt2" {
        return Err(Error::file(
            f.path(),
            format!("tokenizer model `{model}` is not supported yet (only gpt2 byte-level BPE)"),
        ));
    }
    let tokens = str_array(f, "tokenizer.ggml.tokens")?;
    let merges = str_array(f, "tokenizer.ggml.merges")?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::file(f.path(), format!("merge {i} `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::file(f.path(), format!("cannot build the BPE tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    match f.get("tokenizer.ggml.pre").and_then(GgufValue::as_str) {
        Some("smollm") => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        }
        _ => {
            tok.with_pre_tokenizer(Some(byte_level));
        }
    }
    tok.with_decoder(Some(byte_level));
    if let Some(types) = f
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        let added: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter_map(|(t, s)| match t.as_u64() {
                Some(3) => Some(AddedToken::from(s.to_string(), true)),
                Some(4) => Some(AddedToken::from(s.to_string(), false)),
                _ => None,
            })
            .collect();
        tok.add_special_tokens(&added);
    }
    Ok(tok)
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: u64 = 1;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// Whether a piece is a run of SentencePiece spaces (`▁▁`, `▁▁▁▁`, ...).
fn is_space_run(piece: &str) -> bool {
    piece.chars().count() > 1 && piece.chars().all(|c| c == '▁')
}

/// BPE merges of a SentencePiece-BPE vocabulary, in priority order, as transformers'
/// `SentencePieceExtractor` derives them for Llama's `tokenizer.json`: every split
/// `piece = left + right` with both halves in the vocabulary is a merge; merges rank by
/// the merged piece's score (higher first), then its id, then the halves' ids.
///
/// `convert_hf_to_gguf.py` on a checkpoint that has only `tokenizer.json` (llava-hf) writes
/// the placeholder score -1000 for every token (gguf-py's `LlamaHfVocab`). When all normal
/// tokens share one score the scores carry no order, so the Llama SentencePiece model's own
/// order is used instead: id order, with runs of `▁` last (Llama gives them score -1e9).
pub fn spm_merges(tokens: &[&str], scores: &[f32], types: &[u64]) -> Vec<(String, String)> {
    let mut ids: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t).or_insert(i);
    }
    let normal: Vec<f32> = (0..tokens.len())
        .filter(|&i| types.get(i).copied().unwrap_or(TOKEN_NORMAL) == TOKEN_NORMAL)
        .map(|i| scores.get(i).copied().unwrap_or(0.0))
        .collect();
    let uniform = normal.windows(2).all(|w| w[0] == w[1]);
    let score = |i: usize| -> f32 {
        if uniform {
            if is_space_run(tokens[i]) {
                -1e9
            } else {
                0.0
            }
        } else {
            scores.get(i).copied().unwrap_or(0.0)
        }
    };
    // (score, merged id, left id, right id)
    let mut found: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if types.get(i).copied() == Some(TOKEN_USER_DEFINED) {
            continue; // added tokens are matched whole, never merged into
        }
        for (k, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(k);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                found.push((score(i), i, li, ri));
            }
        }
    }
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    found
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// The tokenizer of a `tokenizer.ggml.model = llama` file (SentencePiece BPE): tokens,
/// scores and types rebuilt as the `tokenizer.json` transformers writes for Llama (BPE
/// with byte fallback and merges from [`spm_merges`], `▁` for spaces, a leading `▁` when
/// `add_space_prefix` (default true), control and user-defined tokens matched whole, BOS
/// (and EOS) added by the post-processor as `add_bos_token`/`add_eos_token` say).
pub fn llama_tokenizer(f: &GgufFile) -> Result<Tokenizer> {
    let tokens = str_array(f, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let num_array = |key: &str| -> Result<Option<Vec<f64>>> {
        let Some(v) = f.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| Error::file(f.path(), format!("metadata `{key}` is not an array")))?;
        if arr.len() != n {
            return Err(Error::file(
                f.path(),
                format!("`{key}` has {} entries for {n} tokens", arr.len()),
            ));
        }
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .or_else(|| x.as_u64().map(|u| u as f64))
                    .ok_or_else(|| Error::file(f.path(), format!("`{key}`[{i}] is not a number")))
            })
            .collect::<Result<Vec<f64>>>()
            .map(Some)
    };
    let scores: Vec<f32> = num_array("tokenizer.ggml.scores")?
        .unwrap_or_else(|| vec![0.0; n])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let types: Vec<u64> = num_array("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_NORMAL as f64; n])
        .into_iter()
        .map(|x| x as u64)
        .collect();
    let id_key = |k: &str| -> Option<usize> {
        f.get(k)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .filter(|&v| v < n)
    };
    let flag = |k: &str, default: bool| f.get(k).and_then(GgufValue::as_bool).unwrap_or(default);
    let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
    let add_bos = flag("tokenizer.ggml.add_bos_token", true);
    let add_eos = flag("tokenizer.ggml.add_eos_token", false);
    let unk = id_key("tokenizer.ggml.unknown_token_id").unwrap_or(0);

    let merges = spm_merges(&tokens, &scores, &types);
    // Every token is in the BPE vocabulary so added tokens keep their ids (merges never
    // produce the user-defined ones; see spm_merges).
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if !vocab.contains_key(*t) {
            vocab.insert(t.to_string(), serde_json::json!(i));
        }
        if *ty == TOKEN_CONTROL || *ty == TOKEN_USER_DEFINED {
            added.push(serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == TOKEN_CONTROL,
            }));
        }
    }
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(serde_json::json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers
        .push(serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut special = |key: &str, on: bool, out: &mut Vec<serde_json::Value>| {
        if let Some(id) = id_key(key).filter(|_| on) {
            let t = tokens[id];
            out.push(serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}}));
            specials.insert(
                t.to_string(),
                serde_json::json!({"id": t, "ids": [id], "tokens": [t]}),
            );
        }
    };
    special("tokenizer.ggml.bos_token_id", add_bos, &mut single);
    single.push(serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}));
    special("tokenizer.ggml.eos_token_id", add_eos, &mut single);
    // A pair is the single template twice, the second sequence as `B` with type id 1.
    let mut pair = single.clone();
    pair.extend(single.iter().map(|v| {
        let mut v = v.clone();
        if let Some(s) = v.get_mut("Sequence") {
            s["id"] = serde_json::json!("B");
        }
        for k in ["Sequence", "SpecialToken"] {
            if let Some(s) = v.get_mut(k) {
                s["type_id"] = serde_json::json!(1);
            }
        }
        v
    }));
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": specials,
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": tokens.get(unk).copied().unwrap_or("<unk>"),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        },
    });
    let text = serde_json::to_string(&json)
        .map_err(|e| Error::file(f.path(), format!("cannot build the tokenizer: {e}")))?;
    text.parse::<Tokenizer>()
        .map_err(|e| Error::file(f.path(), format!("cannot build the Llama tokenizer: {e}")))
}

/// A Llama text model loaded from a GGUF file, with its tokenizer.
pub struct GgufTextModel {
    /// The decoder (quantized weights stay quantized on the backend).
    pub llama: Arc<Llama>,
    /// Rebuilt from metadata.
    pub tokenizer: Tokenizer,
    /// From metadata.
    pub config: TextConfig,
    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default, true, when absent).
    pub add_bos: bool,
}

impl GgufTextModel {
    /// Opens `path` and uploads its weights to `backend`.
    pub fn load(path: &Path, backend: Arc<dyn Backend>) -> Result<Self> {
        let file = Arc::new(GgufFile::open(path)?);
        let config = text_config(&file)?;
        let tokenizer = tokenizer(&file)?;
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(true);
        let tokens = tokenizer.get_vocab_size(true);
        if tokens > config.vocab_size {
            return Err(Error::file(
                path,
                format!(
                    "tokenizer.ggml.tokens holds {tokens} tokens, more than the {} rows of the embedding table",
                    config.vocab_size
                ),
            ));
        }
        let source: Arc<dyn WeightSource> = Arc::new(LlamaGguf::new(file, &config)?);
        crate::checks::check_text_layers(
            config.num_hidden_layers,
            &source.names(),
            &format!("{}: llama.block_count", path.display()),
        )?;
        let w = Weights::new(source, backend);
        let llama = Arc::new(Llama::load(&w.pp("model"), &w.pp("lm_head"), &config)?);
        Ok(GgufTextModel {
            llama,
            tokenizer,
            config,
            add_bos,
        })
    }

    /// Prompt token ids (BOS first when the file asks for it).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::msg(format!("tokenizing the prompt: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.config.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// A new generation session over this model's decoder.
    pub fn session(&self, backend: Arc<dyn Backend>) -> Session {
        Session::new(self.llama.clone(), backend)
    }

    /// Decoding of up to `max_new` tokens after `ids` with `params` (greedy when its
    /// temperature is 0; stops at an EOS token, which is kept); also returns the first
    /// step's logits `[V]`.
    pub fn generate(
        &self,
        b: Arc<dyn Backend>,
        ids: &[u32],
        max_new: usize,
        params: crate::sampling::SamplingParams,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        self.generate_timed(b, ids, max_new, params)
            .map(|(t, l, _)| (t, l))
    }

    /// [`Self::generate`], with the wall-clock split into prefill and decode (f16 KV cache).
    pub fn generate_timed(
        &self,
        b: Arc<dyn Backend>,
        ids: &[u32],
        max_new: usize,
        params: crate::sampling::SamplingParams,
    ) -> Result<(Vec<u32>, Vec<f32>, GenTimings)> {
        self.generate_timed_kv(b, ids, max_new, params, DType::F16)
    }

    /// [`Self::generate_timed`] with a KV cache of `kv_dtype` (`F16` or `F32`).
    pub fn generate_timed_kv(
        &self,
        b: Arc<dyn Backend>,
        ids: &[u32],
        max_new: usize,
        params: crate::sampling::SamplingParams,
        kv_dtype: DType,
    ) -> Result<(Vec<u32>, Vec<f32>, GenTimings)> {
        let t0 = Instant::now();
        let mut session = self.session(b.clone());
        session.set_kv_dtype(kv_dtype);
        let pre = session.prefill(
            PromptInput { ids, images: &[] },
            &mut Dense,
            &crate::session::PrefixKey::dense(),
            max_new,
        )?;
        let first = b.to_vec_f32(&pre.logits)?;
        let mut sampler = crate::sampling::Sampler::new(params)?;
        let mut t = GenTimings::prefilled(t0);
        let t1 = Instant::now();
        let tokens = session
            .decode(pre.logits, &mut sampler, max_new)
            .collect::<Result<Vec<u32>>>()?;
        t.decode_steps = tokens.len().saturating_sub(1);
        t.decode_ms = ms_since(t1);
        Ok((tokens, first, t))
    }

    /// Greedy decoding of up to `max_new` tokens after `ids` (stops at an EOS token, which is
    /// kept); also returns the first step's logits `[V]`. The KV cache is f16 (the default).
    pub fn greedy(
        &self,
        b: Arc<dyn Backend>,
        ids: &[u32],
        max_new: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        self.greedy_kv(b, ids, max_new, DType::F16)
    }

    /// [`GgufTextModel::greedy`] with a KV cache of `kv_dtype` (`F16` or `F32`).
    pub fn greedy_kv(
        &self,
        b: Arc<dyn Backend>,
        ids: &[u32],
        max_new: usize,
        kv_dtype: DType,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let greedy = crate::sampling::SamplingParams::default();
        self.generate_timed_kv(b, ids, max_new, greedy, kv_dtype)
            .map(|(t, l, _)| (t, l))
    }
}

/// Wall-clock split of one generation (every phase ends with a read-back, so the device has
/// finished its work).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenTimings {
    /// Embedding, prefill and the first logits read back: the time to the first token.
    pub prefill_ms: f64,
    /// Everything after: `decode_steps` decode steps and their token choices.
    pub decode_ms: f64,
    /// Decode steps run (one fewer than the new tokens: the first comes from prefill).
    pub decode_steps: usize,
}

impl GenTimings {
    fn prefilled(t0: Instant) -> Self {
        GenTimings {
            prefill_ms: ms_since(t0),
            ..Default::default()
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_undoes_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, ..).swapaxes(1, 2): GGUF row h*d + 2i + t holds
        // HF row h*d + t*d/2 + i. Rows here are 3 bytes tagged with their HF index.
        let (heads, d) = (3usize, 8usize);
        let rows = heads * d;
        let mut gguf = vec![0u8; rows * 3];
        for h in 0..heads {
            for i in 0..d / 2 {
                for t in 0..2 {
                    let hf = (h * d + t * d / 2 + i) as u8;
                    let g = h * d + 2 * i + t;
                    gguf[g * 3..g * 3 + 3].copy_from_slice(&[hf, hf, hf]);
                }
            }
        }
        let out = unpermute_rows(&gguf, rows, 3, heads).expect("unpermute");
        for r in 0..rows {
            assert_eq!(&out[r * 3..r * 3 + 3], &[r as u8; 3], "row {r}");
        }
        assert!(
            unpermute_rows(&gguf, rows, 3, 5).is_none(),
            "24 rows in 5 heads accepted"
        );
        assert!(
            unpermute_rows(&gguf, rows, 3, 0).is_none(),
            "zero heads accepted"
        );
    }

    #[test]
    fn spm_merges_follow_scores_then_ids() {
        // Real scores: "ab" (id 4) outranks "ba" (id 3) by score, so its merge comes first;
        // user-defined tokens (type 4) are never merge targets.
        let tokens = ["<unk>", "a", "b", "ba", "ab", "aba", "<x>"];
        let types = [2, 1, 1, 1, 1, 1, 4];
        let scores = [0.0, 0.0, 0.0, -5.0, -1.0, -6.0, 0.0];
        let m = spm_merges(&tokens, &scores, &types);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            pairs,
            [("a", "b"), ("b", "a"), ("a", "ba"), ("ab", "a")],
            "merge order"
        );
        // Uniform (placeholder) scores: id order, runs of ▁ last.
        let tokens = ["▁", "x", "▁▁", "▁x"];
        let m = spm_merges(&tokens, &[-1000.0; 4], &[1; 4]);
        assert_eq!(m[0], ("▁".to_string(), "x".to_string()));
        assert_eq!(m[1], ("▁".to_string(), "▁".to_string()));
    }

    #[test]
    fn llama_cpp_names_map_to_hf() {
        let cfg = TextConfig {
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 2,
            max_position_embeddings: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling_factor: 1.0,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight", None),
            ("output.weight", "lm_head.weight", None),
            ("output_norm.weight", "model.norm.weight", None),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
                Some(4),
            ),
            (
                "blk.3.attn_k.bias",
                "model.layers.3.self_attn.k_proj.bias",
                Some(2),
            ),
            (
                "blk.0.attn_v.weight",
                "model.layers.0.self_attn.v_proj.weight",
                None,
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
                None,
            ),
            (
                "blk.12.ffn_down.weight",
                "model.layers.12.mlp.down_proj.weight",
                None,
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
                None,
            ),
            (
                "blk.1.attn_norm.weight",
                "model.layers.1.input_layernorm.weight",
                None,
            ),
        ];
        for (g, hf, heads) in cases {
            assert_eq!(hf_name(g, &cfg), Some((hf.to_string(), heads)), "{g}");
        }
        assert_eq!(hf_name("rope_freqs.weight", &cfg), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", &cfg), None);
    }
}

//! The OpenAI wire format of `serve`: errors (`{"error": {message, type, param, code}}`),
//! the chat-completion request (checked field by field, so every malformed request gets a
//! 4xx that names the field) and the response and stream-chunk bodies.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use models::chat::{Message, Rendered};
use models::sampling::SamplingParams;
use pruner::PruneConfig;
use serde_json::{json, Value};

/// Most stop strings per request (OpenAI allows 4; a few more cost nothing).
pub const MAX_STOP: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// An error answer in OpenAI's shape.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code, when there is one.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// Any other status.
    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 500 (the request failed inside the server; others are not affected).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// With a machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// Server-side defaults a request may override.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Tokens per answer when the request names none.
    pub max_tokens: usize,
    /// Sampling when the request names none (greedy unless the server was told otherwise).
    pub sampling: SamplingParams,
    /// Pruning when the request names none (`None`: the paper's config when it fits).
    pub prune: Option<PruneConfig>,
    /// Decoder layers (pruning configs are checked against them).
    pub layers: usize,
    /// The model's context in tokens: a rendered prompt of more than 64 bytes per token of
    /// it cannot fit and is refused before the engine spends time tokenising it.
    pub context: usize,
    /// The conversation format requests are rendered in.
    pub template: models::prompt::Template,
    /// Most images one request may hold (`--max-images`); more are a 400.
    pub max_images: usize,
}

/// A checked chat-completion request.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Rendered with the model's template.
    pub rendered: Rendered,
    /// Upper bound on answer tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings (the answer ends before the first one found).
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON answer.
    pub stream: bool,
    /// A last chunk with `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Pruning: `None` is the server's default.
    pub prune: Option<PruneConfig>,
    /// The `model` field, echoed back.
    pub model: Option<String>,
}

fn num(v: &Value, name: &str) -> Result<Option<f64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(Some(name), format!("`{name}` must be a number"))),
    }
}

fn count(v: &Value, name: &str) -> Result<Option<u64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                Some(name),
                format!("`{name}` must be a non-negative integer, got {x}"),
            )
        }),
    }
}

fn boolean(v: &Value, name: &str) -> Result<bool, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(
            Some(name),
            format!("`{name}` must be true or false"),
        )),
    }
}

/// OpenAI chat-completion parameters this server does not implement, with why. A request
/// that sets one to anything but its neutral value is a 400 naming it: answering as if it
/// had been honoured (plain text where a JSON schema was asked for, no tool call where
/// tools were offered) would be silent garbage.
pub const UNSUPPORTED: [(&str, &str); 16] = [
    (
        "response_format",
        "structured output (JSON mode, JSON schema) is not implemented; only {\"type\": \"text\"}",
    ),
    ("logprobs", "log probabilities are not returned"),
    ("top_logprobs", "log probabilities are not returned"),
    ("tools", "tool calling is not implemented"),
    ("tool_choice", "tool calling is not implemented"),
    ("parallel_tool_calls", "tool calling is not implemented"),
    ("functions", "function calling is not implemented"),
    ("function_call", "function calling is not implemented"),
    ("logit_bias", "logit bias is not implemented"),
    (
        "presence_penalty",
        "presence penalty is not implemented; only 0",
    ),
    (
        "frequency_penalty",
        "frequency penalty is not implemented; only 0",
    ),
    ("audio", "audio output is not implemented"),
    ("modalities", "only text output is implemented: [\"text\"]"),
    ("prediction", "predicted outputs are not implemented"),
    ("web_search_options", "web search is not implemented"),
    (
        "reasoning_effort",
        "this model has no reasoning effort setting",
    ),
];

/// Whether an unsupported parameter is set to what not implementing it gives anyway.
fn neutral(name: &str, x: &Value) -> bool {
    match x {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => {
            matches!(
                name,
                "presence_penalty" | "frequency_penalty" | "top_logprobs"
            ) && n.as_f64() == Some(0.0)
        }
        Value::Array(a) => {
            matches!(name, "tools" | "functions") && a.is_empty()
                || name == "modalities" && a.iter().all(|m| m == "text")
        }
        Value::Object(o) if name == "response_format" => {
            o.len() == 1 && o.get("type").is_some_and(|t| t == "text")
        }
        Value::Object(o) if name == "logit_bias" => o.is_empty(),
        Value::String(t) => name == "tool_choice" && t == "none",
        _ => false,
    }
}

fn unsupported(v: &Value) -> Result<(), ApiError> {
    for (name, why) in UNSUPPORTED {
        if let Some(x) = v.get(name) {
            if !neutral(name, x) {
                return Err(ApiError::bad(
                    Some(name),
                    format!("`{name}` is not supported by this server: {why}"),
                )
                .code("unsupported_parameter"));
            }
        }
    }
    Ok(())
}

/// Parses and checks a chat-completion body (everything but the images' content, which
/// [`super::load_images`] checks).
pub fn parse_chat(body: &[u8], d: &Defaults) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(None, format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(None, "the body must be a JSON object"));
    }
    let model = match v.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad(Some("model"), "`model` must be a string")),
    };
    let msgs = match v.get("messages") {
        Some(m @ Value::Array(_)) => m,
        Some(_) => {
            return Err(ApiError::bad(
                Some("messages"),
                "`messages` must be an array of messages",
            ))
        }
        None => return Err(ApiError::bad(Some("messages"), "`messages` is required")),
    };
    let messages = models::chat::messages_from_json(msgs)
        .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    let rendered = models::chat::render(d.template, &messages)
        .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    if rendered.text.len() > d.context.saturating_mul(64) {
        return Err(ApiError::bad(
            Some("messages"),
            format!(
                "the conversation is {} bytes, far over the model's context of {} tokens",
                rendered.text.len(),
                d.context
            ),
        )
        .code("context_length_exceeded"));
    }
    if rendered.images.len() > d.max_images {
        return Err(ApiError::bad(
            Some("messages"),
            format!(
                "too many images: the conversation holds {}; this server takes at most {} per request (--max-images)",
                rendered.images.len(),
                d.max_images
            ),
        ));
    }
    unsupported(&v)?;
    if let Some(n) = count(&v, "n")? {
        if n != 1 {
            return Err(ApiError::bad(
                Some("n"),
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    } else if v.get("n").is_some_and(|x| !x.is_null()) {
        return Err(ApiError::bad(Some("n"), "only n = 1 is supported"));
    }
    let a = count(&v, "max_tokens")?;
    let b = count(&v, "max_completion_tokens")?;
    let (max_tokens, param) = match (b, a) {
        (Some(x), _) => (x, "max_completion_tokens"),
        (None, Some(x)) => (x, "max_tokens"),
        (None, None) => (d.max_tokens as u64, "max_tokens"),
    };
    if max_tokens == 0 {
        return Err(ApiError::bad(
            Some(param),
            format!("`{param}` must be at least 1"),
        ));
    }
    let mut sampling = d.sampling;
    if let Some(t) = num(&v, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad(
                Some("temperature"),
                format!("`temperature` must be between 0 and 2, got {t}"),
            ));
        }
        sampling.temperature = t as f32;
    }
    if let Some(p) = num(&v, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad(
                Some("top_p"),
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
        sampling.top_p = p as f32;
    }
    if let Some(k) = count(&v, "top_k")? {
        sampling.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    match v.get("seed") {
        None | Some(Value::Null) => {}
        Some(x) => {
            // OpenAI's seed is any 64-bit integer; negative ones keep their bits.
            sampling.seed = match (x.as_u64(), x.as_i64()) {
                (Some(u), _) => u,
                (None, Some(i)) => i as u64,
                _ => return Err(ApiError::bad(Some("seed"), "`seed` must be an integer")),
            }
        }
    }
    sampling
        .validate()
        .map_err(|e| ApiError::bad(Some("temperature"), e.to_string()))?;
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for s in a {
                match s {
                    Value::String(s) => out.push(s.clone()),
                    _ => return Err(ApiError::bad(Some("stop"), "`stop` must hold strings")),
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::bad(
                Some("stop"),
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > MAX_STOP
        || stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::bad(
            Some("stop"),
            format!(
                "`stop`: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_BYTES} bytes"
            ),
        ));
    }
    let stream = boolean(&v, "stream")?;
    let include_usage = match v.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(o @ Value::Object(_)) => boolean(o, "include_usage").map_err(|_| {
            ApiError::bad(
                Some("stream_options"),
                "`stream_options.include_usage` must be true or false",
            )
        })?,
        Some(_) => {
            return Err(ApiError::bad(
                Some("stream_options"),
                "`stream_options` must be an object",
            ))
        }
    };
    let prune = match v.get("visi") {
        None | Some(Value::Null) => d.prune.clone(),
        Some(Value::Object(o)) => match o.get("prune") {
            None | Some(Value::Null) => d.prune.clone(),
            Some(Value::String(s)) if s == "default" => None,
            Some(c @ (Value::Object(_) | Value::String(_))) => {
                // An object, or the `--prune` short form ("none", "fastv:128", "divprune:64").
                let cfg = match c {
                    Value::String(s) => PruneConfig::parse_arg(s),
                    _ => PruneConfig::from_value(c),
                }
                .map_err(|e| ApiError::bad(Some("visi.prune"), e.to_string()))?;
                cfg.validate(d.layers).map_err(|e| {
                    ApiError::bad(
                        Some("visi.prune"),
                        format!(
                            "pruning config does not fit this {}-layer model: {e}",
                            d.layers
                        ),
                    )
                })?;
                Some(cfg)
            }
            Some(_) => {
                return Err(ApiError::bad(
                    Some("visi.prune"),
                    "`visi.prune` must be a pruning config object, a short form (\"none\", \"fastv:128\", \"divprune:64\") or \"default\"",
                ))
            }
        },
        Some(_) => return Err(ApiError::bad(Some("visi"), "`visi` must be an object")),
    };
    Ok(ChatRequest {
        messages,
        rendered,
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        sampling,
        stop,
        stream,
        include_usage,
        prune,
        model,
    })
}

/// Why an answer ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` (or the context) reached.
    Length,
    /// Cancelled by the server (shutdown deadline).
    Cancelled,
}

impl FinishReason {
    /// The wire name.
    pub fn name(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished answer, as the engine hands it over.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The answer text (cut before a stop string).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens after `<image>` expansion.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// The `visi` extension object (token ids, pruning report, timings).
    pub visi: Value,
}

/// `usage`.
pub fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

/// The non-streamed response body.
pub fn completion(id: &str, created: u64, model: &str, f: &Finished) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": f.text},
            "logprobs": null,
            "finish_reason": f.finish_reason.name(),
        }],
        "usage": usage(f),
        "visi": f.visi,
    })
}

/// One stream chunk: `delta` and `finish_reason` for choice 0.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

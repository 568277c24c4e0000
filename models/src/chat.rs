//! Conversations: OpenAI-style messages, their rendering with the model's template, and
//! the images they carry.
//!
//! For LLaVA-1.5 the template is LLaVA's own `conv_vicuna_v1` (sep style TWO):
//! `{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`. The rendered
//! string is tokenised whole, so a conversation gives the same ids as `--template raw`
//! with that string.

use std::path::{Path, PathBuf};

use engine_core::{Error, Result};
use image::RgbImage;
use serde_json::{json, Value};

use crate::prompt::{Template, IMAGE_PLACEHOLDER, VICUNA_SYSTEM};

/// Largest messages document accepted.
pub const MAX_MESSAGES_BYTES: u64 = 64 << 20;

/// Who said it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Replaces the template's system sentence.
    System,
    /// The person asking.
    User,
    /// The model's earlier answers.
    Assistant,
}

impl Role {
    /// `"system"`, `"user"` or `"assistant"`.
    pub fn name(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One piece of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Text.
    Text(String),
    /// An image by URL: `data:image/...;base64,...` or a local file path.
    Image(String),
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// Its parts, in order.
    pub parts: Vec<Part>,
}

impl Message {
    /// A text-only message.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            parts: vec![Part::Text(text.into())],
        }
    }

    /// The text parts, in order.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            Part::Image(_) => None,
        })
    }

    /// The text parts joined by newlines.
    pub fn joined_text(&self) -> String {
        self.texts().collect::<Vec<_>>().join("\n")
    }

    /// The image URLs, in order.
    pub fn images(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Image(u) => Some(u.as_str()),
            Part::Text(_) => None,
        })
    }

    /// OpenAI's JSON form (a plain string when the message is one text part).
    pub fn to_json(&self) -> Value {
        let content = match &self.parts[..] {
            [Part::Text(t)] => json!(t),
            parts => Value::Array(
                parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => json!({"type": "text", "text": t}),
                        Part::Image(u) => json!({"type": "image_url", "image_url": {"url": u}}),
                    })
                    .collect(),
            ),
        };
        json!({"role": self.role.name(), "content": content})
    }
}

/// Parses an OpenAI-style `messages` array (or an object holding one under `messages`).
/// Errors say which message and field is wrong.
pub fn parse_messages(text: &str) -> Result<Vec<Message>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::msg(format!("messages: invalid JSON: {e}")))?;
    messages_from_json(&v)
}

/// [`parse_messages`] over already parsed JSON.
pub fn messages_from_json(v: &Value) -> Result<Vec<Message>> {
    let arr = match v {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("messages") {
            Some(Value::Array(a)) => a,
            _ => return Err(Error::msg(
                "messages: expected an array of messages (or an object with a `messages` array)",
            )),
        },
        _ => return Err(Error::msg("messages: expected an array of messages")),
    };
    if arr.is_empty() {
        return Err(Error::msg("messages: the conversation is empty"));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let at = |what: &str| Error::msg(format!("messages[{i}]: {what}"));
        let obj = m.as_object().ok_or_else(|| at("expected an object"))?;
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(at(&format!(
                    "unknown role `{other}` (expected system, user or assistant)"
                )))
            }
            None => return Err(at("missing string field `role`")),
        };
        let parts = match obj.get("content") {
            Some(Value::String(s)) => vec![Part::Text(s.clone())],
            Some(Value::Array(ps)) => {
                let mut parts = Vec::with_capacity(ps.len());
                for (j, p) in ps.iter().enumerate() {
                    let pat =
                        |what: &str| Error::msg(format!("messages[{i}].content[{j}]: {what}"));
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = p
                                .get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| pat("missing string field `text`"))?;
                            parts.push(Part::Text(t.to_string()));
                        }
                        Some("image_url") => {
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => u.as_str(),
                                Some(Value::Object(o)) => o
                                    .get("url")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| pat("missing string field `image_url.url`"))?,
                                _ => return Err(pat("missing field `image_url`")),
                            };
                            parts.push(Part::Image(url.to_string()));
                        }
                        Some(other) => {
                            return Err(pat(&format!(
                                "unknown part type `{other}` (expected text or image_url)"
                            )))
                        }
                        None => return Err(pat("missing string field `type`")),
                    }
                }
                parts
            }
            Some(Value::Null) | None if role == Role::Assistant => Vec::new(),
            _ => return Err(at("`content` must be a string or a list of parts")),
        };
        if role != Role::User && parts.iter().any(|p| matches!(p, Part::Image(_))) {
            return Err(at("only user messages may hold images"));
        }
        out.push(Message { role, parts });
    }
    Ok(out)
}

/// The messages as OpenAI JSON (what `run --messages` reads back).
pub fn messages_to_json(messages: &[Message]) -> Value {
    Value::Array(messages.iter().map(Message::to_json).collect())
}

/// A conversation rendered for the model: the prompt text and its images in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The prompt, one `<image>` per image.
    pub text: String,
    /// Image URLs in the order their `<image>` placeholders appear.
    pub images: Vec<String>,
}

/// Checks the shape every chat template expects: an optional system message first, then
/// user and assistant turns alternating, ending with a user turn, and no `<image>` typed
/// into text. Returns the system text (if any) and the turns.
fn checked_turns(messages: &[Message]) -> Result<(Option<String>, &[Message])> {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == Role::System => (Some(m.joined_text()), &messages[1..]),
        _ => (None, messages),
    };
    if turns.is_empty() {
        return Err(Error::msg("messages: no user message"));
    }
    for (i, m) in turns.iter().enumerate() {
        let want = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != want {
            return Err(Error::msg(format!(
                "messages: expected a {} message at position {} (after an optional system message, user and assistant turns alternate)",
                want.name(),
                i + usize::from(turns.len() != messages.len())
            )));
        }
        if m.parts
            .iter()
            .any(|p| matches!(p, Part::Text(t) if t.contains(IMAGE_PLACEHOLDER)))
        {
            return Err(Error::msg(format!(
                "messages: text may not contain `{IMAGE_PLACEHOLDER}`; send images as image_url parts"
            )));
        }
    }
    if turns.last().map(|m| m.role) != Some(Role::User) {
        return Err(Error::msg(
            "messages: the last message must be from the user",
        ));
    }
    Ok((system, turns))
}

/// Renders `messages` in `template`'s conversation format: [`render_vicuna_v1`] or
/// [`render_mistral_instruct`]; `raw` has no conversation format and is an error.
pub fn render(template: Template, messages: &[Message]) -> Result<Rendered> {
    match template {
        Template::VicunaV1 => render_vicuna_v1(messages),
        Template::MistralInstruct => render_mistral_instruct(messages),
        Template::Raw => Err(Error::msg(
            "a conversation is rendered with the model's template (vicuna_v1 or mistral_instruct); raw does not apply",
        )),
    }
}

/// How a chat template lays out a conversation's turns.
struct TurnFormat {
    /// Before and after a user turn (its `<image>\n` lines and text go between).
    user: (&'static str, &'static str),
    /// Before and after an assistant turn.
    assistant: (&'static str, &'static str),
    /// Between the text parts of one message.
    text_sep: &'static str,
    /// After the last user turn (the cue for the answer).
    cue: &'static str,
}

/// Lays out `turns` after `text` (the rendered system part) in `f`'s format.
fn render_turns(mut text: String, turns: &[Message], f: &TurnFormat) -> Rendered {
    let mut images = Vec::new();
    for m in turns {
        let body = m.texts().collect::<Vec<_>>().join(f.text_sep);
        let (open, close) = match m.role {
            Role::User => f.user,
            _ => f.assistant,
        };
        text.push_str(open);
        if m.role == Role::User {
            for url in m.images() {
                text.push_str(IMAGE_PLACEHOLDER);
                text.push('\n');
                images.push(url.to_string());
            }
        }
        text.push_str(&body);
        text.push_str(close);
    }
    text.push_str(f.cue);
    Rendered { text, images }
}

/// Renders `messages` with LLaVA's `conv_vicuna_v1`: an optional system message first,
/// then user and assistant turns alternating, ending with a user turn; `<image>\n` goes
/// before the text of the user turn that holds the image.
pub fn render_vicuna_v1(messages: &[Message]) -> Result<Rendered> {
    let (system, turns) = checked_turns(messages)?;
    let system = system.unwrap_or_else(|| VICUNA_SYSTEM.to_string());
    let format = TurnFormat {
        user: ("USER: ", " "),
        assistant: ("ASSISTANT: ", "</s>"),
        text_sep: "\n",
        cue: "ASSISTANT:",
    };
    Ok(render_turns(format!("{system} "), turns, &format))
}

/// Renders `messages` with the chat template of llava-hf's `llava-v1.6-mistral-7b-hf`: a
/// system message as `<<SYS>>\n{system}\n<</SYS>>\n\n`, each user turn as
/// `[INST] ` + one `<image>\n` per image + its text parts joined without a separator +
/// ` [/INST]`, each assistant turn as ` {answer}</s> `. One user turn renders exactly as
/// `Template::MistralInstruct` renders a prompt.
pub fn render_mistral_instruct(messages: &[Message]) -> Result<Rendered> {
    let (system, turns) = checked_turns(messages)?;
    let system = match system {
        Some(s) => format!("<<SYS>>\n{s}\n<</SYS>>\n\n"),
        None => String::new(),
    };
    let format = TurnFormat {
        user: ("[INST] ", " [/INST]"),
        assistant: (" ", "</s> "),
        text_sep: "",
        cue: "",
    };
    Ok(render_turns(system, turns, &format))
}

/// Where an image URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Bytes from a `data:` URL.
    Data(Vec<u8>),
    /// A local file.
    File(PathBuf),
}

/// Largest `data:` URL accepted (its base64 text).
pub const MAX_DATA_URL_BYTES: usize = 48 << 20;

/// Classifies an image URL: `data:image/...;base64,` decoded, `http(s)://` refused (this
/// process fetches nothing), `file://` or a plain path as a file.
pub fn image_source(url: &str) -> Result<ImageSource> {
    use base64::Engine as _;
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| Error::msg("image data URL has no `,`"))?;
        if !meta.starts_with("image/") || !meta.ends_with(";base64") {
            return Err(Error::msg(format!(
                "image data URL must be `data:image/<type>;base64,...`, got `data:{}`",
                meta.chars().take(40).collect::<String>()
            )));
        }
        if data.len() > MAX_DATA_URL_BYTES {
            return Err(Error::msg(format!(
                "image data URL of {} bytes is over the {MAX_DATA_URL_BYTES}-byte limit",
                data.len()
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| Error::msg(format!("image data URL: bad base64: {e}")))?;
        return Ok(ImageSource::Data(bytes));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(Error::msg(format!(
            "remote image URLs are not fetched ({}); send a data: URL or a local path",
            url.chars().take(80).collect::<String>()
        )));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() {
        return Err(Error::msg("empty image URL"));
    }
    Ok(ImageSource::File(PathBuf::from(path)))
}

/// Loads an image URL ([`image_source`]) as RGB8, files relative to `base` when given.
pub fn load_image_url(url: &str, base: Option<&Path>) -> Result<RgbImage> {
    match image_source(url)? {
        ImageSource::Data(bytes) => crate::preprocess::decode_image(&bytes, "image data URL"),
        ImageSource::File(p) => {
            let p = match base {
                Some(b) if p.is_relative() => b.join(p),
                _ => p,
            };
            crate::preprocess::load_image(&p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: Value) -> Vec<Message> {
        messages_from_json(&v).unwrap()
    }

    #[test]
    fn renders_llava_conv_vicuna_v1() {
        let m = msgs(json!([
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "a.png"}},
                {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour?"}
        ]));
        let r = render_vicuna_v1(&m).unwrap();
        assert_eq!(
            r.text,
            format!("{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: What colour? ASSISTANT:")
        );
        assert_eq!(r.images, vec!["a.png".to_string()]);
        // One turn renders exactly as the single-prompt template does.
        let one = msgs(json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(
            render_vicuna_v1(&one).unwrap().text,
            crate::prompt::Template::VicunaV1
                .render("Hi", false)
                .unwrap()
        );
        let sys = msgs(
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
        );
        assert_eq!(
            render_vicuna_v1(&sys).unwrap().text,
            "Be brief. USER: Hi ASSISTANT:"
        );
    }

    #[test]
    fn renders_llava_hf_mistral_template() {
        // Expected text written from llava-hf's llava-v1.6-mistral chat template by hand;
        // tests/conversation.rs checks a conversation against transformers' rendering.
        let m = msgs(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": "a.png"}},
                {"type": "image_url", "image_url": {"url": "b.png"}}]},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": [{"type": "text", "text": "Colours?"}, {"type": "text", "text": " Short."}]}
        ]));
        let r = render(Template::MistralInstruct, &m).unwrap();
        assert_eq!(
            r.text,
            "<<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] <image>\n<image>\nWhat is it? [/INST] Two cats.</s> [INST] Colours? Short. [/INST]"
        );
        assert_eq!(r.images, vec!["a.png".to_string(), "b.png".to_string()]);
        let one = msgs(json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(
            render_mistral_instruct(&one).unwrap().text,
            Template::MistralInstruct.render("Hi", false).unwrap()
        );
        assert!(render(Template::Raw, &one).is_err());
    }

    #[test]
    fn rejects_malformed_conversations() {
        for bad in [
            json!([]),
            json!([{"role": "robot", "content": "x"}]),
            json!([{"role": "user"}]),
            json!([{"role": "user", "content": 3}]),
            json!([{"role": "user", "content": [{"type": "audio"}]}]),
            json!([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]),
            json!({"messages": 1}),
        ] {
            assert!(messages_from_json(&bad).is_err(), "{bad}");
        }
        for bad in [
            json!([{"role": "assistant", "content": "x"}]),
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            json!([{"role": "system", "content": "s"}]),
            json!([{"role": "user", "content": "<image> x"}]),
        ] {
            assert!(render_vicuna_v1(&msgs(bad.clone())).is_err(), "{bad}");
            assert!(
                render_mistral_instruct(&msgs(bad.clone())).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn image_urls() {
        assert_eq!(
            image_source("data:image/png;base64,aGk=").unwrap(),
            ImageSource::Data(b"hi".to_vec())
        );
        assert!(image_source("data:image/png;base64,@@@").is_err());
        assert!(image_source("data:text/plain;base64,aGk=").is_err());
        assert!(image_source("https://example.com/a.png").is_err());
        assert_eq!(
            image_source("file:///tmp/a.png").unwrap(),
            ImageSource::File("/tmp/a.png".into())
        );
        // Round trip through the JSON form.
        let m = msgs(
            json!([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "b.png"}}]}]),
        );
        assert_eq!(messages_from_json(&messages_to_json(&m)).unwrap(), m);
    }
}

//! `visi-cli chat`: an interactive multi-turn conversation over one generation session.
//!
//! Each turn renders the whole conversation with the model's template and generates in
//! the same session, which reuses the image encoding and the KV rows the turns share (see
//! `models::session`), so a follow-up costs a fraction of a fresh run and gives exactly the
//! fresh run's tokens. With stdin not a terminal, each line is one user turn (scriptable).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use image::RgbImage;
use models::chat::{Message, Part, Role};
use models::llava::{GenerateOptions, Generation, Llava};
use models::prompt::Template;

use crate::errors::{bad_input, internal, Failure};
use crate::{progress, ChatTemplateArg, GenArgs};

/// Arguments of `visi-cli chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    g: GenArgs,
    /// An image to talk about from the first turn (`/image PATH` changes it later).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The conversation format: `vicuna_v1` (LLaVA-1.5, llava-v1.6-vicuna) or
    /// `mistral_instruct` (llava-v1.6-mistral).
    #[arg(long, value_enum, default_value = "vicuna_v1")]
    template: ChatTemplateArg,
}

const HELP: &str = "commands: /image PATH (attach to your next message), /reset or /clear (new conversation), /save FILE [--force] (messages JSON for `run --messages`), /stats, /quit; keys: arrows and Ctrl-A/E/W/U edit, Up/Down recall earlier lines, Ctrl-C stops an answer (twice at the prompt quits), Ctrl-D quits";

/// An image attached to the conversation: what `/save` writes and the pixels.
struct Attached {
    url: String,
    pixels: RgbImage,
}

fn load_attached(path: &Path) -> anyhow::Result<Attached> {
    let pixels = models::preprocess::load_image(path)?;
    // Saved conversations name the file absolutely, so they load from anywhere.
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(Attached {
        url: abs.display().to_string(),
        pixels,
    })
}

/// `visi-cli chat`.
pub fn chat(a: ChatArgs) -> Result<(), Failure> {
    progress::install_ctrl_c();
    let sampling = a.g.sampling()?;
    let prune = a.g.prune_config()?;
    let model_dir = a.g.model_path()?;
    if a.g.is_gguf() && a.g.mmproj.is_none() {
        return Err(bad_input(anyhow!(
            "chat needs a LLaVA model: a llava-hf directory, or a GGUF text model with its --mmproj"
        )));
    }
    let mut image = a
        .image
        .as_deref()
        .map(load_attached)
        .transpose()
        .map_err(|e| bad_input(e.context("--image")))?;
    let mode = a.g.pad_mode();
    let llava = a.g.load_llava(&model_dir)?;
    let (_, note) = llava
        .resolve_prune(prune.as_ref())
        .map_err(|e| bad_input(e.into()))?;
    crate::errors::release_notes();
    if let Some(n) = &note {
        eprintln!("note: {n}");
    }
    let opts = GenerateOptions {
        template: Template::Raw,
        image_mode: mode,
        max_new_tokens: a.g.max_new_tokens,
        sampling,
        prune,
        keep_first_logits: false,
        kv_dtype: a.g.kv_dtype.dtype(),
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let dev = llava.device_info();
    let mut chat = Chat {
        llava: &llava,
        session: llava.session(),
        messages: Vec::new(),
        pending: image.take(),
        images: Vec::new(),
        opts,
        template: a.template.template(),
        last: None,
        timing: interactive,
    };
    if let Some(img) = &chat.pending {
        // The first turn's image, refused before any turn runs.
        crate::validate::pad_fits(&llava, &img.pixels, mode)
            .map_err(|e| bad_input(e.context("--image")))?;
    }
    // On a terminal, a line editor (editing keys, history); else one turn per stdin line.
    let mut editor = if interactive {
        rustyline::DefaultEditor::new().ok()
    } else {
        None
    };
    let mut ctrl_c_once = false;
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let mut raw = Vec::new();
    let mut line_no = 0usize;
    loop {
        if let Some(ed) = editor.as_mut() {
            use rustyline::error::ReadlineError;
            match ed.readline("> ") {
                Ok(l) => {
                    ctrl_c_once = false;
                    if !l.trim().is_empty() {
                        let _ = ed.add_history_entry(l.as_str());
                    }
                    raw = l.into_bytes();
                }
                Err(ReadlineError::Interrupted) => {
                    // Ctrl-C at the prompt: asked once, the second one quits.
                    if ctrl_c_once {
                        break;
                    }
                    ctrl_c_once = true;
                    eprintln!("(Ctrl-C again to quit; or type on: the conversation is kept)");
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(internal(anyhow!("reading the terminal: {e}"))),
            }
            line_no += 1;
            if raw.len() as u64 > MAX_LINE_BYTES {
                eprintln!(
                    "error: the line is longer than {MAX_LINE_BYTES} bytes; the turn is skipped"
                );
                continue;
            }
        } else {
            if interactive {
                eprint!("> ");
                let _ = std::io::stderr().flush();
            }
            let whole = match read_line_bounded(&mut stdin, &mut raw, MAX_LINE_BYTES) {
                Ok(Some(whole)) => whole,
                Ok(None) => break,
                Err(e) => return Err(internal(anyhow!("reading stdin: {e}"))),
            };
            line_no += 1;
            if !whole {
                eprintln!(
                    "error: stdin line {line_no} is longer than {MAX_LINE_BYTES} bytes; the turn is skipped"
                );
                continue;
            }
        }
        // A line that is not UTF-8 is the user's to fix: that turn is refused, as a bad
        // image is, and the chat goes on.
        let Ok(line) = std::str::from_utf8(&raw) else {
            eprintln!("error: stdin line {line_no} is not valid UTF-8; the turn is skipped");
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "quit" | "exit" => break,
                "help" => eprintln!("{HELP}"),
                "reset" | "clear" => {
                    chat.messages.clear();
                    chat.images.clear();
                    chat.pending = None;
                    eprintln!("(new conversation)");
                }
                "image" if !arg.is_empty() => match load_attached(Path::new(arg)).and_then(|img| {
                    crate::validate::pad_fits(&llava, &img.pixels, mode)?;
                    Ok(img)
                }) {
                    // The conversation keeps its earlier images: this one joins them.
                    Ok(img) => {
                        eprintln!(
                            "(attached {arg}, {}x{}: it goes with your next message)",
                            img.pixels.width(),
                            img.pixels.height()
                        );
                        chat.pending = Some(img);
                    }
                    Err(e) => eprintln!("error: /image: {e:#}"),
                },
                "save" if !arg.is_empty() => {
                    let (file, force) = match arg.strip_suffix("--force") {
                        Some(f) => (f.trim(), true),
                        None => (arg, false),
                    };
                    let text = serde_json::to_string_pretty(&models::chat::messages_to_json(
                        &chat.messages,
                    ))
                    .unwrap_or_default();
                    match engine_core::files::write_files_atomic(
                        &[(Path::new(file), text.as_bytes())],
                        force,
                    ) {
                        Ok(()) => eprintln!("(saved {} messages to {file})", chat.messages.len()),
                        Err(e) => eprintln!("error: /save: {e:#}"),
                    }
                }
                "stats" => match &chat.last {
                    Some(g) => eprintln!("{}", turn_stats(g, &dev.backend, &dev.adapter)),
                    None => eprintln!("(no answer yet)"),
                },
                _ => eprintln!("error: unknown command `/{name}` ({HELP})"),
            }
            continue;
        }
        chat.turn(line)?;
    }
    Ok(())
}

/// The longest user turn read from stdin (as `run --messages` bounds its file).
const MAX_LINE_BYTES: u64 = models::chat::MAX_MESSAGES_BYTES;

/// Reads one line of at most `limit` bytes into `buf`: `None` at the end of input,
/// `Some(false)` when the line was longer (the rest of it is read and dropped, in bounded
/// pieces), `Some(true)` otherwise.
fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: u64,
) -> std::io::Result<Option<bool>> {
    use std::io::Read;
    buf.clear();
    let n = r.by_ref().take(limit + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n as u64 <= limit || buf.ends_with(b"\n") {
        return Ok(Some(true));
    }
    loop {
        buf.clear();
        let n = r.by_ref().take(1 << 20).read_until(b'\n', buf)?;
        if n == 0 || buf.ends_with(b"\n") {
            buf.clear();
            return Ok(Some(false));
        }
    }
}

/// One conversation and its session.
struct Chat<'a> {
    llava: &'a Llava,
    session: models::Session,
    messages: Vec<Message>,
    /// Image to attach to the next user message.
    pending: Option<Attached>,
    /// The conversation's images, in the order their messages hold them.
    images: Vec<Attached>,
    opts: GenerateOptions,
    /// How the conversation is rendered.
    template: Template,
    last: Option<Generation>,
    /// A timing line after each answer (on a terminal).
    timing: bool,
}

impl Chat<'_> {
    /// Answers `text`, streaming; failures of this turn are reported and the turn dropped,
    /// except internal ones, which end the chat.
    fn turn(&mut self, text: &str) -> Result<(), Failure> {
        let mut parts = Vec::new();
        let attached = self.pending.take();
        if let Some(img) = &attached {
            parts.push(Part::Image(img.url.clone()));
        }
        parts.push(Part::Text(text.to_string()));
        self.messages.push(Message {
            role: Role::User,
            parts,
        });
        let all: Vec<&Attached> = self.images.iter().chain(&attached).collect();
        let mode = self.opts.image_mode;
        let prompt = all
            .iter()
            .try_for_each(|i| crate::validate::pad_fits(self.llava, &i.pixels, mode))
            .and_then(|_| Ok(models::chat::render(self.template, &self.messages)?))
            .and_then(|r| {
                crate::validate::text_fits(self.llava, &r.text)?;
                let counts = all
                    .iter()
                    .map(|i| {
                        self.llava
                            .image_tokens_for(i.pixels.width(), i.pixels.height())
                    })
                    .collect::<engine_core::Result<Vec<_>>>()?;
                Ok(self.llava.prompt_images(Template::Raw, &r.text, &counts)?)
            });
        let prompt = match prompt {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e:#}");
                self.messages.pop();
                self.pending = attached;
                return Ok(());
            }
        };
        self.images.extend(attached);
        // Earlier images come from the model's image cache.
        let encoded = self
            .images
            .iter()
            .map(|img| self.llava.encode_image(&img.pixels, self.opts.image_mode))
            .collect::<engine_core::Result<Vec<_>>>()
            .map_err(|e| internal(e.into()))?;
        let mut stdout = std::io::stdout().lock();
        // A failed write (closed pipe, full disk) stops generation and ends the chat: the
        // answers are being lost.
        let write_error: std::cell::RefCell<Option<Failure>> = Default::default();
        let mut on_text = |t: &str| {
            if write_error.borrow().is_none() {
                if let Err(f) = crate::validate::write_out(&mut stdout, t) {
                    *write_error.borrow_mut() = Some(f);
                }
            }
        };
        let stop = || progress::stop_requested() || write_error.borrow().is_some();
        progress::set_generating(true);
        let gen = self.llava.generate_in(
            &mut self.session,
            &prompt,
            &encoded,
            &self.opts,
            &mut on_text,
            &stop,
        );
        progress::set_generating(false);
        progress::clear_stop();
        if let Some(f) = write_error.take() {
            return Err(f);
        }
        crate::validate::write_out(&mut stdout, "\n")?;
        let gen = gen.map_err(crate::errors::classify)?;
        if gen.interrupted {
            eprintln!("(stopped)");
        }
        if self.timing {
            eprintln!("{}", turn_timing(&gen));
        }
        self.messages
            .push(Message::text(Role::Assistant, gen.text.trim().to_string()));
        self.last = Some(gen);
        Ok(())
    }
}

/// The line after each answer on a terminal: tokens, time to first token, speeds.
fn turn_timing(g: &Generation) -> String {
    let t = &g.timings;
    let (new, prefill_tps) = progress::prefill_rate(g.prompt_tokens, g.reused_tokens, t.prefill_ms);
    format!(
        "({} tokens in {:.2} s, {:.1} tokens/s; first token after {:.0} ms; prefill {new} new tokens at {:.1} tokens/s, {} reused)",
        g.tokens.len(),
        (t.vision_ms + t.prefill_ms + t.decode_ms) / 1e3,
        g.decode_tokens_per_s,
        t.vision_ms + t.prefill_ms,
        prefill_tps,
        g.reused_tokens.min(g.prompt_tokens),
    )
}

/// `/stats`: what the last turn cost and reused.
fn turn_stats(g: &Generation, backend: &str, adapter: &str) -> String {
    let reuse = match g.recomputed_from_layer {
        Some(l) => format!(
            "reused {} of {} prompt tokens (recomputed from layer {l})",
            g.reused_tokens, g.prompt_tokens
        ),
        None => format!(
            "reused {} of {} prompt tokens",
            g.reused_tokens, g.prompt_tokens
        ),
    };
    format!("{}; {reuse}", progress::stats_line(g, backend, adapter),)
}

//! Checks of what the user hands in, done before any expensive work (loading weights, a
//! benchmark, generation), and the stdout writes whose failures must not be lost.
//!
//! Input files must be regular files (a FIFO would hang the open, `/dev/zero` never ends);
//! output files must be writable where they are asked for, and an existing one is replaced
//! only with `--force`.

use std::io::Write;
use std::path::Path;

use anyhow::anyhow;

use crate::errors::{bad_input, Failure};

/// `flag`'s value must be an existing regular file.
pub fn input_file(flag: &str, p: &Path) -> Result<(), Failure> {
    engine_core::files::check_regular(p)
        .map(|_| ())
        .map_err(|e| bad_input(anyhow!("{flag}: {e}")))
}

/// `flag`'s output path must end in `.{ext}`, lie in an existing writable directory, and be
/// new unless `force` (an existing target must be a regular file even then).
pub fn output_file(flag: &str, p: &Path, ext: &str, force: bool) -> Result<(), Failure> {
    let err = |m: String| Err(bad_input(anyhow!("{flag} {}: {m}", p.display())));
    let got = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if got.as_deref() != Some(ext) {
        return err(format!("the file name must end in .{ext}"));
    }
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return err(format!("directory {} does not exist", parent.display()));
    }
    if let Ok(m) = std::fs::metadata(p) {
        if !m.is_file() {
            return err("exists and is not a regular file".into());
        }
        if !force {
            return err("already exists (pass --force to overwrite)".into());
        }
    }
    // The file is written after the run: find out now whether it can be.
    can_write_in(parent).or_else(err)
}

/// Whether a file can be created in directory `dir` (a probe file, removed again): outputs
/// written after the run are checked with it before the run. The error says why not.
pub fn can_write_in(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".visi-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot write in {}: {e}", dir.display())),
    }
}

/// Encodes `img` as PNG and writes it to `p` through a temp file and a rename.
pub fn save_png(flag: &str, p: &Path, img: &image::RgbImage, force: bool) -> Result<(), Failure> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| crate::errors::internal(anyhow!("{flag} {}: {e}", p.display())))?;
    engine_core::files::write_files_atomic(&[(p, &bytes)], force)
        .map_err(|e| bad_input(anyhow!("{flag}: {e}")))
}

/// A failed write to stdout: a closed pipe ends the run quietly (exit 141, no error line);
/// `/dev/full` and other failures lose the output: one error line, exit 1.
pub fn stdout_error(e: std::io::Error) -> Failure {
    crate::errors::stdout_failure(e)
}

/// Writes `s` to `w` (stdout, locked) and flushes it, a failure classified by
/// [`stdout_error`]. Every output of every subcommand goes through here (`print!` panics on
/// a closed or full stdout; `let _ = write` would keep going with the output lost).
pub fn write_out(w: &mut impl Write, s: &str) -> Result<(), Failure> {
    w.write_all(s.as_bytes())
        .and_then(|_| w.flush())
        .map_err(stdout_error)
}

/// Writes `s` to stdout and flushes it, turning a failure into an error (`print!` panics).
pub fn print_stdout(s: &str) -> Result<(), Failure> {
    write_out(&mut std::io::stdout().lock(), s)
}

/// [`print_stdout`] with a newline.
pub fn println_stdout(s: &str) -> Result<(), Failure> {
    print_stdout(&format!("{s}\n"))
}

/// A `--prune` config against the model's depth, read from `config.json` or the GGUF
/// header alone (nothing else loads), so a bad config fails before the weights do.
pub fn prune_fits(prune: &pruner::PruneConfig, model: &Path, gguf: bool) -> Result<(), Failure> {
    // Per-image budgets (DivPrune) also against LLaVA-1.5's fixed image token count;
    // LLaVA-NeXT's spans depend on the image, and FastV's prompt-wide budget on how many
    // there are: those are checked once the prompt is built, still before any image work.
    let mut per_image = None;
    let layers = if gguf {
        let f = engine_core::gguf::GgufFile::open(model).map_err(crate::errors::classify)?;
        models::gguf::text_config(&f)
            .map_err(crate::errors::classify)?
            .num_hidden_layers
    } else {
        let cfg = models::LlavaConfig::from_file(&model.join("config.json"))
            .map_err(crate::errors::classify)?;
        if matches!(cfg.arch, models::config::Arch::Llava) {
            per_image = Some(cfg.image_tokens());
        }
        cfg.text.num_hidden_layers
    };
    if let (Some(n), false) = (per_image, matches!(prune, pruner::PruneConfig::FastV(_))) {
        prune
            .check_budget(&[n])
            .map_err(|e| bad_input(anyhow!("--prune: {e}")))?;
    }
    prune.validate(layers).map_err(|e| {
        bad_input(anyhow!(
            "--prune: pruning config does not fit this {layers}-layer model: {e}"
        ))
    })
}

/// LLaVA-1.5's pad mode (`expand2square`) pastes the image on a square canvas of its long
/// side before resizing; that canvas is bounded like a decoded image. An image whose
/// canvas would be too large is the user's to fix (`--image-mode crop`, or a smaller
/// image): checked before encoding, so `run` exits 2 and a `chat` turn is refused.
/// LLaVA-NeXT ignores the mode (its tiles are cut from the image itself).
pub fn pad_fits(
    llava: &models::llava::Llava,
    img: &image::RgbImage,
    mode: models::preprocess::PadMode,
) -> anyhow::Result<()> {
    pad_fits_arch(llava.config().arch, img, mode)
}

/// [`pad_fits`] for a model of architecture `arch` (from `config.json`, before loading).
pub fn pad_fits_arch(
    arch: models::config::Arch,
    img: &image::RgbImage,
    mode: models::preprocess::PadMode,
) -> anyhow::Result<()> {
    use models::preprocess::{PadMode, MAX_DECODE_BYTES};
    if mode != PadMode::Pad || arch == models::config::Arch::LlavaNext {
        return Ok(());
    }
    let (w, h) = img.dimensions();
    let side = u64::from(w.max(h));
    let bytes = side.saturating_mul(side).saturating_mul(3);
    if bytes > MAX_DECODE_BYTES {
        anyhow::bail!(
            "image of {w}x{h} pixels: pad mode (expand2square) makes a {side}x{side} square of {} bytes, over the {MAX_DECODE_BYTES}-byte limit; use --image-mode crop or a smaller image",
            bytes
        );
    }
    Ok(())
}

/// How much a tokenizer's normalizer can shrink text before it is cut into tokens (Unicode
/// composition joins up to three code points into one: Hangul jamo, 9 bytes, become a
/// 3-byte syllable). Space to `▁` and byte-level mapping only grow it.
const NORMALIZE_SHRINK: usize = 4;

/// The most bytes of text that can tokenise to fewer than `ctx` tokens: every token covers
/// at most `longest_piece` bytes (its vocabulary's longest) of normalised text.
pub fn max_text_bytes(ctx: usize, longest_piece: usize) -> usize {
    ctx.saturating_mul(longest_piece.max(1))
        .saturating_mul(NORMALIZE_SHRINK)
}

/// A prompt text far beyond the context is refused by its length in bytes, before the
/// tokenizer spends seconds and gigabytes on it (tokenising 30 MB takes half a minute and
/// 3 GB); one that passes is then tokenised and checked exactly. `vocab` is the
/// tokenizer's vocabulary (`get_vocab(true)`), `ctx` the model's context in tokens.
pub fn text_fits_vocab<'a>(
    vocab: impl IntoIterator<Item = &'a String>,
    ctx: usize,
    text: &str,
) -> anyhow::Result<()> {
    let longest = vocab.into_iter().map(String::len).max().unwrap_or(1);
    let limit = max_text_bytes(ctx, longest);
    if text.len() > limit {
        anyhow::bail!(
            "the prompt is {} bytes of text, more than the model's context of {ctx} tokens can hold (at most {limit} bytes at this vocabulary's longest token)",
            text.len()
        );
    }
    Ok(())
}

/// [`text_fits_vocab`] for a LLaVA model.
pub fn text_fits(llava: &models::llava::Llava, text: &str) -> anyhow::Result<()> {
    text_fits_vocab(
        llava.tokenizer().inner().get_vocab(true).keys(),
        llava.config().text.max_position_embeddings,
        text,
    )
}

/// [`text_fits_vocab`] before the weights load, from a llava-hf directory's `config.json`
/// and `tokenizer.json` (the weights of a large model take many seconds to load; a prompt
/// refused after that would break the promise that bad input costs under 2 seconds). Text
/// of at most `NORMALIZE_SHRINK` bytes per context token fits at any vocabulary, so only
/// longer text pays for reading the tokenizer here.
pub fn text_fits_dir(model_dir: &Path, text: &str) -> Result<(), Failure> {
    let cfg = models::LlavaConfig::from_file(&model_dir.join("config.json"))
        .map_err(crate::errors::classify)?;
    let ctx = cfg.text.max_position_embeddings;
    if text.len() <= max_text_bytes(ctx, 1) {
        return Ok(());
    }
    let path = model_dir.join("tokenizer.json");
    models::prompt::check_tokenizer_file(&path, cfg.text.vocab_size)
        .map_err(crate::errors::classify)?;
    let tok = models::prompt::PromptTokenizer::from_file(&path, cfg.image_token_index)
        .map_err(crate::errors::classify)?;
    text_fits_vocab(tok.inner().get_vocab(true).keys(), ctx, text).map_err(bad_input)
}

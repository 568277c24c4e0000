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
    let probe = parent.join(format!(".visi-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => err(format!("cannot write in {}: {e}", parent.display())),
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

/// A failed write to stdout (`/dev/full`, a closed pipe): the output is lost, so the run
/// fails with one error line instead of exiting 0.
pub fn stdout_error(e: std::io::Error) -> Failure {
    bad_input(anyhow!("cannot write to stdout: {e}"))
}

/// Writes `s` to stdout and flushes it, turning a failure into an error (`print!` panics).
pub fn print_stdout(s: &str) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())
        .and_then(|_| o.flush())
        .map_err(stdout_error)
}

/// [`print_stdout`] with a newline.
pub fn println_stdout(s: &str) -> Result<(), Failure> {
    print_stdout(&format!("{s}\n"))
}

/// A `--prune` config against the model's depth, read from `config.json` or the GGUF
/// header alone (nothing else loads), so a bad config fails before the weights do.
pub fn prune_fits(prune: &pruner::PruneConfig, model: &Path, gguf: bool) -> Result<(), Failure> {
    let layers = if gguf {
        let f = engine_core::gguf::GgufFile::open(model).map_err(crate::errors::classify)?;
        models::gguf::text_config(&f)
            .map_err(crate::errors::classify)?
            .num_hidden_layers
    } else {
        models::LlavaConfig::from_file(&model.join("config.json"))
            .map_err(crate::errors::classify)?
            .text
            .num_hidden_layers
    };
    prune.validate(layers).map_err(|e| {
        bad_input(anyhow!(
            "--prune: pruning config does not fit this {layers}-layer model: {e}"
        ))
    })
}

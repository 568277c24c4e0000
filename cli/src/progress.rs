//! What `run` shows on stderr around generation: a load progress bar (only on a terminal),
//! Ctrl-C handling, and the closing stats line.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use models::llava::{Generation, LoadProgress};

/// Set by the first Ctrl-C: generation stops at the next token.
static STOP: AtomicBool = AtomicBool::new(false);
/// Whether generation is running (a Ctrl-C at any other time exits at once).
static GENERATING: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (and SIGTERM/SIGHUP's, which end at once, leaving no temp
/// file either). During generation the first Ctrl-C asks generation to stop
/// (the caller prints what it has and exits 130); outside it, or on a second Ctrl-C, the
/// process exits 130 right away. Failing to install it only loses that behaviour.
pub fn install_ctrl_c() {
    install_termination();
    let _ = ctrlc::set_handler(|| {
        let again = STOP.swap(true, Ordering::SeqCst);
        if again || !GENERATING.load(Ordering::SeqCst) {
            // A write under way (quantize's pair, --save-kept) leaves no temp file behind.
            engine_core::files::remove_pending_temp_files();
            eprintln!("\ninterrupted");
            std::process::exit(i32::from(crate::errors::INTERRUPTED));
        }
    });
}

/// SIGTERM and SIGHUP (a `kill`, a closed terminal, a job scheduler's stop): the temp files
/// of a write under way (quantize's pair, `--save-kept`, eval's answers) are removed and
/// the process exits 128 + the signal, as the default action would, minus the leftovers.
/// The signal handler only writes the signal's number to a socket (async-signal-safe); a
/// thread does the rest. Failing to install it only loses that behaviour.
#[cfg(unix)]
fn install_termination() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const SIGHUP: i32 = 1;
        const SIGTERM: i32 = 15;
        let Ok((mut rx, tx)) = UnixStream::pair() else {
            return;
        };
        let tx = Arc::new(tx);
        for sig in [SIGHUP, SIGTERM] {
            let tx = tx.clone();
            // SAFETY: the action only calls write(2) on a socket it owns (no allocation, no
            // lock), which is async-signal-safe.
            let _ = unsafe {
                signal_hook_registry::register(sig, move || {
                    let _ = (&*tx).write(&[sig as u8]);
                })
            };
        }
        let _ = std::thread::Builder::new()
            .name("visi-signals".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                if rx.read_exact(&mut b).is_ok() {
                    engine_core::files::remove_pending_temp_files();
                    std::process::exit(128 + i32::from(b[0]));
                }
            });
    });
}

#[cfg(not(unix))]
fn install_termination() {}

/// Marks the start or end of generation for the Ctrl-C handler.
pub fn set_generating(on: bool) {
    GENERATING.store(on, Ordering::SeqCst);
}

/// Forgets a Ctrl-C that stopped generation (chat goes on with the next turn).
pub fn clear_stop() {
    STOP.store(false, Ordering::SeqCst);
}

/// Whether Ctrl-C asked generation to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A counting progress bar (`what {bar} n/total`) on a terminal, `None` otherwise.
pub fn count_bar(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{bar:20}} {{pos}}/{{len}} tensors ({{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// A byte progress bar for weight loading, when stderr is a terminal (`None` otherwise, so
/// logs and pipes get no control characters).
pub fn load_bar() -> Option<(ProgressBar, LoadProgress)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "loading weights {bar:20} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let b = bar.clone();
    let cb: LoadProgress = Arc::new(move |done, total| {
        if b.length() != Some(total) {
            b.set_length(total);
        }
        b.set_position(done);
    });
    Some((bar, cb))
}

/// The closing stats line: prompt and image tokens, time to first token, prefill and decode
/// speed, and where it ran.
pub fn stats_line(gen: &Generation, backend: &str, adapter: &str) -> String {
    let t = &gen.timings;
    // The first token is out once the image is encoded and the prompt prefilled.
    let ttft = t.vision_ms + t.prefill_ms;
    let (prefilled, prefill_tps) = prefill_rate(gen.prompt_tokens, gen.reused_tokens, t.prefill_ms);
    let mut prune = gen.prune.method.clone();
    if let Some(l) = gen.prune.fusion_layer {
        prune += &format!(", fusion layer {l}");
    }
    if let Some(k) = &gen.prune.kept_image_tokens {
        prune += &format!(", kept {} of {} image tokens", k.len(), gen.image_tokens);
    }
    if let Some(l) = gen.prune.text_only_from_layer {
        prune += &format!(", text only from layer {l}");
    }
    format!(
        "[{} prompt tokens ({} image), {} generated{}; time to first token {:.0} ms; prefill {:.1} tokens/s{}, decode {:.1} tokens/s; {} on {}; pruning {}]",
        gen.prompt_tokens,
        gen.image_tokens,
        gen.tokens.len(),
        if gen.interrupted { ", interrupted" } else { "" },
        ttft,
        prefill_tps,
        if gen.reused_tokens > 0 {
            format!(
                " over {prefilled} new tokens ({} reused)",
                gen.reused_tokens.min(gen.prompt_tokens)
            )
        } else {
            String::new()
        },
        gen.decode_tokens_per_s,
        backend,
        adapter,
        prune,
    )
}

/// The tokens a prefill computed and its speed: tokens reused from an earlier turn's KV
/// rows (chat) cost nothing and do not count.
pub fn prefill_rate(prompt_tokens: usize, reused_tokens: usize, prefill_ms: f64) -> (usize, f64) {
    let computed = prompt_tokens.saturating_sub(reused_tokens);
    let tps = if prefill_ms > 0.0 {
        computed as f64 / (prefill_ms / 1e3)
    } else {
        0.0
    };
    (computed, tps)
}

/// `VISI_DEBUG_TOKEN_DELAY_MS`: a pause after each streamed piece of text, so that the
/// Ctrl-C test (and a demo) can interrupt a tiny model that would otherwise finish in
/// milliseconds. Unset in normal use.
pub fn token_delay() -> Option<std::time::Duration> {
    std::env::var("VISI_DEBUG_TOKEN_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reused_tokens_are_not_prefill_speed() {
        // 600 prompt tokens, 590 reused, 10 computed in 100 ms: 100 tokens/s, not 6000.
        assert_eq!(super::prefill_rate(600, 590, 100.0), (10, 100.0));
        assert_eq!(super::prefill_rate(600, 0, 1000.0), (600, 600.0));
        assert_eq!(super::prefill_rate(5, 9, 10.0), (0, 0.0));
        assert_eq!(super::prefill_rate(5, 0, 0.0), (5, 0.0));
    }
}

//! The error contract: every failure is one `error: ...` line on stderr and an exit status
//! (2: bad input the user can fix, 1: an internal failure, 130: interrupted).

/// An error with its exit status.
pub struct Failure {
    /// Process exit status.
    pub code: u8,
    /// What went wrong (printed on one line, causes joined with `: `).
    pub err: anyhow::Error,
}

/// Exit status for bad input (files, flags, prompts, configs, adapter choice).
pub const BAD_INPUT: u8 = 2;
/// Exit status for internal failures (device lost, out of memory, bugs).
pub const INTERNAL: u8 = 1;
/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;
/// Exit status when the reader of stdout went away (128 + SIGPIPE, what a shell reports for
/// `cat big | head -c1`): the run ends quietly, with no error line.
pub const BROKEN_PIPE: u8 = 141;

/// Notes said before the inputs are validated wait here (a bad input must leave exactly
/// one `error:` line); [`release_notes`] prints them, and every later note goes out at once.
static NOTES: std::sync::Mutex<Option<Vec<String>>> = std::sync::Mutex::new(Some(Vec::new()));

/// Says `note: {msg}` on stderr, or keeps it until [`release_notes`] when the inputs are
/// still being checked.
pub fn note(msg: impl Into<String>) {
    let msg = msg.into();
    let mut g = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    match g.as_mut() {
        Some(held) => held.push(msg),
        None => eprintln!("note: {msg}"),
    }
}

/// The inputs are validated: prints the notes held so far; later ones print at once.
pub fn release_notes() {
    let held = NOTES.lock().unwrap_or_else(|e| e.into_inner()).take();
    for n in held.into_iter().flatten() {
        eprintln!("note: {n}");
    }
}

/// Forgets the notes held (the run failed: its error is the one line it prints).
pub fn drop_notes() {
    let mut g = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(held) = g.as_mut() {
        held.clear();
    }
}

/// A write to stdout failed: a closed pipe ends the run quietly ([`BROKEN_PIPE`]); any
/// other failure (`/dev/full`: no space) loses output, an internal failure (exit 1).
pub fn stdout_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Failure {
            code: BROKEN_PIPE,
            err: anyhow::anyhow!("stdout closed"),
        }
    } else {
        internal(anyhow::anyhow!("cannot write to stdout: {e}"))
    }
}

/// The hint every "no adapter" message carries.
pub const CPU_HINT: &str = "run with `--device cpu` to use the CPU backend";

/// A failure caused by what the user handed in.
pub fn bad_input(err: anyhow::Error) -> Failure {
    Failure {
        code: BAD_INPUT,
        err,
    }
}

/// A failure that is not the user's doing.
pub fn internal(err: anyhow::Error) -> Failure {
    Failure {
        code: INTERNAL,
        err,
    }
}

/// The exit status an engine error maps to.
pub fn exit_code(e: &engine_core::Error) -> u8 {
    use engine_core::Error as E;
    match e {
        // Malformed files, missing or mis-shaped tensors, prompts that do not fit, an
        // adapter that cannot be had or cannot hold the model: all fixable by the user.
        E::File { .. } | E::Weight { .. } | E::Msg(_) | E::NoAdapter(_) | E::TooLarge { .. } => {
            BAD_INPUT
        }
        // Device loss, out of memory, shape/dtype/backend mix-ups (engine bugs).
        _ => INTERNAL,
    }
}

/// Maps an engine error to its exit status, adding what the user can do about it.
pub fn classify(e: engine_core::Error) -> Failure {
    use engine_core::Error as E;
    let code = exit_code(&e);
    let hint = match &e {
        E::NoAdapter(m) if !m.contains("--device cpu") => Some(CPU_HINT.to_string()),
        E::TooLarge { bytes, limit, .. } => Some(format!(
            "{} > {}: this adapter cannot hold the model; {CPU_HINT}",
            human_bytes(*bytes),
            human_bytes(*limit)
        )),
        E::OutOfMemory(_) => Some(format!(
            "the model does not fit this adapter's memory; {CPU_HINT}"
        )),
        _ => None,
    };
    let err = match hint {
        Some(h) => anyhow::anyhow!("{e}; {h}"),
        None => e.into(),
    };
    Failure { code, err }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Turns a panic into one `error:` line (a panic is a bug, but the user gets no backtrace).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal panic{at}: {}", msg.replace('\n', " "));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine_core::Error as E;

    #[test]
    fn exit_codes_by_kind() {
        let cases = [
            (E::file("x/config.json", "bad"), BAD_INPUT),
            (E::weight("a.weight", "missing"), BAD_INPUT),
            (E::NoAdapter("none".into()), BAD_INPUT),
            (
                E::TooLarge {
                    what: "t".into(),
                    bytes: 10,
                    limit: 5,
                },
                BAD_INPUT,
            ),
            (E::OutOfMemory("oom".into()), INTERNAL),
            (E::Device("lost".into()), INTERNAL),
        ];
        for (i, (e, want)) in cases.into_iter().enumerate() {
            let got = classify(e);
            assert_eq!(got.code, want, "case {i}: {:#}", got.err);
        }
    }

    #[test]
    fn too_large_says_size_and_limit() {
        let f = classify(E::TooLarge {
            what: "tensor `lm_head.weight`".into(),
            bytes: 3 << 30,
            limit: 2 << 30,
        });
        let s = format!("{:#}", f.err);
        for needle in ["lm_head.weight", "3.0 GiB", "2.0 GiB", "--device cpu"] {
            assert!(s.contains(needle), "{needle:?} missing from {s:?}");
        }
    }

    #[test]
    fn no_adapter_suggests_cpu_once() {
        let s = format!("{:#}", classify(E::NoAdapter("x".into())).err);
        assert!(s.contains("--device cpu"), "{s}");
        let s = format!("{:#}", classify(E::NoAdapter(format!("y; {CPU_HINT}"))).err);
        assert_eq!(s.matches("--device cpu").count(), 1, "{s}");
    }
}

//! Reading input files safely: only regular files (a FIFO would block forever, `/dev/zero`
//! never ends), each with a size limit, every failure an [`Error::File`] naming the path.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Size limit for JSON configs (`config.json`, `preprocessor_config.json`, safetensors
/// indexes, pruning configs): real ones are a few KiB to a few MiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Size limit for `tokenizer.json` (llava's is 1.8 MiB; large multilingual ones ~30 MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Opens `path` for reading only if it is a regular file (symlinks followed); returns the
/// file and its size. The file is opened non-blocking and checked again through the handle,
/// so a FIFO swapped in after the first check cannot block the open.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, io_msg(&e)))?;
    check_kind(path, &meta)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts
        .open(path)
        .map_err(|e| Error::file(path, format!("cannot open: {}", io_msg(&e))))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot stat: {e}")))?;
    check_kind(path, &meta)?;
    Ok((file, meta.len()))
}

/// `Ok` when `path` is a regular file (symlinks followed); names what it is otherwise.
pub fn check_regular(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, io_msg(&e)))?;
    check_kind(path, &meta)?;
    Ok(meta.len())
}

/// Reads a regular file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(Error::file(
            path,
            format!("is {len} bytes, more than the {limit} bytes allowed for this file"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards a file that grows while it is read.
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if buf.len() as u64 > limit {
        return Err(Error::file(
            path,
            format!("grew past the {limit} bytes allowed while being read"),
        ));
    }
    Ok(buf)
}

/// Reads a regular UTF-8 text file of at most `limit` bytes.
pub fn read_text_limited(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|_| Error::file(path, "is not UTF-8 text"))
}

/// Temp files being written by [`write_files_atomic`], for [`remove_pending_temp_files`].
static PENDING: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Writes each `(path, bytes)` to a temp file beside its target, then renames them all into
/// place: either every file is written or none is left behind (temp files removed, targets
/// renamed so far removed again). An existing target is an error unless `force`.
pub fn write_files_atomic(files: &[(&Path, &[u8])], force: bool) -> Result<()> {
    for (p, _) in files {
        if let Ok(m) = std::fs::metadata(p) {
            if !m.is_file() {
                return Err(Error::file(p, "exists and is not a regular file"));
            }
        }
        if !force && std::fs::symlink_metadata(p).is_ok() {
            return Err(Error::file(p, "already exists (pass --force to overwrite)"));
        }
    }
    let tmps: Vec<std::path::PathBuf> = files.iter().map(|(p, _)| temp_path(p)).collect();
    if let Ok(mut g) = PENDING.lock() {
        g.extend(tmps.iter().cloned());
    }
    let forget = |tmps: &[std::path::PathBuf]| {
        for t in tmps {
            let _ = std::fs::remove_file(t);
        }
        if let Ok(mut g) = PENDING.lock() {
            g.retain(|p| !tmps.contains(p));
        }
    };
    for ((p, bytes), tmp) in files.iter().zip(&tmps) {
        let res = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            forget(&tmps);
            return Err(Error::file(p, format!("cannot write: {e}")));
        }
    }
    // `VISI_DEBUG_WRITE_DELAY_MS=N`: a pause with the temp files written, so a test can
    // interrupt the write (Ctrl-C must leave nothing behind). Unset in normal use.
    if let Some(ms) = std::env::var("VISI_DEBUG_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    for (i, ((p, _), tmp)) in files.iter().zip(&tmps).enumerate() {
        if let Err(e) = std::fs::rename(tmp, p) {
            for (done, _) in &files[..i] {
                let _ = std::fs::remove_file(done);
            }
            forget(&tmps);
            return Err(Error::file(p, format!("cannot write: {e}")));
        }
    }
    forget(&tmps);
    Ok(())
}

/// Removes the temp files of writes still under way (a Ctrl-C handler calls this before
/// exiting, so an interrupted write leaves nothing behind).
pub fn remove_pending_temp_files() {
    // try_lock: the handler must not wait on a writer it interrupted mid-update.
    if let Ok(g) = PENDING.try_lock() {
        for t in g.iter() {
            let _ = std::fs::remove_file(t);
        }
    }
}

fn temp_path(path: &Path) -> std::path::PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

fn check_kind(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let what = if ft.is_dir() {
        "is a directory"
    } else {
        special_kind(&ft)
    };
    Err(Error::file(path, format!("{what}, not a regular file")))
}

#[cfg(unix)]
fn special_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "is a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "is a device"
    } else if ft.is_socket() {
        "is a socket"
    } else {
        "is a special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "is a special file"
}

fn io_msg(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_and_limits() {
        let e = read_limited(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero") && e.contains("device"), "{e}");
        let e = read_limited(Path::new("/"), 10).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let e = read_limited(Path::new("/no/such/file"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
        let p = std::env::temp_dir().join(format!("visi-files-{}", std::process::id()));
        std::fs::write(&p, b"0123456789ab").unwrap();
        assert_eq!(read_limited(&p, 12).unwrap(), b"0123456789ab");
        let e = read_limited(&p, 11).unwrap_err().to_string();
        assert!(e.contains("12 bytes"), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn atomic_writes_leave_nothing_on_failure() {
        let d = std::env::temp_dir().join(format!("visi-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.bin"), d.join("b.bin"));
        write_files_atomic(&[(&a, b"aa"), (&b, b"bb")], false).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"bb");
        let e = write_files_atomic(&[(&a, b"x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        // The second target's directory does not exist: the first must not stay behind.
        let (c, bad) = (d.join("c.bin"), d.join("no-dir/d.bin"));
        assert!(write_files_atomic(&[(&c, b"cc"), (&bad, b"dd")], false).is_err());
        assert!(!c.exists());
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        // A device is never replaced, even with force.
        let e = write_files_atomic(&[(Path::new("/dev/null"), b"x")], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn fifo_is_refused_without_blocking() {
        let p = std::env::temp_dir().join(format!("visi-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let ok = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return; // no mkfifo here; the CLI bad-input test covers FIFOs too
        }
        let e = read_limited(&p, 10).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let _ = std::fs::remove_file(&p);
    }
}

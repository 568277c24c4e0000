//! Finding a model: a directory, or a Hugging Face repo id resolved through the local
//! Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`,
//! laid out as `models--ORG--NAME/snapshots/REV/`). Nothing is downloaded here: `visi-cli
//! pull` (or `--pull`) fills the cache.

use std::path::{Path, PathBuf};

use engine_core::{Error, Result};

/// The hub cache directory the environment points at.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

fn hub_cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(d) = var("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(h) = var("HF_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(h).join("hub"));
    }
    let home = var("HOME").filter(|d| !d.is_empty())?;
    Some(
        PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
    )
}

/// Whether `spec` reads as a repo id (`ORG/NAME`) rather than a path.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// Resolves `--model`: an existing directory as it is; otherwise a repo id looked up in the
/// local Hugging Face cache. The error says how to get the model when it is not there.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_in(spec, hub_cache_dir().as_deref())
}

/// [`resolve_model`] against an explicit cache directory (tests).
pub fn resolve_model_in(spec: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::file(
            p,
            "is not a directory (expected a model directory or a repo id)",
        ));
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::file(p, "model directory not found"));
    }
    let Some(cache) = cache else {
        return Err(Error::msg(format!(
            "model `{spec}`: no such directory, and no Hugging Face cache location is known \
             (set HF_HOME); then pull it with `visi-cli pull {spec}` (or add --pull)"
        )));
    };
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let not_cached = || {
        Error::msg(format!(
            "model `{spec}` is neither a directory nor in the Hugging Face cache ({}); \
             pull it with `visi-cli pull {spec}` (or add --pull; `huggingface-cli download {spec}` \
             fills the same cache), or pass its directory",
            cache.display()
        ))
    };
    if !repo.is_dir() {
        return Err(not_cached());
    }
    let snapshots = repo.join("snapshots");
    // refs/main names the snapshot the hub client last fetched for the default branch: a
    // commit hash, one path component inside `snapshots/`. Anything else (`../..`, an
    // absolute path) would load whatever it names, and a missing snapshot is not silently
    // replaced by another.
    let refs_main = repo.join("refs").join("main");
    if refs_main.exists() {
        let rev = engine_core::files::read_text_limited(&refs_main, 4096)?;
        let rev = rev.trim();
        let plain = !rev.is_empty()
            && rev
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && rev.len() <= 128;
        if !plain {
            return Err(Error::file(
                &refs_main,
                format!("names {rev:?}, not a snapshot revision (a commit hash)"),
            ));
        }
        let dir = snapshots.join(rev);
        if !dir.is_dir() {
            return Err(Error::file(
                &refs_main,
                format!(
                    "names snapshot {rev}, which is not in {}; pull it again with `visi-cli pull {spec}`",
                    snapshots.display()
                ),
            ));
        }
        return Ok(dir);
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    // Without refs/main, the most recently written snapshot.
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(not_cached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("visi-hub-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("llava-hf/llava-1.5-7b-hf"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("single"));
        assert!(!looks_like_repo_id("../x"));
    }

    #[test]
    fn cache_dir_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).into())
            }
        };
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])),
            Some("/c".into())
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HOME", "/h"), ("HOME", "/u")])),
            Some("/h/hub".into())
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HOME", "/u")])),
            Some("/u/.cache/huggingface/hub".into())
        );
        assert_eq!(hub_cache_dir_from(env(&[])), None);
    }

    #[test]
    fn resolves_refs_main_then_newest_snapshot() {
        let cache = tmp("cache");
        let repo = cache.join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc\n").unwrap();
        assert_eq!(
            resolve_model_in("org/name", Some(&cache)).unwrap(),
            repo.join("snapshots/abc")
        );
        // refs/main confined to snapshots/: no traversal, no absolute path, no fallback.
        for bad in ["../../..", "/etc", "abc/../def", "missing"] {
            std::fs::write(repo.join("refs/main"), bad).unwrap();
            let e = resolve_model_in("org/name", Some(&cache))
                .unwrap_err()
                .to_string();
            assert!(e.contains("refs/main"), "{bad}: {e}");
        }
        std::fs::remove_file(repo.join("refs/main")).unwrap();
        let got = resolve_model_in("org/name", Some(&cache)).unwrap();
        assert!(got.starts_with(repo.join("snapshots")), "{}", got.display());
        let e = resolve_model_in("org/other", Some(&cache))
            .unwrap_err()
            .to_string();
        assert!(e.contains("huggingface-cli download org/other"), "{e}");
        assert!(e.contains("visi-cli pull org/other"), "{e}");
        let e = resolve_model_in("no/such/dir", Some(&cache))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
        let _ = std::fs::remove_dir_all(&cache);
    }
}

//! The kernel variants of attention and the adapter's tuned choices, as data: the prefill
//! variant names, the shape classes, the per-adapter [`Tuning`] read at open, and the cache
//! file `tune` writes. The context (`ctx`) holds a `Tuning`, the backend reads variants; the
//! timing that picks them is `tune`, which depends on both (no module imports the other way).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::lock;

/// Largest cache file read (it holds a few lines per adapter).
const MAX_CACHE_BYTES: u64 = 1 << 20;

/// A prefill attention variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prefill {
    /// flash_attn with (BQ, BK, TPR).
    Tiled(usize, usize, usize),
    /// flash_attn_k with (BQ, WG).
    Keys(usize, usize),
    /// attn_qk_sg8 + attn_pv_sg8 (subgroup broadcasts, 8-wide subgroups).
    Sg8,
}

impl Prefill {
    pub(crate) fn parse(s: &str) -> Option<Prefill> {
        if s == "sg8" {
            return Some(Prefill::Sg8);
        }
        let (kind, rest) = s.split_once(':')?;
        let n: Vec<usize> = rest
            .split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        match (kind, n.as_slice()) {
            ("tiled", [bq, bk, tpr]) => Some(Prefill::Tiled(*bq, *bk, *tpr)),
            ("keys", [bq, wg]) => Some(Prefill::Keys(*bq, *wg)),
            _ => None,
        }
    }
    pub(crate) fn name(self) -> String {
        match self {
            Prefill::Tiled(a, b, c) => format!("tiled:{a},{b},{c}"),
            Prefill::Keys(a, b) => format!("keys:{a},{b}"),
            Prefill::Sg8 => "sg8".into(),
        }
    }
}

/// The shape class of a prefill attention call.
pub(crate) fn prefill_class(d: usize, kv16: bool) -> String {
    format!("attn_prefill/d{d}/{}", if kv16 { "f16" } else { "f32" })
}

/// The shape class of the key splits of attention (prefill and decode).
pub(crate) fn split_class(d: usize, kv16: bool) -> String {
    format!("attn_split/d{d}/{}", if kv16 { "f16" } else { "f32" })
}

/// Tuned choices of one adapter: loaded at open, replaced by `tune::tune`.
pub(crate) struct Tuning {
    /// `name | driver | backend` of the adapter.
    pub key: String,
    /// A prefill variant forced by the options or `VISI_ATTN`.
    pub forced: Option<String>,
    choices: Mutex<HashMap<String, String>>,
}

impl Tuning {
    /// No choices (every class runs its measured default).
    pub fn empty() -> Tuning {
        Tuning {
            key: String::new(),
            forced: None,
            choices: Mutex::new(HashMap::new()),
        }
    }
    /// The choices cached for `key` (none when the cache is absent or unreadable).
    pub fn load(key: String) -> Tuning {
        let choices = cache_path()
            .and_then(|p| read_cache(&p).ok())
            .and_then(|v| v.get(&key).cloned())
            .and_then(|v| serde_json::from_value::<HashMap<String, String>>(v).ok())
            .unwrap_or_default();
        Tuning {
            key,
            forced: None,
            choices: Mutex::new(choices),
        }
    }
    pub(crate) fn get(&self, class: &str) -> Option<String> {
        lock(&self.choices).get(class).cloned()
    }
    pub(crate) fn set(&self, class: &str, v: String) {
        lock(&self.choices).insert(class.to_string(), v);
    }
}

/// The platform cache dir for visi: `$VISI_CACHE_DIR`, else `$XDG_CACHE_HOME/visi` or
/// `~/.cache/visi` (Linux and other Unix), `~/Library/Caches/visi` (macOS),
/// `%LOCALAPPDATA%\visi` (Windows).
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("VISI_CACHE_DIR") {
        return Some(d);
    }
    if cfg!(target_os = "windows") {
        return env("LOCALAPPDATA").map(|d| d.join("visi"));
    }
    if cfg!(target_os = "macos") {
        return env("HOME").map(|h| h.join("Library/Caches/visi"));
    }
    env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("visi"))
}

/// The tuning cache file.
pub fn cache_path() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("tune.json"))
}

/// Reads the cache: a regular file of at most [`MAX_CACHE_BYTES`] holding one JSON object.
fn read_cache(path: &Path) -> std::result::Result<serde_json::Map<String, Value>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_CACHE_BYTES {
        return Err(format!("{} is not a small regular file", path.display()));
    }
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CACHE_BYTES).read_to_string(&mut s))
        .map_err(|e| e.to_string())?;
    match serde_json::from_str::<Value>(&s).map_err(|e| e.to_string())? {
        Value::Object(m) => Ok(m),
        _ => Err("not a JSON object".into()),
    }
}

/// Writes `choices` for adapter `key` into the cache (other adapters' entries kept): a temp
/// file renamed over the old one. Returns the path written.
pub(crate) fn write_cache(
    key: &str,
    choices: &BTreeMap<String, String>,
) -> std::result::Result<PathBuf, String> {
    let path = cache_path().ok_or("no cache dir (HOME is not set)")?;
    let dir = path.parent().ok_or("cache path has no parent")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut all = read_cache(&path).unwrap_or_default();
    all.insert(key.to_string(), json!(choices));
    let text = serde_json::to_string_pretty(&Value::Object(all)).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!("tune.json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    Ok(path)
}

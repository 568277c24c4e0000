//! Reading weights: memory-mapped safetensors (single file or sharded) and an in-memory
//! source for tests, behind a VarBuilder-style [`Weights`] that checks names and shapes.
//!
//! The safetensors header is parsed here (not by the `safetensors` crate) so that every
//! malformed file gets a one-line message naming the file and, where there is one, the
//! tensor. Files are checked completely when opened; only a tensor's dtype is checked
//! lazily, so a checkpoint that carries an unused `I64` buffer still loads.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use serde_json::Value;

use crate::backend::{Backend, HostData};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// File name of a single-file checkpoint inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The largest safetensors header read, checked before it is parsed. The safetensors crate
/// allows 100 MB, which costs seconds and gigabytes to parse as JSON. A header entry takes
/// 100-150 bytes: LLaVA-1.5-7B's largest shard has 400-odd tensors (50 KB of header), and
/// even a whole 1,400-tensor 34B model in one file needs 200 KB. 16 MiB holds over 100,000
/// entries (or metadata strings that size), far beyond any checkpoint this engine loads,
/// and parses in a fraction of a second.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// One stored tensor, borrowed from its source: little-endian raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    /// Stored element type (F32, F16 or BF16).
    pub dtype: DType,
    /// Stored shape, outermost first.
    pub shape: &'a [usize],
    /// Little-endian raw bytes.
    pub bytes: &'a [u8],
}

/// A set of named tensors (a checkpoint on disk, or a map in memory).
pub trait WeightSource: Send + Sync {
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// Whether a tensor of this name exists (whatever its dtype).
    fn contains(&self, name: &str) -> bool;
    /// The tensor's data, or `Error::Weight` when it is missing or stored in a dtype other
    /// than f32, f16 or bf16.
    fn view(&self, name: &str) -> Result<WeightView<'_>>;
    /// Bytes the source occupies (file sizes on disk, or data bytes in memory).
    fn total_bytes(&self) -> u64;
}

// ---------------------------------------------------------------------------------------
// safetensors files
// ---------------------------------------------------------------------------------------

/// Dtype of a stored tensor, as the header names it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StoredDType {
    Supported(DType),
    /// Any other safetensors dtype (`I64`, `U8`, ...), kept by name for the error message.
    Other(String),
}

impl StoredDType {
    fn parse(s: &str) -> Self {
        match s {
            "F32" => StoredDType::Supported(DType::F32),
            "F16" => StoredDType::Supported(DType::F16),
            "BF16" => StoredDType::Supported(DType::BF16),
            other => StoredDType::Other(other.to_string()),
        }
    }

    /// Element size in bits of every dtype safetensors defines; `None` when unknown, in
    /// which case only the offsets' range and overlap are checked.
    fn bits(&self) -> Option<u64> {
        let s = match self {
            StoredDType::Supported(d) => return Some(8 * d.size_in_bytes() as u64),
            StoredDType::Other(s) => s.as_str(),
        };
        Some(match s {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
            "I16" | "U16" => 16,
            "I32" | "U32" => 32,
            "F64" | "I64" | "U64" | "C64" => 64,
            "F4" => 4,
            "F6_E2M3" | "F6_E3M2" => 6,
            _ => return None,
        })
    }
}

/// One header entry: dtype, shape and absolute byte range in the file.
#[derive(Clone, Debug)]
struct Entry {
    dtype: StoredDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One memory-mapped safetensors file with its validated header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::file(
                path,
                "is a directory, expected a .safetensors file",
            ));
        }
        // Only regular files: a FIFO would block the open, a device has no end.
        let (file, len) = crate::files::open_regular(path)?;
        // Mapping an empty file fails on some platforms; check the length first.
        if len < 8 {
            return Err(Error::file(
                path,
                format!("file is {len} bytes, too short for a safetensors header (8-byte length prefix)"),
            ));
        }
        // SAFETY: the map is read-only and private to this process. Another process
        // truncating the checkpoint while it is mapped would be undefined behaviour; every
        // mmap-based weight loader accepts that risk for zero-copy loading.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::file(path, format!("cannot memory-map: {e}")))?;
        let entries = parse_header(&mmap, path)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            entries,
        })
    }
}

/// Validates a whole safetensors buffer and returns its entries with absolute offsets.
fn parse_header(buf: &[u8], path: &Path) -> Result<HashMap<String, Entry>> {
    let err = |msg: String| Error::file(path, msg);
    let file_len = buf.len() as u64;
    if file_len < 8 {
        return Err(err(format!(
            "file is {file_len} bytes, too short for a safetensors header (8-byte length prefix)"
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&buf[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
        )));
    }
    if header_len > file_len - 8 {
        return Err(err(format!(
            "header length {header_len} runs past the end of the file ({file_len} bytes)"
        )));
    }
    // Both fit in usize: header_len <= file_len - 8 and the buffer exists in memory.
    let data_start = 8 + header_len as usize;
    let data_len = buf.len() - data_start;
    // One pass over the JSON: each entry is reduced to its dtype, shape and offsets as it
    // is read (no whole-header `Value` tree, no second pass for duplicates).
    let json = &buf[8..data_start];
    let header: RawHeader = serde_json::from_slice(json).map_err(|e| {
        // Not an object: say so only of valid JSON (the syntax error comes first).
        let syntax = serde_json::from_slice::<serde::de::IgnoredAny>(json).err();
        err(match syntax {
            Some(e) => format!("invalid header JSON: {e}"),
            None if e.is_data() && e.to_string().contains("a JSON object") => {
                "invalid header: expected a JSON object".to_string()
            }
            None => format!("invalid header JSON: {e}"),
        })
    })?;
    // serde_json keeps only the last of repeated keys: two entries for one name would load
    // whichever came last without a word.
    if let Some(dup) = header.duplicate {
        return Err(err(format!("tensor `{dup}` appears twice in the header")));
    }
    if !header.metadata_ok {
        return Err(err(
            "invalid header: `__metadata__` is not an object".to_string()
        ));
    }

    let mut entries = HashMap::with_capacity(header.entries.len());
    for (name, parsed) in header.entries {
        let (dtype, shape, begin, end) =
            parsed.map_err(|msg| err(format!("tensor `{name}`: {msg}")))?;
        if begin > end || end > data_len as u64 {
            return Err(err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] out of range of the {data_len}-byte data section"
            )));
        }
        if let Some(bits) = dtype.bits() {
            let elems = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| err(format!("tensor `{name}`: shape {shape:?} overflows")))?;
            let want = elems
                .checked_mul(bits)
                .map(|b| b.div_ceil(8))
                .ok_or_else(|| err(format!("tensor `{name}`: shape {shape:?} overflows")))?;
            if end - begin != want {
                let dt = match &dtype {
                    StoredDType::Supported(d) => d.name().to_uppercase(),
                    StoredDType::Other(s) => s.clone(),
                };
                return Err(err(format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {dt} needs {want}",
                    end - begin
                )));
            }
        }
        entries.insert(
            name,
            Entry {
                dtype,
                shape,
                start: data_start + begin as usize,
                end: data_start + end as usize,
            },
        );
    }

    crate::checks::check_disjoint(
        entries.iter().map(|(n, e)| {
            (
                n.as_str(),
                (e.start - data_start) as u64,
                (e.end - data_start) as u64,
            )
        }),
        "data_offsets",
    )
    .map_err(err)?;
    Ok(entries)
}

/// One header entry, parsed: (dtype, shape, begin, end) or what is wrong with it.
type ParsedEntry = std::result::Result<(StoredDType, Vec<usize>, u64, u64), String>;

/// A safetensors header read in one pass: its entries sorted by name (the order errors are
/// reported in), the first name that appears twice, and whether `__metadata__` (if any) is
/// an object.
struct RawHeader {
    entries: Vec<(String, ParsedEntry)>,
    duplicate: Option<String>,
    metadata_ok: bool,
}

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut h = RawHeader {
                    entries: Vec::new(),
                    duplicate: None,
                    metadata_ok: true,
                };
                let mut seen_metadata = false;
                while let Some(k) = m.next_key::<String>()? {
                    let v: Value = m.next_value()?;
                    if k == "__metadata__" {
                        if seen_metadata && h.duplicate.is_none() {
                            h.duplicate = Some(k);
                            continue;
                        }
                        seen_metadata = true;
                        h.metadata_ok &= v.is_object();
                        continue;
                    }
                    let parsed = parse_entry(&v);
                    h.entries.push((k, parsed));
                }
                h.entries.sort_by(|a, b| a.0.cmp(&b.0));
                if h.duplicate.is_none() {
                    h.duplicate = h
                        .entries
                        .windows(2)
                        .find(|w| w[0].0 == w[1].0)
                        .map(|w| w[0].0.clone());
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses one header entry into (dtype, shape, begin, end) or a message saying what is wrong.
fn parse_entry(v: &Value) -> std::result::Result<(StoredDType, Vec<usize>, u64, u64), String> {
    let obj = v.as_object().ok_or("header entry is not an object")?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("`dtype` missing or not a string")?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("`shape` missing or not a list")?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or("`shape` must be a list of non-negative integers")?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("`data_offsets` missing or not a list")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (
            b.as_u64()
                .ok_or("`data_offsets` must be two non-negative integers")?,
            e.as_u64()
                .ok_or("`data_offsets` must be two non-negative integers")?,
        ),
        _ => return Err("`data_offsets` must be two non-negative integers".to_string()),
    };
    Ok((StoredDType::parse(dtype), shape, begin, end))
}

/// A checkpoint on disk: one or more memory-mapped safetensors files.
struct SafetensorsSource {
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
    total_bytes: u64,
}

impl SafetensorsSource {
    fn single(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let index = file.entries.keys().map(|n| (n.clone(), 0)).collect();
        let total_bytes = file.mmap.len() as u64;
        Ok(SafetensorsSource {
            files: vec![file],
            index,
            total_bytes,
        })
    }

    fn sharded(index_path: &Path) -> Result<Self> {
        let text = crate::files::read_text_limited(index_path, crate::files::MAX_CONFIG_BYTES)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(index_path, format!("invalid JSON: {e}")))?;
        let weight_map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::file(index_path, "`weight_map` missing or not an object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));

        // Open each distinct shard once, in a stable order.
        let mut shard_names: Vec<&str> = Vec::new();
        let mut wanted: BTreeMap<String, &str> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::file(
                    index_path,
                    format!("weight_map[`{tensor}`] is not a file name"),
                )
            })?;
            // Shard names are plain file names; refusing paths keeps a hostile index inside
            // the model directory.
            if shard.is_empty()
                || Path::new(shard).components().count() != 1
                || shard.contains(['/', '\\'])
                || shard == ".."
            {
                return Err(Error::file(
                    index_path,
                    format!("weight_map[`{tensor}`] = `{shard}` is not a plain file name"),
                ));
            }
            if !shard_names.contains(&shard) {
                shard_names.push(shard);
            }
            wanted.insert(tensor.clone(), shard);
        }
        shard_names.sort_unstable();

        let mut files = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let p = dir.join(name);
            if !p.is_file() {
                return Err(Error::file(
                    &p,
                    format!("shard listed in {} not found", index_path.display()),
                ));
            }
            files.push(SafetensorsFile::open(&p)?);
        }

        let mut index = BTreeMap::new();
        for (tensor, shard) in &wanted {
            let i = shard_names.iter().position(|s| s == shard).unwrap_or(0);
            if !files[i].entries.contains_key(tensor) {
                return Err(Error::weight(
                    tensor.clone(),
                    format!(
                        "{} maps it to {}, which does not contain it",
                        index_path.display(),
                        files[i].path.display()
                    ),
                ));
            }
            index.insert(tensor.clone(), i);
        }
        // Tensors a shard holds but the index does not list are still served (the index
        // decides only when a name is in it); a name in two shards without an index entry is
        // ambiguous.
        for (i, f) in files.iter().enumerate() {
            for name in f.entries.keys() {
                if wanted.contains_key(name) {
                    continue;
                }
                if let Some(&j) = index.get(name) {
                    if j != i {
                        return Err(Error::weight(
                            name.clone(),
                            format!(
                                "found in both {} and {} and not listed in {}",
                                files[j].path.display(),
                                f.path.display(),
                                index_path.display()
                            ),
                        ));
                    }
                }
                index.insert(name.clone(), i);
            }
        }
        let total_bytes = files.iter().map(|f| f.mmap.len() as u64).sum();
        Ok(SafetensorsSource {
            files,
            index,
            total_bytes,
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        let file = self
            .index
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| Error::weight(name, "missing from the checkpoint"))?;
        let entry = file
            .entries
            .get(name)
            .ok_or_else(|| Error::weight(name, "missing from the checkpoint"))?;
        match &entry.dtype {
            StoredDType::Supported(dtype) => Ok(WeightView {
                dtype: *dtype,
                shape: &entry.shape,
                bytes: &file.mmap[entry.start..entry.end],
            }),
            StoredDType::Other(dt) => Err(Error::weight(
                name,
                format!(
                    "stored as {dt} in {}; only F32, F16 and BF16 are supported",
                    file.path.display()
                ),
            )),
        }
    }

    fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

/// Validates a whole safetensors file held in memory (header, dtypes, offsets) as opening it
/// would, and returns its tensor names, sorted. `origin` only names the file in errors.
/// The fuzz target `safetensors_header` drives this.
pub fn check_safetensors_bytes(buf: &[u8], origin: &Path) -> Result<Vec<String>> {
    let entries = parse_header(buf, origin)?;
    let mut names: Vec<String> = entries.into_keys().collect();
    names.sort();
    Ok(names)
}

/// Opens a checkpoint: a `.safetensors` file, a `.safetensors.index.json` shard index, or a
/// directory holding `model.safetensors.index.json` or `model.safetensors` (or exactly one
/// `*.safetensors` file).
pub fn open_safetensors(dir_or_file: &Path) -> Result<Arc<dyn WeightSource>> {
    let path = resolve_checkpoint(dir_or_file)?;
    let is_index = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".json"));
    let source = if is_index {
        SafetensorsSource::sharded(&path)?
    } else {
        SafetensorsSource::single(&path)?
    };
    Ok(Arc::new(source))
}

/// Picks the file to open for [`open_safetensors`].
fn resolve_checkpoint(p: &Path) -> Result<PathBuf> {
    if !p.exists() {
        return Err(Error::file(p, "not found"));
    }
    if !p.is_dir() {
        return Ok(p.to_path_buf());
    }
    for name in [INDEX_FILE, SINGLE_FILE] {
        let candidate = p.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let read = std::fs::read_dir(p).map_err(|e| Error::file(p, format!("cannot list: {e}")))?;
    let mut found: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::file(
            p,
            format!("no {INDEX_FILE}, {SINGLE_FILE} or other .safetensors file"),
        )),
        n => Err(Error::file(
            p,
            format!("{n} .safetensors files but no {INDEX_FILE} saying which tensor is where"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// in-memory source
// ---------------------------------------------------------------------------------------

/// Tensors held in memory (tests, synthetic models): name → (dtype, shape, LE bytes).
#[derive(Clone, Debug, Default)]
pub struct MemorySource {
    tensors: BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts raw little-endian bytes; their length must match `shape` and `dtype`.
    pub fn insert_bytes(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> Result<()> {
        let name = name.into();
        let n = shape.iter().product::<usize>();
        let want = dtype.bytes_for(n).unwrap_or(usize::MAX);
        if bytes.len() != want {
            return Err(Error::weight(
                name,
                format!(
                    "{} bytes given but shape {shape:?} of {dtype} needs {want}",
                    bytes.len()
                ),
            ));
        }
        self.tensors.insert(name, (dtype, shape.to_vec(), bytes));
        Ok(())
    }

    /// Inserts f32 data stored as F32.
    pub fn insert_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
    ) -> Result<()> {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.insert_bytes(name, DType::F32, shape, bytes)
    }

    /// Inserts f32 data rounded to and stored as F16.
    pub fn insert_f16(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
    ) -> Result<()> {
        let bytes = data
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        self.insert_bytes(name, DType::F16, shape, bytes)
    }

    /// Inserts f32 data rounded to and stored as BF16.
    pub fn insert_bf16(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
    ) -> Result<()> {
        let bytes = data
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        self.insert_bytes(name, DType::BF16, shape, bytes)
    }

    /// Serialises every tensor into a safetensors file image (for writing test checkpoints).
    pub fn to_safetensors_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, (dtype, shape, bytes)) in &self.tensors {
            let dt = match dtype {
                DType::F32 => "F32",
                DType::F16 => "F16",
                DType::BF16 => "BF16",
                DType::U32 => "U32",
                // Not a safetensors dtype; written under GGUF's name for round trips only.
                DType::Quant(q) => q.name(),
            };
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
        }
        let mut head = Value::Object(header).to_string().into_bytes();
        // Pad the header with spaces so the data starts 8-byte aligned, as the format advises.
        while !(8 + head.len()).is_multiple_of(8) {
            head.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + head.len() + offset);
        out.extend_from_slice(&(head.len() as u64).to_le_bytes());
        out.extend_from_slice(&head);
        for (_, _, bytes) in self.tensors.values() {
            out.extend_from_slice(bytes);
        }
        out
    }
}

impl WeightSource for MemorySource {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        let (dtype, shape, bytes) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::weight(name, "missing"))?;
        if *dtype == DType::U32 {
            return Err(Error::weight(
                name,
                "stored as U32; only F32, F16 and BF16 are supported",
            ));
        }
        Ok(WeightView {
            dtype: *dtype,
            shape,
            bytes,
        })
    }

    fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|(_, _, b)| b.len() as u64).sum()
    }
}

// ---------------------------------------------------------------------------------------
// decoding stored bytes
// ---------------------------------------------------------------------------------------

/// Element types that can be read from little-endian bytes.
trait LeElem: bytemuck::Pod {
    fn from_le(b: &[u8]) -> Self;
}
impl LeElem for f32 {
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}
impl LeElem for f16 {
    fn from_le(b: &[u8]) -> Self {
        f16::from_le_bytes([b[0], b[1]])
    }
}
impl LeElem for bf16 {
    fn from_le(b: &[u8]) -> Self {
        bf16::from_le_bytes([b[0], b[1]])
    }
}

/// Borrows the bytes as `&[T]` when they are aligned (and the host is little-endian),
/// else copies them into an aligned vector: mmap offsets need not be aligned.
fn le_slice<T: LeElem>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    if cfg!(target_endian = "little") {
        if let Ok(s) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return std::borrow::Cow::Borrowed(s);
        }
    }
    std::borrow::Cow::Owned(
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(T::from_le)
            .collect(),
    )
}

/// Decodes any supported stored dtype to f32.
fn view_to_f32(v: &WeightView<'_>) -> Vec<f32> {
    match v.dtype {
        DType::F32 => le_slice::<f32>(v.bytes).into_owned(),
        DType::F16 => le_slice::<f16>(v.bytes)
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::BF16 => le_slice::<bf16>(v.bytes)
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::Quant(q) => {
            let n = v.shape.iter().product::<usize>();
            let mut out = vec![0f32; n];
            crate::quant::dequantize(q, v.bytes, &mut out);
            out
        }
        // Sources never hand out U32 views; decoding it as integers keeps this total.
        DType::U32 => v
            .bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Weights: the VarBuilder
// ---------------------------------------------------------------------------------------

/// Names the tensor in an upload failure but keeps the error's kind: a tensor the device
/// cannot hold, out-of-memory and device loss must not read as a malformed checkpoint.
fn upload_error(full: &str, e: Error) -> Error {
    match e {
        Error::TooLarge { what, bytes, limit } => Error::TooLarge {
            what: format!("tensor `{full}` ({what})"),
            bytes,
            limit,
        },
        Error::OutOfMemory(m) => Error::OutOfMemory(format!("uploading tensor `{full}`: {m}")),
        Error::Device(m) => Error::Device(format!("uploading tensor `{full}`: {m}")),
        other => Error::weight(full, format!("upload failed: {other}")),
    }
}

/// Name-scoped access to a [`WeightSource`] that checks shapes and uploads to a backend.
///
/// `w.pp("model").pp("layers").pp(3).get("mlp.up_proj.weight", &[n, k])` reads
/// `model.layers.3.mlp.up_proj.weight`.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn WeightSource>,
    backend: Arc<dyn Backend>,
    prefix: String,
    /// Quantize float matrices at load (see [`Weights::with_quant`]).
    quant: Option<crate::quant::QuantType>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Weights {
    /// Weights at the root of `source`, uploaded to `backend`.
    pub fn new(source: Arc<dyn WeightSource>, backend: Arc<dyn Backend>) -> Self {
        Weights {
            source,
            backend,
            prefix: String::new(),
            quant: None,
        }
    }

    /// The same weights scoped one level deeper (`prefix` joined with '.').
    pub fn pp(&self, prefix: impl std::fmt::Display) -> Weights {
        Weights {
            source: self.source.clone(),
            backend: self.backend.clone(),
            prefix: self.full_name(prefix),
            quant: self.quant,
        }
    }

    /// The same weights, but [`Weights::get`] quantizes every stored float matrix (rank 2,
    /// rows a whole number of blocks) to `qt` before uploading; other tensors (norms,
    /// biases, convolutions, matrices with odd rows) upload as stored, as llama.cpp falls
    /// back for them. `None` turns it off.
    pub fn with_quant(&self, qt: Option<crate::quant::QuantType>) -> Weights {
        Weights {
            quant: qt,
            ..self.clone()
        }
    }

    /// The quantization applied at load, if any.
    pub fn quant(&self) -> Option<crate::quant::QuantType> {
        self.quant
    }

    /// The current prefix (empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` with the current prefix.
    pub fn full_name(&self, name: impl std::fmt::Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.full_name(name))
    }

    /// The backend tensors are uploaded to.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The underlying source.
    pub fn source(&self) -> &Arc<dyn WeightSource> {
        &self.source
    }

    /// The stored view of a tensor after checking its shape.
    fn checked_view(&self, name: &str, shape: &[usize]) -> Result<(String, WeightView<'_>)> {
        let full = self.full_name(name);
        let view = self.source.view(&full)?;
        if view.shape != shape {
            return Err(Error::weight(
                full,
                format!("expected shape {shape:?}, found {:?}", view.shape),
            ));
        }
        Ok((full, view))
    }

    /// Uploads a tensor as stored (F32 stays F32, F16 stays F16, BF16 goes through
    /// `HostData::BF16`) after checking that its shape is `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (full, view) = self.checked_view(name, shape)?;
        if let (Some(q), [_, k]) = (self.quant, shape) {
            let float = matches!(view.dtype, DType::F32 | DType::F16 | DType::BF16);
            if float && k % q.block_size() == 0 {
                let bytes = crate::quant::quantize(q, &view_to_f32(&view))
                    .map_err(|e| Error::weight(&full, e.to_string()))?;
                return self
                    .backend
                    .upload_quant(q, &bytes, shape.to_vec().into())
                    .map_err(|e| upload_error(&full, e));
            }
        }
        let shape = shape.to_vec().into();
        let uploaded = match view.dtype {
            DType::F32 => self
                .backend
                .upload(HostData::F32(&le_slice::<f32>(view.bytes)), shape),
            DType::F16 => self
                .backend
                .upload(HostData::F16(&le_slice::<f16>(view.bytes)), shape),
            DType::BF16 => self
                .backend
                .upload(HostData::BF16(&le_slice::<bf16>(view.bytes)), shape),
            DType::Quant(q) => self.backend.upload_quant(q, view.bytes, shape),
            DType::U32 => return Err(Error::weight(full, "stored as U32; not a float weight")),
        };
        uploaded.map_err(|e| upload_error(&full, e))
    }

    /// Uploads a tensor converted to F32 (norm weights, biases, position tables).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.full_name(name);
        let data = self.host_f32(name, shape)?;
        self.backend
            .upload(HostData::F32(&data), shape.to_vec().into())
            .map_err(|e| upload_error(&full, e))
    }

    /// Reads a tensor to the host as f32, after checking its shape.
    pub fn host_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (_, view) = self.checked_view(name, shape)?;
        Ok(view_to_f32(&view))
    }

    /// The stored dtype and shape of a tensor, without reading it.
    pub fn stored(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        let view = self.source.view(&self.full_name(name))?;
        Ok((view.dtype, view.shape.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_errors_keep_their_kind_and_name_the_tensor() {
        let t = "lm_head.weight";
        let cases = [
            (
                Error::TooLarge {
                    what: "one row".into(),
                    bytes: 9,
                    limit: 4,
                },
                "TooLarge",
            ),
            (Error::OutOfMemory("vram".into()), "OutOfMemory"),
            (Error::Device("lost".into()), "Device"),
            (Error::msg("odd"), "Weight"),
        ];
        for (i, (e, want)) in cases.into_iter().enumerate() {
            let got = upload_error(t, e);
            let kind = format!("{got:?}");
            assert!(kind.starts_with(want), "case {i}: got {kind}, want {want}");
            assert!(
                got.to_string().contains(t),
                "case {i}: {got} does not name {t}"
            );
        }
    }
}

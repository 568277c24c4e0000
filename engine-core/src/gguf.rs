//! GGUF files (llama.cpp's format, versions 2 and 3): header, metadata, tensor infos and
//! memory-mapped data, served as a [`WeightSource`]; and a small writer.
//!
//! Layout: magic `GGUF`, `version: u32`, `tensor_count: u64`, `kv_count: u64`, then
//! `kv_count` metadata pairs (`key: string`, `type: u32`, value), then `tensor_count`
//! infos (`name: string`, `n_dims: u32`, `dims: [u64; n_dims]` innermost first,
//! `type: u32`, `offset: u64`), then padding to `general.alignment` (default 32), then the
//! data; each tensor's `offset` is relative to the data start and aligned. Strings are a
//! `u64` length and UTF-8 bytes. All little-endian.
//!
//! Every count and length is checked against the bytes that remain before anything is
//! allocated, so a malformed or hostile file gets a one-line error naming the file, never
//! a panic or a huge allocation.

// is_multiple_of is newer than the MSRV (1.85).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::weights::{WeightSource, WeightView};

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit of metadata arrays (llama.cpp writes at most one level).
const MAX_DEPTH: usize = 4;
/// Dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Most metadata values one file may hold, array elements and nested arrays counted:
/// about 5x the largest tokenizers (Gemma 3's 262,144 tokens with their scores and types;
/// Qwen2's 151,936 tokens, types and merges), and at 32 bytes per value in memory at most
/// 128 MiB however the counts lie.
pub const MAX_METADATA_VALUES: u64 = 1 << 22;
/// Most tensors one file may list (models have hundreds to a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Fewest file bytes one metadata pair takes: key length (8), value type (4), a 1-byte value.
const MIN_KV_BYTES: u64 = 13;
/// Fewest file bytes one tensor info takes: name length (8), rank (4), one dimension (8),
/// type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;

/// Fewest file bytes one metadata value of type `ty` takes (`None`: no such type).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string: its u64 length.
        8 => 8,
        // An array: element type (4) and count (8).
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer when it is any non-negative integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as f64 when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The elements, if it is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
    /// GGUF's type id of this value.
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// Stored type of a GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    /// One the engine reads.
    Known(DType),
    /// Any other ggml type id (Q5_K, Q6_K, IQ*, ...): listed, but refused when read.
    Other(u32),
}

impl GgufType {
    fn from_id(id: u32) -> GgufType {
        match id {
            0 => GgufType::Known(DType::F32),
            1 => GgufType::Known(DType::F16),
            30 => GgufType::Known(DType::BF16),
            t => match QuantType::from_ggml_type(t) {
                Some(q) => GgufType::Known(DType::Quant(q)),
                None => GgufType::Other(t),
            },
        }
    }
    /// The ggml type id of a dtype the engine stores (`None` for U32).
    pub fn id_of(dtype: DType) -> Option<u32> {
        match dtype {
            DType::F32 => Some(0),
            DType::F16 => Some(1),
            DType::BF16 => Some(30),
            DType::Quant(q) => Some(q.ggml_type()),
            DType::U32 => None,
        }
    }
    /// Bytes of `n` elements, for types whose size is known.
    fn bytes_for(self, n: u64) -> Option<u64> {
        // Sizes of common ggml types the engine does not read, so their ranges can be checked.
        let (block, bytes) = match self {
            GgufType::Known(DType::Quant(q)) => (q.block_size() as u64, q.block_bytes() as u64),
            GgufType::Known(d) => (1, d.size_in_bytes() as u64),
            GgufType::Other(6) => (32, 22),    // Q5_0
            GgufType::Other(7) => (32, 24),    // Q5_1
            GgufType::Other(10) => (256, 84),  // Q2_K
            GgufType::Other(11) => (256, 110), // Q3_K
            GgufType::Other(13) => (256, 176), // Q5_K
            GgufType::Other(14) => (256, 210), // Q6_K
            GgufType::Other(_) => return None,
        };
        if !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(bytes)
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape outermost first (GGUF stores it innermost first; this is reversed).
    pub shape: Vec<usize>,
    /// Stored type.
    pub ty: GgufType,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    data: Data,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order of keys (sorted here).
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos by name.
    tensors: BTreeMap<String, GgufTensorInfo>,
}

enum Data {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Mmap(m) => m,
            Data::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Metadata values still allowed (of [`MAX_METADATA_VALUES`]).
    values_left: u64,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    /// Refuses `n` items of at least `each` bytes when the bytes left cannot hold them, so
    /// that a count is never trusted past what the file could contain.
    fn fits(&self, n: u64, each: u64, what: &str) -> std::result::Result<(), String> {
        let left = self.left();
        match n.checked_mul(each) {
            Some(need) if need <= left => Ok(()),
            _ => Err(format!(
                "{what}: {n} entries of at least {each} bytes each, but only {left} bytes remain"
            )),
        }
    }
    /// Takes `n` values from the metadata value budget.
    fn spend(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.values_left {
            return Err(format!(
                "{what}: more than {MAX_METADATA_VALUES} metadata values in the file (the limit)"
            ));
        }
        self.values_left -= n;
        Ok(())
    }
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let left = self.left();
        if n > left {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but {left} remain",
                self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
    fn value(
        &mut self,
        ty: u32,
        what: &str,
        depth: usize,
    ) -> std::result::Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(what)?[0]),
            1 => GgufValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{what}: bool byte is {b}, not 0 or 1")),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                let Some(each) = min_value_bytes(ety) else {
                    return Err(format!("{what}: unknown array element type {ety}"));
                };
                // Both bounds before anything is allocated: the elements must fit in the
                // bytes left (a count above that is a lie), and in the value budget (a
                // file of bytes would otherwise cost 32 bytes of memory per byte).
                self.fits(n, each, &format!("{what}: array"))?;
                self.spend(n, what)?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(format!("{what}: unknown metadata value type {t}")),
        })
    }
}

/// Parses a whole GGUF image; errors are messages (the caller adds the path).
type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    BTreeMap<String, GgufTensorInfo>,
);

fn parse(buf: &[u8]) -> std::result::Result<Parsed, String> {
    let mut c = Cursor {
        buf,
        pos: 0,
        values_left: MAX_METADATA_VALUES,
    };
    let magic = c
        .u32("magic")
        .map_err(|_| "too short for a GGUF header".to_string())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {:02x?})",
            magic.to_le_bytes()
        ));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (only 2 and 3)"
        ));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Every count is bounded by the bytes that could hold it before it drives any loop or
    // allocation (tensor infos and metadata pairs share the bytes left).
    let left = c.left();
    let need = n_tensors
        .checked_mul(MIN_TENSOR_INFO_BYTES)
        .and_then(|t| t.checked_add(n_kv.checked_mul(MIN_KV_BYTES)?));
    if need.is_none_or(|n| n > left) {
        return Err(format!(
            "header claims {n_tensors} tensors and {n_kv} metadata pairs, which need at least \
             {MIN_TENSOR_INFO_BYTES} and {MIN_KV_BYTES} bytes each, in {left} bytes"
        ));
    }
    if n_tensors > MAX_TENSORS {
        return Err(format!(
            "header claims {n_tensors} tensors (the limit is {MAX_TENSORS})"
        ));
    }
    c.spend(n_kv, "metadata count")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("type of `{key}`"))?;
        let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor {i} name"))?;
        let nd = c.u32(&format!("tensor `{name}` rank"))?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(format!(
                "tensor `{name}`: rank {nd} (must be 1..={MAX_DIMS})"
            ));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(c.u64(&format!("tensor `{name}` dims"))?);
        }
        let ty = GgufType::from_id(c.u32(&format!("tensor `{name}` type"))?);
        let off = c.u64(&format!("tensor `{name}` offset"))?;
        infos.push((name, dims, ty, off));
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let file_len = buf.len() as u64;
    let mut tensors = BTreeMap::new();
    for (name, dims, ty, off) in infos {
        if off % alignment != 0 {
            return Err(format!(
                "tensor `{name}`: offset {off} is not a multiple of {alignment}"
            ));
        }
        let n = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: dims {dims:?} overflow"))?;
        let (shape_ok, size) = match ty.bytes_for(n) {
            Some(s) => (true, s),
            None => (false, 0),
        };
        if !shape_ok {
            if let GgufType::Known(DType::Quant(q)) = ty {
                return Err(format!(
                    "tensor `{name}`: {n} elements are not whole {}-element {} blocks",
                    q.block_size(),
                    q.name()
                ));
            }
        }
        let start = data_start.checked_add(off);
        let end = start.and_then(|s| s.checked_add(size));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= file_len => (s, e),
            _ => {
                return Err(format!(
                    "tensor `{name}` ({size} bytes at data offset {off}) runs past the end of the file ({file_len} bytes)"
                ))
            }
        };
        // Rows must be whole blocks for the kernels (and for GGUF itself).
        if let GgufType::Known(DType::Quant(q)) = ty {
            if dims[0] % q.block_size() as u64 != 0 {
                return Err(format!(
                    "tensor `{name}`: rows of {} are not whole {} blocks",
                    dims[0],
                    q.name()
                ));
            }
        }
        let shape = dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).map_err(|_| format!("tensor `{name}`: dim {d} too large")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let info = GgufTensorInfo {
            name: name.clone(),
            shape,
            ty,
            start: start as usize,
            end: end as usize,
        };
        if tensors.insert(name.clone(), info).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
    }
    let data_start = data_start as usize;
    crate::checks::check_disjoint(
        tensors.values().map(|t| {
            (
                t.name.as_str(),
                (t.start - data_start) as u64,
                (t.end - data_start) as u64,
            )
        }),
        "data offsets",
    )?;
    Ok((version, metadata, tensors))
}

impl GgufFile {
    /// Opens and validates a GGUF file (memory-mapped).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::file(path, "is a directory, expected a .gguf file"));
        }
        // Only regular files: a FIFO would block the open, a device has no end.
        let (file, len) = crate::files::open_regular(path)?;
        if len < 24 {
            return Err(Error::file(
                path,
                format!("file is {len} bytes, too short for a GGUF header"),
            ));
        }
        // SAFETY: read-only private map, as for safetensors (weights.rs): truncation by
        // another process while mapped is the accepted risk of zero-copy loading.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::file(path, format!("cannot memory-map: {e}")))?;
        Self::from_data(path, Data::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory; `origin` only names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        Self::from_data(origin, Data::Owned(bytes))
    }

    fn from_data(path: &Path, data: Data) -> Result<Self> {
        let (version, metadata, tensors) = parse(data.bytes()).map_err(|m| Error::file(path, m))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            data,
            version,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer, or an error naming the key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(GgufValue::as_u64).ok_or_else(|| {
            Error::file(
                &self.path,
                format!("metadata `{key}` missing or not an unsigned integer"),
            )
        })
    }

    /// A required number, or an error naming the key.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key).and_then(GgufValue::as_f64).ok_or_else(|| {
            Error::file(
                &self.path,
                format!("metadata `{key}` missing or not a number"),
            )
        })
    }

    /// A required string, or an error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(GgufValue::as_str).ok_or_else(|| {
            Error::file(
                &self.path,
                format!("metadata `{key}` missing or not a string"),
            )
        })
    }

    /// Every tensor's header entry, by name.
    pub fn tensor_infos(&self) -> impl Iterator<Item = &GgufTensorInfo> {
        self.tensors.values()
    }

    /// A tensor's header entry.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }
}

impl WeightSource for GgufFile {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<WeightView<'_>> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::weight(name, format!("missing from {}", self.path.display())))?;
        match info.ty {
            GgufType::Known(dtype) => Ok(WeightView {
                dtype,
                shape: &info.shape,
                bytes: &self.data.bytes()[info.start..info.end],
            }),
            GgufType::Other(t) => Err(Error::weight(
                name,
                format!(
                    "stored as ggml type {t} in {}; only F32, F16, BF16, Q8_0, Q4_0, Q4_1 and Q4_K are supported",
                    self.path.display()
                ),
            )),
        }
    }

    fn total_bytes(&self) -> u64 {
        self.data.bytes().len() as u64
    }
}

/// Opens a GGUF file as a shared [`GgufFile`].
pub fn open_gguf(path: &Path) -> Result<Arc<GgufFile>> {
    Ok(Arc::new(GgufFile::open(path)?))
}

// ---------------------------------------------------------------------------------------
// writing
// ---------------------------------------------------------------------------------------

/// One tensor to write: name, dtype, shape outermost first, little-endian stored bytes.
#[derive(Clone, Debug)]
pub struct GgufTensorOut {
    /// Name in the file.
    pub name: String,
    /// Stored type (not U32).
    pub dtype: DType,
    /// Shape outermost first.
    pub shape: Vec<usize>,
    /// Stored bytes (for a quantized type, whole blocks).
    pub bytes: Vec<u8>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            let ety = items.first().map_or(4, GgufValue::type_id);
            if items.iter().any(|i| i.type_id() != ety) {
                return Err(Error::msg("gguf: array elements must share one type"));
            }
            out.extend_from_slice(&ety.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

/// Serialises a GGUF v3 image (alignment 32) of `metadata` and `tensors`.
pub fn to_gguf_bytes(
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorOut],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        let id = GgufType::id_of(t.dtype).ok_or_else(|| {
            Error::weight(&t.name, format!("{} cannot be stored in GGUF", t.dtype))
        })?;
        let n: usize = t.shape.iter().product();
        if t.dtype.bytes_for(n) != Some(t.bytes.len()) {
            return Err(Error::weight(
                &t.name,
                format!(
                    "{} bytes do not hold {:?} {}",
                    t.bytes.len(),
                    t.shape,
                    t.dtype
                ),
            ));
        }
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.bytes.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
    }
    out.resize(
        (out.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT) as usize,
        0,
    );
    let base = out.len();
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(base + off as usize, 0);
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

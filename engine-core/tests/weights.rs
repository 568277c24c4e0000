//! Weight reading: safetensors files (single and sharded), the in-memory source, the
//! `Weights` VarBuilder, and one test per kind of hostile file.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use engine_core::weights::{open_safetensors, MemorySource, WeightSource, Weights};
use engine_core::{
    AttentionParams, Backend, DType, DeviceInfo, Error, HostData, Result, RopeParams, Shape,
    Storage, Tensor,
};
use half::{bf16, f16};

// ----- a mock backend that records what was uploaded -------------------------------------

/// Storage of the mock: the dtype of the `HostData` variant it was uploaded from, and values.
#[derive(Debug)]
struct MockStorage {
    uploaded_as: DType,
    values: Vec<f32>,
}
impl Storage for MockStorage {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn backend_name(&self) -> &'static str {
        "mock"
    }
}

/// Implements only `upload`; every op is an error. Records the number of uploads.
#[derive(Default)]
struct MockBackend {
    uploads: Mutex<usize>,
}

fn unsupported<T>(op: &'static str) -> Result<T> {
    Err(Error::msg(format!("mock backend: {op} not implemented")))
}

impl Backend for MockBackend {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "mock".into(),
            adapter: "mock".into(),
            api: "native".into(),
            device_type: "cpu".into(),
            max_buffer_size: u64::MAX,
            max_binding_size: u64::MAX,
            shader_f16: false,
            subgroups: false,
        }
    }
    fn upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor> {
        if data.len() != shape.elem_count() {
            return Err(Error::shape(
                "upload",
                format!("{} values for {shape}", data.len()),
            ));
        }
        *self.uploads.lock().unwrap() += 1;
        let values: Vec<f32> = match data {
            HostData::F32(v) => v.to_vec(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::U32(v) => v.iter().map(|&x| x as f32).collect(),
        };
        let dtype = data.dtype();
        Ok(Tensor::from_storage(
            Arc::new(MockStorage {
                uploaded_as: dtype,
                values,
            }),
            shape,
            dtype,
        ))
    }
    fn zeros(&self, _: Shape, _: DType) -> Result<Tensor> {
        unsupported("zeros")
    }
    fn to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.storage_as::<MockStorage>("to_vec_f32")?.values.clone())
    }
    fn to_vec_u32(&self, _: &Tensor) -> Result<Vec<u32>> {
        unsupported("to_vec_u32")
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn linear(&self, _: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Result<Tensor> {
        unsupported("linear")
    }
    fn add(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        unsupported("add")
    }
    fn mul(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        unsupported("mul")
    }
    fn gelu(&self, _: &Tensor) -> Result<Tensor> {
        unsupported("gelu")
    }
    fn quick_gelu(&self, _: &Tensor) -> Result<Tensor> {
        unsupported("quick_gelu")
    }
    fn silu_mul(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        unsupported("silu_mul")
    }
    fn rms_norm(&self, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
        unsupported("rms_norm")
    }
    fn layer_norm(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
        unsupported("layer_norm")
    }
    fn softmax(&self, _: &Tensor) -> Result<Tensor> {
        unsupported("softmax")
    }
    fn rope(&self, _: &Tensor, _: &Tensor, _: &RopeParams) -> Result<Tensor> {
        unsupported("rope")
    }
    fn attention(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &AttentionParams) -> Result<Tensor> {
        unsupported("attention")
    }
    fn attention_last_row(&self, _: &Tensor, _: &Tensor, _: &AttentionParams) -> Result<Tensor> {
        unsupported("attention_last_row")
    }
    fn token_contributions(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &AttentionParams,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        unsupported("token_contributions")
    }
    fn embedding(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        unsupported("embedding")
    }
    fn gather_rows(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        unsupported("gather_rows")
    }
    fn slice_rows(&self, _: &Tensor, _: usize, _: usize) -> Result<Tensor> {
        unsupported("slice_rows")
    }
    fn concat_rows(&self, _: &[&Tensor]) -> Result<Tensor> {
        unsupported("concat_rows")
    }
    fn write_rows(&self, _: &Tensor, _: usize, _: &Tensor) -> Result<()> {
        unsupported("write_rows")
    }
    fn patch_embed(&self, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
        unsupported("patch_embed")
    }
    fn argmax(&self, _: &Tensor) -> Result<Tensor> {
        unsupported("argmax")
    }
    fn cast(&self, _: &Tensor, _: DType) -> Result<Tensor> {
        unsupported("cast")
    }
}

fn uploaded_as(t: &Tensor) -> DType {
    t.storage_as::<MockStorage>("test")
        .expect("mock storage")
        .uploaded_as
}

// ----- helpers ------------------------------------------------------------------------------

/// A fresh, empty directory under the system temp dir, unique per test and process.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "visi-weights-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Small deterministic values (a seeded LCG) so every element differs.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// A safetensors file image from a raw header string and a data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

/// The error of opening `bytes` as a safetensors file, as a string (panics if it opens).
fn open_err(tag: &str, bytes: &[u8]) -> (Error, String) {
    let dir = temp_dir(tag);
    let p = write(&dir, "model.safetensors", bytes);
    let err = match open_safetensors(&p) {
        Ok(_) => panic!("{tag}: hostile file opened without error"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{tag}: error is not one line: {msg}");
    assert!(
        msg.contains("model.safetensors"),
        "{tag}: error does not name the file: {msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    (err, msg)
}

fn source_with_all_dtypes() -> MemorySource {
    let mut m = MemorySource::new();
    m.insert_f32("model.norm.weight", &[4], &values(4, 1))
        .unwrap();
    m.insert_f16("model.layers.0.mlp.up_proj.weight", &[3, 5], &values(15, 2))
        .unwrap();
    m.insert_bf16("model.embed_tokens.weight", &[6, 2], &values(12, 3))
        .unwrap();
    m.insert_f32("scalar", &[], &[7.5]).unwrap();
    m
}

// ----- round trips --------------------------------------------------------------------------

#[test]
fn single_file_round_trip_every_dtype() {
    let mem = source_with_all_dtypes();
    let dir = temp_dir("single");
    write(&dir, "model.safetensors", &mem.to_safetensors_bytes());
    // The directory, and the file itself, both open.
    for path in [dir.clone(), dir.join("model.safetensors")] {
        let src = open_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(src.names(), mem.names(), "names via {}", path.display());
        for name in mem.names() {
            let (a, b) = (src.view(&name).unwrap(), mem.view(&name).unwrap());
            assert_eq!(a.dtype, b.dtype, "{name}: dtype");
            assert_eq!(a.shape, b.shape, "{name}: shape");
            assert_eq!(a.bytes, b.bytes, "{name}: bytes");
        }
        let on_disk = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        assert_eq!(src.total_bytes(), on_disk);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn weights_get_uploads_as_stored_and_checks_shapes() {
    let src: Arc<dyn WeightSource> = Arc::new(source_with_all_dtypes());
    let backend = Arc::new(MockBackend::default());
    let w = Weights::new(src, backend.clone());
    let layer = w.pp("model").pp("layers").pp(0);
    assert_eq!(
        layer.full_name("mlp.up_proj.weight"),
        "model.layers.0.mlp.up_proj.weight"
    );
    assert!(layer.contains("mlp.up_proj.weight"));
    assert!(!layer.contains("mlp.down_proj.weight"));

    let up = layer.get("mlp.up_proj.weight", &[3, 5]).unwrap();
    assert_eq!(uploaded_as(&up), DType::F16, "f16 weights stay f16");
    assert_eq!(up.dims(), &[3, 5]);
    let want: Vec<f32> = values(15, 2)
        .iter()
        .map(|v| f16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(backend.to_vec_f32(&up).unwrap(), want);

    let emb = w.get("model.embed_tokens.weight", &[6, 2]).unwrap();
    assert_eq!(
        uploaded_as(&emb),
        DType::BF16,
        "bf16 goes through HostData::BF16"
    );
    let norm = w.pp("model").get("norm.weight", &[4]).unwrap();
    assert_eq!(uploaded_as(&norm), DType::F32);
    assert_eq!(backend.to_vec_f32(&norm).unwrap(), values(4, 1));

    // get_f32 / host_f32 convert every dtype.
    let up32 = layer.get_f32("mlp.up_proj.weight", &[3, 5]).unwrap();
    assert_eq!(uploaded_as(&up32), DType::F32);
    assert_eq!(backend.to_vec_f32(&up32).unwrap(), want);
    let emb_host = w.host_f32("model.embed_tokens.weight", &[6, 2]).unwrap();
    let want_bf: Vec<f32> = values(12, 3)
        .iter()
        .map(|v| bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(emb_host, want_bf);
    assert_eq!(w.host_f32("scalar", &[]).unwrap(), vec![7.5]);
    assert_eq!(
        w.stored("model.norm.weight").unwrap(),
        (DType::F32, vec![4])
    );

    // Shape mismatch: full name, expected and found shapes.
    let err = layer.get("mlp.up_proj.weight", &[5, 3]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Weight { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight")
            && msg.contains("[5, 3]")
            && msg.contains("[3, 5]"),
        "shape mismatch message: {msg}"
    );
    // Missing: full name and "missing".
    let err = layer.get_f32("self_attn.q_proj.weight", &[2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Weight { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.weight") && msg.contains("missing"),
        "{msg}"
    );
    assert_eq!(
        *backend.uploads.lock().unwrap(),
        4,
        "failed gets must not upload"
    );
}

#[test]
fn unaligned_data_is_copied_not_misread() {
    // A 1-byte header padding-free layout puts the data at an odd offset in the file.
    let vals = values(7, 9);
    let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut header = String::from(r#"{"x":{"dtype":"F32","shape":[7],"data_offsets":[0,28]}}"#);
    while (8 + header.len()) % 4 != 1 {
        header.push(' ');
    }
    let dir = temp_dir("unaligned");
    write(&dir, "model.safetensors", &raw_file(&header, &data));
    let src = open_safetensors(&dir).unwrap();
    let w = Weights::new(src, Arc::new(MockBackend::default()));
    assert_eq!(w.host_f32("x", &[7]).unwrap(), vals);
    let t = w.get("x", &[7]).unwrap();
    assert_eq!(w.backend().to_vec_f32(&t).unwrap(), vals);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_checkpoint_reads_across_shards() {
    let dir = temp_dir("sharded");
    let mut a = MemorySource::new();
    a.insert_f32("a.weight", &[2, 2], &values(4, 11)).unwrap();
    a.insert_f16("b.weight", &[3], &values(3, 12)).unwrap();
    let mut b = MemorySource::new();
    b.insert_bf16("c.weight", &[2], &values(2, 13)).unwrap();
    b.insert_f32("extra.not_in_index", &[1], &[1.0]).unwrap();
    write(
        &dir,
        "model-00001-of-00002.safetensors",
        &a.to_safetensors_bytes(),
    );
    write(
        &dir,
        "model-00002-of-00002.safetensors",
        &b.to_safetensors_bytes(),
    );
    let index = r#"{"metadata":{"total_size":30},"weight_map":{
        "a.weight":"model-00001-of-00002.safetensors",
        "b.weight":"model-00001-of-00002.safetensors",
        "c.weight":"model-00002-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let src = open_safetensors(&dir).unwrap();
    assert_eq!(
        src.names(),
        vec!["a.weight", "b.weight", "c.weight", "extra.not_in_index"]
    );
    let w = Weights::new(src.clone(), Arc::new(MockBackend::default()));
    assert_eq!(w.host_f32("a.weight", &[2, 2]).unwrap(), values(4, 11));
    let c = w.host_f32("c.weight", &[2]).unwrap();
    let want: Vec<f32> = values(2, 13)
        .iter()
        .map(|v| bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(c, want);
    let total: u64 = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    .iter()
    .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
    .sum();
    assert_eq!(src.total_bytes(), total);
    // Opening the index file directly works as well.
    assert!(open_safetensors(&dir.join("model.safetensors.index.json")).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memory_source_rejects_wrong_byte_counts() {
    let mut m = MemorySource::new();
    let err = m
        .insert_bytes("w", DType::F16, &[2, 3], vec![0; 10])
        .unwrap_err();
    assert!(
        matches!(err, Error::Weight { .. }) && err.to_string().contains("`w`"),
        "{err}"
    );
    let err = m.insert_f32("v", &[4], &[1.0, 2.0]).unwrap_err();
    assert!(err.to_string().contains("`v`"), "{err}");
}

// ----- hostile files ------------------------------------------------------------------------

#[test]
fn hostile_file_shorter_than_8_bytes() {
    for len in [0usize, 1, 7] {
        let (err, msg) = open_err("short", &vec![0u8; len]);
        assert!(matches!(err, Error::File { .. }), "{len} bytes: {msg}");
        assert!(msg.contains(&format!("{len} bytes")), "{len} bytes: {msg}");
    }
}

#[test]
fn hostile_header_length_past_end() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (err, msg) = open_err("hlen", &bytes);
    assert!(
        matches!(err, Error::File { .. }) && msg.contains("past the end"),
        "{msg}"
    );
    // A gigantic length must be refused before any allocation.
    let (_, msg) = open_err("hlen-huge", &u64::MAX.to_le_bytes());
    assert!(msg.contains("header length"), "{msg}");
}

#[test]
fn hostile_invalid_header_json() {
    for (tag, header) in [
        ("json-garbage", "{not json"),
        ("json-utf8", "\u{FFFD}"),
        ("json-array", "[1, 2]"),
        ("json-entry-type", r#"{"x": 3}"#),
        (
            "json-no-dtype",
            r#"{"x":{"shape":[1],"data_offsets":[0,4]}}"#,
        ),
        (
            "json-neg-shape",
            r#"{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        ),
        (
            "json-bad-offsets",
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
        ),
        ("json-metadata", r#"{"__metadata__": 5}"#),
    ] {
        let mut bytes = raw_file(header, &[0u8; 4]);
        if tag == "json-utf8" {
            // Not valid UTF-8 at all.
            bytes[8] = 0xFF;
        }
        let (err, msg) = open_err(tag, &bytes);
        assert!(matches!(err, Error::File { .. }), "{tag}: {msg}");
        assert!(
            msg.contains("header") || msg.contains("`x`"),
            "{tag}: {msg}"
        );
    }
}

#[test]
fn hostile_offsets_out_of_range() {
    let h = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let (_, msg) = open_err("oob", &raw_file(h, &[0u8; 12]));
    assert!(msg.contains("`w`") && msg.contains("out of range"), "{msg}");
    let h = r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#;
    let (_, msg) = open_err("reversed", &raw_file(h, &[0u8; 12]));
    assert!(msg.contains("`w`") && msg.contains("out of range"), "{msg}");
}

#[test]
fn hostile_offsets_inconsistent_with_shape() {
    let h = r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,8]}}"#;
    let (_, msg) = open_err("size", &raw_file(h, &[0u8; 8]));
    assert!(msg.contains("`w`") && msg.contains("needs 12"), "{msg}");
    // A shape whose element count overflows must not wrap around to a small size.
    let h = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}}"#;
    let (_, msg) = open_err("overflow", &raw_file(h, &[]));
    assert!(msg.contains("`w`") && msg.contains("overflow"), "{msg}");
}

#[test]
fn hostile_overlapping_tensors() {
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
                "b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let (_, msg) = open_err("overlap", &raw_file(h, &[0u8; 16]));
    assert!(
        msg.contains("overlap") && msg.contains("`a`") && msg.contains("`b`"),
        "{msg}"
    );
    // Overlap hidden behind an empty tensor between the two ranges.
    let h = r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},
                "e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},
                "c":{"dtype":"F32","shape":[1],"data_offsets":[20,24]}}"#;
    let (_, msg) = open_err("overlap-nested", &raw_file(h, &[0u8; 32]));
    assert!(
        msg.contains("overlap") && msg.contains("`a`") && msg.contains("`c`"),
        "{msg}"
    );
}

#[test]
fn unsupported_dtype_errors_when_read_naming_tensor_and_dtype() {
    let h = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},
                "w":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#;
    let dir = temp_dir("dtype");
    write(&dir, "model.safetensors", &raw_file(h, &[0u8; 20]));
    // The file opens (checkpoints carry unused int buffers); reading the tensor fails.
    let src = open_safetensors(&dir).unwrap();
    assert!(src.contains("ids"));
    let w = Weights::new(src, Arc::new(MockBackend::default()));
    assert_eq!(w.host_f32("w", &[1]).unwrap(), vec![0.0]);
    let err = w.get("ids", &[2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Weight { .. }), "{msg}");
    assert!(msg.contains("`ids`") && msg.contains("I64"), "{msg}");
    // Its size is still checked against its dtype.
    let h = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,8]}}"#;
    let (_, msg) = open_err("dtype-size", &raw_file(h, &[0u8; 8]));
    assert!(msg.contains("`ids`") && msg.contains("needs 16"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_paths_and_shards() {
    let dir = temp_dir("missing");
    // Nothing there.
    let err = open_safetensors(&dir.join("nope"))
        .err()
        .expect("missing path must fail");
    assert!(
        matches!(err, Error::File { .. }) && err.to_string().contains("nope"),
        "{err}"
    );
    // An empty directory.
    let err = open_safetensors(&dir).err().expect("empty dir must fail");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // The index names a shard that does not exist.
    let mut a = MemorySource::new();
    a.insert_f32("a", &[1], &[1.0]).unwrap();
    write(
        &dir,
        "model-00001-of-00002.safetensors",
        &a.to_safetensors_bytes(),
    );
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors",
                                  "b":"model-00002-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let err = open_safetensors(&dir)
        .err()
        .expect("missing shard must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::File { .. }), "{msg}");
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("not found"),
        "{msg}"
    );

    // The index maps a tensor to a shard that does not hold it.
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors",
                                  "zz":"model-00001-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let err = open_safetensors(&dir)
        .err()
        .expect("tensor missing from its shard must fail");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Weight { .. }) && msg.contains("`zz`"),
        "{msg}"
    );
    assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");

    // A shard path escaping the directory, and a broken index.
    let index = r#"{"weight_map":{"a":"../model-00001-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let err = open_safetensors(&dir).err().expect("path escape must fail");
    assert!(err.to_string().contains("plain file name"), "{err}");
    write(&dir, "model.safetensors.index.json", b"{\"weight_map\": [");
    let err = open_safetensors(&dir)
        .err()
        .expect("bad index JSON must fail");
    assert!(
        err.to_string().contains("model.safetensors.index.json"),
        "{err}"
    );
    write(&dir, "model.safetensors.index.json", b"{}");
    let err = open_safetensors(&dir)
        .err()
        .expect("index without weight_map must fail");
    assert!(err.to_string().contains("weight_map"), "{err}");

    // A corrupt shard is reported with the shard's name.
    write(&dir, "model-00001-of-00002.safetensors", b"abc");
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let err = open_safetensors(&dir)
        .err()
        .expect("corrupt shard must fail");
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seeded_garbage_never_panics() {
    // Random headers and truncations: every outcome must be Ok or a typed error.
    let mem = source_with_all_dtypes();
    let good = mem.to_safetensors_bytes();
    let dir = temp_dir("fuzz");
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for i in 0..300 {
        let mut bytes = good.clone();
        match i % 3 {
            0 => bytes.truncate((next() as usize) % good.len()),
            1 => {
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            _ => {
                let at = 8 + (next() as usize) % (bytes.len() - 8);
                bytes[at] = b"0123456789[]{}\",:-"[(next() % 18) as usize];
            }
        }
        let p = write(&dir, "model.safetensors", &bytes);
        if let Ok(src) = open_safetensors(&p) {
            let w = Weights::new(src.clone(), Arc::new(MockBackend::default()));
            for name in src.names() {
                if let Ok((_, shape)) = w.stored(&name) {
                    let _ = w.host_f32(&name, &shape);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

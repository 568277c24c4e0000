//! The GGUF reader: a round trip through the writer, and clear errors (never a panic) on
//! malformed files: every truncation, bad magic/version, misaligned or out-of-range data,
//! lying counts, unknown types.

use std::path::Path;

use engine_core::gguf::{to_gguf_bytes, GgufFile, GgufTensorOut, GgufValue};
use engine_core::quant::{self, QuantType};
use engine_core::weights::WeightSource;
use engine_core::DType;

fn sample() -> Vec<u8> {
    let meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        ("llama.block_count".to_string(), GgufValue::U32(2)),
        ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
        ("x.bool".to_string(), GgufValue::Bool(true)),
        ("x.i64".to_string(), GgufValue::I64(-5)),
        ("x.f64".to_string(), GgufValue::F64(0.25)),
        ("x.u8".to_string(), GgufValue::U8(7)),
        ("x.i8".to_string(), GgufValue::I8(-7)),
        ("x.u16".to_string(), GgufValue::U16(700)),
        ("x.i16".to_string(), GgufValue::I16(-700)),
        ("x.i32".to_string(), GgufValue::I32(-70000)),
        ("x.u64".to_string(), GgufValue::U64(1 << 40)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String("bé".into()),
            ]),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            GgufValue::Array(vec![GgufValue::F32(0.5), GgufValue::F32(-1.0)]),
        ),
    ];
    let w: Vec<f32> = (0..64 * 3)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let tensors = vec![
        GgufTensorOut {
            name: "norm.weight".into(),
            dtype: DType::F32,
            shape: vec![3],
            bytes: [1f32, 2.0, 3.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
        GgufTensorOut {
            name: "w.q4_1".into(),
            dtype: DType::Quant(QuantType::Q4_1),
            shape: vec![3, 64],
            bytes: quant::quantize(QuantType::Q4_1, &w).expect("q"),
        },
        GgufTensorOut {
            name: "w.f16".into(),
            dtype: DType::F16,
            shape: vec![2, 1],
            bytes: vec![0, 0x3c, 0, 0x40],
        },
    ];
    to_gguf_bytes(&meta, &tensors).expect("write")
}

#[test]
fn round_trip() {
    let f = GgufFile::from_bytes(sample(), Path::new("mem.gguf")).expect("parse");
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(f.get_u64("llama.block_count").expect("blocks"), 2);
    assert_eq!(f.get_f64("llama.rope.freq_base").expect("theta"), 10000.0);
    assert_eq!(f.get("x.i64"), Some(&GgufValue::I64(-5)));
    assert_eq!(f.get("x.f64"), Some(&GgufValue::F64(0.25)));
    assert_eq!(f.get("x.bool").and_then(GgufValue::as_bool), Some(true));
    assert_eq!(f.get("x.i16"), Some(&GgufValue::I16(-700)));
    let toks = f
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .expect("tokens");
    assert_eq!(toks[1].as_str(), Some("bé"));
    assert_eq!(f.names(), vec!["norm.weight", "w.f16", "w.q4_1"]);
    let v = f.view("w.q4_1").expect("view");
    assert_eq!(v.dtype, DType::Quant(QuantType::Q4_1));
    assert_eq!(v.shape, &[3, 64], "shape is outermost first");
    assert_eq!(v.bytes.len(), 3 * 2 * 20);
    let n = f.view("norm.weight").expect("view");
    assert_eq!(
        n.bytes,
        [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(f.view("w.f16").expect("view").shape, &[2, 1]);
    assert!(f.view("nope").is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample();
    for len in 0..full.len() {
        let r = GgufFile::from_bytes(full[..len].to_vec(), Path::new("cut.gguf"));
        // Truncation inside the last tensor's padding-free data must still be caught.
        let e = r.expect_err(&format!("truncated to {len} bytes but parsed"));
        assert!(e.to_string().starts_with("cut.gguf: "), "len {len}: {e}");
    }
}

#[test]
fn malformed_headers_are_named() {
    let good = sample();
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("magic", Box::new(|b| b[0] = b'X'), "not a GGUF file"),
        ("version 1", Box::new(|b| b[4] = 1), "version 1"),
        ("version 4", Box::new(|b| b[4] = 4), "version 4"),
        (
            "tensor count",
            Box::new(|b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())),
            "tensors",
        ),
        (
            "kv count",
            Box::new(|b| b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            "metadata",
        ),
        (
            "key length",
            Box::new(|b| b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes())),
            "truncated",
        ),
        (
            "value type",
            Box::new(|b| {
                // First key is "general.architecture" (20 bytes); its type follows.
                let at = 24 + 8 + 20;
                b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
            }),
            "unknown metadata value type 99",
        ),
    ];
    for (what, edit, want) in cases {
        let mut b = good.clone();
        edit(&mut b);
        let e = GgufFile::from_bytes(b, Path::new("bad.gguf")).expect_err(what);
        assert!(
            e.to_string().contains(want),
            "{what}: error `{e}` lacks `{want}`"
        );
    }
}

fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b't');
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + data, 0);
    b
}

#[test]
fn bad_tensor_infos_are_named() {
    let ok = one_tensor(&[64, 2], 3, 0, 80);
    GgufFile::from_bytes(ok, Path::new("t.gguf")).expect("valid q4_1 tensor");
    let cases = [
        (
            "short data",
            one_tensor(&[64, 2], 3, 0, 79),
            "runs past the end",
        ),
        (
            "misaligned",
            one_tensor(&[4], 0, 4, 64),
            "not a multiple of 32",
        ),
        ("partial block", one_tensor(&[48, 2], 3, 0, 200), "blocks"),
        ("rank 5", one_tensor(&[1, 1, 1, 1, 1], 0, 0, 4), "rank 5"),
        ("overflow", one_tensor(&[u64::MAX, 4], 0, 0, 4), "overflow"),
        (
            "offset overflow",
            one_tensor(&[4], 0, u64::MAX - 31, 16),
            "runs past the end",
        ),
    ];
    for (what, b, want) in cases {
        let e = GgufFile::from_bytes(b, Path::new("t.gguf")).expect_err(what);
        assert!(
            e.to_string().contains(want),
            "{what}: error `{e}` lacks `{want}`"
        );
    }
    // An unknown ggml type parses (the tensor is listed) but cannot be read.
    let f = GgufFile::from_bytes(one_tensor(&[256], 14, 0, 210), Path::new("t.gguf"))
        .expect("q6_k listed");
    let e = f.view("t").expect_err("q6_k read");
    assert!(e.to_string().contains("ggml type 14"), "{e}");
}

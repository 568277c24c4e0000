//! Shared test helpers: the torch fixtures of tests/fixtures/ops, tolerances, comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use engine_core::{Backend, DType, HostData, Shape, Tensor};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A named tolerance: `|got - want| <= abs + rel * |want|`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub abs: f32,
    pub rel: f32,
}

/// Ops whose f32 result is one or two roundings from the exact value (elementwise, RoPE).
pub const STRICT: Tol = Tol {
    abs: 1e-6,
    rel: 2e-6,
};
/// Ops that accumulate in f32 over a few hundred terms (linear, attention, norms); the
/// references are float64, and the largest error seen is about 2e-6.
pub const ACCUM: Tol = Tol {
    abs: 5e-6,
    rel: 5e-6,
};

/// One fixture file: tensors named `<case>.<role>`, a JSON parameter object per case.
pub struct Fixture {
    pub name: String,
    bytes: Vec<u8>,
    cases: BTreeMap<String, Value>,
}

/// Host copy of a fixture tensor.
pub enum Host {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
    U16(Vec<u16>),
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ops")
}

impl Fixture {
    /// Loads `tests/fixtures/ops/<name>.safetensors`.
    pub fn load(name: &str) -> Fixture {
        let path = fixture_dir().join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let cases = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    serde_json::from_str(&v).expect("case parameters are JSON"),
                )
            })
            .collect();
        Fixture {
            name: name.to_string(),
            bytes,
            cases,
        }
    }

    /// Case names (sorted) with their parameters.
    pub fn cases(&self) -> Vec<(String, Value)> {
        self.cases
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn has(&self, case: &str, role: &str) -> bool {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture");
        st.tensor(&format!("{case}.{role}")).is_ok()
    }

    /// The tensor `<case>.<role>` with its dims.
    pub fn host(&self, case: &str, role: &str) -> (Host, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture");
        let name = format!("{case}.{role}");
        let t = st
            .tensor(&name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.name));
        let b = t.data();
        let host = match t.dtype() {
            Dtype::F32 => Host::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F16 => Host::F16(
                b.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::U32 => Host::U32(
                b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::U16 => Host::U16(
                b.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            other => panic!("{name}: unexpected fixture dtype {other:?}"),
        };
        (host, t.shape().to_vec())
    }

    /// `<case>.<role>` as f32 values (f16 widened).
    pub fn f32(&self, case: &str, role: &str) -> (Vec<f32>, Vec<usize>) {
        match self.host(case, role) {
            (Host::F32(v), d) => (v, d),
            (Host::F16(v), d) => (v.iter().map(|x| x.to_f32()).collect(), d),
            _ => panic!("{case}.{role} is not a float tensor"),
        }
    }

    pub fn u32(&self, case: &str, role: &str) -> Vec<u32> {
        match self.host(case, role) {
            (Host::U32(v), _) => v,
            _ => panic!("{case}.{role} is not a u32 tensor"),
        }
    }

    /// Uploads `<case>.<role>` keeping its stored dtype.
    pub fn upload(&self, be: &dyn Backend, case: &str, role: &str) -> Tensor {
        let (host, dims) = self.host(case, role);
        let shape = Shape::new(dims);
        let r = match &host {
            Host::F32(v) => be.upload(HostData::F32(v), shape),
            Host::F16(v) => be.upload(HostData::F16(v), shape),
            Host::U32(v) => be.upload(HostData::U32(v), shape),
            Host::U16(_) => panic!("{case}.{role}: raw u16 bits cannot be uploaded"),
        };
        r.unwrap_or_else(|e| panic!("{case}.{role}: upload failed: {e}"))
    }
}

/// Compares element by element; the failure names the case, the position and both values.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], dims: &[usize], tol: Tol) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} values, want {}",
        got.len(),
        want.len()
    );
    let cols = dims.last().copied().unwrap_or(1).max(1);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= tol.abs + tol.rel * w.abs() || (g.is_nan() && w.is_nan()) || g == w;
        assert!(
            ok,
            "{what}: row {} col {}: got {g} want {w} (|diff| {err:.3e}, tol {tol:?})",
            i / cols,
            i % cols
        );
    }
}

/// A seeded uniform generator in [-1, 1) (xorshift64*), for tests that need no fixture.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        x as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// Uploads f32 values, panicking with the shape on failure.
pub fn upload_f32(be: &dyn Backend, v: &[f32], shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    be.upload(HostData::F32(v), shape.clone())
        .unwrap_or_else(|e| panic!("upload {shape}: {e}"))
}

/// Asserts that `r` failed with a shape error naming `op`.
pub fn assert_shape_err<T: std::fmt::Debug>(r: engine_core::Result<T>, op: &str) {
    match r {
        Err(engine_core::Error::Shape { op: o, .. }) if o == op => {}
        other => panic!("{op}: want a shape error naming {op}, got {other:?}"),
    }
}

/// Asserts that `r` failed with a dtype error naming `op` and `dtype`.
pub fn assert_dtype_err<T: std::fmt::Debug>(r: engine_core::Result<T>, op: &str, dtype: DType) {
    match r {
        Err(engine_core::Error::DType { op: o, dtype: d }) if o == op && d == dtype => {}
        other => panic!("{op}: want a dtype error ({dtype}) naming {op}, got {other:?}"),
    }
}

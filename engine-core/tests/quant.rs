//! GGUF block formats: dequantisers and quantizers against gguf-py's outputs
//! (tests/data/quant_refs.json, from tools/make_quant_refs.py), and `linear`/`embedding`
//! on the CPU backend with quantized weights against the same weights dequantised to f32.

use engine_core::quant::{self, QuantType};
use engine_core::{Backend, CpuBackend, DType, HostData, Shape};
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn refs() -> Vec<Value> {
    let text = include_str!("data/quant_refs.json");
    let v: Value = serde_json::from_str(text).expect("quant_refs.json");
    v["cases"].as_array().expect("cases").clone()
}

#[test]
fn dequantize_matches_gguf_py() {
    let cases = refs();
    assert_eq!(cases.len(), 4, "one case per format");
    for c in &cases {
        let name = c["type"].as_str().expect("type");
        let qt = QuantType::parse(name).expect("known type");
        let bytes = hex(c["blocks_hex"].as_str().expect("hex"));
        let want = floats(&c["dequantized"]);
        assert_eq!(
            qt.bytes_for(want.len()),
            Some(bytes.len()),
            "{name}: block sizes"
        );
        let mut got = vec![f32::NAN; want.len()];
        quant::dequantize(qt, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // gguf-py computes in float32 with the same operations: exact, bar one rounding.
            let tol = 1e-6 * w.abs().max(1e-3);
            assert!(
                (g - w).abs() <= tol,
                "{name}: block {} elem {}: got {g} want {w}",
                i / qt.block_size(),
                i % qt.block_size()
            );
        }
        // Unaligned ranges decode the same values.
        let mut part = vec![0f32; 45];
        quant::dequantize_range(qt, &bytes, 7, &mut part);
        for (i, (g, w)) in part.iter().zip(&want[7..52]).enumerate() {
            assert_eq!(g, w, "{name}: range at 7, elem {i}");
        }
    }
}

#[test]
fn quantize_matches_gguf_py() {
    for c in refs() {
        let name = c["type"].as_str().expect("type").to_string();
        let Some(hexs) = c.get("quantize_hex").and_then(Value::as_str) else {
            continue; // gguf-py has no Q4_K quantizer
        };
        let qt = QuantType::parse(&name).expect("known type");
        let x = floats(&c["quantize_input"]);
        let want = hex(hexs);
        let got = quant::quantize(qt, &x).expect("whole blocks");
        assert_eq!(got.len(), want.len(), "{name}: length");
        let bb = qt.block_bytes();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{name}: block {} byte {}: got {g:#04x} want {w:#04x}",
                i / bb,
                i % bb
            );
        }
    }
}

#[test]
fn q4k_quantize_round_trips_closely() {
    let mut rng = Lcg(11);
    let x: Vec<f32> = (0..512).map(|_| rng.normal()).collect();
    let q = quant::quantize(QuantType::Q4K, &x).expect("whole blocks");
    assert_eq!(q.len(), 2 * 144);
    let mut y = vec![0f32; 512];
    quant::dequantize(QuantType::Q4K, &q, &mut y);
    let rms_err = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 512.0).sqrt();
    // 4-bit codes over a ~6σ range: a step of ~0.3σ (per-sub-block), rms error ~0.1.
    assert!(rms_err < 0.15, "q4_k rms error {rms_err}");
}

/// A seeded generator so failures reproduce.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next().max(1e-7), self.next());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

#[test]
fn linear_and_embedding_with_quantized_weights() {
    let be = CpuBackend::new();
    let mut rng = Lcg(3);
    for qt in [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4K,
    ] {
        let (n, k) = (37, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let bytes = quant::quantize(qt, &w).expect("whole blocks");
        let mut wd = vec![0f32; n * k];
        quant::dequantize(qt, &bytes, &mut wd);
        let wq = be
            .upload_quant(qt, &bytes, Shape::new([n, k]))
            .expect("upload");
        assert_eq!(wq.dtype(), DType::Quant(qt));
        let wf = be
            .upload(HostData::F32(&wd), Shape::new([n, k]))
            .expect("upload");
        let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let b = be
            .upload(HostData::F32(&bias), Shape::new([n]))
            .expect("upload");
        // Up to 4 rows take the fused quantized dot products (decode), up to 32 the
        // matrix-vector path over decoded rows, 40 the packed GEMM: each against the f32
        // path on the dequantized weights.
        for m in [1usize, 2, 3, 4, 5, 19, 40] {
            let xv: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let x = be
                .upload(HostData::F32(&xv), Shape::new([m, k]))
                .expect("upload");
            let got = be
                .to_vec_f32(&be.linear(&x, &wq, Some(&b)).expect("linear"))
                .expect("read");
            let want = be
                .to_vec_f32(&be.linear(&x, &wf, Some(&b)).expect("linear"))
                .expect("read");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{qt} m={m}: row {} col {}: got {g} want {w}",
                    i / n,
                    i % n
                );
            }
        }
        let ids = be
            .upload(HostData::U32(&[5, 0, 36, 5]), Shape::new([4]))
            .expect("upload");
        let got = be
            .to_vec_f32(&be.embedding(&wq, &ids).expect("embedding"))
            .expect("read");
        for (r, id) in [5usize, 0, 36, 5].iter().enumerate() {
            for c in 0..k {
                let (g, w) = (got[r * k + c], wd[id * k + c]);
                assert_eq!(g, w, "{qt} embedding: row {r} col {c}: got {g} want {w}");
            }
        }
        let bad = be.embedding(
            &wq,
            &be.upload(HostData::U32(&[37]), Shape::new([1])).expect("u"),
        );
        assert!(bad.is_err(), "{qt}: out-of-vocabulary id accepted");
    }
}

#[test]
fn upload_quant_rejects_bad_sizes() {
    let be = CpuBackend::new();
    // Rows of 48 are not whole 32-weight blocks.
    let r = be.upload_quant(QuantType::Q8_0, &[0u8; 34 * 3], Shape::new([2, 48]));
    assert!(r.is_err(), "rows of 48 accepted");
    // One byte short.
    let r = be.upload_quant(QuantType::Q4_1, &[0u8; 39], Shape::new([2, 32]));
    assert!(r.is_err(), "short buffer accepted");
    let r = be.upload_quant(QuantType::Q4_1, &[0u8; 40], Shape::new([2, 32]));
    assert!(r.is_ok(), "exact buffer refused: {r:?}");
}

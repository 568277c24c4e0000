//! Quantized weights on the wgpu backend (Q8_0, Q4_0, Q4_1, Q4_K): `linear` (gemv and gemm
//! kernels) and `embedding` against the CPU backend's f32 ops on the dequantised weights,
//! including rows that are not word-aligned (Q8_0/Q4_0 with K = 32) and tensors split over
//! several bindings.
//!
//! Without an adapter each test prints SKIP and passes, unless `CI` is set (then it fails).

use std::sync::{Arc, OnceLock};

use engine_core::quant::{dequantize, quantize};
use engine_core::{Backend, CpuBackend, DType, HostData, QuantType, Shape, Tensor};
use engine_wgpu::{GpuBackend, GpuOptions};

mod common;
use common::{backend, gpu, gpu_small_binding, Rng};

const FORMATS: [QuantType; 4] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q4K,
];

/// No subgroups: the portable `gemv_q`/`gemm_q` (software adapters otherwise take the
/// `*_q_sg8` kernels).
fn gpu_no_subgroups() -> Option<Arc<GpuBackend>> {
    static G: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    backend(
        GpuOptions {
            no_subgroups: true,
            ..Default::default()
        },
        &G,
    )
}

/// Panics naming the first element with `|got - want| > abs + rel * |want|`.
fn check(what: &str, got: &[f32], want: &[f32], cols: usize, abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        // NaN fails too (a NaN error is not within tolerance).
        if err.is_nan() || err > abs + rel * w.abs() {
            panic!(
                "{what}: row {} col {}: got {g} want {w} (|err| {err}, tol {abs} + {rel}·|want|)",
                i / cols,
                i % cols
            );
        }
        worst = worst.max(err);
    }
    println!("{what}: ok, max |err| {worst:e}");
}

/// Random `[n, k]` weights quantized to `qt`: the blocks and their dequantised f32 values.
fn quant_weights(r: &mut Rng, qt: QuantType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let w = r.vec(n * k, -1.0, 1.0);
    let q = quantize(qt, &w).expect("quantize");
    let mut deq = vec![0f32; n * k];
    dequantize(qt, &q, &mut deq);
    (q, deq)
}

/// GPU `linear` on quantized `[n, k]` weights vs the CPU's f32 `linear` on the dequantised ones.
#[allow(clippy::too_many_arguments)]
fn linear_case(
    g: &GpuBackend,
    r: &mut Rng,
    qt: QuantType,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    want_buffers: usize,
) {
    let cpu = CpuBackend::new();
    let (q, deq) = quant_weights(r, qt, n, k);
    let x = r.vec(m * k, -1.0, 1.0);
    let bv = r.vec(n, -1.0, 1.0);
    let up = |b: &dyn Backend, d: HostData<'_>, s: &[usize]| -> Tensor {
        b.upload(d, Shape::from(s)).expect("upload")
    };
    let gw = g
        .upload_quant(qt, &q, Shape::from([n, k]))
        .expect("gpu upload_quant");
    assert_eq!(gw.dtype(), DType::Quant(qt));
    let parts = gw
        .storage_as::<engine_wgpu::GpuStorage>("test")
        .expect("gpu storage")
        .buffers();
    assert!(
        parts >= want_buffers,
        "{qt} [{n}, {k}]: {parts} buffer(s), want at least {want_buffers}"
    );
    let cw = up(&cpu, HostData::F32(&deq), &[n, k]);
    let (gx, cx) = (
        up(g, HostData::F32(&x), &[m, k]),
        up(&cpu, HostData::F32(&x), &[m, k]),
    );
    let (gb, cb) = (
        up(g, HostData::F32(&bv), &[n]),
        up(&cpu, HostData::F32(&bv), &[n]),
    );
    let got = g
        .linear(&gx, &gw, bias.then_some(&gb))
        .and_then(|t| g.to_vec_f32(&t))
        .unwrap_or_else(|e| panic!("{qt} m={m} k={k} n={n}: gpu: {e}"));
    let want = cpu
        .linear(&cx, &cw, bias.then_some(&cb))
        .and_then(|t| cpu.to_vec_f32(&t))
        .expect("cpu linear");
    // f32 sums in another order (d·Σxq + m·Σx per block): error grows like sqrt(K).
    let abs = 3e-5 * (k as f32).sqrt();
    check(
        &format!("linear {qt} m={m} k={k} n={n} bias={bias} ({parts} buffers)"),
        &got,
        &want,
        n,
        abs,
        1e-4,
    );
}

fn embedding_case(g: &GpuBackend, r: &mut Rng, qt: QuantType, vocab: usize, d: usize) {
    let cpu = CpuBackend::new();
    let (q, deq) = quant_weights(r, qt, vocab, d);
    let gt = g
        .upload_quant(qt, &q, Shape::from([vocab, d]))
        .expect("gpu upload_quant");
    let ct = cpu
        .upload(HostData::F32(&deq), Shape::from([vocab, d]))
        .expect("cpu upload");
    let ids: Vec<u32> = (0..13)
        .map(|_| r.below(vocab as u32))
        .chain([0, vocab as u32 - 1])
        .collect();
    let s = [ids.len()];
    let gi = g.upload(HostData::U32(&ids), Shape::from(s)).expect("ids");
    let ci = cpu
        .upload(HostData::U32(&ids), Shape::from(s))
        .expect("ids");
    let got = g
        .embedding(&gt, &gi)
        .and_then(|t| g.to_vec_f32(&t))
        .unwrap_or_else(|e| panic!("embedding {qt}: gpu: {e}"));
    let want = cpu
        .embedding(&ct, &ci)
        .and_then(|t| cpu.to_vec_f32(&t))
        .expect("cpu embedding");
    // One product and one sum per weight, possibly fused: a rounding or two.
    check(
        &format!("embedding {qt} [{vocab}, {d}]"),
        &got,
        &want,
        d,
        1e-6,
        1e-6,
    );
}

#[test]
fn quant_gemv() {
    let Some(g) = gpu() else { return };
    gemv_suite(&g, 71);
}

#[test]
fn quant_gemm() {
    let Some(g) = gpu() else { return };
    gemm_suite(&g, 72);
}

#[test]
fn quant_portable_kernels() {
    let Some(g) = gpu_no_subgroups() else { return };
    assert!(!g.device_info().subgroups);
    gemv_suite(&g, 75);
    gemm_suite(&g, 76);
}

fn gemv_suite(g: &GpuBackend, seed: u64) {
    let mut r = Rng::new(seed);
    for qt in FORMATS {
        // K = 32 puts Q8_0/Q4_0 rows at 2-byte (not word) boundaries.
        let mut cases = vec![
            (1, 256, 77, true),
            (3, 256, 45, false),
            (7, 4096, 100, true),
            (1, 4096, 33, false),
            (3, 11008, 41, true),
            (7, 11008, 19, false),
            (8, 512, 70, true),
        ];
        if qt.block_size() == 32 {
            // Odd block counts keep GGUF's layout (Q8_0/Q4_0 even counts are re-packed).
            cases.push((3, 32, 50, true));
            cases.push((5, 96, 40, false));
        }
        for (m, k, n, bias) in cases {
            linear_case(g, &mut r, qt, m, k, n, bias, 1);
        }
    }
}

fn gemm_suite(g: &GpuBackend, seed: u64) {
    let mut r = Rng::new(seed);
    for qt in FORMATS {
        let mut cases = vec![
            (65, 256, 77, true),
            (65, 4096, 70, false),
            (640, 256, 130, false),
            (640, 4096, 67, true),
        ];
        if qt.block_size() == 32 {
            cases.push((9, 32, 50, false));
            cases.push((70, 96, 65, true));
        }
        for (m, k, n, bias) in cases {
            linear_case(g, &mut r, qt, m, k, n, bias, 1);
        }
    }
}

#[test]
fn quant_embedding() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(73);
    for qt in FORMATS {
        embedding_case(&g, &mut r, qt, 100, 256);
        if qt.block_size() == 32 {
            embedding_case(&g, &mut r, qt, 50, 32);
        }
    }
}

#[test]
fn quant_split_bindings() {
    let Some(g) = gpu_small_binding() else { return };
    assert_eq!(g.device_info().max_binding_size, 64 << 10);
    let mut r = Rng::new(74);
    // (format, rows, K): each over 64 KiB, so split by rows; K = 32 rows are not
    // word-aligned (34 and 18 bytes).
    for (qt, n, k) in [
        (QuantType::Q8_0, 2000, 32),
        (QuantType::Q4_0, 4000, 32),
        (QuantType::Q8_0, 1000, 64),
        (QuantType::Q4_0, 1000, 128),
        (QuantType::Q4_1, 1000, 128),
        (QuantType::Q4K, 300, 512),
    ] {
        // 16 rows take the tiled kernel where the [16, n] f32 result fits one binding.
        let ms: &[usize] = if 16 * n * 4 <= 64 << 10 {
            &[1, 3, 16]
        } else {
            &[1, 3]
        };
        for &m in ms {
            linear_case(&g, &mut r, qt, m, k, n, m != 3, 2);
        }
        embedding_case(&g, &mut r, qt, n, k);
    }
}

#[test]
fn quant_errors() {
    let Some(g) = gpu() else { return };
    let q = quantize(QuantType::Q8_0, &[0.5; 64]).expect("quantize");
    // Rows of 48 are not whole blocks; too few bytes for the shape.
    assert!(g
        .upload_quant(QuantType::Q8_0, &q, Shape::from([1, 48]))
        .is_err());
    assert!(g
        .upload_quant(QuantType::Q8_0, &q[..60], Shape::from([2, 32]))
        .is_err());
    let t = g
        .upload_quant(QuantType::Q8_0, &q, Shape::from([2, 32]))
        .expect("upload");
    // Quantized tensors only feed linear and embedding.
    assert!(g.to_vec_f32(&t).is_err());
    assert!(g.slice_rows(&t, 0, 1).is_err());
    assert!(g.concat_rows(&[&t, &t]).is_err());
    assert!(g
        .zeros(Shape::from([2, 32]), DType::Quant(QuantType::Q8_0))
        .is_err());
    g.sync().expect("device healthy after the rejected calls");
}

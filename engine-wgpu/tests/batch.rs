//! Batch invariance, bit for bit, on the CPU backend and the wgpu backend (default kernels and
//! the portable ones without subgroups):
//! - `linear`: every row of an M-row call equals the same row computed alone, M in 1..=16
//!   (a server batching the decode rows of several sequences), for f32, f16 and quantized
//!   weights (1..=8 on the portable wgpu kernels; 40 rows too where gemv and gemm share
//!   one reduction order);
//! - `attention`: every query of a call equals the same query computed alone or in a chunk of
//!   others (decode, a follow-up prompt, a full prefill all give one query the same result),
//!   with and without masks, over caches shorter and longer than one key split.
//!
//! Without an adapter the wgpu half prints SKIP and passes, unless `CI` is set.

use std::sync::{Arc, OnceLock};

use engine_core::quant::quantize;
use engine_core::{
    AttentionMask, AttentionParams, Backend, CpuBackend, HostData, MaskAction, MaskRule, MaskRules,
    QuantType, Shape, Tensor, OPEN_END,
};
use engine_wgpu::{GpuBackend, GpuOptions};
use half::f16;

mod common;
use common::{backend, gpu, Rng};

/// No subgroups: the portable gemv/attention kernels (software adapters otherwise take the
/// subgroup-broadcast ones).
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

/// The backends under test, named.
fn backends() -> Vec<(String, Arc<dyn Backend>)> {
    let mut v: Vec<(String, Arc<dyn Backend>)> = vec![("cpu".into(), Arc::new(CpuBackend::new()))];
    if let Some(g) = gpu() {
        v.push(("wgpu".into(), g));
    }
    if let Some(g) = gpu_no_subgroups() {
        v.push(("wgpu no-subgroups".into(), g));
    }
    v
}

fn f32s(b: &dyn Backend, t: &Tensor) -> Vec<f32> {
    b.to_vec_f32(t).expect("read back")
}

/// Panics at the first element whose bits differ.
fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i}: {g:e} ({:#x}) alone vs {w:e} ({:#x}) in the batch",
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn linear_rows_do_not_depend_on_the_batch() {
    let mut r = Rng::new(41);
    let (n, k) = (72, 512);
    let x = r.vec(16 * k, -1.0, 1.0);
    let wf = r.vec(n * k, -1.0, 1.0);
    let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
    // Whether the default wgpu backend takes the sg8 kernels (device type and subgroups do
    // not say: SwiftShader is a CPU adapter with subgroups that are not 8 wide).
    let sg8_adapter = gpu().is_some_and(|g| g.sg8_kernels());
    for (name, b) in backends() {
        let b = b.as_ref();
        let mut weights: Vec<(String, Tensor)> = vec![
            (
                "f32".into(),
                b.upload(HostData::F32(&wf), Shape::from([n, k])).unwrap(),
            ),
            (
                "f16".into(),
                b.upload(HostData::F16(&wh), Shape::from([n, k])).unwrap(),
            ),
        ];
        for qt in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q4K,
        ] {
            let q = quantize(qt, &wf).expect("quantize");
            weights.push((
                format!("{qt}"),
                b.upload_quant(qt, &q, Shape::from([n, k])).unwrap(),
            ));
        }
        for (wn, w) in &weights {
            // Each row alone.
            let alone: Vec<Vec<f32>> = (0..16)
                .map(|i| {
                    let xi = b
                        .upload(HostData::F32(&x[i * k..(i + 1) * k]), Shape::from([1, k]))
                        .unwrap();
                    f32s(b, &b.linear(&xi, w, None).unwrap())
                })
                .collect();
            // The portable wgpu kernels (no subgroups, f32 weights, hardware adapters) keep gemv
            // up to 8 rows: their gemv and gemm reduce in different orders (see
            // GEMV_MAX_ROWS_PORTABLE in backend.rs), so only 1..=8 agree there. On a software
            // adapter with 8-wide subgroups the f16 gemv and gemm share one order: a 40-row call
            // (gemm) must agree too.
            let sg8 = name == "wgpu" && sg8_adapter && wn != "f32";
            let max_m = if name == "cpu" || sg8 { 16 } else { 8 };
            let extra = if sg8 && wn == "f16" { Some(40) } else { None };
            let xl: Vec<f32> = x.iter().chain(&x).chain(&x[..8 * k]).copied().collect();
            for m in (2..=max_m).chain(extra) {
                let xm = b
                    .upload(HostData::F32(&xl[..m * k]), Shape::from([m, k]))
                    .unwrap();
                let y = f32s(b, &b.linear(&xm, w, None).unwrap());
                for (i, a) in alone.iter().enumerate().take(m) {
                    same_bits(
                        &format!("{name} linear {wn} [{m}, {k}] x [{n}, {k}] row {i}"),
                        a,
                        &y[i * n..(i + 1) * n],
                    );
                }
            }
            println!("{name}: linear {wn}: rows of M = 1..={max_m} equal (and {extra:?})");
        }
    }
}

#[test]
fn attention_queries_do_not_depend_on_the_call() {
    let mut r = Rng::new(43);
    // Caches of 70 keys (one split) and 1400 (several splits on every adapter).
    let rules = AttentionMask::Rules(
        MaskRules::new(&[
            MaskRule {
                queries: (30, OPEN_END),
                keys: (5, 25),
                action: MaskAction::Sink { to: 9 },
            },
            MaskRule {
                queries: (40, OPEN_END),
                keys: (0, 3),
                action: MaskAction::Zero,
            },
        ])
        .expect("rules"),
    );
    for (kv_len, d) in [(70usize, 64usize), (1400, 128)] {
        let (h, kvh) = (4, 2);
        let (qw, kw) = (h * d, kvh * d);
        let sq = 24; // the last 24 rows of the cache are the call's queries
        let q0 = kv_len - sq;
        let q = r.vec(sq * qw, -2.0, 2.0);
        let kh: Vec<f16> = r
            .vec(kv_len * kw, -2.0, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let vh: Vec<f16> = r
            .vec(kv_len * kw, -1.0, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        for (name, b) in backends() {
            let b = b.as_ref();
            let kt = b
                .upload(HostData::F16(&kh), Shape::from([kv_len, kw]))
                .unwrap();
            let vt = b
                .upload(HostData::F16(&vh), Shape::from([kv_len, kw]))
                .unwrap();
            for (mname, mask) in [
                ("none", AttentionMask::None),
                (
                    "layer0 sink",
                    AttentionMask::Layer0Sink {
                        image_start: 4,
                        image_end: 30,
                    },
                ),
                ("rules", rules),
            ] {
                let p = |rows: usize, at: usize| AttentionParams {
                    num_heads: h,
                    num_kv_heads: kvh,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                    causal: true,
                    q_offset: q0 + at,
                    kv_len: q0 + at + rows,
                    mask,
                };
                let run = |at: usize, rows: usize| {
                    let qt = b
                        .upload(
                            HostData::F32(&q[at * qw..(at + rows) * qw]),
                            Shape::from([rows, qw]),
                        )
                        .unwrap();
                    f32s(b, &b.attention(&qt, &kt, &vt, &p(rows, at)).unwrap())
                };
                let all = run(0, sq);
                // Each query alone (decode), and chunks of 5 and 16 (follow-up prompts).
                for (at, rows) in (0..sq).map(|i| (i, 1)).chain([(3, 5), (8, 16)]) {
                    let got = run(at, rows);
                    same_bits(
                        &format!(
                            "{name} attention {mname} kv {kv_len} d {d}: queries {at}..{} alone vs in {sq}",
                            at + rows
                        ),
                        &got,
                        &all[at * qw..(at + rows) * qw],
                    );
                }
            }
            println!("{name}: attention kv {kv_len} d {d}: every query equal alone and in chunks");
        }
    }
}

/// A binding limit of 1 MiB, with and without subgroups: q, k, v and the output of
/// `long_prompts_run_in_query_chunks` fit one binding, the flash kernels' split partials do not.
fn gpu_1mib(no_subgroups: bool) -> Option<Arc<GpuBackend>> {
    static A: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    static B: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    backend(
        GpuOptions {
            max_binding_override: Some(1 << 20),
            no_subgroups,
            ..Default::default()
        },
        if no_subgroups { &B } else { &A },
    )
}

#[test]
fn long_prompts_run_in_query_chunks() {
    // 400 queries over a 1,400-key cache, 4 heads of 128: the attention partials (queries ×
    // heads × key splits × 131 floats) pass a 1 MiB binding limit, as LLaVA-NeXT-7B's 3,027
    // queries pass lavapipe's 128 MiB. The chunked call must give every query the bits of the
    // unlimited one (and must not fail).
    let mut r = Rng::new(47);
    let (h, kvh, d, kv_len, sq) = (4usize, 2usize, 128usize, 1400usize, 400usize);
    let (qw, kw) = (h * d, kvh * d);
    let q = r.vec(sq * qw, -2.0, 2.0);
    let kh: Vec<f16> = r
        .vec(kv_len * kw, -2.0, 2.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let vh: Vec<f16> = r
        .vec(kv_len * kw, -1.0, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let p = AttentionParams {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        causal: true,
        q_offset: kv_len - sq,
        kv_len,
        mask: AttentionMask::Layer0Sink {
            image_start: 4,
            image_end: 900,
        },
    };
    let run = |b: &dyn Backend| {
        let qt = b.upload(HostData::F32(&q), Shape::from([sq, qw])).unwrap();
        let kt = b
            .upload(HostData::F16(&kh), Shape::from([kv_len, kw]))
            .unwrap();
        let vt = b
            .upload(HostData::F16(&vh), Shape::from([kv_len, kw]))
            .unwrap();
        f32s(b, &b.attention(&qt, &kt, &vt, &p).unwrap())
    };
    for (name, full, small) in [
        ("wgpu", gpu(), gpu_1mib(false)),
        ("wgpu no-subgroups", gpu_no_subgroups(), gpu_1mib(true)),
    ] {
        let (Some(full), Some(small)) = (full, small) else {
            continue;
        };
        let want = run(full.as_ref());
        let got = run(small.as_ref());
        same_bits(
            &format!("{name}: attention under a 1 MiB binding limit"),
            &got,
            &want,
        );
        println!("{name}: {sq} queries x {kv_len} keys under a 1 MiB binding: same bits");
    }
}

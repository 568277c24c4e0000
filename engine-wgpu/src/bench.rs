//! The kernel benchmark: `linear` at the LLaVA-7B shapes against the adapter's measured peaks.

use std::time::Instant;

use engine_core::quant::quantize;
use engine_core::{Backend, HostData, QuantType, Result, Shape, Tensor};
use half::f16;
use serde_json::json;

use crate::ctx::{Bind, PipelineKey};
use crate::uniforms::BenchP;
use crate::{open_gpu, GpuBackend, GpuOptions};

/// (K, N) of the LLaVA-7B projections: attention (4096×4096), MLP up/gate (4096×11008),
/// MLP down (11008×4096).
const SHAPES: [(usize, usize); 3] = [(4096, 4096), (4096, 11008), (11008, 4096)];
/// Activation rows: decode (1) and prefill (576 image tokens + text).
const ROWS: [usize; 2] = [1, 640];

/// Deterministic values in [-0.5, 0.5) (xorshift; no RNG crate needed).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Runs `f` `warm` times untimed, then `reps` times timed; returns the times in seconds and
/// whether they came from timestamp queries.
fn time(
    gpu: &GpuBackend,
    warm: usize,
    reps: usize,
    f: &dyn Fn() -> Result<()>,
) -> Result<(Vec<f64>, bool)> {
    for _ in 0..warm {
        f()?;
        gpu.sync()?;
    }
    let mut times = Vec::with_capacity(reps);
    let mut stamped = false;
    for _ in 0..reps {
        if gpu.ctx.begin_timing(64)? {
            f()?;
            if let Some(t) = gpu.ctx.end_timing()? {
                stamped = true;
                times.push(t);
                continue;
            }
        }
        let t0 = Instant::now();
        f()?;
        gpu.sync()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((times, stamped))
}

fn min_median(t: &[f64]) -> (f64, f64) {
    let mut v = t.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let min = v.first().copied().unwrap_or(f64::NAN);
    let med = if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    };
    (min, med)
}

/// Block-quantized weight formats benchmarked after the f16 rows.
const QUANTS: [QuantType; 4] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q4K,
];

/// Runs the kernel benchmark on the adapter `opts` selects: achieved GFLOP/s and GB/s
/// of `linear` for the LLaVA-7B shapes (M = 1 and M = 640; K×N = 4096×4096,
/// 4096×11008, 11008×4096, f16 weights), then the same with Q8_0, Q4_0, Q4_1 and Q4_K
/// weights (GB/s counts the bytes actually read: the quantized blocks), and the adapter's
/// measured peaks (a pure-FMA kernel and a pure-copy kernel). `quick` shrinks repetitions
/// and runs the quantized formats on the first shape only (for tests).
pub fn kernel_bench(opts: &GpuOptions, quick: bool) -> Result<serde_json::Value> {
    let gpu = open_gpu(opts)?;
    let ctx = &gpu.ctx;
    // Timestamps time the passes only, so a quick run needs no warm-up there once each kernel
    // has run once: llvmpipe JIT-compiles a pipeline's variant at its first dispatch, inside
    // the timed pass (which made the quick FMA peak read ~5x low), hence the small priming
    // dispatches below. Wall-clock timing still warms up.
    let (warm, reps) = match (quick, ctx.timestamps) {
        (true, true) => (0, 1),
        (true, false) => (1, 1),
        (false, _) => (2, 7),
    };

    // Peak FMA: 64 FLOP per invocation per step.
    // The peaks are cheap: even a quick run takes the best of 7 runs of ~0.1 s each, as other
    // load on a shared machine only ever lowers a peak (and a low peak flatters every ratio).
    let peak_reps = reps.max(7);
    // ~0.1-0.3 s per peak run on lavapipe: long enough that the fixed cost around a pass
    // (~20 ms there) does not lower the peak (a 60 ms run read ~30% low).
    let (groups, iters) = if quick {
        (1024u32, 1024u32)
    } else {
        (2048, 2048)
    };
    let sink = ctx.alloc(u64::from(groups) * 256 * 16, "bench")?.0;
    let fma = ctx.pipeline(PipelineKey::new("bench", "peak_fma"))?;
    let fma_params = BenchP {
        u0: iters,
        u1: 0,
        u2: 0,
        u3: 0,
    };
    ctx.dispatch(&fma, &fma_params, &[Bind(1, &sink, sink.size())], [1, 1, 1])?;
    gpu.sync()?;
    let fma_run = || {
        ctx.dispatch(
            &fma,
            &fma_params,
            &[Bind(1, &sink, sink.size())],
            [groups, 1, 1],
        )
    };
    let (mut t_fma, stamped) = time(&gpu, warm, peak_reps, &fma_run)?;
    let peak_flop = f64::from(groups) * 256.0 * f64::from(iters) * 64.0;

    // Peak copy: read + write of one buffer.
    let bytes = (if quick { 16u64 << 20 } else { 64 << 20 }).min(ctx.max_binding / 16 * 16);
    let src = ctx.alloc(bytes, "bench")?.0;
    let dst = ctx.alloc(bytes, "bench")?.0;
    let copy = ctx.pipeline(PipelineKey::new("bench", "peak_copy"))?;
    let len4 = (bytes / 16) as u32;
    let copy_params = BenchP {
        u0: len4,
        u1: 0,
        u2: 0,
        u3: 0,
    };
    let g = (len4 as usize).div_ceil(256);
    let gx = g.min(ctx.max_groups as usize);
    let grid = [gx as u32, g.div_ceil(gx) as u32, 1];
    let prime = BenchP {
        u0: 256,
        u1: 0,
        u2: 0,
        u3: 0,
    };
    ctx.dispatch(
        &copy,
        &prime,
        &[Bind(2, &src, bytes), Bind(3, &dst, bytes)],
        [1, 1, 1],
    )?;
    gpu.sync()?;
    let copy_run = || {
        ctx.dispatch(
            &copy,
            &copy_params,
            &[Bind(2, &src, bytes), Bind(3, &dst, bytes)],
            grid,
        )
    };
    let (mut t_copy, _) = time(&gpu, warm, peak_reps, &copy_run)?;

    let mut rows = Vec::new();
    let formats = std::iter::once(None).chain(QUANTS.map(Some));
    for qt in formats {
        for (si, (k, n)) in SHAPES.into_iter().enumerate() {
            if quick && qt.is_some() && si > 0 {
                continue;
            }
            let wv = values(n * k, (k * 31 + n) as u64);
            let (w, w_bytes) = match qt {
                None => {
                    let h: Vec<f16> = wv.into_iter().map(f16::from_f32).collect();
                    (
                        gpu.upload(HostData::F16(&h), Shape::from([n, k]))?,
                        n * k * 2,
                    )
                }
                Some(q) => {
                    let b = quantize(q, &wv)?;
                    drop(wv);
                    (gpu.upload_quant(q, &b, Shape::from([n, k]))?, b.len())
                }
            };
            let mut remeasure = || -> Result<()> {
                // The peaks again after every row: on a shared machine the load changes within
                // a run, and a ratio against a peak taken under more load than the row
                // overstates it.
                t_fma.extend(time(&gpu, 0, 3, &fma_run)?.0);
                t_copy.extend(time(&gpu, 0, 3, &copy_run)?.0);
                Ok(())
            };
            linear_rows(
                &gpu,
                &w,
                qt,
                w_bytes,
                (warm, reps),
                &mut remeasure,
                &mut rows,
            )?;
        }
    }
    let mut remeasure = || -> Result<()> {
        t_fma.extend(time(&gpu, 0, 3, &fma_run)?.0);
        t_copy.extend(time(&gpu, 0, 3, &copy_run)?.0);
        Ok(())
    };
    let attn = attention_rows(&gpu, (warm, reps), &mut remeasure)?;
    rows.extend(attn);
    let fma_peak = peak_flop / min_median(&t_fma).0 * 1e-9;
    let copy_peak = 2.0 * bytes as f64 / min_median(&t_copy).0 * 1e-9;
    for r in &mut rows {
        let (g, b) = (r["gflops"].as_f64(), r["gbps"].as_f64());
        r["frac_of_fma_peak"] = json!(g.map(|g| g / fma_peak));
        r["frac_of_copy_peak"] = json!(b.map(|b| b / copy_peak));
    }
    let info = gpu.device_info();
    Ok(json!({
        "adapter": info.adapter,
        "api": info.api,
        "device_type": info.device_type,
        "shader_f16": info.shader_f16,
        "subgroups": info.subgroups,
        "timing": if stamped { "timestamp-query" } else { "wall-clock" },
        "quick": quick,
        "warmup": warm,
        "repetitions": reps,
        "peak_repetitions": peak_reps,
        "peak": {
            "fma_gflops": fma_peak,
            "fma_min_s": min_median(&t_fma).0,
            "copy_gbps": copy_peak,
            "copy_bytes": bytes,
            "copy_min_s": min_median(&t_copy).0,
        },
        "linear": rows.iter().filter(|r| r["op"] != "attention").cloned().collect::<Vec<_>>(),
        "attention": rows.iter().filter(|r| r["op"] == "attention").cloned().collect::<Vec<_>>(),
    }))
}

/// Attention at the LLaVA-7B head shape (32 heads of 128, f16 KV cache): prefill of 640
/// causal queries over 640 keys (FLOPs: QKᵀ and P·V over the visible pairs), and decode of one
/// query over 640 and 4096 cached keys (bytes: the K and V rows read, the floor of a decode
/// step). Each row is appended with its kernel; ratios to the peaks are added by the caller.
fn attention_rows(
    gpu: &GpuBackend,
    (warm, reps): (usize, usize),
    remeasure: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<serde_json::Value>> {
    let (h, d) = (32usize, 128usize);
    let w = h * d;
    let mut rows = Vec::new();
    for (sq, keys) in [(640usize, 640usize), (1, 640), (1, 4096)] {
        let kv: Vec<f16> = values(keys * w, 7 + keys as u64)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let k = gpu.upload(HostData::F16(&kv), Shape::from([keys, w]))?;
        let v = gpu.upload(HostData::F16(&kv), Shape::from([keys, w]))?;
        let q = gpu.upload(HostData::F32(&values(sq * w, 3)), Shape::from([sq, w]))?;
        let p = engine_core::AttentionParams {
            num_heads: h,
            num_kv_heads: h,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
            causal: true,
            q_offset: keys - sq,
            kv_len: keys,
            mask: engine_core::AttentionMask::None,
        };
        drop(gpu.attention(&q, &k, &v, &p)?); // compiles the pipelines
        gpu.sync()?;
        let (t, _) = time(gpu, warm, reps, &|| gpu.attention(&q, &k, &v, &p).map(drop))?;
        let (min, med) = min_median(&t);
        // Visible (query, key) pairs under the causal rule.
        let pairs: usize = (0..sq).map(|i| keys - sq + i + 1).sum();
        let flop = 4.0 * (pairs * h * d) as f64;
        let moved = (2 * keys * w * 2 + 2 * sq * w * 4) as f64;
        let prefill = sq > 1;
        rows.push(json!({
            "op": "attention",
            "phase": if prefill { "prefill" } else { "decode" },
            "queries": sq, "keys": keys, "heads": h, "head_dim": d, "kv": "f16",
            "kernel": gpu.attention_variant(d, true, prefill),
            "min_s": min, "median_s": med,
            "gflops": flop / min * 1e-9, "gflops_median": flop / med * 1e-9,
            "gbps": moved / min * 1e-9, "gbps_median": moved / med * 1e-9,
        }));
        remeasure()?;
    }
    Ok(rows)
}

/// Times `linear` with weights `w` (`[n, k]`, `w_bytes` bytes on the device) at every row
/// count of [`ROWS`] and appends one JSON row each (ratios to the peaks are added by the
/// caller); `remeasure` re-times the peaks after each row.
fn linear_rows(
    gpu: &GpuBackend,
    w: &Tensor,
    qt: Option<QuantType>,
    w_bytes: usize,
    (warm, reps): (usize, usize),
    remeasure: &mut dyn FnMut() -> Result<()>,
    rows: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let ctx = &gpu.ctx;
    let (n, k) = w.dims2("bench")?;
    for m in ROWS {
        let x = gpu.upload(HostData::F32(&values(m * k, m as u64)), Shape::from([m, k]))?;
        // Priming: the same pipeline (M <= 16 is part of the gemv pipeline key) on few rows.
        let pm = if m <= 16 { m } else { m.min(64) };
        let xp = gpu.upload(HostData::F32(&values(pm * k, 1)), Shape::from([pm, k]))?;
        drop(gpu.linear(&xp, w, None)?);
        gpu.sync()?;
        let (t, _) = time(gpu, warm, reps, &|| gpu.linear(&x, w, None).map(drop))?;
        let (min, med) = min_median(&t);
        let flop = 2.0 * (m * n * k) as f64;
        let moved = (w_bytes + m * k * 4 + m * n * 4) as f64;
        let coop = m > 16 && qt.is_none() && ctx.coop.load(std::sync::atomic::Ordering::Relaxed);
        let kernel = match (qt, m <= 8, ctx.sg8_cpu && k % 8 == 0) {
            _ if coop => "gemm_coop",
            (Some(_), true, false) => "gemv_q",
            (Some(_), false, false) => "gemm_q",
            (Some(_), true, true) => "gemv_q_sg8",
            (Some(_), false, true) => "gemm_q_sg8",
            (None, true, false) => "gemv",
            (None, false, false) => "gemm",
            (None, true, true) => "gemv_sg8",
            (None, false, true) => "gemm_sg8",
        };
        rows.push(json!({
            "m": m, "k": k, "n": n,
            "weights": qt.map_or("f16", QuantType::name),
            "weight_bytes": w_bytes,
            "kernel": kernel,
            "min_s": min, "median_s": med,
            "gflops": flop / min * 1e-9, "gflops_median": flop / med * 1e-9,
            "gbps": moved / min * 1e-9, "gbps_median": moved / med * 1e-9,
        }));
        remeasure()?;
    }
    Ok(())
}

//! CPU matrix-vector throughput per weight format next to the machine's read bandwidth, in
//! one run (interleaved repetitions): how close decode's `linear` gets to the memory limit.
//!
//! `cargo run --release -p engine-core --example cpu_gemv -- [--threads N] [--reps 7]`
//!
//! Each format's matrix holds 64M weights (more than any L3 here), so every call streams it
//! from memory. The bandwidth peak is a plain SIMD sum over an f32 array of the same size
//! class, on the same threads.

use std::time::Instant;

use engine_core::{cpu, Backend, CpuBackend, HostData, QuantType, Shape};
use rayon::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let reps = arg("--reps").unwrap_or(7).max(1);
    cpu::with_threads(arg("--threads"), || bench(reps));
}

fn bench(reps: usize) {
    let threads = cpu::current_threads();
    let be = CpuBackend::new();
    let (n, k) = (16384usize, 4096usize);
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let wf: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..k).map(|_| rnd()).collect();
    let xt = be
        .upload(HostData::F32(&x), Shape::from([1, k]))
        .expect("upload x");
    let mut mats = Vec::new();
    for qt in [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4K,
    ] {
        let bytes = engine_core::quant::quantize(qt, &wf).expect("quantize");
        let t = be
            .upload_quant(qt, &bytes, Shape::from([n, k]))
            .expect("upload");
        mats.push((qt.name().to_string(), bytes.len(), t));
    }
    let h: Vec<half::f16> = wf.iter().map(|&v| half::f16::from_f32(v)).collect();
    mats.push((
        "f16".into(),
        h.len() * 2,
        be.upload(HostData::F16(&h), Shape::from([n, k]))
            .expect("upload f16"),
    ));
    drop(wf);
    // The bandwidth reference: 256 MiB of f32 summed by all threads.
    let big: Vec<f32> = vec![1.0; 64 << 20];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); mats.len() + 1];
    for _ in 0..reps {
        let t = Instant::now();
        let s: f32 = big
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for l in 0..16 {
                        acc[l] += v[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        times[0].push(t.elapsed().as_secs_f64());
        assert!(s > 0.0);
        for (i, (_, _, w)) in mats.iter().enumerate() {
            let t = Instant::now();
            let y = be.linear(&xt, w, None).expect("linear");
            times[i + 1].push(t.elapsed().as_secs_f64());
            drop(y);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let peak = (big.len() * 4) as f64 / med(&mut times[0]) / 1e9;
    println!(
        "{threads} threads, {} ({}), {n}x{k} matrices, median of {reps}",
        cpu::kernel_isa(),
        std::env::var("VISI_CPU_SIMD").unwrap_or_default()
    );
    println!("read bandwidth (f32 sum): {peak:.1} GB/s");
    for (i, (name, bytes, _)) in mats.iter().enumerate() {
        let s = med(&mut times[i + 1]);
        let gbs = *bytes as f64 / s / 1e9;
        println!(
            "gemv {name:>5}: {:6.2} ms, {gbs:5.1} GB/s ({:.0}% of the read bandwidth), {:.2} Gweights/s",
            s * 1e3,
            100.0 * gbs / peak,
            (n * k) as f64 / s / 1e9
        );
    }
}

//! Times `linear` at one shape for kernel tuning (wall clock around submit + wait):
//! `probe M K N` (default 1 4096 4096); `NO_F16=1` disables shader-f16.

use std::time::Instant;

use engine_core::{Backend, HostData, Shape};
use engine_wgpu::GpuOptions;
use half::f16;

fn main() -> Result<(), engine_core::Error> {
    let opts = GpuOptions {
        no_f16: std::env::var_os("NO_F16").is_some(),
        ..Default::default()
    };
    let g = engine_wgpu::open_gpu(&opts)?;
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (m, k, n) = (arg(1, 1), arg(2, 4096), arg(3, 4096));
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) / 13.0).collect();
    let w: Vec<f16> = (0..n * k)
        .map(|i| f16::from_f32(((i * 5 % 11) as f32) / 11.0))
        .collect();
    let x = g.upload(HostData::F32(&x), Shape::from([m, k]))?;
    let w = g.upload(HostData::F16(&w), Shape::from([n, k]))?;
    println!("{} m={m} k={k} n={n}", g.device_info().adapter);
    for i in 0..3 {
        let t = Instant::now();
        let y = g.linear(&x, &w, None)?;
        g.sync()?;
        let s = t.elapsed().as_secs_f64();
        let gflops = 2.0 * (m * n * k) as f64 / s * 1e-9;
        let gbps = (n * k * 2) as f64 / s * 1e-9;
        println!("rep {i}: {s:.4} s  {gflops:.2} GFLOP/s  {gbps:.2} GB/s (weights)");
        drop(y);
    }
    Ok(())
}

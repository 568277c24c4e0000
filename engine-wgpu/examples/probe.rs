//! Times `linear` at a few shapes (wall clock around submit + wait) for kernel tuning.
use engine_core::{Backend, HostData, Shape};
use engine_wgpu::GpuOptions;
use half::f16;
use std::time::Instant;
fn main() {
    let g = engine_wgpu::open_gpu(&GpuOptions::default()).unwrap();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) / 13.0).collect();
    let w: Vec<f16> = (0..n * k)
        .map(|i| f16::from_f32(((i * 5 % 11) as f32) / 11.0))
        .collect();
    let x = g.upload(HostData::F32(&x), Shape::from([m, k])).unwrap();
    let w = g.upload(HostData::F16(&w), Shape::from([n, k])).unwrap();
    for i in 0..3 {
        let t = Instant::now();
        let y = g.linear(&x, &w, None).unwrap();
        g.sync().unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "rep {i}: {s:.4} s  {:.2} GFLOP/s  {:.2} GB/s",
            2.0 * (m * n * k) as f64 / s * 1e-9,
            (n * k * 2) as f64 / s * 1e-9
        );
        drop(y);
    }
}

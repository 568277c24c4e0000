//! Compares wgpu attention with the CPU reference over a few shapes (debugging aid).
use engine_core::{AttentionMask, AttentionParams, Backend, CpuBackend, HostData, Shape};

fn main() -> Result<(), engine_core::Error> {
    let g = engine_wgpu::open_gpu(&Default::default())?;
    let c = CpuBackend::new();
    for (sq, kv, h, d, causal) in [(33usize, 470usize, 1usize, 64usize, false), (1, 470, 1, 64, false), (2, 470, 1, 64, false), (2, 2000, 1, 64, false), (2, 2000, 1, 8, false), (2, 450, 1, 64, false)] {
        let mut s = 12345u64 + kv as u64 * 7;
        let mut rnd = |n: usize, a: f32| -> Vec<f32> { (0..n).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * a }).collect() };
        let (q, k, v) = (rnd(sq * h * d, 2.0), rnd(kv * h * d, 2.0), rnd(kv * h * d, 1.0));
        let p = AttentionParams { num_heads: h, num_kv_heads: h, head_dim: d, scale: 1.0 / (d as f32).sqrt(), causal, q_offset: if causal { kv - sq } else { 0 }, kv_len: kv, mask: AttentionMask::None };
        let run = |b: &dyn Backend| -> Result<Vec<f32>, engine_core::Error> {
            let q = b.upload(HostData::F32(&q), Shape::from([sq, h * d]))?;
            let k = b.upload(HostData::F32(&k), Shape::from([kv, h * d]))?;
            let v = b.upload(HostData::F32(&v), Shape::from([kv, h * d]))?;
            b.to_vec_f32(&b.attention(&q, &k, &v, &p)?)
        };
        let (a, bb) = (run(&*g)?, run(&c)?);
        // f64 reference (non-causal, no mask).
        let mut r64 = vec![0f64; sq * h * d];
        for i in 0..sq { for hh in 0..h {
            let sc: Vec<f64> = (0..kv).map(|j| (0..d).map(|e| q[i*h*d+hh*d+e] as f64 * k[j*h*d+hh*d+e] as f64).sum::<f64>() * p.scale as f64).collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|x| (x-mx).exp()).sum();
            for e in 0..d { r64[i*h*d+hh*d+e] = (0..kv).map(|j| (sc[j]-mx).exp()/z * v[j*h*d+hh*d+e] as f64).sum(); }
        }}
        let eg = a.iter().zip(&r64).map(|(x, y)| (*x as f64 - y).abs()).fold(0f64, f64::max);
        let ec = bb.iter().zip(&r64).map(|(x, y)| (*x as f64 - y).abs()).fold(0f64, f64::max);
        println!("  vs f64: gpu {eg:e} cpu {ec:e}");
        if eg > 1e-3 && sq == 2 {
            // Which key subset does the GPU's row 0 / head 0 match? Try dropping one 16-key tile,
            // or keeping only a prefix.
            let sc: Vec<f64> = (0..kv).map(|j| (0..d).map(|e| q[e] as f64 * k[j*h*d+e] as f64).sum::<f64>() * p.scale as f64).collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let argmx = sc.iter().position(|&x| x == mx).unwrap_or(0);
            println!("  max score {mx} at key {argmx}; top scores: {:?}", { let mut v: Vec<(usize, f64)> = sc.iter().cloned().enumerate().collect(); v.sort_by(|a, b| b.1.total_cmp(&a.1)); v.truncate(5); v });
            let att = |keep: &dyn Fn(usize) -> bool| -> f64 {
                let z: f64 = (0..kv).filter(|&j| keep(j)).map(|j| (sc[j]-mx).exp()).sum();
                (0..kv).filter(|&j| keep(j)).map(|j| (sc[j]-mx).exp()/z * v[j*h*d] as f64).sum()
            };
            println!("  gpu[0] = {}, full = {}", a[0], att(&|_| true));
            for t in 0..kv.div_ceil(16) { let x = att(&|j| j / 16 != t); if (x - a[0] as f64).abs() < 1e-5 { println!("  matches dropping tile {t}"); } }
            for n in 1..=kv { let x = att(&|j| j < n); if (x - a[0] as f64).abs() < 1e-5 { println!("  matches prefix {n}"); } }
        }
        let err = a.iter().zip(&bb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let bad: Vec<usize> = (0..a.len()).filter(|&i| (a[i] - bb[i]).abs() > 1e-4).collect();
        let rows: std::collections::BTreeSet<usize> = bad.iter().map(|i| i / (h * d)).collect();
        let cols: std::collections::BTreeSet<usize> = bad.iter().map(|i| i % (h * d)).collect();
        println!("sq={sq} kv={kv} causal={causal}: max err {err:e}, {} bad, rows {:?}, cols {:?}", bad.len(), rows.iter().take(10).collect::<Vec<_>>(), cols.iter().take(10).collect::<Vec<_>>());
    }
    Ok(())
}

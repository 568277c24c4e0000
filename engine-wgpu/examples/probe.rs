use engine_core::{Backend, CpuBackend, HostData, Shape};
use engine_wgpu::GpuOptions;
use half::f16;
fn main() {
    for (nf, ns) in [(false, true), (true, false), (false, false)] {
        let g = engine_wgpu::open_gpu(&GpuOptions { no_f16: nf, no_subgroups: ns, ..Default::default() }).unwrap();
        for (m, k, n) in [(1usize, 4096usize, 64usize), (1, 64, 4), (1, 512, 4), (2, 512, 4)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) / 13.0).collect();
            let w: Vec<f16> = (0..n * k).map(|i| f16::from_f32(((i * 5 % 11) as f32) / 11.0)).collect();
            let c = CpuBackend::new();
            let want = c.to_vec_f32(&c.linear(&c.upload(HostData::F32(&x), Shape::from([m, k])).unwrap(), &c.upload(HostData::F16(&w), Shape::from([n, k])).unwrap(), None).unwrap()).unwrap();
            let got = g.to_vec_f32(&g.linear(&g.upload(HostData::F32(&x), Shape::from([m, k])).unwrap(), &g.upload(HostData::F16(&w), Shape::from([n, k])).unwrap(), None).unwrap()).unwrap();
            println!("no_f16={nf} no_sg={ns} m={m} k={k} n={n}: got {:?} want {:?}", &got[..2], &want[..2]);
        }
    }
}

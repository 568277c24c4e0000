//! Kernel lab for matmul tuning on one adapter without rebuilding: times WGSL files read at run
//! time (preprocessed: no `#include`/`#gen`) side by side with the FMA peak, interleaved, and
//! checks 2000 sampled outputs against an f64 sum. Kernels get bindings 0 uniform
//! (m, k, rows, n, n_off, 0, 0, 0), 1 x f32 [M, K], 2 w f16 packed [N, K], 4 y f32 [M, N].
//! - `gemm_lab M K N REPS FILE:TM:TN[:n] ...`: grid (ceil(M / TM), ceil(N / TN)), or N along x
//!   with `:n`; prints the best of REPS per kernel. `PEAKS=file:entry:flop,...` adds peak
//!   kernels (FLOP per invocation per loop step; 256 groups of 256, 1024 steps). Also
//!   prints each kernel's CPU time per run (all threads; on llvmpipe the work itself),
//!   which a busy machine disturbs far less than the wall time.
//! - `gemm_lab --dump KERNEL [FLAGS...] [NAME=VALUE...]`: prints a kernel of the shaders crate
//!   preprocessed, e.g. `--dump gemm_sg8 > /tmp/g.wgsl` to start from the shipped one, or
//!   `--dump gemv_sg8 W16 M=4`.

use std::time::Instant;

use half::f16;
use wgpu::util::DeviceExt;

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

/// This process's CPU time (all threads, user + system) in clock ticks, from /proc (0
/// elsewhere): summed over many runs it times a kernel on a machine busy with other work,
/// where the best wall time of a few runs is noise.
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--dump") {
        // FLAGS are names; NAME=VALUE substitutes {{NAME}} (e.g. M=4 for gemv_sg8).
        let (subs, flags): (Vec<&String>, Vec<&String>) =
            args[3..].iter().partition(|a| a.contains('='));
        let flags: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
        let subs: Vec<(&str, String)> = subs
            .iter()
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        println!(
            "{}",
            shaders::build(&args[2], &flags, &subs).expect("kernel")
        );
        return;
    }
    let instance = {
        let mut d = wgpu::InstanceDescriptor::new_without_display_handle();
        d.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        wgpu::Instance::new(d)
    };
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        ..Default::default()
    }))
    .expect("adapter");
    let feats = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: None,
        required_features: feats,
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .expect("device");
    let p = |i: usize| args[i].parse::<usize>().expect("number");
    let (m, k, n, reps) = (p(1), p(2), p(3), p(4));
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let compile = |path: &str, entry: &str| {
        let src = std::fs::read_to_string(path).expect("read wgsl");
        let module = unsafe {
            device.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor {
                    label: None,
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                },
                wgpu::ShaderRuntimeChecks::unchecked(),
            )
        };
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let run = |pipe: &wgpu::ComputePipeline, bg: &wgpu::BindGroup, grid: [u32; 3]| {
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipe);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        let t = Instant::now();
        queue.submit([enc.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        t.elapsed().as_secs_f64()
    };
    let buf = |data: &[u8], usage| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: data,
            usage,
        })
    };
    // Peak: the shipped bench.wgsl peak_fma, 256 groups of 256, 1024 steps, 64 FLOP each.
    let bench = std::env::temp_dir().join("gemm_lab_bench.wgsl");
    std::fs::write(&bench, shaders::build("bench", &[], &[]).expect("bench")).expect("write");
    let bench = bench.to_string_lossy().to_string();
    // PEAKS="file:entry:flop_per_invocation_iteration,...": more peak kernels, timed alike.
    let spec = std::env::var("PEAKS").unwrap_or_default();
    let mut peaks = vec![(bench.clone(), "peak_fma".to_string(), 64.0)];
    for e in spec.split(',').filter(|e| !e.is_empty()) {
        let f: Vec<&str> = e.split(':').collect();
        peaks.push((f[0].into(), f[1].into(), f[2].parse().expect("flop")));
    }
    let peak = compile(&bench, "peak_fma");
    let pu = buf(
        bytemuck::cast_slice(&[1024u32, 0, 0, 0]),
        wgpu::BufferUsages::UNIFORM,
    );
    let sink = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 256 * 256 * 16,
        usage,
        mapped_at_creation: false,
    });
    let pbg = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &peak.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: pu.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: sink.as_entire_binding(),
            },
        ],
    });
    let x = values(m * k, 7);
    let w: Vec<f16> = values(n * k, 11).into_iter().map(f16::from_f32).collect();
    let xb = buf(bytemuck::cast_slice(&x), usage);
    let wb = buf(bytemuck::cast_slice(&w), usage);
    let yb = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (m * n * 4) as u64,
        usage,
        mapped_at_creation: false,
    });
    let ub = buf(
        bytemuck::cast_slice(&[m as u32, k as u32, n as u32, n as u32, 0, 0, 0, 0]),
        wgpu::BufferUsages::UNIFORM,
    );
    let mut ks = Vec::new();
    for spec in &args[5..] {
        let f: Vec<&str> = spec.split(':').collect();
        let tc = Instant::now();
        let pipe = compile(f[0], "main");
        let (tm, tn): (usize, usize) = (f[1].parse().expect("tm"), f[2].parse().expect("tn"));
        let grid = if f.get(3) == Some(&"n") {
            [n.div_ceil(tn) as u32, m.div_ceil(tm) as u32, 1]
        } else {
            [m.div_ceil(tm) as u32, n.div_ceil(tn) as u32, 1]
        };
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ub.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: xb.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wb.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: yb.as_entire_binding(),
                },
            ],
        });
        run(&pipe, &bg, grid);
        println!(
            "{}: compile + first run {:.2}s",
            f[0],
            tc.elapsed().as_secs_f64()
        );
        let bad = check(&device, &queue, &yb, &x, &w, m, k, n);
        ks.push((f[0].to_string(), pipe, bg, grid, f64::INFINITY, bad));
    }
    let mut pks: Vec<_> = peaks
        .iter()
        .map(|(f, e, fl)| {
            let pp = compile(f, e);
            let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pp.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: pu.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: sink.as_entire_binding(),
                    },
                ],
            });
            run(&pp, &bg, [256, 1, 1]);
            (e.clone(), pp, bg, *fl, f64::INFINITY)
        })
        .collect();
    drop(pbg);
    let mut tp = f64::INFINITY;
    let mut cpu = vec![0u64; ks.len()];
    for _ in 0..reps {
        for q in pks.iter_mut() {
            q.4 = q.4.min(run(&q.1, &q.2, [256, 1, 1]));
        }
        tp = pks[0].4;
        for (i, kk) in ks.iter_mut().enumerate() {
            let c0 = cpu_ticks();
            kk.4 = kk.4.min(run(&kk.1, &kk.2, kk.3));
            cpu[i] += cpu_ticks() - c0;
        }
    }
    let pk = 256.0 * 256.0 * 1024.0 * 64.0 / tp * 1e-9;
    println!("peak {pk:.2} GFLOP/s; m={m} k={k} n={n}");
    for q in &pks {
        println!(
            "  {:<12} {:.2} GFLOP/s",
            q.0,
            256.0 * 256.0 * 1024.0 * q.3 / q.4 * 1e-9
        );
    }
    for (kk, c) in ks.iter().zip(&cpu) {
        let g = 2.0 * (m * n * k) as f64 / kk.4 * 1e-9;
        // Clock ticks are 10 ms on Linux.
        println!(
            "{:<28} {:.3}s {g:6.2} GFLOP/s {:5.1}% of peak  bad {}  cpu {:.2} ms/run",
            kk.0,
            kk.4,
            100.0 * g / pk,
            kk.5,
            *c as f64 * 10.0 / reps.max(1) as f64
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    yb: &wgpu::Buffer,
    x: &[f32],
    w: &[f16],
    m: usize,
    k: usize,
    n: usize,
) -> usize {
    let rb = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (m * n * 4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(yb, 0, &rb, 0, (m * n * 4) as u64);
    queue.submit([enc.finish()]);
    rb.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let y: Vec<f32> =
        bytemuck::cast_slice::<u8, f32>(&rb.slice(..).get_mapped_range().expect("map")).to_vec();
    let mut bad = 0;
    let mut s = 12345u64;
    for t in 0..2000 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (r, c) = if t < 4 {
            (
                if t % 2 == 0 { 0 } else { m - 1 },
                if t / 2 % 2 == 0 { 0 } else { n - 1 },
            )
        } else {
            ((s >> 33) as usize % m, (s >> 13) as usize % n)
        };
        let want: f64 = (0..k)
            .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i].to_f32()))
            .sum();
        let got = f64::from(y[r * n + c]);
        if (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
            if bad < 3 {
                println!("row {r} col {c}: got {got} want {want}");
            }
            bad += 1;
        }
    }
    bad
}

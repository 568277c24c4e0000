//! Compiles one kernel on the selected adapter and reports the time and the process's peak
//! resident memory, for bisecting driver compiler failures (SwiftShader, issue 25):
//! `compile KERNEL [FLAG ...] [NAME=VALUE ...]` (substitutions default to the kernel's
//! representative values), or `compile --file PATH` for a WGSL file as it stands.
//! Entry point `main`; `WGPU_BACKEND`/`VISI_ADAPTER`-style selection by the first adapter of
//! the backends wgpu enables. `DUMP=1` prints the preprocessed WGSL instead.

use std::time::Instant;

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(first) = args.first() else {
        eprintln!("error: usage: compile KERNEL [FLAG ...] [NAME=VALUE ...] | --file PATH");
        std::process::exit(2);
    };
    let src = if first == "--file" {
        let Some(path) = args.get(1) else {
            eprintln!("error: --file needs a path");
            std::process::exit(2);
        };
        std::fs::read_to_string(path).unwrap_or_else(|e| {
            eprintln!("error: {path}: {e}");
            std::process::exit(2);
        })
    } else {
        let Some(k) = shaders::kernel(first) else {
            eprintln!("error: unknown kernel {first}");
            std::process::exit(2);
        };
        let mut flags = Vec::new();
        let mut subs: Vec<(&str, String)> =
            k.subs.iter().map(|(n, v)| (*n, v.to_string())).collect();
        for a in &args[1..] {
            if let Some((n, v)) = a.split_once('=') {
                match subs.iter_mut().find(|(s, _)| *s == n) {
                    Some(s) => s.1 = v.to_string(),
                    None => {
                        let n: &'static str = Box::leak(n.to_string().into_boxed_str());
                        subs.push((n, v.to_string()));
                    }
                }
            } else {
                flags.push(a.as_str());
            }
        }
        shaders::build(first, &flags, &subs).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2);
        })
    };
    if std::env::var_os("DUMP").is_some() {
        print!("{src}");
        return;
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(desc_backends()));
    let Some(adapter) = adapters.first() else {
        eprintln!("error: no adapter");
        std::process::exit(1);
    };
    let mut features = wgpu::Features::empty();
    if src.contains("enable f16") {
        features |= wgpu::Features::SHADER_F16;
    }
    if src.contains("subgroup") {
        features |= wgpu::Features::SUBGROUP;
    }
    let (device, _queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: features & adapter.features(),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .unwrap_or_else(|e| {
        eprintln!("error: cannot open a device: {e}");
        std::process::exit(1);
    });
    println!(
        "{} ({} lines of WGSL), peak RSS before {} MB",
        adapter.get_info().name,
        src.lines().count(),
        peak_rss_kb() / 1024
    );
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let t = Instant::now();
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let _pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let err = pollster::block_on(scope.pop());
    println!(
        "compiled in {:.2} s, peak RSS {} MB{}",
        t.elapsed().as_secs_f64(),
        peak_rss_kb() / 1024,
        err.map(|e| format!(", error: {e}")).unwrap_or_default()
    );
}

fn desc_backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

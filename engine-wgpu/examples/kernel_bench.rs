//! Prints the kernel benchmark's JSON: `cargo run --release -p engine-wgpu --example
//! kernel_bench [-- --quick]` (the CLI's `bench-kernels` runs the same function).

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    match engine_wgpu::bench::kernel_bench(&engine_wgpu::GpuOptions::default(), quick) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(e) => {
            eprintln!("kernel bench failed: {e}");
            std::process::exit(1);
        }
    }
}

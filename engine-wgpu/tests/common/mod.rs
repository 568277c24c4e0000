//! Helpers shared by the wgpu integration tests: one backend per option set, opened once
//! per test binary; without an adapter a test prints SKIP and passes, unless `CI` is set.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::sync::{Arc, OnceLock};

use engine_core::Backend;
use engine_wgpu::{GpuBackend, GpuOptions};

/// The backend for `opts`, opened once into `slot` (None: no adapter, outside CI).
pub fn backend(
    opts: GpuOptions,
    slot: &'static OnceLock<Option<Arc<GpuBackend>>>,
) -> Option<Arc<GpuBackend>> {
    slot.get_or_init(|| match engine_wgpu::open_gpu(&opts) {
        Ok(g) => {
            let i = g.device_info();
            // Straight to stderr, past libtest's capture, so every CI log names the adapter.
            let _ = writeln!(
                std::io::stderr(),
                "wgpu parity tests on adapter: {} ({}, {}, f16 {}, subgroups {}, binding {} B)",
                i.adapter,
                i.api,
                i.device_type,
                i.shader_f16,
                i.subgroups,
                i.max_binding_size
            );
            Some(g)
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("no wgpu adapter and CI is set: {e}");
            }
            println!("SKIP: no wgpu adapter ({e})");
            None
        }
    })
    .clone()
    .inspect(|g| println!("adapter: {}", g.device_info().adapter))
}

/// The default backend (f16 and subgroups where the adapter has them).
pub fn gpu() -> Option<Arc<GpuBackend>> {
    static G: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    backend(GpuOptions::default(), &G)
}

/// A 64 KiB binding limit: tensors above it are split by rows.
pub fn gpu_small_binding() -> Option<Arc<GpuBackend>> {
    static G: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    backend(
        GpuOptions {
            max_binding_override: Some(64 << 10),
            ..Default::default()
        },
        &G,
    )
}

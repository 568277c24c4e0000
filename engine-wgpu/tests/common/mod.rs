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

/// Seeded xorshift values in [lo, hi).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
    pub fn below(&mut self, n: u32) -> u32 {
        ((self.next() * n as f32) as u32).min(n - 1)
    }
}

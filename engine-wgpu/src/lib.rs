//! The wgpu backend of visi (Vulkan, Metal, DX12, GL).
//!
//! Public contract used by `models`, `cli` and `tests` (kept stable while the internals grow):
//! - [`GpuOptions`]: how to pick an adapter.
//! - [`open`]: builds the GPU backend as an `Arc<dyn Backend>`.
//! - [`list_adapters`]: every adapter wgpu sees, and which one `auto` picks.
//! - [`bench::kernel_bench`]: the kernel benchmark (GFLOP/s, GB/s, measured peaks) as JSON.

use std::sync::Arc;

use engine_core::{Backend, Error, Result};
use serde::Serialize;

/// How to choose an adapter.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// `--device gpu`: refuse software (CPU-type) adapters such as lavapipe.
    pub require_gpu: bool,
    /// Adapter name substring or index (as listed by [`list_adapters`]); `None` reads the
    /// `VISI_ADAPTER` environment variable, and without it picks the best adapter
    /// (discrete, then integrated, then other, software last).
    pub adapter: Option<String>,
}

/// One adapter as wgpu reports it, with the limits and features the engine uses.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    pub index: usize,
    pub name: String,
    /// `vulkan`, `metal`, `dx12`, `gl`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu`, `other`.
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub shader_f16: bool,
    pub subgroups: bool,
    /// Whether `--device auto` (with the current `VISI_ADAPTER`) picks this adapter.
    pub auto_pick: bool,
}

/// Opens the GPU backend on the adapter `opts` selects.
pub fn open(opts: &GpuOptions) -> Result<Arc<dyn Backend>> {
    let _ = opts;
    Err(Error::NoAdapter("the wgpu backend is not built yet".into()))
}

/// Every adapter wgpu sees.
pub fn list_adapters() -> Vec<AdapterReport> {
    Vec::new()
}

pub mod bench {
    //! The kernel benchmark.
    use super::*;

    /// Runs the kernel benchmark on the adapter `opts` selects: achieved GFLOP/s and GB/s
    /// of `linear` for the LLaVA-7B shapes (M = 1 and M = 640; K×N = 4096×4096,
    /// 4096×11008, 11008×4096, f16 weights) and the adapter's measured peaks (a pure-FMA
    /// kernel and a pure-copy kernel). `quick` shrinks repetitions (for tests).
    pub fn kernel_bench(opts: &GpuOptions, quick: bool) -> Result<serde_json::Value> {
        let _ = (opts, quick);
        Err(Error::NoAdapter("the wgpu backend is not built yet".into()))
    }
}

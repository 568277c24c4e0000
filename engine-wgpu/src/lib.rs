//! The wgpu backend of visi (Vulkan, Metal, DX12, GL).
//!
//! Public contract used by `models`, `cli` and `tests` (kept stable while the internals grow):
//! - [`GpuOptions`]: how to pick an adapter.
//! - [`open`]: builds the GPU backend as an `Arc<dyn Backend>`.
//! - [`list_adapters`]: every adapter wgpu sees, and which one `auto` picks.
//! - [`bench::kernel_bench`]: the kernel benchmark (GFLOP/s, GB/s, measured peaks) as JSON.
//! - [`tune::tune`]: times the kernel variants per shape class and caches the winners.
//! - [`open_gpu`] / [`GpuBackend`] / [`GpuStorage`]: the concrete types, for tests and benches.
//!
//! Design: every kernel is WGSL from the `shaders` crate, compiled once per
//! `PipelineKey` (kernel, entry, flags, substitutions, override constants). Ops record into one
//! command encoder with a per-batch uniform arena and submit only at `to_vec_*`/`sync` or when a
//! batch grows large; output buffers come from a size-class pool that freed tensors return to.
//! Weights stay f16 on the device (packed two per u32; loaded natively under `shader-f16`),
//! or block-quantized (`Backend::upload_quant`: GGUF's Q8_0/Q4_0/Q4_1/Q4_K blocks as raw
//! bytes, dequantised inside `gemv_q`/`gemm_q`/`embedding_q`), activations f32. Tensors above the storage-binding limit are split by rows over several
//! buffers (`linear`, `embedding` and `to_vec_*` stream the chunks).
//!
//! Software adapters: llvmpipe (lavapipe) stops any loop nest after 65535 iterations per
//! invocation without an error, so prefill attention walks long caches in several dispatches
//! there (running softmax state carried in a scratch buffer); other kernels stay far below it.
//! llvmpipe also runs a subgroup as one 8-lane SIMD vector and splits every non-uniform load
//! into 8 scalar loads, so `linear` with f16 weights (K % 8 == 0) takes `gemm_sg8`/`gemv_sg8`
//! on CPU adapters whose subgroups are exactly 8 wide: each value loaded once per subgroup and
//! shared by `subgroupBroadcast` (3-4x faster there than the tiled kernels, which GPUs keep);
//! quantized weights likewise take `gemm_q_sg8`/`gemv_q_sg8` there. As each loaded element
//! costs more than the FMAs it feeds, `gemm_sg8` keeps a 32 × 16 block of accumulators per
//! lane (64 × 128 per workgroup; generated, see shaders::GEMM_SG8_TILE). Attention there (head
//! sizes a multiple of 64) is the same design twice: `attn_qk_sg8` writes the scores of 32
//! queries × 128 keys per subgroup into a score buffer, `attn_pv_sg8` makes them probabilities
//! (masks included) and multiplies by V, 32 queries × the head's columns per subgroup.
//!
//! Environment: `VISI_ADAPTER` (name substring or index), `WGPU_BACKEND` (e.g. `vulkan`),
//! `VISI_CHECKED_SHADERS=1` (keep naga's bounds checks in the matmul kernels too),
//! `VISI_NO_SG8=1` (keep the tiled matmuls on software adapters too, for comparisons),
//! `VISI_ATTN` (force a prefill attention variant, as [`GpuOptions::prefill_variant`]),
//! `VISI_CACHE_DIR` (where [`tune`] caches its choices).

// `is_multiple_of` is newer than the workspace MSRV (1.85).

mod backend;
pub mod bench;
mod ctx;
mod ops;
pub mod tune;
mod uniforms;
mod variants;

use std::sync::{Arc, Mutex, MutexGuard};

use engine_core::{Backend, DeviceInfo, Error, Result};
use serde::Serialize;

pub use backend::GpuBackend;
pub use ops::GpuStorage;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the data stays
/// consistent: every critical section here leaves it valid at each step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How to choose an adapter, plus test knobs that force the portable fallbacks.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Refuse software (CPU-type) adapters such as lavapipe. (`--device gpu` accepts
    /// them: it is how a user, and the test suite, runs the wgpu backend on one.)
    pub require_gpu: bool,
    /// Adapter name substring or index (as listed by [`list_adapters`]); `None` reads the
    /// `VISI_ADAPTER` environment variable, and without it picks the best adapter
    /// (discrete, then integrated, then other, software last).
    pub adapter: Option<String>,
    /// Do not use `shader-f16` even where the adapter has it (tests the fallback).
    pub no_f16: bool,
    /// Do not use subgroup operations even where the adapter has them (tests the fallback).
    pub no_subgroups: bool,
    /// Do not use timestamp queries (the benchmark falls back to wall-clock time).
    pub no_timestamps: bool,
    /// Caps the storage-binding size below the adapter's (tests tensor splitting).
    pub max_binding_override: Option<u64>,
    /// Forces the prefill attention variant (`tiled:BQ,BK,TPR` or `keys:BQ,WG`, see
    /// [`tune`]) over the tuned one and the default (tests every variant); one that does not
    /// parse or fit the adapter is ignored.
    pub prefill_variant: Option<String>,
}

/// One adapter as wgpu reports it, with the limits and features the engine uses.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    /// Position in the list (usable as `GpuOptions::adapter` / `VISI_ADAPTER`).
    pub index: usize,
    /// Adapter name as the driver reports it.
    pub name: String,
    /// `vulkan`, `metal`, `dx12`, `gl`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu`, `other`.
    pub device_type: String,
    /// Driver name (e.g. `llvmpipe`, `NVIDIA`).
    pub driver: String,
    /// Driver version details.
    pub driver_info: String,
    /// Largest buffer the adapter allows, in bytes.
    pub max_buffer_size: u64,
    /// Largest storage binding the adapter allows, in bytes (tensors above it are split).
    pub max_storage_buffer_binding_size: u64,
    /// Whether the adapter has `shader-f16` (native f16 weight loads).
    pub shader_f16: bool,
    /// Whether the adapter has subgroup operations (used in row reductions).
    pub subgroups: bool,
    /// Whether `--device auto` (with the current `VISI_ADAPTER`) picks this adapter. It
    /// never picks a software adapter unless `VISI_ADAPTER` names it: the CPU backend is
    /// faster than a software rasterizer.
    pub auto_pick: bool,
    /// Whether `--device gpu` (the best adapter, software ones last) picks this adapter.
    pub gpu_pick: bool,
}

/// What `--device auto` runs on.
pub enum Auto {
    /// The wgpu backend on a hardware adapter (or the one `VISI_ADAPTER` names).
    Gpu(Arc<dyn Backend>),
    /// The CPU backend; the reason, in words, for one stderr line.
    Cpu(String),
}

/// `--device auto`: a hardware adapter when there is one (or whichever `VISI_ADAPTER`
/// names, software included), else the CPU backend with the reason. Errors only when the
/// chosen adapter cannot be opened or `VISI_ADAPTER` matches nothing.
pub fn open_auto() -> Result<Auto> {
    let instance = instance();
    let adapters = pollster::block_on(instance.enumerate_adapters(backends()));
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    match auto_pick(&infos)? {
        Some(i) => Ok(Auto::Gpu(open_adapter(
            &adapters[i],
            &infos[i],
            &GpuOptions::default(),
        )?)),
        None => Ok(Auto::Cpu(cpu_reason(&infos))),
    }
}

/// `VISI_ADAPTER`, when set and not blank. A value that is not UTF-8 is an error naming
/// the variable: it can name no adapter, and ignoring it would run elsewhere than asked.
pub fn adapter_env() -> Result<Option<String>> {
    match std::env::var("VISI_ADAPTER") {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::Msg(format!(
            "VISI_ADAPTER {v:?} is not valid UTF-8 (give an adapter index or a name substring)"
        ))),
    }
}

/// `--device auto`'s adapter: `VISI_ADAPTER`'s when set, else the best hardware adapter;
/// `None` when there is no hardware adapter (software rasterizers such as llvmpipe/lavapipe,
/// SwiftShader or WARP report `DeviceType::Cpu` and lose to the CPU backend).
fn auto_pick(infos: &[wgpu::AdapterInfo]) -> Result<Option<usize>> {
    if adapter_env()?.is_some() {
        return pick(infos, &GpuOptions::default()).map(Some);
    }
    Ok((0..infos.len())
        .filter(|&i| infos[i].device_type != wgpu::DeviceType::Cpu)
        .min_by_key(|&i| rank(infos[i].device_type)))
}

/// Why `--device auto` runs on the CPU backend, given the adapters wgpu lists.
fn cpu_reason(infos: &[wgpu::AdapterInfo]) -> String {
    if infos.is_empty() {
        return "wgpu sees no adapter".into();
    }
    software_only(infos.iter().map(|a| a.name.as_str()))
}

fn software_only<'a>(names: impl Iterator<Item = &'a str>) -> String {
    format!(
        "only software adapters ({}), which the CPU backend outruns (--device gpu or \
         VISI_ADAPTER selects one)",
        names.collect::<Vec<_>>().join(", ")
    )
}

/// Opens the GPU backend on the adapter `opts` selects.
pub fn open(opts: &GpuOptions) -> Result<Arc<dyn Backend>> {
    Ok(open_gpu(opts)?)
}

/// Opens the GPU backend as its concrete type (for tests and the benchmark).
pub fn open_gpu(opts: &GpuOptions) -> Result<Arc<GpuBackend>> {
    let instance = instance();
    let adapters = pollster::block_on(instance.enumerate_adapters(backends()));
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let i = pick(&infos, opts)?;
    open_adapter(&adapters[i], &infos[i], opts)
}

/// Opens the GPU backend on `adapter` (whose info is `ai`).
fn open_adapter(
    adapter: &wgpu::Adapter,
    ai: &wgpu::AdapterInfo,
    opts: &GpuOptions,
) -> Result<Arc<GpuBackend>> {
    let feats = adapter.features();
    let f16 = feats.contains(wgpu::Features::SHADER_F16) && !opts.no_f16;
    let subgroups = feats.contains(wgpu::Features::SUBGROUP) && !opts.no_subgroups;
    let timestamps = feats.contains(wgpu::Features::TIMESTAMP_QUERY) && !opts.no_timestamps;
    // Cooperative matrices: wgpu exposes 8×8×8 f32 tiles; only where the adapter lists that
    // configuration (and not with VISI_NO_COOP). gemm_coop is then kept only if the parity
    // check below passes.
    let coop = feats.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        && std::env::var_os("VISI_NO_COOP").is_none()
        && adapter.cooperative_matrix_properties().iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (8, 8, 8)
                && c.ab_type == wgpu::CooperativeScalarType::F32
                && c.cr_type == wgpu::CooperativeScalarType::F32
        });
    let mut features = wgpu::Features::empty();
    features.set(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, coop);
    features.set(wgpu::Features::SHADER_F16, f16);
    features.set(wgpu::Features::SUBGROUP, subgroups);
    features.set(wgpu::Features::TIMESTAMP_QUERY, timestamps);
    // Everything the adapter allows: big buffers and bindings, workgroup memory.
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("visi"),
        required_features: features,
        required_limits: limits.clone(),
        // SAFETY (wgpu's terms for experimental features): only EXPERIMENTAL_COOPERATIVE_MATRIX
        // is requested, and only where the adapter reports it; its one kernel is checked
        // against the tiled gemm before use.
        experimental_features: if coop {
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        },
        ..Default::default()
    }))
    .map_err(|e| Error::NoAdapter(format!("{}: cannot open a device: {e}", ai.name)))?;
    let mut max_binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    if let Some(cap) = opts.max_binding_override {
        max_binding = max_binding.min(cap.max(256));
    }
    let info = DeviceInfo {
        backend: "wgpu".into(),
        adapter: ai.name.clone(),
        api: api_name(ai.backend),
        device_type: type_name(ai.device_type),
        max_buffer_size: limits.max_buffer_size,
        max_binding_size: max_binding,
        shader_f16: f16,
        subgroups,
    };
    let mut ctx = ctx::Ctx::new(device, queue, info, f16, subgroups, timestamps, &limits);
    // Tuned variants are per adapter, driver (version) and backend.
    ctx.tuning = variants::Tuning::load(format!(
        "{} | {} {} | {}",
        ai.name,
        ai.driver,
        ai.driver_info,
        api_name(ai.backend)
    ));
    ctx.tuning.forced = opts
        .prefill_variant
        .clone()
        .or_else(|| std::env::var("VISI_ATTN").ok());
    // The `*_sg8` matmuls broadcast with constant lanes 0..8: only where every subgroup is
    // exactly 8 wide, and only on CPU adapters (on GPUs the tiled kernels are the right shape).
    ctx.sg8_cpu = subgroups
        && ai.device_type == wgpu::DeviceType::Cpu
        && ai.subgroup_min_size == 8
        && ai.subgroup_max_size == 8
        && std::env::var_os("VISI_NO_SG8").is_none();
    let g = Arc::new(GpuBackend::new(Arc::new(ctx)));
    if coop {
        g.enable_coop_if_exact();
    }
    Ok(g)
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

/// Vulkan, Metal, DX12 (or `WGPU_BACKEND`); GL lacks what the kernels need on many drivers.
fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

fn api_name(b: wgpu::Backend) -> String {
    match b {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        _ => "other",
    }
    .into()
}

fn type_name(t: wgpu::DeviceType) -> String {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
    .into()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The adapter `opts` (or `VISI_ADAPTER`) asks for, else the best by device type.
fn pick(infos: &[wgpu::AdapterInfo], opts: &GpuOptions) -> Result<usize> {
    const HINT: &str = "run with `--device cpu` to use the CPU backend";
    if infos.is_empty() {
        return Err(Error::NoAdapter(format!("wgpu sees no adapter; {HINT}")));
    }
    let wanted = match opts.adapter.clone() {
        Some(a) => Some(a),
        None => adapter_env()?,
    };
    let ok = |i: usize| !opts.require_gpu || infos[i].device_type != wgpu::DeviceType::Cpu;
    if let Some(w) = wanted.filter(|w| !w.trim().is_empty()) {
        let w = w.trim();
        let found = match w.parse::<usize>() {
            Ok(i) if i < infos.len() => Some(i),
            _ => {
                let lw = w.to_lowercase();
                infos
                    .iter()
                    .position(|a| a.name.to_lowercase().contains(&lw))
            }
        };
        return match found {
            Some(i) if ok(i) => Ok(i),
            Some(i) => Err(Error::NoAdapter(format!(
                "adapter `{}` is a software (CPU) adapter and a GPU is required; {HINT}",
                infos[i].name
            ))),
            None => Err(Error::NoAdapter(format!(
                "no adapter matches `{w}` (have: {}); {HINT}",
                infos
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        };
    }
    (0..infos.len())
        .filter(|&i| ok(i))
        .min_by_key(|&i| rank(infos[i].device_type))
        .ok_or_else(|| {
            Error::NoAdapter(format!(
                "only software (CPU) adapters are available; {HINT}"
            ))
        })
}

/// Why `--device auto` runs where it does, from [`list_adapters`]'s reports: one line.
pub fn auto_reason(list: &[AdapterReport]) -> String {
    match list.iter().find(|a| a.auto_pick) {
        Some(a) if adapter_env().is_ok_and(|w| w.is_some()) => {
            format!("VISI_ADAPTER selects adapter {} ({})", a.index, a.name)
        }
        Some(a) => format!(
            "adapter {} ({}) is a {} GPU",
            a.index, a.name, a.device_type
        ),
        None if list.is_empty() => "wgpu sees no adapter".into(),
        None => software_only(list.iter().map(|a| a.name.as_str())),
    }
}

/// Every adapter wgpu sees.
pub fn list_adapters() -> Vec<AdapterReport> {
    let instance = instance();
    let adapters = pollster::block_on(instance.enumerate_adapters(backends()));
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let auto = auto_pick(&infos).ok().flatten();
    let gpu = pick(&infos, &GpuOptions::default()).ok();
    adapters
        .iter()
        .zip(&infos)
        .enumerate()
        .map(|(index, (a, i))| {
            let l = a.limits();
            let f = a.features();
            AdapterReport {
                index,
                name: i.name.clone(),
                backend: api_name(i.backend),
                device_type: type_name(i.device_type),
                driver: i.driver.clone(),
                driver_info: i.driver_info.clone(),
                max_buffer_size: l.max_buffer_size,
                max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
                shader_f16: f.contains(wgpu::Features::SHADER_F16),
                subgroups: f.contains(wgpu::Features::SUBGROUP),
                auto_pick: auto == Some(index),
                gpu_pick: gpu == Some(index),
            }
        })
        .collect()
}

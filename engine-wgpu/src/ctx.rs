//! The device context: pipelines (compiled once, cached by [`PipelineKey`]), the buffer pool,
//! command batching with a per-batch uniform arena, readback, and error tracking.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use engine_core::{DeviceInfo, Error, Result};

/// Bytes per uniform slot: op parameters are at most this large (attention's: 64 bytes and
/// 16 mask rules of 32), and it is a multiple of every adapter's
/// `min_uniform_buffer_offset_alignment` (WebGPU caps it at 256).
pub(crate) const SLOT: u64 = 768;
/// Uniform slots per batch; a batch is submitted when they run out.
const SLOTS: u64 = 1024;
/// Compute passes per batch before it is submitted (keeps command buffers bounded).
const MAX_PASSES: u32 = 512;
/// Bytes the pool may keep idle before it frees buffers instead.
const POOL_CAP: u64 = 2 << 30;

/// Kernels compiled without naga's runtime bounds checks (they check their own bounds);
/// `VISI_CHECKED_SHADERS=1` turns the checks back on for debugging.
const UNCHECKED_KERNELS: &[&str] = &[
    "gemm",
    "gemv",
    "gemm_sg8",
    "gemv_sg8",
    "gemm_q",
    "gemv_q",
    "embedding_q",
    "gemm_q_sg8",
    "gemv_q_sg8",
    "attn_qk_sg8",
    "attn_pv_sg8",
];

pub(crate) use crate::lock;

/// What identifies a compiled pipeline: kernel file, entry point, preprocessor flags,
/// `{{NAME}}` substitutions and WGSL `override` constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub kernel: &'static str,
    pub entry: &'static str,
    pub flags: Vec<&'static str>,
    pub subs: Vec<(&'static str, u32)>,
    pub consts: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    pub fn new(kernel: &'static str, entry: &'static str) -> Self {
        PipelineKey {
            kernel,
            entry,
            flags: Vec::new(),
            subs: Vec::new(),
            consts: Vec::new(),
        }
    }
    pub fn flag(mut self, on: bool, f: &'static str) -> Self {
        if on {
            self.flags.push(f);
        }
        self
    }
    pub fn sub(mut self, name: &'static str, v: u32) -> Self {
        self.subs.push((name, v));
        self
    }
    pub fn konst(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, v));
        self
    }
}

/// A compiled pipeline and its (auto-derived) bind group layout.
pub(crate) struct Pipe {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// A storage binding: `binding` index, buffer, bytes bound from offset 0.
pub(crate) struct Bind<'a>(pub u32, pub &'a wgpu::Buffer, pub u64);

struct Timing {
    qs: wgpu::QuerySet,
    cap: u32,
    used: u32,
}

#[derive(Default)]
struct Batch {
    enc: Option<wgpu::CommandEncoder>,
    uniforms: Vec<u8>,
    passes: u32,
    timing: Option<Timing>,
}

/// Everything the backend shares with its tensors' storage.
pub(crate) struct Ctx {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: DeviceInfo,
    pub f16: bool,
    pub subgroups: bool,
    /// A software adapter whose subgroups are exactly 8 wide (llvmpipe with AVX2): `linear`
    /// takes the `*_sg8` kernels there.
    pub sg8_cpu: bool,
    /// `linear` (M above the gemv rows, f16/f32 weights) runs `gemm_coop` on the adapter's
    /// matrix units: set only where the adapter has cooperative matrices (8×8 f32) and the
    /// parity check at open passed.
    pub coop: std::sync::atomic::AtomicBool,
    pub timestamps: bool,
    pub max_buffer: u64,
    pub max_binding: u64,
    pub max_groups: u32,
    pub wg_storage: u32,
    /// Autotuned kernel variants of this adapter (see `tune`).
    pub tuning: crate::variants::Tuning,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipe>>>,
    pool: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
    batch: Mutex<Batch>,
    ubuf: wgpu::Buffer,
    errors: Arc<Mutex<Option<Error>>>,
    /// Bytes written through mapped-at-creation buffers since the last submission: wgpu
    /// keeps a staging copy of each until a submission has run, so loading a model without
    /// submitting would hold it twice in host memory (lavapipe: 2 × 13 GB for 7B f16).
    staged: Mutex<u64>,
}

/// Staged upload bytes after which the uploads are submitted and waited for.
const STAGED_MAX: u64 = 256 << 20;

/// Rounds `bytes` up to a pool size class: 1/8 steps between powers of two (at most 12.5%
/// waste), multiples of 256 bytes.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16);
    let p = b.next_power_of_two();
    let step = (p / 8).max(256);
    b.div_ceil(step) * step
}

fn wgpu_error(e: wgpu::Error) -> Error {
    match e {
        wgpu::Error::OutOfMemory { source } => Error::OutOfMemory(source.to_string()),
        other => Error::Device(other.to_string()),
    }
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: DeviceInfo,
        f16: bool,
        subgroups: bool,
        timestamps: bool,
        limits: &wgpu::Limits,
    ) -> Self {
        let errors: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
        let e2 = errors.clone();
        // Without a handler wgpu panics on errors; record the first one for the next sync point.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut g = lock(&e2);
            if g.is_none() {
                *g = Some(wgpu_error(e));
            }
        }));
        let e3 = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let mut g = lock(&e3);
            if g.is_none() {
                *g = Some(Error::Device(format!("device lost ({reason:?}): {msg}")));
            }
        });
        let ubuf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("visi uniforms"),
            size: SLOT * SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ctx {
            max_buffer: info.max_buffer_size,
            max_binding: info.max_binding_size,
            max_groups: limits.max_compute_workgroups_per_dimension,
            wg_storage: limits.max_compute_workgroup_storage_size,
            tuning: crate::variants::Tuning::empty(),
            device,
            queue,
            info,
            f16,
            subgroups,
            sg8_cpu: false,
            coop: std::sync::atomic::AtomicBool::new(false),
            timestamps,
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new((HashMap::new(), 0)),
            batch: Mutex::new(Batch::default()),
            staged: Mutex::new(0),
            ubuf,
            errors,
        }
    }

    /// The first device error since the last check (validation, OOM, device lost), if any.
    pub fn check(&self) -> Result<()> {
        match lock(&self.errors).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The pipeline for `key`, compiled on first use (lavapipe JIT-compiles: slow once).
    pub fn pipeline(&self, mut key: PipelineKey) -> Result<Arc<Pipe>> {
        let k = shaders::kernel(key.kernel)
            .ok_or_else(|| Error::msg(format!("unknown kernel {}", key.kernel)))?;
        if self.f16 && k.flags.contains(&"F16") {
            key.flags.push("F16");
        }
        if self.subgroups && k.flags.contains(&"SUBGROUPS") {
            key.flags.push("SUBGROUPS");
        }
        key.flags.sort_unstable();
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return Ok(p.clone());
        }
        let subs: Vec<(&str, String)> = key.subs.iter().map(|(n, v)| (*n, v.to_string())).collect();
        let src = shaders::build(key.kernel, &key.flags, &subs)
            .map_err(|e| Error::msg(format!("kernel {}: {e}", key.kernel)))?;
        let consts: Vec<(&str, f64)> = key
            .consts
            .iter()
            .map(|(n, v)| (*n, f64::from(*v)))
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key.kernel),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let trusted = UNCHECKED_KERNELS.contains(&key.kernel)
            && std::env::var_os("VISI_CHECKED_SHADERS").is_none();
        let module = if trusted {
            // SAFETY: these kernels guard every storage index against the bound sizes
            // (rows < M, k < K, n < rows; workgroup arrays by construction), and the backend
            // binds buffers at least as large as the sizes in their uniforms. The `*_q`
            // kernels read whole blocks of rows < `rows` of their chunk (a 2-byte-aligned
            // field's second word starts inside the data, and chunks are padded to words).
            // The `attn_*_sg8` passes clamp K/V rows below kv_len and bound score indices by
            // the keys a query block sees (<= the score row stride). Dropping naga's
            // per-access clamps makes the matmuls ~1.7x faster on lavapipe.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &consts,
                    // Every kernel initialises the workgroup memory it reads.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!(
                "kernel {}::{} {:?} does not compile: {e}",
                key.kernel, key.entry, key.flags
            )));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipe { pipeline, layout });
        lock(&self.pipelines).insert(key, p.clone());
        Ok(p)
    }

    /// A storage buffer of at least `bytes`, from the pool when one of its size class is free.
    /// Returns the buffer and its pool class.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<(wgpu::Buffer, u64)> {
        let class = size_class(bytes);
        let class = if class > self.max_buffer {
            bytes.max(16).div_ceil(16) * 16
        } else {
            class
        };
        if class > self.max_buffer {
            return Err(Error::TooLarge {
                what: what.into(),
                bytes,
                limit: self.max_buffer,
            });
        }
        {
            let mut pool = lock(&self.pool);
            if let Some(b) = pool.0.get_mut(&class).and_then(|v| v.pop()) {
                pool.1 -= class;
                return Ok((b, class));
            }
        }
        let buf = self.create(class, what, false)?;
        Ok((buf, class))
    }

    /// A new storage buffer of exactly `size` bytes (multiple of 16), optionally mapped.
    pub fn create(&self, size: u64, what: &str, mapped: bool) -> Result<wgpu::Buffer> {
        if size > self.max_buffer {
            return Err(Error::TooLarge {
                what: what.into(),
                bytes: size,
                limit: self.max_buffer,
            });
        }
        // Large allocations are the ones that can fail: catch OOM here rather than later.
        let scope = (size >= 64 << 20)
            .then(|| self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory));
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: mapped,
        });
        if let Some(scope) = scope {
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(Error::OutOfMemory(format!("{what} ({size} bytes): {e}")));
            }
        }
        Ok(buf)
    }

    /// Returns a buffer to the pool (or frees it when the pool is full or it is not pooled).
    pub fn release(&self, buf: wgpu::Buffer, class: u64) {
        if size_class(class) != class {
            return; // exact-size (upload) buffers are not reused: their sizes rarely repeat
        }
        let mut pool = lock(&self.pool);
        if pool.1 + class > POOL_CAP {
            return;
        }
        pool.1 += class;
        pool.0.entry(class).or_default().push(buf);
    }

    /// Records one compute dispatch into the current batch. `params` (<= SLOT bytes), the
    /// kernel's typed uniform (see `uniforms`), become the uniform at binding 0.
    pub fn dispatch<U: crate::uniforms::Uniform>(
        &self,
        pipe: &Pipe,
        params: &U,
        binds: &[Bind<'_>],
        groups: [u32; 3],
    ) -> Result<()> {
        let params: &[u8] = bytemuck::bytes_of(params);
        // A longer uniform would be cut short by the next slot (wrong parameters, no error).
        if params.len() as u64 > SLOT {
            return Err(Error::internal(format!(
                "{} bytes of kernel parameters, a uniform slot holds {SLOT}",
                params.len()
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let mut b = lock(&self.batch);
        if b.uniforms.len() as u64 >= SLOT * SLOTS || b.passes >= MAX_PASSES {
            self.flush_locked(&mut b)?;
        }
        let off = b.uniforms.len() as u64;
        b.uniforms.extend_from_slice(params);
        b.uniforms.resize((off + SLOT) as usize, 0);
        let usize_ = (params.len() as u64).max(16).div_ceil(16) * 16;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ubuf,
                offset: off,
                size: NonZeroU64::new(usize_),
            }),
        }];
        for Bind(i, buf, bytes) in binds {
            let size = (*bytes).max(16).div_ceil(16) * 16;
            entries.push(wgpu::BindGroupEntry {
                binding: *i,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: buf,
                    offset: 0,
                    size: NonZeroU64::new(size.min(buf.size())),
                }),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.layout,
            entries: &entries,
        });
        let Batch {
            enc,
            passes,
            timing,
            ..
        } = &mut *b;
        let enc = enc.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
        });
        let tw = match timing {
            Some(t) if t.used + 2 <= t.cap => {
                t.used += 2;
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: &t.qs,
                    beginning_of_pass_write_index: Some(t.used - 2),
                    end_of_pass_write_index: Some(t.used - 1),
                })
            }
            _ => None,
        };
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: tw,
            });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        *passes += 1;
        Ok(())
    }

    /// Runs `f` on the current batch's encoder (copies, clears), in recording order.
    pub fn encode(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut b = lock(&self.batch);
        let enc = b.enc.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
        });
        f(enc);
        b.passes += 1;
    }

    fn flush_locked(&self, b: &mut Batch) -> Result<()> {
        let staged = std::mem::take(&mut *lock(&self.staged));
        if let Some(enc) = b.enc.take() {
            if !b.uniforms.is_empty() {
                // Applied before this submission's commands, after the previous submission's.
                self.queue.write_buffer(&self.ubuf, 0, &b.uniforms);
            }
            self.queue.submit([enc.finish()]);
        } else if staged > 0 {
            // No commands, but uploads wait for a submission to copy (and free) their staging.
            self.queue.submit([]);
        }
        b.uniforms.clear();
        b.passes = 0;
        self.check()
    }

    /// Notes `bytes` just written through a mapped-at-creation buffer; past [`STAGED_MAX`]
    /// pending, submits and waits so that wgpu frees the staging copies (uploads then hold
    /// host memory for at most that much beyond the device buffers).
    pub fn staged_upload(&self, bytes: u64) -> Result<()> {
        let pending = {
            let mut s = lock(&self.staged);
            *s += bytes;
            *s
        };
        if pending >= STAGED_MAX {
            self.sync()?;
        }
        Ok(())
    }

    /// Submits the recorded work without waiting.
    pub fn flush(&self) -> Result<()> {
        let mut b = lock(&self.batch);
        self.flush_locked(&mut b)
    }

    /// Submits the recorded work and waits for the device.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.wait()
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| Error::Device(format!("waiting for the device: {e}")))?;
        self.check()
    }

    /// Copies `bytes` from the start of each `(buffer, bytes)` back to the host (one submit).
    pub fn read(&self, parts: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>> {
        let mut stages = Vec::new();
        for (buf, bytes) in parts {
            let size = bytes.div_ceil(4) * 4;
            let stage = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("visi readback"),
                size: size.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            if size > 0 {
                self.encode(|enc| enc.copy_buffer_to_buffer(buf, 0, &stage, 0, size));
            }
            stages.push((stage, *bytes));
        }
        self.flush()?;
        type MapStatus = Option<std::result::Result<(), wgpu::BufferAsyncError>>;
        let status: Arc<Mutex<Vec<MapStatus>>> = Arc::new(Mutex::new(vec![None; stages.len()]));
        for (i, (stage, _)) in stages.iter().enumerate() {
            let st = status.clone();
            stage
                .slice(..)
                .map_async(wgpu::MapMode::Read, move |r| lock(&st)[i] = Some(r));
        }
        // When several threads share the device, another thread's poll may have taken our
        // completions and not yet run their callbacks when our poll returns: poll again until
        // every callback has run (bounded, so a wedged device still ends in an error).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            self.wait()?;
            if lock(&status).iter().all(|s| s.is_some()) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Device("reading back: mapping never finished".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut out = Vec::with_capacity(stages.len());
        for (i, (stage, bytes)) in stages.iter().enumerate() {
            match lock(&status)[i].take() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(Error::Device(format!("reading back: {e}"))),
                None => return Err(Error::Device("reading back: mapping never finished".into())),
            }
            let data = stage
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(format!("reading back: {e}")))?;
            out.push(data[..*bytes as usize].to_vec());
            drop(data);
            stage.unmap();
        }
        Ok(out)
    }

    /// Starts timing every compute pass recorded from now on (up to `passes`) with timestamp
    /// queries. Returns false when the adapter has no timestamp queries.
    pub fn begin_timing(&self, passes: u32) -> Result<bool> {
        if !self.timestamps {
            return Ok(false);
        }
        self.flush()?;
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("visi timing"),
            ty: wgpu::QueryType::Timestamp,
            count: passes * 2,
        });
        lock(&self.batch).timing = Some(Timing {
            qs,
            cap: passes * 2,
            used: 0,
        });
        Ok(true)
    }

    /// Ends timing: the summed GPU time of the timed passes in seconds (`None` if not timing).
    pub fn end_timing(&self) -> Result<Option<f64>> {
        let Some(t) = lock(&self.batch).timing.take() else {
            return Ok(None);
        };
        if t.used == 0 {
            return Ok(Some(0.0));
        }
        let bytes = u64::from(t.used) * 8;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("visi timing resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.encode(|enc| enc.resolve_query_set(&t.qs, 0..t.used, &resolve, 0));
        let raw = self.read(&[(&resolve, bytes)])?.remove(0);
        let ticks: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let period = f64::from(self.queue.get_timestamp_period());
        let total: u64 = ticks
            .chunks_exact(2)
            .map(|p| p[1].saturating_sub(p[0]))
            .sum();
        Ok(Some(total as f64 * period * 1e-9))
    }
}

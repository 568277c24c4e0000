//! The CPU reference backend: plain Rust over host memory, parallel with rayon.
//!
//! It is the numerical reference every GPU kernel is tested against and a real device
//! (`--device cpu`, and what `--device auto` runs where the only adapters are software
//! rasterizers): f16 weights stay f16 and GGUF blocks stay quantized in memory, decoded
//! inside the kernels (SIMD with run-time feature detection, see `simd`), activations f32.
//! Threads: a rayon pool the caller runs in ([`with_threads`], physical cores by default).

mod attention;
mod matmul;
mod ops;
mod simd;
mod storage;

use half::f16;

use crate::backend::{AttentionParams, Backend, DeviceInfo, HostData, RopeParams};
use crate::checks::{
    check_argmax, check_attention, check_attention_last_row, check_broadcast, check_concat_rows,
    check_embedding, check_gather_rows, check_ids, check_layer_norm, check_linear,
    check_patch_embed, check_rms_norm, check_rope, check_row_indices, check_rows, check_silu_mul,
    check_slice_rows, check_token_contributions, check_upload, check_upload_quant,
    check_write_rows, check_zeros,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::shape::Shape;
use crate::tensor::Tensor;

pub use storage::CpuStorage;
use storage::{read, storage, tensor, CpuData};

/// The CPU backend. Cheap to create; all instances share rayon's global thread pool.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    _private: (),
}

impl CpuBackend {
    /// A CPU backend using rayon's global thread pool.
    pub fn new() -> Self {
        CpuBackend { _private: () }
    }
}

/// Physical cores this process may use: the CPUs it may run on (affinity, cgroup quota)
/// divided by the hardware threads per core (from Linux's sysfs topology; 1 elsewhere).
/// The CPU kernels are memory- and FMA-bound, so a second hardware thread per core adds
/// contention, not speed.
pub fn physical_cores() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    (allowed / smt_per_core().max(1)).max(1)
}

/// Hardware threads per core: online logical CPUs over distinct (package, core) pairs.
fn smt_per_core() -> usize {
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return 1;
    };
    let mut logical = 0usize;
    let mut cores = std::collections::HashSet::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let topo = e.path().join("topology");
        let read = |f: &str| {
            std::fs::read_to_string(topo.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
            logical += 1;
            cores.insert((pkg, core));
        }
    }
    if cores.is_empty() {
        1
    } else {
        logical.div_ceil(cores.len())
    }
}

/// Runs `f` on the CPU backend's thread pool: `threads` workers, or [`physical_cores`] when
/// `None`. The pool's workers persist for the whole call (no thread is spawned per op or
/// per token), and `f` itself runs on one of them, so every parallel op is shared between
/// the caller and the other workers without waking a thread for the caller's part; with one
/// thread, nothing is handed over at all. Falls back to rayon's global pool if the pool
/// cannot be built.
pub fn with_threads<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    let n = threads.unwrap_or_else(physical_cores).max(1);
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("visi-cpu-{i}"))
        // The whole command runs on a worker: give it a main thread's stack.
        .stack_size(16 << 20)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Threads in the CPU backend's pool.
pub fn current_threads() -> usize {
    rayon::current_num_threads()
}

/// The instruction set of the CPU kernels on this machine (`avx2+fma+f16c`, `portable`...).
pub fn kernel_isa() -> &'static str {
    simd::isa()
}

/// The CPU's marketing name where the OS tells it, else the architecture.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn dtype_err(op: &'static str, dtype: DType) -> Error {
    Error::DType { op, dtype }
}

fn unary(op: &'static str, x: &Tensor, f: fn(f32) -> f32) -> Result<Tensor> {
    let g = read(x, op)?;
    let out = ops::map(g.f32s(op)?, f);
    Ok(tensor(CpuData::F32(out), x.shape().clone()))
}

fn binary(op: &'static str, a: &Tensor, b: &Tensor, f: fn(f32, f32) -> f32) -> Result<Tensor> {
    check_broadcast(op, a, b)?;
    let (ga, gb) = (read(a, op)?, read(b, op)?);
    let out = ops::binary(ga.f32s(op)?, gb.f32s(op)?, a.shape().last_dim(), f);
    Ok(tensor(CpuData::F32(out), a.shape().clone()))
}

/// Copies rows `idx` (each `n` elements) of `data` into a new buffer of the same dtype.
fn take_rows(data: &CpuData, n: usize, idx: impl Iterator<Item = usize> + Clone) -> CpuData {
    fn pick<T: Copy>(v: &[T], n: usize, idx: impl Iterator<Item = usize>) -> Vec<T> {
        let mut out = Vec::new();
        for r in idx {
            out.extend_from_slice(&v[r * n..(r + 1) * n]);
        }
        out
    }
    match data {
        CpuData::F32(v) => CpuData::F32(pick(v, n, idx)),
        CpuData::F16(v) => CpuData::F16(pick(v, n, idx)),
        CpuData::U32(v) => CpuData::U32(pick(v, n, idx)),
        CpuData::Quant { qt, bytes, .. } => {
            // Callers only take rows of activations; a quantized row (whole blocks) copies
            // as bytes all the same.
            let rb = qt.bytes_for(n).unwrap_or(0);
            let mut out = Vec::new();
            let mut rows = 0;
            for r in idx {
                out.extend_from_slice(&bytes[r * rb..(r + 1) * rb]);
                rows += 1;
            }
            CpuData::Quant {
                qt: *qt,
                bytes: out,
                len: rows * n,
            }
        }
    }
}

/// The first `rows` rows (`width` wide) of a KV cache as f32: borrowed when the cache is f32,
/// converted when it is f16 (the cache stores f16; scores, softmax and `P·V` stay f32).
fn kv_f32<'a>(
    d: &'a CpuData,
    rows: usize,
    width: usize,
    op: &'static str,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    match d {
        CpuData::F32(v) => Ok(std::borrow::Cow::Borrowed(&v[..rows * width])),
        CpuData::F16(_) => {
            let mut out = vec![0f32; rows * width];
            d.floats(op)?.read_into(0, &mut out);
            Ok(std::borrow::Cow::Owned(out))
        }
        other => Err(dtype_err(op, other.dtype())),
    }
}

impl Backend for CpuBackend {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "cpu".into(),
            adapter: format!(
                "{} ({}, {} threads)",
                cpu_name(),
                simd::isa(),
                rayon::current_num_threads()
            ),
            api: "native".into(),
            device_type: "cpu".into(),
            max_buffer_size: isize::MAX as u64,
            max_binding_size: isize::MAX as u64,
            shader_f16: false,
            subgroups: false,
        }
    }

    fn upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor> {
        check_upload(data.len(), &shape)?;
        let data = match data {
            HostData::F32(v) => CpuData::F32(v.to_vec()),
            HostData::F16(v) => CpuData::F16(v.to_vec()),
            HostData::U32(v) => CpuData::U32(v.to_vec()),
            HostData::BF16(v) => {
                let h: Vec<f16> = v.iter().map(|x| f16::from_f32(x.to_f32())).collect();
                if h.iter().all(|x| x.is_finite()) {
                    CpuData::F16(h)
                } else {
                    CpuData::F32(v.iter().map(|x| x.to_f32()).collect())
                }
            }
        };
        Ok(tensor(data, shape))
    }

    fn upload_quant(&self, qt: QuantType, bytes: &[u8], shape: Shape) -> Result<Tensor> {
        let (n, _) = check_upload_quant(qt, bytes.len(), &shape)?;
        Ok(tensor(
            CpuData::Quant {
                qt,
                bytes: bytes.to_vec(),
                len: n,
            },
            shape,
        ))
    }

    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
        check_zeros(dtype)?;
        let n = shape.elem_count();
        let data = match dtype {
            DType::F32 => CpuData::F32(vec![0.0; n]),
            DType::F16 => CpuData::F16(vec![f16::ZERO; n]),
            DType::U32 => CpuData::U32(vec![0; n]),
            DType::BF16 | DType::Quant(_) => return Err(dtype_err("zeros", dtype)),
        };
        Ok(tensor(data, shape))
    }

    fn to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let g = read(t, "to_vec_f32")?;
        match &*g {
            CpuData::F32(v) => Ok(v.clone()),
            CpuData::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            CpuData::U32(_) => Err(dtype_err("to_vec_f32", DType::U32)),
            CpuData::Quant { qt, bytes, len } => {
                let mut out = vec![0f32; *len];
                crate::quant::dequantize(*qt, bytes, &mut out);
                Ok(out)
            }
        }
    }

    fn to_vec_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        let g = read(t, "to_vec_u32")?;
        Ok(g.u32s("to_vec_u32")?.to_vec())
    }

    fn sync(&self) -> Result<()> {
        // Every op has finished when it returns.
        Ok(())
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        let (k, n) = check_linear(x, w, b)?;
        let m = x.shape().rows();
        let gx = read(x, OP)?;
        let gw = read(w, OP)?;
        let gb = b.map(|b| read(b, OP)).transpose()?;
        let bias = gb.as_ref().map(|g| g.f32s(OP)).transpose()?;
        let y = matmul::linear(gx.f32s(OP)?, m, k, gw.floats(OP)?, n, bias);
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = n;
        Ok(tensor(CpuData::F32(y), dims)) // [.., N]
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        binary("add", a, b, |x, y| x + y)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        binary("mul", a, b, |x, y| x * y)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        unary("gelu", x, ops::gelu)
    }

    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        unary("quick_gelu", x, ops::quick_gelu)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "silu_mul";
        check_silu_mul(gate, up)?;
        let (gg, gu) = (read(gate, OP)?, read(up, OP)?);
        let out = ops::binary(
            gg.f32s(OP)?,
            gu.f32s(OP)?,
            gate.shape().last_dim(),
            ops::silu_mul,
        );
        Ok(tensor(CpuData::F32(out), gate.shape().clone()))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "rms_norm";
        let n = check_rms_norm(x, w)?;
        let (gx, gw) = (read(x, OP)?, read(w, OP)?);
        let out = ops::rms_norm(gx.f32s(OP)?, gw.f32s(OP)?, n, eps);
        Ok(tensor(CpuData::F32(out), x.shape().clone()))
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "layer_norm";
        let n = check_layer_norm(x, w, b)?;
        let (gx, gw, gb) = (read(x, OP)?, read(w, OP)?, read(b, OP)?);
        let out = ops::layer_norm(gx.f32s(OP)?, gw.f32s(OP)?, gb.f32s(OP)?, n, eps);
        Ok(tensor(CpuData::F32(out), x.shape().clone()))
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax";
        let n = check_rows(OP, x)?;
        let g = read(x, OP)?;
        let out = ops::softmax(g.f32s(OP)?, n);
        Ok(tensor(CpuData::F32(out), x.shape().clone()))
    }

    fn rope(&self, x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<Tensor> {
        const OP: &str = "rope";
        let (s, w) = check_rope(x, positions, p)?;
        let (gx, gp) = (read(x, OP)?, read(positions, OP)?);
        let out = ops::rope(gx.f32s(OP)?, w, gp.u32s(OP)?, p);
        Ok(tensor(CpuData::F32(out), [s, w]))
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        const OP: &str = "attention";
        let sq = check_attention(OP, q.dims(), &[k.dims(), v.dims()], p)?;
        let (gq, gk, gv) = (read(q, OP)?, read(k, OP)?, read(v, OP)?);
        let kw = p.num_kv_heads * p.head_dim;
        let (kf, vf) = (
            kv_f32(&gk, p.kv_len, kw, OP)?,
            kv_f32(&gv, p.kv_len, kw, OP)?,
        );
        let out = attention::attention(gq.f32s(OP)?, &kf, &vf, sq, p);
        Ok(tensor(CpuData::F32(out), [sq, p.num_heads * p.head_dim]))
    }

    fn attention_last_row(&self, q: &Tensor, k: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        const OP: &str = "attention_last_row";
        let sq = check_attention_last_row(q, k, p)?;
        let (gq, gk) = (read(q, OP)?, read(k, OP)?);
        let kf = kv_f32(&gk, p.kv_len, p.num_kv_heads * p.head_dim, OP)?;
        let out = attention::last_row(gq.f32s(OP)?, &kf, sq, p);
        Ok(tensor(CpuData::F32(out), [p.num_heads, p.kv_len]))
    }

    fn token_contributions(
        &self,
        probs: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        start: usize,
        end: usize,
    ) -> Result<Tensor> {
        const OP: &str = "token_contributions";
        check_token_contributions(OP, probs, v, p, start, end)?;
        let (gp, gv) = (read(probs, OP)?, read(v, OP)?);
        let vf = kv_f32(&gv, p.kv_len, p.num_kv_heads * p.head_dim, OP)?;
        let out = attention::token_contributions(gp.f32s(OP)?, &vf, p, start, end);
        Ok(tensor(CpuData::F32(out), [end - start, 2]))
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        let (vocab, d) = check_embedding(table, ids)?;
        let (gt, gi) = (read(table, OP)?, read(ids, OP)?);
        let ids_v = gi.u32s(OP)?;
        check_ids(ids_v, vocab)?;
        let t = gt.floats(OP)?;
        let mut out = vec![0f32; ids_v.len() * d]; // [S, D]
        if d > 0 {
            for (o, &id) in out.chunks_exact_mut(d).zip(ids_v) {
                t.read_into(id as usize * d, o);
            }
        }
        Ok(tensor(CpuData::F32(out), [ids_v.len(), d]))
    }

    fn gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_rows";
        let (m, n) = check_gather_rows(x, idx)?;
        let (gx, gi) = (read(x, OP)?, read(idx, OP)?);
        let iv = gi.u32s(OP)?;
        check_row_indices(iv, m)?;
        let out = take_rows(&gx, n, iv.iter().map(|&r| r as usize));
        Ok(tensor(out, [iv.len(), n]))
    }

    fn slice_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "slice_rows";
        check_slice_rows(x, start, len)?;
        let dims = x.dims();
        let n: usize = dims[1..].iter().product();
        let g = read(x, OP)?;
        let out = take_rows(&g, n, start..start + len);
        let mut out_dims = dims.to_vec();
        out_dims[0] = len;
        Ok(tensor(out, out_dims))
    }

    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "concat_rows";
        let rows = check_concat_rows(parts)?;
        let first = parts[0];
        let guards = parts
            .iter()
            .map(|t| read(t, OP))
            .collect::<Result<Vec<_>>>()?;
        let data = match &*guards[0] {
            CpuData::F32(_) => {
                let mut out = Vec::new();
                for g in &guards {
                    out.extend_from_slice(g.f32s(OP)?);
                }
                CpuData::F32(out)
            }
            CpuData::F16(_) => {
                let mut out = Vec::new();
                for g in &guards {
                    match &**g {
                        CpuData::F16(v) => out.extend_from_slice(v),
                        other => return Err(dtype_err(OP, other.dtype())),
                    }
                }
                CpuData::F16(out)
            }
            CpuData::U32(_) => {
                let mut out = Vec::new();
                for g in &guards {
                    out.extend_from_slice(g.u32s(OP)?);
                }
                CpuData::U32(out)
            }
            CpuData::Quant { qt, .. } => return Err(dtype_err(OP, DType::Quant(*qt))),
        };
        let mut dims = first.dims().to_vec();
        dims[0] = rows;
        Ok(tensor(data, dims))
    }

    fn write_rows(&self, dst: &Tensor, row: usize, src: &Tensor) -> Result<()> {
        const OP: &str = "write_rows";
        let (r, n) = check_write_rows(dst, row, src)?;
        // f32 rows may be written into an f16 tensor (an f16 KV cache): rounded to nearest.
        let narrowing = src.dtype() == DType::F32 && dst.dtype() == DType::F16;
        if src.dtype() != dst.dtype() && !narrowing {
            return Err(dtype_err(OP, src.dtype()));
        }
        let sd = storage(src, OP)?;
        let dd = storage(dst, OP)?;
        // Writing a tensor into itself would need a read and a write lock at once.
        let src_copy;
        let sg;
        let src_data: &CpuData = if std::ptr::eq(sd, dd) {
            src_copy = take_rows(&*sd.read()?, n, 0..r);
            &src_copy
        } else {
            sg = sd.read()?;
            &sg
        };
        let mut dg = dd.write()?;
        let range = row * n..(row + r) * n;
        match (&mut *dg, src_data) {
            (CpuData::F32(d), CpuData::F32(s)) => d[range].copy_from_slice(&s[..r * n]),
            (CpuData::F16(d), CpuData::F16(s)) => d[range].copy_from_slice(&s[..r * n]),
            (CpuData::F16(d), CpuData::F32(s)) => {
                use half::slice::HalfFloatSliceExt;
                d[range].convert_from_f32_slice(&s[..r * n]);
            }
            (CpuData::U32(d), CpuData::U32(s)) => d[range].copy_from_slice(&s[..r * n]),
            (_, s) => return Err(dtype_err(OP, s.dtype())),
        }
        Ok(())
    }

    fn patch_embed(&self, pixels: &Tensor, w: &Tensor, patch: usize) -> Result<Tensor> {
        const OP: &str = "patch_embed";
        let (c, h, wd, d) = check_patch_embed(OP, pixels, w, patch)?;
        let (gp, gw) = (read(pixels, OP)?, read(w, OP)?);
        let cols = ops::im2col(gp.f32s(OP)?, c, h, wd, patch); // [P, C*p*p]
        let np = (h / patch) * (wd / patch);
        let y = matmul::linear(&cols, np, c * patch * patch, gw.floats(OP)?, d, None);
        Ok(tensor(CpuData::F32(y), [np, d])) // [P, D]
    }

    fn linear_batch_rows(&self) -> usize {
        // The matrix-vector kernel takes inputs in groups of DOTS_MAX_ROWS with the same
        // operations per row (quantized rows decoded in registers for every group), so
        // any M up to its cutoff gives a row the same bits; engine-wgpu/tests/batch.rs
        // checks 1..=16.
        16.min(matmul::GEMV_MAX_ROWS)
    }

    fn linear_prefill_rows(&self) -> usize {
        // Up to GEMV_MAX_ROWS rows take the matrix-vector kernel (its own reduction
        // order); the packed GEMM beyond gives each row the same bits for any M.
        matmul::GEMV_MAX_ROWS + 1
    }

    fn argmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "argmax";
        let n = check_argmax(x)?;
        let g = read(x, OP)?;
        let out = ops::argmax(g.f32s(OP)?, n);
        let m = out.len();
        Ok(tensor(CpuData::U32(out), [m]))
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        let g = read(x, OP)?;
        let out = match (&*g, dtype) {
            (CpuData::F32(v), DType::F32) => CpuData::F32(v.clone()),
            (CpuData::F16(v), DType::F16) => CpuData::F16(v.clone()),
            (CpuData::F32(v), DType::F16) => {
                CpuData::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (CpuData::F16(v), DType::F32) => CpuData::F32(v.iter().map(|x| x.to_f32()).collect()),
            (CpuData::U32(_), _) => return Err(dtype_err(OP, DType::U32)),
            (CpuData::Quant { qt, bytes, len }, DType::F32) => {
                let mut out = vec![0f32; *len];
                crate::quant::dequantize(*qt, bytes, &mut out);
                CpuData::F32(out)
            }
            (_, other) => return Err(dtype_err(OP, other)),
        };
        Ok(tensor(out, x.shape().clone()))
    }
}

//! `engine_core::Backend` on wgpu: the backend type and its trait impl, each op a call into
//! its family's file under `ops/` (validation as the CPU reference does, via
//! `engine_core::checks`; WGSL dispatches recorded into the current batch).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use engine_core::{
    AttentionParams, Backend, DType, DeviceInfo, HostData, QuantType, Result, RopeParams, Shape,
    Tensor,
};

use crate::ctx::Ctx;

/// RoPE frequency tables by (head_dim, theta bits, scaling bits).
pub(crate) type InvFreqCache = HashMap<(usize, u32, u32), Tensor>;

/// The wgpu backend. Cheap to clone (an `Arc` to the device context).
#[derive(Clone)]
pub struct GpuBackend {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) inv_freq: Arc<Mutex<InvFreqCache>>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBackend({})", self.ctx.info.adapter)
    }
}

impl GpuBackend {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        GpuBackend {
            ctx,
            inv_freq: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl Backend for GpuBackend {
    fn device_info(&self) -> DeviceInfo {
        self.ctx.info.clone()
    }

    fn upload(&self, data: HostData<'_>, shape: Shape) -> Result<Tensor> {
        self.op_upload(data, shape)
    }

    fn upload_quant(&self, qt: QuantType, bytes: &[u8], shape: Shape) -> Result<Tensor> {
        self.op_upload_quant(qt, bytes, shape)
    }

    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
        self.op_zeros(shape, dtype)
    }

    fn to_vec_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.op_to_vec_f32(t)
    }

    fn to_vec_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.op_to_vec_u32(t)
    }

    fn sync(&self) -> Result<()> {
        self.ctx.sync()
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.op_linear(x, w, b)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.op_add(a, b)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.op_mul(a, b)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.op_gelu(x)
    }

    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.op_quick_gelu(x)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.op_silu_mul(gate, up)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        self.op_rms_norm(x, w, eps)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        self.op_layer_norm(x, w, b, eps)
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        self.op_softmax(x)
    }

    fn rope(&self, x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<Tensor> {
        self.op_rope(x, positions, p)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        self.op_attention(q, k, v, p)
    }

    fn attention_last_row(&self, q: &Tensor, k: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        self.op_attention_last_row(q, k, p)
    }

    fn token_contributions(
        &self,
        probs: &Tensor,
        v: &Tensor,
        p: &AttentionParams,
        start: usize,
        end: usize,
    ) -> Result<Tensor> {
        self.op_token_contributions(probs, v, p, start, end)
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        self.op_embedding(table, ids)
    }

    fn gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        self.op_gather_rows(x, idx)
    }

    fn slice_rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.op_slice_rows(x, start, len)
    }

    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.op_concat_rows(parts)
    }

    fn write_rows(&self, dst: &Tensor, row: usize, src: &Tensor) -> Result<()> {
        self.op_write_rows(dst, row, src)
    }

    fn patch_embed(&self, pixels: &Tensor, w: &Tensor, patch: usize) -> Result<Tensor> {
        self.op_patch_embed(pixels, w, patch)
    }

    fn linear_batch_rows(&self) -> usize {
        self.op_linear_batch_rows()
    }

    fn linear_prefill_rows(&self) -> usize {
        self.op_linear_prefill_rows()
    }

    fn argmax(&self, x: &Tensor) -> Result<Tensor> {
        self.op_argmax(x)
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        self.op_cast(x, dtype)
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::size_class;

    #[test]
    fn size_classes_bound_waste() {
        for b in [
            1u64,
            17,
            1000,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            262_668_288,
        ] {
            let c = size_class(b);
            assert!(c >= b && c.is_multiple_of(16), "{b} -> {c}");
            assert!(
                c <= b.max(256) + b.max(256) / 4,
                "{b} -> {c} wastes too much"
            );
        }
    }
}

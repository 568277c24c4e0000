//! Rotary position embedding and its cached frequency tables.

use engine_core::{Backend, DType, HostData, Result, RopeParams, Shape, Tensor};

use crate::ctx::{lock, PipelineKey};
use crate::uniforms::RopeP;
use engine_core::checks::check_rope;

use super::*;
use crate::backend::GpuBackend;

impl GpuBackend {
    pub(crate) fn inv_freq(&self, p: &RopeParams) -> Result<Tensor> {
        let key = (p.head_dim, p.theta.to_bits(), p.scaling_factor.to_bits());
        if let Some(t) = lock(&self.inv_freq).get(&key) {
            return Ok(t.clone());
        }
        // Exactly the CPU reference's table (engine-core cpu/ops.rs inv_freq).
        let d = p.head_dim;
        let v: Vec<f32> = (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                let pow = f64::from(p.theta).powf(f64::from(e)) as f32;
                (1.0 / pow) / p.scaling_factor
            })
            .collect();
        let n = v.len();
        let t = self.upload(HostData::F32(&v), Shape::from(n))?;
        lock(&self.inv_freq).insert(key, t.clone());
        Ok(t)
    }

    pub(crate) fn op_rope(&self, x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<Tensor> {
        const OP: &str = "rope";
        let (s, w) = check_rope(x, positions, p)?;
        need(x, DType::F32, OP)?;
        need(positions, DType::U32, OP)?;
        let inv = self.inv_freq(p)?;
        let (cx, cp, ci) = (one(x, OP)?, one(positions, OP)?, one(&inv, OP)?);
        let out = self.empty([s, w], DType::F32, OP)?;
        let total = s * w / 2;
        if total > 0 {
            let co = one(&out, OP)?;
            let pipe = self.ctx.pipeline(PipelineKey::new("rope", "main"))?;
            let prm = RopeP {
                rows: u32_of(OP, "rows", s)?,
                width: u32_of(OP, "width", w)?,
                head_dim: p.head_dim as u32,
                pad: 0,
            };
            let g = self.grid(OP, total.div_ceil(256))?;
            self.ctx.dispatch(
                &pipe,
                &prm,
                &[cx.bind(1), cp.bind(2), ci.bind(3), co.bind(4)],
                g,
            )?;
        }
        Ok(out)
    }
}

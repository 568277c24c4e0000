//! Building blocks shared by the vision tower, the projector and the decoder.

use engine_core::weights::Weights;
use engine_core::{Backend, Result, Tensor};

/// `y = x·Wᵀ + b` with the checkpoint's `[out, in]` weight.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight `[out, in]`, f16 or f32.
    pub weight: Tensor, // [out, in] f16|f32
    /// Bias `[out]` f32, when the layer has one.
    pub bias: Option<Tensor>, // [out] f32
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get_f32("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// LayerNorm over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale `[dim]` f32.
    pub weight: Tensor, // [dim] f32
    /// Shift `[dim]` f32.
    pub bias: Tensor, // [dim] f32
    /// Epsilon added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(w: &Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get_f32("weight", &[dim])?,
            bias: w.get_f32("bias", &[dim])?,
            eps,
        })
    }
    /// Normalises each row.
    pub fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        b.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm over the last dimension (Llama).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Scale `[dim]` f32.
    pub weight: Tensor, // [dim] f32
    /// Epsilon added to the mean square.
    pub eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(w: &Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get_f32("weight", &[dim])?,
            eps,
        })
    }
    /// Normalises each row.
    pub fn forward(&self, b: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        b.rms_norm(x, &self.weight, self.eps)
    }
}

/// Applies an activation from the config.
pub fn activate(b: &dyn Backend, act: crate::config::Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        crate::config::Activation::Gelu => b.gelu(x),
        crate::config::Activation::QuickGelu => b.quick_gelu(x),
    }
}

//! Scaled dot-product attention.

use anyhow::Result;
use candle_core::{Tensor, D};

/// softmax(q·kᵀ·scale + bias) · v over `(B, H, L, D)` tensors. `bias` is added to the scores
/// (broadcast to `(B, H, Lq, Lk)`); use large negative values to mask keys.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let q = q.contiguous()?;
    let kt = k.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    let mut scores = q.matmul(&kt)?; // (B, H, Lq, Lk)
    if scale != 1.0 {
        scores = scores.affine(scale, 0.0)?;
    }
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    // The fused softmax has no backward: when gradients are tracked, use the composed one.
    let weights = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    Ok(weights.matmul(&v.contiguous()?)?)
}

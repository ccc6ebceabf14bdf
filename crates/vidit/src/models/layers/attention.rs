//! Scaled dot-product attention.

use crate::kernels;
use anyhow::Result;
use candle_core::{Tensor, D};

/// softmax(q·kᵀ·scale)·v over token-major tensors `q (B, Lq, H, D)`, `k`, `v (B, Lk, H, D)`,
/// as the projections produce them; returns `(B, Lq, H, D)`. On the CPU the fused, tiled kernel
/// ([`kernels::attention`]); elsewhere [`sdpa`] over head-major views.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if kernels::fused(q) {
        return kernels::attention::attention(q, k, v, scale);
    }
    let heads_first = |x: &Tensor| x.transpose(1, 2);
    Ok(sdpa(&heads_first(q)?, &heads_first(k)?, &heads_first(v)?, scale, None)?.transpose(1, 2)?)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::tests::fused_matches;

    #[test]
    fn fused_attention_matches_sdpa() -> Result<()> {
        let composed = |t: &[Tensor]| -> Result<Tensor> {
            let h = |x: &Tensor| x.transpose(1, 2);
            Ok(sdpa(&h(&t[0])?, &h(&t[1])?, &h(&t[2])?, 0.3, None)?.transpose(1, 2)?)
        };
        let fused = |t: &[Tensor]| kernels::attention::attention(&t[0], &t[1], &t[2], 0.3);
        // Self-attention over more than one query block (a partial last one), and cross-attention.
        fused_matches(&[&[2, 70, 3, 8], &[2, 70, 3, 8], &[2, 70, 3, 8]], fused, composed, 1e-5)?;
        fused_matches(&[&[1, 5, 2, 6], &[1, 9, 2, 6], &[1, 9, 2, 6]], fused, composed, 1e-5)
    }
}

//! Normalisations with two-pass statistics (as PyTorch computes them) and a backward pass, which
//! candle's fused kernels lack: the fused CPU kernels of [`kernels::norm`] on the CPU, composed
//! from tensor primitives elsewhere.

use crate::kernels::{self, norm::Kind};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::init::ZERO;
use candle_nn::{Init, VarBuilder};

/// Norm gains start at one when a model is built for training (checkpoint loading ignores it).
const ONE: Init = Init::Const(1.0);

/// LayerNorm over the last dimension, optionally affine (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl LayerNorm {
    /// With `weight` and `bias` loaded from `vb`.
    pub fn affine(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", ONE)?;
        let bias = vb.get_with_hints(dim, "bias", ZERO)?;
        Ok(Self { affine: Some((weight, bias)), eps })
    }

    /// Without parameters (`elementwise_affine=False`).
    pub fn plain(eps: f64) -> Self {
        Self { affine: None, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::fused(x) {
            let (w, b) = self.affine.as_ref().map(|(w, b)| (w, b)).unzip();
            return kernels::norm::norm(x, Kind::Layer, self.eps, w, b);
        }
        self.forward_composed(x)
    }

    /// adaLN: `norm(x)·(1 + scale) + shift` for `x (B, L, dim)`, with shift and scale the slots
    /// `shift`, `scale` of `modulation (B, S, K, dim)`, whose S rows cover the L tokens in equal
    /// groups (S = 1, frames, or L).
    pub fn modulated(&self, x: &Tensor, modulation: &Tensor, shift: usize, scale: usize) -> Result<Tensor> {
        if kernels::fused(x) && self.affine.is_none() {
            return kernels::adaln::modulated_norm(x, modulation, shift, scale, self.eps);
        }
        let slot = |i: usize| per_token(&modulation.narrow(2, i, 1)?.squeeze(2)?, x.dim(1)?);
        Ok(self.forward_composed(x)?.broadcast_mul(&(slot(scale)? + 1.0)?)?.broadcast_add(&slot(shift)?)?)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(match &self.affine {
            Some((w, b)) => normed.broadcast_mul(w)?.broadcast_add(b)?,
            None => normed,
        })
    }
}

/// `x + y·gate` for `x`, `y (B, L, dim)`, with gate the slot `gate` of `modulation (B, S, K, dim)`
/// (rows in token groups, as [`LayerNorm::modulated`]).
pub fn gated_add(x: &Tensor, y: &Tensor, modulation: &Tensor, gate: usize) -> Result<Tensor> {
    if kernels::fused(x) {
        return kernels::adaln::gated_add(x, y, modulation, gate);
    }
    let gate = per_token(&modulation.narrow(2, gate, 1)?.squeeze(2)?, x.dim(1)?)?;
    Ok((x + y.broadcast_mul(&gate)?)?)
}

/// Modulation rows `(B, S, dim)` repeated over their token groups: `(B, L, dim)`, or `(B, 1, dim)`
/// (broadcast) when S = 1.
fn per_token(rows: &Tensor, tokens: usize) -> Result<Tensor> {
    let (b, s, dim) = rows.dims3()?;
    if s == 1 || s == tokens {
        return Ok(rows.clone());
    }
    Ok(rows.unsqueeze(2)?.broadcast_as((b, s, tokens / s, dim))?.reshape((b, tokens, dim))?)
}

/// RMSNorm over the last dimension with a learned gain: x · rsqrt(mean(x²) + eps) · weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", ONE)?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::fused(x) {
            return kernels::norm::norm(x, Kind::Rms, self.eps, Some(&self.weight), None);
        }
        self.forward_composed(x)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::tests::fused_matches;

    #[test]
    fn fused_kernels_match_the_composed_ops() -> Result<()> {
        let layer = |t: &[Tensor]| LayerNorm { affine: Some((t[1].clone(), t[2].clone())), eps: 1e-6 };
        fused_matches(
            &[&[2, 3, 48], &[48], &[48]],
            |t| layer(t).forward(&t[0]),
            |t| layer(t).forward_composed(&t[0]),
            1e-5,
        )?;
        let plain = LayerNorm::plain(1e-6);
        fused_matches(&[&[5, 20]], |t| plain.forward(&t[0]), |t| plain.forward_composed(&t[0]), 1e-5)?;
        // adaLN with a modulation row per sample, per group of 3 tokens, per token.
        for s in [1, 2, 6] {
            let shape = [2, s, 3, 8];
            let plain = LayerNorm::plain(1e-6);
            let composed = |t: &[Tensor]| -> Result<Tensor> {
                let h = plain.forward_composed(&t[0])?;
                let slot = |i| per_token(&t[1].narrow(2, i, 1)?.squeeze(2)?, 6);
                let h = h.broadcast_mul(&(slot(2)? + 1.0)?)?.broadcast_add(&slot(0)?)?;
                Ok((&t[2] + h.broadcast_mul(&slot(1)?)?)?)
            };
            let fused = |t: &[Tensor]| gated_add(&t[2], &plain.modulated(&t[0], &t[1], 0, 2)?, &t[1], 1);
            fused_matches(&[&[2, 6, 8], &shape, &[2, 6, 8]], fused, composed, 1e-5)?;
        }
        let rms = |t: &[Tensor]| RmsNorm { weight: t[1].clone(), eps: 1e-6 };
        fused_matches(
            &[&[2, 3, 48], &[48]],
            |t| rms(t).forward(&t[0]),
            |t| rms(t).forward_composed(&t[0]),
            1e-5,
        )
    }
}

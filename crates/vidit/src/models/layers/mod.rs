//! Building blocks shared by the models.

pub mod attention;
pub mod conv2d;
pub mod conv3d;
pub mod norm;

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::{Linear, Module, VarBuilder};

/// A `Linear` with bias, weights `[out, in]` as PyTorch stores them.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// A `Linear` without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(candle_nn::linear_no_bias(in_dim, out_dim, vb)?)
}

/// Applies a linear layer to a tensor of any rank ≥ 2 (the last dimension is the feature axis).
pub fn apply(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    Ok(layer.forward(x)?)
}

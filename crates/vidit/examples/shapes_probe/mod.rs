//! What the shapes-model probes (`word_influence`, `denoise_error`) share.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::path::PathBuf;
use vidit::pipelines::wan::WanModel;

/// L2 distance between two tensors of one shape.
pub fn distance(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
}

/// The model folder named by the first argument (default: the built-in model's), on the CPU.
pub fn open_model() -> Result<WanModel> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "models/shapes".into()));
    WanModel::open(&dir, &Device::Cpu)
}

//! What the shapes-model probes (`word_influence`, `denoise_error`) share.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::path::PathBuf;
use vidit::models::wan_transformer::TextContext;
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

/// The DiT's clean-latent prediction x̂0 on noisy latents `x` at noise level σ: its output for a
/// model that predicts samples (scheduler `prediction_type` "sample"), else x − σ·v.
pub fn x0_predictor(model: &WanModel) -> Result<impl Fn(&Tensor, f64, &TextContext) -> Result<Tensor> + '_> {
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&model.scheduler_config)?)?;
    let sample = config["prediction_type"] == "sample";
    Ok(move |x: &Tensor, sigma: f64, context: &TextContext| -> Result<Tensor> {
        let t = Tensor::new(&[(sigma * 1000.0) as f32], x.device())?;
        let output = model.transformer.forward(x, &t, context)?;
        Ok(if sample { output } else { (x - (output * sigma)?)? })
    })
}

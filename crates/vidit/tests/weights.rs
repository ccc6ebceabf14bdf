//! Weight files: sharded checkpoints and half-precision weights load into the same f32 model.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{assert_close, get, load, tiny_wan};
use std::collections::HashMap;
use std::path::Path;
use vidit::model_folder::{load_config, MappedWeights};
use vidit::models::wan_transformer::WanTransformer3DModel;

fn forward(dir: &Path) -> Result<Tensor> {
    let config = load_config(&tiny_wan().join("transformer/config.json"))?;
    let model = WanTransformer3DModel::new(config, MappedWeights::var_builder(dir, &Device::Cpu)?)?;
    let record = load("transformer.safetensors")?;
    let context = model.text_context(get(&record, "input.encoder_hidden_states"))?;
    model.forward(get(&record, "input.hidden_states"), get(&record, "input.timestep"), &context)
}

fn original() -> Result<HashMap<String, Tensor>> {
    let path = tiny_wan().join("transformer/diffusion_pytorch_model.safetensors");
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

#[test]
fn sharded_checkpoint_loads_through_its_index() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut names: Vec<String> = original()?.into_keys().collect();
    names.sort();
    let tensors = original()?;
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = chunk.iter().map(|n| (n.clone(), tensors[n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.path().join(&file))?;
        for name in chunk {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors.index.json"), index.to_string())?;
    assert_eq!(vidit::model_folder::weight_files(dir.path())?.len(), 2);
    assert_close(
        "sharded output",
        &forward(dir.path())?,
        get(&load("transformer.safetensors")?, "output"),
        1e-5,
    )
}

#[test]
fn half_precision_weights_compute_in_f32() -> Result<()> {
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir()?;
        let half: HashMap<String, Tensor> =
            original()?.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<Result<_>>()?;
        let half_dir = dir.path().join("half");
        std::fs::create_dir(&half_dir)?;
        candle_core::safetensors::save(&half, half_dir.join("diffusion_pytorch_model.safetensors"))?;
        // The same values widened to f32 on disk must give exactly the same result.
        let widened: HashMap<String, Tensor> =
            half.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
        let wide_dir = dir.path().join("wide");
        std::fs::create_dir(&wide_dir)?;
        candle_core::safetensors::save(&widened, wide_dir.join("diffusion_pytorch_model.safetensors"))?;
        let out = forward(&half_dir)?;
        assert_eq!(out.dtype(), DType::F32);
        assert_close(&format!("{dtype:?} vs widened f32"), &out, &forward(&wide_dir)?, 0.0)?;
        // And stay near the full-precision reference (weight rounding only).
        assert_close(
            &format!("{dtype:?} vs reference"),
            &out,
            get(&load("transformer.safetensors")?, "output"),
            0.1,
        )?;
    }
    Ok(())
}

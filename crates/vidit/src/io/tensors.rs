//! Named tensors in safetensors files (`--init-latents`, `--save-latents`, frame dumps).

use crate::error::input_error;
use anyhow::{Context, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads tensor `name` from a safetensors file, checking its shape when `expected` is given.
/// Errors name the file and the key.
pub fn read_tensor(path: &Path, name: &str, expected: Option<&[usize]>, device: &Device) -> Result<Tensor> {
    let bytes =
        std::fs::read(path).map_err(|e| input_error(format!("{}: cannot read: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| input_error(format!("{}: not a safetensors file: {e}", path.display())))?;
    let view = st.tensor(name).map_err(|_| {
        let mut keys: Vec<&str> = st.names();
        keys.sort();
        input_error(format!("{}: no tensor `{name}` (has: {})", path.display(), keys.join(", ")))
    })?;
    let tensor = view
        .load(device)
        .with_context(|| format!("{}: tensor `{name}`", path.display()))?
        .to_dtype(candle_core::DType::F32)?;
    if let Some(expected) = expected {
        if tensor.dims() != expected {
            return Err(input_error(format!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                path.display(),
                tensor.dims(),
                expected
            )));
        }
    }
    Ok(tensor)
}

/// Writes tensors to a safetensors file atomically.
pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)), None)?;
    super::atomic::write_file(path, |tmp| {
        std::fs::write(tmp, &bytes).with_context(|| format!("{}: cannot write", path.display()))
    })
}
